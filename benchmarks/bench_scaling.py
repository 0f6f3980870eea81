"""How celebbasis scales: joint training of 1, 2, 4, 8 people, and generation with 0, 1, 2 identities.

    python benchmarks/bench_scaling.py --arch tiny --steps 20 --resolution 64
    python benchmarks/bench_scaling.py --arch sd-small --steps 10 --resolution 256
    python benchmarks/bench_scaling.py --arch sd-small --steps 10 --resolution 256 --photos 1 5

Training: per-step time and peak memory for N people trained jointly (same steps, batch 2; every
person is the packaged face under another name, so face detection stays out of the timing).
Generation: seconds per image for the same prompt with 0, 1 and 2 identity words; inserting a
person costs a token lookup, so the ratio to 0 identities should be about 1.
Photos (``--photos 1 5``, instead of the above): one person learned from 1 and from 5 photos with
the same steps; seconds per step are the median time between steps (face detection
and the pool of views, which do grow with the photos, are reported apart). A step should cost the
same whatever the number of photos.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def train_one(args, n: int) -> dict:
    from _models import peak_memory_mb

    from celebbasis.face import FaceAnalyzer
    from celebbasis.models import load_pipeline
    from celebbasis.resources import example_face
    from celebbasis.config import TrainConfig
    from celebbasis.train import personalize

    device = torch.device(args.device)
    pipe = load_pipeline(args.model, device=device)
    face = FaceAnalyzer()(example_face())
    people = [face] * n  # compute is what scales; the same face under n names keeps detection out of the timing
    cfg = TrainConfig(steps=args.steps, resolution=args.resolution, views=args.views)
    t0 = time.perf_counter()
    personalize(pipe, people, [f"p{i}" for i in range(n)], config=cfg, show_progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"n": n, "seconds": time.perf_counter() - t0, "peak_mb": peak_memory_mb(device)}


def photo_variants(folder: Path, n: int) -> list[Path]:
    """``n`` different photos of one person: the packaged face, mirrored, shifted, smaller, brighter."""
    from PIL import Image, ImageEnhance, ImageOps

    from celebbasis.resources import example_face

    face = Image.open(example_face()).convert("RGB")
    w, h = face.size
    variants = [
        face,
        ImageOps.mirror(face),
        ImageOps.expand(face, border=(w // 8, h // 10, 0, 0)),
        face.resize((w * 3 // 4, h * 3 // 4), Image.BICUBIC),
        ImageEnhance.Brightness(face).enhance(1.25),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"alice_{i}.png"
        variants[i % len(variants)].save(path)
        out.append(path)
    return out


def train_photos(args, k: int) -> dict:
    """One person from ``k`` photos (``personalize(pipe, [[p1, ..., pk]], ["alice"])``); per-step timing."""
    from _models import peak_memory_mb

    from celebbasis.models import load_pipeline
    from celebbasis.config import TrainConfig
    from celebbasis.train import personalize

    device = torch.device(args.device)
    pipe = load_pipeline(args.model, device=device)
    photos = photo_variants(Path(args.cache) / "photos", k)
    cfg = TrainConfig(steps=args.steps, resolution=args.resolution, views=args.views)
    stamps = []

    def tick(step, total, loss):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    personalize(pipe, [photos if k > 1 else photos[0]], ["alice"], config=cfg, show_progress=False, callback=tick)
    steps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    per_step = steps[len(steps) // 2] if steps else float("nan")  # the median: robust to a busy machine's stalls
    return {"photos": k, "seconds": time.perf_counter() - t0, "setup_seconds": stamps[0] - t0 - per_step,
            "s_per_step": per_step, "peak_mb": peak_memory_mb(device)}


def generate_times(args) -> list[dict]:
    from celebbasis.basis import build_basis
    from celebbasis.generate import generate
    from celebbasis.identity import Identity
    from celebbasis.models import load_pipeline

    pipe = load_pipeline(args.model, device=args.device)
    basis = build_basis(pipe.tokenizer, pipe.text_encoder)
    g = torch.Generator().manual_seed(0)
    ids = [Identity.from_coefficients(f"<p{i}>", torch.nn.functional.normalize(torch.randn(2, basis.n_components, generator=g), dim=-1),
                                      basis) for i in range(2)]
    prompts = {0: "a photo of a person and a person dancing", 1: "a photo of <p0> person and a person dancing",
               2: "a photo of <p0> person and <p1> person dancing"}
    out = []
    generate(pipe, prompts[0], identities=ids, steps=2, height=args.resolution, width=args.resolution, show_progress=False)
    for k, prompt in prompts.items():
        t0 = time.perf_counter()
        for rep in range(args.repeats):
            generate(pipe, prompt, steps=args.sample_steps, height=args.resolution, width=args.resolution, seed=rep,
                     show_progress=False)
        out.append({"identities": k, "seconds_per_image": (time.perf_counter() - t0) / args.repeats})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny", choices=["tiny", "sd-small", "sd15"])
    p.add_argument("--steps", type=int, default=20, help="training steps per run")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--views", type=int, default=16, help="views per person in the pool")
    p.add_argument("--people", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--photos", type=int, nargs="+", help="instead: one person from this many photos each (e.g. 1 5)")
    p.add_argument("--sample-steps", type=int, default=10, help="denoising steps per generated image")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache", default=".bench-models")
    p.add_argument("--only", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        if args.only == "generate":
            print(json.dumps(generate_times(args)))
        elif args.only.startswith("photos"):
            print(json.dumps(train_photos(args, int(args.only.removeprefix("photos")))))
        else:
            print(json.dumps(train_one(args, int(args.only))))
        return
    from _models import build

    model = build(args.arch, Path(args.cache) / args.arch)
    env = {**os.environ, "CELEBBASIS_CACHE": str(Path(args.cache) / "cache")}

    def sub(only):
        cmd = [sys.executable, __file__, "--only", str(only), "--model", str(model), *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    if args.photos:
        print(f"one person from several photos: arch={args.arch} steps={args.steps} resolution={args.resolution} "
              f"views={args.views} device={dev}")
        print("| photos | s/step (median) | vs 1 photo | setup s (detection + pool) | total s | peak MB |")
        print("|---|---|---|---|---|---|")
        base = None
        for k in args.photos:
            try:
                r = sub(f"photos{k}")
            except RuntimeError as e:
                print(f"| {k} | not supported by this version: {e} | | | | |")
                continue
            base = base or r["s_per_step"]
            print(f"| {k} | {r['s_per_step']:.3f} | {r['s_per_step'] / base:.2f} | {r['setup_seconds']:.1f} | "
                  f"{r['seconds']:.1f} | {r['peak_mb']:.0f} |")
        return
    print(f"arch={args.arch} steps={args.steps} resolution={args.resolution} device={dev}")
    print(f"{'people':>8}{'seconds':>10}{'s/step':>10}{'peak MB':>10}{'time vs 1':>11}")
    base = None
    for n in args.people:
        r = sub(n)
        base = base or r["seconds"]
        print(f"{n:>8}{r['seconds']:>10.1f}{r['seconds'] / args.steps:>10.3f}{r['peak_mb']:>10.0f}{r['seconds'] / base:>11.2f}")
    rows = sub("generate")
    print(f"{'identities in prompt':>22}{'s/image':>10}{'vs 0':>8}")
    for r in rows:
        print(f"{r['identities']:>22}{r['seconds_per_image']:>10.3f}{r['seconds_per_image'] / rows[0]['seconds_per_image']:>8.2f}")


if __name__ == "__main__":
    main()
