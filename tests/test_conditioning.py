"""Training sees exactly what inference sees: the trainer's text conditioning against the pipeline's own.

The reference writes the identity's rows into the embedding table with ``load_identity`` and calls
``pipe.encode_prompt`` (and, for SDXL, ``pipe._get_add_time_ids``) as generation does; the trainer
substitutes the rows through a forward hook with gradients. Both must give the same tensors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from celebbasis.basis import build_basis
from celebbasis.identity import Identity
from celebbasis.insert import load_identity
from celebbasis.families import text_encoders
from celebbasis.testing import tiny_pipeline
from celebbasis.config import TrainConfig
from celebbasis.prompts import TEMPLATES
from celebbasis.train import Personalizer

CFG = TrainConfig(resolution=64, steps=1, views=1, face_per_photo=True, seed=0)
FAMILIES = ["sd1", "sd2", "sdxl"]


@pytest.fixture(scope="module")
def pipes():
    return {f: tiny_pipeline(family=f) for f in FAMILIES}


def setup(pipes, family, people):
    pipe = copy.deepcopy(pipes[family])
    reference = copy.deepcopy(pipes[family])
    bases = [build_basis(tok, te) for tok, te in text_encoders(pipe)]
    names = ["alice", "grace"][: len(people)]
    return Personalizer(pipe, people, names, CFG, bases, "tiny"), reference, bases


def random_coefficients(bases, seed):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(b.n_tokens, b.n_components, generator=g), dim=-1) for b in bases]


def reference_conditioning(pipe, captions, size=64):
    if getattr(pipe, "text_encoder_2", None) is None:
        embeds, _ = pipe.encode_prompt(captions, "cpu", 1, False)
        return embeds, None, None
    embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return embeds, pooled, time_ids


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_conditioning_equals_the_pipelines(pipes, family, astronaut, hopper):
    trainer, reference, bases = setup(pipes, family, [astronaut, hopper])
    alice_1, grace, alice_2 = (random_coefficients(bases, s) for s in (1, 2, 3))
    captions = [TEMPLATES[54].format("face of <alice> person"),  # "a depiction of a {}"
                TEMPLATES[0].format("face of <grace> person"),
                TEMPLATES[80].format("face of <alice> person")]
    # one batch: alice, grace, and alice again with other coefficients (another view of her)
    coeffs = [torch.stack([a1, g, a2]) for a1, g, a2 in zip(alice_1, grace, alice_2)]  # (3, K, n) per encoder
    with torch.no_grad():
        cond, added = trainer.conditioning(captions, [0, 1, 0], coeffs)

    load_identity(reference, Identity.from_coefficients("<alice>", alice_1, bases))
    load_identity(reference, Identity.from_coefficients("<grace>", grace, bases))
    embeds, pooled, time_ids = reference_conditioning(reference, captions[:2])
    load_identity(reference, Identity.from_coefficients("<alice>", alice_2, bases))
    embeds_2, pooled_2, _ = reference_conditioning(reference, captions[2:])

    assert cond.shape == (3,) + embeds.shape[1:]
    assert max_diff(cond[:2], embeds) < 1e-5 and max_diff(cond[2:], embeds_2) < 1e-5
    if family == "sdxl":
        assert cond.shape[-1] == 32 + 64  # both encoders' penultimate layers, concatenated
        assert max_diff(added["text_embeds"][:2], pooled) < 1e-5 and max_diff(added["text_embeds"][2:], pooled_2) < 1e-5
        assert torch.equal(added["time_ids"], time_ids.repeat(3, 1))
        assert added["time_ids"][0].tolist() == [64, 64, 0, 0, 64, 64]
    else:
        assert added == {}
    plain = reference_conditioning(copy.deepcopy(pipes[family]), ["a depiction of a face of person"])[0]
    assert max_diff(cond[:1, :7], plain[:, :7]) < 1e-5  # causal: the words before the placeholder are untouched
    assert max_diff(cond[:1, -1], plain[:, -1]) > 1e-3  # the identity words changed what follows


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_reaches_every_token_slot_and_head(pipes, family, astronaut):
    trainer, _, bases = setup(pipes, family, [astronaut])
    batch = trainer.sample_batch()
    coeffs = [c.detach().requires_grad_(True) for c in trainer.coefficients(batch)]  # (B, K, n) per encoder
    trainer.loss(batch, coeffs).backward()
    assert len(coeffs) == (2 if family == "sdxl" else 1)
    for c in coeffs:
        assert c.shape[1] == 2
        for k in range(2):  # both rows of K = 2, in every sample
            assert (c.grad[:, k].abs().sum(-1) > 0).all(), k
    trainer.opt.zero_grad()
    trainer.loss(batch).backward()
    for head in trainer.heads:  # one network head per text encoder, each reached
        assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0
    trainer.close()
