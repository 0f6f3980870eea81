"""Tiny, seeded, random Stable Diffusion pipelines with the real CLIP tokenizer, one per model family.

Same classes and code paths as a real SD 1.x/2.x or SDXL model, only the sizes differ, so tests, the
demo and the web UI run on a CPU in seconds without downloading anything (``load_pipeline(tiny=True)``,
``--tiny``). Their images are noise by design. Each family's builder is registered here by the family's
name (``TINY_PIPELINES``); a family defined elsewhere registers its own with ``register_tiny_pipeline``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch

from .families import FAMILIES
from .resources import clip_tokenizer

TINY_WIDTH = 32  # text embedding width of the tiny model
TINY_RESOLUTION = 64  # pixels; 8x8 latents through the 8x-downsampling tiny VAE


def _own_rng(build):
    """Run a model builder on a forked torch RNG: its seeds never touch the caller's random state."""
    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return build(*args, **kwargs)

    return wrapper


def tiny_pipeline(seed: int = 0, *, prediction_type: str = "epsilon", family: str = "sd1"):
    """Build the tiny random pipeline of a model family in memory (its builder in ``TINY_PIPELINES``).

    Args:
        seed: seeds every random weight, so two calls give identical models.
        prediction_type: ``"epsilon"`` (SD 1.x) or ``"v_prediction"`` (SD 2.x 768 px models).
        family: a registered family's name: ``"sd1"`` (CLIP ViT-L layout), ``"sd2"`` (OpenCLIP layout: pad
            token "!", linear attention projections, v-prediction) or ``"sdxl"`` (two text encoders,
            added conditions).

    Returns:
        A diffusers pipeline (``StableDiffusionPipeline`` for sd1/sd2) on the CPU in float32, no safety checker.

    Example:
        >>> pipe = tiny_pipeline()
        >>> pipe.tokenizer("sks", add_special_tokens=False).input_ids
        [48136]
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if family not in TINY_PIPELINES:
        raise NotImplementedError(f"The {FAMILIES[family].title} family has no tiny test model "
                                  "(celebbasis.testing.register_tiny_pipeline adds one).")
    return TINY_PIPELINES[family](seed, prediction_type=prediction_type)


@_own_rng
def tiny_sd_pipeline(seed: int = 0, *, prediction_type: str = "epsilon", sd2: bool = False):
    """A tiny random ``StableDiffusionPipeline``: SD 1.x, or SD 2.x (OpenCLIP layout, v-prediction) with ``sd2``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if sd2:
        prediction_type = "v_prediction"
    tokenizer = clip_tokenizer(pad_token="!" if sd2 else "<|endoftext|>")
    torch.manual_seed(seed)
    unet = _tiny_unet(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_WIDTH,
        attention_head_dim=4,
        use_linear_projection=sd2,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = _tiny_text_encoder(tokenizer, TINY_WIDTH)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_unet(**kwargs):
    """A two-stage UNet for 8x8 latents; ``kwargs`` set the blocks, attention and conditioning."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4,
                                block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, **kwargs)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=TINY_RESOLUTION,
    )


def _tiny_text_encoder(tokenizer, width: int, with_projection: bool = False, eos_token_id: int | None = None):
    """A 2-layer CLIP text model; ``eos_token_id`` overrides the config's (default: the tokenizer's)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=width,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


TINY_WIDTH_2 = 64  # the tiny SDXL's second text encoder (OpenCLIP-G is 1280 wide)
SDXL_EOS_TOKEN_ID = 2  # the legacy eos_token_id of both SDXL text encoder configs: transformers then pools at argmax(ids)


@_own_rng
def tiny_sdxl_pipeline(seed: int = 0, **_):
    """A tiny random ``StableDiffusionXLPipeline``: CLIP-L-like (32 wide) + OpenCLIP-G-like (64 wide, pad "!").

    Both text encoder configs carry ``eos_token_id`` 2, as the real SDXL's do, so the pooled vector is
    chosen the way transformers chooses it for the real model (``input_ids.argmax()``).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    torch.manual_seed(seed)
    unet = _tiny_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + TINY_WIDTH_2,
        cross_attention_dim=TINY_WIDTH + TINY_WIDTH_2,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    vae.register_to_config(scaling_factor=0.13025)
    torch.manual_seed(seed + 2)
    text_encoder = _tiny_text_encoder(tokenizer, TINY_WIDTH, eos_token_id=SDXL_EOS_TOKEN_ID)
    torch.manual_seed(seed + 3)
    text_encoder_2 = _tiny_text_encoder(tokenizer_2, TINY_WIDTH_2, with_projection=True, eos_token_id=SDXL_EOS_TOKEN_ID)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


def save_tiny_pipeline(path, seed: int = 0, *, prediction_type: str = "epsilon", family: str = "sd1") -> Path:
    """Write ``tiny_pipeline(...)`` as a diffusers model folder that ``--model PATH`` can load."""
    path = Path(path)
    tiny_pipeline(seed, prediction_type=prediction_type, family=family).save_pretrained(path, safe_serialization=True)
    return path


# Each family's tiny model, by the family's name: ``builder(seed, prediction_type=...)`` -> pipeline.
TINY_PIPELINES: dict[str, Callable] = {
    "sd1": tiny_sd_pipeline,
    "sd2": functools.partial(tiny_sd_pipeline, sd2=True),
    "sdxl": tiny_sdxl_pipeline,
}


def register_tiny_pipeline(family: str, builder: Callable) -> None:
    """Make ``tiny_pipeline(family=...)`` and ``load_pipeline(tiny=True, family=...)`` build ``builder(seed, **kwargs)``."""
    TINY_PIPELINES[family] = builder
