"""Bad photos through ``FaceAnalyzer``: every failure is one line naming the file, never a traceback."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from celebbasis.errors import NoFaceFoundError
from celebbasis.face import MIN_IMAGE_SIDE, DlibFaceDetector, Face, FaceAnalyzer, MTCNNDetector

DLIB_TRACEBACK = "\n\nError detected at line 2957.\nError detected in file ../../../dlib/cuda/cpu_dlib.cpp.\n"


class NoDetector:
    """Fails the test when called: the cheap checks must refuse the image first."""

    def detect(self, image):
        raise AssertionError(f"the detector ran on a {image.shape} image")


class CrashingDetector:
    def detect(self, image):
        raise RuntimeError(DLIB_TRACEBACK)


class OneFaceDetector:
    def detect(self, image):
        return [Face((10.0, 10.0, 90.0, 90.0), np.full((5, 2), 50.0))]


class CrashingEncoder:
    name, embedding_dim, landmarks = "crashing", 4, "dlib5"

    def align(self, image, face):
        return image[:8, :8]

    def embed(self, aligned):
        raise RuntimeError(DLIB_TRACEBACK)


def photo(tmp_path, w, h, mode="RGB", colour=128):
    path = tmp_path / f"photo {w}x{h}.png"
    Image.new(mode, (w, h), colour).save(path)
    return path


def one_line(e: pytest.ExceptionInfo, path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


@pytest.fixture(scope="module")
def mtcnn():
    return MTCNNDetector()


@pytest.mark.parametrize("w, h", [(1, 1), (3, 3), (8, 8), (16, 16), (31, 31), (1, 4000), (4000, 1), (31, 2000)])
def test_too_small_is_refused_before_any_detector_runs(tmp_path, face_analyzer, w, h):
    path = photo(tmp_path, w, h)
    with pytest.raises(NoFaceFoundError) as e:
        FaceAnalyzer(detector=NoDetector(), encoder=face_analyzer.encoder)(path)
    msg = one_line(e, path)
    assert f"{w}x{h} px, too small" in msg and f"at least {MIN_IMAGE_SIDE} px on each side" in msg


@pytest.mark.parametrize("w, h", [(1, 1), (3, 3), (8, 8), (1, 4000), (4000, 1)])
@pytest.mark.parametrize("detector", ["dlib", "mtcnn"])
def test_real_detectors_never_see_tiny_images(tmp_path, face_analyzer, mtcnn, detector, w, h):
    """dlib's CNN ends in a RuntimeError from its tensor code on these; MTCNN in a ValueError."""
    path = photo(tmp_path, w, h)
    analyzer = face_analyzer if detector == "dlib" else FaceAnalyzer(detector=mtcnn, encoder=face_analyzer.encoder)
    with pytest.raises(NoFaceFoundError, match="too small"):
        analyzer(path)
    det = face_analyzer.detector if detector == "dlib" else mtcnn
    assert det.detect(np.zeros((h, w, 3), np.uint8)) == []  # called directly (as the web UI does): no crash


@pytest.mark.parametrize("w, h, mode", [(4000, 33, "RGB"), (33, 4000, "RGB"), (64000, 500, "L")])
def test_too_thin_is_refused_before_any_detector_runs(tmp_path, face_analyzer, w, h, mode):
    """Shrunk to 1024 px for detection these kept an 8 px side, which crashed dlib; 64000x500 is 32 MP, allowed."""
    path = photo(tmp_path, w, h, mode)
    with pytest.raises(NoFaceFoundError, match="too thin to search for a face") as e:
        FaceAnalyzer(detector=NoDetector(), encoder=face_analyzer.encoder)(path)
    assert "Crop it" in one_line(e, path)
    assert face_analyzer.detector.detect(np.zeros((h, w, 3), np.uint8)) == []  # called directly (as the web UI does)


@pytest.mark.parametrize("w, h", [(1500, 60), (60, 1500)])
def test_odd_aspect_photos_get_a_plain_no_face(tmp_path, face_analyzer, mtcnn, w, h):
    path = photo(tmp_path, w, h)
    for analyzer in (face_analyzer, FaceAnalyzer(detector=mtcnn, encoder=face_analyzer.encoder)):
        with pytest.raises(NoFaceFoundError, match="No face found in") as e:
            analyzer(path)
        one_line(e, path)


def test_greyscale_photo_finds_the_face(tmp_path, face_analyzer, astronaut_path, astronaut):
    path = tmp_path / "grey.png"
    Image.open(astronaut_path).convert("L").save(path)
    grey = face_analyzer(path)
    assert grey.n_faces == 1 and grey.image.mode == "RGB"
    assert float(grey.embedding @ astronaut.embedding) > 0.9
    faces = face_analyzer.detect(np.asarray(Image.open(path)), path)  # a 2-D array is accepted too
    assert len(faces) == 1


def test_detector_errors_become_one_line(tmp_path, face_analyzer):
    path = photo(tmp_path, 100, 100)
    with pytest.raises(NoFaceFoundError, match="face detector failed") as e:
        FaceAnalyzer(detector=CrashingDetector(), encoder=face_analyzer.encoder)(path)
    assert "cpu_dlib" not in one_line(e, path)


def test_encoder_errors_become_one_line(tmp_path):
    path = photo(tmp_path, 100, 100)
    with pytest.raises(NoFaceFoundError, match="identity network crashing failed") as e:
        FaceAnalyzer(detector=OneFaceDetector(), encoder=CrashingEncoder())(path)
    assert "cpu_dlib" not in one_line(e, path)


def test_says_it_is_looking_before_detection(tmp_path, face_analyzer, caplog):
    path = photo(tmp_path, 100, 100)

    class Watch:
        def detect(self, image):
            assert f"Looking for faces in {path}" in caplog.text  # logged before the slow part
            return []

    with caplog.at_level(logging.INFO, logger="celebbasis"), pytest.raises(NoFaceFoundError, match="No face found"):
        FaceAnalyzer(detector=Watch(), encoder=face_analyzer.encoder)(path)


def test_second_pass_at_2x_only_for_small_images():
    calls = []
    det = object.__new__(DlibFaceDetector)  # not the session's shared detector: dlib's network is a recorder here
    det.upsample = 0
    det.detector = lambda image, upsample: calls.append((image.shape[:2], upsample)) or []
    rng = np.random.default_rng()  # pictures no other test has searched
    det.detect(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    assert calls == [((480, 640), 0)]  # a 640x480 photo without a face: one pass, not 1 + 4x
    calls.clear()
    det.detect(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8))
    assert calls == [((256, 320), 0), ((256, 320), 1)]


def test_the_reference_faces_are_still_found(astronaut, hopper):
    assert astronaut.n_faces == 1 and hopper.n_faces == 1
    assert astronaut.face.width > 64 and hopper.face.width > 64
