"""Model folders for the benchmarks: the tiny test model and an SD-proportioned small model.

The small model keeps Stable Diffusion's structure and proportions at a size a CPU can train:
UNet channels 64/128/256/256 with cross-attention in the first three stages (SD 1.5: 320/640/1280/1280),
a VAE with 8x downsampling (channels 64/128/256/256; SD: 128/256/512/512), and a CLIP text encoder
768 wide (SD 1.x's width) with 4 layers (SD: 12), all random and seeded, real CLIP tokenizer.
`--arch sd15` builds the real SD 1.5 shapes (random weights), for a GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch


def build(arch: str, folder: Path) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from celebbasis.resources import clip_tokenizer
    from celebbasis.testing import save_tiny_pipeline

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    if arch == "tiny":
        return save_tiny_pipeline(folder)
    sizes = {
        "sd-small": dict(unet=(64, 128, 256, 256), vae=(64, 128, 256, 256), layers=4, heads=8),
        "sd15": dict(unet=(320, 640, 1280, 1280), vae=(128, 256, 512, 512), layers=12, heads=12),
    }[arch]
    torch.manual_seed(0)
    tok = clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=64 if arch == "sd15" else 32,
        block_out_channels=sizes["unet"],
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=sizes["vae"],
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512 if arch == "sd15" else 256,
    )
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_attention_heads=sizes["heads"],
        num_hidden_layers=sizes["layers"], max_position_embeddings=77, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=768,
    ))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: GPU allocations on CUDA, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
