"""Personalization (paper §3.3, METHOD §4): learn the identity network on photos of each person.

Frozen: VAE, UNet, text encoder(s), face encoder, basis. Trained: the identity MLP only. Each
sample is a view of one of the person's photos: horizontal flip, colour jitter (brightness,
contrast, saturation, hue, in random order), then the face shrunk to 10-100 % of the canvas height
(width/height 0.9-1.1) and pasted at a random spot on a black canvas, as the official
``ldm/data/face_id.py`` does. The face network sees the same flip and jitter, so every sample feeds
its own face vector to the MLP. The caption is one of the official 81 templates filled with
"face of <alice> person", encoded by the pipeline's own ``encode_prompt`` (the code path generation
uses), and the loss is the usual latent-diffusion loss. What is kept per person is an exponential
moving average of the coefficients predicted over all of that person's views.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from torch import nn
from tqdm.auto import tqdm

from ._version import __version__
from .config import BasisConfig, TrainConfig
from .errors import InputError
from .face import DlibFaceEncoder, FaceAnalysis, FaceAnalyzer, same_person_threshold, unlike_photos
from .identity import Identity, IdentityEncoder, check_name
from .insert import add_placeholder, borrowed_tokenizers, check_token_free, load_identity, token_override
from .families import family_of
from .models import model_name, pipeline_bases, text_encoders
from .signatures import built_from_other_table, encoders_signature

logger = logging.getLogger(__name__)

# The official caption templates (ldm/data/face_id.py, ``imagenet_templates_small``), repeats and order kept.
TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
    "an illustration of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "an illustration of a clean {}",
    "an illustration of a dirty {}",
    "a dark photo of the {}",
    "an illustration of my {}",
    "an illustration of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "an illustration of the {}",
    "a good photo of the {}",
    "an illustration of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "an illustration of the clean {}",
    "a rendition of a {}",
    "an illustration of a nice {}",
    "a good photo of a {}",
    "an illustration of the nice {}",
    "an illustration of the small {}",
    "an illustration of the weird {}",
    "an illustration of the large {}",
    "an illustration of a cool {}",
    "an illustration of a small {}",
    "a depiction of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a depiction of a clean {}",
    "a depiction of a dirty {}",
    "a dark photo of the {}",
    "a depiction of my {}",
    "a depiction of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a depiction of the {}",
    "a good photo of the {}",
    "a depiction of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a depiction of the clean {}",
    "a rendition of a {}",
    "a depiction of a nice {}",
    "a good photo of a {}",
    "a depiction of the nice {}",
    "a depiction of the small {}",
    "a depiction of the weird {}",
    "a depiction of the large {}",
    "a depiction of a cool {}",
    "a depiction of a small {}",
]

@dataclass
class PersonalizeResult:
    """What ``personalize`` returns: the identities and a record of the run."""

    identities: list[Identity]
    losses: list[float]
    run: dict = field(default_factory=dict)

    def save(self, out_dir, overwrite: bool = False) -> list[Path]:
        """Write ``NAME.safetensors`` and ``NAME.run.json`` for each identity into ``out_dir``: all or none.

        Every target is checked first; the files are written beside their targets under temporary
        names and renamed into place only when all of them were written. Files being overwritten are
        set aside first and put back if any rename fails, so the folder ends either all old or all new.
        """
        out_dir = Path(out_dir)
        targets = [(ident, out_dir / f"{ident.name}.safetensors", out_dir / f"{ident.name}.run.json")
                   for ident in self.identities]
        _check_targets([p for _, *paths in targets for p in paths], overwrite)
        text = json.dumps(self.run, indent=2, sort_keys=True)
        staged: list[tuple[Path, Path]] = []  # (temporary, final)
        placed: list[Path] = []  # finals written by this call
        set_aside: list[tuple[Path, Path]] = []  # (old file's temporary name, final)
        try:
            for ident, path, run_path in targets:
                tmp, tmp_run = (p.with_name(f".{p.name}.staged") for p in (path, run_path))
                staged += [(tmp, path), (tmp_run, run_path)]
                ident.save(tmp)
                tmp_run.write_text(text, encoding="utf-8")
            for tmp, final in staged:
                if final.exists():
                    old = final.with_name(f".{final.name}.replaced")
                    os.replace(final, old)
                    set_aside.append((old, final))
                os.replace(tmp, final)
                placed.append(final)
        except BaseException:
            for p in [t for t, _ in staged] + placed:
                p.unlink(missing_ok=True)
            for old, final in set_aside:
                os.replace(old, final)
            raise
        for old, _ in set_aside:
            old.unlink(missing_ok=True)
        return [path for _, path, _ in targets]


def _check_targets(paths: list[Path], overwrite: bool) -> None:
    if not paths:
        return
    for p in paths:
        if p.is_dir():
            raise InputError(f"{p} is a folder. Remove it or choose another name.")
        if p.exists() and not overwrite and p.suffix == ".safetensors":
            raise InputError(f"{p} already exists. Choose to overwrite it, or another name.")
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"Cannot create {paths[0].parent} ({e.strerror or e}). Choose another folder.") from None


# -- augmentation (official ldm/data/face_id.py: RandomHorizontalFlip, ColorJitter, _add_bg) -----------------

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


def augment(crop: Image.Image, size: int, rng: np.random.Generator, cfg: TrainConfig) -> Image.Image:
    """One training view: flip, colour jitter in random order, then the face shrunk and pasted on black."""
    return augment_view(crop, size, rng, cfg)[0]


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


# -- checks before any work ----------------------------------------------------------------------------------

def photo_groups(photos) -> list[list]:
    """Per person, a list of photos: each item of ``photos`` is one photo or a list/tuple of photos."""
    groups = [list(p) if isinstance(p, (list, tuple)) else [p] for p in photos]
    for i, g in enumerate(groups):
        if not g:
            raise InputError(f"Person {i + 1} has an empty list of photos. Give at least one photo per person.")
    return groups


def check_people(names: list[str], n_people: int) -> list[str]:
    """Names valid, distinct and one per person; needs no model, so front ends call it before reading photos."""
    if n_people == 0:
        raise InputError("No photo given. Pass one face photo (or a list of photos) per person.", field="photos")
    if len(names) != n_people:
        raise InputError(f"{n_people} photo(s) but {len(names)} name(s). Give one name per person "
                         "(or per list of photos of one person), in the same order.", field="names")
    names = [check_name(n) for n in names]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"The name(s) {', '.join(dup)} appear more than once. Give each person their own name.",
                         field="names")
    return names


def check_inputs(pipe, names: list[str], n_people: int) -> list[str]:
    """Everything about the call that training checks, before any work: the people (``check_people``),
    names that are not words of the model (``check_token_free``), a pipeline without offload hooks."""
    names = check_people(names, n_people)
    for n in names:
        check_token_free(pipe.tokenizer, f"<{n}>")
    check_not_offloaded(pipe)
    return names


def check_not_offloaded(pipe) -> None:
    """Refuse pipelines with accelerate offload hooks: training needs every module to stay on its device."""
    modules = [getattr(pipe, "unet", None), getattr(pipe, "vae", None)] + [te for _, te in text_encoders(pipe)]
    hooked = bool(getattr(pipe, "_all_hooks", None)) or any(
        hasattr(sub, "_hf_hook") for m in modules if isinstance(m, nn.Module) for sub in m.modules())
    if hooked:
        raise InputError("This pipeline uses CPU offload (enable_model_cpu_offload/enable_sequential_cpu_offload); "
                         "personalize on a pipeline moved to one device with pipe.to(device), then enable offload.")


def needs_loss_scaling(device, dtypes) -> bool:
    """Loss scaling only where float16 gradients can underflow and a scaler exists: CUDA with float16 weights.

    bfloat16 has float32's range and needs none; MPS has no gradient scaler (its float16 runs unscaled).
    """
    return torch.device(device).type == "cuda" and torch.float16 in set(dtypes)


def _is_channels_last(module: nn.Module) -> bool:
    for p in module.parameters():
        if p.ndim == 4 and p.shape[-1] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


@contextmanager
def frozen_for_training(modules: list[nn.Module], unet: nn.Module, *, low_memory: bool = False,
                        channels_last: bool = False):
    """Freeze ``modules`` (eval mode, no gradients) and set up ``unet``; on exit, even by an error,
    restore every parameter's ``requires_grad``, every submodule's mode, the UNet's gradient
    checkpointing and its memory format."""
    grads = {p: p.requires_grad for m in modules for p in m.parameters()}
    modes = {sub: sub.training for m in modules for sub in m.modules()}
    checkpointing, was_channels_last = unet.is_gradient_checkpointing, _is_channels_last(unet)
    try:
        for m in modules:
            m.requires_grad_(False)
            m.eval()
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        if low_memory and not checkpointing:
            unet.enable_gradient_checkpointing()
        yield
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for sub, flag in modes.items():
            sub.training = flag
        if unet.is_gradient_checkpointing and not checkpointing:
            unet.disable_gradient_checkpointing()
        if channels_last and not was_channels_last:
            unet.to(memory_format=torch.contiguous_format)


def pipeline_conditioning(pipe, captions: list[str], size: int) -> tuple[torch.Tensor, dict]:
    """The UNet conditioning the pipeline's own code computes for ``captions`` at ``size``² pixels.

    The pipeline's family computes it (``ModelFamily.conditioning``): ``pipe.encode_prompt`` without
    classifier-free guidance (it has no ``no_grad``, so gradients reach the word embeddings) and, for
    SDXL, the pooled vector read at the end-of-text token (``insert.eos_pooling``), as generation after
    ``load_identity``, ComfyUI and A1111/Forge read it, and the time ids ``pipe.__call__`` adds.

    Returns:
        (B, T, D) hidden states (SDXL: both encoders' penultimate layers concatenated) and the
        UNet's added conditions: ``{}``, or SDXL's ``text_embeds`` (B, P) and ``time_ids`` (B, 6).
    """
    return family_of(pipe).conditioning(pipe, captions, size)


def photo_agreement(vectors: np.ndarray) -> list[float]:
    """(n, f) unit face vectors of one person -> each one's cosine to their normalised mean."""
    mean = vectors.mean(0)
    mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return [float(v @ mean) for v in vectors]


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


class Personalizer:
    """One personalization run, step by step: ``personalize`` drives it; tests and UIs can too.

    Builds everything once (placeholder words, training crops, the pool of views with their face
    vectors (``ViewMaker``), the identity network, optimiser, noise scheduler); then each ``step`` draws a batch and
    takes one AdamW step. Each text encoder of the model's family (two for SDXL) gets its own basis and network head.
    The pipeline's modules are frozen while it lives; ``close()`` (or leaving a ``with`` block)
    gives them back as they were found.

    Args:
        pipe: a diffusers SD 1.x/2.x or SDXL pipeline, on one device, without offload hooks.
        analyses: ``FaceAnalysis`` per person, or a list of them per person (several photos of one person).
        names: one name per person.
        config: ``TrainConfig``.
        bases: the ``CelebBasis`` of each text encoder.
        base_model: recorded in the identities.
        face_encoder: the face network the photos were analysed with (or its ``FaceAnalyzer``), run
            on every view; dlib's is loaded when ``None`` and the photos were analysed with it.
    """

    def __init__(self, pipe, analyses: list, names: list[str], config: TrainConfig, bases, base_model: str, *,
                 face_encoder=None):
        self._stack = ExitStack()
        try:
            self._setup(pipe, analyses, names, config, bases, base_model, face_encoder)
        except BaseException:
            self._stack.close()  # a set-up that fails gives everything back, as ``close`` does
            raise

    def _setup(self, pipe, analyses, names, config, bases, base_model, face_encoder) -> None:
        names = check_inputs(pipe, names, len(analyses))
        self.family = family_of(pipe)
        if config.resolution is None:  # the model's native size
            config = dataclasses.replace(config, resolution=self.family.default_resolution(pipe))
        self.pipe, self.cfg, self.base_model = pipe, config, base_model
        self._stack.enter_context(borrowed_tokenizers(pipe))  # the new words go into copies until training succeeds
        self.encoders = self.family.encoders(pipe)  # [(tokenizer, text_encoder)], one per text encoder of the family
        self.bases = self._check_bases(bases)
        self.people = photo_groups(analyses)  # per person: [FaceAnalysis, ...]
        names = check_inputs(pipe, names, len(analyses))
        self.family = family_of(pipe)
        self.n_id, self.k = len(names), self.bases[0].n_tokens
        self.face_encoder = self._face_encoder_name()
        self.face_net = self._face_network(face_encoder)
        self.device, self.dtype = pipe.unet.device, pipe.unet.dtype
        self.tokens = [f"<{n}>" for n in names]
        self.token_ids = self._placeholders()  # per encoder: (n_id*K,) ids of the placeholder words
        self.crops = [[a.crop(config.resolution) for a in photos] for photos in self.people]
        self.photo_faces = [torch.from_numpy(np.stack([a.embedding for a in photos])).float()
                            for photos in self.people]  # per person: (n_photos, f)
        self.gen = torch.Generator("cpu").manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.heads = self._heads()
        self.means = [b.mean.to(te.device) for b, (_, te) in zip(self.bases, self.encoders)]  # (K, d) each
        self.components = [b.components.to(te.device) for b, (_, te) in zip(self.bases, self.encoders)]  # (K, n, d)
        self.opt = torch.optim.AdamW(self.heads.parameters(), lr=config.optimizer_lr, weight_decay=config.weight_decay)
        self.noise_scheduler, self.prediction = self._scheduler()
        self.ema: list[list[torch.Tensor] | None] = [None] * self.n_id  # per identity: one (K, n) per encoder
        self.losses: list[float] = []
        self.steps_done = 0
        self.views = ViewMaker(pipe.vae, config, self.people, self.crops, self.photo_faces, self.face_net, self.rng,
                               self.tokens)
        if config.views > 0:
            self.views.pool = self.views.build_pool(config.total_steps(self.n_id))
        self.unet, self.scaler = self._prepare_unet()

    # -- set-up -------------------------------------------------------------------------------------
    def _check_bases(self, bases) -> list:
        bases = list(bases) if isinstance(bases, (list, tuple)) else [bases]
        if len(bases) != len(self.encoders):
            raise InputError(f"{len(self.encoders)} text encoder(s) but {len(bases)} basis/bases given.")
        return bases

    def _face_encoder_name(self) -> str:
        names = {a.encoder for photos in self.people for a in photos}
        if len(names) > 1:
            raise InputError(f"Photos were analysed with different face encoders ({sorted(names)}); use one for a joint run.")
        return names.pop()

    def _face_network(self, given):
        """The face network to run on every view, or ``None`` (each photo's own vector for all its views)."""
        if self.cfg.face_per_photo:
            return None
        net = getattr(given, "encoder", given)  # a FaceAnalyzer or an encoder
        if net is None:
            net = DlibFaceEncoder() if self.face_encoder == DlibFaceEncoder.name else None
        if net is None or any(getattr(a, "aligned", None) is None for photos in self.people for a in photos):
            logger.warning("The face network (%s) is not at hand, so each photo's one face vector serves all its views. "
                           "Pass face_analyzer= to personalize to let it see every view, as the paper's code does.",
                           self.face_encoder)
            return None
        if net.name != self.face_encoder:
            raise InputError(f"The photos were analysed with {self.face_encoder} but the face network given is {net.name}. "
                             "Use the same face encoder for both.")
        return net

    def _placeholders(self) -> list[list[int]]:
        return [[i for t in self.tokens for i in add_placeholder(tok, te, t, self.k, resize=False)]
                for tok, te in self.encoders]

    def _heads(self) -> nn.ModuleList:
        """One identity network per text encoder, started from the seed without touching the global RNG."""
        init = torch.Generator("cpu").manual_seed(self.cfg.seed)
        face_dim = self.photo_faces[0].shape[1]
        return nn.ModuleList(
            IdentityEncoder(face_dim, self.k, b.n_components, generator=init, lift_to=self.cfg.face_dim or None).to(te.device)
            for b, (_, te) in zip(self.bases, self.encoders)
        )

    def _scheduler(self):
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        prediction = scheduler.config.prediction_type
        if prediction not in ("epsilon", "v_prediction"):
            raise InputError(f"Unsupported prediction type {prediction!r}; only epsilon and v_prediction models are supported.")
        return scheduler, prediction

    def _prepare_unet(self):
        """Freeze the pipeline (undone by ``close``), set up the UNet; the compiled wrapper stays ours."""
        cfg, pipe = self.cfg, self.pipe
        modules = [pipe.vae, pipe.unet] + [te for _, te in self.encoders]
        self._stack.enter_context(frozen_for_training(modules, pipe.unet, low_memory=cfg.low_memory,
                                                      channels_last=self.device.type == "cuda"))
        try:
            unet = torch.compile(pipe.unet) if cfg.compile else pipe.unet
        except BaseException:
            self.close()
            raise
        # Frozen weights may be half precision; the identity network stays float32.
        dtypes = [pipe.unet.dtype] + [te.dtype for _, te in self.encoders]
        return unet, torch.amp.GradScaler("cuda") if needs_loss_scaling(self.device, dtypes) else None

    def close(self) -> None:
        """Give the pipeline's modules back as they were found (modes, gradients, checkpointing, memory format)."""
        self._stack.close()

    def __enter__(self) -> "Personalizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def mlp(self) -> IdentityEncoder:
        """The identity network of the (first) text encoder."""
        return self.heads[0]

    # -- batches ----------------------------------------------------------------------------------
    @property
    def pool(self) -> list[Views] | None:
        """Per person: the pool of views made at set-up (``views`` > 0), else ``None``."""
        return self.views.pool

    def sample_batch(self) -> dict:
        """Draw one batch: views -> noisy latents, timesteps, targets, captions, and each view's face vector."""
        cfg = self.cfg
        who = [(self.steps_done * cfg.batch_size + b) % self.n_id for b in range(cfg.batch_size)]
        templates = [int(self.rng.integers(len(TEMPLATES))) for _ in who]
        with torch.no_grad():
            latents, faces = self.views.latents_and_faces(who, self.gen)
            latents = latents.to(self.device, self.dtype)  # (B, 4, H/8, W/8)
            noise = torch.randn(latents.shape, generator=self.gen).to(self.device, self.dtype)
            t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(who),), generator=self.gen).to(self.device)
            noisy = self.noise_scheduler.add_noise(latents, noise, t)
            target = noise if self.prediction == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)
        caps = [TEMPLATES[t].format(f"face of {self.tokens[i]} person") for i, t in zip(who, templates)]
        return {"who": who, "captions": caps, "faces": faces, "latents": latents, "noise": noise, "timesteps": t,
                "noisy": noisy, "target": target}

    # -- the model ----------------------------------------------------------------------------------
    def person_faces(self) -> torch.Tensor:
        """(n_id, f): each person's photos' face vectors averaged and normalised."""
        return F.normalize(torch.stack([f.mean(0) for f in self.photo_faces]), dim=-1)

    def coefficients(self, batch: dict | None = None) -> list[torch.Tensor]:
        """Predictions of the identity network, one tensor per text encoder: (B, K, n) for the face
        vectors of ``batch``, or (n_id, K, n) for each person's mean face vector when ``batch`` is None."""
        faces = self.person_faces() if batch is None else batch["faces"]
        return [head(faces.to(head.linear.weight.device)) for head in self.heads]

    def conditioning(self, captions: list[str], who: list[int], coeffs: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The UNet conditioning of ``captions`` (caption b shows person ``who[b]``) with that person's words
        set from ``coeffs[e][b]`` (K, n), through the pipeline's own ``encode_prompt``: see ``pipeline_conditioning``."""
        person = F.one_hot(torch.tensor(who), self.n_id).float()  # (B, n_id)
        with ExitStack() as stack:
            for (_, te), ids, c, comps, mean in zip(self.encoders, self.token_ids, coeffs, self.components, self.means):
                emb = torch.einsum("bkn,knd->bkd", c, comps) + mean  # (B, K, d): e_j = c_j . B_j + mean_j
                rows = person.to(emb)[:, :, None, None] * emb[:, None]  # (B, n_id, K, d): only the caption's person
                stack.enter_context(token_override(te.get_input_embeddings(), ids))["rows"] = rows.flatten(1, 2)
            return self.family.conditioning(self.pipe, captions, self.cfg.resolution)

    def loss(self, batch: dict, coeffs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Diffusion loss of ``batch`` with the identity words set from ``coeffs`` (default: predicted from its faces)."""
        coeffs = self.coefficients(batch) if coeffs is None else coeffs
        cond, added = self.conditioning(batch["captions"], batch["who"], coeffs)
        kwargs = {"added_cond_kwargs": {k: v.to(self.device, self.dtype) for k, v in added.items()}} if added else {}
        noisy = batch["noisy"].contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else batch["noisy"]
        pred = self.unet(noisy, batch["timesteps"], encoder_hidden_states=cond.to(self.device, self.dtype), **kwargs).sample
        return F.mse_loss(pred.float(), batch["target"].float())

    def step(self, batch: dict | None = None) -> float:
        """One optimisation step (on a fresh batch unless one is given); updates the averages."""
        batch = self.sample_batch() if batch is None else batch
        coeffs = self.coefficients(batch)
        loss = self.loss(batch, coeffs)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        m = self.cfg.ema_momentum
        with torch.no_grad():
            for b, i in enumerate(batch["who"]):  # one average update per batch element, with that view's prediction
                now = [c[b].detach().float().cpu() for c in coeffs]
                prev = self.ema[i]
                self.ema[i] = now if prev is None else [m * p + (1 - m) * c for p, c in zip(prev, now)]
        self.steps_done += 1
        self.losses.append(loss.item())
        return self.losses[-1]

    def identities(self) -> list[Identity]:
        """The moving averages of the coefficients, as they are (the official code samples with them), as ``Identity`` objects.

        The network's rows are unit length; their average is a little shorter where the predictions varied.
        """
        with torch.no_grad():
            current = [c.float().cpu() for c in self.coefficients()]
        te_signature = encoders_signature(self.pipe)
        out = []
        for i, token in enumerate(self.tokens):
            avg = self.ema[i] if self.ema[i] is not None else [c[i] for c in current]
            sources = [Path(a.path).name for a in self.people[i]]
            out.append(Identity.from_coefficients(
                token, avg, self.bases, base_model=self.base_model,
                face_encoder=self.face_encoder, steps=self.steps_done, seed=self.cfg.seed,
                text_encoder_signature=te_signature, source_photo=sources[0], source_photos=sources,
                train_config=self.cfg.to_dict(), **self.family.identity_metadata(),
            ))
        return out


def personalize(
    pipe,
    photos: list,
    names: list[str],
    *,
    config: TrainConfig | None = None,
    basis=None,
    basis_config: BasisConfig | None = None,
    face_analyzer=None,
    face_index: int | None = None,
    base_model: str | None = None,
    show_progress: bool = True,
    callback: Callable[[int, int, float], None] | None = None,
) -> PersonalizeResult:
    """Learn one identity per person, jointly, with one shared identity network.

    Args:
        pipe: a diffusers SD pipeline; its VAE, UNet and text encoder stay frozen and are given back as
            they were found. Afterwards the pipeline also understands the new words.
        photos: per person, one photo or a list of photos of that person: image paths or ``FaceAnalysis``.
            A person's views come from all of their photos evenly; identical photos count once, and a
            photo that does not look like the others is named in a warning.
        names: one name per person; the prompt token is ``<name>``.
        config: ``TrainConfig``; defaults follow the paper.
        basis: a ``CelebBasis`` for this text encoder (a list of two for SDXL); built and cached when ``None``.
        basis_config: how to build the basis when ``basis`` is ``None`` (default ``BasisConfig()``).
        face_analyzer: detector + identity network; dlib's when ``None``. Its network also sees every view.
        face_index: which face to use in photos with several (0 = largest).
        base_model: id or path of the model, recorded in the identity files.
        show_progress: tqdm bar with the loss.
        callback: called as ``callback(step, total_steps, loss)`` after every step; raise in it to stop.

    Returns:
        ``PersonalizeResult`` with one ``Identity`` per person, the loss curve and the run record.

    Example:
        >>> pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
        >>> result = personalize(pipe, [["alice1.jpg", "alice2.jpg"], "bob.jpg"], ["alice", "bob"])
        >>> result.save("identities/")
    """
    cfg = config or TrainConfig()
    groups = photo_groups(photos)
    names = check_inputs(pipe, list(names), len(groups))
    base_model = base_model or model_name(pipe)
    bases = _resolve_bases(pipe, basis, basis_config, base_model)
    people, face_analyzer = _analyse_photos(groups, names, face_analyzer, face_index)
    total = cfg.total_steps(len(names))
    with Personalizer(pipe, people, names, cfg, bases, base_model, face_encoder=face_analyzer) as trainer:
        logger.info("Training %s: %d steps at %d px on %s.", ", ".join(trainer.tokens), total, trainer.cfg.resolution,
                    trainer.device)
        elapsed = _train(trainer, total, show_progress, callback)
        identities = trainer.identities()
    for ident in identities:  # the placeholder rows were never used in training; fill them for drawing now
        load_identity(pipe, ident)
    _log_summary(trainer, total, elapsed)
    return PersonalizeResult(identities, trainer.losses, _run_record(trainer, names, total, elapsed))


def _is_analysis(photo) -> bool:
    return isinstance(photo, FaceAnalysis)


def _resolve_bases(pipe, basis, basis_config, base_model: str) -> list:
    """The given bases, checked against the pipeline's text encoders, or the cached ones built for it."""
    bases = list(basis) if isinstance(basis, (list, tuple)) else [basis] if basis is not None else []
    pairs = text_encoders(pipe)
    if bases and basis_config is not None:
        raise InputError("Pass either a basis or the settings to build one (basis_config), not both.")
    if not bases:
        bases = pipeline_bases(pipe, basis_config, source=base_model)
    if len(bases) != len(pairs):
        raise InputError(f"This model has {len(pairs)} text encoder(s) but {len(bases)} basis file(s) were given; "
                         "pass one per encoder or none.")
    for b, (tok, te) in zip(bases, pairs):
        width = te.get_input_embeddings().embedding_dim
        if b.embedding_dim != width:
            raise InputError(f"The basis is {b.embedding_dim} wide but the text encoder is {width}. "
                             "Build the basis from this model.")
        if built_from_other_table(b.metadata, tok, te):
            logger.warning("The basis was built from another text encoder (%s); identities may look wrong. "
                           "Rebuild it with build-basis for this model.", b.metadata.get("text_encoder") or "unknown")
    return bases


def _analyse_photos(groups: list[list], names: list[str], analyzer, face_index) -> tuple[list[list], object]:
    """Per person: the analysed photos, identical ones once; warn about a photo unlike the person's others.

    Returns the people's photos and the analyzer used (dlib's is made when a photo needs one and none was given).
    """
    if analyzer is None and any(not _is_analysis(p) for g in groups for p in g):
        analyzer = FaceAnalyzer()
    people = []
    for name, group in zip(names, groups):
        kept = []
        for photo in group:
            a = photo if _is_analysis(photo) else analyzer(photo, face_index=face_index)
            same = next((k for k in kept if np.array_equal(k.embedding, a.embedding)), None)
            if same is not None:
                logger.info("%s: the same face as %s; <%s> counts it once.", a.path, same.path, name)
                continue
            kept.append(a)
        _warn_unlike(kept, name, analyzer.encoder if analyzer is not None else kept[0].encoder)
        people.append(kept)
    return people, analyzer


def _warn_unlike(photos: list, name: str, encoder) -> None:
    """Warn, naming the photo, when one photo's face is beyond the encoder's same-person threshold from the others."""
    threshold = same_person_threshold(encoder)
    for i, similarity in unlike_photos([a.embedding for a in photos], encoder):
        logger.warning("%s does not look like the other photos of <%s> (face similarity %.3f; %s counts %.2f or more "
                       "as the same person). If it shows someone else, leave it out of %s's photos.",
                       photos[i].path, name, similarity, getattr(encoder, "name", encoder), threshold, name)


def _train(trainer: Personalizer, total: int, show_progress: bool, callback) -> float:
    """Run ``total`` steps; returns the seconds taken."""
    t0 = time.perf_counter()
    bar = tqdm(range(total), desc="personalize", disable=not show_progress, unit="step")
    for step in bar:
        loss = trainer.step()
        if show_progress:
            bar.set_postfix(loss=f"{loss:.4f}")
        if callback is not None:
            callback(step + 1, total, loss)
    return time.perf_counter() - t0


def _log_summary(trainer: Personalizer, total: int, elapsed: float) -> None:
    # No loss here: the diffusion loss is mostly the noise's and barely moves while a person is learned, so it
    # reads as "nothing learned" when likeness came back. The curve is in the run record.
    logger.info("Learned %s in %d step(s) (%.1f s).", ", ".join(trainer.tokens), total, elapsed)


def _run_record(trainer: Personalizer, names: list[str], total: int, elapsed: float) -> dict:
    """What ``NAME.run.json`` holds: versions, settings, photos and how well each agrees with its person, losses."""
    agreement = {
        name: [{"photo": a.path, "cosine_to_mean": round(c, 4)}
               for a, c in zip(photos, photo_agreement(np.stack([a.embedding for a in photos]).astype(np.float64)))]
        for name, photos in zip(names, trainer.people)
    }
    return {
        "celebbasis_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "base_model": trainer.base_model,
        "names": names,
        "photos": {name: [a.path for a in photos] for name, photos in zip(names, trainer.people)},
        "photo_agreement": agreement,
        "face_encoder": trainer.face_encoder,
        "face_vectors": "per view" if trainer.face_net is not None else "per photo",
        "config": {**asdict(trainer.cfg), "steps": total},
        "seed": trainer.cfg.seed,
        "device": str(trainer.device),
        "seconds": round(elapsed, 3),
        "losses": [round(x, 6) for x in trainer.losses],
    }
