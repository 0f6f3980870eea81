"""One personalization run, step by step (paper §3.3, METHOD §4): ``Personalizer``.

Frozen: VAE, UNet, text encoder(s), face network, basis. Trained: the identity network only. Each
sample is a view of one of the person's photos (``views``), captioned with one of the official 81
templates filled with "face of <alice> person" (``prompts.caption``), encoded by the pipeline's own
``encode_prompt`` (``ModelFamily.conditioning``: the code path generation uses), and the loss is the
usual latent-diffusion loss. What is kept per person is an exponential moving average of the
coefficients predicted over all of that person's views.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..errors import InputError
from ..face import DlibFaceEncoder
from ..families import family_of
from ..identity import Identity, IdentityEncoder
from ..insert import add_placeholder, borrowed_tokenizers, token_override
from ..prompts import TEMPLATES, caption
from ..signatures import encoders_signature
from .checks import photo_groups
from .views import ViewMaker, Views

logger = logging.getLogger(__name__)


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


class Personalizer:
    """One personalization run, step by step: ``personalize`` drives it; tests and UIs can too.

    Builds everything once (placeholder words, training crops, the pool of views with their face
    vectors (``ViewMaker``), the identity network, optimiser, noise scheduler); then each ``step`` draws a batch and
    takes one AdamW step. Each text encoder of the model's family (two for SDXL) gets its own basis and network head.
    The pipeline's modules are frozen while it lives; ``close()`` (or leaving a ``with`` block)
    gives them back as they were found. Its inputs are trusted: ``personalize`` checks them first
    (``checks.check_inputs``), before any photo or model work.

    Args:
        pipe: a diffusers SD 1.x/2.x or SDXL pipeline, on one device, without offload hooks.
        analyses: ``FaceAnalysis`` per person, or a list of them per person (several photos of one person).
        names: one valid, distinct name per person, free in the model's vocabulary.
        config: ``TrainConfig``.
        bases: the ``CelebBasis`` of each text encoder.
        base_model: recorded in the identities.
        face_net: the face network (``FaceEncoder``) the photos were analysed with, run on every view;
            dlib's is loaded when ``None`` and the photos were analysed with it.
        pretrained: a ``PretrainedNetwork`` the identity network starts from (a warm start; checked
            against the model, basis and face network), or ``None`` for a fresh one, as the paper.
    """

    def __init__(self, pipe, analyses: list, names: list[str], config: TrainConfig, bases, base_model: str, *,
                 face_net=None, pretrained=None):
        self._stack = ExitStack()
        try:
            self._setup(pipe, analyses, names, config, bases, base_model, face_net, pretrained)
        except BaseException:
            self._stack.close()  # a set-up that fails gives everything back, as ``close`` does
            raise

    def _setup(self, pipe, analyses, names, config, bases, base_model, face_net, pretrained) -> None:
        self.family = family_of(pipe)
        if config.resolution is None:  # the model's native size
            config = dataclasses.replace(config, resolution=self.family.native_size(pipe))
        self.pipe, self.cfg, self.base_model = pipe, config, base_model
        self._stack.enter_context(borrowed_tokenizers(pipe))  # the new words go into copies until training succeeds
        self.encoders = self.family.encoders(pipe)  # [(tokenizer, text_encoder)], one per text encoder of the family
        self.bases = self._check_bases(bases)
        self.people = photo_groups(analyses)  # per person: [FaceAnalysis, ...]
        self.n_id, self.k = len(names), self.bases[0].n_tokens
        self.face_encoder_name = self._face_encoder_name()
        self.face_net = self._face_network(face_net)
        self.device, self.dtype = pipe.unet.device, pipe.unet.dtype
        self.tokens = [f"<{n}>" for n in names]
        self.token_ids = self._placeholders()  # per encoder: (n_id*K,) ids of the placeholder words
        self.crops = [[a.crop(config.resolution) for a in photos] for photos in self.people]
        self.photo_faces = [torch.from_numpy(np.stack([a.embedding for a in photos])).float()
                            for photos in self.people]  # per person: (n_photos, f)
        self.gen = torch.Generator("cpu").manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.pretrained = pretrained
        self.heads = self._heads()
        self.means = [b.mean.to(te.device) for b, (_, te) in zip(self.bases, self.encoders)]  # (K, d) each
        self.components = [b.components.to(te.device) for b, (_, te) in zip(self.bases, self.encoders)]  # (K, n, d)
        self.opt = torch.optim.AdamW(self.heads.parameters(), lr=config.optimizer_lr, weight_decay=config.weight_decay)
        self.noise_scheduler, self.prediction = self._scheduler()
        self.ema: list[list[torch.Tensor] | None] = [None] * self.n_id  # per identity: one (K, n) per encoder
        self.losses: list[float] = []
        self.steps_done = 0
        self.view_maker = ViewMaker(pipe.vae, config, self.people, self.crops, self.photo_faces, self.face_net, self.rng,
                                    self.tokens)
        total = config.total_steps(self.n_id, warm=pretrained is not None)
        if config.views > 0 and total > 0:
            self.view_maker.pool = self.view_maker.build_pool(total)
        self.unet, self.scaler = self._prepare_unet()

    # -- set-up -------------------------------------------------------------------------------------
    def _check_bases(self, bases) -> list:
        bases = list(bases) if isinstance(bases, (list, tuple)) else [bases]
        if len(bases) != len(self.encoders):
            raise InputError(f"{len(self.encoders)} text encoder(s) but {len(bases)} basis/bases given.")
        return bases

    def _face_encoder_name(self) -> str:
        names = {a.encoder_name for photos in self.people for a in photos}
        if len(names) > 1:
            raise InputError(f"Photos were analysed with different face encoders ({sorted(names)}); use one for a joint run.")
        return names.pop()

    def _face_network(self, net):
        """The face network to run on every view, or ``None`` (each photo's own vector for all its views)."""
        if self.cfg.face_per_photo:
            return None
        if net is None:
            net = DlibFaceEncoder() if self.face_encoder_name == DlibFaceEncoder.name else None
        if net is None or any(getattr(a, "aligned", None) is None for photos in self.people for a in photos):
            logger.warning("The face network (%s) is not at hand, so each photo's one face vector serves all its views. "
                           "Pass face_analyzer= to personalize to let it see every view, as the paper's code does.",
                           self.face_encoder_name)
            return None
        if net.name != self.face_encoder_name:
            raise InputError(f"The photos were analysed with {self.face_encoder_name} but the face network given is {net.name}. "
                             "Use the same face encoder for both.")
        return net

    def _placeholders(self) -> list[list[int]]:
        return [[i for t in self.tokens for i in add_placeholder(tok, te, t, self.k, resize=False)]
                for tok, te in self.encoders]

    def _heads(self) -> nn.ModuleList:
        """One identity network per text encoder: the pretrained one's weights (a warm start), or drawn from the
        seed without touching the global RNG."""
        if self.pretrained is not None:
            self.pretrained.check(self.pipe, self.bases, self.face_encoder_name, self.cfg.face_dim)
            return nn.ModuleList(copy.deepcopy(h).requires_grad_(True).to(te.device)
                                 for h, (_, te) in zip(self.pretrained.heads, self.encoders))
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

    # -- batches ----------------------------------------------------------------------------------
    @property
    def pool(self) -> list[Views] | None:
        """Per person: the pool of views made at set-up (``views`` > 0), else ``None``."""
        return self.view_maker.pool

    def sample_batch(self) -> dict:
        """Draw one batch: views -> noisy latents, timesteps, targets, captions, and each view's face vector."""
        cfg = self.cfg
        who = [(self.steps_done * cfg.batch_size + b) % self.n_id for b in range(cfg.batch_size)]
        templates = [int(self.rng.integers(len(TEMPLATES))) for _ in who]
        with torch.no_grad():
            latents, faces = self.view_maker.latents_and_faces(who, self.gen)
            latents = latents.to(self.device, self.dtype)  # (B, 4, H/8, W/8)
            noise = torch.randn(latents.shape, generator=self.gen).to(self.device, self.dtype)
            t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(who),), generator=self.gen).to(self.device)
            noisy = self.noise_scheduler.add_noise(latents, noise, t)
            target = noise if self.prediction == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)
        caps = [caption(t, self.tokens[i]) for i, t in zip(who, templates)]
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
        set from ``coeffs[e][b]`` (K, n), through the pipeline's own ``encode_prompt`` (``ModelFamily.conditioning``)."""
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
                face_encoder=self.face_encoder_name, steps=self.steps_done, seed=self.cfg.seed,
                **({"pretrained": self.pretrained.name} if self.pretrained is not None else {}),
                text_encoder_signature=te_signature, source_photo=sources[0], source_photos=sources,
                train_config=self.cfg.to_dict(), **self.family.identity_metadata(),
            ))
        return out

