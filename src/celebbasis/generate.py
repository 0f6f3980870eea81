"""Generation (METHOD §5): prompts with identity tokens -> images, saved with their recipe.

A thin layer over the diffusers pipeline: identities are loaded as new words, the scheduler is
chosen by name, each image has its own seed, and every PNG carries its prompt, seed, model and
identities in its text chunks, so any image can be made again.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from ._version import __version__
from .config import SCHEDULERS, GenerateConfig
from .errors import InputError
from .families import family_of
from .files import atomic_write
from .models import model_name
from .pooling import eos_pooling
from .sheet import contact_sheet
from .identity import Identity
from .insert import (PLACEHOLDER_RE, add_placeholder, borrowed_tokenizers, check_identity, check_prompt_tokens,
                     expand_prompt, load_identity, token_override)

logger = logging.getLogger(__name__)

@dataclass
class GeneratedImage:
    """One generated image and the recipe that makes it again."""

    image: Image.Image
    prompt: str
    seed: int
    metadata: dict = field(default_factory=dict)


@contextmanager
def scheduler_swapped(pipe, name: str | None):
    """Use the scheduler ``name`` (``ddim``, ``euler_a``, ``dpm++``, ...) inside the block, then put the
    caller's scheduler back, also after an exception. ``None`` keeps the pipeline's own.

    ``name`` is a key of ``SCHEDULERS``; ``GenerateConfig`` checks it when the settings are made."""
    if not name:
        yield pipe.scheduler
        return
    import diffusers

    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(original.config)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = original


def check_inputs(pipe, prompts: list[str], negatives: list[str | None], identities=()) -> list[Identity]:
    """Everything ``generate`` checks before it changes the pipeline (sizes and counts: ``GenerateConfig``).

    Identity files are read and checked against the pipeline (``check_identity``), and every ``<token>``
    of the prompts must be loaded or come with ``identities``. Returns the identities, read.
    """
    if not prompts or any(not p.strip() for p in prompts):
        raise InputError("Empty prompt. Write what to draw, e.g. \"<alice> person reading a book\".", field="prompts")
    if len(negatives) != len(prompts):
        raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts. Give one, or one per prompt.",
                         field="negative_prompt")
    identities = [i if isinstance(i, Identity) else Identity.load(i) for i in identities]
    coming = {check_identity(pipe, i) for i in identities}
    for p in prompts:
        check_prompt_tokens(family_of(pipe).tokenizer(pipe), p, coming)
    return identities


def _warn_unused(identities: list[Identity], prompts: list[str]) -> None:
    """Name each identity whose word no prompt uses: its person will not be drawn (brackets forgotten, a typo)."""
    used = {t for p in prompts for t in PLACEHOLDER_RE.findall(p)}
    for ident in identities:
        if ident.token in used:
            continue
        bare = any(re.search(rf"(?<![\w<]){re.escape(ident.name)}(?![\w>])", p) for p in prompts)
        hint = f'; "{ident.name}" without brackets is an ordinary word' if bare else ""
        logger.warning('%s is loaded but no prompt uses it, so that person is not drawn%s. Write %s in the prompt, '
                       'e.g. "a photo of %s person".', ident.token, hint, ident.token, ident.token)


def _warn_long_prompts(pipe, prompts: list[str]) -> None:
    """Say which part of a prompt the text encoder cannot read (once the identities' words are loaded)."""
    tok = family_of(pipe).tokenizer(pipe)
    for p in prompts:
        ids = tok(expand_prompt(tok, p)).input_ids
        if len(ids) > tok.model_max_length:
            cut = tok.decode(ids[tok.model_max_length - 1 : -1])  # what falls past the last slot (before the end token)
            logger.warning("Prompt is %d tokens; the model reads only %d, so this part is cut: %r",
                           len(ids), tok.model_max_length, cut)


def generate(pipe, prompts: str | list[str], *, identities=(), config: GenerateConfig | None = None,
             show_progress: bool = True, **settings) -> list[GeneratedImage]:
    """Draw each prompt ``num_images`` times; image ``i`` of every prompt uses seed ``seed + i``.

    Args:
        pipe: a diffusers SD pipeline (reused across calls: load it once). Its scheduler is
            swapped for the call's and put back afterwards.
        prompts: one prompt or a list; ``<name>`` tokens refer to identities.
        identities: ``Identity`` objects or identity files to load into the pipeline first.
        config: a ``GenerateConfig`` (default ``GenerateConfig()``; ``GenerateConfig.preset("paper")``
            is the official evaluation's settings).
        show_progress: a tqdm bar over batches.
        **settings: any ``GenerateConfig`` field, on top of ``config`` (``steps=20, seed=3, ...``).
            ``negative_prompt`` may also be a list with one entry per prompt.

    Example:
        >>> images = generate(pipe, "<alice> person and Barack Obama cooking", identities=["alice.safetensors"])
        >>> save_images(images, "out/")
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negative = settings.pop("negative_prompt", (config or GenerateConfig()).negative_prompt)
    negatives = list(negative) if isinstance(negative, (list, tuple)) else [negative] * len(prompts)
    cfg = dataclasses.replace(config or GenerateConfig(), **settings)
    family = family_of(pipe)
    default = family.native_size(pipe)
    cfg = dataclasses.replace(cfg, height=cfg.height or default, width=cfg.width or default)
    identities = check_inputs(pipe, prompts, negatives, identities)  # nothing changes before every check passed
    _warn_unused(identities, prompts)
    for ident in identities:
        load_identity(pipe, ident)
    _warn_long_prompts(pipe, prompts)
    per_call = max(1, cfg.batch_images // cfg.num_images)  # prompts per pipeline call
    batches = [list(range(i, min(len(prompts), i + per_call))) for i in range(0, len(prompts), per_call)]
    results = []
    # SDXL: pooled at the end token, as everywhere
    with scheduler_swapped(pipe, cfg.scheduler), eos_pooling(family.pooled_encoder(pipe)):
        # one labelled bar: the denoising steps of a single batch, else the batches. Set on a shallow copy of the
        # pipeline (same components), so the caller's own progress-bar settings are never touched.
        drawing = copy.copy(pipe)
        drawing.set_progress_bar_config(disable=not show_progress or len(batches) > 1, desc="generate", unit="step")
        for batch in tqdm(batches, desc="generate", disable=not show_progress or len(batches) < 2, unit="batch"):
            results += _draw(drawing, [prompts[i] for i in batch], [negatives[i] for i in batch], cfg)
    return results


def _draw(pipe, prompts: list[str], negatives: list[str | None], cfg: GenerateConfig) -> list[GeneratedImage]:
    """One pipeline call for a few prompts, ``cfg.num_images`` each, every image with its own seed."""
    device = pipe.unet.device
    gen_device = "cpu" if device.type == "mps" else device
    # one generator per image, seeded as if each prompt ran alone: batching never changes an image's seed
    gens = [torch.Generator(gen_device).manual_seed(cfg.seed + i) for _ in prompts for i in range(cfg.num_images)]
    use_negative = any(n is not None for n in negatives)
    out = pipe(prompts, negative_prompt=[n or "" for n in negatives] if use_negative else None,
               num_images_per_prompt=cfg.num_images, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
               height=cfg.height, width=cfg.width, generator=gens)
    known = set(family_of(pipe).tokenizer(pipe).get_added_vocab())
    results = []
    for j, image in enumerate(out.images):
        k, i = divmod(j, cfg.num_images)
        meta = {
            "prompt": prompts[k],
            "negative_prompt": negatives[k] or "",
            "seed": cfg.seed + i,
            "steps": cfg.steps,
            "guidance": cfg.guidance,
            "scheduler": type(pipe.scheduler).__name__,
            "size": f"{cfg.width}x{cfg.height}",
            "model": model_name(pipe),
            "identities": list(dict.fromkeys(t for t in PLACEHOLDER_RE.findall(prompts[k]) if t in known)),
            "celebbasis_version": __version__,
        }
        results.append(GeneratedImage(image, prompts[k], cfg.seed + i, meta))
    return results


def png_info(meta: dict) -> PngInfo:
    """PNG text chunks: one per field, plus an A1111-style ``parameters`` line."""
    info = PngInfo()
    for k, v in meta.items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v))
    params = (
        f"{meta['prompt']}\nNegative prompt: {meta.get('negative_prompt', '')}\n"
        f"Steps: {meta['steps']}, Sampler: {meta['scheduler']}, CFG scale: {meta['guidance']}, "
        f"Seed: {meta['seed']}, Size: {meta['size']}, Model: {meta['model']}"
    )
    info.add_text("parameters", params)
    return info


def _slug(text: str, limit: int = 40) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(filter(None, keep.split("-")))[:limit].strip("-") or "image"


def _next_number(out_dir: Path) -> int:
    """One past the highest ``NNN-`` number of the PNGs already in ``out_dir`` (0 when none)."""
    numbers = [int(p.name[:3]) for p in out_dir.glob("[0-9][0-9][0-9]-*.png")] if out_dir.is_dir() else []
    return max(numbers, default=-1) + 1


def save_images(results: list[GeneratedImage], out_dir, grid: bool = True) -> list[Path]:
    """Write each image as a PNG with its metadata, plus ``grid.png`` of this call's images when there are several.

    Nothing is overwritten: images are numbered on from the highest number already in ``out_dir``.
    ``grid.png`` always shows the latest call's images (a call with one image removes an older grid).
    """
    out_dir = Path(out_dir)
    paths = []
    first = _next_number(out_dir)
    if grid and len(results) < 2:
        (out_dir / "grid.png").unlink(missing_ok=True)
    for n, r in enumerate(results, start=first):
        path = out_dir / f"{n:03d}-{_slug(r.prompt)}-s{r.seed}.png"
        info = png_info(r.metadata)
        paths.append(atomic_write(path, lambda tmp, r=r, info=info: r.image.save(tmp, format="PNG", pnginfo=info)))
    if grid and len(results) > 1:
        sheet = contact_sheet([r.image for r in results])
        paths.append(atomic_write(out_dir / "grid.png", lambda tmp: sheet.save(tmp, format="PNG")))
    return paths


# -- drawing words that are not loaded -----------------------------------------------------------------
_WORD = "<celebbasis-sketch>"  # the one new word ``draw_words`` uses; its rows change with every drawing
PREVIEW_PROMPT = "a photo of {}"  # what ``preview`` draws


def draw_words(pipe, rows: list[torch.Tensor], captions: list[str], seeds: list[int], *, steps: int, guidance: float,
               size: tuple[int, int], batch: int = 16):
    """Images of ``captions[i]`` (each with ``{}`` for the subject) whose subject is a word with the vectors
    ``rows[e][i]`` ((N, K, d) per text encoder of the family), yielded as (index, PIL image) in order.

    The word is added to copies of the tokenizers and its vectors given per drawing through
    ``insert.token_override``: the pipeline's components, token tables and progress-bar settings are as they
    were afterwards. Pretraining draws the model's celebrities with it; ``preview`` a person in training.
    """
    family = family_of(pipe)
    k = rows[0].shape[1]
    with ExitStack() as stack:
        stack.enter_context(borrowed_tokenizers(pipe))
        states = []
        for tok, te in family.encoders(pipe):
            ids = add_placeholder(tok, te, _WORD, k, resize=False)
            states.append((stack.enter_context(token_override(te.get_input_embeddings(), ids)), te))
        stack.enter_context(eos_pooling(family.pooled_encoder(pipe)))
        drawing = copy.copy(pipe)  # same components; its own progress-bar settings, so the caller's stay as they are
        drawing.set_progress_bar_config(disable=True)
        for start in range(0, len(captions), batch):
            j = list(range(start, min(start + batch, len(captions))))
            for (state, te), r in zip(states, rows):
                state["rows"] = r[j].to(te.device, te.dtype)  # (B, K, d): each drawing its own
            gens = [torch.Generator("cpu").manual_seed(seeds[i]) for i in j]
            with torch.no_grad():
                images = drawing([captions[i].format(f"{_WORD} person") for i in j], num_inference_steps=steps,
                                 guidance_scale=guidance, height=size[0], width=size[1], generator=gens).images
            yield from zip(j, images)


def preview(pipe, identities: list[Identity], *, prompt: str = PREVIEW_PROMPT, seed: int = 0, steps: int = 20,
            guidance: float = GenerateConfig.guidance) -> list[Image.Image]:
    """One quick drawing of each identity (``prompt`` with ``{}`` for ``<name> person``), without loading it into the
    pipeline: what the web UI shows while a person is learned. Same seed for everyone, so drawings compare."""
    family = family_of(pipe)
    size = family.native_size(pipe)
    rows = [torch.stack([ident.parts[e].embeddings for ident in identities]) for e in range(len(family.encoders(pipe)))]
    return [im for _, im in draw_words(pipe, rows, [prompt] * len(identities), [seed] * len(identities), steps=steps,
                                       guidance=guidance, size=(size, size))]
