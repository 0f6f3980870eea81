"""The scripts and benchmarks run end to end on the tiny model, and the declared floors hold."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "celebbasis"


def _env(**extra) -> dict:
    """This interpreter's environment with the checkout's src/ first, so scripts run the code under test."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


def _has_nvidia_gpu() -> bool:
    return bool(shutil.which("nvidia-smi")) or Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/version").exists()


@pytest.mark.e2e
def test_bench_personalize_tiny_writes_json_and_markdown(tmp_path):
    js, md = tmp_path / "r" / "personalize.json", tmp_path / "r" / "personalize.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_personalize.py"), "--arch", "tiny", "--steps", "2",
           "--resolution", "64", "--views", "2", "--device", "cpu", "--cache", str(tmp_path / "models"),
           "--json", str(js), "--markdown", str(md), "--target-speedup", "1000", "--target-peak-gb", "1000",
           "--in-process"]  # one process: starts in seconds (the subprocess runs differ only in where they run)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(js.read_text())
    for which in ("recipe", "celebbasis"):
        r = result[which]
        assert r["seconds"] > 0 and r["peak_mb"] > 0 and r["steps_per_s"] == pytest.approx(2 / r["seconds"])
    assert result["speedup"] == pytest.approx(result["recipe"]["seconds"] / result["celebbasis"]["seconds"])
    assert result["peak_memory"].startswith("resident set size") and result["steps"] == 2
    assert [t["met"] for t in result["targets"]] == [False, True] and result["targets_met"] is False
    table = md.read_text()
    assert "| textual-inversion recipe | float32 |" in table and "| celebbasis | float32 |" in table
    assert "| speed-up vs recipe | >= 1000x |" in table and "**missed**" in table
    assert table in proc.stdout  # printed too


@pytest.mark.skipif(_has_nvidia_gpu(), reason="this machine has an NVIDIA GPU: gpu-check.sh would run for real")
def test_gpu_check_without_a_gpu_says_so_at_once(tmp_path):
    script = str(ROOT / "scripts" / "gpu-check.sh")
    proc = subprocess.run(["bash", script, str(tmp_path / "out")], capture_output=True, text=True, env=_env(), timeout=30)
    assert proc.returncode == 3
    assert "no NVIDIA GPU on this machine" in proc.stderr and not (tmp_path / "out").exists()

    # A driver but a torch without CUDA (or one that sees no GPU): said plainly, before any test or benchmark.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho fake\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = _env(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", CELEBBASIS_PYTHON=sys.executable)
    proc = subprocess.run(["bash", script, str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3
    assert "CPU-only build" in proc.stderr or "sees no GPU" in proc.stderr
    assert "tests marked gpu" not in proc.stdout


def test_reproduce_paper_usage_errors(tmp_path):
    script = str(ROOT / "scripts" / "reproduce-paper.sh")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=_env(), timeout=30)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: bash scripts/reproduce-paper.sh MODEL REF_DIR [OUT]")
    proc = subprocess.run(["bash", script, "tiny", str(tmp_path / "nowhere")], capture_output=True, text=True, env=_env(), timeout=30)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr


@pytest.mark.e2e
def test_reproduce_paper_end_to_end_on_the_tiny_model(tmp_path, astronaut_path):
    from helpers import save_tiny_clip

    refs = tmp_path / "refs"
    refs.mkdir()
    shutil.copy(astronaut_path, refs / "Eileen Collins.png")
    clip = save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "paper"
    env = _env(CELEBBASIS_PYTHON=sys.executable, CELEBBASIS_FLAGS="--steps 1 -q", ADD_FLAGS="--views 1",
               GENERATE_FLAGS="--num-images 1 --height 64 --width 64", EVAL_FLAGS=f"--clip-model {clip} -q",
               PROMPTS_PER_CATEGORY="1")
    env.pop("EVAL_ENCODER", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce-paper.sh"), "tiny", str(refs), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "identities" / "Eileen_Collins.safetensors").is_file()
    prompts = (out / "prompts.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in prompts] == ["single action", "with a celebrity"]  # one person: no pairs
    assert all("<Eileen_Collins>" in line for line in prompts)
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["n_images"] == 2
    table = (out / "table.md").read_text()
    assert table in proc.stdout
    assert "| CelebBasis (paper) | 0.207 | 0.255 | - |" in table
    assert "| Textual Inversion (paper) | 0.296 | 0.163 | - |" in table
    ours = next(line for line in table.splitlines() if line.startswith("| **celebbasis, this run** (2 images)"))
    clip_cos = ours.split("|")[3].strip()
    assert clip_cos == f"{report['clip_score_mean'] / 100:.3f}"  # report.json's 100*cos, shown as the cosine
    assert "WARNING: no EVAL_ENCODER given" in proc.stderr
    assert "3/4 drawing them (DDIM, 1 steps, guidance 10, 64x64 px, seed 42, 1 image(s) per prompt)" in proc.stderr


# Each API the code relies on, the release of its package that introduced it, and text that shows it is
# used in src/. A declared floor below one of these would let pip install a version that breaks.
APIS = [
    ("python", "3.11", "tomllib"),
    ("torch", "2.5", "torch.OutOfMemoryError"),
    ("torch", "2.3", 'torch.amp.GradScaler("cuda")'),
    ("torch", "2.1", "mmap="),  # torch.load(..., mmap=)
    ("transformers", "4.46", "mean_resizing="),
    ("diffusers", "0.32", "enable_gradient_checkpointing"),  # older releases skip checkpointing in eval mode
    ("diffusers", "0.28", "from_single_file"),  # from_single_file(config=...)
    ("scipy", "1.4", "maximize=True"),  # linear_sum_assignment(maximize=)
    ("Pillow", "6.0", "exif_transpose"),
]


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _declared_floors() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {"python": re.search(r">=\s*([0-9.]+)", project["requires-python"]).group(1)}
    for dep in project["dependencies"]:
        name, floor = re.match(r"^\s*([A-Za-z0-9._-]+).*?>=\s*([0-9][^,;\s]*)", dep).groups()
        floors[name.lower()] = floor
    return floors


def test_declared_floors_cover_the_apis_we_use():
    source = "\n".join(p.read_text(encoding="utf-8") for p in SRC.rglob("*.py"))
    floors = _declared_floors()
    for package, introduced, marker in APIS:
        if marker not in source:
            continue  # no longer used: nothing to hold the floor to
        floor = floors[package.lower()]
        assert _vtuple(floor) >= _vtuple(introduced), (
            f"pyproject declares {package}>={floor}, but the code uses {marker!r}, which needs {package} >= {introduced}")
    # and the installed releases (the floors themselves in CI's minimum-versions job) have them
    import torch

    assert issubclass(torch.OutOfMemoryError, RuntimeError)
    torch.amp.GradScaler("cuda", enabled=False)
    assert "mean_resizing" in __import__("inspect").signature(
        __import__("transformers").PreTrainedModel.resize_token_embeddings).parameters
    for package in ("torch", "diffusers", "transformers", "scipy", "Pillow", "numpy", "safetensors"):
        assert _vtuple(version(package)) >= _vtuple(floors[package.lower()]), package
