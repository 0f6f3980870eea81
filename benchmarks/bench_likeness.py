"""Likeness in the toy world: the paper's claims and every open recipe choice, measured.

New people of the toy world (held out of all its training), one photo each, learned and drawn in
four prompts each; each drawing is scored for likeness (the scorer's six identity attributes read
right; and the face network's cosine to the person's other renders) and prompt fidelity (the
prompts' colour words and smiles read right).

Arms (``--people`` people x ``--seeds`` seeds for the recipe and twice the rate; textual inversion
``--ti-seeds``, the correlated pairs ``--pair-seeds``; the other decisions at seed 0 over every person;
arms are compared person by person and seed by seed):
  celebrities             their names, drawn alike (the ceiling)
  no identity             ``a person`` (the floor for likeness, the reference for fidelity)
  recipe                  the default recipe (toy preset), snapshots at 25, 50, 100, 200, 400 steps
  textual inversion       diffusers' recipe (2 free vectors from ``person``, lr 5e-4 x batch), same views and steps
  renormalised average    the recipe's moving average re-normalised to unit rows (the default saves it as it is)
  fresh views             the recipe with a new view every step (``views=0``) instead of the pool of 64, 400 steps
  batch 4, lr scaled/kept the learning rate scaled with the batch (the default, as the official code) or kept at 1e-2
  twice the rate          batch 2 at twice the default rate (2e-2)
  128-d faces, lift on/off the face vectors cut to 128 numbers (as dlib's), lifted to 512 or not
  several photos          three photos of the person instead of one
  pairs                   two people trained jointly: face vectors as they are, made to sit at cosine ~0.89
                          (a shared component added, as dlib's do), and with that, centred on the pair's mean

    python benchmarks/bench_likeness.py --quick        # a smaller check: 4 people, 1 seed (~5 min)
    python benchmarks/bench_likeness.py --json benchmarks/likeness.json --markdown likeness.md --plots docs/

The committed results (benchmarks/README.md) are the second line's, on these 2 cores."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from _toy import Toy, mean_sd, new_people, photos_of, prompts_for, quiet, run_tasks, write_results  # noqa: E402

import celebbasis as cb  # noqa: E402
from celebbasis.face import FaceAnalyzer, WholeImageDetector  # noqa: E402
from celebbasis.identity import Identity, IdentityPart  # noqa: E402
from celebbasis.resources import celeb_names  # noqa: E402
from celebbasis.toy import ToyFaceEncoder, world, world_info  # noqa: E402
from celebbasis.train import Personalizer  # noqa: E402
from celebbasis.models import resolve_bases  # noqa: E402

SNAPSHOTS = [25, 50, 100, 200, 400]  # --snapshots: steps at which the recipe and textual inversion are drawn
DECIDE_AT = 100  # --decide-at: the goal's step budget, where the decisions that cost a run each are made
SHARED = 2.85  # size of the shared component: different people's vectors then sit at cosine ~0.89


# -- face networks for the decisions ----------------------------------------------------------------
class Toy128(ToyFaceEncoder):
    """The toy face network cut to 128 numbers (a fixed orthonormal projection), as dlib's vectors."""

    name, embedding_dim = "toy-128", 128
    _proj = torch.linalg.qr(torch.randn(512, 128, generator=torch.Generator().manual_seed(128)))[0]

    def embed_many(self, images) -> np.ndarray:
        f = torch.from_numpy(super().embed_many(images)) @ self._proj
        return F.normalize(f, dim=-1).numpy()


class Correlated(ToyFaceEncoder):
    """The toy face network plus one shared direction: different people sit at cosine ~0.89, as dlib's do."""

    name = "toy-correlated"
    _u = F.normalize(torch.randn(512, generator=torch.Generator().manual_seed(89)), dim=0)

    def embed_many(self, images) -> np.ndarray:
        f = torch.from_numpy(super().embed_many(images)) + SHARED * self._u
        return F.normalize(f, dim=-1).numpy()


# -- trainers ----------------------------------------------------------------------------------------
class Centred(Personalizer):
    """Joint training with each face vector centred on the mean of the jointly trained people's."""

    def coefficients(self, batch=None):
        faces = self.person_faces() if batch is None else batch["faces"]
        centre = self.person_faces().mean(0)
        faces = F.normalize(faces - centre, dim=-1)
        return [head(faces.to(head.linear.weight.device)) for head in self.heads]


class TextualInversion(Personalizer):
    """diffusers' textual inversion on the same views and captions: K free vectors per person, started at ``person``."""

    def _heads(self):
        params = []
        for tok, te in self.encoders:
            start = te.get_input_embeddings().weight[tok.convert_tokens_to_ids("person</w>")].detach().float()
            params.append(nn.Parameter(start.repeat(self.n_id, self.k, 1).clone()))  # (n_id, K, d)
        return nn.ParameterList(params)

    def coefficients(self, batch=None):
        return list(self.heads)

    def conditioning(self, captions, who, coeffs):
        from contextlib import ExitStack

        from celebbasis.insert import token_override

        person = F.one_hot(torch.tensor(who), self.n_id).float()
        with ExitStack() as stack:
            for (_, te), ids, emb in zip(self.encoders, self.token_ids, coeffs):
                rows = person.to(emb)[:, :, None, None] * emb[None]  # (B, n_id, K, d)
                stack.enter_context(token_override(te.get_input_embeddings(), ids))["rows"] = rows.flatten(1, 2)
            return self.family.conditioning(self.pipe, captions, self.cfg.resolution)

    def step(self, batch=None):
        batch = self.sample_batch() if batch is None else batch
        loss = self.loss(batch, self.coefficients(batch))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.steps_done += 1
        self.losses.append(loss.item())
        return self.losses[-1]

    def identities(self):
        return [Identity(tok, [IdentityPart(torch.zeros(self.k, 1), self.heads[0][i].detach().float().clone())],
                         {"base_model": self.base_model})
                for i, tok in enumerate(self.tokens)]


# -- learning and drawing ----------------------------------------------------------------------------
class Bench:
    def __init__(self, toy: Toy, sample_steps: int):
        self.toy, self.sample_steps = toy, sample_steps
        self.bases = resolve_bases(toy.pipe, None, None, "toy")
        self.analyzers = {cls: FaceAnalyzer(WholeImageDetector(), cls()) for cls in (ToyFaceEncoder, Toy128, Correlated)}
        self.facenet = self.analyzers[ToyFaceEncoder].encoder
        self.count = 0

    def learn(self, photos: list[list[Path]], config: cb.TrainConfig, snapshots=(), *, trainer=Personalizer,
              encoder=ToyFaceEncoder, unit: bool = False) -> dict:
        """Identities at each snapshot (or only at the end), one per person; ``unit``: also (``("unit", steps)``)
        the averages re-normalised to unit rows, as this project saved them before 0.2."""
        analyzer = self.analyzers[encoder]
        people = [[analyzer(p) for p in ps] for ps in photos]
        names = [f"b{self.count + i}" for i in range(len(photos))]
        self.count += len(photos)
        steps = config.total_steps(len(photos))
        out: dict = {}
        with trainer(self.toy.pipe, people, names, config, self.bases, "toy", face_net=analyzer.encoder) as t:
            while t.steps_done < steps:
                t.step()
                if t.steps_done in snapshots or t.steps_done == steps:
                    out[t.steps_done] = t.identities()
                    if unit:
                        out[("unit", t.steps_done)] = [
                            Identity.from_coefficients(tok, [F.normalize(c, dim=-1) for c in t.ema[i]], t.bases, base_model="toy")
                            for i, tok in enumerate(t.tokens)]
        return out

    def draw(self, prompts: list[str], identities=(), seed: int = 0) -> list:
        out = cb.generate(self.toy.pipe, prompts, identities=identities, seed=seed, steps=self.sample_steps,
                          show_progress=False)
        return [r.image for r in out]

    def score(self, images, person, prompts, reference: np.ndarray) -> dict:
        s = self.toy.score(images, person, prompts)
        vecs = self.facenet.embed_many([np.asarray(im.convert("RGB")) for im in images])
        s["face_cosine"] = float(np.mean(vecs @ reference))
        return s

    def reference(self, person: world.Person, seed: int) -> np.ndarray:
        """The unit mean face vector of four other renders of ``person`` (any background, shirt, smile)."""
        rng = np.random.default_rng(10_000 + seed)
        renders = [np.asarray(world.render(person, world.Picture.random(rng)).convert("RGB")) for _ in range(4)]
        v = self.facenet.embed_many(renders).mean(0)
        return v / np.linalg.norm(v)

    def evaluate(self, ident, person, seed: int, reference) -> dict:
        prompts = prompts_for(f"{ident.token} person", np.random.default_rng(seed))
        return self.score(self.draw(prompts, [ident], seed), person, prompts, reference)


def summary(rows: list[dict]) -> dict:
    """Mean and spread over people and seeds; with several seeds also ``likeness_seed_sd``, the spread of the
    seeds' means (each over every person)."""
    out = {"n": len(rows), "seeds": len({r["seed"] for r in rows})}
    for key in ("likeness", "fidelity", "face_cosine"):
        out[key], out[key + "_sd"] = mean_sd(r[key] for r in rows)
    if out["seeds"] > 1:
        means = [np.mean([r["likeness"] for r in rows if r["seed"] == s]) for s in sorted({r["seed"] for r in rows})]
        out["likeness_seed_sd"] = float(np.std(means))
    return out


def paired(a: list[dict], b: list[dict], key: str = "likeness") -> dict:
    """b - a person by person: mean, its standard error, and whether it is beyond twice that."""
    d = np.asarray([y[key] - x[key] for x, y in zip(a, b)], dtype=float)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"diff": float(d.mean()), "se": se, "beyond_spread": bool(abs(d.mean()) > 2 * se) if se == se else False}


# -- the benchmark -----------------------------------------------------------------------------------
# The work is split into tasks (a person's arms, a pair's, a share of the celebrities) that run in
# ``--workers`` processes of one thread each: the toy model is too small for two threads to help one
# run much (a training step is 1.1x faster on two threads than on one, a drawing 1.4x).
# Every row records its person and seed, so arms are compared person by person and seed by seed.

_BENCH: Bench | None = None  # one per worker process: the toy world is loaded once


def _bench(args) -> Bench:
    global _BENCH, DECIDE_AT
    if _BENCH is None:
        SNAPSHOTS[:], DECIDE_AT = args.snapshots, args.decide_at
        torch.set_num_threads(args.threads)
        quiet()
        _BENCH = Bench(Toy(args.device), args.sample_steps)
    return _BENCH


def run_task(task: tuple, args) -> list[tuple[str, dict]]:
    """(arm, row) pairs of one task, each row tagged with its ``person`` and ``seed``."""
    bench = _bench(args)
    preset = lambda **kw: cb.TrainConfig.preset("toy", **kw)  # noqa: E731
    people = new_people(args.people)
    out: list[tuple[str, dict]] = []
    kind, arg = task
    if kind == "celebrities":
        looks = world.celebrities(celeb_names())
        rng = np.random.default_rng(0)
        names = list(rng.choice(celeb_names(), args.celebrities, replace=False))
        for j in arg:  # this task's share of the celebrities; each its own prompts
            prompts = prompts_for(f"{names[j]} person", np.random.default_rng(j))
            row = bench.score(bench.draw(prompts), looks[names[j]], prompts, bench.reference(looks[names[j]], 0))
            out.append(("celebrities", {**row, "person": names[j], "seed": 0}))
        return out
    if kind == "no identity":  # the same drawing for everyone at a seed, scored against each person
        prompts = prompts_for("a person", np.random.default_rng(arg))
        images = bench.draw(prompts, seed=arg)
        return [("no identity", {**bench.score(images, p, prompts, bench.reference(p, i)), "person": i, "seed": arg})
                for i, p in enumerate(people)]
    photos = lambda i: photos_of(people[i], 3, 1000 + i, bench.toy.tmp)  # noqa: E731
    if kind == "person":
        i, person = arg, people[arg]
        ref, ph = bench.reference(person, i), photos(arg)

        def add(key, ident, seed):
            out.append((key, {**bench.evaluate(ident, person, seed, ref), "person": i, "seed": seed}))

        for s in range(args.seeds):
            snaps = bench.learn([ph[:1]], preset(steps=max(SNAPSHOTS), seed=s), SNAPSHOTS, unit=s == 0)
            for n in SNAPSHOTS:
                add(f"recipe@{n}", snaps[n][0], s)
            for n in sorted({DECIDE_AT, max(SNAPSHOTS)}) if s == 0 else ():
                add(f"renormalised average@{n}", snaps[("unit", n)][0], s)
            if s < args.ti_seeds:  # diffusers' recipe: lr 5e-4 x batch, weight decay 1e-2
                ti = bench.learn([ph[:1]], preset(steps=max(SNAPSHOTS), seed=s, learning_rate=5e-4, weight_decay=1e-2),
                                 SNAPSHOTS, trainer=TextualInversion)
                for n in SNAPSHOTS:
                    add(f"textual inversion@{n}", ti[n][0], s)
            # the lever that moved beyond spread at one seed: measured at every seed before it can be adopted
            twice = bench.learn([ph[:1]], preset(steps=DECIDE_AT, seed=s, learning_rate=1e-2))
            add(f"twice the rate@{DECIDE_AT}", twice[DECIDE_AT][0], s)
        for key, ident in decisions(bench, ph, preset):
            add(key, ident, 0)
        return out
    if kind == "pair":
        a, seed = arg
        refs = [bench.reference(people[a + j], a + j) for j in (0, 1)]
        two = [photos(a)[:1], photos(a + 1)[:1]]
        for key, idents in pairs(bench, two, preset, seed):
            for j in (0, 1):
                if idents[j] is not None:
                    row = bench.evaluate(idents[j], people[a + j], seed, refs[j])
                    out.append((key, {**row, "person": a + j, "seed": seed}))
        return out
    raise ValueError(kind)


def tasks(args) -> list[tuple]:
    """Longest first, so that the workers finish together."""
    out: list[tuple] = [("person", i) for i in range(args.people)]
    out += [("pair", (a, s)) for s in range(args.pair_seeds) for a in range(0, args.people - 1, 2)]
    out += [("no identity", s) for s in range(args.seeds)]
    share = max(1, args.celebrities // 4)
    out += [("celebrities", list(range(j, min(j + share, args.celebrities)))) for j in range(0, args.celebrities, share)]
    return out


def run(args) -> dict:
    res: dict = {k: getattr(args, k) for k in ("people", "seeds", "ti_seeds", "pair_seeds", "celebrities", "sample_steps",
                                               "workers", "threads")}
    t0 = time.time()
    run_tasks(run_task, tasks(args), args, res)
    rows = res["rows"]
    res["seconds"] = time.time() - t0
    res["summary"] = {k: summary(v) for k, v in rows.items()}
    res["cosines"] = face_cosines(_bench(args), args)
    res["decisions"] = compare(rows)
    res["world"] = world_info()
    return res


def decisions(bench: Bench, photos, preset):
    """The runs that cost a training each (seed 0): (arm, identity)."""
    one, D, L = [photos[:1]], DECIDE_AT, max(SNAPSHOTS)
    yield f"fresh views@{L}", bench.learn(one, preset(steps=L, views=0))[L][0]
    yield f"batch 4, lr scaled@{D}", bench.learn(one, preset(steps=D, batch_size=4))[D][0]
    yield f"batch 4, lr kept@{D}", bench.learn(one, preset(steps=D, batch_size=4, learning_rate=1e-2, scale_lr=False))[D][0]
    yield f"128-d, lift@{D}", bench.learn(one, preset(steps=D), encoder=Toy128)[D][0]
    yield f"128-d, no lift@{D}", bench.learn(one, preset(steps=D, face_dim=0), encoder=Toy128)[D][0]
    yield f"three photos@{D}", bench.learn([photos], preset(steps=D))[D][0]


def pairs(bench: Bench, two, preset, seed: int):
    """Two people trained jointly (100 steps each): correlated vectors alone and in a pair, centred; at seed 0
    also as they are. (arm, [identity or None per person])."""
    D, steps = DECIDE_AT, 2 * DECIDE_AT
    if seed == 0:
        yield f"pair@{D}", bench.learn(two, preset(steps=steps, seed=seed))[steps]
    yield f"correlated, alone@{D}", [bench.learn([ph], preset(steps=D, seed=seed), encoder=Correlated)[D][0] for ph in two]
    yield f"correlated, pair@{D}", bench.learn(two, preset(steps=steps, seed=seed), encoder=Correlated)[steps]
    yield (f"correlated, pair, centred@{D}",
           bench.learn(two, preset(steps=steps, seed=seed), encoder=Correlated, trainer=Centred)[steps])


def face_cosines(bench: Bench, args) -> dict:
    """Mean cosine between different people's face vectors (their first photo), for each face network used."""
    people = new_people(args.people)
    firsts = [photos_of(p, 1, 1000 + i, bench.toy.tmp)[0] for i, p in enumerate(people)]
    out = {}
    for cls, analyzer in bench.analyzers.items():
        v = np.stack([analyzer(p).embedding for p in firsts])
        c = v @ v.T
        out[cls.name] = float(c[~np.eye(len(v), dtype=bool)].mean())
    return out


def matched(a: list[dict] | None, b: list[dict] | None) -> tuple[list, list]:
    """The rows of ``a`` and ``b`` with the same person and seed, in the same order."""
    if not a or not b:
        return [], []
    index = {(r["person"], r["seed"]): r for r in a}
    keys = [(r["person"], r["seed"]) for r in b if (r["person"], r["seed"]) in index]
    lookup_b = {(r["person"], r["seed"]): r for r in b}
    return [index[k] for k in keys], [lookup_b[k] for k in keys]


def compare(rows: dict) -> dict:
    D, L = DECIDE_AT, max(SNAPSHOTS)
    out = {}
    for key, a, b in (
        (f"pool vs fresh views ({L} steps)", f"recipe@{L}", f"fresh views@{L}"),
        (f"raw vs renormalised average ({D} steps)", f"recipe@{D}", f"renormalised average@{D}"),
        (f"raw vs renormalised average ({L} steps)", f"recipe@{L}", f"renormalised average@{L}"),
        ("batch 4: lr scaled vs kept", f"batch 4, lr scaled@{D}", f"batch 4, lr kept@{D}"),
        ("batch 2: rate vs twice the rate", f"recipe@{D}", f"twice the rate@{D}"),
        ("batch 2 vs batch 4 (lr scaled)", f"recipe@{D}", f"batch 4, lr scaled@{D}"),
        ("128-d faces: lift vs none", f"128-d, lift@{D}", f"128-d, no lift@{D}"),
        (f"one vs three photos ({D} steps)", f"recipe@{D}", f"three photos@{D}"),
        ("correlated: alone vs pair", f"correlated, alone@{D}", f"correlated, pair@{D}"),
        ("correlated pair: plain vs centred", f"correlated, pair@{D}", f"correlated, pair, centred@{D}"),
        ("correlated: alone vs centred pair", f"correlated, alone@{D}", f"correlated, pair, centred@{D}"),
        ("pair: as they are vs correlated", f"pair@{D}", f"correlated, pair@{D}"),
    ):
        x, y = matched(rows.get(a), rows.get(b))
        if x:
            out[key] = {"likeness": paired(x, y), "fidelity": paired(x, y, "fidelity"), "n": len(y),
                        "seeds": len({r["seed"] for r in y})}
    for steps in SNAPSHOTS:
        x, y = matched(rows.get(f"textual inversion@{steps}"), rows.get(f"recipe@{steps}"))
        if x:
            out[f"textual inversion vs recipe ({steps} steps)"] = {"likeness": paired(x, y), "n": len(y),
                                                                   "seeds": len({r["seed"] for r in y})}
    return out


# -- reporting ---------------------------------------------------------------------------------------
def comparison_table(comparisons: dict) -> list[str]:
    """Markdown rows of ``paired`` comparisons (``compare``'s): likeness and fidelity differences, person by person."""
    lines = ["| comparison (second minus first, person by person and seed by seed) | likeness | ± s.e. | beyond 2 s.e. "
             "| prompt fidelity | n (seeds) |", "|---|---|---|---|---|---|"]
    for key, d in comparisons.items():
        fid = d.get("fidelity")
        lines.append(f"| {key} | {d['likeness']['diff']:+.3f} | {d['likeness']['se']:.3f} | "
                     f"{'yes' if d['likeness']['beyond_spread'] else 'no'} | "
                     f"{'' if fid is None else format(fid['diff'], '+.3f')} | {d['n']} ({d['seeds']}) |")
    return lines


def markdown(res: dict) -> str:
    s = res["summary"]
    lines = ["| arm | likeness | seed spread | face cosine | prompt fidelity | n (seeds) |", "|---|---|---|---|---|---|"]
    for key, r in s.items():
        seed_sd = f"{r['likeness_seed_sd']:.3f}" if "likeness_seed_sd" in r else "–"
        lines.append(f"| {key.replace('@', ', ')} {'steps' if '@' in key else ''} | {r['likeness']:.3f} ± {r['likeness_sd']:.3f} | "
                     f"{seed_sd} | {r['face_cosine']:.3f} ± {r['face_cosine_sd']:.3f} | {r['fidelity']:.3f} ± {r['fidelity_sd']:.3f} | "
                     f"{r['n']} ({r['seeds']}) |")
    lines += ["", *comparison_table(res["decisions"])]
    cos = ", ".join(f"{k} {v:.2f}" for k, v in res["cosines"].items())
    lines += ["", f"Different people's face vectors: mean cosine {cos}.",
              f"{res['people']} new people; the recipe and twice the rate at {res['seeds']} seeds, textual inversion at "
              f"{res['ti_seeds']}, the correlated pairs at {res['pair_seeds']}, the other decisions at seed 0; "
              f"{res['sample_steps']} DDIM steps per image; {res['seconds'] / 60:.1f} min in {res['workers']} processes of "
              f"{res['threads']} thread(s)."]
    return "\n".join(lines) + "\n"


def plots(res: dict, folder: Path) -> list[Path]:
    import matplotlib

    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["summary"]
    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method in ("recipe", "textual inversion"):
        keys = [f"{method}@{n}" for n in SNAPSHOTS if f"{method}@{n}" in s]
        if keys:
            x = [int(k.split("@")[1]) for k in keys]
            ax.errorbar(x, [s[k]["likeness"] for k in keys], [s[k]["likeness_sd"] for k in keys], marker="o", capsize=3,
                        label=method)
    for key, style in (("celebrities", "--"), ("no identity", ":")):
        ax.axhline(s[key]["likeness"], ls=style, color="grey")
        ax.text(SNAPSHOTS[0], s[key]["likeness"] + 0.01, key, color="grey", fontsize=8)
    ax.set_xscale("log")
    ax.set_xticks(SNAPSHOTS, [str(n) for n in SNAPSHOTS])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("training steps")
    ax.set_ylabel("likeness (identity attributes read right)")
    ax.set_title("Toy world: one photo of a new person")
    ax.legend(fontsize=8)
    fig.tight_layout()
    steps_path = folder / "likeness-steps.png"
    fig.savefig(steps_path, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for key, r in s.items():
        ax.scatter(r["fidelity"], r["likeness"], s=18)
        ax.annotate(key.replace("@", " "), (r["fidelity"], r["likeness"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("prompt fidelity (colours and smile read right)")
    ax.set_ylabel("likeness")
    ax.set_title("Likeness against prompt fidelity")
    fig.tight_layout()
    scatter_path = folder / "likeness-fidelity.png"
    fig.savefig(scatter_path, dpi=120)
    plt.close(fig)
    return [steps_path, scatter_path]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 people, 1 seed, 8 celebrities")
    p.add_argument("--people", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3, help="training and image seeds per person for the recipe")
    p.add_argument("--ti-seeds", type=int, default=1, help="seeds for textual inversion")
    p.add_argument("--pair-seeds", type=int, default=3, help="seeds for the correlated pairs (the plain pair: seed 0)")
    p.add_argument("--celebrities", type=int, default=20)
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps per image")
    p.add_argument("--workers", type=int, default=2, help="processes (one task each at a time)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu", help="where the toy model runs (the scorer and face network run on the CPU)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plots", type=Path, help="folder for likeness-steps.png and likeness-fidelity.png")
    p.add_argument("--snapshots", type=int, nargs="+", default=SNAPSHOTS, help=argparse.SUPPRESS)  # smoke tests
    p.add_argument("--decide-at", type=int, default=DECIDE_AT, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.people, args.seeds, args.ti_seeds, args.pair_seeds, args.celebrities = 4, 1, 1, 1, 8
    SNAPSHOTS[:] = args.snapshots
    globals()["DECIDE_AT"] = args.decide_at
    res = run(args)
    write_results(res, markdown(res), args.json, args.markdown)
    if args.plots:
        print("plots:", ", ".join(str(x) for x in plots(res, args.plots)))


if __name__ == "__main__":
    main()
