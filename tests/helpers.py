"""Helpers only the tests use: tiny model files on disk, and what a single file's keys say about its family."""

from __future__ import annotations

from pathlib import Path

import torch

from celebbasis.resources import clip_tokenizer
from celebbasis.single_file import checkpoint_shapes, family_of_checkpoint, save_single_file
from celebbasis.testing import tiny_pipeline


def save_tiny_single_file(path, seed: int = 0, *, family: str = "sd1") -> Path:
    """``tiny_pipeline(seed, family=...)`` as an A1111/ComfyUI-style single-file checkpoint at ``path``."""
    return save_single_file(tiny_pipeline(seed, family=family), path)


def checkpoint_family(path) -> str:
    """The family name of a single-file checkpoint, read from its keys as ``load_pipeline`` reads it."""
    path = Path(path).expanduser()
    return family_of_checkpoint(path, checkpoint_shapes(path)).name


def save_tiny_clip(path, seed: int = 0) -> Path:
    """A tiny random CLIP (transformers ``CLIPModel`` + processor) folder for ``--clip-model PATH``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = Path(path)
    tokenizer = clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
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
