"""The celeb basis (paper §3.1, METHOD §1): celebrity-name token embeddings -> mean + PCA directions.

Each celebrity name is tokenized and its tokens are lined up by position: column ``j`` holds every
name's ``j``-th token. For the first ``K`` columns the basis keeps the column's mean embedding and
its first ``n`` principal directions. A new person is then ``e_j = c_j @ B_j + mean_j``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .config import DEFAULT_N_COMPONENTS, BasisConfig
from .errors import FileFormatError, InputError
from .files import decode_json, load_artifact, save_artifact
from .resources import celeb_names, names_sha256, normalize_names
from .signatures import format_signature, parse_signature, same_signature, table_signature

logger = logging.getLogger(__name__)

BASIS_FORMAT = "celebbasis.basis"


@dataclass
class CelebBasis:
    """Mean and orthonormal directions of the celebrity-name embeddings, one set per token slot.

    Attributes:
        mean: (K, d) mean name-token embedding of each slot.
        components: (K, n, d) orthonormal directions of each slot, sorted by singular value.
            Rows ``ranks[j]..n-1`` complete the names' span to an orthonormal set.
        ranks: (K,) rank of each slot's centred name matrix.
        metadata: how the basis was built (text encoder, names hash, dedupe, fingerprint).
    """

    mean: Tensor
    components: Tensor
    ranks: list[int]
    metadata: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return self.components.shape[0]

    @property
    def n_components(self) -> int:
        return self.components.shape[1]

    @property
    def embedding_dim(self) -> int:
        return self.components.shape[2]

    @property
    def fingerprint(self) -> str:
        """Hash of the embedding table, names and settings the basis was built from."""
        return self.metadata.get("basis_sha256", "")

    def _slots(self, rows: int, device) -> Tensor:
        """Slot of each of ``rows`` token vectors: 0..K-1, vectors past K use the last slot."""
        return torch.arange(rows, device=device).clamp(max=self.n_tokens - 1)

    def reconstruct(self, coefficients: Tensor) -> Tensor:
        """(..., K, n) coefficients -> (..., K, d) token embeddings: ``c_j @ B_j + mean_j``.

        Any number of rows works: row ``i`` uses slot ``min(i, K-1)`` (imported embeddings).
        """
        slots = self._slots(coefficients.shape[-2], coefficients.device)
        comps = self.components.to(coefficients.device, coefficients.dtype)[slots]
        mean = self.mean.to(coefficients.device, coefficients.dtype)[slots]
        return torch.einsum("...kn,knd->...kd", coefficients, comps) + mean

    def project(self, embeddings: Tensor) -> Tensor:
        """(..., K, d) embeddings -> (..., K, n) least-squares coefficients (orthonormal rows)."""
        slots = self._slots(embeddings.shape[-2], embeddings.device)
        comps = self.components.to(embeddings.device, embeddings.dtype)[slots]
        return torch.einsum("...kd,knd->...kn", embeddings - self.mean.to(embeddings)[slots], comps)

    def save(self, path) -> Path:
        """Write the basis as safetensors (``mean``, ``components``, ``ranks``) with its metadata."""
        meta = {
            "embedding_dim": self.embedding_dim,
            "n_components": self.n_components,
            "n_tokens": self.n_tokens,
            **self.metadata,
        }
        tensors = {
            "mean": self.mean.float(),
            "components": self.components.float(),
            "ranks": torch.tensor(self.ranks, dtype=torch.int64),
        }
        return save_artifact(path, tensors, BASIS_FORMAT, meta)

    @classmethod
    def load(cls, path) -> "CelebBasis":
        """Read a basis written by ``save``; raises ``FileFormatError`` for anything else."""
        tensors, meta = load_artifact(path, BASIS_FORMAT, ("mean", "components", "ranks"))
        mean, comps = tensors["mean"], tensors["components"]
        if mean.ndim != 2 or comps.ndim != 3 or comps.shape[0] != mean.shape[0] or comps.shape[2] != mean.shape[1]:
            raise FileFormatError(
                f"{path}: inconsistent shapes mean {tuple(mean.shape)}, components {tuple(comps.shape)}. Re-create the basis."
            )
        keep = {k: v for k, v in meta.items() if k not in ("format", "version", "embedding_dim", "n_components", "n_tokens")}
        if "dedupe" in keep:
            keep["dedupe"] = decode_json(keep["dedupe"], False)
        return cls(mean, comps, [int(r) for r in tensors["ranks"].tolist()], keep)


def name_token_ids(tokenizer, names: list[str]) -> list[list[int]]:
    """Token ids of each name, special tokens removed, as plain Python ints (METHOD §1 step 2)."""
    special = set(tokenizer.all_special_ids)
    ids = tokenizer(names, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return [[int(t) for t in row if int(t) not in special] for row in ids]


def token_columns(token_ids: list[list[int]], n_tokens: int, dedupe: bool = BasisConfig.dedupe) -> list[list[int]]:
    """Line tokens up by position: column ``j`` lists every name's ``j``-th token id.

    With ``dedupe`` each distinct id is kept once per column (first occurrence); without it, every
    occurrence counts, as in the official code, so frequent first names weigh more.
    """
    columns = []
    for j in range(n_tokens):
        col = [ids[j] for ids in token_ids if len(ids) > j]
        if dedupe:
            col = list(dict.fromkeys(col))
        columns.append(col)
    return columns


def embedding_fingerprint(signature: str, names: list[str], n_components: int, n_tokens: int, dedupe: bool) -> str:
    """SHA-256 naming what a basis depends on: the table (its signature, to 5 digits), names, settings."""
    coarse = ",".join(f"{float(x):.5g}" for x in signature.split(",")) if signature else ""
    h = hashlib.sha256()
    h.update(coarse.encode())
    h.update(names_sha256(names).encode())
    h.update(f"n={n_components};k={n_tokens};dedupe={bool(dedupe)}".encode())
    return h.hexdigest()


def _numerical_rank(s: Tensor, shape: tuple[int, int]) -> int:
    if s.numel() == 0:
        return 0
    tol = s.max() * max(shape) * torch.finfo(s.dtype).eps
    return int((s > tol).sum())


def build_basis(
    tokenizer,
    text_encoder,
    names: list[str] | None = None,
    *,
    n_components: int = BasisConfig.n_components,
    n_tokens: int = BasisConfig.n_tokens,
    dedupe: bool = BasisConfig.dedupe,
    source: str = "",
    signature: str = "",
) -> CelebBasis:
    """Build the celeb basis from a text encoder's input token-embedding table (METHOD §1).

    Args:
        tokenizer: the text encoder's tokenizer (a ``transformers.CLIPTokenizer``).
        text_encoder: a model whose ``get_input_embeddings()`` is the (V, d) token table.
        names: celebrity names; ``None`` means the packaged 646-name list.
        n_components: directions per slot, n. Capped at d with a log line, so tiny models work.
        n_tokens: slots K, i.e. token vectors per identity.
        dedupe: keep each distinct token once per column instead of every occurrence.
        source: model id or path, recorded in the metadata.
        signature: the table's ``table_signature`` in metadata form (computed when empty), recorded
            so that the basis can be matched to its text encoder in any dtype.

    Returns:
        ``CelebBasis`` with mean (K, d), components (K, n, d) and the rank of each slot.

    Example:
        >>> basis = build_basis(pipe.tokenizer, pipe.text_encoder)
        >>> basis.components.shape
        torch.Size([2, 512, 768])
    """
    BasisConfig(n_components=n_components, n_tokens=n_tokens, dedupe=dedupe)  # the settings' rules live there
    names = normalize_names(celeb_names() if names is None else names)
    if not names:
        raise InputError("The celebrity name list is empty. Pass at least a few hundred names, or none for the packaged list.",
                         field="names")
    weight = text_encoder.get_input_embeddings().weight.detach()  # (V, d), any device and dtype
    signature = signature or format_signature(table_signature(tokenizer, text_encoder))
    d = weight.shape[1]
    if n_components > d:  # the default (the paper's 512) is capped quietly; a width asked for is worth a warning
        level = logging.DEBUG if n_components == DEFAULT_N_COMPONENTS else logging.WARNING
        logger.log(level, "n_components %d is larger than the embedding width %d; using %d.", n_components, d, d)
        n_components = d
    columns = token_columns(name_token_ids(tokenizer, names), n_tokens, dedupe)
    means, comps, ranks = [], [], []
    for j, col in enumerate(columns):
        if len(col) < 2:
            raise InputError(
                f"Only {len(col)} names have a token in position {j}; pass more (or longer) names or fewer tokens."
            )
        e = weight[torch.tensor(col, device=weight.device)].to("cpu", torch.float64)  # (m_j, d): only the name rows
        mean = e.mean(0)
        x = e - mean
        _, s, vh = torch.linalg.svd(x, full_matrices=True)  # vh: (d, d), rows past the rank complete the span
        means.append(mean)
        comps.append(vh[:n_components])
        ranks.append(min(_numerical_rank(s, tuple(x.shape)), n_components))
        logger.debug("slot %d: %d rows, rank %d", j, len(col), ranks[-1])
    meta = {
        "text_encoder": source,
        "names_sha256": names_sha256(names),
        "n_names": len(names),
        "dedupe": bool(dedupe),
        "basis_sha256": embedding_fingerprint(signature, names, n_components, n_tokens, dedupe),
        "text_encoder_signature": signature,
    }
    return CelebBasis(torch.stack(means).float(), torch.stack(comps).float(), ranks, meta)


# -- built once per text encoder and cached ----------------------------------------------------------

def cache_dir() -> Path:
    """Where built bases are cached (in its ``basis`` folder): ``$CELEBBASIS_CACHE`` or the user cache folder."""
    env = os.environ.get("CELEBBASIS_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("celebbasis"))


def cached_basis(tokenizer, text_encoder, names: list[str] | None = None, *, n_components: int = DEFAULT_N_COMPONENTS,
                 n_tokens: int = 2, dedupe: bool = False, source: str = "") -> CelebBasis:
    """``build_basis``, read from or written to the cache (``cache_dir()``).

    A cached basis is reused when its names and settings are the same and its recorded table
    signature matches this text encoder's (``same_signature``), so float32, float16 and bfloat16
    copies of one model share one entry.
    """
    names = normalize_names(celeb_names() if names is None else names)
    n = min(n_components, text_encoder.get_input_embeddings().embedding_dim)
    signature = table_signature(tokenizer, text_encoder)
    settings = embedding_fingerprint("", names, n, n_tokens, dedupe)[:16]  # names and settings, not the table
    folder = cache_dir() / "basis"
    for path in sorted(folder.glob(f"{settings}-*.safetensors")):
        try:
            basis = CelebBasis.load(path)
        except InputError:
            logger.warning("Ignoring a damaged cached basis at %s; it will be rebuilt.", path)
            continue
        if same_signature(parse_signature(basis.metadata.get("text_encoder_signature")), signature):
            logger.debug("basis from cache %s", path)
            return basis
    basis = build_basis(tokenizer, text_encoder, names, n_components=n, n_tokens=n_tokens, dedupe=dedupe, source=source,
                        signature=format_signature(signature))
    try:
        basis.save(folder / f"{settings}-{basis.fingerprint[:16]}.safetensors")
    except OSError as e:
        logger.warning("Could not cache the basis in %s (%s); it will be rebuilt next time.", folder, e)
    return basis
