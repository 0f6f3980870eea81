"""Instant identities in the toy world: the identity network pretrained on the model's own celebrities.

One data set is drawn once (``celebbasis.pretrain.collect``: every celebrity of the basis and
``--mixes`` blends of 2-3 of them, ``--drawings`` drawings each, read by the toy face network); every
network arm is fitted on it (or on the world's true renders of the celebrities, the control):

  mlp (the default)      the consistency filter, celebrities only, ridge then the cosine fit
  ridge                  the same data, the closed-form ridge regression alone
  mlp, no filter         every celebrity, consistent or not
  mlp + mixes            the celebrities and the synthetic mixes
  mlp, true renders      the world's own renders of each celebrity instead of the model's drawings

Then for ``--people`` held-out new people (never in any training set of the world, nor among the
celebrities), one photo each, at ``--seeds`` seeds: each arm's instant identity (0 steps), the default
network refined (warm) to 5, 10, 25, 50 and 100 steps, and the recipe from a fresh network (the
paper's) to the same steps, all in this run and compared person by person and seed by seed. Likeness
and prompt fidelity as in ``bench_likeness``; seconds per identity measured on each run.

    python benchmarks/bench_instant.py --quick      # 3 people, 1 seed
    python benchmarks/bench_instant.py --json benchmarks/instant.json --markdown instant.md --plots docs/ \\
        --ship src/celebbasis/data/toy/identity-net.safetensors

``--ship`` writes the default arm's network (fitted on everything) where the package keeps it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _toy import Toy, new_people, photos_of, prompts_for, quiet, run_tasks, write_results  # noqa: E402
from bench_likeness import comparison_table, matched, paired, summary  # noqa: E402

import celebbasis as cb  # noqa: E402
from celebbasis.config import PretrainConfig  # noqa: E402
from celebbasis.pretrain import PretrainData, PretrainedNetwork, collect, fit_network, resolve_pretrained  # noqa: E402
from celebbasis.resources import celeb_names  # noqa: E402
from celebbasis.toy import ToyFaceEncoder, world, world_info  # noqa: E402
from celebbasis.models import resolve_bases
from celebbasis.train import Personalizer  # noqa: E402

SNAPSHOTS = [5, 10, 25, 50, 100]
WORK = Path(__file__).parent / ".work"
ARMS = {  # arm -> (data, PretrainConfig overrides)
    "mlp": ("drawings", {}),
    "ridge": ("drawings", {"fit": "ridge"}),
    "mlp, no filter": ("drawings", {"filter": False}),
    "mlp + mixes": ("drawings+mixes", {}),
    "mlp, true renders": ("renders", {}),
}


# -- the networks --------------------------------------------------------------------------------------
def drawn_data(toy: Toy, bases, args) -> PretrainData:
    """The model's drawings of its celebrities and of the mixes (resumed from benchmarks/.work)."""
    cfg = PretrainConfig(mixes=args.mixes, drawings=args.drawings, max_names=args.max_names)
    return collect(toy.pipe, toy.analyzer, bases, cfg,
                   WORK / f"instant-data-{args.mixes}-{args.drawings}-{args.max_names}.safetensors",
                   progress=lambda done, n, s: print(f"  drawn {done}/{n} ({s:.0f} s)", flush=True))


def without_mixes(data: PretrainData) -> PretrainData:
    n = len(data.names)
    rows = data.group < n
    return PretrainData(data.names, [t[:n] for t in data.targets], data.faces[rows], data.found[rows], data.group[rows],
                        data.source, data.seconds)


def rendered_data(data: PretrainData, drawings: int) -> PretrainData:
    """The control: the world's true renders of the same celebrities, read by the same face network."""
    looks = world.celebrities(celeb_names())
    enc = ToyFaceEncoder()
    rng = np.random.default_rng(7)
    faces = []
    for name in data.names:
        ims = [np.asarray(world.render(looks[name], world.Picture.random(rng))) for _ in range(drawings)]
        faces.append(enc.embed_many(ims))
    n = len(data.names)
    return PretrainData(data.names, [t[:n] for t in data.targets], np.concatenate(faces), np.ones(n * drawings, bool),
                        np.repeat(np.arange(n), drawings), "the world's true renders")


def networks(toy: Toy, bases, args) -> dict[str, dict]:
    """Each arm's network, saved in benchmarks/.work for the workers; with its fit time and metadata."""
    t = time.time()
    drawn = drawn_data(toy, bases, args)
    sets = {"drawings+mixes": drawn, "drawings": without_mixes(drawn)}
    draw_seconds = time.time() - t
    t = time.time()
    sets["renders"] = rendered_data(sets["drawings"], args.drawings)
    render_seconds = time.time() - t
    out = {}
    for arm, (data, overrides) in ARMS.items():
        t = time.time()
        cfg = PretrainConfig(mixes=args.mixes if "mixes" in data else 0, drawings=args.drawings, max_names=args.max_names,
                             min_names=min(20, args.max_names or 20), **overrides)
        net = fit_network(sets[data], cfg, toy.analyzer.encoder, pipe=toy.pipe, bases=bases, base_model="toy")
        path = WORK / f"arm-{arm.replace(' ', '_').replace(',', '').replace('+', 'and')}.safetensors"
        net.save(path)
        out[arm] = {"path": str(path), "fit_seconds": round(time.time() - t, 1), "counts": net.metadata["counts"],
                    "validation_cosine": net.metadata["validation_cosine"]}
        print(f"  {arm}: {net.metadata['counts']['names_kept']} celebrities, {net.metadata['counts']['mixes_kept']} mixes "
              f"kept; held-back cosine {net.metadata['validation_cosine']}", flush=True)
    out["_timing"] = {"draw_seconds": round(draw_seconds, 1), "drawings": int(len(drawn.group)),
                      "render_seconds": round(render_seconds, 1)}
    if args.ship:
        PretrainedNetwork.load(out[args.ship_arm]["path"]).save(args.ship)
        print(f"  shipped the {args.ship_arm} network to {args.ship}")
    return out


# -- per person ----------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        torch.set_num_threads(args.threads)
        quiet()
        self.toy = Toy()
        self.analyzer = self.toy.analyzer
        self.bases = resolve_bases(self.toy.pipe, None, None, "toy")
        self.sample_steps = args.sample_steps
        self.count = 0

    def draw(self, prompts, identities=(), seed=0):
        out = cb.generate(self.toy.pipe, prompts, identities=identities, seed=seed, steps=self.sample_steps,
                          show_progress=False)
        return [r.image for r in out]

    def evaluate(self, ident, person, seed) -> dict:
        prompts = prompts_for(f"{ident.token} person" if ident is not None else "a person", np.random.default_rng(seed))
        return self.toy.score(self.draw(prompts, [ident] if ident is not None else [], seed), person, prompts)

    def learn(self, photo: Path, seed: int, steps: int, snapshots, pretrained=None) -> dict:
        """{steps: (identity, seconds since the start)} for the snapshots (0: before any step, with a network)."""
        t0 = time.perf_counter()
        people = [[self.analyzer(photo)]]
        self.count += 1
        cfg = cb.TrainConfig.preset("toy", steps=steps, seed=seed, pretrained=pretrained.name if pretrained else "none")
        out = {}
        trainer = partial(Personalizer, pretrained=pretrained) if pretrained is not None else Personalizer
        with trainer(self.toy.pipe, people, [f"i{self.count}"], cfg, self.bases, "toy", face_net=self.analyzer.encoder) as t:
            if 0 in snapshots:
                out[0] = (t.identities()[0], time.perf_counter() - t0)
            while t.steps_done < steps:
                t.step()
                if t.steps_done in snapshots:
                    elapsed = time.perf_counter() - t0
                    out[t.steps_done] = (t.identities()[0], elapsed)
        return out


_BENCH: Bench | None = None


def run_task(task, args, arms: dict) -> list[tuple[str, dict]]:
    global _BENCH
    SNAPSHOTS[:] = args.snapshots
    if _BENCH is None:
        _BENCH = Bench(args)
    b = _BENCH
    people = new_people(args.people)
    kind, arg = task
    out = []
    if kind == "celebrities":
        looks, rng = world.celebrities(celeb_names()), np.random.default_rng(0)
        for j, name in enumerate(rng.choice(celeb_names(), args.celebrities, replace=False)):
            prompts = prompts_for(f"{name} person", np.random.default_rng(j))
            out.append(("celebrities", {**b.toy.score(b.draw(prompts), looks[name], prompts), "person": str(name), "seed": 0}))
        return out
    if kind == "no identity":
        return [("no identity", {**b.evaluate(None, p, arg), "person": i, "seed": arg}) for i, p in enumerate(people)]
    i, seed = arg
    person = people[i]
    photo = photos_of(person, 1, 1000 + i, b.toy.tmp)[0]

    def add(key, ident, seconds):
        out.append((key, {**b.evaluate(ident, person, seed), "person": i, "seed": seed, "seconds": round(seconds, 3)}))

    for arm, info in arms.items():
        if arm.startswith("_"):
            continue
        net = PretrainedNetwork.load(info["path"])
        if arm == "mlp":
            for steps, (ident, sec) in b.learn(photo, seed, max(SNAPSHOTS), [0, *SNAPSHOTS], net).items():
                add(f"warm@{steps}" if steps else "instant, mlp@0", ident, sec)
        else:
            ident, sec = b.learn(photo, seed, 0, [0], net)[0]
            add(f"instant, {arm}@0", ident, sec)
    for steps, (ident, sec) in b.learn(photo, seed, max(SNAPSHOTS), SNAPSHOTS).items():
        add(f"recipe@{steps}", ident, sec)
    return out


def tasks(args) -> list[tuple]:
    out = [("person", (i, s)) for s in range(args.seeds) for i in range(args.people)]
    return out + [("no identity", s) for s in range(args.seeds)] + [("celebrities", None)]


def run(args) -> dict:
    res: dict = {k: getattr(args, k) for k in ("people", "seeds", "celebrities", "sample_steps", "workers", "threads",
                                               "drawings", "mixes")}
    t0 = time.time()
    torch.set_num_threads(args.threads)
    quiet()
    toy = Toy()
    res["arms"] = arms = networks(toy, resolve_bases(toy.pipe, None, None, "toy"), args)
    del toy
    run_tasks(run_task, tasks(args), args, res, arms, t0=t0)
    rows = res["rows"]
    res["seconds"] = time.time() - t0
    res["summary"] = {k: {**summary([{**r, "face_cosine": r.get("face_cosine", float("nan"))} for r in v]),
                          **({"seconds": float(np.mean([r["seconds"] for r in v]))} if "seconds" in v[0] else {})}
                      for k, v in rows.items()}
    res["comparisons"] = compare(rows)
    res["world"] = world_info()
    return res


def compare(rows: dict) -> dict:
    out = {}
    pairs = [(f"recipe@{n} vs warm@{n}", f"recipe@{n}", f"warm@{n}") for n in SNAPSHOTS]
    pairs += [("recipe@100 vs instant", "recipe@100", "instant, mlp@0"), ("recipe@25 vs instant", "recipe@25", "instant, mlp@0")]
    pairs += [(f"{a} vs {b}", a, b) for a, b in  # the default number of warm steps (config.WARM_STEPS)
              [("warm@25", "warm@50"), ("warm@50", "warm@100"), ("recipe@100", "warm@25"), ("recipe@100", "warm@50")]]
    pairs += [(f"mlp vs {arm}", "instant, mlp@0", f"instant, {arm}@0") for arm in ARMS if arm != "mlp"]
    for key, a, b in pairs:
        x, y = matched(rows.get(a), rows.get(b))
        if x:
            out[key] = {"likeness": paired(x, y), "fidelity": paired(x, y, "fidelity"), "n": len(y),
                        "seeds": len({r["seed"] for r in y})}
    return out


# -- reporting --------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    s = res["summary"]
    ceiling = s["celebrities"]["likeness"]
    lines = ["| arm | steps | likeness | × celebrities' | seed spread | prompt fidelity | s per identity | n (seeds) |",
             "|---|---|---|---|---|---|---|---|"]
    for key, r in s.items():
        arm, _, steps = key.partition("@")
        sec = f"{r['seconds']:.1f}" if "seconds" in r else "–"
        seed_sd = f"{r['likeness_seed_sd']:.3f}" if "likeness_seed_sd" in r else "–"
        lines.append(f"| {arm} | {steps or '–'} | {r['likeness']:.3f} ± {r['likeness_sd']:.3f} | {r['likeness'] / ceiling:.0%} | "
                     f"{seed_sd} | {r['fidelity']:.3f} ± {r['fidelity_sd']:.3f} | {sec} | {r['n']} ({r['seeds']}) |")
    lines += ["", *comparison_table(res["comparisons"])]
    lines += ["", "| network | celebrities kept | mixes kept | pairs fitted | held-back cosine | fit s |", "|---|---|---|---|---|---|"]
    for arm, a in res["arms"].items():
        if arm.startswith("_"):
            continue
        c = a["counts"]
        lines.append(f"| {arm} | {c['names_kept']} / {c['names']} | {c['mixes_kept']} / {c['mixes']} | {c['pairs_fitted']} | "
                     f"{', '.join(f'{v:.3f}' for v in a['validation_cosine'])} | {a['fit_seconds']} |")
    tm = res["arms"]["_timing"]
    lines += ["", f"{res['people']} new people at {res['seeds']} seeds; {res['sample_steps']} DDIM steps per image; "
              f"pretraining data: {tm['drawings']} drawings, {tm['draw_seconds'] / 60:.1f} min of drawing in this run (the "
              f"rest resumed from benchmarks/.work); the whole run "
              f"{res['seconds'] / 60:.1f} min in {res['workers']} processes of {res['threads']} thread(s)."]
    return "\n".join(lines) + "\n"


def plots(res: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["summary"]
    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    x = [0.5, *SNAPSHOTS]  # 0 steps drawn at 0.5 on the log axis
    for label, keys in (("pretrained (warm)", ["instant, mlp@0", *[f"warm@{n}" for n in SNAPSHOTS]]),
                        ("fresh network (the paper's)", [None, *[f"recipe@{n}" for n in SNAPSHOTS]])):
        pts = [(xi, s[k]) for xi, k in zip(x, keys) if k in s]
        ax.errorbar([p[0] for p in pts], [p[1]["likeness"] for p in pts], [p[1]["likeness_sd"] for p in pts], marker="o",
                    capsize=3, label=label)
    for key, style in (("celebrities", "--"), ("no identity", ":")):
        ax.axhline(s[key]["likeness"], ls=style, color="grey")
        ax.text(0.5, s[key]["likeness"] + 0.01, key, color="grey", fontsize=8)
    ax.set_xscale("log")
    ax.set_xticks(x, ["0", *[str(n) for n in SNAPSHOTS]])
    ax.minorticks_off()
    ax.set_xlabel("training steps (0: instant)")
    ax.set_ylabel("likeness")
    ax.set_title("Toy world: one photo of a new person")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / "instant-steps.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def figure(args, path: Path) -> None:
    """The README's figure: three new people's photos, their instant identity and the default warm steps, two prompts
    each."""
    from PIL import Image, ImageDraw

    b, W = Bench(args), cb.config.WARM_STEPS
    net = PretrainedNetwork.load(args.ship) if args.ship else resolve_pretrained("auto", b.toy.pipe)
    cell, pad, head = 112, 6, 34
    prompts = ["<p> person on a green background", "<p> person smiling wearing a red shirt"]
    short = [p.replace("<p> person ", "") for p in prompts]
    titles = ["photo (new person)", *[f"instant: {p}" for p in short], *[f"{W} steps: {p}" for p in short]]
    people = new_people(3)
    sheet = Image.new("RGB", (5 * (cell + pad) + pad, 3 * (cell + pad) + head + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), f"toy world: one photo of a new person -> <p> person, instantly (0 steps) and after {W} steps",
              fill="black")
    for c, t in enumerate(titles):
        words = t.split()
        draw.multiline_text((pad + c * (cell + pad), 16), " ".join(words[:3]) + "\n" + " ".join(words[3:]), fill="black",
                            spacing=0)
    for r, person in enumerate(people):
        photo = photos_of(person, 1, 1000 + r, b.toy.tmp)[0]
        snaps = b.learn(photo, 0, W, [0, W], net)
        tiles = [Image.open(photo).convert("RGB")]
        for steps in (0, W):
            ident = snaps[steps][0]
            tiles += b.draw([p.replace("<p>", ident.token) for p in prompts], [ident], seed=r)
        for c, im in enumerate(tiles):
            sheet.paste(im.resize((cell, cell), Image.NEAREST), (pad + c * (cell + pad), head + pad + r * (cell + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 people, 1 seed, 6 celebrities")
    p.add_argument("--people", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--celebrities", type=int, default=20)
    p.add_argument("--drawings", type=int, default=PretrainConfig.drawings)
    p.add_argument("--mixes", type=int, default=400, help="synthetic people drawn for the mixes arm")
    p.add_argument("--max-names", type=int, default=0, help=argparse.SUPPRESS)  # smoke tests: fewer celebrities
    p.add_argument("--snapshots", type=int, nargs="+", default=SNAPSHOTS, help=argparse.SUPPRESS)
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps per evaluated image")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plots", type=Path)
    p.add_argument("--ship", type=Path, help="write the shipped arm's network here")
    p.add_argument("--ship-arm", default="mlp", choices=list(ARMS))
    p.add_argument("--figure", type=Path, help="the README's figure (instant and warm drawings beside the photo)")
    p.add_argument("--figure-only", action="store_true", help="only draw the figure, with the shipped network")
    args = p.parse_args()
    if args.figure_only:
        figure(args, args.figure)
        return
    if args.quick:
        args.people, args.seeds, args.celebrities = 3, 1, 6
    SNAPSHOTS[:] = args.snapshots
    WORK.mkdir(exist_ok=True)
    res = run(args)
    write_results(res, markdown(res), args.json, args.markdown)
    if args.plots:
        print("plots:", *plots(res, args.plots))
    if args.figure:
        figure(args, args.figure)


if __name__ == "__main__":
    main()
