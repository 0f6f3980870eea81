"""What a run gives back: its identities, written together (``PersonalizeResult``), and its record (``NAME.run.json``)."""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from ..errors import InputError
from ..files import check_new_file, write_all
from ..identity import Identity
from .trainer import Personalizer

logger = logging.getLogger(__name__)


@dataclass
class PersonalizeResult:
    """What ``personalize`` returns: the identities and a record of the run."""

    identities: list[Identity]
    losses: list[float]
    run: dict = field(default_factory=dict)

    def save(self, out_dir, overwrite: bool = False) -> list[Path]:
        """Write ``NAME.safetensors`` and ``NAME.run.json`` for each identity into ``out_dir``: all or none.

        Every target is checked first; the files are written beside their targets under temporary
        names and renamed into place only when all of them were written. Files being overwritten are
        set aside first and put back if any rename fails, so the folder ends either all old or all new.
        """
        out_dir = Path(out_dir)
        writers = {}
        text = json.dumps(self.run, indent=2, sort_keys=True)
        for ident in self.identities:
            path, run_path = out_dir / f"{ident.name}.safetensors", out_dir / f"{ident.name}.run.json"
            writers[check_new_file(path, overwrite)] = ident.save
            writers[check_new_file(run_path, overwrite=True)] = lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"Cannot create {out_dir} ({e.strerror or e}). Choose another folder.") from None
        return write_all(writers)[::2]


def photo_agreement(vectors: np.ndarray) -> list[float]:
    """(n, f) unit face vectors of one person -> each one's cosine to their normalised mean."""
    mean = vectors.mean(0)
    mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return [float(v @ mean) for v in vectors]



def log_summary(trainer: Personalizer, total: int, elapsed: float) -> None:
    window = max(1, min(50, total // 4))
    if total == 0:
        logger.info("%s: the pretrained network's instant identity (no training steps).", ", ".join(trainer.tokens))
        return
    if total < 4:  # too short for two windows
        logger.info("Learned %s in %d step(s) (%.1f s); last loss %.4f.", ", ".join(trainer.tokens), total, elapsed,
                    float(trainer.losses[-1]))
        return
    logger.info("Learned %s in %d steps (%.1f s); mean loss %.4f over the first %d steps, %.4f over the last %d "
                "(the whole curve is in the run record).", ", ".join(trainer.tokens), total, elapsed,
                float(np.mean(trainer.losses[:window])), window, float(np.mean(trainer.losses[-window:])), window)


def run_record(trainer: Personalizer, names: list[str], total: int, elapsed: float) -> dict:
    """What ``NAME.run.json`` holds: versions, settings, photos and how well each agrees with its person, losses."""
    agreement = {
        name: [{"photo": a.path, "cosine_to_mean": round(c, 4)}
               for a, c in zip(photos, photo_agreement(np.stack([a.embedding for a in photos]).astype(np.float64)))]
        for name, photos in zip(names, trainer.people)
    }
    return {
        "celebbasis_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "base_model": trainer.base_model,
        "names": names,
        "photos": {name: [a.path for a in photos] for name, photos in zip(names, trainer.people)},
        "photo_agreement": agreement,
        "face_encoder": trainer.face_encoder_name,
        "face_vectors": "per view" if trainer.face_net is not None else "per photo",
        "config": {**asdict(trainer.cfg), "steps": total},
        "seed": trainer.cfg.seed,
        "device": str(trainer.device),
        "seconds": round(elapsed, 3),
        "losses": [round(x, 6) for x in trainer.losses],
    }
