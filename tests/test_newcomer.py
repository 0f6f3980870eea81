"""What a new user trips on: busy ports, usage lines, typos, folders of photos in any format."""

from __future__ import annotations

import socket

import pytest
from PIL import Image

from celebbasis.cli import main
from celebbasis.face import photos_in


def test_webui_on_a_busy_port_fails_before_loading(tmp_path, capsys, monkeypatch):
    import celebbasis.cli as cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["webui", "--tiny", "-o", str(tmp_path / "ids"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "--port N" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ids").exists()
    assert main(["webui", "--tiny", "-o", str(tmp_path / "ids"), "--port", "99999"]) == 2
    assert "--port 99999 is not a port number" in capsys.readouterr().err


def test_required_flags_show_as_required(capsys):
    for command, shown in (("add", "--name NAME"), ("build-basis", "-o OUTPUT"), ("import-embedding", "--name NAME")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        usage = capsys.readouterr().out.split("\n\n")[0]
        assert shown in usage and f"[{shown}]" not in usage, usage


def test_a_typo_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["add", "x.png", "--name", "x", "--stepz", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["celebbasis add: error: unknown --stepz; did you mean --steps?"]


def test_a_folder_takes_any_image_pillow_opens(tmp_path, caplog):
    for name, fmt in (("a.bmp", "BMP"), ("b.tif", "TIFF"), ("c.jpg", "JPEG"), ("d", "PNG")):
        Image.new("RGB", (40, 40), "red").save(tmp_path / name, format=fmt)
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    with caplog.at_level("INFO", logger="celebbasis"):
        assert [p.name for p in photos_in(tmp_path)] == ["a.bmp", "b.tif", "c.jpg", "d"]
    assert "notes.txt" in caplog.text and "DS_Store" not in caplog.text


def test_settings_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch, tiny_pipe):
    import celebbasis.cli as cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["mix", "--celebrity", "Anne Hathaway", "--celebrity", "Tom Hanks", "--weights", "nan", "1",
                 "--name", "m", "--tiny", "-o", str(tmp_path)]) == 2
    assert "finite" in capsys.readouterr().err
    assert main(["demo", "--tiny", "-o", str(tmp_path / "d"), "--num-images", "0"]) == 2
    assert "--num-images must be >= 1" in capsys.readouterr().err  # the flag, named by cli.FLAGS


def test_mixing_a_name_outside_the_basis_warns(tiny_pipe, caplog):
    from celebbasis.mix import mix
    from celebbasis.models import pipeline_bases

    bases = pipeline_bases(tiny_pipe)
    with caplog.at_level("WARNING", logger="celebbasis"):
        mix([("Anne Hathaway", 0.5), ("Zzyzx Qwerty", 0.5)], "m", bases, tiny_pipe)
    assert "'Zzyzx Qwerty' is not one of the 646 names the basis was built from" in caplog.text
    assert "Anne Hathaway" not in caplog.text


def test_generate_never_overwrites_and_keeps_the_grid_true(tmp_path):
    from celebbasis.generate import GeneratedImage, save_images

    def run(n, colour):
        meta = {"prompt": "a photo", "steps": 1, "scheduler": "ddim", "guidance": 7.5, "seed": 0, "size": "8x8", "model": "m"}
        return [GeneratedImage(Image.new("RGB", (8, 8), colour), "a photo", 0, meta) for _ in range(n)]

    first = save_images(run(2, "red"), tmp_path)
    assert (tmp_path / "grid.png").exists()
    second = save_images(run(1, "blue"), tmp_path)
    assert [p.name[:3] for p in first if p.name != "grid.png"] == ["000", "001"]
    assert [p.name[:3] for p in second] == ["002"]
    assert Image.open(first[0]).getpixel((0, 0)) == (255, 0, 0)  # the first run's images are still there
    assert not (tmp_path / "grid.png").exists()  # no grid of an older run beside a one-image run


def test_cli_names_face_index_for_several_faces(tmp_path, astronaut_path, hopper_path, capsys, tiny_model_dir):
    from conftest import side_by_side

    path = tmp_path / "two.jpg"
    side_by_side(Image.open(astronaut_path), Image.open(hopper_path).resize((256, 300))).save(path, quality=95)
    assert main(["add", str(path), "--name", "two", "--model", str(tiny_model_dir), "-o", str(tmp_path / "ids"),
                 "--steps", "1", "--resolution", "64", "-q"]) == 0
    assert "Pick another with --face-index N (0 = largest)" in capsys.readouterr().err


def test_webui_errors_name_the_upload_not_the_server_path(tmp_path, tiny_pipe, face_analyzer):
    from celebbasis.errors import CelebBasisError
    from celebbasis.webui import WebApp

    upload = tmp_path / "gradio" / "3f9a2c1e" / "holiday.png"  # Gradio's upload cache: a hash folder per file
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"not an image at all")
    app = WebApp(lambda: tiny_pipe, tmp_path / "ids", analyzer=face_analyzer)
    with pytest.raises(CelebBasisError) as e:
        app.photos(upload)
    assert "holiday.png" in str(e.value) and str(upload.parent) not in str(e.value)


def test_one_batch_shows_one_labelled_bar(tiny_pipe, capsys):
    import celebbasis as cb

    cb.generate(tiny_pipe, "a photo", steps=3)
    err = capsys.readouterr().err
    bars = {line.split(":")[0].strip() for line in err.replace("\r", "\n").splitlines() if "%|" in line}
    assert bars == {"generate"}, err


def test_basis_width_capped_quietly_unless_asked(tiny_pipe, caplog):
    from celebbasis.basis import build_basis

    with caplog.at_level("DEBUG", logger="celebbasis"):
        build_basis(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    assert not [r for r in caplog.records if r.levelname != "DEBUG"]
    build_basis(tiny_pipe.tokenizer, tiny_pipe.text_encoder, n_components=100)
    assert "n_components 100 is larger than the embedding width 32" in caplog.text
