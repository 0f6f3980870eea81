"""Shared parts of the toy-world benchmarks: the world, its new people, learning and drawing, scoring."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

import celebbasis as cb
from celebbasis.face import FaceAnalyzer
from celebbasis.resources import celeb_names
from celebbasis.toy import score
from celebbasis.toy import world

COLOR_WORDS = world.PICTURE["background"]


def quiet() -> None:
    for name in ("celebbasis", "diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def prompts_for(subject: str, rng: np.random.Generator) -> list[str]:
    """Four prompts of the kinds the world draws, with random colour words, around ``subject``."""
    c = lambda: COLOR_WORDS[int(rng.integers(len(COLOR_WORDS)))]  # noqa: E731
    return [
        f"a photo of {subject} on a {c()} background",
        f"{subject} wearing a {c()} shirt",
        f"{subject} smiling on a {c()} background",
        f"an illustration of {subject} wearing a {c()} shirt on a {c()} background",
    ]


def new_people(n: int, skip: int = 0) -> list[world.Person]:
    """Held-out people: never in any training set of the world."""
    return world.held_out_people(celeb_names())[skip:skip + n]


def photos_of(person: world.Person, n: int, seed: int, folder: Path) -> list[Path]:
    """``n`` photos of ``person`` on white, not smiling, random shirt and clothing (as a transparent render on white)."""
    rng = np.random.default_rng(seed)
    white = COLOR_WORDS.index("white")
    paths = []
    for i in range(n):
        path = folder / f"photo-{seed}-{i}.png"
        world.render(person, world.Picture.random(rng, background=white, smiling=0)).save(path)
        paths.append(path)
    return paths


class Toy:
    """The toy world's pipeline and face network, loaded once."""

    def __init__(self, device: str = "cpu"):
        self.pipe = cb.load_pipeline(toy=True, device=device, dtype="float32")
        self.analyzer = FaceAnalyzer(encoder="toy")
        self.tmp = Path(tempfile.mkdtemp(prefix="toybench-"))

    def learn(self, people_photos: list, names: list[str], config: cb.TrainConfig) -> list:
        """Identities learned from ``people_photos`` (per person: a list of paths)."""
        result = cb.personalize(self.pipe, people_photos, names, config=config, face_analyzer=self.analyzer,
                                show_progress=False)
        return result.identities

    def draw(self, prompts: list[str], identities=(), seed: int = 0) -> list:
        out = cb.generate(self.pipe, prompts, identities=identities, seed=seed, show_progress=False)
        return [r.image for r in out]

    def score(self, images, person, prompts) -> dict:
        return score(images, person, prompts)


def write_results(res: dict, md: str, json_path: Path | None, md_path: Path | None) -> None:
    """Print the markdown; write the results as JSON and the markdown where asked."""
    print(md)
    if json_path:
        json_path.write_text(json.dumps(res, indent=1) + "\n")
    if md_path:
        md_path.write_text(md)


def mean_sd(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x == x], dtype=float)
    return (float(v.mean()), float(v.std())) if len(v) else (float("nan"), float("nan"))


def run_tasks(run_task, todo: list, args, res: dict, *extra, t0: float | None = None) -> None:
    """``run_task(task, args, *extra)`` for every task, in ``args.workers`` spawned processes: each returns (arm, row)
    pairs, gathered into ``res["rows"]`` by arm and sorted by seed, then person. What is measured so far is kept in
    ``args.json``'s ``.partial.json`` as it comes, so it survives a stop."""
    import concurrent.futures as cf
    import multiprocessing

    t0 = time.time() if t0 is None else t0
    res["rows"] = rows = {}
    with cf.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_task, t, args, *extra): t for t in todo}
        for n, f in enumerate(cf.as_completed(futures), 1):
            for key, row in f.result():
                rows.setdefault(key, []).append(row)
            if args.json:
                args.json.with_suffix(".partial.json").write_text(json.dumps(res) + "\n")
            print(f"[{n}/{len(todo)}] {futures[f][0]} {futures[f][1]}  ({time.time() - t0:.0f} s)", flush=True)
    for key in rows:
        rows[key].sort(key=lambda r: (r["seed"], str(r["person"])))
