"""The toy world as a plug-in, the model an identity records, and the rules every front end shares.

- The toy pipeline brings its face network and training preset: ``personalize`` on it needs neither,
  and the README's Python block for it runs as written.
- An identity made on a tiny model of one family (tiny SD 2) reloads on that family's tiny model.
- One overwrite rule, validation once, the family's native size, the command line's parsed arguments
  and the caller's pipeline settings left as they were.
"""

from __future__ import annotations

import argparse
import re
import socket
from pathlib import Path

import pytest
from PIL import Image

import celebbasis as cb
from celebbasis.cli import main
from celebbasis.config import TrainConfig
from celebbasis.errors import InputError
from celebbasis.identity import Identity

ROOT = Path(__file__).parents[1]
SRC = ROOT / "src" / "celebbasis"
FAST = ["--steps", "1", "--resolution", "64", "--views", "1", "-q"]


def readme_block(after: str) -> str:
    """The first ```python block of the README after the line that starts with ``after``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n" + after)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_the_toy_world_brings_its_face_network_and_preset():
    from celebbasis.train import default_analyzer, default_config

    toy = cb.load_pipeline(toy=True, device="cpu", dtype="float32")
    assert default_config(toy) == TrainConfig.preset("toy") and default_config(toy).min_scale == 1.0
    assert default_analyzer(toy).encoder.name == cb.toy.TOY_FACE_ENCODER
    tiny = cb.load_pipeline(tiny=True, device="cpu")
    assert default_config(tiny) == TrainConfig() and default_analyzer(tiny).encoder.name == "dlib-resnet-v1"
    assert cb.models.packaged_model(toy).name == "toy" and cb.models.packaged_model(tiny) is None


@pytest.mark.e2e  # the recipe's 400 steps: about 20 s on 2 quiet cores, a minute on a busy machine (CI's e2e job)
def test_the_readme_toy_block_runs_as_written(tmp_path, monkeypatch):
    """The README's Python block for the toy world, literally: no face network or preset is passed, and the
    run uses the world's own (a dlib face search on the cartoon would find no face)."""
    block = readme_block("The same in the toy world")
    assert "personalize(pipe, [cb.toy.toy_photo(1)], [\"p\"])" in block
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md (toy block)", "exec"), namespace)
    result, pipe = namespace["result"], namespace["pipe"]
    ident = Identity.load(tmp_path / "identities" / "p.safetensors")
    assert ident.metadata["face_encoder"] == cb.toy.TOY_FACE_ENCODER and ident.metadata["base_model"] == "toy"
    assert result.run["config"]["min_scale"] == 1.0 and result.run["config"]["flip_p"] == 0.0  # the toy preset's views
    assert len(list((tmp_path / "out").glob("0*.png"))) == 2
    assert "<p>" not in pipe.tokenizer.get_added_vocab()  # unloaded at the end of the block


def test_an_identity_of_tiny_sd2_reloads_on_tiny_sd2(tmp_path, astronaut_path, caplog):
    """The recorded family picks the model: ``mix`` without a model flag loads tiny SD 2, not tiny SD 1."""
    ids = tmp_path / "ids"
    assert main(["add", str(astronaut_path), "--name", "a", "--tiny", "--family", "sd2", "-o", str(ids), *FAST]) == 0
    made = Identity.load(ids / "a.safetensors")
    assert made.metadata["base_model"] == "tiny-sd2" and made.family.name == "sd2"
    with caplog.at_level("INFO", logger="celebbasis"):
        assert main(["mix", str(ids / "a.safetensors"), "--name", "b", "-o", str(ids), "-q"]) == 0
    mixed = Identity.load(ids / "b.safetensors")
    assert mixed.metadata["base_model"] == "tiny-sd2" and mixed.metadata["model_family"] == "sd2"
    assert mixed.metadata["text_encoder_signature"] == made.metadata["text_encoder_signature"]


def test_following_the_recorded_model_leaves_the_parsed_arguments_alone():
    from celebbasis.cli import _follow_recorded_model

    args = argparse.Namespace(model=None, tiny=False, sdxl=False, toy=False, family=None)
    followed = _follow_recorded_model(args, "tiny-sd2")
    assert (followed.tiny, followed.family) == (True, "sd2")
    assert vars(args) == dict(model=None, tiny=False, sdxl=False, toy=False, family=None)
    assert _follow_recorded_model(args, "toy").toy and _follow_recorded_model(args, "some/model").model == "some/model"
    with pytest.raises(InputError, match="tiny-gone.*not registered"):
        _follow_recorded_model(args, "tiny-gone")


def test_the_demo_names_its_own_sampling_flag(tmp_path, capsys, monkeypatch):
    import celebbasis.cli as cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["demo", "--tiny", "-o", str(tmp_path), "--sample-steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "celebbasis: error: --sample-steps must be >= 1, got 0."


def test_sdxl_and_another_family_are_refused_together():
    with pytest.raises(InputError, match="family=sd2") as e:
        cb.load_pipeline(tiny=True, sdxl=True, family="sd2")
    assert e.value.field == "family"


def test_launch_checks_its_address_before_the_model_loads(tmp_path):
    from celebbasis.webui import WebApp, launch

    app = WebApp(lambda: pytest.fail("the model was loaded"), tmp_path / "ids")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(InputError, match="Cannot listen on") as e:
            launch(app, port=s.getsockname()[1], block=False)
    assert e.value.field == "port" and not (tmp_path / "ids").exists()


def test_one_overwrite_rule(tmp_path, tiny_pipe, astronaut):
    """The library, the command line and the web UI refuse an existing file with the same rule, each in its words."""
    from celebbasis.files import check_new_file
    from celebbasis.webui import Library

    path = tmp_path / "alice.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(InputError, match=r"alice.safetensors already exists\. Pass overwrite=True") as e:
        check_new_file(path)
    assert e.value.field == "overwrite" and check_new_file(path, overwrite=True) == path
    with pytest.raises(InputError, match="is a folder"):
        check_new_file(tmp_path)
    with pytest.raises(InputError, match=r"^An identity named 'alice' already exists\. Pick another name\.$"):
        Library(tmp_path).new_path("alice")
    result = cb.personalize(tiny_pipe, [astronaut], ["alice"], config=TrainConfig(steps=1, resolution=64, views=1),
                            show_progress=False)
    with pytest.raises(InputError, match="already exists") as e:
        result.save(tmp_path)
    assert e.value.field == "overwrite"
    # where files are refused for already existing, it is this rule's message, written once
    said = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py") if "already exists" in p.read_text(encoding="utf-8")]
    assert said == ["files.py"], said


def test_personalize_checks_its_inputs_once(tiny_pipe, astronaut, monkeypatch):
    from celebbasis.train import checks

    calls = []
    real = checks.check_people
    monkeypatch.setattr(checks, "check_people", lambda *a: calls.append(a) or real(*a))
    cb.personalize(tiny_pipe, [astronaut], ["alice"], config=TrainConfig(steps=1, resolution=64, views=1),
                   show_progress=False)
    assert len(calls) == 1


def test_generate_and_the_web_ui_ask_the_family_for_the_native_size(tiny_pipe, tmp_path, monkeypatch):
    from celebbasis.families import OneEncoderFamily
    from celebbasis.webui import WebApp

    monkeypatch.setattr(OneEncoderFamily, "native_size", lambda self, pipe: 32)
    image = cb.generate(tiny_pipe, "a photo", steps=1, show_progress=False)[0].image
    assert image.size == (32, 32)
    defaults = WebApp(lambda: tiny_pipe, tmp_path).defaults()
    assert (defaults.width, defaults.height) == (32, 32)


def test_generate_leaves_the_callers_progress_bar_settings(tiny_pipe):
    tiny_pipe.set_progress_bar_config(desc="mine", leave=False)
    cb.generate(tiny_pipe, "a photo", steps=1, show_progress=False)
    assert tiny_pipe._progress_bar_config == {"desc": "mine", "leave": False}


def test_the_demo_falls_back_to_the_toy_world_on_a_copy_of_its_arguments(tmp_path, capsys, monkeypatch):
    import celebbasis.cli as cli
    from celebbasis.errors import ModelLoadError

    real, seen = cli._load, []

    def load(args, device=None):
        seen.append(args)
        if not args.toy:
            raise ModelLoadError("no network here")
        return real(args, device)

    monkeypatch.setattr(cli, "_load", load)
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--steps", "1", "--sample-steps", "1", "--device", "cpu", "-q"]) == 0
    assert "Running the same pipeline in the TOY WORLD" in capsys.readouterr().err
    assert [a.toy for a in seen] == [False, True] and seen[0] is not seen[1]  # the parsed arguments stay as parsed
    assert Identity.load(out / "identities" / "id1.safetensors").metadata["base_model"] == "toy"
    pictures = {p.name: Image.open(p).size for p in (out / "images").glob("[0-9]*.png")}
    pairs = [name for name, size in pictures.items() if size == (128, 64)]  # the new person beside a celebrity
    assert len(pairs) == 1 and "tom-hanks" in pairs[0].lower() and len(pictures) == 6, pictures
