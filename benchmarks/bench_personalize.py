"""celebbasis `add` against the textual-inversion recipe, same model, photo, steps, batch, resolution.

    python benchmarks/bench_personalize.py --arch tiny --steps 50 --resolution 64
    python benchmarks/bench_personalize.py --arch sd-small --steps 30 --resolution 256    # CPU, SD proportions
    python benchmarks/bench_personalize.py --arch sd15 --steps 400 --resolution 512 --device cuda \
        --json results/personalize.json --markdown results/personalize.md   # GPU (scripts/gpu-check.sh runs this)

(a) the recipe: a faithful re-implementation of diffusers' examples/textual_inversion loop: every
step encodes new views with the VAE, trains the whole token-embedding table with AdamW (and puts
the other rows back afterwards), tokenizes its captions, fp32 (the example's default).
(b) celebbasis: `personalize()` exactly as `celebbasis add` runs it.
Each runs in its own process, so each peak memory is its own. Prints seconds, steps/s, peak
memory (torch.cuda.max_memory_allocated on a GPU, resident set size on the CPU) and the ratios;
``--json`` and ``--markdown`` also write them, with the targets (``--target-*``) met or missed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def run_recipe(pipe, analysis, steps: int, batch: int, resolution: int, seed: int) -> dict:
    """diffusers' textual-inversion training loop, with celebbasis' augmentation for a fair view stream."""
    import numpy as np
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from celebbasis.config import TrainConfig
    from celebbasis.prompts import TEMPLATES
    from celebbasis.train.augment import augment_view
    from celebbasis.train.views import to_tensor

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok, te, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    device = unet.device
    tokens = ["<alice>", "<alice>_1"]
    tok.add_tokens(tokens)
    te.resize_token_embeddings(len(tok))
    ids = tok.convert_tokens_to_ids(tokens)
    emb = te.get_input_embeddings()
    init = tok.convert_tokens_to_ids(["person</w>"])[0]
    with torch.no_grad():
        emb.weight[ids] = emb.weight[init].clone()
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    te.requires_grad_(False)  # everything but the token table, as the example freezes it
    emb.weight.requires_grad_(True)
    opt = torch.optim.AdamW(emb.parameters(), lr=5e-4 * batch)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    orig = emb.weight.detach().clone()
    keep = torch.ones(len(tok), dtype=torch.bool)
    keep[ids] = False
    crop = analysis.crop(resolution)
    cfg = TrainConfig(resolution=resolution)
    te.train()
    losses = []
    for _ in range(steps):
        views = [augment_view(crop, resolution, rng, cfg)[0] for _ in range(batch)]
        caps = [TEMPLATES[int(rng.integers(len(TEMPLATES)))].format("face of <alice> <alice>_1 person") for _ in range(batch)]
        latents = vae.encode(to_tensor(views).to(device)).latent_dist.sample().detach() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        input_ids = tok(caps, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt").input_ids
        cond = te(input_ids.to(device))[0]
        pred = unet(noisy, t, cond).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():  # the example restores every row but the new tokens' after each step
            emb.weight[keep] = orig[keep]
        losses.append(loss.item())
    return {"final_loss": float(np.mean(losses[-10:]))}


_FACE: dict = {}


def run_one(which: str, args) -> dict:
    from _models import peak_memory_mb

    from celebbasis.face import FaceAnalyzer
    from celebbasis.models import load_pipeline
    from celebbasis.resources import example_face
    from celebbasis.config import TrainConfig
    from celebbasis.train import personalize

    device = torch.device(args.device)
    pipe = load_pipeline(args.model, device=device, dtype="float32" if which == "recipe" else args.dtype)
    t_face = time.perf_counter()
    if "face" not in _FACE:  # detected once per process (--in-process runs both here)
        _FACE["face"] = FaceAnalyzer()(example_face())
    analysis = _FACE["face"]
    face_seconds = time.perf_counter() - t_face
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if which == "recipe":
        extra = run_recipe(pipe, analysis, args.steps, args.batch, args.resolution, 0)
    else:
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch, resolution=args.resolution, compile=args.compile,
                          views=args.views)
        result = personalize(pipe, [analysis], ["alice"], config=cfg, show_progress=False)
        extra = {"final_loss": sum(result.losses[-10:]) / len(result.losses[-10:])}
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"which": which, "seconds": seconds, "steps_per_s": args.steps / seconds, "peak_mb": peak_memory_mb(device),
            "face_seconds": face_seconds, "dtype": str(pipe.unet.dtype).removeprefix("torch."), **extra}


def warm_basis(model: Path, cache: str) -> None:
    """Build the model's basis into the cache once, outside the timed runs."""
    os.environ["CELEBBASIS_CACHE"] = cache
    from celebbasis.models import load_pipeline, pipeline_bases

    pipeline_bases(load_pipeline(str(model), device="cpu", dtype="float32"))


def summarize(args, rows: dict) -> dict:
    """The run's numbers, ratios and targets as one JSON-able dict."""
    import diffusers

    a, b = rows["recipe"], rows["celebbasis"]
    cuda = args.device.startswith("cuda")
    summary = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {platform.machine()})",
        "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
        "arch": args.arch, "steps": args.steps, "batch": args.batch, "resolution": args.resolution,
        "views": args.views, "compile": args.compile,
        "peak_memory": "torch.cuda.max_memory_allocated" if cuda else
                       "resident set size" + (" (one process for both: the larger)" if args.in_process else ""),
        "recipe": a, "celebbasis": b,
        "speedup": a["seconds"] / b["seconds"],
        "memory_ratio": a["peak_mb"] / b["peak_mb"],
        "seconds_per_identity": b["seconds"],  # one person: the pool, then every step; load and detection excluded
    }
    targets = []
    if args.target_speedup is not None:
        targets.append(("speed-up vs recipe", f">= {args.target_speedup:g}x", f"{summary['speedup']:.2f}x",
                        summary["speedup"] >= args.target_speedup))
    if args.target_seconds is not None:
        targets.append(("seconds per identity", f"<= {args.target_seconds:g} s", f"{b['seconds']:.1f} s",
                        b["seconds"] <= args.target_seconds))
    if args.target_peak_gb is not None:
        gb = b["peak_mb"] / 1024
        targets.append(("peak memory (celebbasis)", f"<= {args.target_peak_gb:g} GB", f"{gb:.2f} GB", gb <= args.target_peak_gb))
    summary["targets"] = [{"what": w, "target": t, "measured": m, "met": ok} for w, t, m, ok in targets]
    summary["targets_met"] = all(ok for *_, ok in targets)
    return summary


def markdown(s: dict) -> str:
    """A Markdown report of ``summarize``'s dict: the setting, one row per method, then the targets."""
    lines = [
        f"Personalization benchmark, {s['date']}: {s['device']}, torch {s['torch']} (CUDA {s['cuda']}), "
        f"diffusers {s['diffusers']}.",
        f"Model `{s['arch']}` (random weights), {s['steps']} steps, batch {s['batch']}, {s['resolution']} px, "
        f"celebbasis pool of {s['views']} views{', torch.compile' if s['compile'] else ''}; peak memory is "
        f"{s['peak_memory']}.",
        "",
        "| method | precision | seconds | s/step | steps/s | peak MB | loss (last 10) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in (("textual-inversion recipe", s["recipe"]), ("celebbasis", s["celebbasis"])):
        lines.append(f"| {name} | {r['dtype']} | {r['seconds']:.1f} | {r['seconds'] / s['steps']:.3f} | {r['steps_per_s']:.2f} | "
                     f"{r['peak_mb']:.0f} | {r['final_loss']:.4f} |")
    lines += ["", f"Speed-up **{s['speedup']:.2f}x**, memory ratio (recipe / celebbasis) {s['memory_ratio']:.2f}x, "
              f"{s['seconds_per_identity']:.1f} s per identity (model load and face detection excluded; detection took "
              f"{s['celebbasis']['face_seconds']:.1f} s)."]
    if s["targets"]:
        lines += ["", "| target | wanted | measured | |", "|---|---|---|---|"]
        lines += [f"| {t['what']} | {t['target']} | {t['measured']} | {'met' if t['met'] else '**missed**'} |" for t in s["targets"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny", choices=["tiny", "sd-small", "sd15"], help="model shapes (random weights)")
    p.add_argument("--steps", type=int, default=50, help="optimisation steps for both")
    p.add_argument("--batch", type=int, default=2, help="batch size for both")
    p.add_argument("--resolution", type=int, default=64, help="training resolution for both")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", help="celebbasis' frozen-weight precision (the recipe is fp32)")
    p.add_argument("--views", type=int, default=64, help="celebbasis' pool of views per person")
    p.add_argument("--compile", action="store_true", help="torch.compile celebbasis' UNet")
    p.add_argument("--cache", default=".bench-models", help="where model folders are built once")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, help="write the results as a Markdown table here")
    p.add_argument("--target-speedup", type=float, help="report whether celebbasis is at least this many times faster")
    p.add_argument("--target-seconds", type=float, help="report whether one identity takes at most this many seconds")
    p.add_argument("--target-peak-gb", type=float, help="report whether celebbasis' peak memory is at most this (GiB)")
    p.add_argument("--in-process", action="store_true",
                   help="run both in this process (starts faster; CPU peak memory is then this process's, not each run's)")
    p.add_argument("--only", choices=["recipe", "celebbasis"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return
    from _models import build

    model = build(args.arch, Path(args.cache) / args.arch)
    cache = str(Path(args.cache) / "cache")
    env = {**os.environ, "CELEBBASIS_CACHE": cache}
    warm_basis(model, cache)
    rows = {}
    for which in ("recipe", "celebbasis"):
        if args.in_process:
            args.model = str(model)
            rows[which] = run_one(which, args)
            continue
        cmd = [sys.executable, __file__, "--only", which, "--model", str(model), *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"the {which} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        rows[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = summarize(args, rows)
    report = markdown(summary)
    print(report, end="")
    for path, text in ((args.json, json.dumps(summary, indent=2) + "\n"), (args.markdown, report)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
