"""The prompts file: one prompt a line, optionally with its category and negative prompt.

Each line is ``PROMPT``, ``CATEGORY<TAB>PROMPT`` or ``CATEGORY<TAB>PROMPT<TAB>NEGATIVE``
(``celebbasis benchmark-prompts`` writes the paper's protocol this way; ``generate --prompts-file``
draws it; ``evaluate --prompts`` scores by it). Blank lines and lines starting with ``#`` are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import InputError


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
