"""celebbasis evaluate: detection rate, ID similarity, CLIP score, report files."""

from __future__ import annotations

import json
import logging
import re
import shutil
import time

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from celebbasis.cli import main
from conftest import side_by_side
from celebbasis.errors import InputError, ModelLoadError
from celebbasis.evaluate import ImageResult, Report, best_assignment, clip_text, evaluate, reference_embedding, write_report
from celebbasis.face import Face
from celebbasis.prompts import (
    PromptLine, benchmark_prompt_lines, benchmark_prompts, categorize, negative_prompt_for, prompt_file_text, read_prompt_file,
)
from helpers import save_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_evaluate_photo_mirror_and_faceless(tmp_path, astronaut_path, mirrored_path, faceless_path, tiny_clip):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(astronaut_path, images / "a_photo.png")
    shutil.copy(mirrored_path, images / "b_mirror.png")
    shutil.copy(faceless_path, images / "c_noface.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of <alice> person\nan oil painting of <alice> person\n<alice> person and Barack Obama\n")
    out = tmp_path / "report"
    assert main(["evaluate", str(images), "--reference", str(astronaut_path), "--prompts", str(prompts),
                 "--clip-model", str(tiny_clip), "-o", str(out), "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["face_detection_rate"] == pytest.approx(2 / 3, abs=1e-5)
    by = {r["path"].split("/")[-1]: r for r in report["images"]}
    assert by["a_photo.png"]["id_similarity"] >= 0.99
    assert by["b_mirror.png"]["id_similarity"] < by["a_photo.png"]["id_similarity"]
    assert by["c_noface.png"]["face_found"] is False and by["c_noface.png"]["id_similarity"] is None
    assert report["id_similarity_mean"] == pytest.approx(
        (by["a_photo.png"]["id_similarity"] + by["b_mirror.png"]["id_similarity"]) / 2, abs=1e-5)
    assert all(r["clip_score"] is not None and r["clip_score"] >= 0 for r in report["images"])
    assert {"style", "single action", "with a celebrity"} == set(report["categories"])
    assert by["b_mirror.png"]["prompt"] == "an oil painting of <alice> person"
    for key in ("face_detection_rate", "id_similarity_mean", "clip_score_mean"):
        assert key in report
    md = (out / "report.md").read_text()
    assert "## By category" in md and "an oil painting of <alice> person" in md
    plot = Image.open(out / "scatter.png")
    assert plot.format == "PNG" and plot.size[0] > 300
    assert Image.open(out / "contact_sheet.png").size[0] >= 256


def test_clip_score_matches_the_model(tiny_clip, astronaut_path):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from celebbasis.evaluate import ClipScorer

    img = Image.open(astronaut_path).convert("RGB")
    model, proc = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    inputs = proc(text=["a person"], images=[img], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
    assert ClipScorer(str(tiny_clip))(img, "a person") == pytest.approx(100 * max(cos, 0), abs=1e-3)


def test_two_people_are_matched_to_their_references(tmp_path, astronaut_path, hopper_path):
    from celebbasis.generate import png_info

    both = side_by_side(Image.open(hopper_path).resize((256, 300)), Image.open(astronaut_path))
    images = tmp_path / "images"
    images.mkdir()
    meta = {"prompt": "<alice> person and <grace> person dancing", "negative_prompt": "", "seed": 0, "steps": 1,
            "guidance": 1.0, "scheduler": "x", "size": "1x1", "model": "m", "identities": ["<alice>", "<grace>"]}
    both.save(images / "two.png", pnginfo=png_info(meta))
    out = tmp_path / "r"
    assert main(["evaluate", str(images), "--reference", f"alice={astronaut_path}", "--reference", f"grace={hopper_path}",
                 "--no-clip", "-o", str(out), "-q"]) == 0
    row = json.loads((out / "report.json").read_text())["images"][0]
    assert row["category"] == "two identities" and row["n_faces"] == 2
    assert row["matches"]["<alice>"] > 0.99 and row["matches"]["<grace>"] > 0.99


def test_helpers():
    assert clip_text("<alice> person and <bob> dancing") == "person and person dancing"
    assert categorize("<a> person and Barack Obama cooking", 1) == "with a celebrity"
    assert categorize("an oil painting of <a> person", 1) == "style"
    assert categorize("<a> person rides a bike", 1) == "single action"
    assert categorize("<a> person and <b> person", 2) == "two identities"
    sim = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert sorted(best_assignment(sim)) == [(0, 1), (1, 0)]
    rows = benchmark_prompts(["alice", "bob"])
    cats = {c for c, _ in rows}
    assert cats == {"style", "single action", "with a celebrity", "two identities"}
    assert all(categorize(p, len(set(re.findall(r"<[^<>\s]+>", p)))) == c for c, p in rows)


def test_benchmark_prompts_feed_generate(tmp_path, tiny_model_dir, astronaut_path):
    ids = tmp_path / "ids"
    assert main(["add", str(astronaut_path), "--name", "alice", "--model", str(tiny_model_dir), "-o", str(ids),
                 "--steps", "2", "--resolution", "64", "-q"]) == 0
    prompts = tmp_path / "p.txt"
    assert main(["benchmark-prompts", "alice", "-o", str(prompts), "-q"]) == 0
    lines = prompts.read_text().splitlines()
    assert len(lines) == 18 and all("\t" in line for line in lines)  # one person: the official single and celebrity prompts
    prompts.write_text("\n".join([lines[0], lines[10]]) + "\n")  # one of each category, to keep it quick
    out = tmp_path / "out"
    assert main(["generate", "--prompts-file", str(prompts), "--identity", str(ids / "alice.safetensors"), "--model",
                 str(tiny_model_dir), "-o", str(out), "--steps", "1", "-q"]) == 0
    cats = {Image.open(p).text["category"] for p in out.glob("0*.png")}
    assert cats == {"single action", "with a celebrity"}


# -- matching faces to references ------------------------------------------------------------------


def greedy_total(sim):
    """Take the largest similarity left, again and again: what the Hungarian method beats."""
    sim, total = sim.astype(float).copy(), 0.0
    for _ in range(min(sim.shape)):
        r, f = np.unravel_index(np.argmax(sim), sim.shape)
        total += sim[r, f]
        sim[r, :], sim[:, f] = -np.inf, -np.inf
    return total


@pytest.mark.parametrize("sim, best", [
    (np.array([[0.9, 0.8], [0.7, 0.1]]), [(0, 1), (1, 0)]),  # greedy: 0.9 + 0.1; best: 0.8 + 0.7
    (np.array([[0.9, 0.8], [0.7, 0.1], [0.85, 0.0]]), [(0, 1), (2, 0)]),  # 3 references, 2 faces
    (np.array([[0.9, 0.7, 0.85], [0.8, 0.1, 0.0]]), [(0, 2), (1, 0)]),  # 2 references, 3 faces
])
def test_best_assignment_beats_greedy(sim, best):
    pairs = best_assignment(sim)
    assert pairs == best
    assert sum(sim[r, f] for r, f in pairs) > greedy_total(sim) + 0.1


def test_best_assignment_finds_a_hidden_matching_quickly():
    rng = np.random.default_rng(0)
    n = 12  # 12!^2 pairs of permutations: the old exhaustive search never finished
    perm = rng.permutation(n)
    sim = rng.uniform(0.0, 0.5, (n, n))
    sim[np.arange(n), perm] = 0.6
    t = time.perf_counter()
    assert best_assignment(sim) == [(i, int(perm[i])) for i in range(n)]
    assert best_assignment(sim[:, :5]) and len(best_assignment(sim[:5])) == 5
    assert best_assignment(np.zeros((2, 0))) == []
    assert time.perf_counter() - t < 1.0


# -- evaluate with stand-in face networks ----------------------------------------------------------


class StubAnalyzer:
    """A face analyzer whose faces are fixed vectors per file: evaluate's bookkeeping without dlib."""

    class encoder:
        name = "stub"

    def __init__(self, faces: dict):
        self.faces = {Path(k).name: [np.asarray(v, np.float32) / np.linalg.norm(v) for v in vs] for k, vs in faces.items()}

    def __call__(self, path):
        return type("Analysis", (), {"embedding": self.faces[Path(path).name][0]})()

    def detect(self, image, path):
        return [Face((0, 0, 1, 1), np.zeros((5, 2)))] * len(self.faces[Path(path).name])

    def embed(self, image, face, path):
        i = getattr(self, "_i", 0)
        vs = self.faces[Path(path).name]
        self._i = (i + 1) % len(vs)
        return None, vs[i]


def plain_images(folder, *names):
    folder.mkdir(exist_ok=True)
    for k, name in enumerate(names):
        Image.new("RGB", (48, 48), (40 * k, 90, 160)).save(folder / name)  # JPEG/PNG without any metadata
    return [folder / n for n in names]


def test_images_without_prompts_match_every_reference(tmp_path, caplog):
    alice, grace = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    images = plain_images(tmp_path / "images", "1.jpg", "2.png")
    analyzer = StubAnalyzer({"alice.jpg": [alice], "grace.jpg": [grace],
                             "1.jpg": [[0.1, 1.0, 0.0]], "2.png": [[1.0, 0.2, 0.0]]})
    refs = [("<alice>", tmp_path / "alice.jpg"), ("<grace>", tmp_path / "grace.jpg")]
    with caplog.at_level(logging.WARNING, logger="celebbasis"):
        report = evaluate(images, refs, analyzer=analyzer, show_progress=False)
    first, second = report.images
    assert list(first.matches) == ["<grace>"] and first.matches["<grace>"] > 0.99  # not just the first reference
    assert list(second.matches) == ["<alice>"] and second.matches["<alice>"] > 0.97
    assert first.category == second.category == "unknown" and first.clip_score is None
    warnings = [r.message for r in caplog.records if "prompt metadata" in r.message]
    assert len(warnings) == 1 and "2 of 2 images" in warnings[0] and "Pass a prompts file" in warnings[0]


def test_named_references_still_follow_the_prompt(tmp_path, caplog):
    alice, grace = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    images = plain_images(tmp_path / "images", "1.png")
    analyzer = StubAnalyzer({"alice.jpg": [alice], "grace.jpg": [grace], "1.png": [[0.1, 1.0, 0.0]]})
    refs = [("<alice>", tmp_path / "alice.jpg"), ("<grace>", tmp_path / "grace.jpg")]
    with caplog.at_level(logging.WARNING, logger="celebbasis"):
        report = evaluate(images, refs, analyzer=analyzer, prompts=[PromptLine("<alice> person dancing")], show_progress=False)
    assert list(report.images[0].matches) == ["<alice>"] and report.images[0].category == "single action"
    assert "prompt metadata" not in caplog.text


def test_a_folder_reference_is_the_mean_of_its_photos(tmp_path, face_analyzer, astronaut_path, hopper_path, astronaut, hopper):
    folder = tmp_path / "alice"
    folder.mkdir()
    shutil.copy(astronaut_path, folder / "one.png")
    shutil.copy(hopper_path, folder / "two.jpg")
    (folder / "notes.txt").write_text("not a photo")
    mean = reference_embedding(face_analyzer, folder)
    expected = astronaut.embedding + hopper.embedding
    np.testing.assert_allclose(mean, expected / np.linalg.norm(expected), atol=1e-5)
    assert np.linalg.norm(mean) == pytest.approx(1.0, abs=1e-5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no PNG/JPEG/WebP photos"):
        reference_embedding(face_analyzer, tmp_path / "empty")


def test_evaluate_takes_a_folder_reference(tmp_path):
    images = plain_images(tmp_path / "images", "1.png")
    refs_dir = tmp_path / "alice"
    plain_images(refs_dir, "a.png", "b.png")
    analyzer = StubAnalyzer({"a.png": [[1.0, 0.0]], "b.png": [[0.0, 1.0]], "1.png": [[1.0, 1.0]]})
    report = evaluate(images, [("<alice>", refs_dir)], analyzer=analyzer, prompts=[("style", "<alice> person")],
                      show_progress=False)
    assert report.images[0].id_similarity == pytest.approx(1.0, abs=1e-6)


def test_unreadable_metadata_warns_with_the_file(tmp_path, caplog, monkeypatch):
    from PIL import Image as PILImage

    from celebbasis.evaluate import _image_meta

    path = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), "red").save(path)
    path.write_bytes(path.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="celebbasis"):
        assert _image_meta(path) == {}
    assert f"Cannot read the metadata of {path}" in caplog.text

    def bug(*args, **kwargs):
        raise KeyError("a bug, not a bad file")

    monkeypatch.setattr(PILImage, "open", bug)
    with pytest.raises(KeyError):  # only what reading a file raises is caught
        _image_meta(path)


# -- report figures --------------------------------------------------------------------------------


def marker_pixels(path) -> int:
    """Coloured pixels: the markers, not the black, white and grey of axes, grid and text."""
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((a.max(-1) - a.min(-1) > 60).sum())


def rows(tmp_path, values):
    paths = plain_images(tmp_path / "images", *[f"{i}.png" for i in range(len(values))])
    return [ImageResult(str(p), f"prompt {i}", cat, sim is not None, int(sim is not None), sim, clip)
            for i, (p, (cat, sim, clip)) in enumerate(zip(paths, values))]


def test_scatter_without_clip_shows_the_id_similarity(tmp_path, caplog):
    report = Report(rows(tmp_path, [("style", 0.6, None), ("style", 0.7, None), ("single action", 0.4, None),
                                    ("single action", None, None)]), "stub", None)
    with caplog.at_level(logging.INFO, logger="celebbasis"):
        paths = write_report(report, tmp_path / "r")
    assert tmp_path / "r" / "scatter.png" in paths
    assert marker_pixels(tmp_path / "r" / "scatter.png") > 100  # the old figure had axes and nothing in them
    assert "ID similarity only" in caplog.text


def test_scatter_is_skipped_when_nothing_was_measured(tmp_path, caplog):
    report = Report(rows(tmp_path, [("style", None, None)]), "stub", None)
    with caplog.at_level(logging.INFO, logger="celebbasis"):
        paths = write_report(report, tmp_path / "r")
    assert not (tmp_path / "r" / "scatter.png").exists() and len(paths) == 3
    assert "scatter.png not drawn" in caplog.text


def test_scatter_with_both_scores(tmp_path):
    report = Report(rows(tmp_path, [("style", 0.6, 20.0), ("single action", 0.5, 25.0)]), "stub", "clip")
    write_report(report, tmp_path / "r")
    assert marker_pixels(tmp_path / "r" / "scatter.png") > 100


# -- CLIP offline ----------------------------------------------------------------------------------


@pytest.mark.parametrize("env", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}])
def test_clip_offline_fails_fast_in_one_line(monkeypatch, capsys, caplog, env):
    from celebbasis.evaluate import ClipScorer

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t = time.perf_counter()
    with caplog.at_level(logging.DEBUG), pytest.raises(ModelLoadError) as e:
        ClipScorer("celebbasis-tests/no-such-clip")  # never cached anywhere
    assert time.perf_counter() - t < 5.0
    msg = str(e.value)
    assert "\n" not in msg and "--clip-model PATH" in msg and "--no-clip" in msg and "not in the local" in msg
    out = capsys.readouterr()
    assert "Retry" not in out.err + out.out + caplog.text


def test_clip_missing_folder(tmp_path):
    from celebbasis.evaluate import ClipScorer

    with pytest.raises(ModelLoadError, match="does not exist. Pass a local CLIP folder with --clip-model PATH"):
        ClipScorer(str(tmp_path / "no-clip"))


# -- protocol prompts ------------------------------------------------------------------------------


def test_official_negative_prompts():
    """Pinned against CelebBasis 557531b evaluation/prompt_templates.py (its missing commas included)."""
    assert negative_prompt_for("style") == ("blurry face, overexpose, highlight on face, only eyes, extra fingers, "
                                            "fewer fingers, divider line, ")
    single, two = negative_prompt_for("single action"), negative_prompt_for("two identities")
    assert single.startswith("only object, only person, close-up, no face,") and single.endswith("missing toes, weird toes")
    assert two.startswith("blurry face, blurry eyes, mixed faces,") and two.endswith("weird toesaged up, old,")
    assert negative_prompt_for("with a celebrity") == two
    assert "fewer digits,bad anatomy" in single and "polar lowresblurry" in two
    with pytest.raises(InputError, match="Unknown prompt category"):
        negative_prompt_for("portrait")


def test_prompt_file_round_trip_and_old_formats(tmp_path):
    lines = benchmark_prompt_lines(["alice", "bob"])
    assert [(x.category, x.prompt) for x in lines] == benchmark_prompts(["alice", "bob"])
    assert all(x.negative_prompt == negative_prompt_for(x.category) for x in lines)
    path = tmp_path / "p.txt"
    path.write_text(prompt_file_text(lines), encoding="utf-8")
    assert read_prompt_file(path) == lines
    path.write_text("# comment\n\na photo of <alice> person\nstyle\tan oil painting of <alice> person\n"
                    "style\tan anime drawing of <alice> person\tblurry\n\t<alice> person\t\n", encoding="utf-8")
    assert read_prompt_file(path) == [
        PromptLine("a photo of <alice> person"),
        PromptLine("an oil painting of <alice> person", "style"),
        PromptLine("an anime drawing of <alice> person", "style", "blurry"),
        PromptLine("<alice> person"),
    ]
    path.write_text("style\ta\tb\tc\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 1: 4 tab-separated fields"):
        read_prompt_file(path)


def test_missing_eval_network_is_reported_before_clip(tmp_path, capsys, monkeypatch, astronaut_path):
    """Offline, a wrong --eval-encoder path is the error a user sees first, not CLIP's."""
    from celebbasis.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "imgs").mkdir()
    Image.open(astronaut_path).save(tmp_path / "imgs" / "a.png")
    assert main(["evaluate", str(tmp_path / "imgs"), "--reference", str(astronaut_path), "--eval-encoder",
                 f"arcface:{tmp_path / 'backbone.pth'}", "--clip-model", "celebbasis-tests/no-such-clip",
                 "-o", str(tmp_path / "r"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "backbone.pth: no such file" in err[0]
