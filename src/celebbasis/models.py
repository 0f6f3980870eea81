"""The one place that loads diffusion models, devices and dtypes.

A model is a hub id, a local diffusers folder, or a single-file checkpoint as A1111 and ComfyUI keep
them (``v1-5-pruned-emaonly.safetensors``, SDXL base, fine-tunes), loaded through diffusers'
``from_single_file`` with the configuration of its model family. Pickled ``.ckpt`` files are read
only with ``torch.load(weights_only=True)``; nothing else is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from .basis import (CelebBasis, build_basis, cache_dir, embedding_fingerprint, format_signature, parse_signature,
                    same_signature, table_signature)
from .config import BasisConfig
from .errors import InputError, ModelLoadError, first_line
from .resources import celeb_names, normalize_names

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
TINY_MODEL = "tiny"  # shown in metadata for the in-process tiny random model
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # all but .safetensors: torch.load(weights_only=True)
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# The configuration each family's single files are loaded with when no --model-config is given (diffusers' own
# defaults). SD 2.x means the 768 px v-prediction model; 512 px SD 2.x-base files need
# --model-config stabilityai/stable-diffusion-2-1-base.
FAMILY_CONFIGS = {"sd1": DEFAULT_MODEL, "sd2": "stabilityai/stable-diffusion-2-1", "sdxl": DEFAULT_SDXL_MODEL}
# Text-encoder token table of each family in the original layout: its presence names the family, its width is checked.
_FAMILY_KEYS = {
    "sdxl": "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    "sd2": "cond_stage_model.model.token_embedding.weight",
    "sd1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
}
_CONFIG_FILES = ["*.json", "**/*.json", "*.txt", "**/*.txt", "**/*.model"]  # as diffusers fetches a config: no weights
HUB_TIMEOUT = 2.0  # seconds to wait for the Hub before working from the local cache only


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
        raise InputError(f"Device {name}: no CUDA GPU is available here. Use the cpu device.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"Device {name}: MPS is not available here. Use the cpu device.")
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
                  revision: str | None = None, tiny: bool = False, sdxl: bool = False, config: str | None = None,
                  toy: bool = False):
    """Load a Stable Diffusion 1.x/2.x or SDXL pipeline from a hub id, a diffusers folder or a single file.

    Args:
        model: hub id (e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``), a folder with
            ``model_index.json``, or a single-file checkpoint (``.safetensors``; ``.ckpt``/``.pt``
            holding only tensors) as A1111 and ComfyUI use; ``None`` means ``DEFAULT_MODEL``
            (``DEFAULT_SDXL_MODEL`` with ``sdxl``).
        device, dtype: where and in what precision; ``auto`` as in ``resolve_device``/``resolve_dtype``.
        revision: hub revision (branch, tag or commit) of ``model``, or of ``config`` for a single file.
        tiny: ignore ``model`` and build the seeded tiny random model in-process.
        sdxl: the default model and the tiny model are SDXL.
        toy: ignore ``model`` and load the packaged toy world (cartoon people, 64 px; ``celebbasis.toy``).
        config: for a single file only: a diffusers folder or hub id of the same architecture, whose
            configuration (layers, scheduler, tokenizer) the file's weights are loaded into. ``None``
            uses the family's ``FAMILY_CONFIGS`` entry, from the local Hugging Face cache or the Hub.

    Raises:
        ModelLoadError: folder or file missing or of the wrong kind, a pickle that is more than tensors,
            or a hub id / single-file configuration neither cached nor downloadable. The Hub is given
            ``HUB_TIMEOUT`` seconds to answer; without an answer only the local cache is used.

    Example:
        >>> pipe = load_pipeline("~/ComfyUI/models/checkpoints/v1-5-pruned-emaonly.safetensors",
        ...                      config="stable-diffusion-v1-5/stable-diffusion-v1-5")
        >>> model_name(pipe)
        'v1-5-pruned-emaonly.safetensors'
    """
    model = model or (DEFAULT_SDXL_MODEL if sdxl else DEFAULT_MODEL)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    if toy:
        return _load_toy(dev, dt)
    if tiny:
        from .testing import tiny_pipeline

        pipe = tiny_pipeline(family="sdxl" if sdxl else "sd1")
        pipe.register_to_config(_name_or_path=f"{TINY_MODEL}-sdxl" if sdxl else TINY_MODEL)
        pipe.to(dev)
        return pipe if dt == torch.float32 else pipe.to(dtype=dt)  # built in float32: cast only when asked
    path = Path(model).expanduser()
    if path.is_file() or (not path.exists() and path.suffix.lower() in SINGLE_FILE_SUFFIXES):
        return _load_single_file(path, config, dev, dt, revision)
    if config:
        logger.warning("A model configuration is only used with single-file checkpoints; ignoring it for %s.", model)
    looks_local = looks_like_path(model)
    if looks_local:
        _check_folder(path)
    return _load_pretrained(str(path) if looks_local else model, looks_local, dev, dt, revision)


def _load_toy(device: torch.device, dtype: torch.dtype):
    """The packaged toy world (``celebbasis.toy``) as a ``StableDiffusionPipeline`` with the package's CLIP tokenizer."""
    from diffusers import StableDiffusionPipeline

    from .resources import clip_tokenizer
    from .toy import TOY_MODEL, require, toy_dir

    pipe = StableDiffusionPipeline.from_pretrained(str(require(toy_dir() / "pipeline")), tokenizer=clip_tokenizer(),
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.register_to_config(_name_or_path=TOY_MODEL)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):  # stored in float16; each part as asked
        module.to(device)
        if module.dtype != dtype:
            module.to(dtype=dtype)
    return pipe


def _check_folder(path: Path) -> None:
    """A local model must be a diffusers folder of a supported pipeline class."""
    if not path.is_dir():
        raise ModelLoadError(f"Model folder {path} does not exist. Pass a diffusers model folder or a Hugging Face hub id.")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"{path} is not a diffusers model folder (no model_index.json). Pass a diffusers model folder, "
            "a single-file checkpoint (.safetensors) or a hub id."
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


def _load_pretrained(model: str, local: bool, dev: torch.device, dt: torch.dtype, revision: str | None):
    """``DiffusionPipeline.from_pretrained`` of a folder or hub id; offline, only the cache, and fast."""
    cache_only = not local and not hub_reachable()  # before importing diffusers: offline fails in ~2 s
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    def load(variant):
        return DiffusionPipeline.from_pretrained(model, **_dtype_kwarg(dt), revision=revision, local_files_only=cache_only,
                                                 variant=variant)

    # float16: the repository's half-size fp16 files where it has them; else the full files, and the
    # fp16 files when they are all there is (a cache or folder holding only the variant)
    first, second = ("fp16", None) if dt == torch.float16 else (None, "fp16")
    try:
        try:
            pipe = load(first)
        except (OSError, ValueError) as e:
            logger.debug("%s: no %s files (%s); trying %s", model, first or "default", first_line(e, 120), second or "default")
            pipe = load(second)
    except OSError as e:
        first = first_line(e, 400)
        if not local and (cache_only or "cached" in first or "connect" in first.lower() or "offline" in first.lower()):
            raise ModelLoadError(
                f"Cannot load {model!r}: it is not in the local Hugging Face cache and the Hub cannot be reached (offline?). "
                f"Download it where there is network (hf download {model}) or pass a local diffusers folder with --model PATH; "
                "to try everything without a download, pass --toy (a small model of cartoon people that ships with "
                "celebbasis) or --tiny (a random model)."
            ) from None
        raise ModelLoadError(f"Cannot load model {model!r}: {first}") from None
    except (ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(
            f"{model} is not a Stable Diffusion 1.x/2.x or SDXL pipeline ({type(e).__name__}: {first_line(e, 200)})."
        ) from None
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)) or pipe.text_encoder is None \
            or pipe.unet.config.in_channels != 4:
        raise ModelLoadError(f"{model} ({type(pipe).__name__}) is not a text-to-image Stable Diffusion 1.x/2.x or SDXL model; "
                             "those are the ones supported.")
    return pipe.to(dev)


def model_name(pipe) -> str:
    """The id or path a pipeline was loaded from; for a single-file checkpoint its file name only."""
    name = str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "unknown")
    return Path(name).name if name.lower().endswith(SINGLE_FILE_SUFFIXES) else name


_TRUE = ("1", "on", "yes", "true")


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``, read now (the hub library reads them once, at import)."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").lower()
    return env in _TRUE or bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = HUB_TIMEOUT) -> bool:
    """Whether the Hugging Face Hub (``HF_ENDPOINT``, through any proxy) answers within ``timeout`` seconds.

    Any HTTP answer counts; a server that accepts the connection but never answers does not. ``False``
    at once in offline mode (``HF_HUB_OFFLINE=1``). The request runs in a daemon thread, so a hanging
    name lookup costs ``timeout`` seconds, not minutes.
    """
    import threading

    from huggingface_hub import get_session

    if _hub_offline():
        return False
    result = []

    def ask():
        try:
            get_session().head(hub_endpoint(), timeout=timeout)
            result.append(True)
        except Exception:  # connection refused, DNS failure, timeout, proxy error: all mean "not now"
            result.append(False)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def looks_like_path(model: str) -> bool:
    """Whether ``model`` names a local path rather than a hub id (``owner/name``)."""
    return Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def load_clip(model: str):
    """A transformers CLIP model (eval mode) and its processor, from a hub id or a local folder.

    A hub id is read from the local Hugging Face cache first; the Hub is contacted only when the
    model is not cached and the Hub answers within ``HUB_TIMEOUT`` seconds. Offline, it fails within
    that time, before CLIP's code is even imported, with one line saying what to pass instead.

    Raises:
        ModelLoadError: a missing or broken folder, or a hub id neither cached nor downloadable.
    """
    fix = "Pass a local CLIP folder with --clip-model PATH, or --no-clip to skip the CLIP score."
    path = Path(model).expanduser()
    looks_local = looks_like_path(model)
    offline = ModelLoadError(
        f"Cannot load the CLIP model {model!r}: it is not in the local Hugging Face cache and the Hub "
        f"({hub_endpoint()}) cannot be reached (offline?). {fix}"
    )
    if looks_local and not path.is_dir():
        raise ModelLoadError(f"CLIP model folder {path} does not exist. {fix}")
    if not looks_local and not _in_hub_cache(model) and not hub_reachable():
        raise offline  # before importing CLIP's modelling code, which alone takes seconds

    from transformers import CLIPModel, CLIPProcessor

    def load(source, **kwargs):
        return CLIPModel.from_pretrained(source, **kwargs).eval(), CLIPProcessor.from_pretrained(source, **kwargs)

    if looks_local:
        try:
            return load(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{path} is not a transformers CLIP model ({first_line(e)}). {fix}") from None
    try:
        return load(model, local_files_only=True)
    except OSError:
        if not hub_reachable():
            raise offline from None
    logger.info("Downloading the CLIP model %s …", model)
    try:
        return load(model)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Cannot load the CLIP model {model!r} ({first_line(e)}). {fix}") from None


def _in_hub_cache(model: str) -> bool:
    """Whether the local Hugging Face cache holds ``model``'s config (a cheap look, no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _dtype_kwarg(dt: torch.dtype) -> dict:
    """``dtype=`` where diffusers takes it (it deprecates ``torch_dtype`` with a FutureWarning), else ``torch_dtype=``.

    So no warning needs filtering here: the library never changes the process's warning filters or
    logger levels (not thread-safe, and not its business); the CLI quiets the libraries for its own run.
    """
    from diffusers.utils import deprecation_utils

    return {"dtype": dt} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dt}


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a single-file checkpoint; pickles are read with ``weights_only=True`` or refused."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # SafetensorError: truncated download, not safetensors at all
            raise ModelLoadError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]}); "
                                 "download it again.") from None
    import pickle
    import zipfile

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        raise ModelLoadError(
            f"{path} is a pickle checkpoint that holds more than tensors, and celebbasis does not unpickle that "
            "(it could run code). Convert it to .safetensors (e.g. A1111's Checkpoint Merger, or a trusted "
            "conversion script) and pass that file."
        ) from None
    except Exception as e:
        raise ModelLoadError(f"Cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}). "
                             "Download it again, or use its .safetensors version.") from None
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # Lightning / SD training checkpoints
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelLoadError(f"{path} holds a {type(sd).__name__}, not a model state dict. Pass an SD checkpoint.")
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def checkpoint_family(path) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"``: the family of a single-file checkpoint, from its keys.

    ``conditioner.embedders.1.model.*`` (OpenCLIP-G beside CLIP-L) is SDXL, ``cond_stage_model.model.*``
    (OpenCLIP-H) SD 2.x, ``cond_stage_model.transformer.*`` (CLIP-L) SD 1.x.

    Raises:
        ModelLoadError: unreadable, a refused pickle, or not a full SD 1.x/2.x/SDXL text-to-image checkpoint.
    """
    path = Path(path).expanduser()
    return _family(path, _checkpoint_shapes(path))


def _family(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    if not any(k.startswith("model.diffusion_model.") for k in shapes):
        raise ModelLoadError(f"{path.name} has no UNet (model.diffusion_model.*): it is not a full Stable Diffusion "
                             "checkpoint (a LoRA, an embedding or a VAE?). Pass the base model's checkpoint.")
    if any(k.startswith("conditioner.embedders.1.model.") for k in shapes) and _FAMILY_KEYS["sdxl"] in shapes:
        family = "sdxl"
    elif any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
        raise ModelLoadError(f"{path.name} is an SDXL refiner, which has no CLIP-L text encoder to learn a word in. "
                             "Pass the SDXL base model (or a fine-tune of it).")
    elif _FAMILY_KEYS["sd2"] in shapes:
        family = "sd2"
    elif _FAMILY_KEYS["sd1"] in shapes:
        family = "sd1"
    elif any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        raise ModelLoadError(f"{path.name} is an SD 1.x checkpoint whose text encoder has the old key layout "
                             "(cond_stage_model.transformer.embeddings.*, no text_model.), which diffusers cannot read. "
                             "Re-save it with a current tool (e.g. A1111's Checkpoint Merger) and pass that file.")
    else:
        raise ModelLoadError(f"{path.name} holds no SD 1.x/2.x or SDXL text encoder (cond_stage_model.* or conditioner.*): "
                             "it is a UNet-only file or another model family. Pass a full SD 1.x/2.x or SDXL checkpoint.")
    in_channels = shapes.get("model.diffusion_model.input_blocks.0.0.weight", (0, 4))[1]
    if in_channels != 4:
        raise ModelLoadError(f"{path.name} is an inpainting or instruct-pix2pix model (its UNet takes {in_channels} channels); "
                             "celebbasis needs a text-to-image model.")
    return family


def _resolve_config(config: str | None, family: str, path: Path, revision: str | None) -> str:
    """The local folder holding the family configuration for ``path``: given, cached, or fetched (configs only)."""
    from huggingface_hub import snapshot_download

    what = FAMILY_NAMES[family]
    given = config is not None
    if config is None:
        config = FAMILY_CONFIGS[family]
    hint = ("Pass --model-config a local diffusers folder of the same architecture, or download that id's "
            f"configuration where there is network (hf download {config} --include '*.json' '*.txt')." if given else
            f"Pass --model-config with a diffusers folder or a cached hub id of the same architecture (e.g. {config}).")
    local = Path(config).expanduser()
    if looks_like_path(config):
        if not (local / "model_index.json").is_file():
            raise ModelLoadError(f"--model-config {config}: {'no model_index.json there' if local.is_dir() else 'no such folder'}. "
                                 f"Pass a diffusers model folder or hub id of the {what} architecture.")
        return str(local)
    try:  # configs barely change: the cache wins, so a cached family loads offline with no network round trip
        return snapshot_download(config, revision=revision, allow_patterns=_CONFIG_FILES, local_files_only=True)
    except Exception:
        pass
    if not hub_reachable():
        raise ModelLoadError(
            f"{path.name} is a single-file {what} checkpoint; loading it needs the configuration of {config}, which is "
            f"not in the local Hugging Face cache, and the Hub cannot be reached (offline?). {hint}"
        )
    try:
        return snapshot_download(config, revision=revision, allow_patterns=_CONFIG_FILES)
    except Exception as e:
        raise ModelLoadError(f"Cannot fetch the configuration {config} for {path.name} ({first_line(e)}). {hint}") from None


def _check_config(config_dir: str, family: str, path: Path, shapes: dict[str, tuple[int, ...]], shown: str) -> None:
    """Refuse a configuration of another architecture before diffusers tries to pour the weights into it."""
    root = Path(config_dir)
    try:
        cls = json.loads((root / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
        width = json.loads((root / "text_encoder" / "config.json").read_text(encoding="utf-8")).get("hidden_size")
    except (OSError, ValueError, AttributeError):
        raise ModelLoadError(f"--model-config {shown} is not a complete diffusers model configuration "
                             "(model_index.json, text_encoder/config.json). Pass a diffusers folder or hub id.") from None
    want = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    file_width = shapes[_FAMILY_KEYS[family]][1]
    if cls != want or width != file_width:
        raise ModelLoadError(
            f"{path.name} is an {FAMILY_NAMES[family]} checkpoint (text encoder {file_width} wide) but --model-config {shown} "
            f"is a {cls} (text encoder {width} wide). Pass a configuration of the same architecture "
            f"(e.g. {FAMILY_CONFIGS[family]})."
        )


def _load_single_file(path: Path, config: str | None, dev: torch.device, dt: torch.dtype, revision: str | None):
    """``StableDiffusion(XL)Pipeline.from_single_file`` with a local configuration and no network access."""
    if not path.is_file():
        raise ModelLoadError(f"Checkpoint file {path} does not exist. Pass an existing .safetensors file, a diffusers "
                             "folder or a hub id.")
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"{path.name}: celebbasis reads single-file checkpoints ending in "
                             f"{', '.join(SINGLE_FILE_SUFFIXES)}; pass one of those, a diffusers folder or a hub id.")
    shapes = _checkpoint_shapes(path)
    family = _family(path, shapes)
    config_dir = _resolve_config(config, family, path, revision)
    _check_config(config_dir, family, path, shapes, config or FAMILY_CONFIGS[family])
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    logger.info("Loading %s as %s with the configuration of %s.", path.name, FAMILY_NAMES[family],
                config or FAMILY_CONFIGS[family])
    try:
        pipe = cls.from_single_file(str(path), config=config_dir, **_dtype_kwarg(dt), local_files_only=True)
    except Exception as e:  # diffusers raises ValueError, KeyError, RuntimeError, OSError or its own error types here
        first = str(e).strip().splitlines()[0].split(". ")[0][:200] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"Cannot load {path.name} with the configuration of {config or FAMILY_CONFIGS[family]} "
                             f"({type(e).__name__}: {first}). Pass --model-config of the model it was fine-tuned from.") from None
    pipe.register_to_config(_name_or_path=str(path))
    return pipe.to(dev)


# -- text encoders and their fingerprints ---------------------------------------------------------

def text_encoders(pipe) -> list[tuple]:
    """(tokenizer, text_encoder) pairs of a pipeline: one for SD 1.x/2.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def encoders_signature(pipe) -> str:
    """``format_signature`` of every text encoder of a pipeline, joined by ``;``."""
    return ";".join(format_signature(table_signature(tok, te)) for tok, te in text_encoders(pipe))


def model_metadata(pipe) -> dict[str, str]:
    """What an identity made on ``pipe`` records about it: the model's name and its text encoders."""
    return {"base_model": model_name(pipe), "text_encoder_signature": encoders_signature(pipe)}


def legacy_table_sha256(tokenizer, text_encoder) -> str:
    """The exact float16 hash that version 0.1 files record as ``text_encoder_sha256`` (read only)."""
    table = text_encoder.get_input_embeddings().weight.detach()[: tokenizer.vocab_size]
    return hashlib.sha256(table.to("cpu", torch.float16).contiguous().numpy().tobytes()).hexdigest()


def _other_tables(metadata: dict, pairs: list[tuple]) -> bool:
    same = None
    parts = [parse_signature(p) for p in (metadata.get("text_encoder_signature") or "").split(";") if p]
    if parts and all(p is not None for p in parts):
        same = len(parts) == len(pairs) and all(same_signature(p, table_signature(tok, te)) for p, (tok, te) in zip(parts, pairs))
        return not same
    legacy = metadata.get("text_encoder_sha256")
    return bool(legacy) and legacy != ",".join(legacy_table_sha256(tok, te) for tok, te in pairs)


def trained_on_other_encoder(metadata: dict, pipe) -> bool:
    """True when an identity's metadata says it was made with other text encoders than ``pipe``'s."""
    return _other_tables(metadata, text_encoders(pipe))


def built_from_other_table(metadata: dict, tokenizer, text_encoder) -> bool:
    """True when a basis' metadata says it was built from another token table than this encoder's."""
    return _other_tables(metadata, [(tokenizer, text_encoder)])


# -- the model's celeb bases, built once and cached -------------------------------------------------

def cached_basis(tokenizer, text_encoder, names: list[str] | None = None, *, n_components: int = BasisConfig.n_components,
                 n_tokens: int = BasisConfig.n_tokens, dedupe: bool = BasisConfig.dedupe, source: str = ""):
    """``build_basis``, read from or written to the cache (``basis.cache_dir()``).

    A cached basis is reused when its names and settings are the same and its recorded table
    signature matches this text encoder's (``same_signature``), so float32, float16 and bfloat16
    copies of one model share one entry.
    """
    names = normalize_names(celeb_names() if names is None else names)
    n = min(n_components, text_encoder.get_input_embeddings().embedding_dim)
    signature = table_signature(tokenizer, text_encoder)
    settings = embedding_fingerprint("", names, n, n_tokens, dedupe)[:16]  # names and settings, not the table
    folder = cache_dir() / "basis"
    for path in sorted(folder.glob(f"{settings}-*.safetensors")):
        try:
            basis = CelebBasis.load(path)
        except InputError:
            logger.warning("Ignoring a damaged cached basis at %s; it will be rebuilt.", path)
            continue
        if same_signature(parse_signature(basis.metadata.get("text_encoder_signature")), signature):
            logger.debug("basis from cache %s", path)
            return basis
    basis = build_basis(tokenizer, text_encoder, names, n_components=n, n_tokens=n_tokens, dedupe=dedupe, source=source,
                        signature=format_signature(signature))
    try:
        basis.save(folder / f"{settings}-{basis.fingerprint[:16]}.safetensors")
    except OSError as e:
        logger.warning("Could not cache the basis in %s (%s); it will be rebuilt next time.", folder, e)
    return basis


def pipeline_bases(pipe, config=None, source: str | None = None) -> list:
    """The cached basis of each text encoder of ``pipe`` (``config``: a ``BasisConfig``)."""
    cfg = config or BasisConfig()
    return [cached_basis(tok, te, n_components=cfg.n_components, n_tokens=cfg.n_tokens, dedupe=cfg.dedupe,
                         source=source or model_name(pipe)) for tok, te in text_encoders(pipe)]
