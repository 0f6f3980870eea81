"""What the command line checks in milliseconds, before it imports torch or touches a model or a face.

A missing photo, identity or model folder is one line within a fraction of a second, instead of
after seconds of imports and minutes of face detection. These are checks of names only (does the
path exist, is it a file or a folder, do two flags contradict each other); what a file holds is
checked by the library when it reads it, which stays the rule for Python callers.

Nothing here imports torch, diffusers or the model code.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError, ModelLoadError

# The suffixes of single-file checkpoints, as ``celebbasis.models.SINGLE_FILE_SUFFIXES`` (a test keeps them equal).
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _file(path, what: str, fix: str) -> None:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{path}: no such file. {fix}")
    if p.is_dir():
        raise InputError(f"{path} is a folder, not {what}. {fix}")


def _file_or_folder(path, fix: str) -> None:
    if not Path(path).expanduser().exists():
        raise InputError(f"{path}: no such file or folder. {fix}")


def _folder(path, fix: str) -> None:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{path}: no such folder. {fix}")
    if not p.is_dir():
        raise InputError(f"{path} is a file, not a folder. {fix}")


def _looks_local(model: str) -> bool:
    """A model named as a path rather than a hub id (``owner/name``), as ``celebbasis.models.looks_like_path`` tells them."""
    return (model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
            or Path(model).suffix.lower() in CHECKPOINT_SUFFIXES)


MODEL_CHOICE = ("model", "tiny", "toy")  # the flags that each name the model a command runs


def command_line_model_wins(args, given: set[str]) -> None:
    """A model named on the command line replaces one a ``--config`` file named (``tiny = true`` and ``--toy``: the toy)."""
    if any(name in given for name in MODEL_CHOICE):
        for name in MODEL_CHOICE:
            if name not in given and getattr(args, name, None):
                setattr(args, name, None if name == "model" else False)


def check_model_flags(args) -> None:
    """``--toy`` with ``--tiny`` or ``--sdxl`` contradicts itself; a ``--model`` path must exist and hold a model."""
    if getattr(args, "toy", False) and (getattr(args, "tiny", False) or getattr(args, "sdxl", False)):
        other = "--tiny" if args.tiny else "--sdxl"
        raise InputError(f"--toy and {other} are two different models. Pass one of them.")
    model = getattr(args, "model", None)
    if model and not (args.tiny or args.toy):
        path = Path(model).expanduser()
        if path.is_dir() and not (path / "model_index.json").is_file():
            raise ModelLoadError(f"--model {model} is not a diffusers model folder (no model_index.json). Pass a diffusers "
                                 "model folder, a single-file checkpoint (.safetensors) or a hub id.")
        if not path.exists() and _looks_local(model):
            raise ModelLoadError(f"--model {model} does not exist. Pass a diffusers model folder, a single-file "
                                 "checkpoint (.safetensors) or a hub id.")
    config = getattr(args, "model_config", None)
    if config and _looks_local(config) and not Path(config).expanduser().exists():
        raise ModelLoadError(f"--model-config {config}: no such folder. Pass a diffusers folder or a hub id of the same "
                             "architecture.")


def _face_spec_file(spec: str | None, flag: str) -> None:
    """``arcface:PATH`` and ``onnx:PATH`` name a weights file that must exist."""
    kind, _, path = (spec or "").partition(":")
    if path:
        _file(path, "a weights file", f"Pass {flag} {kind}:PATH with the network's weights file.")


def _photos(paths) -> None:
    for p in paths or []:
        _file_or_folder(p, "Check the path to the photo (or folder of photos).")


def _identities(paths) -> None:
    for p in paths or []:
        _file(p, "an identity file", "Pass an identity file (NAME.safetensors, written by `celebbasis add`).")


def _bases(paths) -> None:
    for p in paths or []:
        _file(p, "a basis file", "Pass a basis file written by `celebbasis build-basis`, or leave --basis out.")


def _references(specs) -> None:
    for spec in specs or []:
        name, eq, path = spec.partition("=")
        _file_or_folder(path if eq else spec, "Pass --reference [NAME=]PHOTO_OR_FOLDER with a photo or folder of the person.")


def check_inputs(args) -> None:
    """Every path the command names exists (and is a file or folder as it should be); model flags agree.

    Raises:
        InputError, ModelLoadError: one line naming the flag or file and the fix.
    """
    command = args.command
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}. Leave it out to let celebbasis choose.")
    if hasattr(args, "model"):
        check_model_flags(args)
    _face_spec_file(getattr(args, "face_encoder", None), "--face-encoder")
    _bases(getattr(args, "basis", None))
    if command == "add":
        _photos(args.photos)
    elif command == "demo":
        for p in args.photo or []:
            _file(p, "a photo", "Pass --photo with a photo file.")
    elif command == "add-many":
        _folder(args.faces, "Pass a folder of face photos (or of one subfolder per person).")
    elif command in ("generate", "mix"):
        _identities(args.identity if command == "generate" else args.identities)
        if command == "generate" and args.prompts_file:
            _file(args.prompts_file, "a prompts file", "Pass a text file with one prompt a line.")
    elif command == "export":
        _identities([args.identity])
    elif command == "import-embedding":
        _file(args.embedding, "an embedding file", "Pass a textual-inversion .safetensors or .pt file.")
    elif command == "build-basis" and args.names:
        _file(args.names, "a names file", "Pass a text file with one name a line.")
    elif command == "evaluate":
        _folder(args.images, "Pass the folder of generated images.")
        _references(args.reference)
        _identities(args.identity)
        _face_spec_file(args.eval_encoder, "--eval-encoder")
        if args.prompts:
            _file(args.prompts, "a prompts file", "Pass a text file with one prompt a line, or leave --prompts out.")
