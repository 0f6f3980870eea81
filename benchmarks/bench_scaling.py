"""How celebbasis scales: joint training of 1, 2, 4, 8 people, and generation with 0, 1, 2 identities.

    python benchmarks/bench_scaling.py --arch tiny --steps 20 --resolution 64
    python benchmarks/bench_scaling.py --arch sd-small --steps 10 --resolution 256

Training: per-step time and peak memory for N people trained jointly (same steps, batch 2; every
person is the packaged face under another name, so face detection stays out of the timing).
Generation: seconds per image for the same prompt with 0, 1 and 2 identity words; inserting a
person costs a token lookup, so the ratio to 0 identities should be about 1.
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
    from celebbasis.train import TrainConfig, personalize

    device = torch.device(args.device)
    pipe = load_pipeline(args.model, device=device)
    face = FaceAnalyzer()(example_face())
    people = [face] * n  # compute is what scales; the same face under n names keeps detection out of the timing
    cfg = TrainConfig(steps=args.steps, resolution=args.resolution, views_per_identity=args.views)
    t0 = time.perf_counter()
    personalize(pipe, people, [f"p{i}" for i in range(n)], config=cfg, show_progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"n": n, "seconds": time.perf_counter() - t0, "peak_mb": peak_memory_mb(device)}


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
    p.add_argument("--sample-steps", type=int, default=10, help="denoising steps per generated image")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache", default=".bench-models")
    p.add_argument("--only", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        print(json.dumps(generate_times(args) if args.only == "generate" else train_one(args, int(args.only))))
        return
    from _models import build

    model = build(args.arch, Path(args.cache) / args.arch)
    env = {**os.environ, "CELEBBASIS_CACHE": str(Path(args.cache) / "cache")}

    def sub(only):
        cmd = [sys.executable, __file__, "--only", str(only), "--model", str(model), *sys.argv[1:]]
        return json.loads(subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout.strip().splitlines()[-1])

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
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
