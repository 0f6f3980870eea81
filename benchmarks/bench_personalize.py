"""celebbasis `add` against the textual-inversion recipe, same model, photo, steps, batch, resolution.

    python benchmarks/bench_personalize.py --arch tiny --steps 50 --resolution 64
    python benchmarks/bench_personalize.py --arch sd-small --steps 30 --resolution 256    # CPU, SD proportions
    python benchmarks/bench_personalize.py --arch sd15 --steps 400 --resolution 512 --device cuda   # GPU

(a) the recipe: a faithful re-implementation of diffusers' examples/textual_inversion loop: every
step encodes new views with the VAE, trains the whole token-embedding table with AdamW (and puts
the other rows back afterwards), tokenizes its captions, fp32 (the example's default).
(b) celebbasis: `personalize()` exactly as `celebbasis add` runs it.
Each runs in its own process, so each peak memory is its own. Prints times, memory and the ratio.
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


def run_recipe(pipe, analysis, steps: int, batch: int, resolution: int, seed: int) -> dict:
    """diffusers' textual-inversion training loop, with celebbasis' augmentation for a fair view stream."""
    import numpy as np
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from celebbasis.train import TEMPLATES, TrainConfig, augment, to_tensor

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
        views = [augment(crop, resolution, rng, cfg) for _ in range(batch)]
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


def run_one(which: str, args) -> dict:
    from _models import peak_memory_mb

    if which == "warm":  # build the basis cache outside the timed runs
        from celebbasis.basis import cached_basis
        from celebbasis.models import load_pipeline

        pipe = load_pipeline(args.model, device="cpu", dtype="float32")
        cached_basis(pipe.tokenizer, pipe.text_encoder)
        return {"which": "warm"}

    from celebbasis.face import FaceAnalyzer
    from celebbasis.models import load_pipeline
    from celebbasis.resources import example_face
    from celebbasis.train import TrainConfig, personalize

    device = torch.device(args.device)
    pipe = load_pipeline(args.model, device=device, dtype="float32" if which == "recipe" else args.dtype)
    analysis = FaceAnalyzer()(example_face())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if which == "recipe":
        extra = run_recipe(pipe, analysis, args.steps, args.batch, args.resolution, 0)
    else:
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch, resolution=args.resolution, compile=args.compile,
                          views_per_identity=args.views)
        result = personalize(pipe, [analysis], ["alice"], config=cfg, show_progress=False)
        extra = {"final_loss": sum(result.losses[-10:]) / len(result.losses[-10:])}
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"which": which, "seconds": seconds, "peak_mb": peak_memory_mb(device), **extra}


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
    p.add_argument("--only", choices=["warm", "recipe", "celebbasis"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return
    from _models import build

    model = build(args.arch, Path(args.cache) / args.arch)
    env = {**os.environ, "CELEBBASIS_CACHE": str(Path(args.cache) / "cache")}
    rows = {}
    for which in ("warm", "recipe", "celebbasis"):
        cmd = [sys.executable, __file__, "--only", which, "--model", str(model), *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout.strip().splitlines()[-1]
        rows[which] = json.loads(out)
    a, b = rows["recipe"], rows["celebbasis"]
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"arch={args.arch} steps={args.steps} batch={args.batch} resolution={args.resolution} device={dev}")
    print(f"{'':12}{'seconds':>10}{'s/step':>10}{'peak MB':>10}{'loss(last10)':>14}")
    for name, r in (("TI recipe", a), ("celebbasis", b)):
        print(f"{name:12}{r['seconds']:>10.1f}{r['seconds'] / args.steps:>10.3f}{r['peak_mb']:>10.0f}{r['final_loss']:>14.4f}")
    print(f"speed-up: {a['seconds'] / b['seconds']:.2f}x   memory ratio (recipe/celebbasis): {a['peak_mb'] / b['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
