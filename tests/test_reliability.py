"""Every bad input: one clear line naming the input and the fix, exit code 2, nothing written."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from celebbasis.cli import main
from conftest import png_header_only, side_by_side
from celebbasis.errors import InputError
from celebbasis.face import load_image
from celebbasis.identity import Identity, IdentityPart, check_name
from celebbasis.insert import add_placeholder, expand_prompt

FAST = ["--steps", "2", "--resolution", "64", "-q"]


def truncated(src: Path, dst: Path, fmt: str) -> Path:
    Image.open(src).convert("RGB").save(dst, format=fmt)
    data = dst.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.fixture
def bad_images(tmp_path, astronaut_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "folder.jpg").mkdir()
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not a photo\n")
    return {
        "missing": (d / "missing.jpg", "no such file"),
        "directory": (d / "folder.jpg", "is a folder"),
        "empty": (d / "empty.jpg", "is empty"),
        "text": (d / "text.jpg", "not an image"),
        "truncated-jpeg": (truncated(astronaut_path, d / "cut.jpg", "JPEG"), "truncated or damaged"),
        "truncated-png": (truncated(astronaut_path, d / "cut.png", "PNG"), "truncated or damaged"),
        "bomb": (png_header_only(d / "bomb.png", 30000, 30000), "too many pixels"),
    }


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "text", "truncated-jpeg", "truncated-png", "bomb"])
def test_bad_image_rows(bad_images, kind, capsys, tmp_path):
    path, match = bad_images[kind]
    with pytest.raises(InputError, match=match):
        load_image(path)
    out = tmp_path / "ids"
    assert main(["add", str(path), "--name", "x", "--tiny", "-o", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and match in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_animated_gif_uses_first_frame(tmp_path, astronaut_path, caplog):
    first = Image.open(astronaut_path).convert("RGB")
    second = Image.new("RGB", first.size, (0, 255, 0))
    path = tmp_path / "anim.gif"
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)
    with caplog.at_level(logging.WARNING, logger="celebbasis"):
        img = load_image(path)
    assert "2 frames; using the first" in caplog.text
    assert np.asarray(img)[..., 1].mean() < 200  # not the green frame


def test_small_face_warns(tmp_path, face_analyzer, astronaut_path, caplog):
    path = tmp_path / "small.png"
    Image.open(astronaut_path).resize((256, 256)).save(path)
    with caplog.at_level(logging.WARNING, logger="celebbasis"):
        result = face_analyzer(path)
    assert result.face.width < 64
    assert "px wide; identity will be weak" in caplog.text


def test_two_faces_largest_with_warning_or_face_index(tmp_path, face_analyzer, astronaut_path, hopper_path, caplog, astronaut, hopper):
    path = tmp_path / "two people.jpg"
    side_by_side(Image.open(astronaut_path), Image.open(hopper_path).resize((256, 300))).save(path, quality=95)
    with caplog.at_level(logging.WARNING, logger="celebbasis"):
        largest = face_analyzer(path)
    assert largest.n_faces == 2 and "2 faces found; using the largest. Pick another with face_index=N" in caplog.text
    other = face_analyzer(path, face_index=1)
    assert float(largest.embedding @ astronaut.embedding) > float(largest.embedding @ hopper.embedding)
    assert float(other.embedding @ hopper.embedding) > float(other.embedding @ astronaut.embedding)


def test_non_ascii_path_with_spaces(tmp_path, tiny_model_dir, astronaut_path):
    folder = tmp_path / "Fotos Ünïcødé 写真"
    folder.mkdir()
    photo = folder / "mi foto.png"
    shutil.copy(astronaut_path, photo)
    out = folder / "ids out"
    assert main(["add", str(photo), "--name", "ana", "--model", str(tiny_model_dir), "-o", str(out), *FAST]) == 0
    assert Identity.load(out / "ana.safetensors").token == "<ana>"


@pytest.mark.parametrize("names, match", [
    ([""], "Invalid name"), (["a/b"], "Invalid name"), (["../x"], "Invalid name"), ([" "], "Invalid name"),
    (["two words"], "Invalid name"), (["bob", "bob"], "more than once"),
])
def test_bad_names_on_the_cli(tmp_path, capsys, astronaut_path, names, match):
    photos = [str(astronaut_path)] * len(names)
    args = ["add", *photos, "-o", str(tmp_path / "o"), "--tiny", *FAST]
    for n in names:
        args += ["--name", n]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_vocabulary_word_is_refused(tiny_pipe):
    with pytest.raises(InputError, match="already a word in the model's vocabulary"):
        add_placeholder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "photo</w>", 2)


@pytest.fixture
def odd_models(tmp_path, tiny_model_dir):
    not_diffusers = tmp_path / "not-a-model"
    not_diffusers.mkdir()
    (not_diffusers / "config.json").write_text("{}")
    other = tmp_path / "other-arch"
    shutil.copytree(tiny_model_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    return {"missing": (tmp_path / "nowhere", "does not exist"), "not-diffusers": (not_diffusers, "no model_index.json"),
            "architecture": (other, "FluxPipeline, which celebbasis does not support")}


@pytest.mark.parametrize("kind", ["missing", "not-diffusers", "architecture"])
def test_bad_models(odd_models, kind, capsys, tmp_path):
    path, match = odd_models[kind]
    assert main(["generate", "a photo", "--model", str(path), "-o", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and str(path) in err[0]


@pytest.fixture(scope="module")
def good_identity(tmp_path_factory, tiny_model_dir, astronaut_path):
    out = tmp_path_factory.mktemp("good")
    assert main(["add", str(astronaut_path), "--name", "alice", "--model", str(tiny_model_dir), "-o", str(out), *FAST]) == 0
    return out / "alice.safetensors"


@pytest.fixture
def bad_identities(tmp_path, good_identity, tiny_model_dir):
    d = tmp_path / "badids"
    d.mkdir()
    (d / "text.safetensors").write_text("hello, not tensors at all")
    torch.save({"string_to_param": {"*": torch.zeros(2, 32)}}, d / "pickle.pt")
    data = good_identity.read_bytes()
    (d / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["build-basis", "--model", str(tiny_model_dir), "-o", str(d / "basis.safetensors"), "-q"]) == 0
    Identity("<wide>", [IdentityPart(torch.zeros(2, 8), torch.zeros(2, 768))]).save(d / "wide.safetensors")
    return {
        "not-safetensors": (d / "text.safetensors", "not a readable safetensors file"),
        "pickle": (d / "pickle.pt", "never loads pickles"),
        "truncated": (d / "cut.safetensors", "not a readable safetensors file"),
        "wrong-format": (d / "basis.safetensors", "not a celebbasis.identity file"),
        "width": (d / "wide.safetensors", "768-wide embeddings but this model's text encoder is 32 wide"),
    }


@pytest.mark.parametrize("kind", ["not-safetensors", "pickle", "truncated", "wrong-format", "width"])
def test_bad_identity_files(bad_identities, kind, capsys, tmp_path, tiny_model_dir):
    path, match = bad_identities[kind]
    out = tmp_path / "o"
    assert main(["generate", "<wide> person", "--identity", str(path), "--model", str(tiny_model_dir), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_basis_from_another_model_warns(tmp_path, capsys, astronaut_path, tiny_model_dir):
    from celebbasis.basis import build_basis
    from celebbasis.testing import tiny_pipeline

    other = tiny_pipeline(seed=5)
    build_basis(other.tokenizer, other.text_encoder).save(tmp_path / "other.safetensors")
    assert main(["add", str(astronaut_path), "--name", "x", "--model", str(tiny_model_dir), "-o", str(tmp_path / "o"),
                 "--basis", str(tmp_path / "other.safetensors"), *FAST]) == 0
    assert "basis was built from another text encoder" in capsys.readouterr().err


def test_long_prompt_warns_what_is_cut(tmp_path, capsys, tiny_model_dir):
    prompt = "a photo of a person " + "with a red hat " * 17 + "and green shoes on the moon"
    assert main(["generate", prompt, "--model", str(tiny_model_dir), "-o", str(tmp_path / "o"), "--steps", "1", "-q"]) == 0
    err = capsys.readouterr().err
    assert "the model reads only 77, so this part is cut: 'shoes on the moon'" in err


@pytest.mark.parametrize("where, match", [("/proc/celebbasis-out", "Cannot write to"), ("FILE/ids", "is a file")])
def test_unwritable_output_fails_before_training(tmp_path, capsys, astronaut_path, where, match):
    (tmp_path / "FILE").write_text("x")
    out = where.replace("FILE", str(tmp_path / "FILE"))
    assert main(["add", str(astronaut_path), "--name", "x", "--tiny", "-o", out, *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_full_disk_fails_before_training(tmp_path, capsys, astronaut_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    assert main(["add", str(astronaut_path), "--name", "x", "--tiny", "-o", str(tmp_path / "o"), *FAST]) == 2
    assert "MB free" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["add", "generate"])
def test_out_of_memory_says_what_to_do(tmp_path, capsys, astronaut_path, monkeypatch, command):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sys.modules["celebbasis.train"], "personalize", oom)
    monkeypatch.setattr(sys.modules["celebbasis.generate"], "generate", oom)
    args = (["add", str(astronaut_path), "--name", "x"] if command == "add" else ["generate", "a photo"])
    assert main([*args, "--tiny", "-o", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory" in err[0] and "Traceback" not in err[0]
    assert ("--low-memory" in err[0]) == (command == "add") and "--dtype float16" in err[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_existing_identity_is_never_overwritten(tmp_path, good_identity, astronaut_path, tiny_model_dir, capsys):
    out = tmp_path / "ids"
    out.mkdir()
    shutil.copy(good_identity, out / "alice.safetensors")
    before = (out / "alice.safetensors").read_bytes()
    assert main(["add", str(astronaut_path), "--name", "alice", "--model", str(tiny_model_dir), "-o", str(out), *FAST]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "alice.safetensors").read_bytes() == before
    assert main(["add", str(astronaut_path), "--name", "alice", "--model", str(tiny_model_dir), "-o", str(out),
                 "--overwrite", "--seed", "3", *FAST]) == 0
    assert (out / "alice.safetensors").read_bytes() != before


@pytest.mark.e2e
@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupt_during_add_leaves_nothing(tmp_path, tiny_model_dir, astronaut_path, sig, code, said):
    out = tmp_path / "ids"
    proc = subprocess.Popen(
        [sys.executable, "-m", "celebbasis.cli", "add", str(astronaut_path), "--name", "alice", "--model", str(tiny_model_dir),
         "-o", str(out), "--steps", "100000", "--resolution", "64"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 240
    seen = ""
    while "Training <alice>" not in seen and time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
    assert "Training <alice>" in seen, seen
    time.sleep(1.0)  # well inside the training loop
    proc.send_signal(sig)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == code
    assert "Traceback" not in rest and said in rest
    assert not out.exists() or not any(out.iterdir())


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=80))
def test_name_sanitising_never_escapes(name):
    try:
        clean = check_name(name)
    except InputError:
        return
    assert clean and len(clean) <= 64 and "/" not in clean and "\\" not in clean and not clean.startswith(".")
    assert Path("/ids", f"{clean}.safetensors").resolve().parent == Path("/ids")
    assert clean.strip() == clean and " " not in clean


_words = st.sampled_from(["a", "photo", "of", "<alice>", "<bob>", "person", "with", "and", ",", "<>", "<<bob>>", "<alice>,"])


@pytest.fixture(scope="module")
def two_ids_pipe():
    from celebbasis.testing import tiny_pipeline

    pipe = tiny_pipeline()
    for tok in ("<alice>", "<bob>"):
        add_placeholder(pipe.tokenizer, pipe.text_encoder, tok, 2)
    return pipe


@settings(max_examples=150, deadline=None)
@given(st.lists(_words, max_size=12))
def test_prompt_expansion_matches_diffusers(two_ids_pipe, words):
    prompt = " ".join(words)
    tok = two_ids_pipe.tokenizer
    ours = tok(expand_prompt(tok, prompt)).input_ids
    theirs = tok(two_ids_pipe.maybe_convert_prompt(prompt, tok)).input_ids
    assert ours == theirs
