"""Instant identities: the identity network learned once, from the model's own celebrities.

The identity network's job is the same for everyone: face vector -> coefficients in the celeb basis.
For every name of the basis the exact coefficients are known (the name's token vectors written in
the basis), the model can draw whoever those coefficients are, and the face network can read each
drawing. Those (face vector, coefficients) pairs are a training set that comes from the model
itself: no face data set, no licence question.

``pretrain`` (``celebbasis pretrain``):
  1. targets   every name's first K token vectors, projected on the basis, rows made unit length
               (the identity network's rows are unit length too);
  2. draw      each target ``drawings`` times, inserted as a new word in the package's caption
               templates, each drawing with its own seed (``mixes`` more: random blends of 2-3
               names' rows, synthetic people);
  3. read      each drawing with the face network (drawings without a face are dropped);
  4. filter    names whose drawings disagree (mean pairwise cosine below the face network's
               same-person threshold) are dropped: the model does not draw them as one person;
  5. fit       ridge regression in closed form (``fit="ridge"``), then (``fit="mlp"``, the default)
               the same network trained on the rows' cosine from there.
The network is the per-person ``IdentityEncoder`` (lift + linear + LeakyReLU, unit rows), so its
weights start a per-person run (``TrainConfig``'s ``steps`` then refine it: a warm start), and one
forward pass of it is an identity (``steps=0``: an instant identity). Its weights are scaled to the
size of a fresh network's, so that the per-person recipe's Adam steps move it as they move a fresh one.

The drawn face vectors are kept in a work file beside the output as they are made, so a stopped run
resumes where it stopped; every drawing's seed is a function of the run's seed and the drawing alone,
so a resumed run gives what an uninterrupted one gives.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import PretrainConfig
from .errors import FileFormatError, InputError
from .families import family_of
from .files import decode_json, load_artifact, save_artifact
from .identity import IdentityEncoder
from .signatures import encoders_signature

logger = logging.getLogger(__name__)

PRETRAINED_FORMAT = "celebbasis.pretrained"
_WORK_FORMAT = "celebbasis.pretrain-work"  # the drawings' face vectors so far, beside the output while a run lasts


# -- what the model knows ----------------------------------------------------------------------------
def name_coefficients(tokenizer, text_encoder, basis, names: list[str]) -> tuple[list[str], torch.Tensor]:
    """Names with at least K tokens and their first K token vectors in the basis, rows unit length: (N, K, n)."""
    from .basis import name_token_ids

    k = basis.n_tokens
    ids = name_token_ids(tokenizer, names)
    kept = [(n, t[:k]) for n, t in zip(names, ids) if len(t) >= k]
    table = text_encoder.get_input_embeddings().weight.detach().float().cpu()
    emb = table[torch.tensor([t for _, t in kept])]  # (N, K, d)
    return [n for n, _ in kept], F.normalize(basis.project(emb), dim=-1)


def unet_signature(pipe) -> str:
    """A short fingerprint of the image model (its first and last UNet layers): drawings depend on it."""
    h = hashlib.sha256()
    for p in (pipe.unet.conv_in.weight, pipe.unet.conv_out.weight):
        h.update(p.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _made_by(pipe, bases, face_encoder) -> dict[str, str]:
    """What drawings and the network fitted on them depend on: the model's fingerprints, its bases, the face network."""
    return {"text_encoder_signature": encoders_signature(pipe), "unet_signature": unet_signature(pipe),
            "basis_sha256": ",".join(b.fingerprint for b in bases), "face_encoder": face_encoder.name}


def mixes(targets: list[torch.Tensor], n: int, seed: int) -> list[torch.Tensor]:
    """``n`` synthetic people: each a random convex blend of 2-3 names' rows (per encoder), rows unit length."""
    rng = np.random.default_rng(seed)
    out = [[] for _ in targets]
    for _ in range(n):
        who = torch.from_numpy(rng.choice(len(targets[0]), size=int(rng.integers(2, 4)), replace=False))
        w = torch.from_numpy(rng.dirichlet(np.ones(len(who)))).float()
        for e, t in enumerate(targets):
            out[e].append(F.normalize(torch.einsum("m,mkn->kn", w, t[who]), dim=-1))
    return [torch.stack(o) if o else t[:0] for o, t in zip(out, targets)]


# -- drawing ------------------------------------------------------------------------------------------
def draw_coefficients(pipe, bases, coefficients: list[torch.Tensor], captions: list[str], seeds: list[int], *,
                      steps: int, guidance: float, size: tuple[int, int], batch: int = 16):
    """Images of ``captions[i]`` (each with ``{}`` for the subject), the subject's word set from ``coefficients[e][i]``
    (per text encoder, (N, K, n)) in ``bases[e]``: ``generate.draw_words``. Yields (index, PIL image) in order."""
    from .generate import draw_words

    rows = [b.reconstruct(c) for b, c in zip(bases, coefficients)]  # (N, K, d) per encoder
    yield from draw_words(pipe, rows, captions, seeds, steps=steps, guidance=guidance, size=size, batch=batch)


def read_faces(analyzer, images) -> tuple[np.ndarray, np.ndarray]:
    """Face vectors of drawings (the largest face of each) and which drawings had one."""
    from .errors import NoFaceFoundError

    vecs, found = [], []
    for im in images:
        arr = np.asarray(im.convert("RGB"))
        try:
            faces = analyzer.detect(arr, "a drawing")
            vec = analyzer.embed(arr, faces[0], "a drawing")[1] if faces else None
        except NoFaceFoundError:
            vec = None
        found.append(vec is not None)
        vecs.append(vec if vec is not None else np.zeros(analyzer.encoder.embedding_dim, np.float32))
    return np.stack(vecs).astype(np.float32), np.asarray(found)


# -- the consistency filter ---------------------------------------------------------------------------
def agreement(faces: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Per group: the mean pairwise cosine of its face vectors (NaN with fewer than two)."""
    out = np.full(n_groups, np.nan)
    for g in range(n_groups):
        v = faces[groups == g]
        if len(v) >= 2:
            c = v @ v.T
            out[g] = (c.sum() - np.trace(c)) / (len(v) * (len(v) - 1))
    return out


# -- fitting -------------------------------------------------------------------------------------------
def _inverse_leaky(y: torch.Tensor, slope: float = 0.2) -> torch.Tensor:
    return torch.where(y > 0, y, y / slope)


def _scaled(net: IdentityEncoder, faces: torch.Tensor) -> IdentityEncoder:
    """Scale weights and bias so the pre-activations are as large as a fresh network's (about unit per number).

    The rows are normalised after the activation, so the prediction is unchanged; what changes is how far
    one Adam step of the per-person recipe moves it: as far, relative to the weights, as for a fresh network."""
    with torch.no_grad():
        x = faces @ net.lift.T if net.lift is not None else faces
        rms = F.linear(x, net.linear.weight, net.linear.bias).pow(2).mean().sqrt().clamp(min=1e-8)
        net.linear.weight /= rms
        net.linear.bias /= rms
    return net


def fit_ridge(faces: torch.Tensor, targets: torch.Tensor, face_dim: int, *, alpha: float) -> IdentityEncoder:
    """The network's linear layer by ridge regression onto the targets' pre-activations (closed form)."""
    n, k, m = targets.shape
    net = IdentityEncoder(faces.shape[1], k, m, lift_to=face_dim or None)
    x = faces @ net.lift.T if net.lift is not None else faces  # (N, in)
    y = _inverse_leaky(targets.reshape(n, k * m))  # (N, K*n): what the layer should output before LeakyReLU
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = (x - xm).double(), (y - ym).double()
    w = torch.linalg.solve(xc.T @ xc + alpha * len(x) * torch.eye(x.shape[1], dtype=torch.float64), xc.T @ yc).T.float()
    with torch.no_grad():
        net.linear.weight.copy_(w)
        net.linear.bias.copy_(ym - w @ xm)
    return _scaled(net, faces)


def fit_mlp(net: IdentityEncoder, faces: torch.Tensor, targets: torch.Tensor, *, steps: int, learning_rate: float,
            weight_decay: float, seed: int, batch: int = 256) -> IdentityEncoder:
    """Train ``net`` (started from the ridge fit) on the mean cosine between its rows and the targets'."""
    g = torch.Generator("cpu").manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        j = torch.randint(len(faces), (min(batch, len(faces)),), generator=g)
        loss = 1 - (net(faces[j]) * targets[j]).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return _scaled(net.requires_grad_(False), faces)


# -- the network file --------------------------------------------------------------------------------
@dataclass
class PretrainedNetwork:
    """The identity network learned from a model's celebrities: one ``IdentityEncoder`` per text encoder.

    ``metadata`` records what it fits (``text_encoder_signature``, ``unet_signature``, ``basis_sha256``,
    ``face_encoder``, ``face_dim``), how it was made (``pretrain_config``, ``names_kept``, counts, seed) and
    how well it fits held-back names (``validation_cosine``).
    """

    heads: list[IdentityEncoder]
    metadata: dict = field(default_factory=dict)
    name: str = ""  # the file it was read from, recorded in the identities it starts

    @torch.no_grad()
    def predict(self, faces) -> list[torch.Tensor]:
        """(B, f) face vectors -> per text encoder (B, K, n) unit rows."""
        faces = torch.as_tensor(np.asarray(faces), dtype=torch.float32).reshape(-1, self.face_dim)
        return [h(faces) for h in self.heads]

    @property
    def face_dim(self) -> int:
        h = self.heads[0]
        return h.lift.shape[1] if h.lift is not None else h.linear.in_features

    @property
    def face_encoder(self) -> str:
        return self.metadata.get("face_encoder", "")

    def save(self, path) -> Path:
        tensors = {f"{e}.{k}": v for e, h in enumerate(self.heads) for k, v in h.state_dict().items() if k != "lift"}
        return save_artifact(path, tensors, PRETRAINED_FORMAT, self.metadata)

    @classmethod
    def load(cls, path) -> "PretrainedNetwork":
        """Read a file written by ``save``; anything else (or an empty file) is a one-line ``FileFormatError``."""
        tensors, meta = load_artifact(path, PRETRAINED_FORMAT, ("0.linear.weight", "0.linear.bias"))
        meta = {k: decode_json(v, v) if k in _JSON_KEYS else v for k, v in meta.items()}
        heads, e = [], 0
        try:
            while f"{e}.linear.weight" in tensors:
                w, b = tensors[f"{e}.linear.weight"].float(), tensors[f"{e}.linear.bias"].float()
                k, face_dim, lifted = int(meta["n_tokens"]), int(meta["face_vector_dim"]), int(meta["face_dim"])
                net = IdentityEncoder(face_dim, k, w.shape[0] // k, lift_to=lifted or None)
                net.linear.load_state_dict({"weight": w, "bias": b})
                heads.append(net.requires_grad_(False))
                e += 1
        except (KeyError, ValueError, RuntimeError) as err:
            raise FileFormatError(f"{path} is a damaged pretrained network ({type(err).__name__}: {err}). "
                                  "Make it again with celebbasis pretrain.") from None
        return cls(heads, meta, Path(path).name)

    def check(self, pipe, bases, face_encoder: str, face_dim: int) -> None:
        """Refuse, in one line, a network made for another model, basis, face network or face-vector size."""
        fix = "Make one for this model with: celebbasis pretrain, or train a fresh network (pretrained=none)."
        path = self.name or "the pretrained network"
        if self.metadata.get("text_encoder_signature") != encoders_signature(pipe) or \
                self.metadata.get("unet_signature") != unet_signature(pipe):
            raise InputError(f"{path} was made for another model ({self.metadata.get('base_model', '?')}). {fix}",
                             field="pretrained")
        if self.metadata.get("basis_sha256") != ",".join(b.fingerprint for b in bases):
            raise InputError(f"{path} was made with another celeb basis. {fix}", field="pretrained")
        if self.face_encoder != face_encoder:
            raise InputError(f"{path} was made with the face network {self.face_encoder}, but the photos were read "
                             f"with {face_encoder}. Read them with {self.face_encoder}, or {fix[0].lower()}{fix[1:]}",
                             field="pretrained")
        if int(self.metadata.get("face_dim", -1)) != face_dim:
            raise InputError(f"{path} lifts face vectors to {self.metadata.get('face_dim')}, this run to {face_dim}. "
                             f"Set face_dim={self.metadata.get('face_dim')}, or {fix[0].lower()}{fix[1:]}", field="pretrained")


_JSON_KEYS = ("pretrain_config", "names_kept", "counts", "validation_cosine")


# -- which network a run starts from ----------------------------------------------------------------
def resolve_pretrained(spec: str, pipe) -> PretrainedNetwork | None:
    """``TrainConfig.pretrained``: ``"none"`` -> ``None``; ``"auto"`` -> the network a packaged model ships
    (``models.PackagedModel.pretrained``: the toy world's), else ``None``; anything else: the file at ``spec``."""
    from .models import packaged_model

    if spec == "none":
        return None
    if spec == "auto":
        packaged = packaged_model(pipe)
        path = packaged.pretrained if packaged is not None else None
        return PretrainedNetwork.load(path) if path is not None and Path(path).exists() else None
    return PretrainedNetwork.load(spec)


# -- the whole run ----------------------------------------------------------------------------------
@dataclass
class PretrainData:
    """The (face vector, coefficients) pairs: people ``0..len(names)-1`` are the celebrities, the rest mixes.

    ``targets``: per text encoder, (people, K, n) unit rows; ``faces``: (drawings, f), one per drawing,
    ``group``: each drawing's person, ``found``: whether the drawing had a face."""

    names: list[str]
    targets: list[torch.Tensor]
    faces: np.ndarray
    found: np.ndarray
    group: np.ndarray
    source: str = "the model's drawings"
    seconds: float = 0.0

    @property
    def people(self) -> int:
        return self.targets[0].shape[0]


def celebrity_targets(pipe, bases, max_names: int = 0, seed: int = 0) -> tuple[list[str], list[torch.Tensor]]:
    """The package's celebrity names that every text encoder has K tokens of (``max_names`` of them at random,
    0: all), and their unit rows per encoder."""
    from .resources import celeb_names

    found = [name_coefficients(tok, te, b, celeb_names()) for (tok, te), b in zip(family_of(pipe).encoders(pipe), bases)]
    names = [n for n in found[0][0] if all(n in kept for kept, _ in found)]
    if 0 < max_names < len(names):
        pick = np.random.default_rng(seed).choice(len(names), max_names, replace=False)
        names = [names[i] for i in sorted(pick)]
    return names, [t[[kept.index(n) for n in names]] for kept, t in found]


def _captions(n: int, seed: int) -> list[str]:
    from .prompts import TEMPLATES

    rng = np.random.default_rng(seed)
    return [TEMPLATES[int(i)] for i in rng.integers(len(TEMPLATES), size=n)]


def collect(pipe, analyzer, bases, config: PretrainConfig, work: Path | None = None, progress=None) -> PretrainData:
    """Draw every celebrity (and mix) ``config.drawings`` times and read each drawing's face.

    With ``work`` (a ``.safetensors`` path), the face vectors are saved there after every chunk of
    drawings and a stopped run resumes from it."""
    cfg = config
    names, targets = celebrity_targets(pipe, bases, cfg.max_names, cfg.seed)
    blends = mixes(targets, cfg.mixes, cfg.seed + 1)
    every = [torch.cat([t, m]) for t, m in zip(targets, blends)]
    group = np.repeat(np.arange(every[0].shape[0]), cfg.drawings)
    captions, seeds = _captions(len(group), cfg.seed), [cfg.seed * 1_000_003 + i for i in range(len(group))]
    size = family_of(pipe).native_size(pipe)
    n = len(group)
    # what the drawings depend on beyond their seeds: a work file of another model or setting is not resumed
    drawn_by = {**_made_by(pipe, bases, analyzer.encoder), "sample_steps": str(cfg.sample_steps),
                "guidance": str(cfg.guidance), "size": str(size)}
    faces, found, done = np.zeros((n, analyzer.encoder.embedding_dim), np.float32), np.zeros(n, bool), 0
    if work is not None and work.exists():
        saved, meta = load_artifact(work, _WORK_FORMAT, ("faces", "found", "seeds", "done"))
        if saved["faces"].shape != faces.shape or not torch.equal(saved["seeds"], torch.tensor(seeds)):
            raise InputError(f"{work} belongs to another pretraining run. Delete it to start again.")
        differ = [k for k, v in drawn_by.items() if meta.get(k) != v]
        if differ:
            raise InputError(f"{work} was drawn by another model or setting ({', '.join(differ)} differ). "
                             "Delete it to start again.")
        done = int(saved["done"])
        faces[:done], found[:done] = saved["faces"].numpy()[:done], saved["found"].numpy()[:done].astype(bool)
        logger.info("resuming the drawings at %d of %d", done, n)
    t = time.time()
    for start in range(done, n, cfg.batch):  # saved after every model call
        j = list(range(start, min(start + cfg.batch, n)))
        who = torch.from_numpy(group[j])
        images = [im for _, im in draw_coefficients(pipe, bases, [c[who] for c in every], [captions[i] for i in j],
                                                    [seeds[i] for i in j], steps=cfg.sample_steps,
                                                    guidance=cfg.guidance, size=(size, size), batch=cfg.batch)]
        faces[j], found[j] = read_faces(analyzer, images)
        if work is not None:
            save_artifact(work, {"faces": torch.from_numpy(faces), "found": torch.from_numpy(found.astype(np.uint8)),
                                 "seeds": torch.tensor(seeds), "done": torch.tensor(j[-1] + 1)}, _WORK_FORMAT, drawn_by)
        if progress is not None:
            progress(j[-1] + 1, n, time.time() - t)
    return PretrainData(names, every, faces, found, group, seconds=time.time() - t)


def fit_network(data: PretrainData, config: PretrainConfig, face_encoder, *, pipe, bases, base_model: str = "") -> PretrainedNetwork:
    """The consistency filter, then the fit (``config.fit``), on ``data``; ``face_encoder`` read the drawings."""
    cfg, people = config, data.people
    agree = agreement(data.faces[data.found], data.group[data.found], people)
    threshold = cfg.min_agreement if cfg.min_agreement is not None else getattr(face_encoder, "same_person_cosine", 0.5)
    keep = (agree >= threshold) if cfg.filter else np.isfinite(agree)
    kept_names = [n for i, n in enumerate(data.names) if keep[i]]
    if len(kept_names) < cfg.min_names:
        raise InputError(f"Only {len(kept_names)} of {len(data.names)} celebrities are drawn as one person by this model "
                         f"(at least {cfg.min_names} needed): it does not know enough of them. Train without a "
                         "pretrained network (pretrained=none), or lower min_names.", field="min_names")
    rows = data.found & keep[data.group]
    x = torch.from_numpy(data.faces[rows])
    who = torch.from_numpy(data.group[rows])
    held = torch.from_numpy(np.random.default_rng(cfg.seed + 2).random(people) < 0.1)[who]  # one person in ten
    heads, val_cos = [], []
    for e, t in enumerate(data.targets):
        y = t[who]

        def fit(xs, ys):
            net = fit_ridge(xs, ys, cfg.face_dim, alpha=cfg.ridge)
            if cfg.fit == "mlp":
                net = fit_mlp(net.requires_grad_(True), xs, ys, steps=cfg.fit_steps, learning_rate=cfg.learning_rate,
                              weight_decay=cfg.weight_decay, seed=cfg.seed + 3 + e)
            return net.requires_grad_(False)

        if held.any() and (~held).any():  # the fit on people it did not see; the saved network then sees everyone
            net = fit(x[~held], y[~held])
            with torch.no_grad():
                val_cos.append(round(float((net(x[held]) * y[held]).sum(-1).mean()), 4))
        heads.append(fit(x, y))
    n_names = len(data.names)
    counts = {"names": n_names, "names_kept": len(kept_names), "mixes": people - n_names,
              "mixes_kept": int(keep[n_names:].sum()), "drawings": int(len(data.group)),
              "drawings_with_a_face": int(data.found.sum()), "pairs_fitted": int(rows.sum()),
              "draw_seconds": round(data.seconds, 1)}
    meta = {"base_model": base_model, "family": family_of(pipe).name, **_made_by(pipe, bases, face_encoder),
            "face_vector_dim": str(face_encoder.embedding_dim),
            "face_dim": str(cfg.face_dim), "n_tokens": str(bases[0].n_tokens), "seed": str(cfg.seed),
            "pretrain_config": cfg.to_dict(), "names_kept": kept_names, "counts": counts, "validation_cosine": val_cos,
            "agreement_threshold": f"{threshold:.3f}", "data": data.source}
    logger.info("fitted on %d of %d celebrities and %d of %d mixes (%d drawings); held-back people's cosine %s",
                len(kept_names), n_names, counts["mixes_kept"], counts["mixes"], int(rows.sum()), val_cos)
    return PretrainedNetwork(heads, meta)


def pretrain(pipe, analyzer, out, *, config: PretrainConfig | None = None, bases=None, base_model: str = "",
             overwrite: bool = False, progress=None) -> PretrainedNetwork:
    """Learn the identity network from the model's own celebrities and save it to ``out`` (``.safetensors``).

    Args:
        pipe: a diffusers pipeline of a supported family.
        analyzer: the ``FaceAnalyzer`` (detector + face network) that will read users' photos.
        out: the file to write. The drawings' face vectors are kept beside it (``NAME.work.safetensors``)
            while the run lasts: run it again after a stop and it resumes.
        config: ``PretrainConfig``.
        bases: the celeb basis of each text encoder (default: the model's, built or cached).
        base_model: recorded in the file.
        overwrite: replace an existing ``out``.
        progress: ``progress(done, total, seconds)`` after each chunk of drawings.
    """
    from .files import check_new_file
    from .models import resolve_bases

    cfg = config or PretrainConfig()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(f"{out}: the pretrained network is a .safetensors file; name it so.", field="out")
    check_new_file(out, overwrite)
    bases = resolve_bases(pipe, bases, None, base_model)
    work = out.with_name(out.name.removesuffix(".safetensors") + ".work.safetensors")
    data = collect(pipe, analyzer, bases, cfg, work, progress)
    net = fit_network(data, cfg, analyzer.encoder, pipe=pipe, bases=bases, base_model=base_model)
    net.save(out)
    work.unlink(missing_ok=True)
    return net
