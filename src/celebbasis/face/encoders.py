"""Face networks: an aligned face -> a unit identity vector (paper §3.2, METHOD §2).

dlib's 128-d ResNet (default, offline, CC0), the paper's ArcFace IResNet (``arcface:PATH``) and any
insightface ONNX model (``onnx:PATH``), each a ``FaceEncoder``. They are made from a spec by
``make_face_encoder``; ``FACE_ENCODERS`` holds the kinds, and ``register_face_encoder`` adds one from
outside the package (the toy world adds ``toy``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import InputError, MissingDependencyError, first_line
from .detectors import dlib_modules
from .geometry import DLIB5, FIVE_POINT, Face, arcface_align, insightface_align

logger = logging.getLogger(__name__)


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
        dlib, models = dlib_modules()
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

        from .nets import IRESNET_LAYERS, IResNet, iresnet_layers_from_state_dict

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


# Face networks by the first word of their spec: kind -> (factory, how the spec is written). A spec with
# ``:PATH`` passes the path to the factory. A new network is one ``FaceEncoder`` class and one entry
# here, or ``register_face_encoder`` from outside the package (as the toy world adds ``toy``).
FACE_ENCODERS: dict[str, tuple] = {
    "dlib": (DlibFaceEncoder, "dlib"),
    "arcface": (ArcFaceEncoder, "arcface:/path/backbone.pth"),
    "onnx": (OnnxFaceEncoder, "onnx:/path/model.onnx"),
}


def register_face_encoder(kind: str, factory, usage: str | None = None) -> None:
    """Make ``--face-encoder KIND`` build ``factory()``, or, with a ``usage`` like ``KIND:/path/w.pth``,
    ``--face-encoder KIND:PATH`` build ``factory(PATH)``."""
    FACE_ENCODERS[kind] = (factory, usage or kind)


def make_face_encoder(spec: str = "dlib") -> FaceEncoder:
    """An identity network from a spec: ``dlib``, ``arcface:/path/backbone.pth``, ``onnx:/path/model.onnx``,
    or a kind added by ``register_face_encoder`` (``toy``, the toy world's)."""
    kind, _, arg = spec.partition(":")
    factory, usage = FACE_ENCODERS.get(kind, (None, ""))
    if factory is not None and (":" in usage) == bool(arg):
        return factory(arg) if arg else factory()
    raise InputError(f"Unknown face encoder {spec!r}. Use {', '.join(u for _, u in FACE_ENCODERS.values())}.")

