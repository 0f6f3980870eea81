"""Likeness in the toy world: the paper's claims and every open recipe choice, measured.

New people of the toy world (held out of all its training), one photo each, learned and drawn in
four prompts each; each drawing is scored for likeness (the scorer's six identity attributes read
right; and the face network's cosine to the person's other renders) and prompt fidelity (the
prompts' colour words and smiles read right).

Arms (people x seeds: ``--people``, ``--seeds``; the decisions run at seed 0 over every person and
are compared person by person with the recipe's own seed-0 run):
  celebrities             their names, drawn alike (the ceiling)
  no identity             ``a person`` (the floor for likeness, the reference for fidelity)
  recipe                  the default recipe (toy preset), snapshots at 25, 50, 100, 200, 400 steps
  textual inversion       diffusers' recipe (2 free vectors from ``person``, lr 5e-4 x batch), same views and steps
  raw average             the recipe, saving the moving average as it is (the official code) instead of unit rows
  fresh views             the recipe with a new view every step (``views=0``) instead of the pool of 64, 400 steps
  batch 4, lr 1e-2 / 2e-2 the learning rate kept, or scaled with the batch as the official code does
  128-d faces, lift on/off the face vectors cut to 128 numbers (as dlib's), lifted to 512 or not
  several photos          three photos of the person instead of one
  pairs                   two people trained jointly: face vectors as they are, made to sit at cosine ~0.89
                          (a shared component added, as dlib's do), and with that, centred on the pair's mean

    python benchmarks/bench_likeness.py --quick                    # a smaller check: 4 people, 1 seed
    python benchmarks/bench_likeness.py --seeds 1 --json benchmarks/likeness.json --markdown likeness.md --plots docs/

The committed results (benchmarks/README.md) are the second line's: 31 min on 2 CPU threads.
"""

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

from _toy import Toy, mean_sd, new_people, photos_of, prompts_for, quiet, write_results  # noqa: E402

import celebbasis as cb  # noqa: E402
from celebbasis.face import FaceAnalyzer, WholeImageDetector  # noqa: E402
from celebbasis.identity import Identity  # noqa: E402
from celebbasis.resources import celeb_names  # noqa: E402
from celebbasis.toy import ToyFaceEncoder, world, world_info  # noqa: E402
from celebbasis.train import Personalizer, _resolve_bases  # noqa: E402

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
        from celebbasis.train import pipeline_conditioning

        person = F.one_hot(torch.tensor(who), self.n_id).float()
        with ExitStack() as stack:
            for (_, te), ids, emb in zip(self.encoders, self.token_ids, coeffs):
                rows = person.to(emb)[:, :, None, None] * emb[None]  # (B, n_id, K, d)
                stack.enter_context(token_override(te.get_input_embeddings(), ids))["rows"] = rows.flatten(1, 2)
            return pipeline_conditioning(self.pipe, captions, self.cfg.resolution)

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
        return [Identity(tok, torch.zeros(self.k, 1), self.heads[0][i].detach().float().clone(),
                         {"base_model": self.base_model})
                for i, tok in enumerate(self.tokens)]


# -- learning and drawing ----------------------------------------------------------------------------
class Bench:
    def __init__(self, toy: Toy, sample_steps: int):
        self.toy, self.sample_steps = toy, sample_steps
        self.bases = _resolve_bases(toy.pipe, None, None, "toy")
        self.analyzers = {cls: FaceAnalyzer(WholeImageDetector(), cls()) for cls in (ToyFaceEncoder, Toy128, Correlated)}
        self.facenet = self.analyzers[ToyFaceEncoder].encoder
        self.count = 0

    def learn(self, photos: list[list[Path]], config: cb.TrainConfig, snapshots=(), *, trainer=Personalizer,
              encoder=ToyFaceEncoder, raw: bool = False) -> dict[int, list]:
        """Identities at each snapshot (or only at the end), one per person; ``raw``: also the raw averages."""
        analyzer = self.analyzers[encoder]
        people = [[analyzer(p) for p in ps] for ps in photos]
        names = [f"b{self.count + i}" for i in range(len(photos))]
        self.count += len(photos)
        steps = config.total_steps(len(photos))
        out: dict = {}
        with trainer(self.toy.pipe, people, names, config, self.bases, "toy", face_encoder=analyzer) as t:
            while t.steps_done < steps:
                t.step()
                if t.steps_done in snapshots or t.steps_done == steps:
                    out[t.steps_done] = t.identities()
                    if raw:
                        out[("raw", t.steps_done)] = [Identity.from_coefficients(tok, t.ema[i], t.bases, base_model="toy")
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
    out = {"n": len(rows)}
    for key in ("likeness", "fidelity", "face_cosine"):
        out[key], out[key + "_sd"] = mean_sd(r[key] for r in rows)
    return out


def paired(a: list[dict], b: list[dict], key: str = "likeness") -> dict:
    """b - a person by person: mean, its standard error, and whether it is beyond twice that."""
    d = np.asarray([y[key] - x[key] for x, y in zip(a, b)], dtype=float)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"diff": float(d.mean()), "se": se, "beyond_spread": bool(abs(d.mean()) > 2 * se) if se == se else False}


# -- the benchmark -----------------------------------------------------------------------------------
def run(args) -> dict:
    toy = Toy(args.device)
    bench = Bench(toy, args.sample_steps)
    preset = lambda **kw: cb.TrainConfig.preset("toy", **kw)  # noqa: E731
    people = new_people(args.people)
    res: dict = {"people": args.people, "seeds": args.seeds, "sample_steps": args.sample_steps, "rows": {}}
    rows = res["rows"]
    add = lambda key, r: rows.setdefault(key, []).append(r)  # noqa: E731
    t0 = time.time()

    rng = np.random.default_rng(0)
    looks = world.celebrities(celeb_names())
    for name in rng.choice(celeb_names(), args.celebrities, replace=False):
        prompts = prompts_for(f"{name} person", rng)
        add("celebrities", bench.score(bench.draw(prompts), looks[name], prompts, bench.reference(looks[name], 0)))
    print(f"celebrities: {summary(rows['celebrities'])['likeness']:.3f}  ({time.time() - t0:.0f} s)", flush=True)

    photos = {i: photos_of(p, 3, 1000 + i, toy.tmp) for i, p in enumerate(people)}
    refs = {i: bench.reference(p, i) for i, p in enumerate(people)}
    for s in range(args.seeds):
        for i, person in enumerate(people):
            ev = lambda ident: bench.evaluate(ident, person, s, refs[i])  # noqa: E731
            plain = prompts_for("a person", np.random.default_rng(s))
            add("no identity", bench.score(bench.draw(plain, seed=s), person, plain, refs[i]))
            snaps = bench.learn([photos[i][:1]], preset(steps=max(SNAPSHOTS), seed=s), SNAPSHOTS, raw=True)
            for n in SNAPSHOTS:
                add(f"recipe@{n}", ev(snaps[n][0]))
            for n in sorted({DECIDE_AT, max(SNAPSHOTS)}):
                add(f"raw average@{n}", ev(snaps[("raw", n)][0]))
            if s < args.ti_seeds:
                ti = bench.learn([photos[i][:1]], preset(steps=max(SNAPSHOTS), seed=s, learning_rate=5e-4 * 2,
                                                         weight_decay=1e-2), SNAPSHOTS, trainer=TextualInversion)
                for n in SNAPSHOTS:
                    add(f"textual inversion@{n}", ev(ti[n][0]))
            if s == 0:
                decisions(bench, person, photos[i], preset, ev, add)
            if args.json:  # what is measured so far survives a stop
                args.json.with_suffix(".partial.json").write_text(json.dumps(res) + "\n")
            print(f"seed {s} person {i}: recipe@100 {rows[f'recipe@{DECIDE_AT}'][-1]['likeness']:.3f} "
                  f"@{max(SNAPSHOTS)} {rows[f'recipe@{max(SNAPSHOTS)}'][-1]['likeness']:.3f}  ({time.time() - t0:.0f} s)", flush=True)
    pairs(bench, people, photos, refs, preset, add)
    res["seconds"] = time.time() - t0
    res["summary"] = {k: summary(v) for k, v in rows.items()}
    res["cosines"] = face_cosines(bench, photos)
    res["decisions"] = compare(rows)
    res["world"] = world_info()
    return res


def decisions(bench: Bench, person, photos, preset, ev, add) -> None:
    """The runs that cost a training each, at seed 0, for one person."""
    one, D, L = [photos[:1]], DECIDE_AT, max(SNAPSHOTS)
    add(f"fresh views@{L}", ev(bench.learn(one, preset(steps=L, views=0))[L][0]))
    add(f"batch 4, lr 1e-2@{D}", ev(bench.learn(one, preset(steps=DECIDE_AT, batch_size=4))[DECIDE_AT][0]))
    add(f"batch 4, lr 2e-2@{D}", ev(bench.learn(one, preset(steps=DECIDE_AT, batch_size=4, learning_rate=2e-2))[DECIDE_AT][0]))
    add(f"128-d, lift@{D}", ev(bench.learn(one, preset(steps=DECIDE_AT), encoder=Toy128)[DECIDE_AT][0]))
    add(f"128-d, no lift@{D}", ev(bench.learn(one, preset(steps=DECIDE_AT, face_dim=0), encoder=Toy128)[DECIDE_AT][0]))
    add(f"three photos@{D}", ev(bench.learn([photos], preset(steps=DECIDE_AT))[DECIDE_AT][0]))


def pairs(bench: Bench, people, photos, refs, preset, add) -> None:
    """Two people trained jointly (100 steps each), as they are, correlated, and correlated but centred."""
    D = DECIDE_AT
    for a in range(0, len(people) - 1, 2):
        two = [photos[a][:1], photos[a + 1][:1]]
        ev = lambda ids, key: [add(key, bench.evaluate(ids[j], people[a + j], 0, refs[a + j])) for j in (0, 1)]  # noqa: E731
        steps = 2 * DECIDE_AT
        for j in (0, 1):
            add(f"correlated, alone@{D}", bench.evaluate(bench.learn([two[j]], preset(steps=DECIDE_AT), encoder=Correlated)
                                                        [DECIDE_AT][0], people[a + j], 0, refs[a + j]))
        ev(bench.learn(two, preset(steps=steps))[steps], f"pair@{D}")
        ev(bench.learn(two, preset(steps=steps), encoder=Correlated)[steps], f"correlated, pair@{D}")
        ev(bench.learn(two, preset(steps=steps), encoder=Correlated, trainer=Centred)[steps], f"correlated, pair, centred@{D}")
        print(f"pair {a // 2}: done", flush=True)


def face_cosines(bench: Bench, photos) -> dict:
    """Mean cosine between different people's face vectors, for each face network used."""
    out = {}
    for cls, analyzer in bench.analyzers.items():
        v = np.stack([analyzer(ps[0]).embedding for ps in photos.values()])
        c = v @ v.T
        out[cls.name] = float(c[~np.eye(len(v), dtype=bool)].mean())
    return out


def compare(rows: dict) -> dict:
    D, L = DECIDE_AT, max(SNAPSHOTS)
    base = lambda n: rows[f"recipe@{n}"][:len(rows.get(f"fresh views@{L}", []))]  # noqa: E731  seed 0, person by person
    out = {}
    for key, a, b in (
            (f"pool vs fresh views ({L} steps)", base(L), rows.get(f"fresh views@{L}")),
        (f"renormalised vs raw average ({D} steps)", rows[f"recipe@{D}"], rows.get(f"raw average@{D}")),
        (f"renormalised vs raw average ({L} steps)", rows[f"recipe@{L}"], rows.get(f"raw average@{L}")),
        ("batch 4: lr kept vs scaled", rows.get(f"batch 4, lr 1e-2@{D}"), rows.get(f"batch 4, lr 2e-2@{D}")),
        ("128-d faces: lift vs none", rows.get(f"128-d, lift@{D}"), rows.get(f"128-d, no lift@{D}")),
        (f"one vs three photos ({D} steps)", base(D), rows.get(f"three photos@{D}")),
        ("correlated: alone vs pair", rows.get(f"correlated, alone@{D}"), rows.get(f"correlated, pair@{D}")),
        ("correlated pair: plain vs centred", rows.get(f"correlated, pair@{D}"), rows.get(f"correlated, pair, centred@{D}")),
        ("pair: as they are vs correlated", rows.get(f"pair@{D}"), rows.get(f"correlated, pair@{D}")),
    ):
        if a and b:
            out[key] = {"likeness": paired(a, b), "fidelity": paired(a, b, "fidelity"), "n": len(b)}
    if rows.get(f"textual inversion@{D}"):
        n = len(rows[f"textual inversion@{D}"])
        for steps in SNAPSHOTS:
            out[f"textual inversion vs recipe ({steps} steps)"] = {
                "likeness": paired(rows[f"textual inversion@{steps}"], rows[f"recipe@{steps}"][:n]), "n": n}
    return out



# -- reporting ---------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    s = res["summary"]
    lines = ["| arm | likeness | face cosine | prompt fidelity | n |", "|---|---|---|---|---|"]
    for key, r in s.items():
        lines.append(f"| {key.replace('@', ', ')} {'steps' if '@' in key else ''} | {r['likeness']:.3f} ± {r['likeness_sd']:.3f} | "
                     f"{r['face_cosine']:.3f} ± {r['face_cosine_sd']:.3f} | {r['fidelity']:.3f} ± {r['fidelity_sd']:.3f} | {r['n']} |")
    lines += ["", "| comparison (second minus first, person by person) | likeness | ± s.e. | beyond 2 s.e. | prompt fidelity | n |",
              "|---|---|---|---|---|---|"]
    for key, d in res["decisions"].items():
        fid = d.get("fidelity")
        lines.append(f"| {key} | {d['likeness']['diff']:+.3f} | {d['likeness']['se']:.3f} | "
                     f"{'yes' if d['likeness']['beyond_spread'] else 'no'} | "
                     f"{'' if fid is None else format(fid['diff'], '+.3f')} | {d['n']} |")
    cos = ", ".join(f"{k} {v:.2f}" for k, v in res["cosines"].items())
    lines += ["", f"Different people's face vectors: mean cosine {cos}.",
              f"{res['people']} new people x {res['seeds']} seeds (textual inversion: {res['ti_seeds']} seed(s); the "
              f"decisions and pairs: seed 0), {res['sample_steps']} DDIM steps per image; {res['seconds'] / 60:.1f} min "
              f"on {res['threads']} CPU threads."]
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
    p.add_argument("--quick", action="store_true", help="4 people, 1 seed, 8 celebrities, 25 DDIM steps per image")
    p.add_argument("--people", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3, help="training and image seeds per person for the recipe")
    p.add_argument("--ti-seeds", type=int, default=1, help="seeds for textual inversion")
    p.add_argument("--celebrities", type=int, default=20)
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps per image")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where the toy model runs (the scorer and face network run on the CPU)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plots", type=Path, help="folder for likeness-steps.png and likeness-fidelity.png")
    p.add_argument("--snapshots", type=int, nargs="+", default=SNAPSHOTS, help=argparse.SUPPRESS)  # smoke tests
    p.add_argument("--decide-at", type=int, default=DECIDE_AT, help=argparse.SUPPRESS)
    args = p.parse_args()
    SNAPSHOTS[:] = args.snapshots
    globals()["DECIDE_AT"] = args.decide_at
    if args.quick:
        args.people, args.seeds, args.ti_seeds, args.celebrities = 4, 1, 1, 8
    torch.set_num_threads(args.threads)
    quiet()
    res = run(args)
    res.update(threads=args.threads, ti_seeds=args.ti_seeds)
    write_results(res, markdown(res), args.json, args.markdown)
    if args.plots:
        print("plots:", ", ".join(str(x) for x in plots(res, args.plots)))


if __name__ == "__main__":
    main()
