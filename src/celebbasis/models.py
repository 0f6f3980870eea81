"""The one place that loads diffusion models, devices and dtypes.

A model is a hub id, a local diffusers folder, or a single-file checkpoint as A1111 and ComfyUI keep
them (``v1-5-pruned-emaonly.safetensors``, SDXL base, fine-tunes), loaded through diffusers'
``from_single_file`` with the configuration of its model family (``single_file``). Pickled ``.ckpt``
files are read only with ``torch.load(weights_only=True)``; nothing else is ever unpickled.

Models that ship with a plug-in (the toy world) load by name: the plug-in registers a
``PackagedModel`` with its loader and what suits its pictures (a face network, a training preset),
which ``personalize`` uses when the caller chose none. This module knows no plug-in by import.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .basis import cached_basis
from .config import BasisConfig
from .errors import InputError, ModelLoadError, first_line
from .families import SD1, SDXL, family_named, family_of, supported_pipelines, text_encoders
from .signatures import built_from_other_table, encoders_signature
from .single_file import checkpoint_shapes, family_of_checkpoint

logger = logging.getLogger(__name__)

# What differs between SD 1.x, SD 2.x and SDXL (default models, single files, encoders, ...) is in families.py.
DEFAULT_MODEL = SD1.default_model
DEFAULT_SDXL_MODEL = SDXL.default_model

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # all but .safetensors: torch.load(weights_only=True)
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


@dataclass(frozen=True)
class PackagedModel:
    """A model a plug-in ships and registers (``register_packaged_model``), loaded by its name.

    Attributes:
        name: what ``load_pipeline`` loads it by (``toy=True`` is ``"toy"``) and records as the base model.
        title: how messages name it, e.g. ``"the toy world"``.
        load: ``load(device, dtype)`` -> the diffusers pipeline, named ``name`` (``_name_or_path``).
        face_encoder: spec of the face network its people are recognised with (``face.make_face_encoder``).
        train_preset: the ``TrainConfig`` preset its training starts from (``config.TRAIN_PRESETS``), or ``None``.
    """

    name: str
    title: str
    load: Callable[[torch.device, torch.dtype], object]
    face_encoder: str = "dlib"
    train_preset: str | None = None


PACKAGED_MODELS: dict[str, PackagedModel] = {}


def register_packaged_model(model: PackagedModel) -> PackagedModel:
    """Add (or replace) a model that ``load_pipeline`` loads by name, and its recommended settings."""
    PACKAGED_MODELS[model.name] = model
    return model


def packaged_model(pipe) -> PackagedModel | None:
    """The registered ``PackagedModel`` a pipeline was loaded as, or ``None`` (any other model)."""
    return PACKAGED_MODELS.get(model_name(pipe))


def load_pipeline(model: str | None = None, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                  revision: str | None = None, tiny: bool = False, sdxl: bool = False, config: str | None = None,
                  toy: bool = False, family: str | None = None):
    """Load a Stable Diffusion 1.x/2.x or SDXL pipeline from a hub id, a diffusers folder or a single file.

    Args:
        model: hub id (e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``), a folder with
            ``model_index.json``, or a single-file checkpoint (``.safetensors``; ``.ckpt``/``.pt``
            holding only tensors) as A1111 and ComfyUI use; ``None`` means ``DEFAULT_MODEL``
            (``DEFAULT_SDXL_MODEL`` with ``sdxl``).
        device, dtype: where and in what precision; ``auto`` as in ``resolve_device``/``resolve_dtype``.
        revision: hub revision (branch, tag or commit) of ``model``, or of ``config`` for a single file.
        tiny: ignore ``model`` and build the seeded tiny random model in-process.
        sdxl: the default model and the tiny model are SDXL (``family="sdxl"``).
        family: a registered model family's name (``celebbasis.families``): the default model and the
            tiny model are that family's. ``None``: SD 1.x, or SDXL with ``sdxl``.
        toy: ignore ``model`` and load the packaged toy world (cartoon people, 64 px), registered by
            ``celebbasis.toy`` as the ``PackagedModel`` ``"toy"``; its face network and training preset
            come with it (``packaged_model``).
        config: for a single file only: a diffusers folder or hub id of the same architecture, whose
            configuration (layers, scheduler, tokenizer) the file's weights are loaded into. ``None``
            uses its family's ``default_model`` (``celebbasis.families``), from the local Hugging Face cache or the Hub.

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
    if sdxl and family not in (None, "sdxl"):
        raise InputError(f"sdxl asks for SDXL but family={family} for {family_named(family).title}. Pass one of them.",
                         field="family")
    fam = family_named(family or ("sdxl" if sdxl else "sd1"))
    model = model or fam.default_model
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    if toy:
        return _load_packaged("toy", dev, dt)
    if tiny:
        from .testing import tiny_pipeline

        pipe = tiny_pipeline(family=fam.name)
        pipe.register_to_config(_name_or_path=fam.tiny_name)
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


def _load_packaged(name: str, device: torch.device, dtype: torch.dtype):
    """A registered ``PackagedModel``, loaded."""
    if name not in PACKAGED_MODELS:
        raise ModelLoadError(f"No packaged model {name!r} is registered here (registered: {', '.join(PACKAGED_MODELS) or 'none'}). "
                             "Import the plug-in that ships it first (import celebbasis does for the toy world).")
    return PACKAGED_MODELS[name].load(device, dtype)


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
    if cls not in supported_pipelines():
        raise ModelLoadError(
            f"{path} holds a {cls}, which celebbasis does not support. Pass a Stable Diffusion 1.x/2.x "
            f"or SDXL ({', '.join(supported_pipelines())})."
        )


def _load_pretrained(model: str, local: bool, dev: torch.device, dt: torch.dtype, revision: str | None):
    """``DiffusionPipeline.from_pretrained`` of a folder or hub id; offline, only the cache, and fast."""
    cache_only = not local and not hub_reachable()  # before importing diffusers: offline fails in ~2 s
    from diffusers import DiffusionPipeline

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
    try:
        family_of(pipe)
        supported = pipe.unet.config.in_channels == 4
    except ModelLoadError:
        supported = False
    if not supported:
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


def _resolve_config(config: str | None, family: str, path: Path, revision: str | None) -> str:
    """The local folder holding the family configuration for ``path``: given, cached, or fetched (configs only)."""
    from huggingface_hub import snapshot_download

    what = family_named(family).title
    given = config is not None
    if config is None:
        config = family_named(family).default_model
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
    fam = family_named(family)
    file_width = fam.single_file_width(shapes)
    if cls != fam.pipeline_class or width != file_width:
        raise ModelLoadError(
            f"{path.name} is an {fam.title} checkpoint (text encoder {file_width} wide) but --model-config {shown} "
            f"is a {cls} (text encoder {width} wide). Pass a configuration of the same architecture "
            f"(e.g. {fam.default_model})."
        )


def _load_single_file(path: Path, config: str | None, dev: torch.device, dt: torch.dtype, revision: str | None):
    """``StableDiffusion(XL)Pipeline.from_single_file`` with a local configuration and no network access."""
    if not path.is_file():
        raise ModelLoadError(f"Checkpoint file {path} does not exist. Pass an existing .safetensors file, a diffusers "
                             "folder or a hub id.")
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"{path.name}: celebbasis reads single-file checkpoints ending in "
                             f"{', '.join(SINGLE_FILE_SUFFIXES)}; pass one of those, a diffusers folder or a hub id.")
    shapes = checkpoint_shapes(path)
    family = family_of_checkpoint(path, shapes)
    config_dir = _resolve_config(config, family.name, path, revision)
    _check_config(config_dir, family.name, path, shapes, config or family.default_model)
    logger.info("Loading %s as %s with the configuration of %s.", path.name, family.title, config or family.default_model)
    try:
        pipe = family.pipeline_type().from_single_file(str(path), config=config_dir, **_dtype_kwarg(dt), local_files_only=True)
    except Exception as e:  # diffusers raises ValueError, KeyError, RuntimeError, OSError or its own error types here
        first = str(e).strip().splitlines()[0].split(". ")[0][:200] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"Cannot load {path.name} with the configuration of {config or family.default_model} "
                             f"({type(e).__name__}: {first}). Pass --model-config of the model it was fine-tuned from.") from None
    pipe.register_to_config(_name_or_path=str(path))
    return pipe.to(dev)


# -- what identities record about the model ----------------------------------------------------------

def model_metadata(pipe) -> dict[str, str]:
    """What an identity made on ``pipe`` records about it: the model's name, its text encoders and its
    family (``ModelFamily.identity_metadata``)."""
    return {"base_model": model_name(pipe), "text_encoder_signature": encoders_signature(pipe),
            **family_of(pipe).identity_metadata()}


# -- the model's celeb bases (built once and cached: basis.cached_basis) -----------------------------

def pipeline_bases(pipe, config=None, source: str | None = None) -> list:
    """The cached basis of each text encoder of ``pipe`` (``config``: a ``BasisConfig``)."""
    cfg = config or BasisConfig()
    return [cached_basis(tok, te, n_components=cfg.n_components, n_tokens=cfg.n_tokens, dedupe=cfg.dedupe,
                         source=source or model_name(pipe)) for tok, te in text_encoders(pipe)]


def resolve_bases(pipe, basis=None, basis_config=None, base_model: str | None = None) -> list:
    """The given bases (one ``CelebBasis``, or one per text encoder), checked against the pipeline's text encoders,
    or the cached ones built for it with ``basis_config``; ``base_model`` names the model in a built basis."""
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
