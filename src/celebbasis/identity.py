"""The identity network and the identity file (paper §3.2, METHOD §2 and §4).

``IdentityEncoder``: one linear layer (face dim -> K·n) + LeakyReLU(0.2), each of the K rows then
L2-normalised. Those rows are the coefficients of a person in the celeb basis. What is kept per
person is the moving average of those coefficients over training, as it is (a little shorter than
unit length where the predictions varied, as the official code samples with it): ``Identity``, one
``IdentityPart`` per text encoder of its model family, about 11 KB (SDXL about 25 KB).

Face vectors smaller than the paper's 512 (dlib's are 128-d) can be lifted to 512 by a fixed map
with orthonormal columns (``face_lift``): lengths and angles stay, but each vector is spread over
512 numbers, so one Adam step moves the coefficients as far as with the paper's face network
(about lr·‖f‖₁ per pre-activation, ‖f‖₁ ≈ 18 for a unit 512-d vector, ≈ 9 at 128-d; METHOD §4).
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BasisConfig
from .errors import FileFormatError, InputError
from .families import ModelFamily, identity_family, slot_suffix
from .files import decode_json, load_artifact, save_artifact

logger = logging.getLogger(__name__)

IDENTITY_FORMAT = "celebbasis.identity"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
FACE_DIM = 512  # the paper's face vectors: CosFace IResNet-100, 512-d
LIFT_SEED = 20230601  # fixes the lift: the same matrix on every machine and in every release


def face_lift(face_dim: int, out_dim: int = FACE_DIM) -> Tensor:
    """A fixed (out_dim, face_dim) matrix with orthonormal columns: ``f @ lift.T`` keeps norms and angles.

    Drawn from a Gaussian with a private generator seeded by ``LIFT_SEED`` and ``face_dim``, then
    orthonormalised by QR in float64 with the signs fixed, so it is reproducible without being stored.
    """
    if out_dim < face_dim:
        raise ValueError(f"cannot lift {face_dim}-d vectors to {out_dim} dimensions")
    g = torch.Generator("cpu").manual_seed(LIFT_SEED + face_dim)
    q, r = torch.linalg.qr(torch.randn(out_dim, face_dim, generator=g, dtype=torch.float64))  # (out, face)
    return (q * torch.sign(torch.diagonal(r))).float()  # unique: positive diagonal of r


class IdentityEncoder(nn.Module):
    """Face identity vector (B, f) -> basis coefficients (B, K, n), unit-norm rows.

    The weights start standard-normal with zero bias and no 1/sqrt(fan-in) scaling, as the
    official code's equal-linear layer does; with Adam this sets how fast coefficients move.

    Args:
        face_dim: size of the face vectors given to ``forward``.
        generator: the ``torch.Generator`` the initial weights are drawn from (several encoders can
            share one, as a joint SDXL run does); when ``None``, a private one seeded with ``seed``.
        lift_to: when larger than ``face_dim``, face vectors first go through ``face_lift``
            (a fixed buffer, not trained) and the linear layer takes ``lift_to`` inputs.
        seed: seeds the initial weights when no ``generator`` is given: the same seed, the same weights.

    Torch's global random state is never read or changed.
    """

    def __init__(self, face_dim: int, n_tokens: int = BasisConfig.n_tokens, n_components: int = BasisConfig.n_components,
                 generator: torch.Generator | None = None, lift_to: int | None = None, *, seed: int = 0):
        super().__init__()
        self.n_tokens, self.n_components = n_tokens, n_components
        lifted = lift_to is not None and lift_to > face_dim
        self.register_buffer("lift", face_lift(face_dim, lift_to) if lifted else None)  # (lift_to, face_dim)
        in_dim = lift_to if lifted else face_dim
        self.linear = nn.Linear(in_dim, n_tokens * n_components, device="meta").to_empty(device="cpu")  # no global RNG
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(seed)
        nn.init.normal_(self.linear.weight, 0.0, 1.0, generator=generator)
        nn.init.zeros_(self.linear.bias)

    def forward(self, face: Tensor) -> Tensor:
        if self.lift is not None:
            face = face @ self.lift.T  # (B, face_dim) -> (B, lift_to), same norm
        x = F.leaky_relu(self.linear(face), 0.2)  # (B, K*n)
        x = x.view(-1, self.n_tokens, self.n_components)  # (B, K, n)
        return F.normalize(x, dim=-1)


def check_name(name: str) -> str:
    """A person's name, usable as a file name and as the prompt token ``<name>``.

    Letters, digits, ``_`` and ``-``, starting with a letter or digit, at most 64 characters.
    """
    name = (name or "").strip()
    if name.startswith("<") and name.endswith(">"):
        name = name[1:-1]
    if not _NAME_RE.match(name):
        raise InputError(
            f"Invalid name {name!r}: use 1-64 letters, digits, '_' or '-' (no spaces, slashes or dots), e.g. alice."
        )
    return name


def name_from_filename(stem: str) -> str:
    """A valid name made from a file name: other characters become ``_`` ("Ann Lee (2).jpg" -> "Ann_Lee_2")."""
    name = re.sub(r"[^A-Za-z0-9_\-]+", "_", stem).strip("_-")[:64].strip("_-")
    return name or "person"


def token_for(name: str) -> str:
    """The prompt token of a name: ``alice`` -> ``<alice>``."""
    return f"<{check_name(name)}>"


class IdentityPart(NamedTuple):
    """A person's words for one text encoder.

    Attributes:
        coefficients: (K, n) rows in that encoder's celeb basis: training's moving average of the network's
            unit rows (length <= 1), or unit rows for a mix.
        embeddings: (K, d) ``= coefficients @ components + mean``: the word's K token vectors.
    """

    coefficients: Tensor
    embeddings: Tensor


@dataclass
class Identity:
    """One person: per text encoder of its model family, coefficients in the celeb basis and the token embeddings they give.

    Attributes:
        token: the prompt word, e.g. ``"<alice>"``.
        parts: one ``IdentityPart`` per text encoder, in the family's slot order (``ModelFamily.encoders``):
            one for SD 1.x/2.x, two for SDXL. In the file, part ``i``'s tensors are ``coefficients`` and
            ``embeddings`` with suffix ``families.slot_suffix(i)`` (``""``, ``"_2"``, ...).
        metadata: base model, model family, basis hash, face encoder, steps, seed, creation date, and for a
            trained identity ``train_config``, the ``TrainConfig.to_dict()`` of its training, ...
    """

    token: str
    parts: list[IdentityPart]
    metadata: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.token.strip("<>")

    @property
    def coefficients(self) -> Tensor:
        """(K, n): the first text encoder's coefficients."""
        return self.parts[0].coefficients

    @property
    def embeddings(self) -> Tensor:
        """(K, d): the first text encoder's token vectors."""
        return self.parts[0].embeddings

    @property
    def n_tokens(self) -> int:
        return self.embeddings.shape[0]

    @property
    def embedding_dim(self) -> int:
        """d of the first text encoder."""
        return self.embeddings.shape[1]

    @property
    def train_config(self) -> dict | None:
        """The settings of the training that made this identity (``TrainConfig.to_dict()``), or ``None``.

        ``None`` for identities that were mixed or imported, and for files written before 0.2.
        ``TrainConfig.from_dict(identity.train_config)`` makes the config again.
        """
        value = self.metadata.get("train_config")
        return value if isinstance(value, dict) else None

    @property
    def family(self) -> ModelFamily:
        """The model family the identity was made for (``families.identity_family``)."""
        return identity_family(self.metadata, len(self.parts), self.embedding_dim)

    @classmethod
    def from_coefficients(cls, token: str, coefficients, basis, **metadata) -> "Identity":
        """Identity from (K, n) coefficients and the ``CelebBasis`` they live in.

        For a family with several text encoders pass lists, in slot order: ``[coeffs_l, coeffs_g]`` and
        ``[basis_l, basis_g]`` for SDXL.
        """
        coeffs = [c.detach().float().cpu() for c in (coefficients if isinstance(coefficients, (list, tuple)) else [coefficients])]
        bases = list(basis) if isinstance(basis, (list, tuple)) else [basis]
        if len(coeffs) != len(bases) or not coeffs:
            raise ValueError(f"one coefficient tensor per basis: {len(coeffs)} coefficient tensor(s), {len(bases)} bases")
        meta = {"basis_sha256": ",".join(b.fingerprint for b in bases),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        meta.update(metadata)
        return cls(token, [IdentityPart(c, b.reconstruct(c)) for c, b in zip(coeffs, bases)], meta)

    def save(self, path) -> Path:
        """Write ``NAME.safetensors``: per part ``i``, ``coefficients``/``embeddings`` + ``slot_suffix(i)``; + metadata."""
        meta = {"token": self.token, **self.metadata}
        tensors = {}
        for i, (coeffs, emb) in enumerate(self.parts):
            tensors[f"coefficients{slot_suffix(i)}"] = coeffs.float()
            tensors[f"embeddings{slot_suffix(i)}"] = emb.float()
        return save_artifact(path, tensors, IDENTITY_FORMAT, meta)

    @classmethod
    def load(cls, path) -> "Identity":
        """Read an identity file; raises ``FileFormatError`` for anything else."""
        tensors, meta = load_artifact(path, IDENTITY_FORMAT, ("coefficients", "embeddings"))
        parts = []
        while all(f"{kind}{slot_suffix(len(parts))}" in tensors for kind in ("coefficients", "embeddings")):
            suffix = slot_suffix(len(parts))
            parts.append(IdentityPart(tensors[f"coefficients{suffix}"].float(), tensors[f"embeddings{suffix}"].float()))
        for coeffs, emb in parts:
            if emb.ndim != 2 or coeffs.ndim != 2 or coeffs.shape[0] != emb.shape[0] or emb.shape[0] != parts[0].embeddings.shape[0]:
                raise FileFormatError(
                    f"{path}: inconsistent shapes coefficients {tuple(coeffs.shape)}, embeddings {tuple(emb.shape)}. Re-create the identity."
                )
        token = meta.pop("token", None) or f"<{name_from_filename(Path(path).stem)}>"
        if not (token.startswith("<") and token.endswith(">") and _NAME_RE.match(token[1:-1])):
            raise FileFormatError(f"{path}: its token {token!r} is not <name> (1-64 letters, digits, '_' or '-'). "
                                  "Re-create the identity.")  # the name becomes file names: never a path
        if parts[0].embeddings.shape[0] == 0 or not all(bool(torch.isfinite(t).all()) for part in parts for t in part):
            raise FileFormatError(f"{path}: no vectors, or values that are not finite (NaN/inf). Re-create the identity.")
        meta.pop("format", None)
        for key in ("steps", "seed", "source_photos", "train_config"):
            if key in meta:
                meta[key] = decode_json(meta[key], meta[key])
        return cls(token, parts, meta)
