"""The one place that loads diffusion models (hub id or local diffusers folder), devices and dtypes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .errors import InputError, ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
TINY_MODEL = "tiny"  # shown in metadata for the in-process tiny random model
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else must be available."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"Unknown device {name!r}. Use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU is available here. Use --device cpu.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: MPS is not available here. Use --device cpu.")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA/MPS and float32 on the CPU."""
    if name in (None, "", "auto"):
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if name not in _DTYPES:
        raise InputError(f"Unknown dtype {name!r}. Use auto, float32, float16 or bfloat16.")
    return _DTYPES[name]


def load_pipeline(model: str | None = None, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                  revision: str | None = None, tiny: bool = False, sdxl: bool = False):
    """Load a Stable Diffusion 1.x/2.x or SDXL pipeline from a hub id or a local diffusers folder.

    Args:
        model: hub id (e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a folder with
            ``model_index.json``; ``None`` means ``DEFAULT_MODEL`` (``DEFAULT_SDXL_MODEL`` with ``sdxl``).
        device, dtype: where and in what precision; ``auto`` as in ``resolve_device``/``resolve_dtype``.
        revision: hub revision (branch, tag or commit).
        tiny: ignore ``model`` and build the seeded tiny random model in-process.
        sdxl: the default model and the tiny model are SDXL.

    Raises:
        ModelLoadError: folder missing or not a diffusers model, or hub id neither cached nor downloadable.
    """
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    model = model or (DEFAULT_SDXL_MODEL if sdxl else DEFAULT_MODEL)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    if tiny:
        from .testing import tiny_pipeline

        pipe = tiny_pipeline(family="sdxl" if sdxl else "sd1")
        pipe.register_to_config(_name_or_path=TINY_MODEL)
        return pipe.to(dev, dt)
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if looks_local:
        if not path.is_dir():
            raise ModelLoadError(f"Model folder {path} does not exist. Pass a diffusers model folder or a Hugging Face hub id.")
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{path} is not a diffusers model folder (no model_index.json). "
                "Convert single-file checkpoints with diffusers' convert scripts, or pass a hub id."
            )
        try:
            cls = json.loads((path / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError, AttributeError):
            raise ModelLoadError(f"{path / 'model_index.json'} is not valid JSON. Re-download or re-save the model.") from None
        if cls not in SUPPORTED_PIPELINES:
            raise ModelLoadError(
                f"{path} holds a {cls}, which celebbasis does not support. Pass a Stable Diffusion 1.x/2.x "
                f"or SDXL ({', '.join(SUPPORTED_PIPELINES)})."
            )
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(str(path) if looks_local else model, torch_dtype=dt, revision=revision)
    except OSError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not looks_local and ("cached" in first or "connect" in first.lower() or "offline" in first.lower()):
            raise ModelLoadError(
                f"Cannot load {model!r}: it is not in the local Hugging Face cache and the Hub cannot be reached (offline?). "
                f"Download it where there is network (hf download {model}) or pass a local diffusers folder with --model PATH."
            ) from None
        raise ModelLoadError(f"Cannot load model {model!r}: {first}") from None
    except (ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(
            f"{model} is not a Stable Diffusion 1.x/2.x or SDXL pipeline ({type(e).__name__}: {str(e).splitlines()[0][:200]})."
        ) from None
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)) or pipe.text_encoder is None \
            or pipe.unet.config.in_channels != 4:
        raise ModelLoadError(f"{model} ({type(pipe).__name__}) is not a text-to-image Stable Diffusion 1.x/2.x or SDXL model; "
                             "those are the ones supported.")
    return pipe.to(dev)


def model_name(pipe) -> str:
    """The id or path a pipeline was loaded from."""
    return str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "unknown")
