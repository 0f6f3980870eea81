"""Inserting identities into prompts (paper §3.1, METHOD §3).

An identity's K token vectors become K new words, named the way diffusers names multi-vector
textual inversions: ``<alice>``, ``<alice>_1``, ... Any diffusers SD pipeline then expands
``<alice>`` in a prompt to ``<alice> <alice>_1`` by itself, so the model runs unchanged.
``unload_identity`` takes them out again, as diffusers' ``unload_textual_inversion`` does.

One thing does change, for SDXL: its pooled prompt vector is read at the prompt's end-of-text
token, as ComfyUI and A1111/Forge read it, also when the prompt holds new words (``pooling``).
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager

import torch
from torch import Tensor

from .errors import FileFormatError, InputError
from .families import family_of, identity_family, text_encoders
from .identity import Identity, token_for
from .pooling import remove_eos_pooling, use_eos_pooling
from .signatures import trained_on_other_encoder

logger = logging.getLogger(__name__)

PLACEHOLDER_RE = re.compile(r"<[^<>\s]+>")


def placeholder_tokens(token: str, n_tokens: int) -> list[str]:
    """``"<alice>", 2`` -> ``["<alice>", "<alice>_1"]`` (diffusers' multi-vector naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, n_tokens)]


def check_token_free(tokenizer, token: str, n_tokens: int = 1) -> None:
    """Refuse a person's words (``token``, ``token_1``, ...) that are words of the model's own vocabulary.

    The rule's one home: ``personalize`` checks it for every name before any work, and
    ``check_placeholder`` before any word is added. Words added earlier (a person loaded before) are free.
    """
    added, vocab = tokenizer.get_added_vocab(), tokenizer.get_vocab()
    for w in placeholder_tokens(token, n_tokens):
        if w in vocab and w not in added:
            raise InputError(f"{w!r} is already a word in the model's vocabulary. Choose another name for this person.",
                             field="name")


def check_placeholder(tokenizer, token: str, n_tokens: int) -> None:
    """Whether ``token``'s K words can be added: free (``check_token_free``) and not loaded before with another K."""
    check_token_free(tokenizer, token, n_tokens)
    added = tokenizer.get_added_vocab()
    existing = [w for w in placeholder_tokens(token, n_tokens) if w in added]
    if existing and len(existing) != n_tokens or f"{token}_{n_tokens}" in added:
        raise InputError(
            f"{token} is already loaded with a different number of vectors. Load it into a fresh pipeline, or pick another name.",
            field="name",
        )


def add_placeholder(tokenizer, text_encoder, token: str, n_tokens: int, resize: bool = True) -> list[int]:
    """Add ``token``'s K words to the tokenizer and grow the embedding table to match.

    Words this function added before are reused (their rows are then overwritten by the caller).
    With ``resize=False`` only the tokenizer learns the words (training: ``token_override`` supplies
    their rows, so the table is never touched).

    Returns:
        The K token ids.

    Raises:
        InputError: ``token`` is a word of the model's own vocabulary, or was added with another K (``check_placeholder``).
    """
    check_placeholder(tokenizer, token, n_tokens)
    words = placeholder_tokens(token, n_tokens)
    if not any(w in tokenizer.get_added_vocab() for w in words):
        tokenizer.add_tokens(words)
    if resize and text_encoder.get_input_embeddings().num_embeddings < len(tokenizer):
        device = text_encoder.get_input_embeddings().weight.device
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # the new rows' random start must not move the caller's generators
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokenizer.convert_tokens_to_ids(words)


def load_identity(pipe, identity_or_path, token: str | None = None) -> str:
    """Make a diffusers pipeline understand an identity's token in prompts.

    After this, ``pipe("<alice> person at the beach")`` draws the person, as if the same vectors
    had been loaded with ``pipe.load_textual_inversion`` (into both text encoders for SDXL), except
    that SDXL's pooled prompt vector is read at the end-of-text token, as in training, ComfyUI and
    A1111/Forge (see ``pooling``; prompts without new words are not affected). ``unload_identity``
    undoes it.

    Args:
        pipe: a diffusers Stable Diffusion 1.x/2.x or SDXL pipeline.
        identity_or_path: an ``Identity`` or the path of an identity file.
        token: prompt word to use instead of the identity's own (``"<bob>"`` or ``"bob"``).

    Returns:
        The token now understood in prompts.

    Example:
        >>> load_identity(pipe, "identities/alice.safetensors")
        '<alice>'
        >>> image = pipe("<alice> person reading a book").images[0]
    """
    identity = identity_or_path if isinstance(identity_or_path, Identity) else Identity.load(identity_or_path)
    token = check_identity(pipe, identity, token)
    if trained_on_other_encoder(identity.metadata, pipe):
        logger.warning(
            "Identity %s was trained with a different text encoder (base model %s); it may not look like the person.",
            identity.token, identity.metadata.get("base_model", "unknown"),
        )
    family = family_of(pipe)
    for (tokenizer, text_encoder), (_, embeddings) in zip(family.encoders(pipe), identity.parts):
        ids = add_placeholder(tokenizer, text_encoder, token, embeddings.shape[0])
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[ids] = embeddings.to(weight.device, weight.dtype)
    use_eos_pooling(family.pooled_encoder(pipe))
    return token


def unload_identity(pipe, token: str) -> None:
    """Take an identity out of a pipeline: the inverse of ``load_identity``, as diffusers' ``unload_textual_inversion``.

    Its words (``<alice>``, ``<alice>_1``, ...) leave every tokenizer of the pipeline's family and their rows
    every token table (through diffusers' own ``pipe.unload_textual_inversion``); other identities stay
    loaded. When none is left, SDXL's pooled vector is read as transformers reads it again. Afterwards the
    tokenizers and the prompt embeddings are as they were before the identity was loaded.

    Args:
        pipe: the pipeline ``load_identity`` loaded the identity into.
        token: its token, ``"<alice>"`` or ``"alice"``.

    Raises:
        InputError: no identity with that token is loaded (the loaded ones are named); nothing changes then.

    Example:
        >>> load_identity(pipe, "identities/alice.safetensors")
        '<alice>'
        >>> unload_identity(pipe, "<alice>")  # pipe("<alice> person") no longer knows her
    """
    token = token_for(token)
    family = family_of(pipe)
    found = [(tok, te, loaded_words(tok, token)) for tok, te in family.encoders(pipe)]
    if not all(words for _, _, words in found):
        loaded = ", ".join(loaded_placeholders(family.tokenizer(pipe))) or "none"
        raise InputError(f"No identity {token} is loaded in this pipeline (loaded: {loaded}).", field="name")
    for tok, te, words in found:
        pipe.unload_textual_inversion(tokens=words, tokenizer=tok, text_encoder=te)
    pooled = family.pooled_encoder(pipe)
    if pooled is not None and not loaded_placeholders(pooled[0]):
        remove_eos_pooling(pooled)


def check_identity(pipe, identity: Identity, token: str | None = None) -> str:
    """Everything ``load_identity`` checks before it changes the pipeline; returns the token the identity will have.

    Raises:
        FileFormatError: the identity was made for another model family or text-encoder width.
        InputError: its words are the model's own, or loaded before with another number of vectors.
    """
    token = token_for(token) if token else identity.token
    pairs = text_encoders(pipe)
    parts = identity.parts
    family = identity.metadata.get("base_model", "unknown")
    if len(parts) != len(pairs):
        kind = identity_family(identity.metadata, len(parts), identity.embedding_dim).title
        raise FileFormatError(
            f"Identity {identity.token} was made for {kind} ({family}) but this model has {len(pairs)} text encoder(s). "
            "Use a model of the family it was trained for."
        )
    for (tokenizer, text_encoder), (_, embeddings) in zip(pairs, parts):
        width = text_encoder.get_input_embeddings().embedding_dim
        if embeddings.shape[1] != width:
            raise FileFormatError(
                f"Identity {identity.token} has {embeddings.shape[1]}-wide embeddings but this model's text encoder is "
                f"{width} wide. Use the model family it was trained for ({family})."
            )
        check_placeholder(tokenizer, token, embeddings.shape[0])
    return token


def loaded_placeholders(tokenizer) -> list[str]:
    """Tokens of identities (or textual inversions) the tokenizer knows, without the ``_1`` extras or special tokens."""
    special = set(tokenizer.all_special_tokens)
    return sorted(t for t in tokenizer.get_added_vocab() if PLACEHOLDER_RE.fullmatch(t) and t not in special)


def check_prompt_tokens(tokenizer, prompt: str, coming: set[str] = frozenset()) -> None:
    """Raise if ``prompt`` uses a ``<token>`` that is not loaded (nor in ``coming``, about to be), listing the ones that are."""
    known = set(tokenizer.get_added_vocab()) | set(coming)
    missing = sorted({t for t in PLACEHOLDER_RE.findall(prompt) if t not in known})
    if missing:
        loaded = ", ".join(sorted(set(loaded_placeholders(tokenizer)) | set(coming))) or "none"
        raise InputError(
            f"Prompt uses {', '.join(missing)} but no identity with that token is loaded (loaded: {loaded}). "
            "Load its identity file first."
        )


def loaded_words(tokenizer, token: str) -> list[str]:
    """The words ``token`` is loaded as in ``tokenizer``: ``["<alice>", "<alice>_1"]``, or ``[]`` when it is not."""
    words = set(tokenizer.get_added_vocab())
    if token not in words:
        return []
    out = [token]
    while f"{token}_{len(out)}" in words:
        out.append(f"{token}_{len(out)}")
    return out


def expand_prompt(tokenizer, prompt: str) -> str:
    """``"<alice> person"`` -> ``"<alice> <alice>_1 person"``, as diffusers' TI loader does."""
    out = prompt
    for token in sorted(set(PLACEHOLDER_RE.findall(prompt))):
        words = loaded_words(tokenizer, token)
        if words:
            out = re.sub(re.escape(token) + r"(?!_\d)", " ".join(words), out)
    return out


@contextmanager
def token_override(embedding: torch.nn.Embedding, token_ids: list[int]):
    """Replace the rows of ``token_ids`` in ``embedding``'s output, differentiably.

    Yields a dict; set ``state["rows"]`` before each forward to a (P, d) tensor (P = len(token_ids)),
    or to (B, P, d) to give each of the B prompts of a batch its own rows. The embedding table
    itself never changes, so other words are untouched. Used in training, where the rows come from
    the identity network and carry its gradient.
    """
    size = max(embedding.num_embeddings, max(token_ids) + 1)  # the words may lie past the table (never resized)
    lookup = torch.full((size,), -1, dtype=torch.long, device=embedding.weight.device)
    lookup[torch.tensor(token_ids, device=lookup.device)] = torch.arange(len(token_ids), device=lookup.device)
    state: dict[str, Tensor | None] = {"rows": None, "ids": None}

    def pre_hook(module, args):
        ids = args[0]
        state["ids"] = ids
        if int(ids.max()) < module.num_embeddings:
            return None
        return (ids.masked_fill(ids >= module.num_embeddings, 0), *args[1:])  # rows past the table: looked up as 0, replaced below

    def hook(module, args, output):
        rows = state["rows"]
        if rows is None:
            return output
        pos = lookup[state["ids"]]  # (B, T): index into rows, -1 for ordinary words
        rows = rows.to(output.device, output.dtype)
        if rows.ndim == 3:  # (B, P, d): each prompt its own rows
            sub = rows[torch.arange(pos.shape[0], device=pos.device)[:, None], pos.clamp(min=0)]  # (B, T, d)
        else:
            sub = rows[pos.clamp(min=0)]  # (B, T, d)
        return torch.where((pos >= 0).unsqueeze(-1), sub, output)

    handles = [embedding.register_forward_pre_hook(pre_hook), embedding.register_forward_hook(hook)]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def borrowed_tokenizers(pipe):
    """Give ``pipe`` copies of its tokenizers inside the block and its own back afterwards.

    Training adds the new words to the copies only, so a run that fails or is cancelled leaves the
    caller's tokenizers (and, with ``token_override``, the embedding tables) exactly as they were.
    """
    import copy

    names = [n for n in family_of(pipe).tokenizer_attributes() if getattr(pipe, n, None) is not None]
    originals = {n: getattr(pipe, n) for n in names}
    try:
        for n in names:
            setattr(pipe, n, copy.deepcopy(originals[n]))
        yield pipe
    finally:
        for n, tok in originals.items():
            setattr(pipe, n, tok)
