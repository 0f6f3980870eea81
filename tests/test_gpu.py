"""What tiny CPU tests cannot catch: half precision, compile, checkpointing, offload and devices on CUDA.

Every test here needs a CUDA GPU and is skipped without one. Run them with ``pytest -m gpu``.
They use the tiny models, so they take seconds on any GPU.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from celebbasis.basis import build_basis
from celebbasis.errors import InputError
from celebbasis.config import TrainConfig
from celebbasis.families import text_encoders
from celebbasis.testing import tiny_pipeline
from celebbasis.train import Personalizer, personalize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CFG = dict(resolution=64, seed=0, views=4)


def cuda_pipe(family="sd1", dtype=torch.float32):
    return tiny_pipeline(family=family).to("cuda", dtype)


def flags(pipe):
    mods = [pipe.unet, pipe.vae] + [te for _, te in text_encoders(pipe)]
    return ([p.requires_grad for m in mods for p in m.parameters()], [s.training for m in mods for s in m.modules()],
            pipe.unet.conv_in.weight.is_contiguous(), pipe.unet.is_gradient_checkpointing)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_training(family, dtype, astronaut):
    pipe = cuda_pipe(family, dtype)
    before = flags(pipe)
    bases = [build_basis(tok, te) for tok, te in text_encoders(pipe)]
    with Personalizer(pipe, [astronaut], ["alice"], TrainConfig(steps=3, **CFG), bases, "tiny") as trainer:
        assert (trainer.scaler is not None) == (dtype == torch.float16)  # loss scaling for float16 only
        assert trainer.heads[0].linear.weight.dtype == torch.float32 and trainer.heads[0].linear.weight.is_cuda
        assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        w0 = trainer.heads[0].linear.weight.detach().clone()
        losses = []
        while len(losses) < 8 and torch.equal(trainer.heads[0].linear.weight, w0):  # the scaler may skip its first steps
            losses.append(trainer.step())
        assert all(math.isfinite(x) for x in losses)
        assert not torch.equal(trainer.heads[0].linear.weight, w0)  # it learns
        ident = trainer.identities()[0]
    assert torch.isfinite(ident.coefficients).all()
    assert flags(pipe) == before and pipe.unet.dtype == dtype  # given back: contiguous again, frozen as found


def test_compile(astronaut):
    pipe = cuda_pipe()
    result = personalize(pipe, [astronaut], ["alice"], config=TrainConfig(steps=2, compile=True, **CFG), show_progress=False)
    assert all(math.isfinite(x) for x in result.losses)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"  # the user's UNet is not replaced by the compiled wrapper


def test_low_memory_recomputes_on_cuda(astronaut):
    pipe = cuda_pipe(dtype=torch.float16)
    bases = [build_basis(pipe.tokenizer, pipe.text_encoder)]
    calls = []
    pipe.unet.up_blocks[-1].resnets[-1].register_forward_pre_hook(lambda *_: calls.append(1))
    with Personalizer(pipe, [astronaut], ["alice"], TrainConfig(low_memory=True, **CFG), bases, "tiny") as trainer:
        assert pipe.unet.is_gradient_checkpointing
        trainer.step()
        assert len(calls) == 2  # once forward, once again during backward
    assert not pipe.unet.is_gradient_checkpointing


def test_model_cpu_offload_is_refused(astronaut):
    pipe = tiny_pipeline()
    pipe.enable_model_cpu_offload()
    with pytest.raises(InputError, match="offload"):
        personalize(pipe, [astronaut], ["alice"], config=TrainConfig(steps=1, **CFG), show_progress=False)


def test_text_encoder_on_another_device(astronaut):
    pipe = cuda_pipe()
    pipe.text_encoder.to("cpu")  # caption ids must go to the text encoder's device, not the UNet's
    result = personalize(pipe, [astronaut], ["alice"], config=TrainConfig(steps=2, **CFG), show_progress=False)
    assert all(math.isfinite(x) for x in result.losses)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_generation_after_training(family, astronaut):
    from celebbasis.generate import generate

    pipe = cuda_pipe(family, torch.float16)
    reference = copy.deepcopy(pipe)
    result = personalize(pipe, [astronaut], ["alice"], config=TrainConfig(steps=2, **CFG), show_progress=False)
    images = generate(pipe, "<alice> person reading", steps=2, height=64, width=64, show_progress=False)
    assert images[0].image.size == (64, 64) and np.isfinite(np.asarray(images[0].image, dtype=np.float32)).all()
    again = generate(reference, "<alice> person reading", identities=result.identities, steps=2, height=64, width=64,
                     show_progress=False)
    diff = np.abs(np.asarray(images[0].image, dtype=np.float32) - np.asarray(again[0].image, dtype=np.float32))
    assert diff.mean() < 2  # the saved identity draws what the trained pipeline draws
