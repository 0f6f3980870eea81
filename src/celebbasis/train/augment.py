"""Training views, as the official ``ldm/data/face_id.py`` makes them (RandomHorizontalFlip, ColorJitter, _add_bg).

A view of a face crop: horizontal flip, colour jitter (brightness, contrast, saturation, hue, in random
order), then the face shrunk to 10-100 % of the canvas height (width/height 0.9-1.1) and pasted at a
random spot on a black canvas. The flip and jitter of a view (``ViewJitter``) also go to the face
network's input, so every view has its own face vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

from ..config import TrainConfig


def _hue(im: Image.Image, shift: float) -> Image.Image:
    """torchvision's ``adjust_hue`` on PIL images: the 8-bit hue channel moves by trunc(shift·255), wrapping."""
    h, s, v = im.convert("HSV").split()
    step = int(shift * 255) % 256
    h = Image.fromarray(((np.asarray(h, dtype=np.uint16) + step) % 256).astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


# brightness, contrast, saturation, hue: what torchvision's ColorJitter does to a PIL image
_COLOUR_OPS = (
    lambda im, f: ImageEnhance.Brightness(im).enhance(f),
    lambda im, f: ImageEnhance.Contrast(im).enhance(f),
    lambda im, f: ImageEnhance.Color(im).enhance(f),
    _hue,
)


@dataclass(frozen=True)
class ViewJitter:
    """One view's flip and colour jitter: applied to the training crop and to the face network's input alike.

    Attributes:
        flip: mirror left-right (first, as the official transform).
        order: the order the four colour operations run in (0 brightness, 1 contrast, 2 saturation, 3 hue).
        factors: brightness, contrast and saturation factors and the hue shift (fraction of the colour
            circle); ``None`` where the setting is 0, which skips that operation as torchvision does.
    """

    flip: bool
    order: tuple[int, ...]
    factors: tuple[float | None, ...]

    @classmethod
    def draw(cls, rng: np.random.Generator, cfg: TrainConfig) -> "ViewJitter":
        flip = bool(rng.random() < cfg.flip_p)
        order = tuple(int(i) for i in rng.permutation(4))  # torchvision: torch.randperm(4)
        lo, hi = 1 - cfg.jitter, 1 + cfg.jitter
        factors = [float(rng.uniform(lo, hi)) if cfg.jitter > 0 else None for _ in range(3)]
        factors.append(float(rng.uniform(-cfg.hue, cfg.hue)) if cfg.hue > 0 else None)
        return cls(flip, order, tuple(factors))

    def __call__(self, im: Image.Image) -> Image.Image:
        if self.flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        for i in self.order:
            if self.factors[i] is not None:
                im = _COLOUR_OPS[i](im, self.factors[i])
        return im


def paste_on_canvas(im: Image.Image, size: int, rng: np.random.Generator, cfg: TrainConfig) -> Image.Image:
    """The official ``_add_bg``: height ``size``·U(min_scale, max_scale), width that·U(1 ± aspect_jitter),
    pasted at a random position on a black ``size``² canvas."""
    rh = max(1, min(int(size * rng.uniform(cfg.min_scale, cfg.max_scale)), size))
    rw = max(1, min(int(rh * rng.uniform(1 - cfg.aspect_jitter, 1 + cfg.aspect_jitter)), size))
    y = int(rng.integers(size - rh)) if size > rh else 0
    x = int(rng.integers(size - rw)) if size > rw else 0
    canvas = Image.new("RGB", (size, size))
    canvas.paste(im.resize((rw, rh), Image.BILINEAR), (x, y))
    return canvas


def augment_view(crop: Image.Image, size: int, rng: np.random.Generator, cfg: TrainConfig) -> tuple[Image.Image, ViewJitter]:
    """One training view of ``crop`` and the flip and jitter it got (for the face network's input)."""
    im = crop.resize((size, size), Image.BICUBIC) if crop.size != (size, size) else crop
    jitter = ViewJitter.draw(rng, cfg)
    return paste_on_canvas(jitter(im), size, rng, cfg), jitter


