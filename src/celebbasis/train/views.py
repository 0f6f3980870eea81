"""The views a run trains on: each person's photos -> augmented views, VAE-encoded, each with its face vector."""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from ..config import TrainConfig
from .augment import augment_view

logger = logging.getLogger(__name__)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0



class Views(NamedTuple):
    """A person's pool of views: VAE posterior mean and std (V, 4, h, w), face vectors (V, f), source photo (V,)."""

    mean: torch.Tensor
    std: torch.Tensor
    face: torch.Tensor
    photo: torch.Tensor


class ViewMaker:
    """The training views of a run (``Personalizer``'s views): each person's photos -> augmented views, VAE-encoded,
    each with the face vector of its own flipped, jittered face (or its photo's, without a face network).

    With ``views`` > 0 a pool is made once (``build_pool``) and batches draw from it; else every batch
    gets new views, each person's photos in turn. ``rng`` is the run's NumPy generator, shared with the trainer.
    """

    def __init__(self, vae, config: TrainConfig, people: list[list], crops: list[list], photo_faces: list[torch.Tensor],
                 face_net, rng: np.random.Generator, tokens: list[str]):
        self.vae, self.cfg, self.people, self.crops, self.photo_faces = vae, config, people, crops, photo_faces
        self.face_net, self.rng, self.tokens = face_net, rng, tokens
        self.pool: list[Views] | None = None
        self._drawn = [0] * len(crops)  # fresh views drawn per person (views=0), for even photo use

    def encode(self, views: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior of each view: mean and std, (B, 4, H/8, W/8) each, unscaled."""
        vae = self.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        try:
            if upcast:  # SDXL's VAE overflows in float16
                vae.to(torch.float32)
            with torch.inference_mode():
                dist = vae.encode(to_tensor(views).to(vae.device, vae.dtype)).latent_dist
                mean, std = dist.mean.float().clone(), dist.std.float().clone()
        finally:
            if upcast:
                vae.to(torch.float16)
        return mean, std

    def new_view(self, i: int, p: int) -> tuple[Image.Image, torch.Tensor]:
        """A new view of person ``i``'s photo ``p`` and the face vector of its flipped, jittered face."""
        view, jitter = augment_view(self.crops[i][p], self.cfg.resolution, self.rng, self.cfg)
        if self.face_net is None:
            return view, self.photo_faces[i][p]
        chip = jitter(Image.fromarray(np.asarray(self.people[i][p].aligned)))  # the face network's input, same flip/jitter
        return view, torch.from_numpy(np.asarray(self.face_net.embed(np.asarray(chip)), dtype=np.float32))

    def build_pool(self, total_steps: int, chunk: int = 8) -> list[Views]:
        """Per person: ``config.views`` views spread evenly over their photos (or as many as the run uses),
        each VAE-encoded once and with its own face vector."""
        cfg = self.cfg
        n_id = len(self.crops)
        per_id = min(cfg.views, math.ceil(total_steps * cfg.batch_size / n_id))
        pool = []
        for i, crops in enumerate(self.crops):
            if len(crops) > per_id:
                logger.warning("%s has %d photos but only %d views are made; the last %d photos go unused. "
                               "Raise views to use them all.", self.tokens[i], len(crops), per_id, len(crops) - per_id)
            means, stds, faces = [], [], []
            for start in range(0, per_id, chunk):
                views = [self.new_view(i, j % len(crops)) for j in range(start, min(start + chunk, per_id))]
                m, s = self.encode([v for v, _ in views])
                means.append(m)
                stds.append(s)
                faces += [f for _, f in views]
            photo = torch.arange(per_id) % len(crops)
            pool.append(Views(torch.cat(means), torch.cat(stds), torch.stack(faces), photo))
        return pool

    def latents_and_faces(self, who: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents (B, 4, h, w) and face vectors (B, f) for one batch: from the pool, or new views."""
        if self.pool is not None:
            picks = [(self.pool[i], int(self.rng.integers(len(self.pool[i].face)))) for i in who]
            mean = torch.stack([v.mean[j] for v, j in picks])
            std = torch.stack([v.std[j] for v, j in picks])
            faces = torch.stack([v.face[j] for v, j in picks])
        else:
            views = []
            for i in who:  # each person's photos in turn
                views.append(self.new_view(i, self._drawn[i] % len(self.crops[i])))
                self._drawn[i] += 1
            mean, std = self.encode([v for v, _ in views])
            faces = torch.stack([f for _, f in views])
        eps = torch.randn(mean.shape, generator=gen).to(mean.device)
        return (mean + std * eps) * self.vae.config.scaling_factor, faces

