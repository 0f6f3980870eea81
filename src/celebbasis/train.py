"""Personalization (paper §3.3, METHOD §4): learn the identity network on one photo per person.

Frozen: VAE, UNet, text encoder, face encoder, basis. Trained: the identity MLP only. Each step
shows augmented views (flip, colour jitter, the face shrunk to 10-100 % and pasted at a random
spot on a black canvas) with a caption such as "a photo of a face of <alice> person", and
minimises the usual latent-diffusion loss. What is kept per person is an exponential moving
average of its predicted coefficients.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from tqdm.auto import tqdm

from . import __version__
from .errors import InputError
from .identity import Identity, IdentityEncoder, check_name
from .insert import add_placeholder, expand_prompt, placeholder_tokens, table_fingerprint, token_override

logger = logging.getLogger(__name__)

# The textual-inversion caption templates (diffusers' textual_inversion example / the LDM repo).
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
]


@dataclass
class TrainConfig:
    """Settings of one personalization run. Defaults follow the paper's official code.

    Args:
        steps: optimisation steps; ``None`` means 400 per identity (800 for two, as the paper).
        batch_size: views per step (2 in the paper).
        learning_rate: AdamW learning rate (official: base 5e-3 x batch 2).
        weight_decay: AdamW weight decay.
        resolution: side of the square training views in pixels; a multiple of 8.
        seed: seeds augmentation, noise, timesteps and the network's initial weights.
        ema_momentum: momentum of the per-identity average of coefficients that is saved.
        min_scale, max_scale: range of the face view's size relative to the canvas.
        flip_p: probability of a horizontal flip.
        jitter: brightness/contrast/saturation factors are drawn from 1 ± jitter.
        hue: hue shift drawn from ± hue (fraction of the colour circle).
        n_components: basis directions per token, n (capped at the text encoder's width).
        n_tokens: token vectors per identity, K.
        dedupe: build the basis from distinct name tokens only.
    """

    steps: int | None = None
    batch_size: int = 2
    learning_rate: float = 1e-2
    weight_decay: float = 0.0
    resolution: int = 512
    seed: int = 0
    ema_momentum: float = 0.99
    min_scale: float = 0.1
    max_scale: float = 1.0
    flip_p: float = 0.5
    jitter: float = 0.2
    hue: float = 0.01
    n_components: int = 512
    n_tokens: int = 2
    dedupe: bool = False

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps must be >= 1, got {self.steps}.")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.resolution < 8 or self.resolution % 8:
            raise InputError(f"--resolution must be a positive multiple of 8, got {self.resolution}.")
        if not self.learning_rate > 0:
            raise InputError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if not 0 <= self.ema_momentum < 1:
            raise InputError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}.")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise InputError(f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}.")
        if self.n_tokens < 1 or self.n_components < 1:
            raise InputError("n_tokens and n_components must be >= 1.")

    def total_steps(self, n_identities: int) -> int:
        return self.steps if self.steps is not None else 400 * n_identities


@dataclass
class PersonalizeResult:
    """What ``personalize`` returns: the identities and a record of the run."""

    identities: list[Identity]
    losses: list[float]
    run: dict = field(default_factory=dict)

    def save(self, out_dir, overwrite: bool = False) -> list[Path]:
        """Write ``NAME.safetensors`` and ``NAME.run.json`` for each identity into ``out_dir``."""
        from .files import atomic_write

        out_dir = Path(out_dir)
        paths = []
        for ident in self.identities:
            path = out_dir / f"{ident.name}.safetensors"
            if path.exists() and not overwrite:
                raise InputError(f"{path} already exists. Pass --overwrite to replace it, or choose another --name.")
            paths.append(ident.save(path))
            text = json.dumps(self.run, indent=2, sort_keys=True)
            atomic_write(out_dir / f"{ident.name}.run.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return paths


def augment(crop: Image.Image, size: int, rng: np.random.Generator, cfg: TrainConfig) -> Image.Image:
    """One training view: flip, colour jitter, then the face at a random 10-100 % size and place."""
    im = crop.resize((size, size), Image.BICUBIC) if crop.size != (size, size) else crop
    if rng.random() < cfg.flip_p:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhance(im).enhance(float(rng.uniform(1 - cfg.jitter, 1 + cfg.jitter)))
    if cfg.hue > 0:
        hsv = np.asarray(im.convert("HSV")).copy()
        shift = int(round(rng.uniform(-cfg.hue, cfg.hue) * 255))
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
        im = Image.fromarray(hsv, "HSV").convert("RGB")
    side = max(8, int(round(size * rng.uniform(cfg.min_scale, cfg.max_scale))))
    canvas = Image.new("RGB", (size, size))
    x, y = (int(rng.integers(0, size - side + 1)) for _ in range(2))
    canvas.paste(im.resize((side, side), Image.BICUBIC), (x, y))
    return canvas


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def caption(name_token: str, rng: np.random.Generator) -> str:
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(f"face of {name_token} person")


def check_inputs(pipe, names: list[str], n_photos: int) -> list[str]:
    """Names valid, distinct, as many as photos, and not words of the model; before any work."""
    if n_photos == 0:
        raise InputError("No photo given. Pass one face photo per person.")
    if len(names) != n_photos:
        raise InputError(f"{n_photos} photo(s) but {len(names)} name(s). Pass one --name per photo, in the same order.")
    names = [check_name(n) for n in names]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"The name(s) {', '.join(dup)} appear more than once. Give each person their own --name.")
    vocab, added = pipe.tokenizer.get_vocab(), pipe.tokenizer.get_added_vocab()
    for n in names:
        if f"<{n}>" in vocab and f"<{n}>" not in added:
            raise InputError(f"'<{n}>' is already a word in the model's vocabulary. Choose another --name.")
    return names


def personalize(
    pipe,
    photos: list,
    names: list[str],
    *,
    config: TrainConfig | None = None,
    basis=None,
    face_analyzer=None,
    face_index: int | None = None,
    base_model: str | None = None,
    show_progress: bool = True,
    callback: Callable[[int, int, float], None] | None = None,
) -> PersonalizeResult:
    """Learn one identity per photo, jointly, with one shared identity network.

    Args:
        pipe: a diffusers SD pipeline; its VAE, UNet and text encoder stay frozen and unchanged
            (the tokenizer gains the placeholder words, whose rows are never used in training).
        photos: image paths or ``FaceAnalysis`` results, one per person.
        names: one name per photo; the prompt token is ``<name>``.
        config: ``TrainConfig``; defaults follow the paper.
        basis: a ``CelebBasis`` for this text encoder; built (and cached) when ``None``.
        face_analyzer: detector + identity network; dlib's when ``None``.
        face_index: which face to use in photos with several (0 = largest).
        base_model: id or path of the model, recorded in the identity files.
        show_progress: tqdm bar with the loss.
        callback: called as ``callback(step, total_steps, loss)`` after every step; raise in it to stop.

    Returns:
        ``PersonalizeResult`` with one ``Identity`` per photo, the loss curve and the run record.

    Example:
        >>> pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
        >>> result = personalize(pipe, ["alice.jpg"], ["alice"])
        >>> result.save("identities/")
    """
    from diffusers import DDPMScheduler

    from .basis import cached_basis
    from .face import FaceAnalysis, FaceAnalyzer
    from .models import model_name

    cfg = config or TrainConfig()
    names = check_inputs(pipe, list(names), len(photos))
    base_model = base_model or model_name(pipe)
    tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    device = unet.device

    if basis is None:
        basis = cached_basis(tokenizer, text_encoder, n_components=cfg.n_components, n_tokens=cfg.n_tokens,
                             dedupe=cfg.dedupe, source=base_model)
    if basis.embedding_dim != text_encoder.get_input_embeddings().embedding_dim:
        raise InputError(
            f"The basis is {basis.embedding_dim} wide but the text encoder is "
            f"{text_encoder.get_input_embeddings().embedding_dim}. Build the basis from this model."
        )
    analyses = []
    for p in photos:
        if isinstance(p, FaceAnalysis):
            analyses.append(p)
        else:
            face_analyzer = face_analyzer or FaceAnalyzer()
            analyses.append(face_analyzer(p, face_index=face_index))
    encoders = {a.encoder for a in analyses}
    if len(encoders) > 1:
        raise InputError(f"Photos were analysed with different face encoders ({sorted(encoders)}); use one for a joint run.")
    face_encoder = encoders.pop()

    n_id, k = len(names), basis.n_tokens
    total = cfg.total_steps(n_id)
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)

    for module in (vae, unet, text_encoder):
        module.requires_grad_(False)
        module.eval()
    tokens = [f"<{n}>" for n in names]
    ids = [i for t in tokens for i in add_placeholder(tokenizer, text_encoder, t, k)]  # (n_id*K,)
    crops = [a.crop(cfg.resolution) for a in analyses]
    faces = torch.from_numpy(np.stack([a.embedding for a in analyses])).float().to(device)  # (n_id, f)
    mlp = IdentityEncoder(faces.shape[1], k, basis.n_components).to(device)
    mean = basis.mean.to(device)
    comps = basis.components.to(device)
    opt = torch.optim.AdamW(mlp.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_sched.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise InputError(f"Unsupported prediction type {prediction!r}; only epsilon and v_prediction models are supported.")
    scaling = vae.config.scaling_factor
    n_train_t = noise_sched.config.num_train_timesteps
    dtype = unet.dtype

    ema: list[torch.Tensor | None] = [None] * n_id
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(total), desc="personalize", disable=not show_progress, unit="step")
    with token_override(text_encoder.get_input_embeddings(), ids) as override:
        for step in bar:
            who = [(step * cfg.batch_size + b) % n_id for b in range(cfg.batch_size)]
            views = [augment(crops[i], cfg.resolution, rng, cfg) for i in who]
            caps = [expand_prompt(tokenizer, caption(tokens[i], rng)) for i in who]
            with torch.no_grad():
                pixels = to_tensor(views).to(device, vae.dtype)
                latents = vae.encode(pixels).latent_dist.sample(gen) * scaling
                latents = latents.to(dtype)
                noise = torch.randn(latents.shape, generator=gen).to(device, dtype)
                t = torch.randint(0, n_train_t, (len(who),), generator=gen).to(device)
                noisy = noise_sched.add_noise(latents, noise, t)
                target = noise if prediction == "epsilon" else noise_sched.get_velocity(latents, noise, t)
                input_ids = tokenizer(caps, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                                      return_tensors="pt").input_ids.to(device)
            coeffs = mlp(faces)  # (n_id, K, n)
            rows = torch.einsum("ikn,knd->ikd", coeffs, comps) + mean  # (n_id, K, d)
            override["rows"] = rows.reshape(n_id * k, -1)
            cond = text_encoder(input_ids)[0]
            pred = unet(noisy, t, encoder_hidden_states=cond.to(dtype)).sample
            loss = F.mse_loss(pred.float(), target.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            with torch.no_grad():
                for i in who:  # one EMA update per batch element showing that identity
                    c = coeffs[i].detach().float().cpu()
                    ema[i] = c.clone() if ema[i] is None else cfg.ema_momentum * ema[i] + (1 - cfg.ema_momentum) * c
            if show_progress:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if callback is not None:
                callback(step + 1, total, losses[-1])
    elapsed = time.perf_counter() - t0

    final = [F.normalize(e if e is not None else mlp(faces)[i].detach().float().cpu(), dim=-1) for i, e in enumerate(ema)]
    run = {
        "celebbasis_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "base_model": base_model,
        "names": names,
        "photos": [a.path for a in analyses],
        "face_encoder": face_encoder,
        "config": {**asdict(cfg), "steps": total},
        "seed": cfg.seed,
        "device": str(device),
        "seconds": round(elapsed, 3),
        "losses": [round(x, 6) for x in losses],
    }
    te_hash = table_fingerprint(tokenizer, text_encoder)
    identities = [
        Identity.from_coefficients(
            tokens[i], final[i], basis,
            base_model=base_model, face_encoder=face_encoder, steps=total, seed=cfg.seed,
            text_encoder_sha256=te_hash, source_photo=Path(analyses[i].path).name,
        )
        for i in range(n_id)
    ]
    # The placeholder rows were never written during training; fill them so the pipeline can draw now.
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for ident in identities:
            weight[tokenizer.convert_tokens_to_ids(placeholder_tokens(ident.token, k))] = ident.embeddings.to(weight)
    logger.info("Learned %s in %d steps (%.1f s).", ", ".join(tokens), total, elapsed)
    return PersonalizeResult(identities, losses, run)
