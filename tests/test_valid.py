"""Valid once, checked before anything changes (issue #20 §2): each input rule lives in one library function,
runs before the first model load or pipeline change, and says which setting was wrong (``InputError.field``);
the command line names that setting's flag from one table (``cli.FLAGS``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from celebbasis.basis import build_basis
from celebbasis.config import BasisConfig, GenerateConfig, TrainConfig
from celebbasis.errors import InputError, NoFaceFoundError
from celebbasis.identity import Identity, IdentityPart


@pytest.fixture
def alice(tiny_pipe):
    basis = build_basis(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    coeffs = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    return Identity.from_coefficients("<alice>", coeffs, basis)


@pytest.mark.parametrize("make, field", [
    (lambda: BasisConfig(n_components=0), "n_components"),
    (lambda: BasisConfig(n_tokens=0), "n_tokens"),
    (lambda: TrainConfig(learning_rate=float("nan")), "learning_rate"),
    (lambda: TrainConfig(min_scale=0.9, max_scale=0.5), "min_scale"),
    (lambda: GenerateConfig(scheduler="nope"), "scheduler"),
    (lambda: GenerateConfig(height=65), "height"),
    (lambda: GenerateConfig.preset("nope"), "preset"),
])
def test_a_config_error_names_its_field(make, field):
    with pytest.raises(InputError) as e:
        make()
    assert e.value.field == field


def test_build_basis_checks_its_settings_by_the_config(tiny_pipe):
    with pytest.raises(InputError, match="n_tokens must be >= 1") as e:  # BasisConfig's rule, not a copy
        build_basis(tiny_pipe.tokenizer, tiny_pipe.text_encoder, n_tokens=0)
    assert e.value.field == "n_tokens"


def test_defaults_have_one_home():
    import inspect

    from celebbasis.cli import build_parser
    from celebbasis.config import WEBUI_HOST, WEBUI_PORT
    from celebbasis.identity import IdentityEncoder
    from celebbasis.basis import cached_basis
    from celebbasis.webui import launch

    cfg = BasisConfig()
    for fn in (build_basis, cached_basis):
        p = inspect.signature(fn).parameters
        assert (p["n_components"].default, p["n_tokens"].default, p["dedupe"].default) == (cfg.n_components, cfg.n_tokens, cfg.dedupe)
    p = inspect.signature(IdentityEncoder).parameters
    assert (p["n_tokens"].default, p["n_components"].default) == (cfg.n_tokens, cfg.n_components)
    p = inspect.signature(launch).parameters
    assert (p["host"].default, p["port"].default) == (WEBUI_HOST, WEBUI_PORT)
    webui = build_parser().subparsers["webui"]
    assert (webui.flag_defaults["host"], webui.flag_defaults["port"]) == (WEBUI_HOST, WEBUI_PORT)


def test_the_demo_samples_with_the_configs_defaults():
    from types import SimpleNamespace

    from celebbasis.cli import _demo_sampling
    from celebbasis.config import GENERATE_PRESETS

    plain = _demo_sampling(SimpleNamespace(tiny=False, num_images=None, sample_steps=None), seed=3)
    assert (plain.steps, plain.num_images, plain.seed) == (GenerateConfig().steps, GenerateConfig().num_images, 3)
    assert _demo_sampling(SimpleNamespace(tiny=True, num_images=2, sample_steps=None), 0).steps == GENERATE_PRESETS["tiny"]["steps"]


def test_people_and_names_are_checked_without_a_model():
    from celebbasis.train import check_people

    assert check_people(["ann", "bob"], 2) == ["ann", "bob"]
    for names, n, said in ((["ann"], 2, r"2 photo\(s\) but 1 name"), (["ann", "ann"], 2, "more than once"),
                           ([], 0, "No photo given")):
        with pytest.raises(InputError, match=said) as e:
            check_people(names, n)
        assert e.value.field in ("names", "photos")


def test_a_word_of_the_model_is_refused_once_for_training_and_loading(tiny_pipe, alice):
    from celebbasis.insert import check_token_free, load_identity

    word = "photo</w>"  # a word of CLIP's own vocabulary
    with pytest.raises(InputError, match="already a word in the model's vocabulary") as e:
        check_token_free(tiny_pipe.tokenizer, word)
    assert e.value.field == "name"
    before = len(tiny_pipe.tokenizer)
    with pytest.raises(InputError, match="already a word"):  # the same rule, before anything is added
        load_identity(tiny_pipe, dataclasses.replace(alice, token=word))
    assert len(tiny_pipe.tokenizer) == before


def test_offload_is_checked_by_the_one_entry_check(tiny_pipe):
    from celebbasis.train import check_inputs

    tiny_pipe._all_hooks = [object()]
    with pytest.raises(InputError, match="offload"):
        check_inputs(tiny_pipe, ["ann"], 1)


@pytest.mark.parametrize("bad", ["prompt", "identity"])
def test_generate_with_bad_input_leaves_the_pipeline_unchanged(tiny_pipe, alice, bad):
    from celebbasis.generate import generate

    other = dataclasses.replace(alice, token="<bob>", parts=[IdentityPart(alice.coefficients, torch.zeros(2, 7))])  # another width
    ids, prompt = ([alice], "<carol> person") if bad == "prompt" else ([alice, other], "<alice> person")
    vocab, table = dict(tiny_pipe.tokenizer.get_vocab()), tiny_pipe.text_encoder.get_input_embeddings().weight.clone()
    with pytest.raises(InputError):
        generate(tiny_pipe, prompt, identities=ids, steps=1, show_progress=False)
    assert tiny_pipe.tokenizer.get_vocab() == vocab  # <alice> was not added before the check failed
    assert torch.equal(tiny_pipe.text_encoder.get_input_embeddings().weight, table)


def test_nothing_to_mix_and_weights_are_checked_in_mix():
    from celebbasis.mix import ingredients

    assert ingredients(["Anne Hathaway", "Tom Hanks"]) == [("Anne Hathaway", 0.5), ("Tom Hanks", 0.5)]
    for items, weights, field in (([], None, "ingredients"), (["A B"], [1.0, 2.0], "weights"),
                                  (["A B"], [float("inf")], "weights"), (["A B"], [0.0], "weights")):
        with pytest.raises(InputError) as e:
            ingredients(items, weights)
        assert e.value.field == field


def test_export_refuses_an_existing_file_and_its_own_input(tmp_path, alice):
    from celebbasis.export import export_identity

    src = alice.save(tmp_path / "alice.safetensors")
    before = src.read_bytes()
    with pytest.raises(InputError, match="is the identity being exported") as e:
        export_identity(src, "a1111", tmp_path, overwrite=True)
    assert e.value.field == "path" and src.read_bytes() == before
    out = export_identity(src, "diffusers", tmp_path / "out")
    with pytest.raises(InputError, match="already exists") as e:
        export_identity(src, "diffusers", tmp_path / "out")
    assert e.value.field == "overwrite" and out.exists()


def test_a_photo_too_small_to_search_is_refused_by_detect(tmp_path):
    from PIL import Image

    from celebbasis.face import FaceAnalyzer

    class Never:
        def detect(self, image):
            raise AssertionError("the detector ran")

    path = tmp_path / "tiny.png"
    Image.new("RGB", (20, 20)).save(path)
    analyzer = FaceAnalyzer(detector=Never(), encoder=object())
    with pytest.raises(NoFaceFoundError, match="too small"):
        analyzer(path)
    with pytest.raises(NoFaceFoundError, match="upload.png is only 20x20"):  # named as the caller labels it
        analyzer.find(path, label="upload.png")


def test_the_command_line_names_the_flag_from_one_table(tmp_path, capsys, monkeypatch):
    import celebbasis.cli as cli
    from celebbasis.cli import FLAGS, error_line, flag_for, main

    assert flag_for("names") == FLAGS["names"] == "--name" and flag_for("batch_size") == "--batch-size"
    assert error_line(InputError("x already exists. Pass overwrite=True to replace it.", field="overwrite")) == \
        "x already exists. Pass --overwrite to replace it."
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["add", "a.jpg", "--name", "x", "--batch-size", "0", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["celebbasis: error: --batch-size must be >= 1, got 0."]
