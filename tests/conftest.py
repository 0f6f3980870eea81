"""Shared fixtures: tiny random SD pipelines with the real CLIP tokenizer, and real dlib faces."""

from __future__ import annotations

import copy
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache: bases are cached in a per-session folder."""
    monkeypatch.setenv("CELEBBASIS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session", autouse=True)
def _dlib_once():
    """dlib's models load once per session, and each distinct picture is searched for faces once.

    Building a ``FaceAnalyzer`` loads ~100 MB of dlib models (~4 s here) and a detection takes ~3 s;
    the CLI builds an analyzer per command. The real classes and code paths still run: the same
    loaded dlib objects are handed out again, and ``detect`` remembers its answer per picture.
    """
    import hashlib

    from celebbasis import face

    mp = pytest.MonkeyPatch()
    detector, encoder = face.DlibFaceDetector(), face.DlibFaceEncoder()
    detect, seen = face.DlibFaceDetector.detect, {}

    def remembered(self, image):
        key = (image.shape, hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest(), self.upsample)
        if key not in seen:
            seen[key] = detect(self, image)
        return copy.deepcopy(seen[key])

    mp.setattr(face.DlibFaceDetector, "detect", remembered)
    mp.setattr(face.DlibFaceDetector, "__new__", lambda cls, *a, **k: detector)
    mp.setattr(face.DlibFaceDetector, "__init__", lambda self, *a, **k: None)
    mp.setattr(face.DlibFaceEncoder, "__new__", lambda cls, *a, **k: encoder)
    mp.setattr(face.DlibFaceEncoder, "__init__", lambda self, *a, **k: None)
    yield
    mp.undo()


@pytest.fixture(scope="session")
def _tiny_pipe():
    from celebbasis.testing import tiny_pipeline

    return tiny_pipeline(seed=0)


@pytest.fixture
def tiny_pipe(_tiny_pipe):
    """A fresh copy of the tiny SD 1.x pipeline (tests may add tokens to it)."""
    return copy.deepcopy(_tiny_pipe)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny pipeline saved as a diffusers folder, for --model PATH."""
    from celebbasis.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def astronaut_path():
    from celebbasis.resources import example_face

    return example_face()


@pytest.fixture(scope="session")
def hopper_path():
    """Grace Hopper, US Navy portrait (public domain): a second, different real face."""
    return DATA / "grace_hopper.jpg"


@pytest.fixture(scope="session")
def mirrored_path(tmp_path_factory, astronaut_path):
    path = tmp_path_factory.mktemp("faces") / "astronaut_mirrored.png"
    ImageOps.mirror(Image.open(astronaut_path).convert("RGB")).save(path)
    return path


@pytest.fixture(scope="session")
def faceless_path(tmp_path_factory):
    """Smooth colour gradients and blobs: no face anywhere."""
    path = tmp_path_factory.mktemp("faces") / "no_face.png"
    y, x = np.mgrid[0:256, 0:256]
    img = np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


@pytest.fixture(scope="module")
def toy_pipe():
    """The packaged toy world, one per test module (the modules load their own identities into it)."""
    import celebbasis as cb

    return cb.load_pipeline(toy=True, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def toy_analyzer():
    from celebbasis.face import FaceAnalyzer

    return FaceAnalyzer(encoder="toy")


@pytest.fixture(scope="session")
def face_analyzer():
    from celebbasis.face import FaceAnalyzer

    return FaceAnalyzer()


@pytest.fixture(scope="session")
def astronaut(face_analyzer, astronaut_path):
    return face_analyzer(astronaut_path)


@pytest.fixture(scope="session")
def hopper(face_analyzer, hopper_path):
    return face_analyzer(hopper_path)


def side_by_side(*images: Image.Image) -> Image.Image:
    """Pictures pasted left to right at their own sizes, top-aligned: a photo of several people."""
    out = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)))
    x = 0
    for im in images:
        out.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return out


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height pixels: a decompression bomb without the memory."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="session")
def tiny_single_file(tmp_path_factory):
    """The tiny SD 1.x pipeline (seed 0, the same weights as ``tiny_model_dir``) as one A1111/ComfyUI-style
    ``.safetensors`` checkpoint; load it with ``config=tiny_model_dir`` (``--model-config``)."""
    from helpers import save_tiny_single_file

    return save_tiny_single_file(tmp_path_factory.mktemp("checkpoints") / "tinyVision.safetensors")
