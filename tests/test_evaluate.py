"""celebbasis evaluate: detection rate, ID similarity, CLIP score, report files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from celebbasis.cli import main
from conftest import side_by_side
from celebbasis.evaluate import best_assignment, benchmark_prompts, categorize, clip_text
from celebbasis.testing import save_tiny_clip


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
    assert all(categorize(p, 2 if c == "two identities" else 1) == c for c, p in rows)


def test_benchmark_prompts_feed_generate(tmp_path, tiny_model_dir, astronaut_path):
    ids = tmp_path / "ids"
    assert main(["add", str(astronaut_path), "--name", "alice", "--model", str(tiny_model_dir), "-o", str(ids),
                 "--steps", "2", "--resolution", "64", "-q"]) == 0
    prompts = tmp_path / "p.txt"
    assert main(["benchmark-prompts", "alice", "-o", str(prompts), "-q"]) == 0
    lines = prompts.read_text().splitlines()
    assert len(lines) == 15 and all("\t" in line for line in lines)
    prompts.write_text("\n".join(lines[::5]) + "\n")  # one of each category, to keep it quick
    out = tmp_path / "out"
    assert main(["generate", "--prompts-file", str(prompts), "--identity", str(ids / "alice.safetensors"), "--model",
                 str(tiny_model_dir), "-o", str(out), "--steps", "1", "-q"]) == 0
    cats = {Image.open(p).text["category"] for p in out.glob("0*.png")}
    assert cats == {"style", "single action", "with a celebrity"}
