"""The basis against an independent NumPy computation of METHOD §1."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from celebbasis.basis import CelebBasis, build_basis, cached_basis
from celebbasis.errors import FileFormatError
from celebbasis.resources import celeb_names, clip_tokenizer


class FakeEncoder(torch.nn.Module):
    """Anything with a token-embedding table will do; this one is wide enough for n = 512."""

    def __init__(self, vocab: int = 49408, width: int = 520, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Embedding(vocab, width)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, width, generator=g) * 0.02)

    def get_input_embeddings(self):
        return self.emb


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def wide():
    return FakeEncoder()


def numpy_reference(tokenizer, table: np.ndarray, names: list[str], slot: int, dedupe: bool):
    """Independent: the rows of one slot, their mean, and their principal directions."""
    rows = []
    seen = set()
    for name in sorted(set(names)):
        ids = tokenizer.encode(name, add_special_tokens=False)
        if len(ids) > slot:
            tid = ids[slot]
            if dedupe and tid in seen:
                continue
            seen.add(tid)
            rows.append(table[tid])
    e = np.asarray(rows, dtype=np.float64)
    mean = e.mean(0)
    _, s, vt = np.linalg.svd(e - mean, full_matrices=False)
    rank = int((s > s.max() * max(e.shape) * np.finfo(np.float64).eps).sum())
    return mean, vt[:rank], rank, len(rows)


def projector(rows: np.ndarray) -> np.ndarray:
    return rows.T @ rows


@pytest.mark.parametrize("dedupe", [False, True])
def test_basis_matches_numpy(tokenizer, wide, dedupe):
    basis = build_basis(tokenizer, wide, n_components=512, dedupe=dedupe)
    table = wide.emb.weight.detach().double().numpy()
    assert basis.mean.shape == (2, 520) and basis.components.shape == (2, 512, 520)
    for slot in range(2):
        mean, span, rank, _ = numpy_reference(tokenizer, table, celeb_names(), slot, dedupe)
        np.testing.assert_allclose(basis.mean[slot].numpy(), mean, atol=1e-6)
        assert basis.ranks[slot] == min(rank, 512)
        r = basis.ranks[slot]
        np.testing.assert_allclose(projector(basis.components[slot, :r].double().numpy()), projector(span[:r]), atol=1e-4)
        comps = basis.components[slot].double()
        np.testing.assert_allclose((comps @ comps.T).numpy(), np.eye(512), atol=1e-5)  # completion rows included


def test_first_slot_is_rank_deficient_as_documented(tokenizer, wide):
    # SD 1.x tokenizer: 646 names give only 409 distinct first tokens, so slot 0 has rank 408 < 512
    # and its last rows are an orthonormal completion outside the names' span.
    basis = build_basis(tokenizer, wide)
    assert basis.ranks == [408, 512]
    table = wide.emb.weight.detach().double()
    first = [tokenizer.encode(n, add_special_tokens=False)[0] for n in celeb_names()]
    assert len(set(first)) == 409
    centred = table[first] - table[first].mean(0)
    extra = basis.components[0, 408:].double()
    assert torch.allclose(centred @ extra.T, torch.zeros(len(first), 104, dtype=torch.float64), atol=1e-6)


def test_repeated_tokens_weigh_more_unless_deduped(tokenizer, wide):
    keep = build_basis(tokenizer, wide)
    dedup = build_basis(tokenizer, wide, dedupe=True)
    table = wide.emb.weight.detach()
    first = [tokenizer.encode(n, add_special_tokens=False)[0] for n in celeb_names()]
    assert torch.allclose(keep.mean[0], table[first].mean(0), atol=1e-6)
    assert torch.allclose(dedup.mean[0], table[sorted(set(first))].mean(0), atol=1e-6)
    assert not torch.allclose(keep.mean[0], dedup.mean[0], atol=1e-4)
    assert dedup.ranks[0] == keep.ranks[0] == 408  # the same distinct tokens span the same space
    assert keep.fingerprint != dedup.fingerprint


def test_duplicate_and_unsorted_names_change_nothing(tokenizer, tiny_pipe):
    names = celeb_names()
    a = build_basis(tokenizer, tiny_pipe.text_encoder, names)
    b = build_basis(tokenizer, tiny_pipe.text_encoder, list(reversed(names)) + names[:50])
    assert torch.equal(a.mean, b.mean) and torch.equal(a.components, b.components)
    assert a.fingerprint == b.fingerprint


def test_n_components_capped_at_width_with_log(tokenizer, tiny_pipe, caplog):
    with caplog.at_level(logging.INFO, logger="celebbasis"):
        basis = build_basis(tokenizer, tiny_pipe.text_encoder, n_components=600)
    assert basis.components.shape == (2, 32, 32)
    assert "larger than the embedding width 32" in caplog.text


def test_project_reconstruct_round_trip(tokenizer, tiny_pipe):
    basis = build_basis(tokenizer, tiny_pipe.text_encoder, n_components=12)  # n < d = 32: a proper subspace
    gen = torch.Generator().manual_seed(0)
    coeffs = torch.nn.functional.normalize(torch.randn(3, 2, 12, generator=gen), dim=-1)
    emb = basis.reconstruct(coeffs)  # (3, 2, 32)
    assert torch.allclose(basis.project(emb), coeffs, atol=1e-5)  # in the span: exact
    assert torch.allclose((emb - basis.mean).norm(dim=-1), torch.ones(3, 2), atol=1e-5)
    x = torch.randn(3, 2, 32, generator=gen)  # off the span: the least-squares point, and only that
    proj = basis.reconstruct(basis.project(x))
    assert not torch.allclose(proj, x, atol=1e-2)
    assert torch.allclose(basis.reconstruct(basis.project(proj)), proj, atol=1e-5)  # a projection: idempotent
    residual = x - proj  # orthogonal to every direction of its slot
    assert torch.einsum("bkd,knd->bkn", residual, basis.components).abs().max() < 1e-4


def test_save_load_round_trip(tmp_path, tokenizer, wide):
    basis = build_basis(tokenizer, wide, n_components=64, dedupe=True, source="some/model")
    path = basis.save(tmp_path / "basis.safetensors")
    back = CelebBasis.load(path)
    assert torch.equal(back.mean, basis.mean) and torch.equal(back.components, basis.components)
    assert back.ranks == basis.ranks
    assert back.metadata["text_encoder"] == "some/model"
    assert back.metadata["dedupe"] is True
    assert back.metadata["names_sha256"] == basis.metadata["names_sha256"]
    assert back.fingerprint == basis.fingerprint
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_load_refuses_other_files(tmp_path):
    bad = tmp_path / "basis.safetensors"
    bad.write_bytes(b"\x80\x04not safetensors at all")
    with pytest.raises(FileFormatError, match="never loads pickles"):
        CelebBasis.load(bad)
    bad.write_bytes(b"some random text that is long enough")
    with pytest.raises(FileFormatError, match="not a readable safetensors file"):
        CelebBasis.load(bad)


def test_cache_builds_once_for_every_dtype_of_a_model(tokenizer, tiny_pipe, monkeypatch):
    first = cached_basis(tokenizer, tiny_pipe.text_encoder)

    def boom(*a, **k):
        raise AssertionError("rebuilt instead of read from the cache")

    monkeypatch.setattr("celebbasis.basis.build_basis", boom)
    again = cached_basis(tokenizer, tiny_pipe.text_encoder)
    assert torch.equal(first.components, again.components)
    for dtype in (torch.float16, torch.bfloat16):  # a half-precision copy of the same model: the same entry
        half = copy.deepcopy(tiny_pipe.text_encoder).to(dtype)
        assert torch.equal(cached_basis(tokenizer, half).components, first.components)
    with pytest.raises(AssertionError, match="rebuilt"):
        cached_basis(tokenizer, tiny_pipe.text_encoder, dedupe=True)  # other settings: other entry
    other = copy.deepcopy(tiny_pipe.text_encoder)
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.01)  # another model
    with pytest.raises(AssertionError, match="rebuilt"):
        cached_basis(tokenizer, other)


def test_table_signature_is_dtype_independent_and_tells_models_apart(tokenizer, tiny_pipe):
    from celebbasis.signatures import same_signature, table_signature

    te = tiny_pipe.text_encoder
    base = table_signature(tokenizer, te)
    for dtype in (torch.float16, torch.bfloat16):
        assert same_signature(base, table_signature(tokenizer, copy.deepcopy(te).to(dtype)))
    other = copy.deepcopy(te)
    with torch.no_grad():
        other.get_input_embeddings().weight[:100] += 0.01  # a fine-tune that moved 100 rows
    assert not same_signature(base, table_signature(tokenizer, other))
