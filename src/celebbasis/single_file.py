"""Single-file checkpoints: the original layout A1111 and ComfyUI keep (``model.diffusion_model.*``, ...).

Reading: a file's ``{key: shape}`` (``checkpoint_shapes``; pickles only with ``torch.load(weights_only=True)``)
and its model family (``family_of_checkpoint``), which ``models.load_pipeline`` loads it with. Writing: any
diffusers pipeline of a family with single files in that layout (``original_state_dict``, ``save_single_file``),
so the tests read tiny models through the same path as a user's ``v1-5-pruned-emaonly.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelLoadError
from .families import SD1, SD2, ModelFamily, checkpoint_family_of, family_of
from .files import atomic_write

# -- reading -----------------------------------------------------------------------------------------

def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a single-file checkpoint; pickles are read with ``weights_only=True`` or refused."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # SafetensorError: truncated download, not safetensors at all
            raise ModelLoadError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]}); "
                                 "download it again.") from None
    import pickle
    import zipfile

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        raise ModelLoadError(
            f"{path} is a pickle checkpoint that holds more than tensors, and celebbasis does not unpickle that "
            "(it could run code). Convert it to .safetensors (e.g. A1111's Checkpoint Merger, or a trusted "
            "conversion script) and pass that file."
        ) from None
    except Exception as e:
        raise ModelLoadError(f"Cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}). "
                             "Download it again, or use its .safetensors version.") from None
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # Lightning / SD training checkpoints
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelLoadError(f"{path} holds a {type(sd).__name__}, not a model state dict. Pass an SD checkpoint.")
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def family_of_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> ModelFamily:
    """The family of a single-file checkpoint from its keys (``checkpoint_shapes``): ``conditioner.embedders.1.model.*``
    (OpenCLIP-G beside CLIP-L) is SDXL, ``cond_stage_model.model.*`` (OpenCLIP-H) SD 2.x,
    ``cond_stage_model.transformer.*`` (CLIP-L) SD 1.x (``ModelFamily.single_file_encoders``).

    Raises:
        ModelLoadError: not a full text-to-image checkpoint of a family with single files, each case named.
    """
    if not any(k.startswith("model.diffusion_model.") for k in shapes):
        raise ModelLoadError(f"{path.name} has no UNet (model.diffusion_model.*): it is not a full Stable Diffusion "
                             "checkpoint (a LoRA, an embedding or a VAE?). Pass the base model's checkpoint.")
    family = checkpoint_family_of(shapes)
    if family is None and any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
        raise ModelLoadError(f"{path.name} is an SDXL refiner, which has no CLIP-L text encoder to learn a word in. "
                             "Pass the SDXL base model (or a fine-tune of it).")
    if family is None and any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        raise ModelLoadError(f"{path.name} is an SD 1.x checkpoint whose text encoder has the old key layout "
                             "(cond_stage_model.transformer.embeddings.*, no text_model.), which diffusers cannot read. "
                             "Re-save it with a current tool (e.g. A1111's Checkpoint Merger) and pass that file.")
    if family is None:
        raise ModelLoadError(f"{path.name} holds no SD 1.x/2.x or SDXL text encoder (cond_stage_model.* or conditioner.*): "
                             "it is a UNet-only file or another model family. Pass a full SD 1.x/2.x or SDXL checkpoint.")
    in_channels = shapes.get("model.diffusion_model.input_blocks.0.0.weight", (0, 4))[1]
    if in_channels != 4:
        raise ModelLoadError(f"{path.name} is an inpainting or instruct-pix2pix model (its UNet takes {in_channels} channels); "
                             "celebbasis needs a text-to-image model.")
    return family


# -- writing -----------------------------------------------------------------------------------------
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
