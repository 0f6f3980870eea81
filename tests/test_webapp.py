"""The web UI's state object, without a browser: everything the UI does is a Python call."""

from __future__ import annotations

import threading

import pytest

from celebbasis.errors import InputError
from celebbasis.identity import Identity
from celebbasis.testing import tiny_pipeline
from celebbasis.webui import Cancelled, WebApp


@pytest.fixture
def app(tmp_path):
    return WebApp(lambda: tiny_pipeline(), tmp_path / "ids", default_steps=3, model_label="tiny")


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
    pairs, folder = app.create("<ann> person", "", 2, 7.5, 3, 64, 64, 2)
    assert [c for _, c in pairs] == ["<ann> person · seed 3", "<ann> person · seed 4"]
    assert app.zip_folder(folder).stat().st_size > 0
    app.delete("ann")
    assert app.identities() == []


def test_several_people_learn_together(app, astronaut_path, hopper_path):
    seen = []
    idents = app.learn([str(astronaut_path), str(hopper_path)], "alice, grace", 2, threading.Event(),
                       lambda s, t, lo: seen.append((s, t)))
    assert [i.token for i in idents] == ["<alice>", "<grace>"] and seen[-1] == (4, 4)  # steps per person
    assert sorted(r["name"] for r in app.identities()) == ["alice", "grace"]
    with pytest.raises(InputError, match="2 photo"):
        app.learn([str(astronaut_path), str(hopper_path)], "x", 2, threading.Event())


def test_cancelled_learning_writes_nothing(app, astronaut_path):
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        app.learn(str(astronaut_path), "bob", 100, stop)
    assert not list(app.dir.glob("bob*"))


def test_detect_boxes_and_refuses_faceless(app, astronaut_path, faceless_path):
    shown, crop, msg = app.detect(str(astronaut_path))
    assert shown.size == (512, 512) and crop.size == (256, 256) and msg == "Found one face."
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
