"""A tiny, seeded, random Stable Diffusion pipeline with the real CLIP tokenizer.

Same classes and code paths as a real SD 1.x/2.x model, only the sizes differ, so tests, the demo
and the web UI run on a CPU in seconds without downloading anything. Its images are noise by design.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .files import atomic_write
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
    """Build the tiny random pipeline of a model family in memory (``ModelFamily.tiny_pipeline``).

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
    from .families import FAMILIES

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    return FAMILIES[family].tiny_pipeline(seed, prediction_type=prediction_type)


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


@_own_rng
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


# --- single-file (A1111 / ComfyUI) checkpoints -------------------------------------------------
# The inverse of diffusers' single-file loader, after diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py
# and convert_diffusers_to_original_sdxl.py. Those hard-code SD's 4 (SDXL's 3) UNet stages with 2 layers each; here
# the block numbers come from the model's config, so the tiny models convert too.

_UNET_TOP = {  # diffusers -> original (LDM)
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's size/crop conditioning
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
_OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}


def _unet_to_original(unet) -> dict:
    """UNet2DConditionModel weights -> ``model.diffusion_model.*`` keys (input/middle/output blocks)."""
    cfg = unet.config
    layers = cfg.layers_per_block
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block must be one int for the original layout, got {layers!r}")
    up_has_attention = ["CrossAttn" in t for t in cfg.up_block_types]
    out = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        new = None
        for old, orig in _UNET_TOP.items():
            if key.startswith(old):
                new = orig + key[len(old):]
        if new is None:
            kind, rest = parts[0], parts[1:]
            if kind == "mid_block":  # resnet, attention, resnet -> middle_block.0, .1, .2
                sub, j, tail = rest[0], int(rest[1]), rest[2:]
                new = f"middle_block.{2 * j if sub == 'resnets' else 1}." + ".".join(tail)
            elif kind in ("down_blocks", "up_blocks"):
                i, sub, j, tail = int(rest[0]), rest[1], int(rest[2]), rest[3:]
                if kind == "down_blocks":  # input_blocks.0 is conv_in; each stage has `layers` layers, then its downsampler
                    if sub == "downsamplers":
                        new = f"input_blocks.{(layers + 1) * (i + 1)}.0.op." + ".".join(tail[1:])  # drop "conv"
                    else:
                        new = f"input_blocks.{(layers + 1) * i + j + 1}.{0 if sub == 'resnets' else 1}." + ".".join(tail)
                elif sub == "upsamplers":  # after the last layer's resnet (and attention, if the stage has one)
                    new = f"output_blocks.{(layers + 1) * i + layers}.{2 if up_has_attention[i] else 1}." + ".".join(tail)
                else:  # up stages have layers + 1 layers
                    new = f"output_blocks.{(layers + 1) * i + j}.{0 if sub == 'resnets' else 1}." + ".".join(tail)
            else:
                raise ValueError(f"No original-layout name for UNet weight {key}")
            if "resnets" in key:
                for d, o in _UNET_RESNET.items():
                    new = new.replace(f".{d}.", f".{o}.")
        out["model.diffusion_model." + new] = value
    return out


def _vae_to_original(vae) -> dict:
    """AutoencoderKL weights -> ``first_stage_model.*`` (decoder stages numbered in reverse, 1x1-conv attention)."""
    n = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        parts = new.split(".")
        if parts[1] in ("down_blocks", "up_blocks"):  # encoder.down_blocks.i.resnets.j.* / .downsamplers.0.conv.*
            down = parts[1] == "down_blocks"
            i = int(parts[2]) if down else n - 1 - int(parts[2])
            if parts[3] == "resnets":
                where = ["block", *parts[4:]]  # keeps j
            else:
                where = ["downsample" if down else "upsample", *parts[5:]]  # drops the sampler's index 0
            new = ".".join([parts[0], "down" if down else "up", str(i), *where])
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            new = ".".join([parts[0], "mid", f"block_{int(parts[3]) + 1}", *parts[4:]])
        elif parts[1] == "mid_block":  # the one attention block
            tail = ".".join(parts[4:]) + "."
            for d, o in _VAE_ATTN.items():
                tail = tail.replace(d, o, 1) if tail.startswith(d) else tail
            new = f"{parts[0]}.mid.attn_1.{tail[:-1]}"
            if value.ndim == 2:  # linear -> 1x1 conv
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def _clip_to_original(text_encoder, prefix: str) -> dict:
    """OpenAI CLIP (SD 1.x, SDXL's first encoder): transformers' own names under ``prefix``."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection")):  # transformers >= 5.6 flattened CLIPTextModel
            key = "text_model." + key
        out[prefix + key] = value
    return out


def _open_clip_to_original(text_encoder, prefix: str) -> dict:
    """OpenCLIP (SD 2.x, SDXL's second encoder): ``resblocks``, fused q/k/v ``in_proj``, transposed ``text_projection``."""
    sd = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
          for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
    out = {}
    width = text_encoder.config.hidden_size
    for key, value in sd.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out[prefix + "ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            i, rest = key[len("text_model.encoder.layers."):].split(".", 1)
            if rest.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
                if rest.startswith("self_attn.q_proj"):
                    kind = rest.rsplit(".", 1)[1]  # weight or bias
                    qkv = [sd[f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(qkv)  # (3W, W) / (3W,)
                continue
            for d, o in _OPEN_CLIP.items():
                rest = rest.replace(d, o)
            out[f"{prefix}transformer.resblocks.{i}.{rest}"] = value
        else:
            raise ValueError(f"No original-layout name for text encoder weight {key}")
    if prefix + "text_projection" not in out:  # SD 2.x files carry OpenCLIP's projection; diffusers ignores it
        out[prefix + "text_projection"] = torch.eye(width)
    return out


def original_state_dict(pipe, *, open_clip: bool | None = None) -> dict:
    """A diffusers pipeline's weights in the original single-file layout (A1111, ComfyUI) of its family.

    Args:
        pipe: a pipeline of a family with single files (``ModelFamily.single_file_encoders``): SD 1.x/2.x, SDXL.
        open_clip: for a one-encoder pipeline, write its text encoder in SD 2.x's OpenCLIP layout (``True``) or
            SD 1.x's CLIP layout (``False``); ``None``: its family's (SD 2.x pads with "!").

    Returns:
        ``{key: tensor}`` with ``model.diffusion_model.*``, ``first_stage_model.*`` and
        ``cond_stage_model.transformer.*`` (SD 1.x), ``cond_stage_model.model.*`` (SD 2.x) or
        ``conditioner.embedders.{0,1}.*`` (SDXL) keys.
    """
    from .families import SD1, SD2, family_of

    family = family_of(pipe)
    layouts = family.single_file_encoders
    if open_clip is not None and len(layouts) == 1:
        layouts = (SD2 if open_clip else SD1).single_file_encoders
    if not layouts:
        raise ValueError(f"The {family.title} family has no single-file layout.")
    writers = {"clip": _clip_to_original, "open_clip": _open_clip_to_original}
    sd = {**_unet_to_original(pipe.unet), **_vae_to_original(pipe.vae)}
    for (_, text_encoder), (prefix, layout) in zip(family.encoders(pipe), layouts):
        sd.update(writers[layout](text_encoder, prefix))
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_single_file(pipe, path, *, open_clip: bool | None = None) -> Path:
    """Write a pipeline as one original-layout checkpoint: safetensors, or a tensors-only pickle for ``.ckpt``/``.pt``."""
    from safetensors.torch import save_file

    path = Path(path)
    sd = original_state_dict(pipe, open_clip=open_clip)
    if path.suffix == ".safetensors":
        return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    return atomic_write(path, lambda tmp: torch.save({"state_dict": sd, "global_step": 0}, tmp))  # as SD training scripts write


def save_tiny_single_file(path, seed: int = 0, *, family: str = "sd1") -> Path:
    """``tiny_pipeline(seed, family=...)`` as an A1111/ComfyUI-style single-file checkpoint at ``path``.

    Example:
        >>> save_tiny_single_file("tiny-sdxl.safetensors", family="sdxl")
        PosixPath('tiny-sdxl.safetensors')
    """
    return save_single_file(tiny_pipeline(seed, family=family), path)
