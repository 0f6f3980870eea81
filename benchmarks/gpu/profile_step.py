"""One training step of `celebbasis add`, profiled, against the UNet-only floor measured in the same run.

    python benchmarks/gpu/profile_step.py --arch sd15 --resolution 512 --device cuda --out gpu-profile/   # a GPU
    python benchmarks/gpu/profile_step.py --arch sd-small --resolution 256 --threads 1 --out cpu-profile/  # a CPU
    python benchmarks/gpu/profile_step.py --arch toy --resolution 64 --threads 1   # the toy world's step

The step is `Personalizer.step()` as `celebbasis add` runs it (random weights of the chosen shapes, the
packaged astronaut, batch 2, the pool of views). Three measurements, one process:

1. **step**: the median wall time of `--steps` real steps (after `--warmup` untimed ones), and of
2. **the floor**: the UNet's forward and its backward to the conditioning alone, on the same batches
   (no text encoder, identity network, optimiser, batch drawing or host reads): what no change to the
   loop can go below, since the gradient must cross the UNet to reach the identity words (and its
   forward alone, to split the backward); the three are timed in turn, so a changing load falls on all;
3. **the profile** of one more step under `torch.profiler`, its time split by phase: batch drawing
   (data), identity network (MLP), text encoder (the conditioning), UNet forward, backward (all of it),
   optimiser, and the rest (the loss, `zero_grad`, the moving averages, `loss.item()`, Python), plus the
   host syncs counted
   (`aten::item`, `aten::_local_scalar_dense`, `cudaStreamSynchronize`, `cudaMemcpy*`) and the
   operators that cost most.

Phases are marked with `record_function` through forward hooks on the pipeline's modules and around the
step's own calls, so the code profiled is the library's. Writes `profile.md`, `profile.json` and a
Chrome trace (`trace.json`, open it in chrome://tracing or Perfetto) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

PHASES = ["data: draw the batch", "mlp: identity network", "text encoder: conditioning", "unet: forward", "backward",
          "optimiser: AdamW step"]  # none inside another; the rest of the step is reported as "rest"
REST = "rest: loss, zero_grad, moving averages, loss.item(), Python"
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy",
            "cudaMemcpyAsync")


def setup(args):
    """The model, the face and a ``Personalizer`` exactly as ``personalize`` builds it."""
    from _models import build

    from celebbasis.config import TrainConfig
    from celebbasis.face import FaceAnalyzer
    from celebbasis.models import load_pipeline, model_name, pipeline_bases
    from celebbasis.resources import example_face
    from celebbasis.train import Personalizer

    steps = args.warmup + args.steps + 1
    if args.arch == "toy":  # the packaged world, its face network and its preset: `celebbasis add --toy`
        from celebbasis.toy import toy_photo

        pipe = load_pipeline(toy=True, device=args.device, dtype=args.dtype)
        analyzer = FaceAnalyzer(encoder="toy")
        analysis = analyzer(toy_photo(1))
        cfg = TrainConfig.preset("toy", steps=steps, batch_size=args.batch, resolution=args.resolution, views=args.views,
                                 compile=args.compile)
    else:
        folder = build(args.arch, Path(args.cache) / args.arch)
        pipe = load_pipeline(str(folder), device=args.device, dtype=args.dtype)
        analyzer = FaceAnalyzer()
        analysis = analyzer(example_face())
        cfg = TrainConfig(steps=steps, batch_size=args.batch, resolution=args.resolution, views=args.views,
                          compile=args.compile)
    trainer = Personalizer(pipe, [analysis], ["alice"], cfg, pipeline_bases(pipe), model_name(pipe), face_net=analyzer.encoder)
    return pipe, trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def floor_fn(trainer, backward: bool = True):
    """The UNet's forward (with autograd, as in training) and, with ``backward``, its backward to the conditioning,
    on a batch and conditioning made once, outside the timing."""
    batch = trainer.sample_batch()
    with torch.no_grad():
        cond, added = trainer.conditioning(batch["captions"], batch["who"], trainer.coefficients(batch))
    device, dtype = trainer.device, trainer.dtype
    cond = cond.to(device, dtype)
    kwargs = {"added_cond_kwargs": {k: v.to(device, dtype) for k, v in added.items()}} if added else {}
    noisy = batch["noisy"].contiguous(memory_format=torch.channels_last) if device.type == "cuda" else batch["noisy"]

    def run():
        c = cond.detach().requires_grad_(True)
        pred = trainer.unet(noisy, batch["timesteps"], encoder_hidden_states=c, **kwargs).sample
        loss = F.mse_loss(pred.float(), batch["target"].float())
        if backward:
            loss.backward()

    return run


@contextmanager
def phases_marked(trainer):
    """``record_function`` ranges around the step's own calls and the UNet's forward; the library's code runs unchanged.

    The step's methods are shadowed on the instance (and ``Tensor.backward`` for the block) by wrappers
    that open a range and call the real one; everything is put back afterwards.
    """
    def marked(real, label):
        def call(*a, **k):
            with record_function(label):
                return real(*a, **k)
        return call

    shadowed = [(trainer, "sample_batch", PHASES[0]), (trainer, "coefficients", PHASES[1]),
                (trainer, "conditioning", PHASES[2]), (trainer.opt, "step", PHASES[5])]
    opened = []
    unet = trainer.pipe.unet
    pre = unet.register_forward_pre_hook(lambda m, a: opened.append(record_function(PHASES[3]).__enter__()))
    post = unet.register_forward_hook(lambda m, a, o: opened.pop().__exit__(None, None, None))
    real_backward = torch.Tensor.backward
    with ExitStack() as undo:
        for obj, name, label in shadowed:
            setattr(obj, name, marked(getattr(obj, name), label))
            undo.callback(vars(obj).pop, name)
        undo.callback(pre.remove)
        undo.callback(post.remove)
        torch.Tensor.backward = marked(real_backward, PHASES[4])
        undo.callback(setattr, torch.Tensor, "backward", real_backward)
        yield


def phase_times(prof, device: torch.device) -> dict[str, dict[str, float]]:
    """Milliseconds per marked phase: host (CPU) time, and device time on CUDA."""
    out = {}
    for e in prof.key_averages():
        if e.key in PHASES:
            out[e.key] = {"cpu_ms": e.cpu_time_total / 1e3,
                          "device_ms": getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) / 1e3}
    return out


def syncs(prof) -> dict[str, int]:
    counts = {}
    for e in prof.key_averages():
        if e.key.startswith(SYNC_OPS):
            counts[e.key] = counts.get(e.key, 0) + e.count
    return counts


def top_ops(prof, device: torch.device, n: int = 15) -> list[dict]:
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True):
        if e.key in PHASES:
            continue
        rows.append({"op": e.key, "calls": e.count, "self_ms": getattr(e, key, 0) / 1e3})
        if len(rows) == n:
            break
    return rows


def run(args) -> dict:
    pipe, trainer = setup(args)
    device = trainer.device
    with trainer:
        for _ in range(args.warmup):
            trainer.step()
        floor, forward = floor_fn(trainer), floor_fn(trainer, backward=False)
        timed(floor, 1, device)  # warm
        step_s, floor_s, floor_forward_s = [], [], []
        for _ in range(args.steps):  # interleaved, so that a change in the machine's load falls on all three alike
            step_s += timed(trainer.step, 1, device)
            floor_s += timed(floor, 1, device)
            floor_forward_s += timed(forward, 1, device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with phases_marked(trainer):
            sync(device)
            with profile(activities=activities, record_shapes=False) as prof:
                t0 = time.perf_counter()
                trainer.step()
                sync(device)
                profiled_s = time.perf_counter() - t0
    phases = phase_times(prof, device)
    phases[REST] = {"cpu_ms": max(0.0, profiled_s * 1e3 - sum(v["cpu_ms"] for v in phases.values())), "device_ms": 0.0}
    result = {
        "arch": args.arch, "device": str(device), "dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "resolution": args.resolution, "batch": args.batch, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "steps_timed": args.steps,
        "step_s": sorted(step_s)[len(step_s) // 2], "step_s_all": [round(s, 4) for s in step_s],
        "floor_s": sorted(floor_s)[len(floor_s) // 2], "floor_s_all": [round(s, 4) for s in floor_s],
        "floor_forward_s": sorted(floor_forward_s)[len(floor_forward_s) // 2],
        "profiled_step_s": profiled_s, "phases": phases, "syncs": syncs(prof), "top_ops": top_ops(prof, device),
        "load_before": os.getloadavg()[0],
    }
    result["step_over_floor"] = result["step_s"] / result["floor_s"]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(args.out / "trace.json"))
    return result


def markdown(r: dict) -> str:
    dev = r["device"].startswith("cuda")
    lines = [f"One training step, {r['arch']}, {r['resolution']} px, batch {r['batch']}, {r['dtype']} on {r['device']} "
             f"({r['threads']} CPU thread(s), torch {r['torch']}; load average {r['load_before']:.2f} before).", "",
             f"- step (median of {r['steps_timed']}): **{r['step_s']:.3f} s**; UNet forward + backward to the "
             f"conditioning alone (the floor): **{r['floor_s']:.3f} s**; step / floor = **{r['step_over_floor']:.2f}x**",
             f"- the profiled step took {r['profiled_step_s']:.3f} s (the profiler adds its own cost)",
             f"- the floor's forward alone: {r['floor_forward_s']:.3f} s, so its backward takes about "
             f"{r['floor_s'] - r['floor_forward_s']:.3f} s; the rest of the step's backward is the text encoder's and the "
             "identity network's", "",
             "| phase | host ms | " + ("device ms | " if dev else "") + "share of the profiled step |",
             "|---|---|" + ("---|" if dev else "") + "---|"]
    total = r["profiled_step_s"] * 1e3
    for name in PHASES + [REST]:
        v = r["phases"].get(name, {"cpu_ms": 0.0, "device_ms": 0.0})
        main = v["device_ms"] if dev and name != REST else v["cpu_ms"]
        lines.append(f"| {name} | {v['cpu_ms']:.1f} | " + (f"{v['device_ms']:.1f} | " if dev else "") + f"{100 * main / total:.0f} % |")
    lines += ["", "No phase lies inside another. \"backward\" is the UNet's, the text encoder's and the MLP's backward "
              "together; \"rest\" is the profiled step's wall time less the phases' host time.", "",
              "Host syncs: " + (", ".join(f"{k} x{v}" for k, v in sorted(r["syncs"].items())) or "none recorded"), "",
              "| top operators by self time | calls | self ms |", "|---|---|---|"]
    lines += [f"| `{o['op']}` | {o['calls']} | {o['self_ms']:.1f} |" for o in r["top_ops"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sd-small", choices=["tiny", "toy", "sd-small", "sd15"],
                   help="model shapes, random weights (toy: the packaged toy world, its trained weights)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", help="frozen weights' precision (auto: float16 on a GPU, float32 on a CPU)")
    p.add_argument("--views", type=int, default=8, help="the pool of views (64 in `add`; fewer start faster, steps alike)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="timed steps, and timed floor runs")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet, as `add --compile`")
    p.add_argument("--cache", default=str(ROOT / ".bench-models"), help="where model folders are built once")
    p.add_argument("--out", type=Path, help="write profile.md, profile.json and trace.json here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # a script's own process: its main may
    os.environ.setdefault("CELEBBASIS_CACHE", str(Path(args.cache) / "cache"))
    result = run(args)
    table = markdown(result)
    print(table, end="")
    if args.out:
        (args.out / "profile.md").write_text(table)
        (args.out / "profile.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
