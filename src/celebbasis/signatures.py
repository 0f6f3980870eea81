"""Text-encoder fingerprints, in one place: which token table a basis was built from, an identity trained on.

A table's signature is 2 x 16 numbers that do not depend on its dtype (``table_signature``); files
record it as text (``format_signature``), one per text encoder joined by ``;`` for identities
(``encoders_signature``). Version 0.1 files recorded an exact float16 hash instead
(``legacy_table_sha256``), which is still read.
"""

from __future__ import annotations

import hashlib
import weakref

import torch

from .families import family_of

SIGNATURE_DIRECTIONS = 16  # random directions the table is summarised along
SIGNATURE_RTOL = 1e-4  # relative to the signature's largest entry; fp32/fp16/bf16 copies differ by ~1e-6
_signatures: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def table_signature(tokenizer, text_encoder, chunk: int = 4096) -> list[float]:
    """A dtype-independent summary of the base vocabulary's token-embedding rows: 2 x 16 numbers.

    The table's mean and root-mean-square along 16 fixed random unit directions, accumulated in
    float64 a chunk of rows at a time. float32, float16 and bfloat16 copies of one model give the
    same numbers to ~1e-6 (rounding errors average out over ~50,000 rows), different models differ
    in every entry, so two signatures are compared with ``same_signature`` rather than for equality.
    Computed once per text encoder and remembered (the rows it sampled are checked on reuse).
    """
    weight = text_encoder.get_input_embeddings().weight.detach()
    rows = tokenizer.vocab_size
    probe = weight[:8].to("cpu", torch.float64).clone()
    cached = _signatures.get(text_encoder)
    if cached is not None and cached[0] == rows and torch.equal(cached[1], probe):
        return cached[2]
    d = weight.shape[1]
    directions = torch.randn(d, SIGNATURE_DIRECTIONS, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)  # (d, 16) unit columns
    first = torch.zeros(SIGNATURE_DIRECTIONS, dtype=torch.float64)
    second = torch.zeros(SIGNATURE_DIRECTIONS, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, rows, chunk):
            proj = weight[start:min(rows, start + chunk)].to("cpu", torch.float64) @ directions  # (chunk, 16)
            first += proj.sum(0)
            second += (proj * proj).sum(0)
    signature = [float(x) for x in torch.cat([first / rows, (second / rows).sqrt()])]
    _signatures[text_encoder] = (rows, probe, signature)
    return signature


def same_signature(a, b) -> bool:
    """Whether two ``table_signature`` results come from the same token table (any dtype)."""
    a, b = list(a or []), list(b or [])
    if not a or len(a) != len(b):
        return False
    scale = max(abs(x) for x in a + b) or 1.0
    return max(abs(x - y) for x, y in zip(a, b)) <= SIGNATURE_RTOL * scale


def format_signature(signature) -> str:
    """Metadata form of a signature: comma-separated, 9 significant digits."""
    return ",".join(f"{x:.9g}" for x in signature)


def parse_signature(text: str | None) -> list[float] | None:
    try:
        return [float(x) for x in text.split(",")] if text else None
    except ValueError:
        return None


def encoders_signature(pipe) -> str:
    """``format_signature`` of every text encoder of a pipeline (its family's, in order), joined by ``;``."""
    return ";".join(format_signature(table_signature(tok, te)) for tok, te in family_of(pipe).encoders(pipe))


def legacy_table_sha256(tokenizer, text_encoder) -> str:
    """The exact float16 hash that version 0.1 files record as ``text_encoder_sha256`` (read only)."""
    table = text_encoder.get_input_embeddings().weight.detach()[: tokenizer.vocab_size]
    return hashlib.sha256(table.to("cpu", torch.float16).contiguous().numpy().tobytes()).hexdigest()


def other_tables(metadata: dict, pairs: list[tuple]) -> bool:
    """True when ``metadata`` records (``text_encoder_signature``, or 0.1's ``text_encoder_sha256``) other
    token tables than those of the (tokenizer, text_encoder) ``pairs``; False when it records none."""
    parts = [parse_signature(p) for p in (metadata.get("text_encoder_signature") or "").split(";") if p]
    if parts and all(p is not None for p in parts):
        same = len(parts) == len(pairs) and all(same_signature(p, table_signature(tok, te)) for p, (tok, te) in zip(parts, pairs))
        return not same
    legacy = metadata.get("text_encoder_sha256")
    return bool(legacy) and legacy != ",".join(legacy_table_sha256(tok, te) for tok, te in pairs)


def trained_on_other_encoder(metadata: dict, pipe) -> bool:
    """True when an identity's metadata says it was made with other text encoders than ``pipe``'s."""
    return other_tables(metadata, family_of(pipe).encoders(pipe))


def built_from_other_table(metadata: dict, tokenizer, text_encoder) -> bool:
    """True when a basis' metadata says it was built from another token table than this encoder's."""
    return other_tables(metadata, [(tokenizer, text_encoder)])
