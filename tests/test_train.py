"""Personalization on the tiny model with real faces."""

from __future__ import annotations

import json

import pytest
import torch

from celebbasis.basis import build_basis
from celebbasis.errors import InputError
from celebbasis.identity import Identity
from celebbasis.insert import expand_prompt
from celebbasis.testing import tiny_pipeline
from celebbasis.train import Personalizer, TrainConfig, augment, personalize

CFG = dict(resolution=64, seed=0)


def frozen_state(pipe):
    return {f"{m}.{k}": v.detach().clone() for m in ("vae", "unet", "text_encoder")
            for k, v in getattr(pipe, m).state_dict().items()}


def test_training_changes_only_the_identity_network(tiny_pipe, astronaut):
    before = frozen_state(tiny_pipe)
    result = personalize(tiny_pipe, [astronaut], ["alice"], config=TrainConfig(steps=3, **CFG), show_progress=False)
    after = frozen_state(tiny_pipe)
    for k, v in before.items():
        if k.endswith("token_embedding.weight"):
            assert torch.equal(after[k][:49408], v)  # the vocabulary's rows never change
            assert torch.allclose(after[k][49408:], result.identities[0].embeddings)  # new word ready to draw
        else:
            assert torch.equal(after[k], v), k
    assert all(not p.requires_grad for m in (tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder) for p in m.parameters())


def test_loss_on_a_fixed_batch_goes_down(tiny_pipe, astronaut):
    basis = build_basis(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    trainer = Personalizer(tiny_pipe, [astronaut], ["alice"], TrainConfig(learning_rate=5e-2, **CFG), basis, "tiny")
    batch = trainer.sample_batch()
    with torch.no_grad():
        first = trainer.loss(batch).item()
    w0 = trainer.mlp.linear.weight.detach().clone()
    for _ in range(15):
        trainer.step(batch)
    with torch.no_grad():
        last = trainer.loss(batch).item()
    assert last < first
    assert not torch.equal(trainer.mlp.linear.weight, w0)


def test_v_prediction_target(astronaut):
    pipe = tiny_pipeline(prediction_type="v_prediction")
    basis = build_basis(pipe.tokenizer, pipe.text_encoder)
    trainer = Personalizer(pipe, [astronaut], ["alice"], TrainConfig(**CFG), basis, "tiny-v")
    b = trainer.sample_batch()
    ac = trainer.noise_scheduler.alphas_cumprod[b["timesteps"]].view(-1, 1, 1, 1)
    v = ac.sqrt() * b["noise"] - (1 - ac).sqrt() * b["latents"]  # v = alpha_t * eps - sigma_t * x0
    assert torch.allclose(b["target"], v, atol=1e-5)
    assert torch.isfinite(torch.tensor(trainer.step(b)))


def test_saved_coefficients_are_the_normalised_average(tiny_pipe, astronaut):
    basis = build_basis(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    trainer = Personalizer(tiny_pipe, [astronaut], ["alice"], TrainConfig(**CFG), basis, "tiny")
    seen = []
    for _ in range(3):
        with torch.no_grad():
            seen.append(trainer.coefficients()[0][0].clone())  # encoder 0, identity 0: (K, n)
        trainer.step()
    ema = seen[0]  # batch 2: two updates per step, starting from the first prediction
    for c in [seen[0]] + [c for c in seen[1:] for _ in range(2)]:
        ema = 0.99 * ema + 0.01 * c
    ident = trainer.identities()[0]
    assert torch.allclose(ident.coefficients, torch.nn.functional.normalize(ema, dim=-1), atol=1e-5)
    assert torch.allclose(ident.coefficients.norm(dim=-1), torch.ones(2), atol=1e-6)


def test_joint_training_saves_each_person(tmp_path, tiny_pipe, astronaut, hopper):
    result = personalize(tiny_pipe, [astronaut, hopper], ["alice", "grace"], config=TrainConfig(steps=4, **CFG),
                         show_progress=False)
    paths = result.save(tmp_path)
    assert [p.name for p in paths] == ["alice.safetensors", "grace.safetensors"]
    a, g = (Identity.load(p) for p in paths)
    assert a.token == "<alice>" and g.token == "<grace>"
    assert not torch.allclose(a.coefficients, g.coefficients)
    run = json.loads((tmp_path / "alice.run.json").read_text())
    assert run["names"] == ["alice", "grace"] and run["config"]["steps"] == 4 and len(run["losses"]) == 4
    assert run["seed"] == 0 and "torch_version" in run
    with pytest.raises(InputError, match="already exists"):
        result.save(tmp_path)


def test_same_seed_same_identity(_tiny_pipe, astronaut):
    import copy

    runs = [personalize(copy.deepcopy(_tiny_pipe), [astronaut], ["a"], config=TrainConfig(steps=2, **CFG),
                        show_progress=False) for _ in range(2)]
    assert torch.equal(runs[0].identities[0].coefficients, runs[1].identities[0].coefficients)
    assert runs[0].losses == runs[1].losses


def test_augment_keeps_size_and_black_canvas(astronaut):
    import numpy as np

    rng = np.random.default_rng(0)
    cfg = TrainConfig(min_scale=0.3, max_scale=0.3)
    view = np.asarray(augment(astronaut.crop(128), 128, rng, cfg))
    assert view.shape == (128, 128, 3)
    filled = (view.sum(-1) > 0).mean()
    assert 0.05 < filled <= 0.3 ** 2 + 0.02  # face pasted at 30 % of the side, rest black


@pytest.mark.parametrize("names, match", [(["a", "a"], "more than once"), (["a"], "2 photo"), (["a b", "c"], "Invalid name")])
def test_bad_names_fail_before_training(tiny_pipe, astronaut, names, match):
    with pytest.raises(InputError, match=match):
        personalize(tiny_pipe, [astronaut, astronaut], names, config=TrainConfig(steps=1, **CFG), show_progress=False)


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(resolution=100), dict(min_scale=0.0), dict(ema_momentum=1.0)])
def test_config_validation(kwargs):
    with pytest.raises(InputError):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("views, expect_pool", [(6, True), (0, False)])
def test_frozen_work_is_done_once(tiny_pipe, astronaut, views, expect_pool):
    basis = build_basis(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    calls = []
    encode = tiny_pipe.vae.encode
    tiny_pipe.vae.encode = lambda x, *a, **k: calls.append(len(x)) or encode(x, *a, **k)
    trainer = Personalizer(tiny_pipe, [astronaut], ["alice"], TrainConfig(steps=10, views_per_identity=views, **CFG), basis, "tiny")
    built = sum(calls)
    for _ in range(5):
        trainer.step()
    if expect_pool:
        assert built == 6 and sum(calls) == 6  # the VAE never runs inside the loop
        assert trainer.pool[0][0].shape == (6, 4, 8, 8)
    else:
        assert built == 0 and sum(calls) == 10  # the recipe's way: two new views every step
    b = trainer.sample_batch()
    for ids, cap in zip(b["input_ids"][0], b["captions"]):  # pre-tokenized captions match their text
        expect = tiny_pipe.tokenizer(expand_prompt(tiny_pipe.tokenizer, cap), padding="max_length", max_length=77).input_ids
        assert ids.tolist() == expect


def test_a_joint_run_refuses_two_face_encoders(tiny_pipe, astronaut, hopper):
    import dataclasses

    other = dataclasses.replace(hopper, encoder="arcface-r100:0123456789ab")
    with pytest.raises(InputError, match="different face encoders"):
        personalize(tiny_pipe, [astronaut, other], ["a", "b"], config=TrainConfig(steps=1, **CFG), show_progress=False)


def test_low_memory_gives_the_same_loss_and_gradient(_tiny_pipe, astronaut):
    import copy

    def grads(low_memory):
        pipe = copy.deepcopy(_tiny_pipe)
        basis = build_basis(pipe.tokenizer, pipe.text_encoder)
        trainer = Personalizer(pipe, [astronaut], ["alice"], TrainConfig(low_memory=low_memory, **CFG), basis, "tiny")
        assert pipe.unet.is_gradient_checkpointing == low_memory
        batch = trainer.sample_batch()
        loss = trainer.loss(batch)
        loss.backward()
        return loss.item(), trainer.mlp.linear.weight.grad.clone()

    (l0, g0), (l1, g1) = grads(False), grads(True)
    assert l0 == pytest.approx(l1, abs=1e-6)
    assert torch.allclose(g0, g1, atol=1e-5)
