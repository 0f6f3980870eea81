"""Files shipped inside the package: the celebrity names, CLIP's BPE vocabulary, a face photo.

The BPE vocabulary turns into a ``transformers.CLIPTokenizer`` that tokenizes exactly as
Stable Diffusion 1.x does ("sks" -> 48136), so tests and the tiny model need no download.
"""

from __future__ import annotations

import gzip
import hashlib
from functools import lru_cache
from importlib import resources
from pathlib import Path

_DATA = resources.files("celebbasis") / "data"

NAMES_FILE = "celeb_names.txt"
BPE_FILE = "clip_bpe_simple_vocab_16e6.txt.gz"
PROMPTS_FILE = "example_prompts.txt"
FACE_FILE = "faces/astronaut.png"

CLIP_MAX_LENGTH = 77
_N_MERGES = 49152 - 256 - 2  # as in OpenAI's CLIP tokenizer: 48,894 merges


def data_path(name: str) -> Path:
    """Path of a packaged data file (the package is installed unzipped)."""
    return Path(str(_DATA / name))


def celeb_names() -> list[str]:
    """The packaged celebrity names: sorted, de-duplicated, no blank lines (646 names)."""
    return normalize_names(data_path(NAMES_FILE).read_text(encoding="utf-8").splitlines())


def normalize_names(names) -> list[str]:
    """Strip, drop blanks, de-duplicate and sort names (METHOD §1 step 1)."""
    return sorted({n.strip() for n in names if n and n.strip()})


def names_sha256(names: list[str]) -> str:
    """SHA-256 of the normalized name list, one name a line (recorded in every basis file)."""
    return hashlib.sha256("\n".join(normalize_names(names)).encode("utf-8")).hexdigest()


def example_prompts() -> list[str]:
    """The packaged example prompts; ``<id1>``/``<id2>`` stand for identities."""
    lines = data_path(PROMPTS_FILE).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def example_face() -> Path:
    """Path of the packaged public-domain face photo (Eileen Collins, NASA portrait)."""
    return data_path(FACE_FILE)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    with gzip.open(data_path(BPE_FILE), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : _N_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """Stable Diffusion 1.x's CLIP tokenizer, built offline from the packaged BPE vocabulary.

    Args:
        pad_token: ``"<|endoftext|>"`` as in SD 1.x; OpenCLIP models (SD 2.x) pad with ``"!"``.

    Returns:
        A ``transformers.CLIPTokenizer`` with 49,408 tokens and ``model_max_length`` 77.

    Example:
        >>> clip_tokenizer()("sks", add_special_tokens=False).input_ids
        [48136]
    """
    import tempfile
    import json

    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tok = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)
    return tok
