"""Two people in one picture, in the toy world: the paper's headline, measured.

A two-person picture is ``world.PAIR_WIDTH`` x ``RESOLUTION`` (128 x 64), the first-named person on the left;
the scorer reads each side on its own square (``celebbasis.toy.score_pair``): each side's likeness to its own
person, the prompt's colour words and smile on both sides, and **leakage**: of the attributes where the two
people differ, how often one side shows the other person's value.

Arms (``--people`` held-out new people, one photo each, in pairs (0, 1), (2, 3), ...; ``--seeds`` seeds; every
identity learned with the paper's recipe: a fresh network, 400 steps a person, ``--preset paper`` with the toy
world's full-frame, unflipped views):
  celebrities alone / in pairs   the world's own people (the ceiling), ``--celebrities`` of them
  new person alone               each person learned alone, drawn alone
  new person + celebrity         the same identity beside a celebrity (the new person left, then right)
  two new people, separately     the two identities learned alone, drawn together, both ways round (each person
                                 on each side once, so that left and right compare sides, not people)
  two new people, jointly        the paper's joint training: both learned in one run (800 steps), drawn both ways
  textual inversion              diffusers' recipe (as bench_likeness), the same two ways, at ``--ti-seeds`` seeds
  no identity                    ``a person and a person``: the leakage a picture shows by chance
Likeness for every kind of person: per value of each identity attribute, for the celebrities drawn alone and for
the new people alone (the pairs' people and ``--value-people`` more, at seed 0); and the new people alone learned
with the official recipe's flipped views (``new person alone, with flips``, seed 0), which the toy preset drops.

    python benchmarks/bench_pairs.py --json benchmarks/pairs.json --markdown pairs.md --figure docs/pairs.png
    python benchmarks/bench_pairs.py --quick    # 4 people, 1 seed, 8 celebrities
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _toy import COLOR_WORDS, Toy, mean_sd, new_people, photos_of, prompts_for, quiet, run_tasks, write_results  # noqa: E402
from bench_likeness import Bench, TextualInversion, paired  # noqa: E402

import celebbasis as cb  # noqa: E402
from celebbasis.resources import celeb_names  # noqa: E402
from celebbasis.toy import PAIR_SIZE, score_pair, world, world_info  # noqa: E402

STEPS = 400  # the paper's steps per person
OFFICIAL_FLIP_P = cb.TrainConfig().flip_p  # the official recipe flips half the views; the toy preset flips none
FLIPS = "new person alone, with flips (the official recipe)"


def pair_prompts(a: str, b: str, rng: np.random.Generator) -> list[str]:
    """Four two-person prompts around subjects ``a`` (left) and ``b`` (right), with random colour words."""
    c = lambda: COLOR_WORDS[int(rng.integers(len(COLOR_WORDS)))]  # noqa: E731
    return [
        f"{a} and {b} dancing on a {c()} background",
        f"a photo of {a} and {b} wearing a {c()} shirt",
        f"{a} and {b} shaking hands on a {c()} background",
        f"{a} and {b} cooking together wearing a {c()} shirt on a {c()} background",
    ]


class PairBench(Bench):
    def draw_pairs(self, prompts: list[str], identities=(), seed: int = 0) -> list:
        out = cb.generate(self.toy.pipe, prompts, identities=identities, seed=seed, steps=self.sample_steps,
                          show_progress=False, **PAIR_SIZE)
        return [r.image for r in out]

    def alone(self, name: str, person, seed: int, idents=()) -> dict:
        prompts = prompts_for(f"{name} person", np.random.default_rng(seed))
        s = self.toy.score(self.draw(prompts, list(idents), seed), person, prompts)
        return {"likeness": s["likeness"], "fidelity": s["fidelity"], "per_attribute": s["per_attribute"],
                "labels": person.labels(), "seed": seed}

    def pair(self, a: str, b: str, left, right, seed: int, idents=()) -> dict:
        """``a`` and ``b``: the two subjects (``NAME person``), drawn left and right; ``left`` / ``right``: their looks."""
        prompts = pair_prompts(a, b, np.random.default_rng(100 + seed))
        s = score_pair(self.draw_pairs(prompts, list(idents), seed), left, right, prompts)
        return {"left": s["left"]["likeness"], "right": s["right"]["likeness"], "likeness": s["likeness"],
                "fidelity": s["fidelity"], "leakage": s["leakage"], "seed": seed}

    def both_ways(self, a: str, b: str, left, right, seed: int, idents=()) -> dict:
        """The pair drawn both ways round (``a`` on the left, then ``b``), in the same prompts: each person is on each
        side once, so ``left`` and ``right`` compare the sides, not the people; ``first`` and ``second`` are ``a``'s and
        ``b``'s likeness over both sides."""
        ab, ba = self.pair(a, b, left, right, seed, idents), self.pair(b, a, right, left, seed, idents)
        mean = lambda k: (ab[k] + ba[k]) / 2  # noqa: E731
        return {**{k: mean(k) for k in ("left", "right", "likeness", "fidelity", "leakage")},
                "first": (ab["left"] + ba["right"]) / 2, "second": (ab["right"] + ba["left"]) / 2, "seed": seed}


_BENCH: PairBench | None = None


def _bench(args) -> PairBench:
    global _BENCH
    if _BENCH is None:
        torch.set_num_threads(args.threads)
        quiet()
        _BENCH = PairBench(Toy(args.device), args.sample_steps)
    return _BENCH


def run_task(task: tuple, args) -> list[tuple[str, dict]]:
    """(arm, row) pairs of one task; every row says whose it is (``person``) and its ``seed``."""
    bench = _bench(args)
    names = celeb_names()
    looks = world.celebrities(names)
    chosen = list(np.random.default_rng(0).choice(names, args.celebrities, replace=False))
    people = new_people(args.people + args.value_people)
    kind, arg = task
    n = args.steps  # per person
    out: list[tuple[str, dict]] = []
    if kind == "celebrities":
        for j in arg:
            a, b = chosen[j], chosen[(j + 1) % len(chosen)]
            out.append(("celebrities alone", {**bench.alone(a, looks[a], 0), "person": a}))
            out.append(("celebrity pairs", {**bench.pair(f"{a} person", f"{b} person", looks[a], looks[b], 0), "person": f"{a} | {b}"}))
        return out
    preset = lambda steps, seed, **kw: cb.TrainConfig.preset("toy", steps=steps, seed=seed, pretrained="none", **kw)  # noqa: E731
    photo = lambda i: photos_of(people[i], 1, 1000 + i, bench.toy.tmp)  # noqa: E731

    def alone_with_flips(i: int) -> tuple[str, dict]:  # the official recipe's flipped views (the toy preset has none)
        ident = bench.learn([photo(i)], preset(n, 0, flip_p=OFFICIAL_FLIP_P))[n][0]
        return FLIPS, {**bench.alone(ident.token, people[i], 0, [ident]), "person": i}

    if kind == "value person":  # one more person alone, seed 0: likeness per attribute value
        i = arg
        ident = bench.learn([photo(i)], preset(n, 0))[n][0]
        return [("new person alone", {**bench.alone(ident.token, people[i], 0, [ident]), "person": i}), alone_with_flips(i)]
    a, seed = arg  # a pair of new people: a and a + 1
    pa, pb = people[a], people[a + 1]
    if seed == 0:
        out += [alone_with_flips(a), alone_with_flips(a + 1)]
    celeb = chosen[a % len(chosen)]
    ti = dict(learning_rate=5e-4, weight_decay=1e-2)  # diffusers' textual-inversion recipe (bench_likeness)
    arms = {}
    for trainer, label, kw in ((None, "", {}), (TextualInversion, "textual inversion, ", ti))[:1 + (seed < args.ti_seeds)]:
        extra = {"trainer": trainer} if trainer else {}
        alone = [bench.learn([photo(i)], preset(n, seed, **kw), **extra)[n][0] for i in (a, a + 1)]
        joint = bench.learn([photo(a), photo(a + 1)], preset(2 * n, seed, **kw), **extra)[2 * n]
        arms[label] = alone
        for ident, person, i in zip(alone, (pa, pb), (a, a + 1)):
            out.append((f"{label}new person alone", {**bench.alone(ident.token, person, seed, [ident]), "person": i}))
            if not label:
                me, them = f"{ident.token} person", f"{celeb} person"
                left = bench.pair(me, them, person, looks[celeb], seed, [ident])
                right = bench.pair(them, me, looks[celeb], person, seed, [ident])
                out.append(("new person + celebrity", {"new": (left["left"] + right["right"]) / 2,
                                                      "new_left": left["left"], "new_right": right["right"],
                                                      "celebrity": (left["right"] + right["left"]) / 2,
                                                      "fidelity": (left["fidelity"] + right["fidelity"]) / 2,
                                                      "leakage": (left["leakage"] + right["leakage"]) / 2,
                                                      "person": i, "seed": seed}))
        for how, idents in (("separately", alone), ("jointly", joint)):
            row = bench.both_ways(f"{idents[0].token} person", f"{idents[1].token} person", pa, pb, seed, idents)
            out.append((f"{label}two new people, {how}", {**row, "person": a}))
    out.append(("no identity", {**bench.both_ways("a person", "a person", pa, pb, seed), "person": a}))
    return out


def tasks(args) -> list[tuple]:
    """Longest first, so that the workers finish together."""
    out: list[tuple] = [("pair", (a, s)) for s in range(args.seeds) for a in range(0, args.people - 1, 2)]
    out += [("value person", args.people + i) for i in range(args.value_people)]
    share = max(1, args.celebrities // 8)
    out += [("celebrities", list(range(j, min(j + share, args.celebrities)))) for j in range(0, args.celebrities, share)]
    return out


def run(args) -> dict:
    res: dict = {k: getattr(args, k) for k in ("people", "seeds", "ti_seeds", "celebrities", "value_people", "sample_steps",
                                               "workers", "threads")}
    t0 = time.time()
    run_tasks(run_task, tasks(args), args, res)
    rows = res["rows"]
    res["seconds"] = time.time() - t0
    res["summary"] = summarize(rows)
    res["comparisons"] = compare(rows)
    res["per_value"] = {who: per_value(rows[key]) for who, key in (("celebrities", "celebrities alone"),
                                                                   ("new people", "new person alone"),
                                                                   ("new people, with flips", FLIPS))}
    res["world"] = world_info()
    return res


def summarize(rows: dict) -> dict:
    out = {}
    for key, rs in rows.items():
        out[key] = {"n": len(rs), "seeds": len({r["seed"] for r in rs})}
        for k in ("likeness", "left", "right", "first", "second", "new", "new_left", "new_right", "celebrity", "fidelity",
                  "leakage"):
            if k in rs[0]:
                out[key][k], out[key][k + "_sd"] = mean_sd(r[k] for r in rs)
    return out


def compare(rows: dict) -> dict:
    """Second minus first, pair by pair and seed by seed (over the seeds both arms ran)."""
    out = {}
    for label, a, b, key in (
        ("new person alone: with flips vs without (the toy preset)", FLIPS, "new person alone", "likeness"),
        ("two new people: separately vs jointly (likeness)", "two new people, separately", "two new people, jointly", "likeness"),
        ("two new people: separately vs jointly (leakage)", "two new people, separately", "two new people, jointly", "leakage"),
        ("no identity vs two new people, jointly (leakage)", "no identity", "two new people, jointly", "leakage"),
        ("textual inversion vs ours, jointly (likeness)", "textual inversion, two new people, jointly", "two new people, jointly", "likeness"),
        ("textual inversion vs ours, jointly (leakage)", "textual inversion, two new people, jointly", "two new people, jointly", "leakage"),
        ("textual inversion vs ours, separately (likeness)", "textual inversion, two new people, separately", "two new people, separately", "likeness"),
    ):
        mine = {(r["person"], r["seed"]): r for r in rows.get(b, [])}
        x = [r for r in rows.get(a, []) if (r["person"], r["seed"]) in mine]  # the runs both arms made
        if x:
            out[label] = {**paired(x, [mine[r["person"], r["seed"]] for r in x], key), "n": len(x)}
    return out


def per_value(rows: list[dict]) -> dict:
    """Likeness of the people with each value of each identity attribute: {attribute: {value: (likeness, n)}}."""
    out = {}
    for attr, values in world.IDENTITY.items():
        out[attr] = {}
        for v, value in enumerate(values):
            mine = [r["likeness"] for r in rows if r["labels"][attr] == v]
            if mine:
                out[attr][value.lower()] = (float(np.mean(mine)), len(mine))
    return out


def markdown(res: dict) -> str:
    s = res["summary"]
    f = lambda r, k: f"{r[k]:.3f} ± {r[k + '_sd']:.3f}" if k in r else "–"  # noqa: E731
    lines = ["| arm | left | right | likeness (mean of sides) | prompt fidelity | leakage | n (seeds) |",
             "|---|---|---|---|---|---|---|"]
    for key, r in s.items():
        if key == "new person + celebrity":
            lines.append(f"| {key} (the new person's side / the celebrity's) | {f(r, 'new_left')} | {f(r, 'new_right')} | "
                         f"{f(r, 'new')} / {f(r, 'celebrity')} | "
                         f"{f(r, 'fidelity')} | {f(r, 'leakage')} | {r['n']} ({r['seeds']}) |")
        else:
            lines.append(f"| {key} | {f(r, 'left')} | {f(r, 'right')} | {f(r, 'likeness')} | {f(r, 'fidelity')} | "
                         f"{f(r, 'leakage')} | {r['n']} ({r['seeds']}) |")
    lines += ["", "| comparison (second minus first, pair by pair and seed by seed) | difference | ± s.e. | beyond 2 s.e. | n |",
              "|---|---|---|---|---|"]
    for key, d in res["comparisons"].items():
        lines.append(f"| {key} | {d['diff']:+.3f} | {d['se']:.3f} | {'yes' if d['beyond_spread'] else 'no'} | {d['n']} |")
    for who, table in res["per_value"].items():
        lines += ["", f"Likeness per attribute value, {who} (likeness, n):", ""]
        for attr, values in table.items():
            lines.append(f"- {attr}: " + ", ".join(f"{v} {m:.2f} ({n})" for v, (m, n) in values.items()))
    lines += ["", f"{res['people']} new people in pairs at {res['seeds']} seeds (textual inversion at {res['ti_seeds']}), "
              f"{res['value_people']} more alone at seed 0, "
              f"{res['celebrities']} celebrities; {res['sample_steps']} DDIM steps per image; "
              f"{res['seconds'] / 60:.1f} min in {res['workers']} processes of {res['threads']} thread(s)."]
    return "\n".join(lines) + "\n"


def figure(args, path: Path) -> None:
    """A new person beside a celebrity, and two new people learned jointly, with the photos."""
    from PIL import Image, ImageDraw

    bench = _bench(args)
    people = new_people(2)
    names = celeb_names()
    celeb = list(np.random.default_rng(0).choice(names, args.celebrities, replace=False))[0]
    photos = [photos_of(p, 1, 1000 + i, bench.toy.tmp) for i, p in enumerate(people)]
    cfg = lambda steps: cb.TrainConfig.preset("toy", steps=steps, seed=0, pretrained="none")  # noqa: E731
    alone = bench.learn([photos[0]], cfg(args.steps))[args.steps][0]
    joint = bench.learn(photos, cfg(2 * args.steps))[2 * args.steps]
    rng = np.random.default_rng(0)
    rows = [(f"{alone.token} + {celeb}", bench.draw_pairs(pair_prompts(f"{alone.token} person", f"{celeb} person", rng)[:3],
                                                             [alone])),
            ("two new people, jointly", bench.draw_pairs(pair_prompts(f"{joint[0].token} person", f"{joint[1].token} person",
                                                                      rng)[:3], joint))]
    cell, pad = 96, 8
    sheet = Image.new("RGB", (2 * cell + 3 * (2 * cell + pad) + 2 * pad, 2 * (cell + 22) + 30), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), "toy world: the photos (left), then two people in one picture (first named on the left)", fill="black")
    for r, (label, images) in enumerate(rows):
        y = 26 + r * (cell + 22)
        pics = [Image.open(photos[0][0])] + ([Image.open(photos[1][0])] if r else [])
        for c, im in enumerate(pics):
            sheet.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (pad + c * cell, y))
        for c, im in enumerate(images):
            sheet.paste(im.resize((2 * cell, cell), Image.NEAREST), (2 * cell + 2 * pad + c * (2 * cell + pad), y))
        draw.text((2 * cell + 2 * pad, y + cell + 4), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 people, 1 seed, 8 celebrities, 2 more people")
    p.add_argument("--people", type=int, default=10, help="new people, in pairs")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--celebrities", type=int, default=100)
    p.add_argument("--ti-seeds", type=int, default=1, help="seeds of the textual-inversion arms (as bench_likeness)")
    p.add_argument("--value-people", type=int, default=30, help="more new people alone (seed 0), for likeness per value")
    p.add_argument("--steps", type=int, default=STEPS, help="training steps per person (the paper's 400)")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps per image")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--figure", type=Path)
    args = p.parse_args()
    if args.quick:
        args.people, args.seeds, args.celebrities, args.value_people = 4, 1, 8, 2
    res = run(args)
    write_results(res, markdown(res), args.json, args.markdown)
    if args.figure:
        figure(args, args.figure)
        print("figure:", args.figure)


if __name__ == "__main__":
    main()
