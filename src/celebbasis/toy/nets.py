"""The toy world's two small image networks: the face encoder and the independent attribute scorer.

Both read a whole ``RESOLUTION``-pixel image of the world (the whole image is the face). They share
the layer plan but not weights, data or objective: the face encoder is trained with a CosFace loss
on random people to give unit 512-d vectors; the scorer is trained, on other people, to classify
each attribute of ``world.SCORED``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .world import SCORED


def _trunk(width: int) -> nn.Sequential:
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                             nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    w = width
    stem = nn.Sequential(nn.Conv2d(3, w, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
    return nn.Sequential(stem, block(w, 2 * w), nn.MaxPool2d(2), block(2 * w, 4 * w), nn.MaxPool2d(2),
                         block(4 * w, 8 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def to_tensor(images) -> torch.Tensor:
    """(N, H, W, 3) uint8 array(s) or PIL images -> (N, 3, H, W) float in [-1, 1]."""
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


class ToyFaceNet(nn.Module):
    """Whole image -> unit 512-d identity vector."""

    def __init__(self, width: int = 32, dim: int = 512):
        super().__init__()
        self.trunk = _trunk(width)
        self.head = nn.Linear(8 * width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.trunk(x)), dim=-1)


class ToyScorer(nn.Module):
    """Whole image -> logits for every attribute of ``SCORED`` (a dict of (N, classes) tensors)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.trunk = _trunk(width)
        self.heads = nn.ModuleDict({k: nn.Linear(8 * width, len(v)) for k, v in SCORED.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {k: head(h) for k, head in self.heads.items()}
