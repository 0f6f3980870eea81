"""Does the view pool change what is learned? Pool of encoded views vs fresh views every step.

    python benchmarks/bench_view_pool.py --arch sd-small --resolution 128 --steps 80 --threads 1   # CPU, 4 runs
    python benchmarks/bench_view_pool.py --arch tiny --resolution 64 --steps 20          # a smoke test

celebbasis encodes ``--views`` augmented views per person once and draws every step's latent from
a stored view's VAE posterior; the textual-inversion recipe encodes new views every step. The same
person is learned both ways (same photo, steps; the same seed gives the same network start, noise
and timesteps, so only the view source differs), with two seeds: the cross-seed comparison is the
scale of run-to-run noise. Reported:

(a) the diffusion loss of each learned identity on a held-out set of fresh views (another
    augmentation seed) with FIXED noise and timesteps, so the only thing that differs between rows
    is the identity; also for the untrained start (the network's first prediction);
(b) cosines between learned coefficient sets, flattened (K*n), and between their displacements
    from their own start (what training added).

The pool changes nothing that matters when (pool - fresh) is small next to (start - fresh) in
(a), and cos(pool, fresh) is at least cos(fresh seed A, fresh seed B) in (b).
Uses only the public training API (``personalize``, ``Personalizer``, ``pipeline_bases``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def train(model: Path, photo: Path, args, *, views: int, seed: int) -> dict:
    """One personalization run; returns the saved coefficients and the seconds it took."""
    from celebbasis.models import load_pipeline
    from celebbasis.config import TrainConfig
    from celebbasis.train import personalize

    pipe = load_pipeline(str(model), device=args.device, dtype="float32")
    cfg = TrainConfig(steps=args.steps, resolution=args.resolution, views=views, seed=seed)
    t0 = time.perf_counter()
    result = personalize(pipe, [photo], ["alice"], config=cfg, show_progress=False)
    seconds = time.perf_counter() - t0
    return {"coefficients": result.identities[0].coefficients.float().cpu(), "seconds": seconds,
            "train_loss_last10": sum(result.losses[-10:]) / len(result.losses[-10:])}


class HeldOut:
    """Fresh views of the person with fixed noise and timesteps, and the loss of any coefficients on them."""

    def __init__(self, model: Path, photo: Path, args):
        from celebbasis.face import FaceAnalyzer
        from celebbasis.models import load_pipeline, pipeline_bases

        self.pipe = load_pipeline(str(model), device=args.device, dtype="float32")
        self.bases = pipeline_bases(self.pipe)
        self.analyses = [FaceAnalyzer()(photo)]
        self.args = args

    def _personalizer(self, seed: int):
        from celebbasis.config import TrainConfig
        from celebbasis.train import Personalizer

        cfg = TrainConfig(steps=1, resolution=self.args.resolution, views=0, seed=seed)
        return Personalizer(self.pipe, self.analyses, ["alice"], cfg, self.bases, "bench")

    def start(self, seed: int) -> torch.Tensor:
        """The untrained network's prediction for this person with ``seed``: (K, n), unit rows."""
        with self._personalizer(seed) as p, torch.no_grad():
            return torch.nn.functional.normalize(p.coefficients()[0][0].float().cpu(), dim=-1)

    def losses(self, coefficient_sets: dict) -> dict:
        """Mean diffusion loss over the held-out batches with each (K, n) coefficient set as the person.

        The batches come from a ``Personalizer`` with fresh views and its own seed: views, noise
        and timesteps are drawn once and shared by every coefficient set.
        """
        with self._personalizer(self.args.heldout_seed) as ev, torch.no_grad():
            batches = [ev.sample_batch() for _ in range(self.args.heldout_batches)]
            out = {}
            for key, c in coefficient_sets.items():
                total = 0.0
                for b in batches:  # the same person's coefficients for every element of the batch: (B, K, n)
                    coeffs = [c.unsqueeze(0).expand(len(b["who"]), -1, -1).to(ev.device)]
                    total += ev.loss(b, coeffs).item()
                out[key] = total / len(batches)
            return out


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd-small", choices=["tiny", "sd-small", "sd15"], help="model shapes (random weights)")
    p.add_argument("--steps", type=int, default=80, help="optimisation steps per run")
    p.add_argument("--resolution", type=int, default=128, help="training resolution")
    p.add_argument("--views", type=int, default=64, help="the pool's views per person")
    p.add_argument("--seed", type=int, default=0, help="seed of the pool run and the first fresh run")
    p.add_argument("--other-seed", type=int, default=1, help="seed of the second fresh run (run-to-run scale)")
    p.add_argument("--heldout-batches", type=int, default=32, help="held-out batches (batch 2) for the loss")
    p.add_argument("--heldout-seed", type=int, default=12345, help="seed of the held-out views, noise and timesteps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache", default=".bench-models", help="where model folders are built once")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a machine shared with other jobs)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("CELEBBASIS_CACHE", str(Path(args.cache) / "cache"))

    from _models import build
    from celebbasis.resources import example_face

    model = build(args.arch, Path(args.cache) / args.arch)
    photo = example_face()
    t0 = time.perf_counter()
    held = HeldOut(model, photo, args)
    s0, s1 = args.seed, args.other_seed
    runs = {(kind, seed): train(model, photo, args, views=args.views if kind == "pool" else 0, seed=seed)
            for seed in (s0, s1) for kind in ("pool", "fresh")}
    starts = {seed: held.start(seed) for seed in (s0, s1)}
    losses = held.losses({**{("start", seed): c for seed, c in starts.items()},
                          **{key: r["coefficients"] for key, r in runs.items()}})
    start_loss = {seed: losses["start", seed] for seed in (s0, s1)}
    for key, r in runs.items():
        r["heldout_loss"] = losses[key]
        r["moved"] = r["coefficients"] - starts[key[1]]

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    print(f"arch={args.arch} steps={args.steps} resolution={args.resolution} views={args.views} seeds={s0},{s1} "
          f"held-out={args.heldout_batches}x2 fresh views (seed {args.heldout_seed}) device={dev} torch={torch.__version__}")
    print()
    print("(a) held-out loss (the same fresh views, noise and timesteps for every row)")
    print()
    print("| seed | untrained start | pool of %d | fresh every step | (pool - fresh) / (start - fresh) | train s pool / fresh |" % args.views)
    print("|---|---|---|---|---|---|")
    gaps = {}
    for seed in (s0, s1):
        a, pool, fresh = start_loss[seed], runs["pool", seed], runs["fresh", seed]
        gain = a - fresh["heldout_loss"]
        gaps[seed] = (pool["heldout_loss"] - fresh["heldout_loss"]) / gain if gain else float("nan")
        print(f"| {seed} | {a:.5f} | {pool['heldout_loss']:.5f} ({pool['heldout_loss'] / a:.4f}) | "
              f"{fresh['heldout_loss']:.5f} ({fresh['heldout_loss'] / a:.4f}) | {gaps[seed]:+.1%} | "
              f"{pool['seconds']:.0f} / {fresh['seconds']:.0f} |")
    print()
    print("(b) cosine between learned coefficients (flattened K x n), and between what training added to each")
    print("    run's own start (displacement). The same seed shares the network start, noise and timesteps:")
    print("    only the view source differs. Another seed changes everything.")
    print()
    print("| pair | cos(coefficients) | cos(displacement) |")
    print("|---|---|---|")
    pairs = {
        f"pool vs fresh, seed {s0}": (("pool", s0), ("fresh", s0)),
        f"pool vs fresh, seed {s1}": (("pool", s1), ("fresh", s1)),
        f"fresh seed {s0} vs fresh seed {s1}": (("fresh", s0), ("fresh", s1)),
        f"pool seed {s0} vs pool seed {s1}": (("pool", s0), ("pool", s1)),
    }
    cosines = {}
    for label, (x, y) in pairs.items():
        x, y = runs[x], runs[y]
        cosines[label] = (cos(x["coefficients"], y["coefficients"]), cos(x["moved"], y["moved"]))
        print(f"| {label} | {cosines[label][0]:.4f} | {cosines[label][1]:.4f} |")
    print(f"| start seed {s0} vs start seed {s1} | {cos(starts[s0], starts[s1]):.4f} | - |")
    for (kind, seed), r in runs.items():
        print(f"| {kind} seed {seed} vs its start | {cos(r['coefficients'], starts[seed]):.4f} | - |")
    pf = (cosines[f"pool vs fresh, seed {s0}"][1] + cosines[f"pool vs fresh, seed {s1}"][1]) / 2
    ff = cosines[f"fresh seed {s0} vs fresh seed {s1}"][1]
    speed = sum(runs["fresh", s]["seconds"] for s in (s0, s1)) / sum(runs["pool", s]["seconds"] for s in (s0, s1))
    print()
    print(f"displacement cosine pool-vs-fresh (mean of both seeds) {pf:.3f} vs fresh-vs-fresh across seeds {ff:.3f}; "
          f"held-out gap pool-fresh as a share of the training gain: {gaps[s0]:+.1%}, {gaps[s1]:+.1%}; "
          f"training time fresh / pool: {speed:.2f}x; whole benchmark {time.perf_counter() - t0:.0f} s")
    if args.json:
        out = {"args": {k: str(v) for k, v in vars(args).items()}, "device": dev,
               "start_heldout_loss": {str(k): v for k, v in start_loss.items()},
               "runs": {f"{kind} seed {seed}": {kk: vv for kk, vv in r.items() if kk not in ("coefficients", "moved")}
                        for (kind, seed), r in runs.items()},
               "cosines": {k: {"coefficients": a, "displacement": b} for k, (a, b) in cosines.items()}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
