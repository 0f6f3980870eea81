"""add-many: a folder of photos -> identities, resumable, sharded across processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from celebbasis.cli import main
from celebbasis.identity import Identity, name_from_filename

FAST = ["--steps", "2", "--resolution", "64", "--views", "2", "-q"]


@pytest.fixture
def faces(tmp_path, astronaut_path, hopper_path, mirrored_path):
    d = tmp_path / "faces"
    d.mkdir()
    shutil.copy(astronaut_path, d / "Eileen Collins.png")
    shutil.copy(hopper_path, d / "grace.jpg")
    shutil.copy(mirrored_path, d / "mirror (2).png")
    (d / "notes.txt").write_text("not a photo")
    return d


def test_every_photo_becomes_an_identity_and_reruns_skip(faces, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "ids"
    assert main(["add-many", str(faces), "--model", str(tiny_model_dir), "-o", str(out), *FAST]) == 0
    names = sorted(p.stem for p in out.glob("*.safetensors"))
    assert names == ["Eileen_Collins", "grace", "mirror_2"]
    assert Identity.load(out / "grace.safetensors").token == "<grace>"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    (out / "grace.safetensors").unlink()
    capsys.readouterr()
    assert main(["add-many", str(faces), "--model", str(tiny_model_dir), "-o", str(out), *FAST[:-1]]) == 0
    assert "2 of 3 people already have an identity" in capsys.readouterr().err
    for name, stamp in stamps.items():
        if name != "grace.safetensors":
            assert (out / name).stat().st_mtime_ns == stamp  # not learned again
    assert (out / "grace.safetensors").exists()


def test_a_bad_photo_is_reported_and_the_rest_learned(faces, tmp_path, tiny_model_dir, faceless_path, capsys):
    shutil.copy(faceless_path, faces / "cat.png")
    out = tmp_path / "ids"
    assert main(["add-many", str(faces), "--model", str(tiny_model_dir), "-o", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert "No face found in" in err and "cat.png" in err and "run again to finish" in err
    assert len(list(out.glob("*.safetensors"))) == 3


@pytest.mark.e2e
def test_two_processes_share_the_work(faces, tmp_path, tiny_model_dir):
    out = tmp_path / "ids"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "celebbasis.cli", "add-many", str(faces), "--model", str(tiny_model_dir), "-o", str(out),
           "--group-size", "1", "--device", "cpu", "--steps", "2", "--resolution", "64", "--views", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Process 1 of 2: 2 of 3 groups" in r.stderr and "Process 2 of 2: 1 of 3 groups" in r.stderr
    assert sorted(p.stem for p in out.glob("*.safetensors")) == ["Eileen_Collins", "grace", "mirror_2"]
    assert r.stderr.count("Wrote ") == 3  # each person learned once


@pytest.mark.parametrize("stem, name", [("Ann Lee (2)", "Ann_Lee_2"), ("..", "person"), ("émile", "mile"), ("a" * 80, "a" * 64)])
def test_names_from_file_names(stem, name):
    assert name_from_filename(stem) == name


def test_one_progress_bar_over_every_step(faces, tmp_path, capsys):
    from celebbasis.config import TrainConfig
    from celebbasis.many import add_many
    from celebbasis.models import load_pipeline

    loads = []

    def load(device):
        loads.append(device)
        return load_pipeline(tiny=True)

    result = add_many(load, faces, tmp_path / "ids", config=TrainConfig(steps=2, resolution=64, views=2),
                      group_size=2, process=(0, 1))
    assert loads == [None] and len(result.written) == 3 and not result.failed
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    steps = [line for line in bar if line.startswith("add-many:")]
    assert steps and "4/4" in steps[-1]  # two groups of 2 steps: one bar counting steps, not groups
    assert not any("0/2 [" in line and "group" in line for line in steps)
    again = add_many(load, faces, tmp_path / "ids", config=TrainConfig(steps=2, resolution=64), process=(0, 1))
    assert sorted(again.skipped) == ["Eileen_Collins", "grace", "mirror_2"] and loads == [None]  # nothing to do: no model load


def test_a_subfolder_is_one_person_with_several_photos(tmp_path, astronaut_path, mirrored_path, hopper_path):
    import json

    from celebbasis.many import people_in

    d = tmp_path / "faces"
    (d / "Ann Lee").mkdir(parents=True)
    shutil.copy(astronaut_path, d / "Ann Lee" / "front.png")
    shutil.copy(mirrored_path, d / "Ann Lee" / "mirror.png")
    shutil.copy(hopper_path, d / "grace.jpg")
    assert [(p.name, [f.name for f in p.photos]) for p in people_in(d)] == [
        ("Ann_Lee", ["front.png", "mirror.png"]), ("grace", ["grace.jpg"])]
    out = tmp_path / "ids"
    assert main(["add-many", str(d), "--tiny", "-o", str(out), *FAST]) == 0
    ann = Identity.load(out / "Ann_Lee.safetensors")
    assert ann.metadata["source_photos"] == ["front.png", "mirror.png"]
    assert Identity.load(out / "grace.safetensors").token == "<grace>"
