"""Identity mixing (the paper's interpolation figure): weighted coefficients, rows re-normalised.

Ingredients are identities or celebrity names; a name is written in the basis by projecting its
token embeddings (first token onto slot 0, second onto slot 1, ...).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from .errors import InputError
from .families import FAMILY_METADATA_KEY, text_encoders
from .identity import Identity, check_name
from .models import model_metadata
from .resources import celeb_names, names_sha256

logger = logging.getLogger(__name__)


def celebrity_coefficients(name: str, tokenizer, text_encoder, basis) -> torch.Tensor:
    """(K, n) coefficients of a name: its first K tokens projected onto the K slots (missing slots: 0)."""
    special = set(tokenizer.all_special_ids)
    ids = [int(t) for t in tokenizer(name).input_ids if int(t) not in special][: basis.n_tokens]
    if not ids:
        raise InputError(f"{name!r} has no tokens. Pass a name such as 'Anne Hathaway'.")
    weight = text_encoder.get_input_embeddings().weight.detach()
    rows = weight[torch.tensor(ids, device=weight.device)].to("cpu", torch.float32)  # (len(ids), d): just the name's rows
    coeffs = torch.zeros(basis.n_tokens, basis.n_components)
    coeffs[: len(ids)] = basis.project(rows)
    return coeffs


def ingredients(items: list[Identity | str], weights: list[float] | None = None) -> list[tuple[Identity | str, float]]:
    """``mix``'s ``(item, weight)`` pairs from identities and celebrity names and one weight each (equal when ``None``),
    checked (``check_ingredients``) before any model is needed."""
    items = list(items)
    if weights is None:
        weights = [1.0 / len(items)] * len(items) if items else []
    if len(weights) != len(items):
        raise InputError(f"{len(items)} ingredient(s) but {len(weights)} weights. Give one weight per identity, "
                         "then per celebrity.", field="weights")
    pairs = list(zip(items, weights))
    check_ingredients(pairs)
    return pairs


def check_ingredients(ingredients: list[tuple[Identity | str, float]]) -> None:
    """What ``mix`` checks before any work: something to mix, weights finite, not all zero (no model needed)."""
    if not ingredients:
        raise InputError("Nothing to mix. Pass at least one identity or celebrity name.", field="ingredients")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) and abs(w) <= 1e6 for _, w in ingredients):
        raise InputError(f"Mixing weights must be finite numbers of at most 1e6 in size, got {[w for _, w in ingredients]}.",
                         field="weights")
    if all(abs(w) < 1e-12 for _, w in ingredients):
        raise InputError("All mixing weights are zero. Give at least one ingredient a weight.", field="weights")


def _warn_unknown_names(names: list[str], basis) -> None:
    """A name outside the basis's list may still be known to the model; say that it is not one of the basis's."""
    known = celeb_names()
    if not names or basis.metadata.get("names_sha256") != names_sha256(known):
        return  # a basis built from another list: its names are not at hand
    folded = {" ".join(k.split()).casefold() for k in known}  # the tokenizer reads "anne hathaway" as "Anne Hathaway"
    for n in names:
        if " ".join(n.split()).casefold() not in folded:
            logger.warning("%r is not one of the %d names the basis was built from; it is mixed in as the model "
                           "knows it (check the spelling).", n, len(known))


def mix(ingredients: list[tuple[Identity | str, float]], name: str, bases, pipe=None) -> Identity:
    """Mix identities and celebrity names with weights into a new identity.

    Args:
        ingredients: ``(Identity or celebrity name, weight)`` pairs; weights need not sum to 1.
        name: the new person's name; the token is ``<name>``.
        bases: the model's ``CelebBasis`` (a list of two for SDXL).
        pipe: the pipeline whose text encoders give celebrity names (needed for names); when given,
            its model and text encoders are recorded in the identity.

    Returns:
        An ``Identity`` whose coefficient rows are the weighted sums, re-normalised to unit length.

    Example:
        >>> alibob = mix([(alice, 0.5), (bob, 0.5)], "alibob", basis)
        >>> mix([(alice, 0.7), ("Anne Hathaway", 0.3)], "alianne", basis, pipe)
    """
    name = check_name(name)
    bases = list(bases) if isinstance(bases, (list, tuple)) else [bases]
    check_ingredients(ingredients)
    _warn_unknown_names([i for i, _ in ingredients if isinstance(i, str)], bases[0])
    total = [torch.zeros(b.n_tokens, b.n_components) for b in bases]
    sources = []
    for item, weight in ingredients:
        if isinstance(item, Identity):
            parts = [c for c, _ in item.parts]
            if len(parts) != len(bases):
                raise InputError(f"{item.token} was made for another model family ({len(parts)} text encoder(s), model has {len(bases)}).")
            sources.append(item.token)
        else:
            if pipe is None:
                raise InputError(f"Mixing with the name {item!r} needs the model: pass the pipeline.")
            parts = [celebrity_coefficients(item, tok, te, b) for (tok, te), b in zip(text_encoders(pipe), bases)]
            sources.append(item)
        for j, (c, b) in enumerate(zip(parts, bases)):
            if c.shape[1] != b.n_components:
                raise InputError(f"{sources[-1]} has {c.shape[1]} coefficients per row but the basis has {b.n_components}.")
            rows = min(c.shape[0], b.n_tokens)
            total[j][:rows] += weight * F.normalize(c[:rows].float(), dim=-1)
    coeffs = [F.normalize(t, dim=-1) for t in total]
    recipe = [[s, w] for s, (_, w) in zip(sources, ingredients)]
    first = next((i for i, _ in ingredients if isinstance(i, Identity)), None)
    base_model = first.metadata.get("base_model") if first is not None else ""
    family = {k: first.metadata[k] for k in (FAMILY_METADATA_KEY,) if first is not None and k in first.metadata}
    recorded = model_metadata(pipe) if pipe is not None else {"base_model": base_model or "", **family}
    return Identity.from_coefficients(f"<{name}>", coeffs, bases, **recorded, face_encoder="mix", mix=recipe)
