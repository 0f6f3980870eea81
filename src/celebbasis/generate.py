"""Generation (METHOD §5): prompts with identity tokens -> images, saved with their recipe.

A thin layer over the diffusers pipeline: identities are loaded as new words, the scheduler is
chosen by name, each image has its own seed, and every PNG carries its prompt, seed, model and
identities in its text chunks, so any image can be made again.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from ._version import __version__
from .errors import InputError
from .insert import PLACEHOLDER_RE, check_prompt_tokens, expand_prompt, load_identity

logger = logging.getLogger(__name__)

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "ddpm": "DDPMScheduler",
}


@dataclass
class GeneratedImage:
    """One generated image and the recipe that makes it again."""

    image: Image.Image
    prompt: str
    seed: int
    metadata: dict = field(default_factory=dict)


def set_scheduler(pipe, name: str | None) -> None:
    """Swap the pipeline's scheduler by short name (``ddim``, ``euler_a``, ``dpm++``, ...)."""
    if not name:
        return
    import diffusers

    if name not in SCHEDULERS:
        raise InputError(f"Unknown scheduler {name!r}. Choose one of: {', '.join(SCHEDULERS)}.")
    cls = getattr(diffusers, SCHEDULERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def check_inputs(pipe, prompts: list[str], height: int, width: int, num_images: int, steps: int, guidance: float,
                 batch_images: int = 1) -> None:
    """Validate everything before the first denoising step."""
    if not prompts or any(not p.strip() for p in prompts):
        raise InputError("Empty prompt. Write what to draw, e.g. \"<alice> person reading a book\".")
    for h, label in ((height, "--height"), (width, "--width")):
        if h < 8 or h % 8:
            raise InputError(f"{label} must be a positive multiple of 8, got {h}.")
    if num_images < 1:
        raise InputError(f"--num-images must be >= 1, got {num_images}.")
    if batch_images < 1:
        raise InputError(f"--batch-images must be >= 1, got {batch_images}.")
    if steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}.")
    if guidance < 0:
        raise InputError(f"--guidance must be >= 0, got {guidance}.")
    for p in prompts:
        check_prompt_tokens(pipe.tokenizer, p)
        tok = pipe.tokenizer
        ids = tok(expand_prompt(tok, p)).input_ids
        if len(ids) > tok.model_max_length:
            cut = tok.decode(ids[tok.model_max_length - 1 : -1])  # what falls past the last slot (before the end token)
            logger.warning("Prompt is %d tokens; the model reads only %d, so this part is cut: %r",
                           len(ids), tok.model_max_length, cut)


def generate(
    pipe,
    prompts: str | list[str],
    *,
    identities=(),
    negative_prompt: str | None = None,
    num_images: int = 1,
    steps: int = 50,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    scheduler: str | None = "ddim",
    show_progress: bool = True,
    batch_images: int = 4,
) -> list[GeneratedImage]:
    """Draw each prompt ``num_images`` times; image ``i`` of every prompt uses seed ``seed + i``.

    Args:
        pipe: a diffusers SD pipeline (reused across calls: load it once).
        prompts: one prompt or a list; ``<name>`` tokens refer to identities.
        identities: ``Identity`` objects or identity files to load into the pipeline first.
        negative_prompt: ordinary text the image should avoid.
        num_images: images per prompt.
        steps, guidance: denoising steps and classifier-free guidance scale.
        height, width: image size (multiples of 8); the model's default when ``None``.
        seed: base seed.
        scheduler: short scheduler name (see ``SCHEDULERS``); ``None`` keeps the pipeline's.
        show_progress: a tqdm bar over batches.
        batch_images: images per pipeline call: prompts are batched up to this many images
            (at least one prompt per call). Lower it on small GPUs.

    Example:
        >>> images = generate(pipe, "<alice> person and Barack Obama cooking", identities=["alice.safetensors"])
        >>> save_images(images, "out/")
    """
    from .models import model_name

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or default, width or default
    for ident in identities:
        load_identity(pipe, ident)
    known = set(pipe.tokenizer.get_added_vocab())
    check_inputs(pipe, prompts, height, width, num_images, steps, guidance, batch_images)
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=not show_progress or len(prompts) * num_images > batch_images)
    device = pipe.unet.device
    gen_device = "cpu" if device.type == "mps" else device
    per_call = max(1, batch_images // num_images)  # prompts per pipeline call
    batches = [prompts[i : i + per_call] for i in range(0, len(prompts), per_call)]
    results = []
    for batch in tqdm(batches, desc="generate", disable=not show_progress or len(batches) < 2, unit="batch"):
        # one generator per image, seeded as if each prompt ran alone: batching never changes an image's seed
        gens = [torch.Generator(gen_device).manual_seed(seed + i) for _ in batch for i in range(num_images)]
        out = pipe(
            batch,
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(batch),
            num_images_per_prompt=num_images,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=gens,
        )
        for j, image in enumerate(out.images):
            prompt, i = batch[j // num_images], j % num_images
            meta = {
                "prompt": prompt,
                "negative_prompt": negative_prompt or "",
                "seed": seed + i,
                "steps": steps,
                "guidance": guidance,
                "scheduler": type(pipe.scheduler).__name__,
                "size": f"{width}x{height}",
                "model": model_name(pipe),
                "identities": list(dict.fromkeys(t for t in PLACEHOLDER_RE.findall(prompt) if t in known)),
                "celebbasis_version": __version__,
            }
            results.append(GeneratedImage(image, prompt, seed + i, meta))
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


def contact_sheet(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Lay images out on a grid (row-major), sized to the largest image."""
    if not images:
        raise ValueError("no images")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet


def _slug(text: str, limit: int = 40) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(filter(None, keep.split("-")))[:limit].strip("-") or "image"


def save_images(results: list[GeneratedImage], out_dir, grid: bool = True) -> list[Path]:
    """Write each image as a PNG with its metadata, plus ``grid.png`` when there are several."""
    from .files import atomic_write

    out_dir = Path(out_dir)
    paths = []
    for n, r in enumerate(results):
        path = out_dir / f"{n:03d}-{_slug(r.prompt)}-s{r.seed}.png"
        info = png_info(r.metadata)
        paths.append(atomic_write(path, lambda tmp, r=r, info=info: r.image.save(tmp, format="PNG", pnginfo=info)))
    if grid and len(results) > 1:
        sheet = contact_sheet([r.image for r in results])
        paths.append(atomic_write(out_dir / "grid.png", lambda tmp: sheet.save(tmp, format="PNG")))
    return paths
