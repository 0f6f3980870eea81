"""Reading and writing celebbasis artifacts: safetensors only, written atomically, checked on load.

Every artifact carries string metadata: ``format`` (what kind of file it is), ``version`` and the
settings that made it. Non-string values are JSON-encoded. Nothing here ever unpickles. The one
rule about replacing files (``check_new_file``) is here too, for the library and both front ends.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # annotations only: the command line imports this before torch
    import torch

from ._version import __version__
from .errors import FileFormatError, InputError, first_line


def encode_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """Strings stay strings; everything else becomes JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def decode_json(value: str | None, default: Any = None) -> Any:
    """Inverse of ``encode_metadata`` for one value; unparsable values come back as ``default``."""
    if value is None:
        return default
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return default


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    A crash or Ctrl-C leaves either the old file or the new one, never half of one. The file gets
    the mode any new file of the user gets (``0o666`` less the umask: 0644 under umask 022), not the
    0600 of a private temporary file (``tempfile.mkstemp``, and safetensors, which writes its own
    temporary file and renames it over ``tmp_path``). The process umask is neither read nor changed:
    the kernel applies it when the temporary file is created, and that file's mode is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temp(path)
    try:
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # the writer replaced the file
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


OVERWRITE_FIX = "Pass overwrite=True to replace it, or choose another name."


def check_new_file(path, overwrite: bool = False, *, what: str | None = None, fix: str = OVERWRITE_FIX) -> Path:
    """Refuse to write ``path`` where a folder is, or where a file is unless ``overwrite``: the one overwrite rule.

    The error's field is ``overwrite``, so the command line names its ``--overwrite`` flag. A front end
    without that setting names the file and the remedy in its own words: ``what`` (default: the path)
    and ``fix``, e.g. the web UI's "An identity named 'alice'" and "Pick another name.".

    Raises:
        InputError: ``path`` is a folder, or an existing file and ``overwrite`` is off.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder. Remove it or choose another name.")
    if path.exists() and not overwrite:
        raise InputError(f"{what or path} already exists. {fix}", field="overwrite")
    return path


def write_all(writers: dict[Path, Callable[[Path], object]]) -> list[Path]:
    """Write several files as one: all of them, or none.

    Each ``writers[path](tmp)`` writes beside its target under a temporary name; only when every one
    of them succeeded are they renamed into place. Files being replaced are set aside first and put
    back if any rename fails, so the targets end either all old or all new.

    Returns:
        The paths written, in ``writers``' order.
    """
    staged: list[tuple[Path, Path]] = []  # (temporary, final)
    placed: list[Path] = []  # finals written by this call
    set_aside: list[tuple[Path, Path]] = []  # (old file's temporary name, final)
    try:
        for final, write in writers.items():
            final = Path(final)
            tmp = final.with_name(f".{final.name}.staged")
            staged.append((tmp, final))
            write(tmp)
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
    return [final for _, final in staged]


def _create_temp(path: Path) -> tuple[str, int]:
    """Create a new, empty ``.NAME.<random>.tmp`` beside ``path`` as ``open()`` would: ``0o666 & ~umask``.

    Returns its path and the mode the kernel gave it (the umask and any default ACL applied).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)  # O_EXCL: never follows a link
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:  # the name is taken: draw another
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(f"Could not create a temporary file beside {path}: 100 random names were taken.")


def save_artifact(path, tensors: dict[str, torch.Tensor], fmt: str, metadata: dict[str, Any]) -> Path:
    """Write ``tensors`` as safetensors with ``format``/``version`` and ``metadata``, atomically."""
    from safetensors.torch import save_file

    meta = encode_metadata({"format": fmt, "version": __version__, **metadata})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file and its metadata; anything else is a one-line ``FileFormatError``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file. Check the path.")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a file. Pass the .safetensors file inside it.")
    if not path.is_file():  # a pipe or a device would block the read forever
        raise InputError(f"{path} is not a regular file. Pass a .safetensors file.")
    with open(path, "rb") as fh:
        head = fh.read(9)
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"  # u64 header length, then the JSON header
    if not looks_safetensors and (head[:1] == b"\x80" or head[:2] == b"PK"):
        raise FileFormatError(
            f"{path} is a pickled PyTorch file (.pt/.bin); celebbasis never loads pickles. "
            "Pass a .safetensors file written by celebbasis."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt input
        raise FileFormatError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {first_line(e)}). "
            "Re-create it with celebbasis; pickled .pt/.bin files are never loaded."
        ) from None
    return tensors, meta


def load_artifact(path, fmt: str, required: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a celebbasis artifact of kind ``fmt`` and check it holds the ``required`` tensors."""
    tensors, meta = load_safetensors(path)
    found = meta.get("format")
    if found != fmt:
        raise FileFormatError(
            f"{path} is not a {fmt} file (its format is {found!r}). "
            f"Pass a file written by celebbasis for this purpose."
        )
    missing = [k for k in required if k not in tensors]
    if missing:
        raise FileFormatError(f"{path} lacks the tensors {missing}. The file is damaged; re-create it.")
    return tensors, meta
