"""The words the package writes and reads: prompts files, training captions, the paper's protocol prompts.

- The prompts file: one prompt a line, ``PROMPT``, ``CATEGORY<TAB>PROMPT`` or
  ``CATEGORY<TAB>PROMPT<TAB>NEGATIVE`` (``celebbasis benchmark-prompts`` writes the paper's protocol
  this way; ``generate --prompts-file`` draws it; ``evaluate --prompts`` scores by it). Blank lines
  and lines starting with ``#`` are skipped.
- Training captions: the official code's 81 templates around "face of <alice> person" (``caption``).
- The protocol: the paper's four categories, with the official evaluation's prompts (CelebBasis
  ``infer_images/exp_*.txt``, shipped in ``data/paper_prompts/``) and negative prompts
  (``evaluation/prompt_templates.py``).
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import InputError
from .resources import celeb_names, data_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptLine:
    """One line of a prompts file: ``PROMPT``, ``CATEGORY<TAB>PROMPT`` or ``CATEGORY<TAB>PROMPT<TAB>NEGATIVE``.

    Attributes:
        prompt: the text to draw, with ``<name>`` identity words.
        category: one of ``CATEGORIES`` (or any label), ``None`` when the line has none.
        negative_prompt: what the image should not show, ``None`` when the line has none.
    """

    prompt: str
    category: str | None = None
    negative_prompt: str | None = None


def negatives_for(lines: list[PromptLine], default: str | None = None) -> list[str | None]:
    """Each line's negative prompt, ``default`` where the line has none: ``generate``'s per-prompt ``negative_prompt``."""
    return [line.negative_prompt if line.negative_prompt is not None else default for line in lines]


def prompt_file_text(lines: list[PromptLine]) -> str:
    """Prompt lines as a prompts file: ``CATEGORY<TAB>PROMPT[<TAB>NEGATIVE]``, or ``PROMPT`` alone."""
    out = []
    for line in lines:
        fields = [line.prompt]
        if line.category is not None or line.negative_prompt is not None:
            fields.insert(0, line.category or "")
        if line.negative_prompt is not None:
            fields.append(line.negative_prompt)
        if any("\t" in f or "\n" in f for f in fields):
            raise InputError(f"Prompt line {fields!r} holds a tab or a line break; a prompts file cannot store it.")
        out.append("\t".join(fields) + "\n")
    return "".join(out)


def read_prompt_file(path) -> list[PromptLine]:
    """Read a prompts file: one ``PromptLine`` per line.

    Each line is ``PROMPT``, ``CATEGORY<TAB>PROMPT`` or ``CATEGORY<TAB>PROMPT<TAB>NEGATIVE``;
    empty fields count as absent. Category and prompt are stripped of spaces, the negative prompt
    is kept as written. Blank lines and lines starting with ``#`` are skipped.

    Raises:
        InputError: no such file, not UTF-8 text, a line with more than three fields or no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such prompts file. Pass a text file with one prompt a line.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text. Save the prompts file as UTF-8.") from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) > 3:
            raise InputError(f"{path}, line {number}: {len(fields)} tab-separated fields. "
                             "Use PROMPT, CATEGORY<TAB>PROMPT or CATEGORY<TAB>PROMPT<TAB>NEGATIVE.")
        if len(fields) == 1:
            fields = [None, fields[0]]
        category, prompt, negative = (fields + [None])[:3]
        category, prompt = category and category.strip(), prompt.strip()
        negative = negative if negative and negative.strip() else None  # kept verbatim: the official ones end in ", "
        if not prompt:
            raise InputError(f"{path}, line {number} has no prompt. Use CATEGORY<TAB>PROMPT[<TAB>NEGATIVE].")
        out.append(PromptLine(prompt, category or None, negative))
    return out


# -- training captions -----------------------------------------------------------------------------

# The official caption templates (ldm/data/face_id.py, ``imagenet_templates_small``), repeats and order kept.
TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
    "an illustration of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "an illustration of a clean {}",
    "an illustration of a dirty {}",
    "a dark photo of the {}",
    "an illustration of my {}",
    "an illustration of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "an illustration of the {}",
    "a good photo of the {}",
    "an illustration of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "an illustration of the clean {}",
    "a rendition of a {}",
    "an illustration of a nice {}",
    "a good photo of a {}",
    "an illustration of the nice {}",
    "an illustration of the small {}",
    "an illustration of the weird {}",
    "an illustration of the large {}",
    "an illustration of a cool {}",
    "an illustration of a small {}",
    "a depiction of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a depiction of a clean {}",
    "a depiction of a dirty {}",
    "a dark photo of the {}",
    "a depiction of my {}",
    "a depiction of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a depiction of the {}",
    "a good photo of the {}",
    "a depiction of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a depiction of the clean {}",
    "a rendition of a {}",
    "a depiction of a nice {}",
    "a good photo of a {}",
    "a depiction of the nice {}",
    "a depiction of the small {}",
    "a depiction of the weird {}",
    "a depiction of the large {}",
    "a depiction of a cool {}",
    "a depiction of a small {}",
]


def caption(template: int, token: str) -> str:
    """Training caption number ``template`` (of ``TEMPLATES``) for a person's token.

    Example:
        >>> caption(0, "<alice>")
        'a photo of a face of <alice> person'
    """
    return TEMPLATES[template].format(f"face of {token} person")


# -- the paper's protocol prompts ------------------------------------------------------------------

CATEGORIES = ("style", "single action", "with a celebrity", "two identities")

# The official evaluation's negative prompts, copied verbatim from CelebBasis (557531b)
# evaluation/prompt_templates.py, missing commas between some lines included.
_STYLE_NEGATIVE = "blurry face, overexpose, highlight on face, " \
                  "only eyes, extra fingers, fewer fingers, divider line, "
_ACTION_SINGLE_NEGATIVE = "only object, only person, close-up, no face, only head, no hand, no upper body, " \
                          "blurry face, with beard, old, " \
                          "overexpose, naked, multiple persons, " \
                          "paintings, highlight on face, high contrast ratio, " \
                          "only eyes, extra fingers, fewer fingers, " \
                          "grayscale, monochrome, normal quality, " \
                          "skin spots, acnes, skin blemishes, age spot, glans, " \
                          "bad hands, missing fingers, missing arms, extra arms, malformed limbs, " \
                          "fused fingers, too many fingers, mutated hands, multi nipples, " \
                          "missing legs, extra legs, extra digit, fewer digits," \
                          "bad anatomy, text, error, cross-eyed, polar lowres" \
                          "blurry, poorly drawn hands, poorly drawn face, mutation, deformed" \
                          "EasyNegative, bad proportion body to legs, " \
                          "big head, wrong toes, extra toes, missing toes, weird toes"
_ACTION_TWO_NEGATIVE = "blurry face, blurry eyes, mixed faces, close-up, only object, only background, no hand, " \
                       "overexpose, fat face, " \
                       "no person, single person, no upper body, only face, only eyes, " \
                       "no face, only head, extra fingers, fewer fingers, " \
                       "highlight on face, high contrast ratio, " \
                       "grayscale, monochrome, paintings, normal quality, " \
                       "skin spots, acnes, skin blemishes, age spot, glans, " \
                       "bad hands, missing fingers, missing arms, extra arms, malformed limbs, " \
                       "fused fingers, too many fingers, mutated hands, multi nipples, " \
                       "missing legs, extra legs, extra digit, fewer digits," \
                       "bad anatomy, text, error, cross-eyed, polar lowres" \
                       "blurry, poorly drawn hands, poorly drawn face, mutation, deformed" \
                       "EasyNegative, bad proportion body to legs, " \
                       "big head, wrong toes, extra toes, missing toes, weird toes" \
                       "aged up, old,"
# The official code picks a template by file name: style -> style, single -> action_single,
# celeb and two -> action_two.
NEGATIVE_PROMPTS = {
    "style": _STYLE_NEGATIVE,
    "single action": _ACTION_SINGLE_NEGATIVE,
    "with a celebrity": _ACTION_TWO_NEGATIVE,
    "two identities": _ACTION_TWO_NEGATIVE,
}
# Celebrities the example and benchmark prompts use that the basis name list lacks.
_PROMPT_CELEBRITIES = ("Barack Obama", "Emma Watson")
_STYLE_WORDS = ("painting", "sketch", "style", "drawing", "watercolor", "watercolour", "anime", "cartoon", "illustration",
                "render", "pixel art", "mosaic", "pop art", "ukiyo-e", "comic", "statue", "sculpture", "oil")


# The official evaluation's prompt file per category (CelebBasis 557531b infer_images/, shipped
# verbatim in data/paper_prompts/): "sks" is the first person, "ks" the second. The style prompts
# are all of two people.
PAPER_PROMPT_FILES = {
    "style": "exp_two_style.txt",
    "single action": "exp_action_single.txt",
    "with a celebrity": "exp_action_celeb.txt",
    "two identities": "exp_action_two.txt",
}
_OFFICIAL_PLACEHOLDER = re.compile(r"\b(sks|ks)\b")


@lru_cache(maxsize=None)
def paper_prompts(category: str) -> tuple[str, ...]:
    """The official evaluation's prompts for one of ``CATEGORIES``, as written there (``sks``, ``ks``)."""
    try:
        name = PAPER_PROMPT_FILES[category]
    except KeyError:
        raise InputError(f"Unknown prompt category {category!r}. Use one of: {', '.join(CATEGORIES)}.") from None
    lines = data_path(f"paper_prompts/{name}").read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def _fill(prompt: str, first: str, second: str | None = None) -> str:
    """An official prompt with ``sks`` -> ``first`` and ``ks`` -> ``second``: ``sks person`` -> ``<alice> person``."""
    return _OFFICIAL_PLACEHOLDER.sub(lambda m: first if m.group(1) == "sks" else second, prompt)


@lru_cache(maxsize=1)
def _paper_categories() -> dict[str, str]:
    """Every official prompt, its people as ``<>``, -> its category."""
    return {_fill(p, "<>", "<>"): c for c in CATEGORIES for p in paper_prompts(c)}


def categorize(prompt: str, n_identities: int) -> str:
    """One of the paper's four prompt categories: an official evaluation prompt's own, else guessed."""
    official = _paper_categories().get(re.sub(r"<[^<>\s]+>", "<>", prompt.strip()))
    if official is not None:
        return official
    if n_identities >= 2:
        return "two identities"
    low = prompt.lower()
    if any(name.lower() in low for name in (*celeb_names(), *_PROMPT_CELEBRITIES)):
        return "with a celebrity"
    if any(w in low for w in _STYLE_WORDS):
        return "style"
    return "single action"


def negative_prompt_for(category: str) -> str:
    """The official evaluation's negative prompt for one of the paper's ``CATEGORIES``.

    Example:
        >>> negative_prompt_for("style")
        'blurry face, overexpose, highlight on face, only eyes, extra fingers, fewer fingers, divider line, '
    """
    try:
        return NEGATIVE_PROMPTS[category]
    except KeyError:
        raise InputError(f"Unknown prompt category {category!r}. Use one of: {', '.join(CATEGORIES)}.") from None


def benchmark_prompt_lines(names: list[str]) -> list[PromptLine]:
    """The paper's protocol prompts for the given identities, each with its category's official negative prompt.

    Example:
        >>> Path("benchmark_prompts.txt").write_text(prompt_file_text(benchmark_prompt_lines(["alice"])))
    """
    return [PromptLine(p, c, negative_prompt_for(c)) for c, p in benchmark_prompts(names)]


def benchmark_prompts(names: list[str]) -> list[tuple[str, str]]:
    """The official evaluation's prompts for the given identities: (category, prompt) pairs.

    Category by category (``CATEGORIES``' order), the official prompt files with ``sks`` -> the
    identity and ``ks`` -> the second one: ``a sks person on the beach`` -> ``a <alice> person on
    the beach``. Prompts of one person are written for every name, prompts of two (all of "style"
    and "two identities") for every pair of names, first name first; person by person, then in the
    official files' order. With one name there are no two-person prompts (a warning says so).
    ``negative_prompt_for(category)`` gives each one's negative prompt; ``benchmark_prompt_lines``
    gives both together.
    """
    if not names:
        raise InputError("Pass at least one identity name for the benchmark prompts.")
    tokens = [f"<{n.strip('<>')}>" for n in names]
    pairs = list(itertools.combinations(tokens, 2))
    if not pairs:
        logger.warning("The official style and two-identity prompts each show two people: pass two or more names "
                       "to get them. Writing the single-action and celebrity prompts only.")
    out = []
    for category in CATEGORIES:
        prompts = paper_prompts(category)
        for two, groups in ((False, [(t,) for t in tokens]), (True, pairs)):
            for people in groups:
                out += [(category, _fill(p, *people)) for p in prompts if _needs_two(p) == two]
    return out


def _needs_two(prompt: str) -> bool:
    """Whether an official prompt shows a second person (``ks``)."""
    return any(m.group(1) == "ks" for m in _OFFICIAL_PLACEHOLDER.finditer(prompt))
