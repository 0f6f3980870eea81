"""From a photo to an identity vector: load, detect, pick a face, align, embed, with one-line errors."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import CelebBasisError, InputError, NoFaceFoundError
from .detectors import DETECT_MAX_SIDE, MIN_IMAGE_SIDE, detection_scale, detector_for
from .encoders import DlibFaceEncoder, FaceEncoder, make_face_encoder
from .geometry import Face, crop_face
from .images import load_image

logger = logging.getLogger(__name__)


MIN_FACE_PX = 64  # faces narrower than this are upscaled noise for the identity network


def _check_searchable(h: int, w: int, path) -> None:
    """Refuse, in one line naming ``path``, an image too small or too thin to hold a usable face."""
    if min(h, w) < MIN_IMAGE_SIDE:
        raise NoFaceFoundError(
            f"{path} is only {w}x{h} px, too small to hold a usable face. Use a photo at least {MIN_IMAGE_SIDE} px "
            f"on each side, with the face at least {MIN_FACE_PX} px wide."
        )
    if min(h, w) * detection_scale(h, w) < MIN_IMAGE_SIDE:
        raise NoFaceFoundError(
            f"{path} is {w}x{h} px, too thin to search for a face (over {DETECT_MAX_SIDE // MIN_IMAGE_SIDE}:1). "
            "Crop it to the person."
        )


@dataclass
class FaceAnalysis:
    """Everything ``analyze_face`` found in one photo."""

    path: str
    image: Image.Image  # upright RGB photo
    face: Face  # the face used
    n_faces: int  # faces found in the photo
    aligned: np.ndarray  # what the identity network saw
    embedding: np.ndarray  # (D,) unit-norm identity vector
    encoder_name: str  # the identity network's name (``FaceEncoder.name``), recorded in identities

    def crop(self, size: int = 512) -> Image.Image:
        return crop_face(self.image, self.face, size)


class FaceAnalyzer:
    """Detector + identity network, loaded once and reused for every photo."""

    def __init__(self, detector=None, encoder: FaceEncoder | str | None = None,
                 face_index_hint: str = "face_index=N (0 = largest)"):
        self.encoder = make_face_encoder(encoder) if isinstance(encoder, str) else encoder or DlibFaceEncoder()
        self.detector = detector or detector_for(self.encoder)
        self.face_index_hint = face_index_hint  # how the caller picks another face, named in the several-faces warning

    def detect(self, image: np.ndarray, path="the photo") -> list[Face]:
        """Faces in an RGB photo, largest first, with every failure as one line naming ``path``.

        Images under ``MIN_IMAGE_SIDE`` on a side, or so thin that shrinking them to
        ``DETECT_MAX_SIDE`` would leave less (over 32:1), are refused before the detector runs;
        errors from the detector's native code (dlib's ``RuntimeError``, ...) become ``NoFaceFoundError``.

        Args:
            image: (H, W, 3) uint8 RGB; (H, W) grey and (H, W, 4) RGBA arrays are accepted too.
            path: what to call the photo in messages.

        Raises:
            NoFaceFoundError: the image is too small or too thin, or the detector cannot read it.
        """
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        elif image.ndim == 3 and image.shape[2] == 4:
            image = image[:, :, :3]
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"{path}: expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}. Load it with load_image.")
        h, w = image.shape[:2]
        _check_searchable(h, w, path)
        try:
            return self.detector.detect(np.ascontiguousarray(image))
        except CelebBasisError:
            raise
        except (RuntimeError, ValueError, IndexError) as e:
            raise NoFaceFoundError(
                f"The face detector failed on {path} ({w}x{h} px, {type(e).__name__}). Use an ordinary photo "
                f"at least {MIN_IMAGE_SIDE} px on each side, with the face at least {MIN_FACE_PX} px wide."
            ) from None

    def embed(self, image: np.ndarray, face: Face, path="the photo") -> tuple[np.ndarray, np.ndarray]:
        """The aligned crop and the (D,) unit identity vector of one detected face.

        Raises:
            NoFaceFoundError: the identity network's native code fails on this face.
        """
        try:
            aligned = self.encoder.align(image, face)
            emb = np.asarray(self.encoder.embed(aligned), dtype=np.float32)
        except CelebBasisError:
            raise
        except (RuntimeError, ValueError, IndexError) as e:
            raise NoFaceFoundError(
                f"The identity network {self.encoder.name} failed on the face in {path} ({type(e).__name__}). "
                f"Use a photo where the face is frontal, well lit and at least {MIN_FACE_PX} px wide."
            ) from None
        if not np.isfinite(emb).all():
            raise NoFaceFoundError(
                f"The identity network {self.encoder.name} gave no usable vector for the face in {path}. "
                f"Use a photo where the face is frontal, well lit and at least {MIN_FACE_PX} px wide."
            )
        return aligned, emb

    def __call__(self, path, face_index: int | None = None) -> FaceAnalysis:
        """Analyse the face in the photo at ``path``.

        Args:
            path: any image file Pillow reads.
            face_index: which face to use when there are several, 0 being the largest. ``None``
                uses the largest and warns with the count.

        Raises:
            InputError: the file cannot be read as an image.
            NoFaceFoundError: no face, an image too small for one, or ``face_index`` out of range.
        """
        return self.find(path, face_index)[1]

    def find(self, path, face_index: int | None = None, label=None) -> tuple[list[Face], FaceAnalysis]:
        """Every face in the photo at ``path`` (largest first) and the analysis of the one used (``__call__``).

        ``label`` is what messages call the photo (default: ``path``), e.g. the name a file was uploaded under.
        """
        label = label or path
        image = load_image(path, label)
        arr = np.asarray(image)
        logger.info("Looking for faces in %s …", label)
        faces = self.detect(arr, label)  # refuses images too small or thin to search (``_check_searchable``)
        if not faces:  # a detector may say what its network needs instead (``no_face_hint``: the toy world's)
            raise NoFaceFoundError(f"No face found in {label}. " + getattr(
                self.detector, "no_face_hint", f"Use a photo where the face is frontal, well lit and at least {MIN_FACE_PX} px wide."))
        if face_index is None:
            index = 0
            if len(faces) > 1:
                logger.warning("%s: %d faces found; using the largest. Pick another with %s.", label, len(faces),
                               self.face_index_hint)
        else:
            if not 0 <= face_index < len(faces):
                raise NoFaceFoundError(
                    f"{label}: face_index {face_index} is out of range; {len(faces)} face(s) found (0 = largest).",
                    field="face_index",
                )
            index = face_index
        face = faces[index]
        if face.width < MIN_FACE_PX:
            logger.warning(
                "%s: the face is only %d px wide; identity will be weak. Use a photo with the face at least %d px wide.",
                label, int(face.width), MIN_FACE_PX,
            )
        aligned, emb = self.embed(arr, face, label)
        return faces, FaceAnalysis(str(path), image, face, len(faces), aligned, emb, self.encoder.name)
