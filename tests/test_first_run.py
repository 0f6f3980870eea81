"""What a new user met on a fresh clone (issue #29): threads on a busy machine, the README as written,
misleading messages, and errors that came late. Each test fails without its fix."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from celebbasis.cli import main
from celebbasis.toy import LIKENESS_CELEBRITIES, toy_photo

ROOT = Path(__file__).resolve().parents[1]
PERSON = str(toy_photo(1))


def _env(**extra) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture(scope="module")
def toy_identity(tmp_path_factory):
    """``<p>``, learned in the toy world in 2 steps through the CLI (its file records the model: toy)."""
    out = tmp_path_factory.mktemp("toy-ids")
    assert main(["add", PERSON, "--name", "p", "--toy", "--steps", "2", "-o", str(out), "-q"]) == 0
    return out / "p.safetensors"


@pytest.fixture
def auto_threads(monkeypatch):
    """No OMP_NUM_THREADS (scripts/test.sh sets one): the CLI chooses; torch at 2 threads before, as on a laptop."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _threads_while_drawing(monkeypatch) -> list[int]:
    import importlib

    generate_module = importlib.import_module("celebbasis.generate")  # the module (cb.generate is the function)
    seen, real = [], generate_module.generate

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_module, "generate", spy)
    return seen


# -- 1. threads ------------------------------------------------------------------------------------

def test_the_cli_draws_the_toy_world_on_one_thread_and_puts_torchs_back(tmp_path, monkeypatch, auto_threads, toy_identity):
    seen = _threads_while_drawing(monkeypatch)
    assert main(["generate", "<p> person", "--identity", str(toy_identity), "--toy", "--steps", "1", "-o", str(tmp_path), "-q"]) == 0
    assert seen == [1] and torch.get_num_threads() == 2  # the process is as it was


def test_threads_flag_and_the_users_environment_win(tmp_path, monkeypatch, auto_threads, toy_identity):
    seen = _threads_while_drawing(monkeypatch)
    args = ["generate", "<p> person", "--identity", str(toy_identity), "--toy", "--steps", "1", "-q"]
    assert main([*args, "--threads", "2", "-o", str(tmp_path / "a")]) == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert main([*args, "-o", str(tmp_path / "b")]) == 0
    assert seen == [2, 2]
    assert main([*args, "--threads", "0", "-o", str(tmp_path / "c")]) == 2


def test_the_web_ui_serves_the_toy_world_on_one_thread(tmp_path, monkeypatch, auto_threads):
    import socket

    import celebbasis.webui as webui

    seen = []
    monkeypatch.setattr(webui, "launch", lambda app, **kwargs: seen.append(torch.get_num_threads()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["webui", "--toy", "--port", str(port), "-o", str(tmp_path), "-q"]) == 0
    assert seen == [1] and torch.get_num_threads() == 2


def test_threads_follow_the_models_size():
    from celebbasis.threads import SMALL_MODEL_WORK, threads_for

    def pipe(params: int, side: int, device: str = "cpu"):
        unet = SimpleNamespace(parameters=lambda: [SimpleNamespace(numel=lambda: params)], config=SimpleNamespace(sample_size=side),
                               device=torch.device(device))
        return SimpleNamespace(unet=unet)

    assert threads_for(pipe(4_700_000, 16)) == 1  # the toy world
    assert threads_for(pipe(37_500_000, 32)) == 1  # benchmarks' sd-small
    assert threads_for(pipe(860_000_000, 64)) is None  # SD 1.5: torch's default
    assert threads_for(pipe(10, 1, "meta")) is None  # not on the CPU: torch's default
    assert 37_500_000 * 32**2 < SMALL_MODEL_WORK < 860_000_000 * 64**2


def test_only_front_ends_change_torchs_threads():
    src = ROOT / "src" / "celebbasis"
    callers = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if "set_num_threads(" in p.read_text())
    assert callers == ["threads.py", "toy/train_world.py"]  # the helper the CLI applies, and a script's main


# -- 2. the README and the API, as written ----------------------------------------------------------------

def _readme_toy_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## The toy world", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("celebbasis ")]


def _in_checkout_copy(tmp_path, monkeypatch) -> None:
    """Run in a folder that has the checkout's src/, as the README's relative paths expect."""
    (tmp_path / "src").symlink_to(ROOT / "src")
    monkeypatch.chdir(tmp_path)


def test_readme_generate_line_runs_as_written(tmp_path, monkeypatch, toy_identity):
    add, draw = _readme_toy_commands()
    assert add[0] == "add" and "--toy" in add and draw[0] == "generate" and "--toy" not in draw
    _in_checkout_copy(tmp_path, monkeypatch)
    (tmp_path / "identities").mkdir()
    (tmp_path / "identities" / "p.safetensors").write_bytes(toy_identity.read_bytes())  # what the add line makes
    assert main([*draw, "--steps", "2"]) == 0  # the line as written (only fewer denoising steps)
    png = Image.open(next((tmp_path / "out").glob("*.png")))
    assert png.text["model"] == "toy" and png.size == (64, 64)


@pytest.mark.e2e
def test_readme_toy_world_commands_run_literally(tmp_path, monkeypatch):
    _in_checkout_copy(tmp_path, monkeypatch)
    for command in _readme_toy_commands():
        assert main(command) == 0, command
    assert Image.open(next((tmp_path / "out").glob("*.png"))).text["model"] == "toy"


def test_quick_start_says_how_to_run_the_command():
    quick = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "source .venv/bin/activate" in quick and ".venv/bin/celebbasis" in quick


def test_generate_refuses_identities_made_for_different_models(tmp_path, toy_identity, capsys, monkeypatch):
    import celebbasis.cli as cli
    from celebbasis.identity import Identity

    other = Identity.load(toy_identity)
    other.metadata["base_model"] = "tiny"
    other.token = "<q>"
    other.save(tmp_path / "q.safetensors")
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["generate", "<p> and <q>", "--identity", str(toy_identity), "--identity", str(tmp_path / "q.safetensors"),
                 "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was made for toy but" in err[0] and "for tiny" in err[0] and "--model" in err[0]


def test_the_paper_preset_draws_at_the_models_own_size(tiny_pipe):
    from celebbasis import GenerateConfig, generate

    native = tiny_pipe.unet.config.sample_size * tiny_pipe.vae_scale_factor
    paper = GenerateConfig.preset("paper", steps=1, num_images=1)
    assert paper.height is None and paper.guidance == 10.0 and paper.seed == 42
    assert generate(tiny_pipe, "a photo", config=paper, show_progress=False)[0].image.size == (native, native)
    sized = GenerateConfig.preset("paper", steps=1, num_images=1, height=2 * native, width=2 * native)
    assert generate(tiny_pipe, "a photo", config=sized, show_progress=False)[0].image.size == (2 * native, 2 * native)


def test_evaluate_picks_the_toy_worlds_network_for_its_images(tmp_path, toy_identity, capsys):
    assert main(["generate", "<p> person", "--identity", str(toy_identity), "--steps", "2", "--num-images", "2",
                 "-o", str(tmp_path / "imgs")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "imgs"), "--reference", f"p={PERSON}", "--no-clip", "-o", str(tmp_path / "r")]) == 0
    assert "Evaluating with the toy world's face network" in capsys.readouterr().err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert "toy" in json.dumps(report)


def test_add_help_shows_what_toy_changes(capsys):
    with pytest.raises(SystemExit):
        main(["add", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.1; 1.0 with --toy)" in text and "(default: 0.1; 0.0 with --toy)" in text


# -- 3. messages that mislead ---------------------------------------------------------------------------

def test_an_unknown_word_lists_the_words_being_loaded(tmp_path, toy_identity, capsys):
    assert main(["generate", "a photo of <alice> person", "--identity", str(toy_identity), "-o", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(loaded: <p>)" in err[0], err


def test_an_identity_no_prompt_uses_is_named(tmp_path, toy_identity, capsys):
    assert main(["generate", "a photo of p person", "--identity", str(toy_identity), "--steps", "1", "-o", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "<p> is loaded but no prompt uses it" in err and '"p" without brackets' in err


@pytest.mark.parametrize("picture", ["blank", "gradient", "noise"])
def test_the_toy_world_refuses_pictures_that_are_no_person(tmp_path, capsys, picture):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:256, 0:256]
    pixels = {"blank": np.full((64, 64, 3), 255, np.uint8), "gradient": np.stack([x, y, (x + y) // 2], -1).astype(np.uint8),
              "noise": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)}[picture]
    path = tmp_path / f"{picture}.png"
    Image.fromarray(pixels).save(path)
    assert main(["add", str(path), "--name", "b", "--toy", "--steps", "2", "-o", str(tmp_path / "ids"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"No face found in {path}" in err[0] and "cartoon people" in err[0]
    assert not (tmp_path / "ids" / "b.safetensors").exists()


def test_the_worlds_people_are_people():
    from celebbasis.toy import N_TOY_PHOTOS, is_person

    assert is_person([Image.open(toy_photo(i)) for i in range(N_TOY_PHOTOS)]).all()


def test_the_summary_reports_steps_time_and_toy_likeness(tmp_path, capsys):
    assert main(["add", PERSON, "--name", "s", "--toy", "--steps", "2", "-o", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    summary = next(line for line in err.splitlines() if line.startswith("Learned <s>"))
    assert summary.startswith("Learned <s> in 2 step(s) (") and summary.endswith(" s).")  # no loss: it reads as failure
    assert f"Wrote {tmp_path / 's.safetensors'}" in err
    assert "Likeness of <s> on a quick preview: " in err and f"its own celebrities: {LIKENESS_CELEBRITIES:.2f}" in err


def test_mixing_a_celebrity_in_another_case_does_not_warn(tiny_pipe, caplog):
    from celebbasis.mix import mix
    from celebbasis.models import pipeline_bases

    with caplog.at_level("WARNING", logger="celebbasis"):
        mix([("anne hathaway", 0.5), ("TOM  HANKS", 0.5)], "m", pipeline_bases(tiny_pipe), tiny_pipe)
    assert "is not one of" not in caplog.text


@pytest.mark.parametrize("other", ["--tiny", "--sdxl"])
def test_toy_with_another_model_is_refused(tmp_path, capsys, other):
    assert main(["add", PERSON, "--name", "x", "--toy", other, "-o", str(tmp_path / "ids")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"celebbasis: error: --toy and {other} are two different models. Pass one of them."]
    assert not (tmp_path / "ids").exists()


def test_add_many_ends_with_what_it_skipped_and_fails(tmp_path, capsys):
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "pat.png").write_bytes(Path(PERSON).read_bytes())
    (faces / "broken.jpg").write_bytes(b"not a jpeg at all")
    (faces / "notes.txt").write_text("not a photo, not an image: a note, not a failure")
    assert main(["add-many", str(faces), "--toy", "--steps", "2", "-o", str(tmp_path / "ids")]) == 1
    err = capsys.readouterr().err
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("add-many: 1 learned, 0 already had an identity, 1 skipped: ")
    assert str(faces / "broken.jpg") in summary and "notes.txt" not in summary
    assert (tmp_path / "ids" / "pat.safetensors").exists()


# -- errors come early ------------------------------------------------------------------------------------

CHECK = """
import sys, time
t = time.perf_counter()
from celebbasis.cli import main
rc = main(sys.argv[1:])
print(rc, "torch" in sys.modules, round(time.perf_counter() - t, 3))
"""


@pytest.mark.parametrize("argv, said", [
    (["add", "missing.jpg", "--name", "x", "--toy"], "missing.jpg: no such file or folder"),
    (["add", PERSON, "--name", "x", "--model", "./no-model-here"], "--model ./no-model-here does not exist"),
    (["add", PERSON, "--name", "x", "--model", "EMPTY"], "is not a diffusers model folder (no model_index.json)"),
    (["generate", "<p> person", "--identity", "missing.safetensors"], "missing.safetensors: no such file"),
    (["evaluate", "imgs", "--reference", "p=missing.png"], "imgs: no such folder"),
    (["add-many", "missing-folder", "--toy"], "missing-folder: no such folder"),
    (["mix", "a.safetensors", "--name", "m"], "a.safetensors: no such file"),
])
def test_a_missing_path_is_one_line_before_torch_is_imported(tmp_path, argv, said):
    (tmp_path / "empty").mkdir()
    argv = [str(tmp_path / "empty") if a == "EMPTY" else a for a in argv]
    proc = subprocess.run([sys.executable, "-c", CHECK, *argv], capture_output=True, text=True, cwd=tmp_path, env=_env(),
                          timeout=60)
    rc, torch_imported, seconds = proc.stdout.split()
    err = proc.stderr.strip().splitlines()
    assert rc == "2" and torch_imported == "False" and len(err) == 1 and said in err[0], (proc.stdout, err)
    assert float(seconds) < 1.0  # milliseconds on a quiet machine; the bound leaves room for a busy one


def test_the_early_check_knows_every_checkpoint_suffix():
    from celebbasis.cli_inputs import CHECKPOINT_SUFFIXES
    from celebbasis.models import SINGLE_FILE_SUFFIXES

    assert CHECKPOINT_SUFFIXES == SINGLE_FILE_SUFFIXES


def test_the_package_imports_lazily_and_whole():
    code = ("import sys, celebbasis as cb; print('torch' in sys.modules); import celebbasis.cli, celebbasis.train; "
            "[getattr(cb, n) for n in cb.__all__]; print(cb.toy.TOY_MODEL, cb.models.DEFAULT_MODEL == cb.DEFAULT_MODEL, "
            "callable(cb.generate) and callable(cb.mix))")  # cb.generate and cb.mix stay the functions, not their modules
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.stdout.split() == ["False", "toy", "True", "True"], proc.stderr[-2000:]


def test_a_missing_photo_is_said_in_well_under_a_second(tmp_path):
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "celebbasis.cli", "add", "missing.jpg", "--name", "x", "--toy"],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=60)
    assert proc.returncode == 2 and time.perf_counter() - t < 3.0  # the whole process, Python's start included


# -- 4. the step's profile, prepared for a GPU, runnable on a CPU ---------------------------------------------

def test_the_step_profile_runs_on_the_cpu(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "benchmarks" / "gpu" / "profile_step.py")
    profile_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_step)
    out = tmp_path / "profile"
    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--arch", "tiny", "--resolution", "64", "--device", "cpu",
                                      "--warmup", "0", "--steps", "1", "--views", "2", "--cache", str(tmp_path / "models"),
                                      "--out", str(out)])
    profile_step.main()
    result = json.loads((out / "profile.json").read_text())
    assert result["step_s"] > 0 and result["floor_s"] > 0 and result["step_over_floor"] > 0
    assert set(profile_step.PHASES) <= set(result["phases"]) and (out / "trace.json").stat().st_size > 0
    table = (out / "profile.md").read_text()
    assert "| unet: forward |" in table and "| text encoder: conditioning |" in table and "step / floor" in table
