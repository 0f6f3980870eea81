"""Where a face is and how it is framed: landmark layouts, the official templates, similarity warps.

A ``Face`` is a detected face in photo pixels; ``crop_face`` makes the training view of it, and
``arcface_align`` / ``insightface_align`` the inputs of the ArcFace-style networks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import InputError


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

    A ``WHOLE`` face (the toy world) is the whole image, framed by ``frame_whole``."""
    if face.layout == WHOLE:
        return frame_whole(image, size)
    if face.layout == FIVE_POINT:  # the official FFHQ crop: all five landmarks onto its template
        m = similarity_transform(face.landmarks, CROP_TEMPLATE_FIVE_POINT * size - 0.5)
        return warp_affine(image, _pixel_centres(m), size)
    m = similarity_transform(face.key_points(), CROP_TEMPLATE * size)
    return warp_affine(image, m, size)


def frame_whole(image: Image.Image, size: int, background: str = "#FFFFFF") -> Image.Image:
    """A whole picture as a ``size``² view: scaled to ``size`` high and centred on a square of ``background``
    (a picture wider than high is cropped at the sides); transparency goes over the background."""
    image = image.convert("RGBA")
    w = max(1, round(image.width * size / image.height))
    scaled = image.resize((w, size), Image.LANCZOS)
    canvas = Image.new("RGBA", (size, size), background)
    canvas.alpha_composite(scaled, ((size - w) // 2, 0)) if w <= size else canvas.alpha_composite(
        scaled.crop(((w - size) // 2, 0, (w - size) // 2 + size, size)))
    return canvas.convert("RGB")
