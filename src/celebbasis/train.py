"""Personalization (paper §3.3, METHOD §4): learn the identity network on one photo per person.

Frozen: VAE, UNet, text encoder, face encoder, basis. Trained: the identity MLP only. Each step
shows augmented views (flip, colour jitter, the face shrunk to 10-100 % and pasted at a random
spot on a black canvas) with a caption such as "a photo of a face of <alice> person", and
minimises the usual latent-diffusion loss. What is kept per person is an exponential moving
average of its predicted coefficients.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image, ImageEnhance
from tqdm.auto import tqdm

from ._version import __version__
from .errors import InputError
from .identity import Identity, IdentityEncoder, check_name
from .config import BasisConfig, TrainConfig
from .insert import add_placeholder, expand_prompt, load_identity, token_override
from .models import encoders_signature, model_name, built_from_other_table, pipeline_bases, text_encoders

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


class Personalizer:
    """One personalization run, step by step: ``personalize`` drives it; tests and UIs can too.

    Builds everything once (placeholder words, training crops, face vectors, the identity
    network, optimiser, noise scheduler); then each ``step`` draws a batch and takes one AdamW step.
    SDXL pipelines get one basis and one network head per text encoder, and the UNet's added
    conditions (pooled text embedding of the second encoder, size and crop time ids).
    """

    def __init__(self, pipe, analyses: list, names: list[str], config: TrainConfig, bases, base_model: str):
        from diffusers import DDPMScheduler

        if config.resolution is None:  # the model's native size
            config = dataclasses.replace(config, resolution=pipe.unet.config.sample_size * pipe.vae_scale_factor)
        self.pipe, self.cfg, self.base_model = pipe, config, base_model
        self.bases = list(bases) if isinstance(bases, (list, tuple)) else [bases]
        self.encoders = text_encoders(pipe)  # [(tokenizer, text_encoder)], two for SDXL
        if len(self.bases) != len(self.encoders):
            raise InputError(f"{len(self.encoders)} text encoder(s) but {len(self.bases)} basis/bases given.")
        self.is_sdxl = len(self.encoders) == 2
        self.analyses = analyses
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        for module in [pipe.vae, pipe.unet] + [te for _, te in self.encoders]:
            module.requires_grad_(False)
            module.eval()
        encoders = {a.encoder for a in analyses}
        if len(encoders) > 1:
            raise InputError(f"Photos were analysed with different face encoders ({sorted(encoders)}); use one for a joint run.")
        self.face_encoder = encoders.pop()
        self.n_id, self.k = len(names), self.bases[0].n_tokens
        self.tokens = [f"<{n}>" for n in names]
        self.token_ids = [  # per encoder: (n_id*K,) ids of the placeholder words
            [i for t in self.tokens for i in add_placeholder(tok, te, t, self.k)] for tok, te in self.encoders
        ]
        self.crops = [a.crop(config.resolution) for a in analyses]
        self.faces = torch.from_numpy(np.stack([a.embedding for a in analyses])).float().to(self.device)  # (n_id, f)
        self.gen = torch.Generator("cpu").manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        init = torch.Generator("cpu").manual_seed(config.seed)  # the network's start, without touching global RNG
        self.heads = nn.ModuleList(
            IdentityEncoder(self.faces.shape[1], self.k, b.n_components, generator=init) for b in self.bases
        ).to(self.device)
        self.means = [b.mean.to(self.device) for b in self.bases]  # (K, d) each
        self.components = [b.components.to(self.device) for b in self.bases]  # (K, n, d) each
        self.opt = torch.optim.AdamW(self.heads.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction = self.noise_scheduler.config.prediction_type
        if self.prediction not in ("epsilon", "v_prediction"):
            raise InputError(f"Unsupported prediction type {self.prediction!r}; only epsilon and v_prediction models are supported.")
        self.ema: list[list[torch.Tensor] | None] = [None] * self.n_id  # per identity: one (K, n) per encoder
        self.losses: list[float] = []
        self.steps_done = 0
        # Captions: every template for every person, tokenized once per encoder: (n_id, n_templates, T)
        self.caption_ids = [
            torch.stack([
                tok([expand_prompt(tok, t.format(f"face of {token} person")) for t in TEMPLATES], padding="max_length",
                    truncation=True, max_length=tok.model_max_length, return_tensors="pt").input_ids
                for token in self.tokens
            ]).to(self.device)
            for tok, _ in self.encoders
        ]
        cuda = self.device.type == "cuda"
        self.unet = pipe.unet
        if cuda:
            self.unet.to(memory_format=torch.channels_last)
        if config.low_memory:
            self.unet.enable_gradient_checkpointing()
        if config.compile:
            self.unet = torch.compile(self.unet)
        # Frozen weights may be half precision; the identity network stays float32. float16 needs loss scaling.
        self.scaler = torch.amp.GradScaler("cuda") if cuda and self.dtype == torch.float16 else None
        self.pool = self._build_pool() if config.views_per_identity > 0 else None

    @property
    def mlp(self) -> IdentityEncoder:
        """The identity network of the (first) text encoder."""
        return self.heads[0]

    def _encode(self, views: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior of each view: mean and std, (B, 4, H/8, W/8) each, unscaled."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:  # SDXL's VAE overflows in float16
            vae.to(torch.float32)
        with torch.inference_mode():
            dist = vae.encode(to_tensor(views).to(self.device, vae.dtype)).latent_dist
            mean, std = dist.mean.float().clone(), dist.std.float().clone()
        if upcast:
            vae.to(torch.float16)
        return mean, std

    def _build_pool(self, chunk: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per person: ``views_per_identity`` augmented views, encoded once (or as many as the run uses)."""
        cfg = self.cfg
        per_id = min(cfg.views_per_identity, math.ceil(cfg.total_steps(self.n_id) * cfg.batch_size / self.n_id))
        pool = []
        for crop in self.crops:
            means, stds = [], []
            for start in range(0, per_id, chunk):
                views = [augment(crop, cfg.resolution, self.rng, cfg) for _ in range(min(chunk, per_id - start))]
                m, s = self._encode(views)
                means.append(m)
                stds.append(s)
            pool.append((torch.cat(means), torch.cat(stds)))
        return pool

    def _latents(self, who: list[int]) -> torch.Tensor:
        """Scaled latents for one batch: drawn from the pool, or from freshly encoded views."""
        if self.pool is not None:
            picks = [(i, int(self.rng.integers(len(self.pool[i][0])))) for i in who]
            mean = torch.stack([self.pool[i][0][j] for i, j in picks])
            std = torch.stack([self.pool[i][1][j] for i, j in picks])
        else:
            mean, std = self._encode([augment(self.crops[i], self.cfg.resolution, self.rng, self.cfg) for i in who])
        eps = torch.randn(mean.shape, generator=self.gen).to(mean.device)
        return (mean + std * eps) * self.pipe.vae.config.scaling_factor

    def sample_batch(self) -> dict:
        """Draw one batch: augmented views -> noisy latents, timesteps, targets, caption ids."""
        cfg = self.cfg
        who = [(self.steps_done * cfg.batch_size + b) % self.n_id for b in range(cfg.batch_size)]
        templates = [int(self.rng.integers(len(TEMPLATES))) for _ in who]
        with torch.no_grad():
            latents = self._latents(who).to(self.device, self.dtype)  # (B, 4, H/8, W/8)
            noise = torch.randn(latents.shape, generator=self.gen).to(self.device, self.dtype)
            t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(who),), generator=self.gen).to(self.device)
            noisy = self.noise_scheduler.add_noise(latents, noise, t)
            target = noise if self.prediction == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)
            input_ids = [ids[who, templates] for ids in self.caption_ids]  # (B, T) per encoder
        caps = [TEMPLATES[t].format(f"face of {self.tokens[i]} person") for i, t in zip(who, templates)]
        return {"who": who, "captions": caps, "latents": latents, "noise": noise, "timesteps": t, "noisy": noisy,
                "target": target, "input_ids": input_ids}

    def coefficients(self) -> list[torch.Tensor]:
        """Current predictions of the identity network: (n_id, K, n) per text encoder."""
        return [head(self.faces) for head in self.heads]

    def _condition(self, batch: dict, coeffs: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Text conditioning with the identity words set from ``coeffs``, as the pipeline computes it."""
        hidden, pooled = [], None
        for (tok, te), ids, c, comps, mean, input_ids in zip(
            self.encoders, self.token_ids, coeffs, self.components, self.means, batch["input_ids"]
        ):
            rows = torch.einsum("ikn,knd->ikd", c, comps) + mean  # (n_id, K, d)
            with token_override(te.get_input_embeddings(), ids) as override:
                override["rows"] = rows.reshape(len(ids), -1)
                if not self.is_sdxl:
                    return te(input_ids)[0], {}  # (B, T, d): last hidden state, as SD 1.x/2.x pipelines use
                out = te(input_ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL: penultimate layer of each encoder
            if out[0].ndim == 2:
                pooled = out[0]  # (B, proj): pooled text embedding of the second encoder
        size = self.cfg.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=self.device, dtype=self.dtype)
        added = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.repeat(len(batch["who"]), 1)}
        return torch.cat(hidden, dim=-1), added

    def loss(self, batch: dict, coeffs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Diffusion loss of ``batch`` with the identity words set from ``coeffs`` (default: current)."""
        coeffs = self.coefficients() if coeffs is None else coeffs
        cond, added = self._condition(batch, coeffs)
        kwargs = {"added_cond_kwargs": added} if added else {}
        noisy = batch["noisy"].contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else batch["noisy"]
        pred = self.unet(noisy, batch["timesteps"], encoder_hidden_states=cond.to(self.dtype), **kwargs).sample
        return F.mse_loss(pred.float(), batch["target"].float())

    def step(self, batch: dict | None = None) -> float:
        """One optimisation step (on a fresh batch unless one is given); updates the averages."""
        batch = self.sample_batch() if batch is None else batch
        coeffs = self.coefficients()
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
            for i in batch["who"]:  # one average update per batch element showing that identity
                now = [c[i].detach().float().cpu() for c in coeffs]
                prev = self.ema[i]
                self.ema[i] = now if prev is None else [m * p + (1 - m) * c for p, c in zip(prev, now)]
        self.steps_done += 1
        self.losses.append(loss.item())
        return self.losses[-1]

    def identities(self) -> list[Identity]:
        """The averaged coefficients (rows re-normalised to unit length) as ``Identity`` objects."""
        with torch.no_grad():
            current = [c.float().cpu() for c in self.coefficients()]
        te_signature = encoders_signature(self.pipe)
        out = []
        for i, token in enumerate(self.tokens):
            avg = self.ema[i] if self.ema[i] is not None else [c[i] for c in current]
            out.append(Identity.from_coefficients(
                token, [F.normalize(c, dim=-1) for c in avg], self.bases, base_model=self.base_model,
                face_encoder=self.face_encoder, steps=self.steps_done, seed=self.cfg.seed,
                text_encoder_signature=te_signature, source_photo=Path(self.analyses[i].path).name,
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
    """Learn one identity per photo, jointly, with one shared identity network.

    Args:
        pipe: a diffusers SD pipeline; its VAE, UNet and text encoder stay frozen. Afterwards the
            pipeline also understands the new words, so it can draw them right away.
        photos: image paths or ``FaceAnalysis`` results, one per person.
        names: one name per photo; the prompt token is ``<name>``.
        config: ``TrainConfig``; defaults follow the paper.
        basis: a ``CelebBasis`` for this text encoder (a list of two for SDXL); built and cached when ``None``.
        basis_config: how to build the basis when ``basis`` is ``None`` (default ``BasisConfig()``).
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
    from .face import FaceAnalysis, FaceAnalyzer

    cfg = config or TrainConfig()
    names = check_inputs(pipe, list(names), len(photos))
    base_model = base_model or model_name(pipe)
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
            raise InputError(f"The basis is {b.embedding_dim} wide but the text encoder is {width}. Build the basis from this model.")
        if built_from_other_table(b.metadata, tok, te):
            logger.warning("The basis was built from another text encoder (%s); identities may look wrong. "
                           "Rebuild it with build-basis for this model.", b.metadata.get("text_encoder") or "unknown")
    analyses = []
    for p in photos:
        if not isinstance(p, FaceAnalysis):
            face_analyzer = face_analyzer or FaceAnalyzer()
            p = face_analyzer(p, face_index=face_index)
        analyses.append(p)

    trainer = Personalizer(pipe, analyses, names, cfg, bases, base_model)
    total = cfg.total_steps(len(names))
    logger.info("Training %s: %d steps at %d px on %s.", ", ".join(trainer.tokens), total, trainer.cfg.resolution, trainer.device)
    t0 = time.perf_counter()
    bar = tqdm(range(total), desc="personalize", disable=not show_progress, unit="step")
    for step in bar:
        loss = trainer.step()
        if show_progress:
            bar.set_postfix(loss=f"{loss:.4f}")
        if callback is not None:
            callback(step + 1, total, loss)
    elapsed = time.perf_counter() - t0

    identities = trainer.identities()
    for ident in identities:  # the placeholder rows were never used in training; fill them for drawing now
        load_identity(pipe, ident)
    run = {
        "celebbasis_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "base_model": base_model,
        "names": names,
        "photos": [a.path for a in analyses],
        "face_encoder": trainer.face_encoder,
        "config": {**asdict(trainer.cfg), "steps": total},
        "seed": cfg.seed,
        "device": str(trainer.device),
        "seconds": round(elapsed, 3),
        "losses": [round(x, 6) for x in trainer.losses],
    }
    window = max(1, min(50, total // 4))
    logger.info("Learned %s in %d steps (%.1f s); mean loss %.4f over the first %d steps, %.4f over the last %d "
                "(the whole curve is in the run record).", ", ".join(trainer.tokens), total, elapsed,
                float(np.mean(trainer.losses[:window])), window, float(np.mean(trainer.losses[-window:])), window)
    return PersonalizeResult(identities, trainer.losses, run)
