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


def tiny_pipeline(seed: int = 0, *, prediction_type: str = "epsilon", family: str = "sd1"):
    """Build a tiny random ``StableDiffusionPipeline`` (or SDXL pipeline) in memory.

    Args:
        seed: seeds every random weight, so two calls give identical models.
        prediction_type: ``"epsilon"`` (SD 1.x) or ``"v_prediction"`` (SD 2.x 768 px models).
        family: ``"sd1"`` (CLIP ViT-L layout), ``"sd2"`` (OpenCLIP layout: pad token "!", linear
            attention projections, v-prediction) or ``"sdxl"`` (two text encoders, added conditions).

    Returns:
        A ``diffusers.StableDiffusionPipeline`` on the CPU in float32, no safety checker.

    Example:
        >>> pipe = tiny_pipeline()
        >>> pipe.tokenizer("sks", add_special_tokens=False).input_ids
        [48136]
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if family == "sdxl":
        return tiny_sdxl_pipeline(seed)
    if family not in ("sd1", "sd2"):
        raise ValueError(f"family must be sd1, sd2 or sdxl, got {family!r}")
    sd2 = family == "sd2"
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


def _tiny_text_encoder(tokenizer, width: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=width,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


TINY_WIDTH_2 = 64  # the tiny SDXL's second text encoder (OpenCLIP-G is 1280 wide)


def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny random ``StableDiffusionXLPipeline``: CLIP-L-like (32 wide) + OpenCLIP-G-like (64 wide, pad "!")."""
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
    text_encoder = _tiny_text_encoder(tokenizer, TINY_WIDTH)
    torch.manual_seed(seed + 3)
    text_encoder_2 = _tiny_text_encoder(tokenizer_2, TINY_WIDTH_2, with_projection=True)
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


def save_tiny_clip(path, seed: int = 0) -> Path:
    """A tiny random CLIP (transformers ``CLIPModel`` + processor) folder for ``--clip-model PATH``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = Path(path)
    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_hidden_layers=2),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(path)
    return path
