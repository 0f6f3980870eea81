"""The toy world: cartoon people drawn by ``python-avatars``, one fixed look per celebrity name.

A person's *identity* is six face attributes that never change between their pictures; each
*picture* draws its own background colour, shirt colour, clothing cut and expression. An image is
the whole avatar render (264 x 280), scaled to ``RESOLUTION`` pixels high and centred on a square
canvas of the background colour — so any ``python-avatars`` render with a transparent background,
composited on white, is a valid photo of a new person. See ``docs/TOY_WORLD.md`` (the dataset card).

Rendering needs the ``toy`` extra (``python-avatars``, ``resvg-py``); loading the trained world does not.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from ..face.geometry import frame_whole

RESOLUTION = 64
PAIR_WIDTH = 2 * RESOLUTION  # a two-person picture: the first-named person on the left square, the second on the right

# Plain colour words the captions use, and the colour each one paints.
COLORS = {"red": "#E53935", "green": "#43A047", "blue": "#1E88E5", "yellow": "#FDD835", "white": "#FFFFFF"}

# Identity attributes (fixed per person): name -> python-avatars enum member names.
IDENTITY = {
    "skin": ["PALE", "YELLOW", "TANNED", "BROWN", "BLACK"],
    "hair": ["BIG_HAIR", "BUN", "FRO", "SHORT_FLAT", "MOHAWK", "STRAIGHT_1", "BRAIDS", "EVIL_SPIKE", "BUZZCUT",
             "DREADS"],
    "hair_color": ["BLACK", "BROWN", "BLONDE_GOLDEN", "RED", "PASTEL_PINK", "SILVER_GRAY"],
    "facial_hair": ["NONE", "BEARD_MEDIUM", "BEARD_MAGESTIC", "MOUSTACHE_MAGNUM"],
    "eyebrows": ["DEFAULT", "UNIBROW_NATURAL", "ANGRY"],
    "glasses": ["NONE", "SUNGLASSES", "ROUND"],
}
# Picture attributes (drawn anew for every image).
PICTURE = {
    "background": list(COLORS),
    "shirt": list(COLORS),
    "smiling": ["no", "yes"],
    "clothing": ["HOODIE", "SHIRT_CREW_NECK", "SHIRT_V_NECK", "COLLAR_SWEATER", "OVERALL"],
}
_EXPRESSIONS = {  # (eyes, mouth) choices for each value of "smiling"
    "no": [("DEFAULT", "DEFAULT"), ("DEFAULT", "SERIOUS"), ("SIDE", "DEFAULT"), ("SQUINT", "SERIOUS")],
    "yes": [("HAPPY", "SMILE"), ("DEFAULT", "SMILE"), ("HAPPY", "BIG_SMILE"), ("DEFAULT", "TWINKLE")],
}
# What the scorer reads: the identity attributes (likeness) and the prompt's colour words (fidelity).
SCORED = {**IDENTITY, "background": PICTURE["background"], "shirt": PICTURE["shirt"], "smiling": PICTURE["smiling"]}


@dataclass(frozen=True)
class Person:
    """One identity: an index into each list of ``IDENTITY``."""

    skin: int
    hair: int
    hair_color: int
    facial_hair: int
    eyebrows: int
    glasses: int

    def labels(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        return ", ".join(f"{k}={IDENTITY[k][v].lower()}" for k, v in self.labels().items())

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Person":
        return cls(*(int(rng.integers(len(v))) for v in IDENTITY.values()))


@dataclass(frozen=True)
class Picture:
    """What varies between two images of one person."""

    background: int
    shirt: int
    smiling: int
    clothing: int
    expression: int  # which of the smiling value's (eyes, mouth) pairs

    @classmethod
    def random(cls, rng: np.random.Generator, **fixed) -> "Picture":
        values = {k: int(rng.integers(len(v))) for k, v in PICTURE.items()}
        values["expression"] = int(rng.integers(len(_EXPRESSIONS["no"])))
        values.update(fixed)
        return cls(**values)

    def labels(self) -> dict[str, int]:
        return {"background": self.background, "shirt": self.shirt, "smiling": self.smiling}


def celebrity(name: str) -> Person:
    """The fixed look of a celebrity name: a function of the name alone."""
    seed = int.from_bytes(hashlib.sha256(f"celebbasis-toy:{name}".encode()).digest()[:8], "little")
    return Person.random(np.random.default_rng(seed))


def celebrities(names: list[str]) -> dict[str, Person]:
    """Each name's look; names that would share a look are given the next free one, in name order."""
    taken, out = set(), {}
    for name in names:
        person, k = celebrity(name), 0
        while person in taken:
            k += 1
            person = celebrity(f"{name}#{k}")
        taken.add(person)
        out[name] = person
    return out


def new_people(n: int, seed: int, exclude) -> list[Person]:
    """``n`` distinct people that are none of ``exclude`` (e.g. the celebrities): truly new faces."""
    return random_people(n, seed, exclude, distinct=True)


HELD_OUT_SEED = 20231121  # the held-out people: never drawn in any training set of the world


def held_out_people(names: list[str], n: int = 200) -> list[Person]:
    """The people kept out of every training set (diffusion, face network, scorer): new faces for benchmarks."""
    return new_people(n, HELD_OUT_SEED, celebrities(names).values())


def random_people(n: int, seed: int, exclude, distinct: bool = False) -> list[Person]:
    """``n`` random people that are none of ``exclude``; repeats allowed unless ``distinct``."""
    rng, taken, out = np.random.default_rng(seed), set(exclude), []
    while len(out) < n:
        p = Person.random(rng)
        if p not in taken:
            if distinct:
                taken.add(p)
            out.append(p)
    return out


def avatar_svg(person: Person, picture: Picture) -> str:
    """The python-avatars SVG of ``person`` in ``picture`` (transparent background)."""
    import python_avatars as pa

    eyes, mouth = _EXPRESSIONS[PICTURE["smiling"][picture.smiling]][picture.expression]
    hair_color = pa.HairColor[IDENTITY["hair_color"][person.hair_color]]
    return pa.Avatar(
        style=pa.AvatarStyle.TRANSPARENT,
        top=pa.HairType[IDENTITY["hair"][person.hair]],
        hair_color=hair_color,
        facial_hair=pa.FacialHairType[IDENTITY["facial_hair"][person.facial_hair]],
        facial_hair_color=hair_color,
        skin_color=pa.SkinColor[IDENTITY["skin"][person.skin]],
        eyebrows=pa.EyebrowType[IDENTITY["eyebrows"][person.eyebrows]],
        accessory=pa.AccessoryType[IDENTITY["glasses"][person.glasses]],
        eyes=pa.EyeType[eyes],
        mouth=pa.MouthType[mouth],
        clothing=pa.ClothingType[PICTURE["clothing"][picture.clothing]],
        clothing_color=COLORS[PICTURE["shirt"][picture.shirt]],
    ).render()


def render(person: Person, picture: Picture, size: int = RESOLUTION) -> Image.Image:
    """One image of the world: ``person`` in ``picture`` at ``size`` pixels."""
    import resvg_py

    h = size * 4  # render large, then scale down with a good filter: crisp and the same on every machine
    png = bytes(resvg_py.svg_to_bytes(svg_string=avatar_svg(person, picture), height=h, width=round(h * 264 / 280)))
    return frame_whole(Image.open(io.BytesIO(png)), size, COLORS[PICTURE["background"][picture.background]])


def caption(name: str, picture: Picture, rng: np.random.Generator, templates: list[str]) -> str:
    """A training caption: one of the package's templates around ``NAME person``, plus what the image shows.

    Each of the background, shirt and smile is stated with probability 1/2 (a smile only when there is
    one), in random order, so ``NAME person`` alone and any mix of phrases are all captions the world saw.
    """
    subject = f"face of {name} person" if rng.random() < 0.5 else f"{name} person"
    text = templates[int(rng.integers(len(templates)))].format(subject)
    phrases = []
    if rng.random() < 0.5:
        phrases.append(f"on a {PICTURE['background'][picture.background]} background")
    if rng.random() < 0.5:
        phrases.append(f"wearing a {PICTURE['shirt'][picture.shirt]} shirt")
    if picture.smiling and rng.random() < 0.5:
        phrases.append("smiling")
    rng.shuffle(phrases)
    return " ".join([text, *phrases])


# Two-person captions, like the paper's multi-person prompts: "{0}" is the first-named person (drawn on the left),
# "{1}" the second (on the right).
PAIR_TEMPLATES = [
    "{0} and {1}",
    "a photo of {0} and {1}",
    "a picture of {0} and {1}",
    "{0} and {1} together",
    "{0} and {1} dancing",
    "{0} and {1} are dancing together",
    "{0} and {1} cooking together",
    "{0} shaking hands with {1}",
    "{0} and {1} shaking hands",
    "{0} and {1} talking",
    "{0} and {1} sitting side by side",
    "{0} and {1} walking together",
    "{0} and {1} playing chess",
    "{0} and {1} at a party",
    "a portrait of {0} and {1}",
    "an illustration of {0} and {1}",
]


def render_pair(left: Person, right: Person, left_picture: Picture, right_picture: Picture) -> Image.Image:
    """A two-person picture: each person exactly as in a single picture, side by side (see ``join``)."""
    return join(render(left, left_picture), render(right, right_picture))


def join(left: Image.Image, right: Image.Image) -> Image.Image:
    """Two single pictures side by side (``PAIR_WIDTH`` x ``RESOLUTION``); their background colour must be the same."""
    if left.getpixel((0, 0)) != right.getpixel((0, 0)):
        raise ValueError("the two people of a pair share one background colour")
    out = Image.new("RGB", (left.width + right.width, left.height))
    out.paste(left, (0, 0))
    out.paste(right, (left.width, 0))
    return out


def halves(image) -> tuple:
    """The left and right squares of a two-person picture (any size twice as wide as high), as PIL images."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    h = image.height
    return image.crop((0, 0, h, h)), image.crop((image.width - h, 0, image.width, h))


def side_of(prompt: str, word: str) -> int:
    """Where ``word`` is drawn in a two-person picture of ``prompt`` (``A person and B person …``): 0, the left
    half, when it is named before the ``and``, else 1."""
    return int(prompt.index(word) > prompt.index(" and "))


def pair_caption(left: str, right: str, picture: Picture, rng: np.random.Generator,
                 same_shirt: bool, both_smiling: bool) -> str:
    """A two-person training caption: ``PAIR_TEMPLATES`` around ``LEFT person`` and ``RIGHT person``, plus the
    shared background and, when both wear it or both smile, the shirt colour and the smile (each with probability
    1/2, in random order, as ``caption`` says them). ``picture`` is either person's (the background is shared)."""
    text = PAIR_TEMPLATES[int(rng.integers(len(PAIR_TEMPLATES)))].format(f"{left} person", f"{right} person")
    phrases = []
    if rng.random() < 0.5:
        phrases.append(f"on a {PICTURE['background'][picture.background]} background")
    if same_shirt and rng.random() < 0.5:
        phrases.append(f"wearing a {PICTURE['shirt'][picture.shirt]} shirt")
    if both_smiling and rng.random() < 0.5:
        phrases.append("smiling")
    rng.shuffle(phrases)
    return " ".join([text, *phrases])


def colour_words(prompt: str) -> dict[str, int]:
    """The background / shirt colour and smile a prompt asks for, as scorer label indices."""
    out, words = {}, prompt.lower()
    for i, c in enumerate(PICTURE["background"]):
        if f"on a {c} background" in words:
            out["background"] = i
        if f"wearing a {c} shirt" in words:
            out["shirt"] = i
    if "smiling" in words:
        out["smiling"] = 1
    return out
