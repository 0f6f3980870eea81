"""SDXL's pooled prompt vector is read at the end-of-text token, also when the prompt holds an identity.

Both SDXL text encoder configs carry the legacy ``eos_token_id`` 2, with which transformers pools at
``input_ids.argmax()``: the identity's words (ids above the end token) would win, while ComfyUI and
A1111/Forge pool at the end token. Training and generation must both pool there, and prompts without
new words must not change at all.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from celebbasis.basis import build_basis
from celebbasis.config import TrainConfig
from celebbasis.families import family_of, text_encoders
from celebbasis.identity import Identity
from celebbasis.insert import expand_prompt, load_identity
from celebbasis.pooling import eos_pooling, remove_eos_pooling, use_eos_pooling
from celebbasis.testing import TINY_WIDTH_2, _tiny_text_encoder, tiny_pipeline
from celebbasis.train import Personalizer

PROMPTS = ["a photo of <alice> person", "<alice> person and Barack Obama cooking dinner in a small kitchen"]
PLAIN = ["a photo of a person", "", "a painting of " + "a very long river, " * 30]  # the last one is cut at 77 tokens


@pytest.fixture(scope="module")
def sdxl():
    return tiny_pipeline(family="sdxl")


@pytest.fixture(scope="module")
def bases(sdxl):
    return [build_basis(tok, te) for tok, te in text_encoders(sdxl)]


def pooled_encoder(pipe):
    """The (tokenizer, text encoder) whose pooled vector conditions the pipeline's UNet, or ``None``."""
    return family_of(pipe).pooled_encoder(pipe)


def coefficients(bases, seed):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(b.n_tokens, b.n_components, generator=g), dim=-1) for b in bases]


@pytest.fixture(scope="module")
def alice(bases):
    return Identity.from_coefficients("<alice>", coefficients(bases, 1), bases)


def encode(pipe, prompts):
    """(hidden states, pooled vector) as generation computes them."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return embeds, pooled


def forward_hooks(pipe):
    return [dict(te._forward_hooks) for _, te in text_encoders(pipe)]


def read_at(pipe, prompts):
    """Independently of the hook: the second encoder's last hidden states and ids, and its projection
    of the state at the first end-of-text token and at ``argmax(ids)`` (what transformers reads)."""
    tok, te = pipe.tokenizer_2, pipe.text_encoder_2
    ids = tok([expand_prompt(tok, p) for p in prompts], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = te(ids, output_hidden_states=True).last_hidden_state
        eos = [row.tolist().index(tok.eos_token_id) for row in ids]
        at_eos = te.text_projection(hidden[torch.arange(len(prompts)), eos])
        at_argmax = te.text_projection(hidden[torch.arange(len(prompts)), ids.argmax(-1)])
    return ids, eos, at_eos, at_argmax


def test_tiny_sdxl_has_the_real_configs_eos_token_id(sdxl):
    assert sdxl.text_encoder_2.config.eos_token_id == 2 and sdxl.text_encoder.config.eos_token_id == 2
    assert sdxl.tokenizer_2.eos_token_id == 49407


def test_identity_prompt_is_pooled_at_the_end_token(sdxl, alice):
    pipe = copy.deepcopy(sdxl)
    load_identity(pipe, alice)
    _, pooled = encode(pipe, PROMPTS)
    ids, eos, at_eos, at_argmax = read_at(pipe, PROMPTS)
    assert (ids.max(-1).values > pipe.tokenizer_2.eos_token_id).all()  # the identity's words lie above the end token
    assert all(int(a) != e for a, e in zip(ids.argmax(-1), eos))  # so argmax is not the end token
    torch.testing.assert_close(pooled, at_eos, rtol=0, atol=1e-6)
    assert (pooled - at_argmax).abs().amax(-1).min() > 1e-2  # what transformers alone would have given

    # transformers itself, with the corrected config (it then pools at the first end token), agrees
    te = pipe.text_encoder_2
    config = copy.deepcopy(te.config)
    config.eos_token_id = pipe.tokenizer_2.eos_token_id
    fixed = type(te)(config).eval()
    fixed.load_state_dict(te.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(pooled, fixed(ids).text_embeds, rtol=0, atol=1e-6)
        assert torch.equal(te(ids, return_dict=False)[0], te(ids).text_embeds)  # the tuple output pools the same


def test_prompts_without_new_words_are_unchanged(sdxl, alice):
    plain = copy.deepcopy(sdxl)
    pipe = copy.deepcopy(sdxl)
    load_identity(pipe, alice)
    for prompt in PLAIN:
        a, b = encode(pipe, [prompt]), encode(plain, [prompt])
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), prompt
    # in a batch, the prompt without new words keeps the model's own vector, bit for bit
    argmax = copy.deepcopy(pipe)
    remove_eos_pooling(pooled_encoder(argmax))
    assert forward_hooks(argmax) == [{}, {}]
    batch = [PROMPTS[0], PLAIN[0]]
    (e1, p1), (e2, p2) = encode(pipe, batch), encode(argmax, batch)
    assert torch.equal(e1, e2) and torch.equal(p1[1], p2[1])
    assert not torch.allclose(p1[0], p2[0], atol=1e-2)


def test_training_and_generation_condition_alike(sdxl, bases, astronaut):
    pipe, reference = copy.deepcopy(sdxl), copy.deepcopy(sdxl)
    before = forward_hooks(pipe)
    cfg = TrainConfig(resolution=64, steps=1, views=1, face_per_photo=True, seed=0)
    coeffs = coefficients(bases, 2)
    with Personalizer(pipe, [astronaut], ["alice"], cfg, bases, "tiny") as trainer:
        with torch.no_grad():
            cond, added = trainer.conditioning(PROMPTS, [0, 0], [torch.stack([c, c]) for c in coeffs])
        assert forward_hooks(pipe) == before  # the hook lives only while the prompts are encoded
    assert forward_hooks(pipe) == before

    load_identity(reference, Identity.from_coefficients("<alice>", coeffs, bases))
    with torch.no_grad():
        embeds, pooled = encode(reference, PROMPTS)
        ref_cond, ref_added = family_of(reference).conditioning(reference, PROMPTS, 64)
    torch.testing.assert_close(cond, embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_added["text_embeds"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(added["text_embeds"], read_at(reference, PROMPTS)[2], rtol=0, atol=1e-5)


def test_the_hook_is_undone(sdxl, alice):
    pipe = copy.deepcopy(sdxl)
    before = forward_hooks(pipe)
    with eos_pooling(pooled_encoder(pipe)):
        assert len(pipe.text_encoder_2._forward_hooks) == 1
        with eos_pooling(pooled_encoder(pipe)):  # nested: still one hook
            assert len(pipe.text_encoder_2._forward_hooks) == 1
        assert len(pipe.text_encoder_2._forward_hooks) == 1
    assert forward_hooks(pipe) == before

    load_identity(pipe, alice)
    load_identity(pipe, alice)  # loading again adds no second hook
    assert len(pipe.text_encoder_2._forward_hooks) == 1 and pipe.text_encoder._forward_hooks == {}
    with eos_pooling(pooled_encoder(pipe)):  # a block inside loaded identities leaves them their hook
        pass
    assert len(pipe.text_encoder_2._forward_hooks) == 1
    remove_eos_pooling(pooled_encoder(pipe))
    assert forward_hooks(pipe) == before

    # identities unloaded the diffusers way: the hook goes with them, on the next prompt
    use_eos_pooling(pooled_encoder(pipe))
    pipe.unload_textual_inversion(text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.unload_textual_inversion(text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    assert pipe.text_encoder_2.get_input_embeddings().num_embeddings == len(pipe.tokenizer_2) == 49408
    a, b = encode(pipe, PLAIN[:1]), encode(sdxl, PLAIN[:1])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert forward_hooks(pipe) == before


def test_nothing_to_do_elsewhere(alice, bases):
    sd1 = tiny_pipeline()
    assert not use_eos_pooling(pooled_encoder(sd1))  # SD 1.x/2.x: the pooled vector conditions nothing
    with eos_pooling(pooled_encoder(sd1)):
        assert sd1.text_encoder._forward_hooks == {}
    # a config that names the real end token (eos_token_id 49407): transformers pools there by itself
    modern = tiny_pipeline(family="sdxl")
    with torch.random.fork_rng(devices=[]):
        modern.text_encoder_2 = _tiny_text_encoder(modern.tokenizer_2, TINY_WIDTH_2, with_projection=True)
    assert modern.text_encoder_2.config.eos_token_id == modern.tokenizer_2.eos_token_id
    load_identity(modern, alice)
    assert forward_hooks(modern) == [{}, {}]
    _, pooled = encode(modern, PROMPTS)
    torch.testing.assert_close(pooled, read_at(modern, PROMPTS)[2], rtol=0, atol=1e-6)
