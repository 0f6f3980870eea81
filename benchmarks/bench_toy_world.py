"""The toy world, end to end: does it know its celebrities, and does celebbasis learn a new person in it?

1. Celebrities: N celebrities x 4 prompts (random colour words): the scorer reads each image's identity
   attributes (likeness) and the prompt's colours and smile (prompt fidelity).
2. No identity: the same kinds of prompt with "a person": the floor for likeness (scored against each
   new person) and the reference for prompt fidelity.
3. New people: held-out people (never in any training set), one photo each, learned with the paper's
   recipe (`celebbasis add --toy --preset paper`: a fresh network, 400 steps), then drawn in 4 prompts with `<p> person`.
Writes JSON and markdown (benchmarks/README.md quotes it) and the README's figure.

    python benchmarks/bench_toy_world.py --json toy.json --markdown toy.md --figure docs/toy-world.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _toy import Toy, mean_sd, new_people, photos_of, prompts_for, quiet, write_results  # noqa: E402

import celebbasis as cb  # noqa: E402
from celebbasis.resources import celeb_names  # noqa: E402
from celebbasis.toy import PAIR_SIZE, TOY_PAIR_PROMPTS, world, world_info  # noqa: E402


def celebrities(toy: Toy, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    names = celeb_names()
    looks = world.celebrities(names)
    rows = []
    for name in rng.choice(names, n, replace=False):
        prompts = prompts_for(f"{name} person", rng)
        rows.append(toy.score(toy.draw(prompts, seed=seed), looks[name], prompts))
    return summarize(rows)


def summarize(rows: list[dict]) -> dict:
    like, fid = mean_sd(r["likeness"] for r in rows), mean_sd(r["fidelity"] for r in rows)
    per = {k: float(np.mean([r["per_attribute"][k] for r in rows])) for k in rows[0]["per_attribute"]}
    words = sorted({w for r in rows for w in r["per_word"]})
    per_word = {w: float(np.mean([r["per_word"][w] for r in rows if w in r["per_word"]])) for w in words}
    return {"likeness": like[0], "likeness_sd": like[1], "fidelity": fid[0], "fidelity_sd": fid[1],
            "per_attribute": per, "per_word": per_word, "n": len(rows)}


def new_person_runs(toy: Toy, people, seeds: int, steps: int | None, figure_rows: list) -> tuple[dict, dict, list]:
    learned, floor, times = [], [], []
    for i, person in enumerate(people):
        rng = np.random.default_rng(1000 + i)
        photo = photos_of(person, 1, 1000 + i, toy.tmp)
        name = f"p{i}"
        t = time.time()
        ident = toy.learn([photo], [name], cb.TrainConfig.preset("toy", steps=steps, seed=i, pretrained="none"))[0]
        times.append(time.time() - t)
        prompts = prompts_for(f"<{name}> person", rng)
        for s in range(seeds):
            images = toy.draw(prompts, identities=[ident], seed=s)
            learned.append(toy.score(images, person, prompts))
            if s == 0 and len(figure_rows) < 3:  # and beside a celebrity, as the demo draws
                pair = TOY_PAIR_PROMPTS[0].replace("<id1>", f"<{name}>")
                drawn = cb.generate(toy.pipe, [pair], identities=[ident], seed=s, show_progress=False, **PAIR_SIZE)
                figure_rows.append((photo[0], images + [drawn[0].image], prompts + [pair]))
            plain = [p.replace(f"<{name}> person", "a person") for p in prompts]
            floor.append(toy.score(toy.draw(plain, seed=s), person, plain))
        print(f"  new person {i}: {person.describe()}  likeness {np.mean([r['likeness'] for r in learned[-seeds:]]):.3f}"
              f"  ({times[-1]:.0f} s to learn)", flush=True)
    return summarize(learned), summarize(floor), times


def figure(rows, path: Path) -> None:
    from PIL import Image, ImageDraw

    cell, pad, label_h = 128, 8, 44
    widths = [cell] + [cell * im.width // im.height for im in rows[0][1]]  # a two-person picture is twice as wide
    sheet = Image.new("RGB", (sum(w + pad for w in widths) + pad, len(rows) * (cell + label_h + pad) + pad + 22), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), "toy world (cartoon people, 64 px): one photo of a new person -> <p> person in prompts, and beside a celebrity", fill="black")
    for r, (photo, images, prompts) in enumerate(rows):
        y = 22 + pad + r * (cell + label_h + pad)
        tiles = [Image.open(photo).convert("RGB")] + images
        labels = ["photo (new person)"] + [p.replace("an illustration of", "illustr.").replace("a photo of ", "") for p in prompts]
        x = pad
        for im, text, width in zip(tiles, labels, widths):
            sheet.paste(im.resize((width, cell), Image.NEAREST), (x, y))
            words, lines = text.split(), [""]
            for w in words:
                lines[-1:] = [lines[-1] + " " + w] if len(lines[-1]) + len(w) < 22 * width // cell else [lines[-1], w]
            draw.multiline_text((x, y + cell + 2), "\n".join(l.strip() for l in lines[:3]), fill="black", spacing=1)
            x += width + pad
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def markdown(res: dict) -> str:
    lines = ["| what | likeness (identity attributes read right) | prompt fidelity (colours and smile read right) | n |",
             "|---|---|---|---|"]
    for key, label in (("celebrities", "celebrities (the ceiling)"), ("no_identity", "no identity: `a person` (the floor)"),
                       ("new_people", f"new people, the recipe (toy preset, {res['steps']} steps), one photo each")):
        r = res[key]
        lines.append(f"| {label} | {r['likeness']:.3f} ± {r['likeness_sd']:.3f} | {r['fidelity']:.3f} ± {r['fidelity_sd']:.3f} | {r['n']} |")
    attrs = list(res["celebrities"]["per_attribute"])
    lines += ["", "| per attribute | " + " | ".join(attrs) + " |", "|---|" + "---|" * len(attrs)]
    for key in ("celebrities", "no_identity", "new_people"):
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(f"{res[key]['per_attribute'][a]:.2f}" for a in attrs) + " |")
    words = list(res["celebrities"]["per_word"])
    lines += ["", "| prompt fidelity per word asked for | " + " | ".join(words) + " |", "|---|" + "---|" * len(words)]
    for key in ("celebrities", "no_identity", "new_people"):
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(f"{res[key]['per_word'].get(w, float('nan')):.2f}" for w in words) + " |")
    lines.append("")
    lines.append(f"Learning one new person took {res['learn_seconds_mean']:.0f} s on average "
                 f"({res['threads']} CPU threads); the whole benchmark {res['seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--celebrities", type=int, default=50)
    p.add_argument("--new-people", type=int, default=10)
    p.add_argument("--seeds", type=int, default=2, help="image seeds per new person")
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's, 400)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--figure", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    quiet()
    t0 = time.time()
    toy = Toy()
    print(f"celebrities: {args.celebrities} x 4 prompts ...", flush=True)
    celebs = celebrities(toy, args.celebrities, 0)
    print(f"  likeness {celebs['likeness']:.3f}, prompt fidelity {celebs['fidelity']:.3f}", flush=True)
    print(f"new people: {args.new_people}, one photo each ...", flush=True)
    rows: list = []
    learned, floor, times = new_person_runs(toy, new_people(args.new_people), args.seeds, args.steps, rows)
    res = {"celebrities": celebs, "no_identity": floor, "new_people": learned, "steps": args.steps or 400,
           "learn_seconds_mean": float(np.mean(times)), "threads": args.threads, "seconds": time.time() - t0,
           "world": world_info()}
    write_results(res, markdown(res), args.json, args.markdown)
    if args.figure:
        figure(rows, args.figure)


if __name__ == "__main__":
    main()
