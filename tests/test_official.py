"""Against the official code (CelebBasis 557531b): its face crop, its face network's input, its prompts.

The official numbers below are typed in from the official files, so these tests do not read
celebbasis' own copies of them: ``alignment.py`` (the "ffhq" five-point template of a 512 crop),
``meta_net.py`` (the fixed warp to the face network's 112x112 input) and ``infer_images/exp_*.txt``.
"""

from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from celebbasis.prompts import (
    CATEGORIES, PAPER_PROMPT_FILES, benchmark_prompt_lines, benchmark_prompts, categorize, negative_prompt_for,
    paper_prompts,
)
from celebbasis.face import DLIB5, FIVE_POINT, WHOLE, ArcFaceEncoder, Face, OnnxFaceEncoder, crop_face
from celebbasis.face.geometry import CROP_TEMPLATE, PAPER_ENCODER_TEMPLATE, arcface_align, similarity_transform, warp_affine
from celebbasis.resources import data_path

# evaluation/face_align/PIPNet/alignment/alignment.py: ``ffhq`` (left eye, right eye, nose tip, mouth corners)
OFFICIAL_FFHQ_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]])
# ldm/modules/id_embedding/meta_net.py: ``trans_matrix``, an affine_grid theta
OFFICIAL_THETA = [[1.07695457, -0.03625215, -1.56352194 / 512], [0.03625215, 1.07695457, -5.32134629 / 512]]

# Five landmarks placed by hand on a 640x480 picture: a face tilted by about 8 degrees, its mouth a
# little off to the right. Pixel centres at integers, as detectors and cv2 count.
HAND = np.array([[262.0, 201.0], [361.0, 214.0], [305.0, 262.0], [263.0, 306.0], [340.0, 316.0]])


def fit(src, dst) -> np.ndarray:
    """Least-squares similarity as the official code's skimage ``SimilarityTransform.estimate``,
    written independently: complex numbers, dst ~ a * src + b."""
    s = src[:, 0] + 1j * src[:, 1]
    d = dst[:, 0] + 1j * dst[:, 1]
    sc, dc = s - s.mean(), d - d.mean()
    a = (dc * sc.conj()).sum() / (abs(sc) ** 2).sum()
    b = d.mean() - a * s.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def apply(m, pts) -> np.ndarray:
    return np.asarray(pts) @ m[:, :2].T + m[:, 2]


def dots(w, h, points, sigma) -> np.ndarray:
    """(h, w, 3) uint8: a round red dot centred on each point, green and blue zero."""
    ys, xs = np.mgrid[:h, :w].astype(float)
    red = sum(np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2)) for x, y in points)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.clip(red * 255 + 0.5, 0, 255).astype(np.uint8)
    return img


def centroids(channel, near, radius) -> np.ndarray:
    """Where each dot is: the brightness centroid in a window around each point of ``near``."""
    channel = np.asarray(channel, float)
    out = []
    for x, y in near:
        x0, y0 = int(round(x)), int(round(y))
        ys, xs = np.mgrid[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1]
        v = channel[ys, xs]
        out.append(((v * xs).sum() / v.sum(), (v * ys).sum() / v.sum()))
    return np.array(out)


def official_encoder_input(photo: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The official evaluation's face network input, in torch: the photo aligned onto the FFHQ
    template of a 512 crop (as cv2.warpAffine), then its fixed warp and shrink to 112."""
    h, w = photo.shape[:2]
    x = torch.from_numpy(photo.astype(np.float32)).permute(2, 0, 1)[None]
    inv = np.linalg.inv(np.vstack([fit(landmarks, OFFICIAL_FFHQ_512), [0, 0, 1]]))[:2]  # crop pixel -> photo pixel
    ys, xs = np.mgrid[:512, :512].astype(float)
    src = apply(inv, np.stack([xs.ravel(), ys.ravel()], 1))
    grid = np.stack([2 * src[:, 0] / (w - 1) - 1, 2 * src[:, 1] / (h - 1) - 1], 1).reshape(1, 512, 512, 2)
    crop = F.grid_sample(x, torch.tensor(grid, dtype=torch.float32), mode="bilinear", align_corners=True)
    theta = torch.tensor([OFFICIAL_THETA], dtype=torch.float32)
    grid = F.affine_grid(theta, size=crop.size(), align_corners=True)
    crop = F.grid_sample(crop, grid, align_corners=True, mode="bilinear", padding_mode="zeros")
    crop = F.interpolate(crop, size=112, mode="bilinear", align_corners=True)
    return crop[0].permute(1, 2, 0).numpy()


# -- the training crop ------------------------------------------------------------------------------


def exact_face() -> np.ndarray:
    """The official template turned by 0.2 rad, scaled by 0.6 and moved: a face that fits it exactly."""
    rot = np.array([[np.cos(0.2), -np.sin(0.2)], [np.sin(0.2), np.cos(0.2)]])
    return OFFICIAL_FFHQ_512 @ (0.6 * rot).T + [130.0, 30.0]


@pytest.mark.parametrize("size", [256, 512])
@pytest.mark.parametrize("landmarks", ["hand", "exact"])
def test_training_crop_puts_dots_where_the_official_crop_does(size, landmarks):
    """The official photos are aligned at 256 (the template halved) and upsampled: at 512 every point
    lands half a pixel right and down of the template."""
    points = HAND if landmarks == "hand" else exact_face()
    photo = Image.fromarray(dots(640, 480, points, sigma=2.0))
    crop = crop_face(photo, Face((200.0, 150.0, 400.0, 350.0), points, 1.0, FIVE_POINT), size)
    assert crop.size == (size, size)
    at_256 = apply(fit(points, OFFICIAL_FFHQ_512 / 2), points)  # official: norm_crop(img, lmk, 256, "ffhq")
    want = (at_256 + 0.5) * size / 256 - 0.5  # then Resize(512)
    got = centroids(np.asarray(crop)[..., 0], want, radius=8)
    np.testing.assert_allclose(got, want, atol=0.1)
    template = (OFFICIAL_FFHQ_512 / 2 + 0.5) * size / 256 - 0.5
    if landmarks == "exact":
        np.testing.assert_allclose(got, template, atol=0.5)
    else:  # a face placed by hand does not fit the template exactly, but the centre of its landmarks does
        np.testing.assert_allclose(got.mean(0), template.mean(0), atol=0.3)


def test_training_crop_frames_the_face_as_ffhq_does():
    """Eyes 24.6 % of the width apart (the old template: 25 %), mouth corners at 72.6 % of the height."""
    photo = Image.fromarray(dots(640, 480, exact_face(), sigma=2.0))
    crop = np.asarray(crop_face(photo, Face((0.0, 0.0, 640.0, 480.0), exact_face(), 1.0, FIVE_POINT), 512))[..., 0]
    got = centroids(crop, OFFICIAL_FFHQ_512, radius=8) / 512
    assert got[1, 0] - got[0, 0] == pytest.approx(0.2459, abs=0.002)
    assert got[3:, 1].mean() == pytest.approx(0.7261, abs=0.002)


def test_dlib_and_toy_crops_are_unchanged():
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    corners = np.array([[150.0, 120.0], [130.0, 121.0], [230.0, 118.0], [250.0, 119.0], [190.0, 180.0]])
    face = Face((100.0, 80.0, 280.0, 260.0), corners, 1.0, DLIB5)
    np.testing.assert_allclose(CROP_TEMPLATE, [[0.375, 0.47], [0.625, 0.47], [0.5, 0.625]])
    want = warp_affine(photo, similarity_transform(face.key_points(), CROP_TEMPLATE * 128), 128)
    assert np.array_equal(np.asarray(crop_face(photo, face, 128)), np.asarray(want))
    from celebbasis.face.geometry import frame_whole

    whole = Face((0.0, 0.0, 400.0, 300.0), np.zeros((5, 2)), 1.0, WHOLE)
    assert np.array_equal(np.asarray(crop_face(photo, whole, 64)), np.asarray(frame_whole(photo, 64)))


# -- the face network's input -----------------------------------------------------------------------


def test_encoder_template_is_the_official_warp_of_the_ffhq_template():
    """Dots on the FFHQ template of a 512 crop, through the official torch warp: where they land."""
    crop = dots(512, 512, OFFICIAL_FFHQ_512, sigma=6.0)[..., 0].astype(np.float32)
    x = torch.from_numpy(crop)[None, None]
    theta = torch.tensor([OFFICIAL_THETA], dtype=torch.float32)
    x = F.grid_sample(x, F.affine_grid(theta, size=x.size(), align_corners=True), align_corners=True)
    x = F.interpolate(x, size=112, mode="bilinear", align_corners=True)[0, 0].numpy()
    got = centroids(x, PAPER_ENCODER_TEMPLATE, radius=5)
    np.testing.assert_allclose(got, PAPER_ENCODER_TEMPLATE, atol=0.05)
    np.testing.assert_allclose(PAPER_ENCODER_TEMPLATE[0], [42.97, 53.32], atol=0.01)  # left eye
    np.testing.assert_allclose(PAPER_ENCODER_TEMPLATE[4], [68.06, 78.94], atol=0.01)  # right mouth corner


@pytest.mark.parametrize("landmarks", ["hand", "exact"])
def test_encoder_input_puts_dots_where_the_official_pipeline_does(landmarks):
    points = HAND if landmarks == "hand" else exact_face()
    photo = dots(640, 480, points, sigma=5.0)
    face = Face((200.0, 150.0, 400.0, 350.0), points, 1.0, FIVE_POINT)
    ours = arcface_align(photo, face)
    assert ours.shape == (112, 112, 3) and ours.dtype == np.uint8
    official = official_encoder_input(photo, points)
    want = centroids(official[..., 0], PAPER_ENCODER_TEMPLATE, radius=5)
    got = centroids(ours[..., 0], want, radius=5)
    np.testing.assert_allclose(got, want, atol=0.1)
    if landmarks == "exact":
        np.testing.assert_allclose(got, PAPER_ENCODER_TEMPLATE, atol=0.1)
    # the whole picture agrees too, not just the dots (bicubic once vs bilinear three times)
    diff = np.abs(ours.astype(float) - official)
    assert diff.mean() < 0.5 and np.corrcoef(ours[..., 0].ravel(), official[..., 0].ravel())[0, 1] > 0.98


def test_the_papers_encoder_aligns_the_official_way_onnx_the_insightface_way(tmp_path):
    from celebbasis.face.geometry import insightface_align

    points = exact_face()
    photo = dots(640, 480, points, sigma=5.0)
    face = Face((0.0, 0.0, 640.0, 480.0), points, 1.0, FIVE_POINT)
    assert np.array_equal(ArcFaceEncoder.align(None, photo, face), arcface_align(photo, face))
    onnx = OnnxFaceEncoder.__new__(OnnxFaceEncoder)  # insightface's models were trained on insightface's layout
    onnx.size = 112
    assert np.array_equal(onnx.align(photo, face), insightface_align(photo, face))
    assert not np.array_equal(onnx.align(photo, face), arcface_align(photo, face))


# -- the prompts ------------------------------------------------------------------------------------


def test_official_prompt_files_are_shipped():
    counts = {"style": 21, "single action": 10, "with a celebrity": 8, "two identities": 8}
    for category, n in counts.items():
        assert data_path(f"paper_prompts/{PAPER_PROMPT_FILES[category]}").is_file()
        assert len(paper_prompts(category)) == n, category
    assert paper_prompts("style")[0] == "Manga drawing of sks person and ks person"
    assert paper_prompts("style")[-1] == "two wizards, a sks person as a wizard and a ks person also wearing like a wizard"
    assert paper_prompts("single action")[-1] == ("a sks person carrying plastic bags of vegetables in chinese "
                                                  "vegetable market, sunny day")
    assert paper_prompts("with a celebrity")[1] == "a sks person and Elon Musk playing the piano together"
    assert paper_prompts("two identities")[-1] == "a sks person shakes hands with a ks person in news conference"


def test_pyproject_ships_the_prompt_files():
    pyproject = Path(__file__).parent.parent / "pyproject.toml"
    globs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["celebbasis"]
    assert "data/paper_prompts/*.txt" in globs, "add data/paper_prompts/*.txt to [tool.setuptools.package-data]"


def test_benchmark_prompts_are_the_official_ones():
    rows = benchmark_prompts(["alice", "<bob>"])
    by = {c: [p for cat, p in rows if cat == c] for c in CATEGORIES}
    assert [c for c, _ in rows] == sorted((c for c, _ in rows), key=CATEGORIES.index)  # grouped, in order
    assert {c: len(v) for c, v in by.items()} == {"style": 21, "single action": 20, "with a celebrity": 16,
                                                  "two identities": 8}
    assert by["style"][0] == "Manga drawing of <alice> person and <bob> person"
    assert by["style"][1] == "a <alice> Funko Pop next to another <bob> Funko Pop"
    assert by["single action"][0] == "a <alice> person is playing the basketball"
    assert by["single action"][10] == "a <bob> person is playing the basketball"
    assert by["with a celebrity"][0] == "a <alice> person and Barack Obama cooking together in a kitchen"
    assert by["two identities"][-1] == "a <alice> person shakes hands with a <bob> person in news conference"
    for c, p in rows:
        assert not re.search(r"\b(sks|ks)\b", p), p
        assert "<alice>" in p or "<bob>" in p
        assert categorize(p, len(set(re.findall(r"<[^<>\s]+>", p)))) == c, p
    for category in CATEGORIES:  # every official prompt, as written there, once per person or pair
        assert [p.replace("<alice>", "sks").replace("<bob>", "ks") for p in by[category] if "<alice>" in p] == \
            list(paper_prompts(category))
    lines = benchmark_prompt_lines(["alice", "bob"])
    assert all(x.negative_prompt == negative_prompt_for(x.category) for x in lines)


def test_benchmark_prompts_for_one_person_and_for_three(caplog):
    with caplog.at_level(logging.WARNING, logger="celebbasis"):
        one = benchmark_prompts(["alice"])
    assert {c for c, _ in one} == {"single action", "with a celebrity"} and len(one) == 18
    assert "pass two or more names" in caplog.text
    three = benchmark_prompts(["a", "b", "c"])
    pairs = [p for c, p in three if c == "two identities"]
    assert len(pairs) == 3 * 8 and len([1 for c, _ in three if c == "style"]) == 3 * 21
    assert pairs[0].startswith("a <a> person and a <b> person") and pairs[8].startswith("a <a> person and a <c> person")
    assert pairs[16].startswith("a <b> person and a <c> person")


def test_onnx_models_keep_insightface_layout():
    """insightface's recognition models were trained on its standard layout, not the paper's warp."""
    from PIL import ImageDraw

    from celebbasis.face import FIVE_POINT, Face
    from celebbasis.face.geometry import ARCFACE_TEMPLATE, insightface_align

    points = ARCFACE_TEMPLATE * 2.0 + np.array([100.0, 60.0])
    img = Image.new("RGB", (512, 512))
    draw = ImageDraw.Draw(img)
    for x, y in points:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(255, 0, 0))
    crop = insightface_align(np.asarray(img), Face((0, 0, 512, 512), points, 1.0, FIVE_POINT))
    red = crop[..., 0].astype(float)
    for tx, ty in ARCFACE_TEMPLATE:
        ys, xs = np.mgrid[int(ty) - 5: int(ty) + 6, int(tx) - 5: int(tx) + 6]
        w = red[ys, xs]
        assert abs((w * xs).sum() / w.sum() - tx) < 1 and abs((w * ys).sum() / w.sum() - ty) < 1
