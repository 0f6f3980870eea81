from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from celebbasis.basis import build_basis
from celebbasis.config import TrainConfig
from celebbasis.errors import FileFormatError, InputError
from celebbasis.identity import FACE_DIM, Identity, IdentityEncoder, check_name, face_lift
from celebbasis.testing import tiny_pipeline


def test_encoder_init_and_unit_rows():
    torch.manual_seed(0)
    enc = IdentityEncoder(128, n_tokens=2, n_components=512)
    w = enc.linear.weight
    assert w.shape == (1024, 128)
    assert abs(w.std().item() - 1.0) < 0.02  # standard normal, no 1/sqrt(fan-in)
    assert torch.count_nonzero(enc.linear.bias) == 0
    f = torch.nn.functional.normalize(torch.randn(3, 128), dim=-1)
    out = enc(f)
    assert out.shape == (3, 2, 512)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3, 2), atol=1e-6)
    # LeakyReLU(0.2) before the normalisation: recompute independently
    raw = f @ w.T
    ref = torch.where(raw > 0, raw, 0.2 * raw).view(3, 2, 512)
    assert torch.allclose(out, ref / ref.norm(dim=-1, keepdim=True), atol=1e-6)


def test_identity_round_trip(tmp_path, tiny_pipe):
    basis = build_basis(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    coeffs = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    ident = Identity.from_coefficients("<alice>", coeffs, basis, base_model="tiny", face_encoder="dlib-resnet-v1", steps=7, seed=3)
    path = ident.save(tmp_path / "alice.safetensors")
    assert path.stat().st_size < 8_000
    back = Identity.load(path)
    assert back.token == "<alice>" and back.name == "alice"
    assert torch.equal(back.coefficients, ident.coefficients) and torch.equal(back.embeddings, ident.embeddings)
    assert back.metadata["steps"] == 7 and back.metadata["seed"] == 3
    assert back.metadata["basis_sha256"] == basis.fingerprint
    assert back.metadata["face_encoder"] == "dlib-resnet-v1"
    assert "created" in back.metadata


def test_embeddings_follow_the_method(tiny_pipe):
    basis = build_basis(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    coeffs = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    ident = Identity.from_coefficients("<a>", coeffs, basis)
    for j in range(2):  # e_j = c_j . B_j + mean_j
        assert torch.allclose(ident.embeddings[j], coeffs[j] @ basis.components[j] + basis.mean[j], atol=1e-6)


def test_identity_load_refuses_a_basis(tmp_path, tiny_pipe):
    path = build_basis(tiny_pipe.tokenizer, tiny_pipe.text_encoder).save(tmp_path / "x.safetensors")
    with pytest.raises(FileFormatError, match="not a celebbasis.identity file"):
        Identity.load(path)


@pytest.mark.parametrize("change, match", [
    ({"token": "<../../escaped>"}, "is not <name>"), ({"token": "</tmp/abs>"}, "is not <name>"),
    ({"token": "hello world"}, "is not <name>"), ({"nan": True}, "not finite"), ({"rows": 0}, "no vectors"),
])
def test_identity_files_that_could_do_harm_are_refused(tmp_path, tiny_pipe, change, match):
    """The token names every file made from an identity (exports): it is never a path; values are finite."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    basis = build_basis(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    path = Identity.from_coefficients("<alice>", torch.nn.functional.normalize(torch.randn(2, 32), dim=-1),
                                      basis).save(tmp_path / "alice.safetensors")
    tensors = load_file(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    meta.update({k: v for k, v in change.items() if k == "token"})
    if change.get("nan"):
        tensors["embeddings"][0, 0] = float("nan")
    if "rows" in change:
        tensors = {k: v[:0] for k, v in tensors.items()}
    save_file(tensors, path, metadata=meta)
    with pytest.raises(FileFormatError, match=match):
        Identity.load(path)


@pytest.mark.parametrize("good", ["alice", "Bob_2", "<carol>", "x-y"])
def test_good_names(good):
    assert check_name(good) == good.strip("<>")


@pytest.mark.parametrize("bad", ["", " ", "a b", "../evil", "a/b", ".hidden", "x" * 65, "é"])
def test_bad_names(bad):
    with pytest.raises(InputError, match="Invalid name"):
        check_name(bad)


def test_face_lift_is_fixed_and_keeps_lengths_and_angles():
    lift = face_lift(128)
    assert lift.shape == (FACE_DIM, 128) and torch.equal(lift, face_lift(128))  # reproducible, never stored
    assert torch.allclose(lift.T @ lift, torch.eye(128), atol=1e-5)  # orthonormal columns
    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(4, 128, generator=g), dim=-1)
    up = f @ lift.T
    assert torch.allclose(up.norm(dim=-1), torch.ones(4), atol=1e-5) and torch.allclose(up @ up.T, f @ f.T, atol=1e-5)
    enc = IdentityEncoder(128, 2, 512, generator=torch.Generator().manual_seed(0), lift_to=512)
    assert enc.linear.weight.shape == (1024, 512) and torch.equal(enc.lift, lift)
    assert not any(p is enc.lift for p in enc.parameters())  # a fixed buffer, not trained
    assert IdentityEncoder(512, lift_to=512).lift is None  # the paper's size needs no lift


def first_step_movement(face, lift_to, seed):
    """How far one AdamW step (lr 1e-2) moves the unit coefficient rows, from the official initialisation."""
    g = torch.Generator().manual_seed(seed)
    enc = IdentityEncoder(face.shape[1], 2, 512, generator=g, lift_to=lift_to)
    target = torch.randn(2, 512, generator=g)
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-2, weight_decay=0.01)
    before = enc(face).detach()
    (enc(face) * target).sum().backward()
    opt.step()
    return (enc(face).detach() - before).norm().item()


def test_a_lifted_dlib_vector_learns_as_fast_as_a_512d_one(astronaut):
    dlib = torch.from_numpy(astronaut.embedding)[None]  # (1, 128), unit length
    seeds = range(8)
    unit_512 = [torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(100 + s)), dim=-1)
                for s in seeds]  # a random unit 512-d vector, as the paper's face network gives
    ref = sum(first_step_movement(f, None, s) for f, s in zip(unit_512, seeds))
    lifted = sum(first_step_movement(dlib, 512, s) for s in seeds)
    plain = sum(first_step_movement(dlib, None, s) for s in seeds)
    assert abs(lifted / ref - 1) < 0.1  # the paper's learning speed
    assert plain / ref < 0.65  # without the lift: about half (||f||_1 of 9 instead of 18)


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="POSIX pipes")
def test_a_pipe_is_refused_not_waited_on(tmp_path):
    import os

    fifo = tmp_path / "alice.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        Identity.load(fifo)  # without the check this blocks forever


def test_a_trained_identity_records_its_train_config(tmp_path, tiny_pipe, astronaut):
    from celebbasis.config import TrainConfig
    from celebbasis.train import personalize

    config = TrainConfig(steps=2, resolution=64, views=2, learning_rate=0.02, flip_p=0.0, face_per_photo=True, seed=7)
    result = personalize(tiny_pipe, [astronaut], ["alice"], config=config, show_progress=False)
    [path] = result.save(tmp_path)
    ident = Identity.load(path)
    assert ident.train_config == config.to_dict()  # as JSON in the file's metadata, read back as a dict
    assert TrainConfig.from_dict(ident.train_config) == config
    assert ident.metadata["train_config"] == config.to_dict()  # kept through a re-save (rename does that)
    ident.save(tmp_path / "again.safetensors")
    assert Identity.load(tmp_path / "again.safetensors").train_config == config.to_dict()


def test_identities_not_made_by_training_have_no_train_config(tmp_path, tiny_pipe):
    basis = build_basis(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    coeffs = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    Identity.from_coefficients("<bob>", coeffs, basis, base_model="tiny").save(tmp_path / "bob.safetensors")
    assert Identity.load(tmp_path / "bob.safetensors").train_config is None  # a mix, an import, or a 0.1 file


def test_encoder_weights_come_from_its_seed_not_the_global_rng():
    state = torch.get_rng_state()
    a, b = IdentityEncoder(16, 2, 8, seed=3), IdentityEncoder(16, 2, 8, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # constructing one neither reads nor advances torch's RNG
    assert torch.equal(a.linear.weight, b.linear.weight)  # same seed, same weights
    assert not torch.equal(a.linear.weight, IdentityEncoder(16, 2, 8, seed=4).linear.weight)
    torch.manual_seed(123)
    assert torch.equal(IdentityEncoder(16, 2, 8).linear.weight, IdentityEncoder(16, 2, 8, seed=0).linear.weight)  # default seed 0
    given = IdentityEncoder(16, 2, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(given.linear.weight, a.linear.weight)  # a generator given is used, seeded the same


LEGACY = Path(__file__).parent / "data" / "legacy-identities"


@pytest.mark.parametrize("name, family", [("legacy_sd1", "sd1"), ("legacy_sdxl", "sdxl")])
def test_identity_files_written_before_load_unchanged(name, family):
    """Files written by the code before identities held one part per encoder (``tests/data/legacy-identities``):
    the same token, family, tensors and metadata, and the same prompt embeddings on their tiny model."""
    from safetensors.torch import load_file

    from celebbasis.families import family_of
    from celebbasis.insert import load_identity
    from celebbasis.models import load_pipeline
    from celebbasis.pooling import eos_pooling

    expected = json.loads((LEGACY / "expected.json").read_text())[name]
    path = LEGACY / f"{name}.safetensors"
    ident = Identity.load(path)
    raw = load_file(str(path))
    assert ident.token == expected["token"] and ident.family.name == expected["family"] == family
    assert [[list(c.shape), list(e.shape)] for c, e in ident.parts] == expected["shapes"]
    for i, (coeffs, emb) in enumerate(ident.parts):
        suffix = "" if i == 0 else f"_{i + 1}"
        assert torch.equal(coeffs, raw["coefficients" + suffix]) and torch.equal(emb, raw["embeddings" + suffix])
    assert ident.metadata == expected["metadata"]

    pipe = load_pipeline(tiny=True, family=family, device="cpu")
    load_identity(pipe, ident)
    with torch.no_grad(), eos_pooling(family_of(pipe).pooled_encoder(pipe)):
        out = pipe.encode_prompt([f"a photo of {ident.token} person"], device="cpu", num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)  # (embeds, negative[, pooled, negative pooled])
    embeds = out[0]
    assert float(embeds.double().abs().sum()) == pytest.approx(expected["prompt_embeds_abs_sum"], rel=1e-5)
    assert [round(float(x), 6) for x in embeds[0, 1:6, :4].flatten()] == pytest.approx(expected["slice"], abs=2e-6)
    if expected["pooled_sum"] is not None:
        assert float(out[2].double().sum()) == pytest.approx(expected["pooled_sum"], rel=1e-5)


def test_an_identity_holds_one_part_per_encoder_any_number(tmp_path, tiny_pipe):
    """Three text encoders: three parts, saved as ``_2`` and ``_3`` beside the first, read back in order."""
    basis = build_basis(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    coeffs = [torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(i)), dim=-1)
              for i in range(3)]
    ident = Identity.from_coefficients("<trio>", coeffs, [basis] * 3, model_family="three-clips")
    assert [type(p).__name__ for p in ident.parts] == ["IdentityPart"] * 3
    path = ident.save(tmp_path / "trio.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["coefficients", "coefficients_2", "coefficients_3", "embeddings", "embeddings_2",
                                    "embeddings_3"]
    back = Identity.load(path)
    assert len(back.parts) == 3 and all(torch.equal(a.coefficients, c) for a, c in zip(back.parts, coeffs))
    assert torch.equal(back.coefficients, coeffs[0]) and torch.equal(back.parts[2].embeddings, ident.parts[2].embeddings)


def test_identities_record_their_family(tiny_pipe, astronaut):
    from celebbasis.train import personalize

    for family in ("sd1", "sd2"):
        pipe = tiny_pipe if family == "sd1" else tiny_pipeline(family="sd2")
        cfg = TrainConfig(steps=1, resolution=64, views=1, face_per_photo=True)
        ident = personalize(pipe, [astronaut], ["a"], config=cfg, show_progress=False).identities[0]
        assert ident.metadata["model_family"] == family and ident.family.name == family  # tiny SD 2 is 32 wide, as tiny SD 1
