"""``personalize``: learn one identity per person, jointly, with one shared identity network."""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ..config import BasisConfig, TrainConfig
from ..errors import InputError
from ..face import FaceAnalysis, FaceAnalyzer, same_person_threshold, unlike_photos
from ..insert import load_identity
from ..models import model_name, packaged_model, resolve_bases
from ..pretrain import resolve_pretrained
from .checks import check_inputs, photo_groups
from .record import PersonalizeResult, log_summary, run_record
from .trainer import Personalizer

logger = logging.getLogger(__name__)


def personalize(
    pipe,
    photos: list,
    names: list[str],
    *,
    config: TrainConfig | None = None,
    basis=None,
    basis_config: BasisConfig | None = None,
    face_analyzer=None,
    face_index: int | None = None,
    base_model: str | None = None,
    show_progress: bool = True,
    callback: Callable[[int, int, float], None] | None = None,
    preview: Callable[[int, list], None] | None = None,
) -> PersonalizeResult:
    """Learn one identity per person, jointly, with one shared identity network.

    Args:
        pipe: a diffusers SD pipeline; its VAE, UNet and text encoder stay frozen and are given back as
            they were found. Afterwards the pipeline also understands the new words.
        photos: per person, one photo or a list of photos of that person: image paths or ``FaceAnalysis``.
            A person's views come from all of their photos evenly; identical photos count once, and a
            photo that does not look like the others is named in a warning.
        names: one name per person; the prompt token is ``<name>``.
        config: ``TrainConfig``; when ``None``, the paper's defaults, or the preset of a packaged model
            (``models.packaged_model``: the toy world's full-frame, unflipped views).
        basis: a ``CelebBasis`` for this text encoder (a list of two for SDXL); built and cached when ``None``.
        basis_config: how to build the basis when ``basis`` is ``None`` (default ``BasisConfig()``).
        face_analyzer: detector + identity network; when ``None``, dlib's, or a packaged model's own (the toy
            world's). Its network also sees every view.
        face_index: which face to use in photos with several (0 = largest).
        base_model: id or path of the model, recorded in the identity files.
        show_progress: tqdm bar with the loss.
        callback: called as ``callback(step, total_steps, loss)`` after every step; raise in it to stop.
        preview: ``preview(step, identities)``, the people as learned so far, before the first step (the instant
            identities) and every quarter of the steps; the web UI draws them (``generate.preview``).

    Returns:
        ``PersonalizeResult`` with one ``Identity`` per person, the loss curve and the run record.

    Example:
        >>> pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
        >>> result = personalize(pipe, [["alice1.jpg", "alice2.jpg"], "bob.jpg"], ["alice", "bob"])
        >>> result.save("identities/")
    """
    cfg = config or default_config(pipe)
    groups = photo_groups(photos)
    names = check_inputs(pipe, list(names), len(groups))
    base_model = base_model or model_name(pipe)
    bases = resolve_bases(pipe, basis, basis_config, base_model)
    pretrained = _pretrained(cfg, pipe)
    people, face_analyzer = _analyse_photos(pipe, groups, names, face_analyzer, face_index)
    total, face_net = cfg.total_steps(len(names), warm=pretrained is not None), getattr(face_analyzer, "encoder", None)
    with Personalizer(pipe, people, names, cfg, bases, base_model, face_net=face_net, pretrained=pretrained) as trainer:
        elapsed = _train(trainer, total, show_progress and total > 0, callback, preview)
        identities = trainer.identities()
    for ident in identities:  # the placeholder rows were never used in training; fill them for drawing now
        load_identity(pipe, ident)
    log_summary(trainer, total, elapsed)
    return PersonalizeResult(identities, trainer.losses, run_record(trainer, names, total, elapsed))


def _pretrained(cfg: TrainConfig, pipe):
    """The ``PretrainedNetwork`` the run starts from (``cfg.pretrained``), or ``None``; the instant identity needs one."""
    pretrained = resolve_pretrained(cfg.pretrained, pipe)
    if cfg.steps == 0 and pretrained is None:
        raise InputError("The instant identity (0 steps) needs a pretrained network, and this model ships none: pass "
                         "pretrained=FILE, a network made by `celebbasis pretrain`, or train for some steps.", field="pretrained")
    return pretrained


def default_config(pipe) -> TrainConfig:
    """The settings a run on ``pipe`` starts from: its packaged model's preset (the toy world's), else the paper's."""
    packaged = packaged_model(pipe)
    return TrainConfig.preset(packaged.train_preset) if packaged and packaged.train_preset else TrainConfig()


def default_analyzer(pipe) -> FaceAnalyzer:
    """The face analyzer for photos learned on ``pipe``: its packaged model's face network (the toy world's), else dlib's."""
    packaged = packaged_model(pipe)
    return FaceAnalyzer(encoder=packaged.face_encoder if packaged else None)


def _is_analysis(photo) -> bool:
    return isinstance(photo, FaceAnalysis)


def _analyse_photos(pipe, groups: list[list], names: list[str], analyzer, face_index) -> tuple[list[list], object]:
    """Per person: the analysed photos, identical ones once; warn about a photo unlike the person's others.

    Returns the people's photos and the analyzer used: the one given, else ``default_analyzer(pipe)`` when a
    photo needs one, else ``None`` (every photo came analysed).
    """
    if analyzer is None and any(not _is_analysis(p) for g in groups for p in g):
        analyzer = default_analyzer(pipe)
    people = []
    for name, group in zip(names, groups):
        kept = []
        for photo in group:
            a = photo if _is_analysis(photo) else analyzer(photo, face_index=face_index)
            same = next((k for k in kept if np.array_equal(k.embedding, a.embedding)), None)
            if same is not None:
                logger.info("%s: the same face as %s; <%s> counts it once.", a.path, same.path, name)
                continue
            kept.append(a)
        _warn_unlike(kept, name, analyzer.encoder if analyzer is not None else kept[0].encoder_name)
        people.append(kept)
    return people, analyzer


def _warn_unlike(photos: list, name: str, encoder) -> None:
    """Warn, naming the photo, when one photo's face is beyond the encoder's same-person threshold from the others."""
    threshold = same_person_threshold(encoder)
    for i, similarity in unlike_photos([a.embedding for a in photos], encoder):
        logger.warning("%s does not look like the other photos of <%s> (face similarity %.3f; %s counts %.2f or more "
                       "as the same person). If it shows someone else, leave it out of %s's photos.",
                       photos[i].path, name, similarity, getattr(encoder, "name", encoder), threshold, name)


def _train(trainer: Personalizer, total: int, show_progress: bool, callback, preview=None) -> float:
    """Run ``total`` steps, previews at the start and every quarter; returns the seconds taken (previews excluded)."""
    if total:
        logger.info("Training %s: %d steps at %d px on %s%s.", ", ".join(trainer.tokens), total, trainer.cfg.resolution,
                    trainer.device, f", from the pretrained {trainer.pretrained.name}" if trainer.pretrained else "")
    spent = 0.0
    if preview is not None:
        preview(0, trainer.identities())
    every = max(1, total // 4)
    bar = tqdm(range(total), desc="personalize", disable=not show_progress, unit="step")
    for step in bar:
        t0 = time.perf_counter()
        loss = trainer.step()
        spent += time.perf_counter() - t0
        if show_progress:
            bar.set_postfix(loss=f"{loss:.4f}")
        if callback is not None:
            callback(step + 1, total, loss)
        if preview is not None and ((step + 1) % every == 0 or step + 1 == total):
            preview(step + 1, trainer.identities())
    return spent


