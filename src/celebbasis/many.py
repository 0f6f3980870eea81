"""Learning many people from a folder: grouping, resume, sharding across processes (``add-many``).

A photo in the folder is one person named after the file (``Ann Lee.jpg`` -> ``<Ann_Lee>``); a
subfolder is one person with several photos, named after the folder. People are trained in groups
that share one identity network (two, as the paper does). People who already have an identity in
the output folder are skipped, so a run that stopped resumes. Under ``accelerate launch`` (or
torchrun) each process takes every N-th group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import GROUP_SIZE, BasisConfig, TrainConfig
from .errors import InputError
from .face import photos_in
from .identity import name_from_filename
from .train import default_analyzer, default_config, personalize

logger = logging.getLogger(__name__)


@dataclass
class Person:
    """One person to learn: a name and one or more photos."""

    name: str
    photos: list[Path]


@dataclass
class AddManyResult:
    """What ``add_many`` did in this process."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # names that already had an identity
    failed: list[str] = field(default_factory=list)  # one-line reasons, naming the photo (unreadable images too)


def unreadable_images(folder) -> list[Path]:
    """Files in ``folder`` and its subfolders (one level, as ``people_in`` reads them) named as images but that
    Pillow cannot open: corrupt or truncated at the header. ``people_in`` leaves them out; ``add_many`` reports them."""
    from PIL import Image

    suffixes = set(Image.registered_extensions())
    folder = Path(folder)
    folders = [folder] + sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    out = []
    for d in folders:
        readable = set(photos_in(d))
        out += [p for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".")
                and p.suffix.lower() in suffixes and p not in readable]
    return out


def people_in(folder) -> list[Person]:
    """Every person in ``folder``: a photo is a person, a subfolder of photos is one person.

    Names come from file or folder names and are made unique with ``_2``, ``_3``, ...
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder. Pass a folder of face photos (or of one subfolder per person).")
    entries = [(p.stem, [p]) for p in photos_in(folder)]
    entries += [(d.name, photos_in(d)) for d in sorted(folder.iterdir()) if d.is_dir() and photos_in(d)]
    if not entries:
        raise InputError(f"{folder} holds no images (nor subfolders of them). Pass a folder with one photo or subfolder per person.")
    people, seen = [], set()
    for stem, photos in sorted(entries, key=lambda e: e[0]):
        base = name = name_from_filename(stem)
        k = 2
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        people.append(Person(name, photos))
    return people


def shard() -> tuple[int, int, str | None]:
    """(this process's index, number of processes, its device) under accelerate/torchrun; (0, 1, None) alone."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only machines join through gloo
    return state.process_index, state.num_processes, str(state.device)


def add_many(load_pipe: Callable[[str | None], object], folder, out_dir, *, config: TrainConfig | None = None,
             bases=None, basis_config: BasisConfig | None = None, group_size: int = GROUP_SIZE, overwrite: bool = False,
             analyzer=None, face_index: int | None = None, process: tuple[int, int] | None = None,
             show_progress: bool = True) -> AddManyResult:
    """Learn everyone in ``folder`` into ``out_dir``: resumable, in groups, sharded across processes.

    Args:
        load_pipe: called once, only if this process has work, with the device this process should
            use (``None``: the caller's choice); returns the diffusers pipeline.
        folder: photos (one person each) and/or subfolders (one person with several photos).
        out_dir: where ``NAME.safetensors`` and ``NAME.run.json`` are written.
        config: training settings (default: the model's, ``train.default_config``); steps are per group.
        bases, basis_config: as in ``personalize``.
        group_size: people trained jointly, sharing one network (2, as the paper).
        overwrite: learn again people who already have an identity.
        analyzer: the ``FaceAnalyzer`` (default: the model's, ``train.default_analyzer``: dlib's, or the toy world's).
        face_index: which face to use in photos with several (0 = largest).
        process: (index, count) of this process; ``None`` asks accelerate.
        show_progress: one bar over every training step of this process.

    Returns:
        ``AddManyResult``: files written, people skipped, photos that failed (with the reason).
    """
    from tqdm.auto import tqdm

    if group_size < 1:
        raise InputError(f"group_size must be >= 1, got {group_size}.")
    out_dir = Path(out_dir)
    people = people_in(folder)
    result = AddManyResult()
    for p in unreadable_images(folder):
        result.failed.append(f"{p} is not a readable image (corrupt, or not the format its name says). Replace or remove it.")
        logger.warning("Skipping %s: not a readable image.", p)
    todo = []
    for person in people:
        if not overwrite and (out_dir / f"{person.name}.safetensors").exists():
            result.skipped.append(person.name)
        else:
            todo.append(person)
    if result.skipped:
        logger.info("%d of %d people already have an identity in %s; skipping them.", len(result.skipped), len(people), out_dir)
    groups = [todo[i : i + group_size] for i in range(0, len(todo), group_size)]
    index, count, device = shard() if process is None else (*process, None)
    mine = groups[index::count]
    if count > 1:
        logger.info("Process %d of %d: %d of %d groups.", index + 1, count, len(mine), len(groups))
    if not mine:
        return result
    pipe = load_pipe(device)
    config, analyzer = config or default_config(pipe), analyzer or default_analyzer(pipe)  # the model's own, or the paper's
    total = sum(config.total_steps(len(g)) for g in mine)
    bar = tqdm(total=total, desc="add-many", unit="step", disable=not show_progress or index != 0)
    try:
        for group in mine:
            ready = _analyse(group, analyzer, face_index, result)
            if not ready:
                bar.update(config.total_steps(len(group)))
                continue
            skipped_steps = config.total_steps(len(group)) - config.total_steps(len(ready))
            learned = personalize(pipe, [photos for _, photos in ready], [p.name for p, _ in ready], config=config,
                                  basis=bases, basis_config=basis_config, face_analyzer=analyzer, show_progress=False,
                                  callback=lambda step, n, loss: bar.update(1))
            result.written += learned.save(out_dir, overwrite=overwrite)
            bar.update(skipped_steps)
    finally:
        bar.close()
    return result


def _analyse(group: list[Person], analyzer, face_index, result: AddManyResult) -> list[tuple[Person, list]]:
    """Each person's face analyses; people with an unusable photo are reported in ``result`` and left out."""
    ready = []
    for person in group:
        try:
            ready.append((person, [analyzer(p, face_index=face_index) for p in person.photos]))
        except InputError as e:
            result.failed.append(str(e))
            logger.warning("Skipping %s: %s", person.name, e)
    return ready
