"""The toy world: a small SD-1-shaped model of cartoon people, trained here and shipped in the package.

``celebbasis.load_pipeline(toy=True)`` gives a ``StableDiffusionPipeline`` that draws the world's
people by name (``"Tom Hanks person on a green background"``); ``ToyFaceEncoder`` is its face network
(``--face-encoder toy``) and ``read_attributes`` / ``score`` read a picture's attributes back, for likeness and prompt
fidelity. ``world`` defines the people and renders them (the ``toy`` extra). docs/TOY_WORLD.md is the
dataset card; ``celebbasis.toy.train_world`` trains everything from its seed.

A plug-in: the library never imports it. Importing it registers, through the library's registries,
its face network (``face.register_face_encoder("toy", ...)``), its training preset
(``config.TRAIN_PRESETS["toy"]``), its model (``models.register_packaged_model``), whose face network
and preset ``personalize`` then uses on the toy pipeline when the caller chose none, and where its
pretrained identity network is (``pretrain.register_pretrained``). ``import celebbasis`` imports it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..config import TRAIN_PRESETS
from ..errors import ModelLoadError
from ..face import WHOLE, register_face_encoder
from ..face.geometry import frame_whole
from ..models import PackagedModel, register_packaged_model
from ..pretrain import register_pretrained
from ..resources import clip_tokenizer, data_path
from .world import RESOLUTION, SCORED

TOY_MODEL = "toy"  # shown in metadata for the packaged toy world
TOY_FACE_ENCODER = "toy-facenet"
TOY_PRESET = "toy"  # its TrainConfig preset
# The toy world draws people only full-frame, never small on a black canvas, so its training views are
# the whole photo (measured: person-1, 100 steps, likeness 0.58 full-frame vs 0.23 with the official
# shrink to 10-100 %; no identity 0.27). Everything else is the official recipe.
TOY_TRAINING = dict(min_scale=1.0, max_scale=1.0, aspect_jitter=0.0)
N_TOY_PHOTOS = 4  # people/person-N.png: new people of the world (no celebrity looks like them), on white
# What the toy world can draw: its caption templates around "<id> person", plus colours and a smile.
TOY_PROMPTS = [
    "a photo of <id1> person",
    "<id1> person on a green background",
    "a photo of <id1> person wearing a red shirt",
    "<id1> person smiling on a yellow background",
    "an illustration of <id1> person wearing a blue shirt on a white background",
]


PRETRAINED_FILE = "identity-net.safetensors"  # the identity network pretrained on the world's celebrities


def pretrained_network(pipe) -> Path | None:
    """The toy world's pretrained identity network, for a pipeline of the toy world (``pretrained="auto"``)."""
    from ..models import model_name

    path = toy_dir() / PRETRAINED_FILE
    return path if model_name(pipe) == TOY_MODEL and path.exists() else None


def toy_dir() -> Path:
    """The packaged toy world's folder (``pipeline/``, ``facenet.safetensors``, ``scorer.safetensors``)."""
    return data_path("toy")


def require(path: Path) -> Path:
    if not path.exists():
        raise ModelLoadError(f"The toy world's {path.name} is missing from {path.parent}. Reinstall celebbasis, or "
                             "train it with: bash scripts/train-toy-world.sh")
    return path


def toy_photo(i: int = 0) -> Path:
    """A packaged photo of a new person of the toy world (``0 <= i < N_TOY_PHOTOS``), for the demo and tests."""
    return require(toy_dir() / "people" / f"person-{i}.png")


def world_info() -> dict:
    """How the packaged world was trained (``pipeline/world.json``)."""
    return json.loads(require(toy_dir() / "pipeline" / "world.json").read_text(encoding="utf-8"))


def _load_net(net: torch.nn.Module, name: str) -> torch.nn.Module:
    from safetensors.torch import load_file

    state = {k: v.float() for k, v in load_file(str(require(toy_dir() / name))).items()}
    net.load_state_dict(state, strict=False)  # BatchNorm's step counters are not stored
    return net.eval().requires_grad_(False)


def _images(images) -> torch.Tensor:
    """PIL images or (H, W, 3) uint8 arrays, any size, -> the networks' (N, 3, 64, 64) input."""
    from PIL import Image

    from .nets import to_tensor

    pics = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]
    pics = [im.convert("RGB") if im.size == (RESOLUTION, RESOLUTION) else frame_whole(im, RESOLUTION) for im in pics]
    return to_tensor(pics)


class ToyFaceEncoder:
    """The toy world's face network as a ``FaceEncoder``: the whole image is the face."""

    name = TOY_FACE_ENCODER
    embedding_dim = 512
    landmarks = WHOLE
    same_person_cosine = 0.5  # measured on held-out people: the same person ~0.9, different people ~0.0

    def __init__(self):
        from .nets import ToyFaceNet

        self.net = _load_net(ToyFaceNet(), "facenet.safetensors")

    def align(self, image: np.ndarray, face) -> np.ndarray:
        from PIL import Image

        return np.asarray(frame_whole(Image.fromarray(image), RESOLUTION))

    @torch.no_grad()
    def embed(self, aligned: np.ndarray) -> np.ndarray:
        return self.embed_many([aligned])[0]

    @torch.no_grad()
    def embed_many(self, images) -> np.ndarray:
        return self.net(_images(images)).numpy().astype(np.float32)


@lru_cache(maxsize=1)
def _scorer():
    from .nets import ToyScorer

    return _load_net(ToyScorer(), "scorer.safetensors")


@torch.no_grad()
def read_attributes(images) -> dict[str, np.ndarray]:
    """The scorer's reading of each image: attribute -> (N,) class indices (see ``world.SCORED``)."""
    x = _images(images)
    out = {k: [] for k in SCORED}
    for i in range(0, len(x), 256):
        for k, v in _scorer()(x[i:i + 256]).items():
            out[k].append(v.argmax(-1).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def score(images, person, prompts) -> dict[str, float]:
    """Likeness and prompt fidelity of generated images, read by the scorer.

    Args:
        images: the generated images (PIL or uint8 arrays).
        person: the ``world.Person`` they should show.
        prompts: each image's prompt (one string for all), for the colour words and smile it asks for.

    Returns:
        ``likeness``: the fraction of identity attributes read right (each of the six counts alike);
        ``fidelity``: the fraction of the prompts' colour words and smiles read right (NaN when the
        prompts ask for none); ``per_attribute``: the likeness of each attribute.
    """
    from .world import IDENTITY, colour_words

    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    read = read_attributes(images)
    truth = person.labels()
    per = {k: float(np.mean(read[k] == truth[k])) for k in IDENTITY}
    asked = [(i, k, v) for i, p in enumerate(prompts) for k, v in colour_words(p).items()]
    fidelity = float(np.mean([read[k][i] == v for i, k, v in asked])) if asked else float("nan")
    return {"likeness": float(np.mean(list(per.values()))), "fidelity": fidelity, "per_attribute": per}


def load_toy_pipeline(device: torch.device, dtype: torch.dtype):
    """The packaged toy world as a ``StableDiffusionPipeline`` with the package's CLIP tokenizer (``load_pipeline(toy=True)``)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(require(toy_dir() / "pipeline")), tokenizer=clip_tokenizer(),
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.register_to_config(_name_or_path=TOY_MODEL)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):  # stored in float16; each part as asked
        module.to(device)
        if module.dtype != dtype:
            module.to(dtype=dtype)
    return pipe


# The plug-in's entries in the library's registries.
register_face_encoder("toy", ToyFaceEncoder)
TRAIN_PRESETS[TOY_PRESET] = TOY_TRAINING
register_packaged_model(PackagedModel(TOY_MODEL, "the toy world", load_toy_pipeline, face_encoder="toy",
                                      train_preset=TOY_PRESET))
register_pretrained(pretrained_network)
