"""Every setting of every stage, with its default and one line of help: the one place defaults live.

``BasisConfig`` (METHOD §1), ``TrainConfig`` (§4) and ``GenerateConfig`` (§5) are typed dataclasses in
the manner of peft's configs: each field has a default and ``metadata={"help": ...}``, and
``__post_init__`` checks values before any model is loaded. The CLI builds its flags from these
fields, TOML files fill the same fields, and the web UI reads its defaults from them.
Errors name the field, not a command-line flag: the library does not know who called it.

Each config goes to a dict (``to_dict``) and comes from one (``from_dict``) or from a TOML file
(``from_toml``), the same reading the command line's ``--config`` uses. A TOML file holds one
config's settings as top-level keys, or several configs in tables named after them
(``[basis]``, ``[train]``, ``[generate]``; top-level keys are then the command line's own flags).
"""

from __future__ import annotations

import difflib
import logging
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from .errors import InputError

logger = logging.getLogger(__name__)


MAX_SEED = 2**32 - 1  # what every seeder involved (Python, numpy, torch) takes
DEFAULT_N_COMPONENTS = 512  # the paper's basis size; capped quietly at a narrower text encoder's width


def _help(text: str, **extra) -> dict:
    """A field's metadata: its help line, and ``choices`` where only some values are valid."""
    return {"help": text, **extra}


# Old names of settings, still read from dicts and TOML files (with a warning): old -> new.
RENAMED = {"views_per_identity": "views"}  # renamed in 0.2, so that a setting has one name (its flag's)


def load_toml(path) -> dict:
    """A TOML file's contents; a missing or malformed file is a one-line ``InputError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such config file. Pass a TOML file, e.g. configs/sd15.toml.")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid TOML ({e}). Fix the file.") from None


def settings_from(cls, data: dict, source: str) -> dict:
    """The values in ``data`` (a dict or a TOML table) as checked keyword arguments of the config ``cls``.

    Old names (``RENAMED``) are read with a warning. An unknown key or a value of the wrong type is
    a one-line ``InputError`` naming ``source`` (the file) and the key. Rules between fields are
    checked when the config is made, once every source of values (file, command line) is in.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = RENAMED.get(key, key)
        if name not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise InputError(f"{source}: {key} is not a setting of {cls.__name__}{f' (did you mean {close[0]}?)' if close else ''}. "
                             f"Valid keys: {', '.join(names)}.")
        if name != key:
            logger.warning("%s: %s is now called %s; rename it there (the old name will stop being read).", source, key, name)
        if name in out:
            raise InputError(f"{source}: {name} is given twice ({key} is its old name). Keep one.")
        out[name] = _checked(value, hints[name], key, source)
    return out


def _checked(value, hint, key: str, source: str):
    """``value`` as the type of a field annotated ``hint`` (``int``, ``float | None``, ...), or a one-line error."""
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    kind = kinds[0]
    if value is None and type(None) in typing.get_args(hint):
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise InputError(f"{source}: {key} = {value!r} should be {kind.__name__}. Fix the file.")


class _Settings:
    """``to_dict`` / ``from_dict`` / ``from_toml`` of the config dataclasses below."""

    section: ClassVar[str]  # the config's table in a TOML file that holds several

    def to_dict(self) -> dict[str, Any]:
        """Every setting as a plain value (int, float, bool, str), ready for JSON or TOML.

        Settings that are ``None`` (``steps``, ``resolution``, ... left to the model or the run) are
        left out, as TOML has no null; each of them defaults to ``None``, so ``from_dict`` gives them back.
        """
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, data: dict, source: str = "settings"):
        """The config with ``data``'s values over the defaults; unknown keys name ``source`` in a one-line error."""
        return cls(**settings_from(cls, data, source))

    @classmethod
    def from_toml(cls, path):
        """The config in a TOML file: its ``[section]`` table (``[train]`` for ``TrainConfig``) when the file has
        tables, else its top-level keys. Unknown keys and wrong types are one-line ``InputError``s naming the file.

        Example:
            >>> TrainConfig.from_toml("configs/tiny.toml").steps
            20
        """
        data = load_toml(path)
        if any(isinstance(v, dict) for v in data.values()):
            return cls.from_dict(data.get(cls.section, {}), f"{path} [{cls.section}]")
        return cls.from_dict(data, str(path))


def _check_numbers(config) -> None:
    """Every float setting is finite (NaN or inf would train or draw garbage), every seed in [0, MAX_SEED]."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{f.name} must be a finite number, got {value}.", field=f.name)
    if not 0 <= config.seed <= MAX_SEED:
        raise InputError(f"seed must be in [0, {MAX_SEED}], got {config.seed}.", field="seed")


@dataclass(frozen=True)
class BasisConfig(_Settings):
    """How the celeb basis is built from a text encoder's name embeddings (METHOD §1)."""

    section: ClassVar[str] = "basis"

    n_components: int = field(default=DEFAULT_N_COMPONENTS, metadata=_help("directions per token slot, n (capped at the model's width)"))
    n_tokens: int = field(default=2, metadata=_help("token vectors per identity, K"))
    dedupe: bool = field(default=False, metadata=_help(
        "count each distinct name token once per slot (default: every occurrence, as the paper's code)"))

    def __post_init__(self):
        if self.n_components < 1:
            raise InputError(f"n_components must be >= 1, got {self.n_components}.", field="n_components")
        if self.n_tokens < 1:
            raise InputError(f"n_tokens must be >= 1, got {self.n_tokens}.", field="n_tokens")


# Steps per person from a pretrained identity network (``TrainConfig.pretrained``), measured in the toy
# world by benchmarks/bench_instant.py: 50 warm steps came back at 95 % of the world's celebrities'
# likeness, 25 at 78 % (as many as 100 steps of the paper's recipe), 100 at 101 %.
WARM_STEPS = 50


@dataclass
class TrainConfig(_Settings):
    """Settings of one personalization run. Defaults follow the paper's official code (METHOD §4)."""

    section: ClassVar[str] = "train"

    steps: int | None = field(default=None, metadata=_help(
        f"optimisation steps (default: {WARM_STEPS} per person from a pretrained network, else 400 per person, as the "
        "paper's config); 0: the instant identity, one pass of the pretrained network"))
    pretrained: str = field(default="auto", metadata=_help(
        "the identity network to start from: a file made by `celebbasis pretrain`; auto: the model's own where it "
        "ships one (the toy world), else none; none: a fresh network, as the paper"))
    batch_size: int = field(default=2, metadata=_help("views per step (2, as the paper)"))
    learning_rate: float = field(default=5e-3, metadata=_help(
        "base learning rate per view: AdamW's rate is this x batch_size (the official code's 5e-3 x 2 = 1e-2)"))
    scale_lr: bool = field(default=True, metadata=_help(
        "multiply learning_rate by batch_size, as the official code; off: learning_rate is AdamW's rate as given"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay (torch's default, as the official optimiser)"))
    resolution: int | None = field(default=None, metadata=_help(
        "side of the square training views in pixels, a multiple of 8 (default: the model's native size)"))
    seed: int = field(default=0, metadata=_help("seeds augmentation, noise, timesteps and the network's initial weights"))
    ema_momentum: float = field(default=0.99, metadata=_help("momentum of the per-person average of coefficients that is saved"))
    min_scale: float = field(default=0.1, metadata=_help("smallest height of the pasted face relative to the canvas"))
    max_scale: float = field(default=1.0, metadata=_help("largest height of the pasted face relative to the canvas"))
    aspect_jitter: float = field(default=0.1, metadata=_help("the pasted face's width/height ratio is drawn from 1 +- this"))
    flip_p: float = field(default=0.5, metadata=_help("probability of a horizontal flip"))
    jitter: float = field(default=0.2, metadata=_help(
        "brightness/contrast/saturation factors are drawn from 1 +- this (applied with the hue shift in random order)"))
    hue: float = field(default=0.01, metadata=_help("hue shift drawn from +- this (fraction of the colour circle)"))
    views: int = field(default=64, metadata=_help(
        "augmented views per person (spread over their photos) encoded once up front; 0 makes new views every step"))
    face_per_photo: bool = field(default=False, metadata=_help(
        "one face vector per photo for all its views (faster); default: the face network sees every view, as the paper's code"))
    face_dim: int = field(default=512, metadata=_help(
        "smaller face vectors are lifted to this size by a fixed orthonormal map, as the paper's 512-d (0: never)"))
    compile: bool = field(default=False, metadata=_help("torch.compile the UNet (GPU; pays off on long runs)"))
    low_memory: bool = field(default=False, metadata=_help("gradient checkpointing in the UNet: less memory, about 30% slower"))

    def __post_init__(self):
        _check_numbers(self)
        if self.steps is not None and self.steps < 0:
            raise InputError(f"steps must be >= 0, got {self.steps}.", field="steps")
        if self.steps == 0 and self.pretrained == "none":
            raise InputError("steps=0 is the instant identity of a pretrained network, but the pretrained setting is none "
                             "(the paper's recipe). Give a network made by `celebbasis pretrain`, or steps >= 1.", field="steps")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}.", field="batch_size")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise InputError(f"resolution must be a positive multiple of 8, got {self.resolution}.", field="resolution")
        if not self.learning_rate > 0:
            raise InputError(f"learning_rate must be > 0, got {self.learning_rate}.", field="learning_rate")
        if self.weight_decay < 0:
            raise InputError(f"weight_decay must be >= 0, got {self.weight_decay}.", field="weight_decay")
        if not 0 <= self.ema_momentum < 1:
            raise InputError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}.", field="ema_momentum")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise InputError(f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}.", field="min_scale")
        if not 0 <= self.aspect_jitter < 1:
            raise InputError(f"aspect_jitter must be in [0, 1), got {self.aspect_jitter}.", field="aspect_jitter")
        if self.views < 0:
            raise InputError(f"views must be >= 0, got {self.views}.", field="views")
        if self.face_dim < 0:
            raise InputError(f"face_dim must be >= 0, got {self.face_dim}.", field="face_dim")
        if not 0 <= self.flip_p <= 1:
            raise InputError(f"flip_p must be in [0, 1], got {self.flip_p}.", field="flip_p")
        if not 0 <= self.jitter < 1:
            raise InputError(f"jitter must be in [0, 1), got {self.jitter}.", field="jitter")
        if not 0 <= self.hue <= 0.5:
            raise InputError(f"hue must be in [0, 0.5], got {self.hue}.", field="hue")

    @classmethod
    def preset(cls, name: str, **overrides) -> "TrainConfig":
        """A named preset with ``overrides`` on top (``toy``: the toy world's full-frame, unflipped views)."""
        if name not in TRAIN_PRESETS:
            raise InputError(f"Unknown preset {name!r}. Choose one of: {', '.join(TRAIN_PRESETS)}.", field="preset")
        return cls(**{**TRAIN_PRESETS[name], **overrides})

    @property
    def optimizer_lr(self) -> float:
        """AdamW's learning rate: ``learning_rate`` x ``batch_size`` when ``scale_lr`` (the official code's scaling)."""
        return self.learning_rate * self.batch_size if self.scale_lr else self.learning_rate

    def total_steps(self, n_identities: int, warm: bool = False) -> int:
        """``steps``, or by default 400 per person (the paper's) or ``WARM_STEPS`` per person from a pretrained network."""
        return self.steps if self.steps is not None else (WARM_STEPS if warm else 400) * n_identities


# Named training presets: plug-ins add theirs (the toy world adds "toy", its full-frame, unflipped views).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(pretrained="none"),  # the paper's recipe: a fresh network, 400 steps per person
}


SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "ddpm": "DDPMScheduler",
}


@dataclass
class GenerateConfig(_Settings):
    """Sampling settings (METHOD §5). ``GenerateConfig.preset("paper")`` is the official evaluation's."""

    section: ClassVar[str] = "generate"

    negative_prompt: str | None = field(default=None, metadata=_help("what the images should not show"))
    num_images: int = field(default=1, metadata=_help("images per prompt; image i uses seed + i"))
    batch_images: int = field(default=4, metadata=_help("images per model call; prompts are batched up to it"))
    steps: int = field(default=50, metadata=_help("denoising steps"))
    guidance: float = field(default=7.5, metadata=_help("classifier-free guidance scale (the paper's evaluation: 10)"))
    height: int | None = field(default=None, metadata=_help("image height, a multiple of 8 (default: the model's)"))
    width: int | None = field(default=None, metadata=_help("image width, a multiple of 8 (default: the model's)"))
    seed: int = field(default=0, metadata=_help("seed of the first image of each prompt"))
    scheduler: str = field(default="ddim", metadata=_help("sampler", choices=tuple(SCHEDULERS)))

    def __post_init__(self):
        _check_numbers(self)
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise InputError(f"{name} must be a positive multiple of 8, got {v}.", field=name)
        for name in ("num_images", "batch_images", "steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}.", field=name)
        if self.guidance < 0:
            raise InputError(f"guidance must be >= 0, got {self.guidance}.", field="guidance")
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"Unknown scheduler {self.scheduler!r}. Choose one of: {', '.join(SCHEDULERS)}.", field="scheduler")

    @classmethod
    def preset(cls, name: str, **overrides) -> "GenerateConfig":
        """A named preset with ``overrides`` on top (``paper``: the official evaluation settings)."""
        if name not in GENERATE_PRESETS:
            raise InputError(f"Unknown preset {name!r}. Choose one of: {', '.join(GENERATE_PRESETS)}.", field="preset")
        return cls(**{**GENERATE_PRESETS[name], **overrides})


# The official test and evaluation scripts: DDIM (eta 0), 50 steps, guidance 10, seed 42, 8 samples, at SD 1.4's
# native 512 px. A preset holds no size: images are the model's native size (512 px on SD 1.x, 64 on the toy
# world, whose UNet would take minutes a step at 512) unless the caller sets height and width.
# ``tiny``: the tiny random model draws noise whatever the steps; 20 show the pipeline run (the demo's with --tiny).
GENERATE_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(scheduler="ddim", steps=50, guidance=10.0, seed=42, num_images=8),
    "tiny": dict(steps=20),
}


@dataclass
class PretrainConfig(_Settings):
    """How the shared identity network is learned from a model's own celebrities (``celebbasis pretrain``)."""

    section: ClassVar[str] = "pretrain"

    drawings: int = field(default=4, metadata=_help("drawings of each celebrity (and of each mix), each with its own seed"))
    mixes: int = field(default=0, metadata=_help("synthetic people: random blends of 2-3 celebrities, drawn and read back"))
    filter: bool = field(default=True, metadata=_help(
        "drop people whose drawings disagree (mean pairwise face cosine below min_agreement)"))
    min_agreement: float | None = field(default=None, metadata=_help(
        "the consistency filter's threshold (default: the face network's same-person cosine)"))
    min_names: int = field(default=20, metadata=_help("fewest celebrities kept for a usable network"))
    max_names: int = field(default=0, metadata=_help("use this many celebrities, drawn at random with the seed (0: all)"))
    fit: str = field(default="mlp", metadata=_help(
        "ridge: closed-form ridge regression; mlp: the network trained on from it (rows' cosine)", choices=("ridge", "mlp")))
    ridge: float = field(default=1e-3, metadata=_help("ridge regularisation, relative to the number of pairs"))
    fit_steps: int = field(default=2000, metadata=_help("AdamW steps of the mlp fit (batch 256)"))
    learning_rate: float = field(default=3e-3, metadata=_help("AdamW learning rate of the mlp fit (cosine decay)"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay of the mlp fit"))
    face_dim: int = field(default=TrainConfig.face_dim, metadata=_help(
        "face vectors are lifted to this size, as in training (0: never); runs warm-started from it must match"))
    sample_steps: int = field(default=10, metadata=_help(
        "denoising steps per drawing (toy world: 10 read as right as 25, 0.83 of the attributes, in 40 % of the time)"))
    guidance: float = field(default=7.5, metadata=_help("classifier-free guidance of the drawings"))
    batch: int = field(default=64, metadata=_help("drawings per model call"))
    seed: int = field(default=0, metadata=_help("seeds the drawings, the mixes, the held-back names and the fit"))

    def __post_init__(self):
        _check_numbers(self)
        for name in ("drawings", "min_names", "fit_steps", "sample_steps", "batch"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}.", field=name)
        if self.drawings < 2 and self.filter:
            raise InputError("the consistency filter needs drawings >= 2; set filter=False for one drawing each.",
                             field="drawings")
        if self.max_names < 0:
            raise InputError(f"max_names must be >= 0, got {self.max_names}.", field="max_names")
        if self.mixes < 0:
            raise InputError(f"mixes must be >= 0, got {self.mixes}.", field="mixes")
        if self.fit not in ("ridge", "mlp"):
            raise InputError(f"fit must be ridge or mlp, got {self.fit!r}.", field="fit")
        if not self.ridge > 0 or not self.learning_rate > 0 or self.weight_decay < 0 or self.guidance < 0:
            raise InputError("ridge and learning_rate must be > 0, weight_decay and guidance >= 0.", field="ridge")
        if self.face_dim < 0:
            raise InputError(f"face_dim must be >= 0, got {self.face_dim}.", field="face_dim")


CONFIGS = (BasisConfig, TrainConfig, GenerateConfig, PretrainConfig)  # by their TOML tables: basis, train, generate, pretrain

GROUP_SIZE = 2  # people trained jointly by add-many, sharing one network (two, as the paper's default run)
EXPORT_FORMATS = ("diffusers", "a1111", "comfyui")  # the tools an identity is exported for
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"  # evaluate's prompt-fidelity model
WEBUI_HOST = "127.0.0.1"  # the web UI listens on this machine only unless told otherwise
WEBUI_PORT = 7860  # Gradio's usual port


def updated(config, **changes):
    """A copy of ``config`` with ``changes`` (checked again by ``__post_init__``)."""
    return replace(config, **changes)
