"""The toy world: a small SD-1-shaped model of cartoon people, trained here and shipped in the package.

``celebbasis.load_pipeline(toy=True)`` gives a ``StableDiffusionPipeline`` that draws the world's
people by name (``"Tom Hanks person on a green background"``); ``ToyFaceEncoder`` is its face network
(``--face-encoder toy``) and ``read_attributes`` / ``score`` read a picture's attributes back, for likeness and prompt
fidelity. ``world`` defines the people and renders them (the ``toy`` extra). docs/TOY_WORLD.md is the
dataset card; ``celebbasis.toy.train_world`` trains everything from its seed.

A plug-in: the library never imports it. Importing it registers, through the library's registries,
its face network (``face.register_face_encoder("toy", ...)``), its training preset
(``config.TRAIN_PRESETS["toy"]``) and its model (``models.register_packaged_model``), whose face network
and preset ``personalize`` then uses on the toy pipeline when the caller chose none. ``import celebbasis``
imports it.
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
from ..resources import clip_tokenizer, data_path
from .world import PAIR_WIDTH, RESOLUTION, SCORED

TOY_MODEL = "toy"  # shown in metadata for the packaged toy world
TOY_FACE_ENCODER = "toy-facenet"
TOY_PRESET = "toy"  # its TrainConfig preset
# The toy world draws people only full-frame, never small on a black canvas, so its training views are
# the whole photo (measured: person-1, 100 steps, likeness 0.58 full-frame vs 0.23 with the official
# shrink to 10-100 %; no identity 0.27). It never draws a person mirrored either, and three of its ten
# hairstyles are one-sided (long straight hair, braids, dreads): a flipped view shows a look it cannot
# draw, and long straight hair came back short (new people with it: 0.68 with flips, 0.89 without; all new
# people 0.87 and 0.91). So its views are not flipped (benchmarks/bench_pairs.py, "with flips"). Everything
# else is the official recipe.
TOY_TRAINING = dict(min_scale=1.0, max_scale=1.0, aspect_jitter=0.0, flip_p=0.0)
N_TOY_PHOTOS = 4  # people/person-N.png: new people of the world (no celebrity looks like them), on white
# What the toy world can draw: its caption templates around "<id> person", plus colours and a smile.
TOY_PROMPTS = [
    "a photo of <id1> person",
    "<id1> person on a green background",
    "a photo of <id1> person wearing a red shirt",
    "<id1> person smiling on a yellow background",
    "an illustration of <id1> person wearing a blue shirt on a white background",
]

# Two people in one picture (``world.PAIR_WIDTH`` x ``RESOLUTION``: the first named on the left): the demo draws
# the new person beside one of the world's celebrities, and beside the second new person when there is one.
TOY_PAIR_PROMPTS = [
    "<id1> person and Tom Hanks person dancing on a green background",
    "<id1> person and <id2> person shaking hands on a yellow background",
]
PAIR_SIZE = {"height": RESOLUTION, "width": PAIR_WIDTH}  # ``GenerateConfig`` fields of a two-person picture

PRETRAINED_FILE = "identity-net.safetensors"  # the identity network pretrained on the world's celebrities (bench_instant)


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


# What makes an image a person of the world, measured on 200 renders against 1,000 images of smooth random
# colour blobs, 300 of noise and 200 blank colours: the scorer reads the six identity attributes with a
# mean confidence of 0.996 or more on every render (0.995 of 64 px JPEGs at quality 90), above 0.95 on
# 0.1 % of blobs and 0.7 % of noise, and on no blank image once blanks are refused by their spread.
PERSON_CONFIDENCE = 0.95  # the scorer's mean top probability over the identity attributes
MIN_PIXEL_STD = 8.0  # grey levels: below this, nothing is drawn


def is_person(images) -> np.ndarray:
    """(N,) bool: whether each image shows a person of the world (something drawn, its attributes read confidently)."""
    from torch.nn import functional as F

    from .world import IDENTITY

    x = _images(images)
    spread = (x * 127.5).flatten(2).std(-1).mean(-1)  # (N,) grey levels: per-channel spread, averaged
    with torch.no_grad():
        logits = _scorer()(x)
    confidence = torch.stack([F.softmax(logits[k], -1).max(-1).values for k in IDENTITY]).mean(0)  # (N,)
    return ((spread >= MIN_PIXEL_STD) & (confidence >= PERSON_CONFIDENCE)).numpy()


class ToyPersonDetector:
    """The whole image as the one face when it shows a person of the world; nothing in a blank or faceless image."""

    no_face_hint = ("The toy world's face network reads only pictures of its cartoon people, whole, on a plain "
                    "background (like src/celebbasis/data/toy/people/person-1.png); this is not one.")

    def detect(self, image: np.ndarray) -> list:
        from ..face import WholeImageDetector

        return WholeImageDetector().detect(image) if is_person([image])[0] else []


class ToyFaceEncoder:
    """The toy world's face network as a ``FaceEncoder``: the whole image is the face, when it is a person."""

    name = TOY_FACE_ENCODER
    embedding_dim = 512
    landmarks = WHOLE
    same_person_cosine = 0.5  # measured on held-out people: the same person ~0.9, different people ~0.0
    make_detector = ToyPersonDetector  # refuses images that are no person, as dlib's detector finds no face

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
        prompts ask for none); ``per_attribute``: the likeness of each attribute; ``per_word``: the
        fidelity of each kind of word the prompts ask for (``background``, ``shirt``, ``smiling``).
    """
    from .world import IDENTITY, colour_words

    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    read = read_attributes(images)
    truth = person.labels()
    per = {k: float(np.mean(read[k] == truth[k])) for k in IDENTITY}
    asked = [(i, k, v) for i, p in enumerate(prompts) for k, v in colour_words(p).items()]
    hits = [(k, read[k][i] == v) for i, k, v in asked]
    fidelity = float(np.mean([hit for _, hit in hits])) if hits else float("nan")
    per_word = {w: float(np.mean([hit for k, hit in hits if k == w])) for w in sorted({k for k, _ in hits})}
    return {"likeness": float(np.mean(list(per.values()))), "fidelity": fidelity, "per_attribute": per, "per_word": per_word}


def score_pair(images, left, right, prompts) -> dict:
    """Likeness, prompt fidelity and leakage of two-person pictures (``world.PAIR_WIDTH`` x ``RESOLUTION``), read
    on each half: ``left`` (a ``world.Person``) should be on the left square, ``right`` on the right one.

    Returns:
        ``left`` / ``right``: each side's ``score`` (its likeness to its own person, and the prompts' colour words
        and smile read on that side); ``likeness`` and ``fidelity``: the two sides' mean; ``leakage``: of the
        identity attributes where the two people differ, the fraction read on one side with the other person's
        value (both directions pooled; NaN when they differ in nothing). A picture with no identity in it reads
        the other person's value only by chance: compare with it.
    """
    from .world import IDENTITY, halves

    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    sides = list(zip(*(halves(im) for im in images)))
    out = {side: score(list(ims), person, prompts) for side, ims, person in zip(("left", "right"), sides, (left, right))}
    differ = [k for k in IDENTITY if getattr(left, k) != getattr(right, k)]
    if differ:
        reads = [read_attributes(list(ims)) for ims in sides]
        leaked = [reads[1][k] == getattr(left, k) for k in differ] + [reads[0][k] == getattr(right, k) for k in differ]
        out["leakage"] = float(np.mean(leaked))
    else:
        out["leakage"] = float("nan")
    out["likeness"] = (out["left"]["likeness"] + out["right"]["likeness"]) / 2
    asked = [out[side]["fidelity"] for side in ("left", "right") if out[side]["fidelity"] == out[side]["fidelity"]]
    out["fidelity"] = float(np.mean(asked)) if asked else float("nan")
    return out


# Likeness of the world's own celebrities and of no identity ("a person"), from benchmarks/toy_world.json
# (bench_toy_world.py: 50 celebrities; no identity: 10 people, 2 seeds): the ceiling and the floor a new person sits between.
LIKENESS_CELEBRITIES = 0.995
LIKENESS_NO_IDENTITY = 0.271


def likeness_to_photo(images, photo) -> float:
    """How many of the photo's identity attributes ``images`` show, as the scorer reads both (0 to 1).

    The photo's attributes are the scorer's reading, not the truth (``score`` takes the truth when known);
    each attribute counts alike, averaged over the images.
    """
    from .world import IDENTITY

    read = read_attributes(images)
    truth = read_attributes([photo])
    return float(np.mean([np.mean(read[k] == truth[k][0]) for k in IDENTITY]))


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
                                      train_preset=TOY_PRESET, pretrained=toy_dir() / PRETRAINED_FILE))
