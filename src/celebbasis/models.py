"""The one place that loads diffusion models (hub id or local diffusers folder), devices and dtypes."""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
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


# -- text encoders and their fingerprints ---------------------------------------------------------

def text_encoders(pipe) -> list[tuple]:
    """(tokenizer, text_encoder) pairs of a pipeline: one for SD 1.x/2.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


SIGNATURE_DIRECTIONS = 16  # random directions the table is summarised along
SIGNATURE_RTOL = 1e-4  # relative to the signature's largest entry; fp32/fp16/bf16 copies differ by ~1e-6
_signatures: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def table_signature(tokenizer, text_encoder, chunk: int = 4096) -> list[float]:
    """A dtype-independent summary of the base vocabulary's token-embedding rows: 2 x 16 numbers.

    The table's mean and root-mean-square along 16 fixed random unit directions, accumulated in
    float64 a chunk of rows at a time. float32, float16 and bfloat16 copies of one model give the
    same numbers to ~1e-6 (rounding errors average out over ~50,000 rows), different models differ
    in every entry, so two signatures are compared with ``same_signature`` rather than for equality.
    Computed once per text encoder and remembered (the rows it sampled are checked on reuse).
    """
    weight = text_encoder.get_input_embeddings().weight.detach()
    rows = tokenizer.vocab_size
    probe = weight[:8].to("cpu", torch.float64).clone()
    cached = _signatures.get(text_encoder)
    if cached is not None and cached[0] == rows and torch.equal(cached[1], probe):
        return cached[2]
    d = weight.shape[1]
    directions = torch.randn(d, SIGNATURE_DIRECTIONS, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)  # (d, 16) unit columns
    first = torch.zeros(SIGNATURE_DIRECTIONS, dtype=torch.float64)
    second = torch.zeros(SIGNATURE_DIRECTIONS, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, rows, chunk):
            proj = weight[start:min(rows, start + chunk)].to("cpu", torch.float64) @ directions  # (chunk, 16)
            first += proj.sum(0)
            second += (proj * proj).sum(0)
    signature = [float(x) for x in torch.cat([first / rows, (second / rows).sqrt()])]
    _signatures[text_encoder] = (rows, probe, signature)
    return signature


def same_signature(a, b) -> bool:
    """Whether two ``table_signature`` results come from the same token table (any dtype)."""
    a, b = list(a or []), list(b or [])
    if not a or len(a) != len(b):
        return False
    scale = max(abs(x) for x in a + b) or 1.0
    return max(abs(x - y) for x, y in zip(a, b)) <= SIGNATURE_RTOL * scale


def format_signature(signature) -> str:
    """Metadata form of a signature: comma-separated, 9 significant digits."""
    return ",".join(f"{x:.9g}" for x in signature)


def parse_signature(text: str | None) -> list[float] | None:
    try:
        return [float(x) for x in text.split(",")] if text else None
    except ValueError:
        return None


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

def cached_basis(tokenizer, text_encoder, names: list[str] | None = None, *, n_components: int = 512, n_tokens: int = 2,
                 dedupe: bool = False, source: str = ""):
    """``build_basis``, read from or written to the cache (``basis.cache_dir()``).

    A cached basis is reused when its names and settings are the same and its recorded table
    signature matches this text encoder's (``same_signature``), so float32, float16 and bfloat16
    copies of one model share one entry.
    """
    from .basis import CelebBasis, build_basis, cache_dir, embedding_fingerprint
    from .resources import celeb_names, normalize_names

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
    from .config import BasisConfig

    cfg = config or BasisConfig()
    return [cached_basis(tok, te, n_components=cfg.n_components, n_tokens=cfg.n_tokens, dedupe=cfg.dedupe,
                         source=source or model_name(pipe)) for tok, te in text_encoders(pipe)]
