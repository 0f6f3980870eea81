"""`celebbasis add` at 1 and 2 torch threads, on a quiet machine and beside one busy process.

    python benchmarks/bench_threads.py                                # toy world and sd-small, 1 and 2 threads
    python benchmarks/bench_threads.py --models toy --threads 1 2 4 --json threads.json --markdown threads.md

Each run is the whole command as a user types it, in its own process: `celebbasis add PHOTO --name p
MODEL_FLAGS --steps N --threads T` (the toy world: its packaged person-1; `sd-small`: the packaged
astronaut with dlib, `--resolution 256 --views 4`). Wall-clock seconds include starting Python and
loading the model; the training seconds are the run file's. "busy" starts one process that spins on
a core (`while True: pass`, stopped after the run and at most `--busy-limit` seconds in any case),
"quiet" starts none. Before each run the load is measured for two seconds from /proc/stat (cores in
use, and processes running or waiting for a core) and written beside the result, so the table says
which load held: a machine that is not quiet today shows it there. One untimed run per model first builds and caches its basis.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parent.parent
BUSY = "import time\nend = time.time() + {limit}\nwhile time.time() < end:\n    pass\n"


def model_flags(model: str, folder: Path) -> tuple[list[str], str]:
    """The `add` flags and the photo for a model name."""
    from celebbasis.resources import example_face
    from celebbasis.toy import toy_photo

    if model == "toy":
        return ["--toy"], str(toy_photo(1))
    from _models import build

    path = build(model, folder / model)
    size = {"tiny": 64, "sd-small": 256}[model]
    return ["--model", str(path), "--resolution", str(size), "--views", "4"], str(example_face())


def load_now(seconds: float = 2.0) -> dict:
    """The load a run is about to meet, over ``seconds``: cores in use and processes wanting a core.

    ``cores_busy``: CPU use of the whole machine from /proc/stat (0 idle, 1.0 one busy core; it cannot show
    more demand than there are cores). ``runnable``: the mean number of processes running or waiting for
    a core (/proc/stat ``procs_running``, sampled every 0.1 s, this sampler left out): more than the
    number of cores means they queue.
    """
    def stat():
        with open("/proc/stat") as fh:
            lines = fh.read().splitlines()
        values = [int(v) for v in lines[0].split()[1:]]
        running = next(int(line.split()[1]) for line in lines if line.startswith("procs_running"))
        return sum(values), values[3] + values[4], running  # total, idle + iowait, runnable now

    t0, i0, _ = stat()
    runnable = []
    end = time.time() + seconds
    while time.time() < end:
        time.sleep(0.1)
        runnable.append(stat()[2] - 1)  # not this sampler
    t1, i1, _ = stat()
    busy = (1 - (i1 - i0) / max(1, t1 - t0)) * os.cpu_count()
    return {"cores_busy": round(busy, 2), "runnable": round(sum(runnable) / len(runnable), 2)}


def run_add(flags: list[str], photo: str, steps: int, threads: int, out: Path, cache: Path) -> dict:
    """One `celebbasis add` in its own process: wall seconds and the run file's training seconds."""
    env = {**os.environ, "CELEBBASIS_CACHE": str(cache)}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # --threads decides, nothing else
        env.pop(name, None)
    cmd = [sys.executable, "-m", "celebbasis.cli", "add", photo, "--name", "p", *flags, "--steps", str(steps),
           "--threads", str(threads), "-o", str(out), "--overwrite", "-q"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    run = json.loads((out / "p.run.json").read_text())
    return {"wall_s": round(wall, 2), "train_s": run["seconds"]}


def measure(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model in args.models:
            flags, photo = model_flags(model, args.model_dir)
            steps = args.steps.get(model, 10)
            run_add(flags, photo, 1, 1, tmp / "out", tmp / "cache")  # builds and caches the basis; not timed
            for load in args.loads:
                for threads in args.threads:
                    busy = None
                    if load == "busy":
                        busy = subprocess.Popen([sys.executable, "-c", BUSY.format(limit=args.busy_limit)])
                        time.sleep(0.5)
                    try:
                        load_before = load_now()  # the load this run meets: the machine's, plus our busy process
                        result = run_add(flags, photo, steps, threads, tmp / "out", tmp / "cache")
                    finally:
                        if busy is not None:
                            busy.terminate()
                            busy.wait()
                    row = {"model": model, "steps": steps, "load": load, "threads": threads,
                           **load_before, **result}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def markdown(rows: list[dict], info: dict) -> str:
    lines = [f"`celebbasis add` by torch threads ({info['date']}, {info['machine']}, {info['cpus']} cores, torch "
             f"{info['torch']}). Load in the 2 s before each run: cores in use, and processes running or waiting "
             "for a core (besides the benchmark; the busy process counts).", "",
             "| model | steps | load | cores in use | runnable processes | threads | wall s | training s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['load']} | {r['cores_busy']:.2f} | {r['runnable']:.1f} | "
                     f"{r['threads']} | {r['wall_s']:.1f} | {r['train_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["toy", "sd-small"], choices=["toy", "tiny", "sd-small"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--loads", nargs="+", default=["quiet", "busy"], choices=["quiet", "busy"])
    p.add_argument("--toy-steps", type=int, default=20, help="training steps in the toy world (default: 20)")
    p.add_argument("--small-steps", type=int, default=10, help="training steps of tiny and sd-small (default: 10)")
    p.add_argument("--busy-limit", type=float, default=900, help="the busy process stops by itself after this many seconds")
    p.add_argument("--model-dir", type=Path, default=ROOT / ".bench-models")
    p.add_argument("--json", type=Path, help="write the rows and the machine here")
    p.add_argument("--markdown", type=Path, help="write the table here")
    args = p.parse_args()
    args.steps = {"toy": args.toy_steps, "tiny": args.small_steps, "sd-small": args.small_steps}
    import torch

    info = {"date": datetime.date.today().isoformat(), "machine": cpu_name(),
            "cpus": os.cpu_count(), "torch": torch.__version__}
    rows = measure(args)
    table = markdown(rows, info)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
