"""The command line end to end on a tiny model folder and real faces."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from celebbasis.basis import CelebBasis
from celebbasis.cli import main
from celebbasis.identity import Identity

FAST = ["--steps", "3", "--resolution", "64", "-q"]


@pytest.fixture(scope="module")
def alice(tmp_path_factory, tiny_model_dir, astronaut_path):
    out = tmp_path_factory.mktemp("ids")
    assert main(["add", str(astronaut_path), "--name", "alice", "--model", str(tiny_model_dir), "-o", str(out), *FAST]) == 0
    return out / "alice.safetensors"


def test_add_writes_identity_and_run(alice, tiny_model_dir):
    ident = Identity.load(alice)
    assert ident.token == "<alice>" and ident.coefficients.shape == (2, 32) and ident.embeddings.shape == (2, 32)
    assert ident.metadata["base_model"] == str(tiny_model_dir)
    assert ident.metadata["face_encoder"] == "dlib-resnet-v1"
    run = json.loads(alice.with_name("alice.run.json").read_text())
    assert run["config"]["steps"] == 3 and run["config"]["resolution"] == 64


def test_generate_writes_pngs_with_metadata(tmp_path, alice, tiny_model_dir):
    out = tmp_path / "out"
    rc = main(["generate", "<alice> person and Barack Obama cooking", "a photo of <alice> person",
               "--identity", str(alice), "--model", str(tiny_model_dir), "-o", str(out), "--steps", "2",
               "--num-images", "2", "--seed", "7", "--negative-prompt", "blurry", "--scheduler", "euler_a", "-q"])
    assert rc == 0
    pngs = sorted(p for p in out.glob("*.png") if p.name != "grid.png")
    assert len(pngs) == 4
    first = Image.open(pngs[0])
    assert first.size == (64, 64)
    assert first.text["prompt"] == "<alice> person and Barack Obama cooking"
    assert first.text["seed"] == "7" and Image.open(pngs[1]).text["seed"] == "8"
    assert first.text["model"] == str(tiny_model_dir)
    assert json.loads(first.text["identities"]) == ["<alice>"]
    assert first.text["negative_prompt"] == "blurry"
    assert "Seed: 7" in first.text["parameters"]
    assert Image.open(out / "grid.png").size == (128, 128)
    again = tmp_path / "again"  # image 1 of seed 7 is image 0 of seed 8: any single image can be made again
    assert main(["generate", "a photo of <alice> person", "--identity", str(alice), "--model", str(tiny_model_dir),
                 "-o", str(again), "--steps", "2", "--seed", "8", "--negative-prompt", "blurry", "--scheduler", "euler_a", "-q"]) == 0
    remade = Image.open(next(again.glob("*.png")))
    original = next(p for p in pngs if Image.open(p).text["prompt"] == "a photo of <alice> person" and Image.open(p).text["seed"] == "8")
    diff = np.abs(np.asarray(remade, dtype=int) - np.asarray(Image.open(original), dtype=int))
    assert diff.max() <= 2  # the same picture; a batch of two may round a pixel differently on the CPU
    seed7 = next(p for p in pngs if Image.open(p).text["prompt"] == "a photo of <alice> person" and Image.open(p).text["seed"] == "7")
    assert np.abs(np.asarray(remade, dtype=int) - np.asarray(Image.open(seed7), dtype=int)).mean() > 10  # another seed: another picture


def test_two_people_in_one_prompt(tmp_path, tiny_model_dir, astronaut_path, hopper_path):
    ids = tmp_path / "ids"
    assert main(["add", str(astronaut_path), str(hopper_path), "--name", "alice", "--name", "grace",
                 "--model", str(tiny_model_dir), "-o", str(ids), *FAST]) == 0
    out = tmp_path / "out"
    assert main(["generate", "<alice> person and <grace> person dancing", "--identity", str(ids / "alice.safetensors"),
                 "--identity", str(ids / "grace.safetensors"), "--model", str(tiny_model_dir), "-o", str(out),
                 "--steps", "2", "-q"]) == 0
    png = next(out.glob("*.png"))
    assert json.loads(Image.open(png).text["identities"]) == ["<alice>", "<grace>"]


def test_build_basis(tmp_path, tiny_model_dir):
    out = tmp_path / "basis.safetensors"
    assert main(["build-basis", "--model", str(tiny_model_dir), "-o", str(out), "-q"]) == 0
    basis = CelebBasis.load(out)
    assert basis.components.shape == (2, 32, 32) and basis.metadata["text_encoder"] == str(tiny_model_dir)
    assert main(["build-basis", "--model", str(tiny_model_dir), "-o", str(out), "-q"]) == 2  # exists


def test_demo_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "identities").mkdir(parents=True)
    (out / "identities" / "id1.safetensors").write_bytes(b"an earlier demo's identity")
    assert main(["demo", "--tiny", "-o", str(out), "--steps", "4", "--sample-steps", "2", "-q"]) == 0
    assert "Replacing the earlier demo's id1.safetensors" in capsys.readouterr().err  # never silently
    assert (out / "identities" / "id1.safetensors").exists()
    images = sorted((out / "images").glob("0*.png"))
    assert len(images) == 8  # the example prompts with one person
    assert Image.open(images[0]).text["identities"] == '["<id1>"]'
    assert (out / "images" / "grid.png").exists()


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "celebbasis.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_no_face_exits_2_without_traceback_or_files(tmp_path, tiny_model_dir, faceless_path):
    out = tmp_path / "ids"
    r = run_cli("add", str(faceless_path), "--name", "cat", "--model", str(tiny_model_dir), "-o", str(out), *FAST)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"No face found in {faceless_path}" in r.stderr
    assert not any(out.glob("*.safetensors")) if out.exists() else True


def test_uncached_hub_model_offline_says_so(tmp_path, alice):
    r = run_cli("generate", "<alice> person", "--identity", str(alice), "--model", "someone/not-cached-model",
                "-o", str(tmp_path / "o"), env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not in the local Hugging Face cache" in r.stderr and "--model PATH" in r.stderr
    assert "--toy" in r.stderr and "--tiny" in r.stderr  # a way to try everything without a download
    assert "[transformers]" not in r.stderr  # the libraries' chatter (here: their import-time notices) is not for CLI users


@pytest.mark.parametrize("args, match", [
    (["add", "missing.jpg", "--name", "x"], "missing.jpg: no such file"),
    (["add", "a.jpg", "b.jpg", "c.jpg", "--name", "x", "--name", "y"], "3 photo(s) but 2 name(s). Give one name per person"),
    (["add", "a.jpg", "--name", "x", "--steps", "-1"], "steps must be >= 0"),
    (["add", "a.jpg", "--name", "x", "--learning-rate", "inf"], "--learning-rate must be a finite number"),
    (["add", "a.jpg", "--name", "x", "--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["add", "a.jpg", "--name", "x", "--seed", "-1"], "seed must be in [0, 4294967295]"),
    (["generate", "x", "--tiny", "--guidance", "nan"], "guidance must be a finite number"),
    (["generate", "x", "--tiny", "--seed", "99999999999999999999999"], "seed must be in"),
    (["generate", "x", "--model", "/no/such/folder", "--steps", "0"], "steps must be >= 1"),
    (["add", "a.jpg", "--name", "../x"], "Invalid name"),
    (["generate", "<carol> person", "--tiny"], "<carol> but no identity"),
    (["generate", "x", "--identity", "nope.safetensors"], "nope.safetensors: no such file"),
    (["generate", "x", "--tiny", "--height", "65"], "multiple of 8"),
    (["generate", "x", "--model", "/no/such/folder"], "does not exist"),
])
def test_bad_input_one_line_errors(tmp_path, monkeypatch, capsys, args, match):
    monkeypatch.chdir(tmp_path)
    for photo in ("a.jpg", "b.jpg", "c.jpg"):  # photos that exist (a missing one is said first, before any other check)
        Image.new("RGB", (64, 64), "gray").save(photo)
    assert main([*args, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize("error, said", [(RuntimeError("boom\nsecond line"), "internal error: RuntimeError: boom. "),
                                          (RuntimeError(), "internal error: RuntimeError. ")])
def test_a_bug_is_one_line_and_v_shows_the_traceback(tmp_path, monkeypatch, capsys, error, said):
    import celebbasis.prompts

    def broken(names):
        raise error

    monkeypatch.setattr(celebbasis.prompts, "benchmark_prompt_lines", broken)
    args = ["benchmark-prompts", "alice", "-o", str(tmp_path / "p.txt")]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0] and "-v" in err[0], err
    with pytest.raises(RuntimeError):
        main([*args, "-v"])
    assert not list(tmp_path.iterdir())


CONFIGS = __import__("pathlib").Path(__file__).parent.parent / "configs"


def test_config_file_and_flags_that_win(tmp_path, astronaut_path):
    out = tmp_path / "ids"
    assert main(["add", str(astronaut_path), "--name", "alice", "-o", str(out), "--config", str(CONFIGS / "tiny.toml"),
                 "--steps", "2", "-q"]) == 0
    run = json.loads((out / "alice.run.json").read_text())
    assert run["config"]["steps"] == 2  # the flag wins
    assert run["config"]["resolution"] == 64 and run["config"]["views"] == 8  # from the file
    assert run["base_model"] == "tiny"


def test_shipped_configs_parse():
    from celebbasis.cli import build_parser
    from celebbasis.cli_flags import read_toml

    parser = build_parser()
    for path in CONFIGS.glob("*.toml"):
        command = "generate" if "eval" in path.stem else "add"
        assert read_toml(path, parser.subparsers[command], command), path  # every key a flag, of the right type


def test_misspelled_flags_are_not_taken_for_others(capsys):
    with pytest.raises(SystemExit) as e:
        main(["add", "x.jpg", "--nmae", "x"])
    assert e.value.code == 2
    assert "unknown --nmae; did you mean --name?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["add", "x.jpg", "--name", "x", "--step", "3"])  # no prefix matching: --step is not --steps
    assert "unknown --step; did you mean --steps?" in capsys.readouterr().err


def test_config_defaults_live_in_the_dataclasses(capsys):
    from celebbasis.cli import build_parser
    from celebbasis.config import TrainConfig

    with pytest.raises(SystemExit):
        build_parser().parse_args(["add", "--help"])
    help_text = capsys.readouterr().out
    assert f"(default: {TrainConfig.learning_rate})" in help_text.replace("\n", " ").replace("  ", " ") or "0.01" in help_text
    assert "--weight-decay" in help_text and "--aspect-jitter" in help_text  # every TrainConfig field is a flag
    flat = " ".join(help_text.split())
    assert "--views VIEWS" in flat and "initial weights (default: 0)" in flat  # metavar from the flag; a zero default shown


def test_toml_quiet_and_lists_replace(tmp_path, astronaut_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('quiet = true\nname = ["bob"]\n')
    out = tmp_path / "ids"
    assert main(["add", str(astronaut_path), "--name", "alice", "--tiny", "--steps", "1", "--resolution", "64",
                 "--views", "1", "-o", str(out), "--config", str(cfg)]) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["alice.safetensors"]  # the command line replaces the file's list
    assert "Wrote" not in capsys.readouterr().err  # quiet from the file took effect

    cfg.write_text('quiet = true\nname = "carol"\n')  # a required flag may come from the file alone
    assert main(["add", str(astronaut_path), "--tiny", "--steps", "1", "--resolution", "64", "--views", "1",
                 "-o", str(out), "--config", str(cfg)]) == 0
    assert (out / "carol.safetensors").exists()
    cfg.write_text("quiet = true\n")
    with pytest.raises(SystemExit) as e:
        main(["add", str(astronaut_path), "--tiny", "-o", str(out), "--config", str(cfg)])
    assert e.value.code == 2 and "required: --name" in capsys.readouterr().err


@pytest.mark.parametrize("content, match", [("stepz = 3", "stepz is not a flag of `celebbasis add` (did you mean steps?)"), ("steps = ", "not valid TOML"),
                                            ("steps = 'many'", "steps = 'many' should be int"),
                                            (None, "no such config file")])
def test_bad_config_files(tmp_path, capsys, astronaut_path, content, match):
    cfg = tmp_path / "c.toml"
    if content is not None:
        cfg.write_text(content)
    assert main(["add", str(astronaut_path), "--name", "x", "--config", str(cfg), "-o", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_every_command_has_working_help(capsys):
    from celebbasis.cli import COMMANDS

    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: celebbasis {name}" in out and "--verbose" in out


def test_batched_prompts_give_the_same_images(tiny_pipe):
    import numpy as np

    from celebbasis.generate import generate

    prompts = ["a photo of a person", "a painting of a dog", "a red car"]
    one = generate(tiny_pipe, prompts, num_images=2, steps=3, seed=5, batch_images=1, show_progress=False)
    many = generate(tiny_pipe, prompts, num_images=2, steps=3, seed=5, batch_images=6, show_progress=False)
    assert [(r.prompt, r.seed) for r in one] == [(r.prompt, r.seed) for r in many]
    assert [r.seed for r in one] == [5, 6, 5, 6, 5, 6]
    for a, b in zip(one, many):
        diff = np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16))
        assert diff.max() <= 2  # the same image, up to float rounding


def test_single_file_model_on_the_command_line(tmp_path, tiny_single_file, tiny_model_dir, astronaut_path, capsys, monkeypatch):
    out = tmp_path / "ids"
    assert main(["add", str(astronaut_path), "--name", "alice", "--model", str(tiny_single_file),
                 "--model-config", str(tiny_model_dir), "-o", str(out), *FAST]) == 0
    assert Identity.load(out / "alice.safetensors").metadata["base_model"] == tiny_single_file.name
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached: the family's configuration cannot be had
    capsys.readouterr()
    assert main(["generate", "<alice> person", "--identity", str(out / "alice.safetensors"), "--model", str(tiny_single_file),
                 "-o", str(tmp_path / "img"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model-config" in err[0], err


def test_add_several_photos_of_one_person(tmp_path, astronaut_path, mirrored_path, hopper_path, capsys):
    out = tmp_path / "ids"
    assert main(["add", str(astronaut_path), str(mirrored_path), str(hopper_path), "--name", "ann", "--tiny",
                 "-o", str(out), "--steps", "2", "--resolution", "64", "--views", "3"]) == 0
    ann = Identity.load(out / "ann.safetensors")
    assert ann.metadata["source_photos"] == [astronaut_path.name, mirrored_path.name, hopper_path.name]
    err = capsys.readouterr().err
    assert f"{hopper_path} does not look like the other photos of <ann>" in err  # another person mixed in: named
