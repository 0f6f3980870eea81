"""Identities in prompts: equal to diffusers' own textual-inversion loading."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from celebbasis.basis import build_basis
from celebbasis.errors import FileFormatError, InputError
from celebbasis.identity import Identity, IdentityPart
from celebbasis.insert import check_prompt_tokens, expand_prompt, load_identity, loaded_placeholders, token_override


@pytest.fixture
def identity(tiny_pipe):
    basis = build_basis(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    g = torch.Generator().manual_seed(1)
    coeffs = torch.nn.functional.normalize(torch.randn(2, 32, generator=g), dim=-1)
    return Identity.from_coefficients("<alice>", coeffs, basis)


def prompt_embeds(pipe, prompt):
    embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    return embeds


def test_same_prompt_embeddings_as_diffusers_textual_inversion(tmp_path, _tiny_pipe, identity):
    import copy

    ours, theirs = copy.deepcopy(_tiny_pipe), copy.deepcopy(_tiny_pipe)
    path = tmp_path / "alice.safetensors"
    identity.save(path)
    assert load_identity(ours, path) == "<alice>"
    ti = tmp_path / "alice-ti.safetensors"
    save_file({"<alice>": identity.embeddings.clone()}, ti)
    theirs.load_textual_inversion(str(ti))

    prompt = "a photo of <alice> person and Barack Obama"
    assert ours.tokenizer(ours.maybe_convert_prompt(prompt, ours.tokenizer)).input_ids == \
        theirs.tokenizer(theirs.maybe_convert_prompt(prompt, theirs.tokenizer)).input_ids
    a, b = prompt_embeds(ours, prompt), prompt_embeds(theirs, prompt)
    assert torch.allclose(a, b, atol=1e-6)
    plain = prompt_embeds(copy.deepcopy(_tiny_pipe), "a photo of person and Barack Obama")
    assert not torch.allclose(a[:, :8], plain[:, :8], atol=1e-3)  # the identity changed something


def test_token_expands_like_diffusers(tiny_pipe, identity):
    load_identity(tiny_pipe, identity)
    prompt = "<alice> person with <alice> person"
    assert expand_prompt(tiny_pipe.tokenizer, prompt) == tiny_pipe.maybe_convert_prompt(prompt, tiny_pipe.tokenizer)
    assert expand_prompt(tiny_pipe.tokenizer, prompt) == "<alice> <alice>_1 person with <alice> <alice>_1 person"


def test_rows_written_and_others_untouched(tiny_pipe, identity):
    before = tiny_pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    load_identity(tiny_pipe, identity, token="bob")
    after = tiny_pipe.text_encoder.get_input_embeddings().weight.detach()
    ids = tiny_pipe.tokenizer.convert_tokens_to_ids(["<bob>", "<bob>_1"])
    assert ids == [49408, 49409]
    assert torch.equal(after[:49408], before)
    assert torch.allclose(after[ids], identity.embeddings)


def test_loading_twice_replaces_rows(tiny_pipe, identity):
    load_identity(tiny_pipe, identity)
    other = Identity("<alice>", [IdentityPart(identity.coefficients, identity.embeddings * 2)])
    load_identity(tiny_pipe, other)
    assert len(tiny_pipe.tokenizer) == 49410
    w = tiny_pipe.text_encoder.get_input_embeddings().weight
    assert torch.allclose(w[49408:], other.embeddings)


def test_width_mismatch_is_refused(tiny_pipe):
    wide = Identity("<x>", [IdentityPart(torch.zeros(2, 8), torch.zeros(2, 768))])
    with pytest.raises(FileFormatError, match="768-wide embeddings but this model's text encoder is 32 wide"):
        load_identity(tiny_pipe, wide)


def test_unknown_token_lists_loaded_ones(tiny_pipe, identity):
    load_identity(tiny_pipe, identity)
    check_prompt_tokens(tiny_pipe.tokenizer, "<alice> person")
    with pytest.raises(InputError, match=r"<carol>.*loaded: <alice>"):
        check_prompt_tokens(tiny_pipe.tokenizer, "<alice> person and <carol> person")


def test_other_trained_text_encoder_warns(tiny_pipe, identity, caplog):
    identity.metadata["text_encoder_sha256"] = "0" * 64
    load_identity(tiny_pipe, identity)
    assert "trained with a different text encoder" in caplog.text


def test_override_is_differentiable_and_local(tiny_pipe, identity):
    load_identity(tiny_pipe, identity)
    emb = tiny_pipe.text_encoder.get_input_embeddings()
    table = emb.weight.detach().clone()
    rows = torch.randn(2, 32, requires_grad=True)
    ids = torch.tensor([[320, 49408, 49409, 1125]])
    with token_override(emb, [49408, 49409]) as state:
        state["rows"] = rows
        out = emb(ids)
    assert torch.allclose(out[0, 1:3], rows) and torch.equal(out[0, [0, 3]], table[[320, 1125]])
    out.sum().backward()
    assert torch.equal(rows.grad, torch.ones(2, 32))
    assert torch.equal(emb.weight.detach(), table)
    assert torch.equal(emb(ids), table[ids])  # hook removed afterwards


def test_override_gives_each_prompt_its_own_rows(tiny_pipe, identity):
    load_identity(tiny_pipe, identity)
    emb = tiny_pipe.text_encoder.get_input_embeddings()
    table = emb.weight.detach().clone()
    rows = torch.randn(2, 2, 32, requires_grad=True)  # (B, P, d): prompt b's own rows
    ids = torch.tensor([[320, 49408, 49409, 1125], [49409, 320, 320, 49408]])
    with token_override(emb, [49408, 49409]) as state:
        state["rows"] = rows
        out = emb(ids)
    assert torch.equal(out[0, 1:3], rows[0]) and torch.equal(out[1, 0], rows[1, 1]) and torch.equal(out[1, 3], rows[1, 0])
    assert torch.equal(out[0, [0, 3]], table[[320, 1125]]) and torch.equal(out[1, 1:3], table[[320, 320]])
    out.sum().backward()
    assert torch.equal(rows.grad, torch.ones(2, 2, 32))


def test_adding_words_leaves_the_global_generator_alone(tiny_pipe):
    from celebbasis.insert import add_placeholder

    state = torch.random.get_rng_state()
    add_placeholder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "<zed>", 2)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_missing_token_message_lists_only_identities(tiny_pipe):
    from celebbasis.errors import InputError
    from celebbasis.insert import check_prompt_tokens

    with pytest.raises(InputError) as e:
        check_prompt_tokens(tiny_pipe.tokenizer, "<carol> person")
    assert "(loaded: none)" in str(e.value)  # not <|endoftext|> and <|startoftext|>


def _tokenizer_state(tokenizer) -> tuple:
    return len(tokenizer), dict(tokenizer.get_vocab()), dict(tokenizer.get_added_vocab())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unload_identity_gives_the_pipeline_back_as_before(family):
    """``unload_identity`` undoes ``load_identity``: every tokenizer and every prompt's embeddings (and, for SDXL,
    its pooled vector and hooks) as before; a second identity loaded beside it keeps working."""
    from celebbasis.families import family_of, text_encoders
    from celebbasis.insert import unload_identity
    from celebbasis.testing import tiny_pipeline

    pipe = tiny_pipeline(family=family)
    bases = [build_basis(tok, te) for tok, te in text_encoders(pipe)]
    g = torch.Generator().manual_seed(2)
    alice, bob = (Identity.from_coefficients(t, [torch.nn.functional.normalize(torch.randn(2, b.n_components, generator=g), dim=-1)
                                                 for b in bases], bases) for t in ("<alice>", "<bob>"))
    prompts = ["a photo of <alice> person", "<alice> person and Barack Obama", "a photo of a person"]

    def encode(prompt):
        with torch.no_grad():
            return [t for t in pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False) if t is not None]

    before = [_tokenizer_state(tok) for tok, _ in text_encoders(pipe)], [encode(p) for p in prompts]
    sizes = [te.get_input_embeddings().num_embeddings for _, te in text_encoders(pipe)]
    load_identity(pipe, alice)
    with_alice = [encode(p) for p in prompts]
    assert not torch.allclose(with_alice[0][0], before[1][0][0])
    load_identity(pipe, bob)
    bob_embeds = encode("a photo of <bob> person")

    unload_identity(pipe, "<alice>")
    assert loaded_placeholders(pipe.tokenizer) == ["<bob>"] and "<alice>_1" not in pipe.tokenizer.get_added_vocab()
    for a, b in zip(encode("a photo of <bob> person"), bob_embeds):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # the other identity is untouched
    with pytest.raises(InputError, match=r"No identity <alice> is loaded .*loaded: <bob>"):
        unload_identity(pipe, "alice")

    unload_identity(pipe, "bob")
    assert [_tokenizer_state(tok) for tok, _ in text_encoders(pipe)] == before[0]
    assert [te.get_input_embeddings().num_embeddings for _, te in text_encoders(pipe)] == sizes
    for now, then in zip([encode(p) for p in prompts], before[1]):
        for a, b in zip(now, then):
            assert torch.equal(a, b)  # "<alice>" is plain text again: the model's own words
    pooled = family_of(pipe).pooled_encoder(pipe)
    assert pooled is None or not hasattr(pooled[1], "_celebbasis_eos_pooling")  # SDXL's hook left with the last one
