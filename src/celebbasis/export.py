"""Identities everywhere SD runs: standard textual-inversion files out, any TI file in.

Export layouts (safetensors, ``metadata={"format": "pt"}`` plus the token, base model and
``modelspec.*`` keys):

- ``diffusers``: ``{"<alice>": (K, d)}``; ``pipe.load_textual_inversion(FILE)`` needs no arguments.
- ``a1111`` / ``comfyui``: ``{"emb_params": (K, d)}``; the file name is the trigger word.
  ``pt=True`` writes A1111's classic ``.pt`` dict instead (tensors, strings and ints only, so it
  loads with ``torch.load(weights_only=True)``), in torch's legacy non-zip serialization: A1111's
  safe unpickler (``modules/safe.py``) refuses the zip archives current torch writes, whose
  ``.format_version``, ``byteorder``, ... entries are not on its allow-list.
- a family with several text encoders, every format: one key per encoder (``ModelFamily.export_keys``);
  SDXL: ``{"clip_l": (K, 768), "clip_g": (K, 1280)}``.

Import reads any of these (and ``string_to_param`` ``.pt`` files through ``weights_only=True``) and
projects the vectors onto the celeb basis (least squares), so old embeddings join identity prompts.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ._version import __version__
from .config import EXPORT_FORMATS
from .errors import FileFormatError, InputError
from .families import export_families
from .files import atomic_write, check_new_file, load_safetensors
from .identity import Identity, check_name
from .models import model_metadata

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportFormat:
    """One tool's textual-inversion layout: what a single-encoder file's tensor is keyed by, the word a
    prompt uses, and where the tool looks. A new format is one entry in ``EXPORTERS`` and its name in
    ``config.EXPORT_FORMATS`` (a test checks that the two agree)."""

    keyed_by_token: bool  # single text encoder: {token: (K, d)} (diffusers) or {"emb_params": (K, d)} (A1111 layout)
    prompt_prefix: str | None  # None: prompts use the identity's token; else this + the file's stem
    folder: str = ""  # where the tool reads embeddings from

    def trigger(self, identity: Identity, stem: str) -> str:
        """The word a prompt uses to call the export."""
        return identity.token if self.prompt_prefix is None else f"{self.prompt_prefix}{stem}"

    def usage(self, identity: Identity, path: Path) -> str:
        """One line on how to use the written file."""
        if self.prompt_prefix is None:
            return f'pipe.load_textual_inversion("{path}"), then "{identity.token} person ..." in prompts'
        where = "use" if path.parent.name == "embeddings" else f"copy it into {self.folder}, then"  # in the tool's folder
        return f'{where} "{self.trigger(identity, path.stem)} person ..." in prompts'


EXPORTERS: dict[str, ExportFormat] = {
    "diffusers": ExportFormat(keyed_by_token=True, prompt_prefix=None),
    "a1111": ExportFormat(keyed_by_token=False, prompt_prefix="", folder="stable-diffusion-webui/embeddings/"),
    "comfyui": ExportFormat(keyed_by_token=False, prompt_prefix="embedding:", folder="ComfyUI/models/embeddings/"),
}


def architecture(identity: Identity) -> str:
    """``modelspec.architecture`` of an identity's embedding (its family's)."""
    return f"{identity.family.modelspec_architecture(identity.embedding_dim)}/textual-inversion"


def export_tensors(identity: Identity, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors of an export in layout ``fmt`` (see the module docstring)."""
    if fmt not in EXPORTERS:
        raise InputError(f"Unknown export format {fmt!r}. Choose one of: {', '.join(EXPORT_FORMATS)}.", field="format")
    parts = identity.parts
    if len(parts) > 1:
        keys = identity.family.export_keys
        if len(keys) != len(parts):
            raise InputError(f"The {identity.family.title} family names no export key for each of its {len(parts)} text "
                             "encoders (ModelFamily.export_keys); its identities cannot be exported.")
        return {key: emb.float().contiguous() for key, (_, emb) in zip(keys, parts)}
    key = identity.token if EXPORTERS[fmt].keyed_by_token else "emb_params"
    return {key: identity.embeddings.float().contiguous()}


def export_identity(identity: Identity | str | Path, fmt: str = "diffusers", path=None, *, pt: bool = False,
                    overwrite: bool = False) -> Path:
    """Write an identity as a standard textual-inversion file.

    Args:
        identity: an ``Identity`` or an identity file.
        fmt: ``diffusers``, ``a1111`` or ``comfyui``.
        path: output file, or a folder (then ``NAME.safetensors`` / ``NAME.pt`` inside it): an
            existing folder, a path without a suffix, or a string ending in ``/``; missing folders
            are created. ``None`` means the current folder.
        pt: A1111's classic ``.pt`` layout instead of safetensors (SD 1.x/2.x only).
        overwrite: replace an existing file.

    Returns:
        The written path.

    Example:
        >>> export_identity("identities/alice.safetensors", "diffusers", "exports/")
        PosixPath('exports/alice.safetensors')
        >>> pipe.load_textual_inversion("exports/alice.safetensors")  # then "<alice> person ..." works
    """
    from safetensors.torch import save_file

    source = None if isinstance(identity, Identity) else Path(identity)
    if source is not None:
        identity = Identity.load(source)
    tensors = export_tensors(identity, fmt)
    if pt and (fmt == "diffusers" or len(identity.parts) > 1):
        raise InputError("A1111's classic .pt layout holds one SD 1.x/2.x embedding: use it with the a1111 or comfyui format on a non-SDXL identity.",
                         field="pt")
    path = export_path(identity, path, pt)
    if source is not None and path.exists() and path.resolve() == source.resolve():
        raise InputError(f"{path} is the identity being exported. Pass another path (e.g. exports/).", field="path")
    check_new_file(path, overwrite)
    base = str(identity.metadata.get("base_model", ""))
    if pt:
        emb = tensors["emb_params"].clone()  # its own storage: torch.save writes whole storages
        data = {"string_to_token": {"*": 265}, "string_to_param": {"*": emb}, "name": path.stem,
                "step": int(identity.metadata.get("steps", 0) or 0), "sd_checkpoint": None, "sd_checkpoint_name": base}
        atomic_write(path, lambda tmp: save_a1111_pt(data, tmp))
    else:
        meta = export_metadata(identity, fmt, path.stem)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def export_path(identity: Identity, path, pt: bool) -> Path:
    """The file an export goes to: ``path`` itself, or ``NAME.safetensors``/``NAME.pt`` in the folder ``path``."""
    suffix = ".pt" if pt else ".safetensors"
    folder = path is None or (isinstance(path, str) and path.endswith(("/", os.sep)))
    path = Path(path) if path is not None else Path(".")
    if folder or path.is_dir() or path.suffix == "":
        return path / f"{identity.name}{suffix}"
    if path.suffix != suffix:
        raise InputError(f"{path}: a {'.pt' if pt else 'safetensors'} export needs a {suffix} file name"
                         f"{'' if pt else ' (or ask for the .pt layout)'}.")
    return path


def export_metadata(identity: Identity, fmt: str, stem: str) -> dict[str, str]:
    """safetensors metadata of an export: ``format``, the trigger word, base model and ``modelspec.*`` keys."""
    trigger = identity.token if EXPORTERS[fmt].prompt_prefix is None else stem  # the word, without the tool's prefix
    return {
        "format": "pt",
        "token": trigger,
        "base_model": str(identity.metadata.get("base_model", "")),
        "celebbasis.version": __version__,
        "celebbasis.kind": "textual-inversion",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture(identity),
        "modelspec.implementation": "celebbasis",
        "modelspec.title": identity.name,
        "modelspec.trigger_phrase": EXPORTERS[fmt].trigger(identity, stem),
        "modelspec.date": _dt.date.today().isoformat(),
    }


def save_a1111_pt(data: dict, path) -> None:
    """``torch.save`` in the legacy (pre-1.6, non-zip) format, which A1111's safe unpickler accepts.

    A1111 checks every ``.pt`` before loading it: a zip archive may only hold ``*/data.pkl``,
    ``*/version`` and ``*/data/<n>`` (current torch adds ``.format_version``, ``.storage_alignment``,
    ``byteorder`` and ``.data/serialization_id``, so A1111 reports "bad file inside" and skips the
    embedding); a non-zip file is unpickled with an allow-list of globals, which a dict of strings,
    ints, ``None`` and float tensors passes. ``torch.load(weights_only=True)`` reads both formats.
    """
    torch.save(data, path, _use_new_zipfile_serialization=False)


def read_embedding_file(path) -> dict[str, torch.Tensor]:
    """Read a textual-inversion file of any common layout into ``{"": (K, d)}``, or one entry per text encoder
    under a family's ``export_keys`` (SDXL: ``{"clip_l", "clip_g"}``), in the family's order.

    ``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)``: tensors and plain data
    only, never arbitrary objects.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file. Pass a textual-inversion .safetensors or .pt file.")
    if path.suffix.lower() in (".pt", ".bin", ".ckpt", ".pth"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise FileFormatError(
                f"{path} could not be read as a plain PyTorch file ({type(e).__name__}); only tensors and plain data "
                "are loaded (weights_only=True). Convert it to safetensors."
            ) from None
    else:
        data, _ = load_safetensors(path)
    if isinstance(data, torch.Tensor):
        data = {"": data}
    if not isinstance(data, dict):
        raise FileFormatError(f"{path} holds a {type(data).__name__}, not a textual-inversion dict.")
    multi = next((f.export_keys for f in reversed(export_families()) if all(k in data for k in f.export_keys)), None)
    if multi is not None:
        out = {k: data[k] for k in multi}
    elif "string_to_param" in data and isinstance(data["string_to_param"], dict) and data["string_to_param"]:
        out = {"": next(iter(data["string_to_param"].values()))}
    elif "emb_params" in data:
        out = {"": data["emb_params"]}
    elif len(data) == 1:
        out = {"": next(iter(data.values()))}
    else:
        raise FileFormatError(
            f"{path} is not a textual-inversion file: expected one tensor, 'emb_params', 'string_to_param' or "
            f"{' or '.join('+'.join(map(repr, f.export_keys)) for f in export_families())}, found keys {sorted(map(str, data))[:6]}."
        )
    for k, v in out.items():
        if not isinstance(v, torch.Tensor) or v.ndim not in (1, 2) or not v.is_floating_point():
            raise FileFormatError(f"{path}: the embedding {k or 'tensor'} is not a float (K, d) tensor.")
        out[k] = v.detach().float().reshape(-1, v.shape[-1])
    return out


def import_embedding(path, name: str, bases, *, base_model: str = "", pipe=None) -> tuple[Identity, list[float]]:
    """Turn a textual-inversion file into an identity by least-squares projection onto the basis.

    Args:
        path: a TI file (see ``read_embedding_file``).
        name: the person's name; the token is ``<name>``.
        bases: the ``CelebBasis`` of the target model (a list, one per text encoder: two for SDXL).
        base_model: recorded in the identity.
        pipe: the pipeline of ``bases``; when given, its model and text encoders are recorded too.

    Returns:
        The identity (its embeddings are the projections) and, per text encoder, the relative
        residual ``||e - proj(e)|| / ||e - mean||``: 0 when the vectors lie in the basis.
    """
    name = check_name(name)
    bases = list(bases) if isinstance(bases, (list, tuple)) else [bases]
    found = read_embedding_file(path)
    vectors = list(found.values())
    family = next((f for f in reversed(export_families()) if f.export_keys == tuple(found)), None)
    if len(vectors) != len(bases):
        kind = f"{family.title} ({' + '.join(found)})" if family is not None else "SD 1.x/2.x (one encoder)"
        raise FileFormatError(f"{path} is a {kind} embedding but the model has {len(bases)} text encoder(s).")
    coeffs, residuals = [], []
    for v, b in zip(vectors, bases):
        if v.shape[1] != b.embedding_dim:
            raise FileFormatError(f"{path} holds {v.shape[1]}-wide vectors but the model's text encoder is {b.embedding_dim} wide.")
        c = b.project(v)  # (K', n)
        recon = b.reconstruct(c)
        slots = torch.arange(v.shape[0]).clamp(max=b.n_tokens - 1)
        centred = (v - b.mean[slots]).norm()
        residuals.append(float((v - recon).norm() / centred.clamp_min(1e-12)))
        coeffs.append(c)
    recorded = model_metadata(pipe) if pipe is not None else family.identity_metadata() if family is not None else {}
    identity = Identity.from_coefficients(f"<{name}>", coeffs, bases, **{"base_model": base_model, **recorded},
                                          face_encoder="imported", source_photo=Path(path).name,
                                          import_residual=[round(r, 6) for r in residuals])
    return identity, residuals
