"""The web UI's state object and handlers, without a browser: everything the UI does is a Python call."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import replace

import pytest
import torch

from celebbasis.config import GenerateConfig, TrainConfig
from celebbasis.errors import InputError
from celebbasis.identity import Identity
from celebbasis.webui import Cancelled, WebApp, model_title


@pytest.fixture
def app(tmp_path, tiny_pipe, face_analyzer):
    return WebApp(lambda: tiny_pipe, tmp_path / "ids", model_label="tiny", analyzer=face_analyzer)


def saved_identity(app: WebApp, name: str, seed: int = 0):
    """An identity file made without training: random unit coefficients in the model's basis."""
    from celebbasis.models import pipeline_bases

    [basis] = pipeline_bases(app.pipe)
    coeffs = torch.nn.functional.normalize(torch.randn(basis.n_tokens, basis.n_components, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return Identity.from_coefficients(f"<{name}>", coeffs, basis, base_model="tiny").save(app.dir / f"{name}.safetensors")


def test_learn_rename_export_delete(app, astronaut_path):
    seen = []
    [ident] = app.learn(str(astronaut_path), "alice", 3, threading.Event(), lambda s, t, lo: seen.append(s))
    assert ident.token == "<alice>" and seen == [1, 2, 3]
    assert [r["name"] for r in app.identities()] == ["alice"]
    with pytest.raises(InputError, match="already exists"):
        app.learn(str(astronaut_path), "alice", 3, threading.Event())
    assert app.rename("alice", "ann") == "<ann>"
    assert Identity.load(app.dir / "ann.safetensors").token == "<ann>"
    assert (app.dir / "ann.thumb.png").exists() and not (app.dir / "alice.safetensors").exists()
    path = app.export("ann", "a1111")
    assert path.name == "ann.safetensors" and path.parent.name == "a1111"
    pairs, folder = app.create("<ann> person", steps=2, seed=3, num_images=2)
    assert [c for _, c in pairs] == ["<ann> person · seed 3", "<ann> person · seed 4"]
    assert app.zip_folder(folder).stat().st_size > 0
    with pytest.raises(InputError, match="<alice>: not in the library"):  # renamed: the old word is gone
        app.create("<alice> person", steps=1)
    app.delete("ann")
    assert app.identities() == []


def test_several_people_learn_together(app, astronaut_path, hopper_path):
    seen = []
    idents = app.learn([str(astronaut_path), str(hopper_path)], "alice, grace", 2, threading.Event(),
                       lambda s, t, lo: seen.append((s, t)))
    assert [i.token for i in idents] == ["<alice>", "<grace>"] and seen[-1] == (4, 4)  # steps per person
    assert sorted(r["name"] for r in app.identities()) == ["alice", "grace"]
    with pytest.raises(InputError, match=r"2 photo\(s\) but 1 name"):  # train.check_people
        app.learn([str(astronaut_path), str(hopper_path)], "x", 2, threading.Event())


def test_cancelled_learning_writes_nothing(app, astronaut_path):
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        app.learn(str(astronaut_path), "bob", 1, stop)
    assert not list(app.dir.glob("bob*"))


def test_detect_boxes_and_refuses_faceless(app, astronaut_path, faceless_path):
    found = app.detect(str(astronaut_path))
    [(shown, _)], [(crop, _)] = found.boxed, found.crops
    assert shown.size == (512, 512) and crop.size == (256, 256) and found.notes == ["Found one face."]
    with pytest.raises(InputError, match="No face found"):
        app.detect(str(faceless_path))


def test_uploads_over_the_pixel_cap_are_refused(app, tmp_path):
    from conftest import png_header_only

    big = png_header_only(tmp_path / "big.png", 8000, 6000)  # 48 MP: under the CLI's cap, over the web UI's
    with pytest.raises(InputError, match="up to 40 MP"):
        app.detect(str(big))


@pytest.mark.parametrize("bad", ["../x", "a/b", ""])
def test_names_are_sanitised(app, bad):
    with pytest.raises(InputError, match="Invalid name"):
        app.delete(bad)


# -- defaults and metadata come from the library -------------------------------------------------------

def test_defaults_come_from_the_configs_and_the_model(tmp_path, tiny_pipe, face_analyzer, astronaut_path):
    app = WebApp(lambda: tiny_pipe, tmp_path / "a", analyzer=face_analyzer)
    d = app.defaults()
    assert d.steps_per_person == TrainConfig().total_steps(1) and d.create_steps == GenerateConfig().steps
    assert d.guidance == GenerateConfig().guidance and d.num_images == GenerateConfig().num_images
    assert d.width == d.height == tiny_pipe.unet.config.sample_size * tiny_pipe.vae_scale_factor  # the model's own size
    mine = WebApp(lambda: tiny_pipe, tmp_path / "b", analyzer=face_analyzer, train_config=TrainConfig(learning_rate=0.02, steps=7),
                  generate_config=GenerateConfig(steps=9, guidance=3.0, width=128))
    d = mine.defaults()
    assert (d.steps_per_person, d.create_steps, d.guidance, d.width, d.height) == (7, 9, 3.0, 128, 64)
    with pytest.raises(InputError, match="instant identity"):  # 0 steps needs a pretrained network; the tiny model has none
        mine.learn(str(astronaut_path), "zero", 0, threading.Event())
    mine.learn(str(astronaut_path), "ann", 1, threading.Event())
    run = json.loads((mine.dir / "ann.run.json").read_text())
    assert run["config"]["learning_rate"] == 0.02 and run["config"]["steps"] == 1


def test_same_identity_metadata_as_the_cli(tmp_path, face_analyzer, astronaut_path):
    """The API writes the metadata; the web UI adds nothing and loses nothing compared with `celebbasis add`."""
    from celebbasis.cli import main
    from celebbasis.models import load_pipeline

    assert main(["add", str(astronaut_path), "--name", "alice", "--tiny", "--steps", "2", "-o", str(tmp_path / "cli"), "-q"]) == 0
    app = WebApp(lambda: load_pipeline(tiny=True), tmp_path / "web", analyzer=face_analyzer)
    app.learn(str(astronaut_path), "alice", 2, threading.Event())
    cli = Identity.load(tmp_path / "cli" / "alice.safetensors").metadata
    web = Identity.load(tmp_path / "web" / "alice.safetensors").metadata
    assert set(web) == set(cli)
    for key in ("base_model", "face_encoder", "text_encoder_signature", "basis_sha256", "source_photo", "source_photos", "steps",
                "train_config"):
        assert web.get(key) == cli.get(key), key
    assert web["source_photo"] == astronaut_path.name and web["base_model"] == "tiny"


def test_header_shows_a_checkpoint_by_its_file_name(tmp_path):
    assert model_title("/models/sd/dreamshaper_8.safetensors") == "dreamshaper_8.safetensors"
    assert model_title("C:/models/v1-5-pruned.CKPT") == "v1-5-pruned.CKPT"
    assert model_title("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    from celebbasis.webui import header

    app = WebApp(lambda: None, tmp_path, model_label="/models/sd/dreamshaper_8.safetensors")
    assert "`dreamshaper_8.safetensors`" in header(app) and "/models/" not in header(app)


def test_mix_saves_and_previews(app):
    saved_identity(app, "ann")
    path, token = app.mix("ann", "", "Anne Hathaway", 0.3, "annanne", steps=1, seed=5)
    from PIL import Image

    assert token == "<annanne>" and Image.open(path).text["seed"] == "5"
    assert Identity.load(app.dir / "annanne.safetensors").token == "<annanne>"
    with pytest.raises(InputError, match="already exists"):
        app.mix("ann", "", "Anne Hathaway", 0.3, "annanne")
    with pytest.raises(InputError, match="No identity named 'bob'"):
        app.mix("bob", "", "Anne Hathaway", 0.3, "x")


# -- sessions, caching, launch ------------------------------------------------------------------------

def test_cancel_stops_only_its_own_session(app, astronaut_path):
    """Two browser tabs: Cancel in one stops its training, never the other tab's."""
    from celebbasis.webui import Handlers

    h = Handlers(app)
    b = h.learn([str(astronaut_path)], None, "bob", 2, session="tab-b")
    assert next(b)[0].startswith("Preparing")  # b trains (holding the model)...
    a = h.learn([str(astronaut_path)], None, "ann", 1, session="tab-a")
    assert next(a)[0].startswith("Preparing")  # ...while a waits for it
    assert not isinstance(h.cancel("tab-a"), str)  # a's own stream reports it, so no reply can overwrite its end
    assert h.cancel("tab-c") == "Nothing is learning in this tab."
    assert list(b)[-1][0].startswith("Learned `<bob>`")
    said = [status for status, *_ in a]
    assert said[-1] == "Cancelled; nothing was saved." and set(said[:-1]) <= {"Cancelling …"}
    assert (app.dir / "bob.safetensors").exists() and not list(app.dir.glob("ann*"))
    assert h.cancel("tab-b") == "Nothing is learning in this tab."  # finished runs are forgotten


def test_create_tab_handlers(app):
    from celebbasis.webui import Handlers

    h = Handlers(app)
    saved_identity(app, "ann")
    assert h.chip("a photo of", "<ann>") == ("a photo of <ann> person", None)
    assert h.preset(["<id1> person reading"]) == "<ann> person reading"
    assert Handlers.seed_of("<ann> person · seed 42") == 42 and Handlers.seed_of("") is None
    gallery, rows, *pickers = h.refresh("ann")
    assert rows == [["ann", "<ann>", "tiny", rows[0][3]]] and pickers[0]["value"] == "ann"


def test_library_files_are_read_and_loaded_once(app, monkeypatch):
    import celebbasis.webui

    saved_identity(app, "ann", 0)
    saved_identity(app, "bob", 1)
    reads, loads = [], []
    real_read, real_load = Identity.load.__func__, celebbasis.webui.load_identity
    monkeypatch.setattr(Identity, "load", classmethod(lambda cls, p: reads.append(p.name) or real_read(cls, p)))
    monkeypatch.setattr(celebbasis.webui, "load_identity", lambda pipe, i, *a: loads.append(i.token) or real_load(pipe, i, *a))
    assert [r["name"] for r in app.identities()] == ["ann", "bob"] and sorted(reads) == ["ann.safetensors", "bob.safetensors"]
    app.identities()
    app.create("<ann> person", steps=1)
    assert len(reads) == 2 and sorted(loads) == ["<ann>", "<bob>"]  # refresh and create read nothing again
    app.create("<bob> person", steps=1)
    app.identities()
    assert len(reads) == 2 and len(loads) == 2
    saved_identity(app, "bob", 2)  # the file changed: read and loaded again, ann is not
    app.create("<bob> person", steps=1)
    assert reads[2:] == ["bob.safetensors"] and loads[2:] == ["<bob>"]
    app.delete("ann")
    with pytest.raises(InputError, match="<ann>: not in the library"):
        app.create("<ann> person", steps=1)


def test_launch_names_the_share_flag(app, capsys, monkeypatch):
    from celebbasis.webui import launch

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(app, port=port, block=False)
    try:
        out = capsys.readouterr().out
        fields = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    finally:
        demo.close()
    assert f"Running on http://127.0.0.1:{port} (pass --share for a public link)" in out
    assert "share=True" not in out and "launch()" not in out
    d = app.defaults()
    assert fields["learn-steps"].value == d.steps_per_person and fields["create-steps"].value == d.create_steps
    assert fields["create-width"].value == fields["create-height"].value == 64


def test_a_model_that_fails_to_load_leaves_no_folders(tmp_path):
    from celebbasis.errors import ModelLoadError
    from celebbasis.webui import launch

    def load():
        raise ModelLoadError("no such model")

    with socket.socket() as s:  # a free port: launch checks its address before the model loads
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ModelLoadError):
        launch(WebApp(load, tmp_path / "ids"), port=port, block=False)
    assert list(tmp_path.iterdir()) == []


# -- several photos of one person ---------------------------------------------------------------------

def test_several_photos_of_one_person(app, astronaut_path, mirrored_path, hopper_path):
    found = app.detect([str(astronaut_path), str(mirrored_path)])
    assert len(found.boxed) == len(found.crops) == 2
    assert found.notes == ["astronaut.png: Found one face.", "astronaut_mirrored.png: Found one face."]
    odd = app.detect([str(astronaut_path), str(mirrored_path), str(hopper_path)])
    warnings = [n for n in odd.notes if "does not look like" in n]
    assert len(warnings) == 1 and warnings[0].startswith("⚠ grace_hopper.jpg")
    pair = app.detect([str(astronaut_path), str(hopper_path)]).notes[-1]
    assert pair.startswith("⚠ astronaut.png and grace_hopper.jpg do not look like the same person")
    [ident] = app.learn([[str(astronaut_path), str(mirrored_path)]], "carol", 2, threading.Event())
    assert Identity.load(app.dir / "carol.safetensors").metadata["source_photos"] == ["astronaut.png", "astronaut_mirrored.png"]


# -- settings from a run file, formats from the config ---------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_webui_config_fills_the_learn_and_create_defaults(tmp_path, monkeypatch, capsys):
    import celebbasis.webui as webui
    from celebbasis.cli import main

    seen = {}
    monkeypatch.setattr(webui, "launch", lambda app, **kwargs: seen.update(app=app))
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"tiny = true\nport = {_free_port()}\n[train]\nsteps = 30\nlearning_rate = 0.05\n"
                   "[generate]\nsteps = 12\nguidance = 4.0\nseed = 5\nwidth = 64\nheight = 128\n")
    args = ["webui", "--config", str(cfg), "-o", str(tmp_path / "ids"), "-q"]
    assert main(args) == 0
    app = seen.pop("app")
    assert app.train_config == TrainConfig(steps=30, learning_rate=0.05)
    assert app.generate_config == GenerateConfig(steps=12, guidance=4.0, seed=5, width=64, height=128)
    d = app.defaults()  # what the page's fields start with (sizes given, so no model is loaded)
    assert (d.steps_per_person, d.create_steps, d.guidance, d.seed, d.width, d.height) == (30, 12, 4.0, 5, 64, 128)

    assert main([*args, "--toy"]) == 0  # the toy preset, the file's settings over it
    assert seen.pop("app").train_config == TrainConfig.preset("toy", steps=30, learning_rate=0.05)

    cfg.write_text("steps = 3\n")  # webui has no --steps: which one is meant must be said by the table
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "steps is not a flag of `celebbasis webui`" in err[0] and "[train] or [generate]" in err[0]


def test_download_formats_are_the_export_formats(app, monkeypatch):
    import celebbasis.webui as webui
    from celebbasis.config import EXPORT_FORMATS

    saved_identity(app, "ann")
    for fmt in EXPORT_FORMATS:  # every format the library exports is one the app can hand out
        assert app.export("ann", fmt).parent.name == fmt
    with pytest.raises(InputError, match="Unknown format '../x'"):
        app.export("ann", "../x")
    pytest.importorskip("gradio")
    monkeypatch.setattr(webui, "EXPORT_FORMATS", ("diffusers", "newtool"))  # the page follows the config's list
    demo = webui.build_ui(app)
    [dropdown] = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "library-format"]
    assert [value for _, value in dropdown.choices] == ["celebbasis", "diffusers", "newtool"]


def test_learn_shows_the_instant_person_then_refines(tmp_path):
    """The toy world ships a pretrained network: Learn shows each person at once (step 0), then as training goes."""
    import celebbasis as cb
    from celebbasis import toy

    app = WebApp(lambda: cb.load_pipeline(toy=True, dtype="float32"), tmp_path / "ids")
    assert app.defaults().steps_per_person == cb.config.WARM_STEPS
    shown = []
    [ident] = app.learn(str(toy.toy_photo(2)), "p", 2, threading.Event(), show=lambda s, images: shown.append((s, images)))
    assert [s for s, _ in shown] == [0, 1, 2]
    assert all(len(images) == 1 and images[0].size == (64, 64) for _, images in shown)
    assert ident.metadata["pretrained"] == toy.PRETRAINED_FILE
    [instant] = app.learn(str(toy.toy_photo(3)), "q", 0, threading.Event(), show=lambda s, images: shown.append((s, images)))
    assert shown[-1][0] == 0 and instant.metadata["steps"] == 0
