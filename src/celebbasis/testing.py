"""A tiny, seeded, random Stable Diffusion pipeline with the real CLIP tokenizer.

Same classes and code paths as a real SD 1.x/2.x model, only the sizes differ, so tests, the demo
and the web UI run on a CPU in seconds without downloading anything. Its images are noise by design.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .resources import clip_tokenizer

TINY_WIDTH = 32  # text embedding width of the tiny model
TINY_RESOLUTION = 64  # pixels; 8x8 latents through the 8x-downsampling tiny VAE


def tiny_pipeline(seed: int = 0, *, prediction_type: str = "epsilon"):
    """Build a tiny random ``StableDiffusionPipeline`` in memory.

    Args:
        seed: seeds every random weight, so two calls give identical models.
        prediction_type: ``"epsilon"`` (SD 1.x) or ``"v_prediction"`` (SD 2.x 768 px models).

    Returns:
        A ``diffusers.StableDiffusionPipeline`` on the CPU in float32, no safety checker.

    Example:
        >>> pipe = tiny_pipeline()
        >>> pipe.tokenizer("sks", add_special_tokens=False).input_ids
        [48136]
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_WIDTH,
        attention_head_dim=4,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
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
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_WIDTH,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=TINY_WIDTH,
        )
    )
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


def save_tiny_pipeline(path, seed: int = 0, *, prediction_type: str = "epsilon") -> Path:
    """Write ``tiny_pipeline(seed)`` as a diffusers model folder that ``--model PATH`` can load."""
    path = Path(path)
    tiny_pipeline(seed, prediction_type=prediction_type).save_pretrained(path, safe_serialization=True)
    return path
