"""The dlib face pipeline on real photos, and the alignment geometry."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from celebbasis.errors import InputError, NoFaceFoundError
from celebbasis.face import crop_face, load_image
from celebbasis.face.geometry import CROP_TEMPLATE, similarity_transform


def test_astronaut_one_face_landmarks_inside_box(astronaut):
    assert astronaut.n_faces == 1
    left, top, right, bottom = astronaut.face.box
    assert right - left > 64
    pts = astronaut.face.landmarks
    assert pts.shape == (5, 2)
    assert ((pts[:, 0] >= left) & (pts[:, 0] <= right) & (pts[:, 1] >= top) & (pts[:, 1] <= bottom)).all()
    assert astronaut.aligned.shape == (150, 150, 3) and astronaut.aligned.dtype == np.uint8
    assert astronaut.embedding.shape == (128,)
    assert np.linalg.norm(astronaut.embedding) == pytest.approx(1.0, abs=1e-5)


def test_mirror_is_closer_than_another_person(face_analyzer, astronaut, hopper, mirrored_path):
    mirrored = face_analyzer(mirrored_path)
    same = float(astronaut.embedding @ mirrored.embedding)
    other = float(astronaut.embedding @ hopper.embedding)
    assert same > 0.98
    assert same > other + 0.05


def test_no_face_is_a_clear_error(face_analyzer, faceless_path):
    with pytest.raises(NoFaceFoundError, match=f"No face found in {faceless_path}"):
        face_analyzer(faceless_path)


def test_face_index_out_of_range(face_analyzer, astronaut_path):
    with pytest.raises(NoFaceFoundError, match="out of range; 1 face"):
        face_analyzer(astronaut_path, face_index=3)


def test_similarity_transform_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ (scale * rot).T + shift
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)


def test_training_crop_puts_eyes_on_the_template(face_analyzer, astronaut):
    crop = crop_face(astronaut.image, astronaut.face, 256)
    assert crop.size == (256, 256)
    # detect again in the crop: the eye centres must land on the template within a few pixels
    faces = face_analyzer.detector.detect(np.asarray(crop))
    assert len(faces) == 1
    eyes = faces[0].key_points()[:2]
    np.testing.assert_allclose(eyes, CROP_TEMPLATE[:2] * 256, atol=6)


def test_exif_orientation_is_applied(tmp_path, astronaut_path):
    img = Image.open(astronaut_path).convert("RGB")
    rotated = img.rotate(90, expand=True)  # stored sideways (turned counter-clockwise)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    path = tmp_path / "phone photo.jpg"
    rotated.save(path, exif=exif, quality=95)
    upright = load_image(path)
    assert upright.size == img.size
    diff = np.abs(np.asarray(upright, dtype=np.int16) - np.asarray(img, dtype=np.int16)).mean()
    assert diff < 4


@pytest.mark.parametrize("mode", ["CMYK", "L", "RGBA", "P", "I;16"])
def test_any_mode_becomes_rgb(tmp_path, astronaut_path, mode):
    img = Image.open(astronaut_path).convert("RGB")
    if mode == "I;16":
        arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257)
        img = Image.fromarray(arr)
        assert img.mode.startswith("I;16")
        ext = "png"
    else:
        img = img.convert(mode)
        ext = "jpg" if mode == "CMYK" else "png"
    path = tmp_path / f"photo.{ext}"
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (512, 512)
    assert np.asarray(out).mean() > 20  # not black


@pytest.mark.parametrize("content, match", [(None, "no such file"), (b"", "empty"), (b"hello, not a jpeg", "not an image")])
def test_bad_image_files(tmp_path, content, match):
    path = tmp_path / "face.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=match):
        load_image(path)
