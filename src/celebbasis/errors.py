"""Errors that reach users. Each message names the bad input and says how to fix it.

Only ``cli.py`` turns these into exit codes; library code raises them.
"""

from __future__ import annotations


class CelebBasisError(Exception):
    """Base class for every error this package raises on purpose."""

    exit_code = 1


class InputError(CelebBasisError, ValueError):
    """A user-supplied file, name or value cannot be used (exit code 2).

    ``field`` names the setting or argument that was wrong, as the library calls it (a config field
    such as ``steps``, or an argument such as ``names`` or ``overwrite``), so that a front end can
    name its own control for it (the CLI: one table from field to flag). A message that says how
    to fix it through another setting writes it as ``field=value`` (``overwrite=True``).
    """

    exit_code = 2

    def __init__(self, message: str = "", *, field: str | None = None):
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # pickles with its field (errors cross process boundaries under accelerate)
        return (_input_error, (type(self), str(self), self.field))


def _input_error(cls, message: str, field: str | None) -> "InputError":
    return cls(message, field=field)


class NoFaceFoundError(InputError):
    """The photo contains no detectable face."""


class ModelLoadError(CelebBasisError):
    """A diffusion model could not be loaded (offline, missing folder, wrong layout)."""

    exit_code = 2


class FileFormatError(InputError):
    """A celebbasis file is not what it claims to be (not safetensors, wrong kind, wrong width)."""


class MissingDependencyError(CelebBasisError, ImportError):
    """An optional dependency is not installed."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type's name when empty), for one-line errors."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
