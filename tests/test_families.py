"""Model families are one definition each: a new one, defined in this file alone, trains, saves, loads and exports.

``TwinClip`` is an imagined family: SD 1.x with a second CLIP text encoder, the two encoders' last hidden
states concatenated for the UNet. Nothing in the library names it; registering it is all it takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from celebbasis import families, personalize, testing
from celebbasis.config import EXPORT_FORMATS, TrainConfig
from celebbasis.errors import InputError
from celebbasis.export import export_identity, import_embedding, read_embedding_file
from celebbasis.families import SD1, SD2, SDXL, ModelFamily, family_of, identity_family, text_encoders
from celebbasis.identity import Identity
from celebbasis.insert import expand_prompt, load_identity
from celebbasis.models import load_pipeline, pipeline_bases
from celebbasis.resources import clip_tokenizer
from celebbasis.testing import TINY_WIDTH, _tiny_text_encoder, _tiny_unet, tiny_pipeline

CFG = TrainConfig(resolution=64, steps=2, views=1, face_per_photo=True, seed=0)


class TwinClipPipeline(StableDiffusionPipeline):
    """A ``StableDiffusionPipeline`` with a second CLIP tokenizer and text encoder."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, text_encoder_2, tokenizer_2, safety_checker=None,
                 feature_extractor=None, image_encoder=None, requires_safety_checker: bool = False):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder,
                         requires_safety_checker)
        self.register_modules(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


@dataclass(frozen=True)
class TwinClip(ModelFamily):
    def conditioning(self, pipe, captions, size):
        hidden = []
        for tok, te in self.encoders(pipe):
            prompts = [expand_prompt(tok, c) for c in captions]  # "<alice>" -> "<alice> <alice>_1", as diffusers does
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            hidden.append(te(ids.to(te.device))[0])  # (B, T, 32)
        return torch.cat(hidden, dim=-1), {}  # (B, T, 64)


def tiny_twin_clip(seed: int = 0, **kwargs):
    """The family's tiny model: the tiny SD 1.x with a second tiny CLIP and a UNet for both."""
    base = tiny_pipeline(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 10)
        unet = _tiny_unet(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=2 * TINY_WIDTH,
                          attention_head_dim=4)
        torch.manual_seed(seed + 11)
        text_encoder_2 = _tiny_text_encoder(base.tokenizer, TINY_WIDTH)
    return TwinClipPipeline(base.vae, base.text_encoder, base.tokenizer, unet, base.scheduler, text_encoder_2,
                            clip_tokenizer())


TWIN = TwinClip(name="twin-clip", title="Twin-CLIP SD", pipeline_class="TwinClipPipeline", default_model="example/twin-clip",
                encoder_attributes=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
                export_keys=("clip_a", "clip_b"))


@pytest.fixture
def twin(monkeypatch):
    families.register(TWIN)
    monkeypatch.setattr(testing, "TINY_PIPELINES", dict(testing.TINY_PIPELINES))  # the registration ends with the test
    testing.register_tiny_pipeline(TWIN.name, tiny_twin_clip)
    yield TWIN
    families.unregister(TWIN.name)


def test_built_in_families_are_told_apart():
    assert [family_of(tiny_pipeline(family=f)) for f in ("sd1", "sd2", "sdxl")] == [SD1, SD2, SDXL]
    assert identity_family({}, 1, 768) is SD1 and identity_family({}, 1, 1024) is SD2 and identity_family({}, 1, 32) is SD1
    assert identity_family({}, 2, 32) is SDXL
    assert SDXL.recognises({SDXL.token_table_key: (10, 768), "conditioner.embedders.1.model.ln_final.weight": (1280,)})
    assert not SDXL.recognises({SDXL.token_table_key: (10, 768)}) and SD1.recognises({SD1.token_table_key: (10, 768)})


def test_sdxl_time_ids_are_the_pipelines():
    pipe = tiny_pipeline(family="sdxl")
    _, added = SDXL.conditioning(pipe, ["a photo", "a face"], 64)
    ref = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(added["time_ids"], ref.repeat(2, 1))


def test_a_family_defined_here_trains_saves_loads_and_exports(twin, tmp_path, astronaut):
    pipe = load_pipeline(tiny=True, family=twin.name, device="cpu")
    assert family_of(pipe) is twin and len(text_encoders(pipe)) == 2
    result = personalize(pipe, [astronaut], ["alice"], config=CFG, show_progress=False)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    result.save(tmp_path / "ids")

    alice = Identity.load(tmp_path / "ids" / "alice.safetensors")
    assert alice.family is twin and alice.metadata["model_family"] == twin.name
    assert alice.metadata["base_model"] == "tiny-twin-clip"
    assert [e.shape for _, e in alice.parts] == [(2, TINY_WIDTH), (2, TINY_WIDTH)]
    assert torch.equal(alice.parts[1].embeddings, result.identities[0].parts[1].embeddings)

    bases = pipeline_bases(pipe)
    for fmt in EXPORT_FORMATS:
        path = export_identity(alice, fmt, tmp_path / fmt / "")
        with safe_open(str(path), "pt") as f:
            assert list(f.keys()) == ["clip_a", "clip_b"]
            assert f.metadata()["format"] == "pt" and f.metadata()["modelspec.architecture"] == "stable-diffusion/textual-inversion"
        found = read_embedding_file(path)
        assert list(found) == ["clip_a", "clip_b"] and torch.equal(found["clip_b"], alice.parts[1].embeddings)
        back, residuals = import_embedding(path, "alice2", bases)
        assert back.family is twin and max(residuals) < 1e-4

    fresh = tiny_pipeline(family=twin.name)  # the identity in another copy of the model: its words condition the UNet
    assert load_identity(fresh, alice) == "<alice>"
    cond, added = twin.conditioning(fresh, ["face of <alice> person"], 64)
    assert cond.shape == (1, 77, 2 * TINY_WIDTH) and added == {}


def test_an_unregistered_family_is_named(tmp_path):
    alice = Identity.from_coefficients("<alice>", [torch.ones(2, 4), torch.ones(2, 4)], [_basis(), _basis()],
                                       model_family="gone")
    path = alice.save(tmp_path / "alice.safetensors")
    with pytest.raises(Exception, match="gone"):
        export_identity(Identity.load(path), "diffusers", tmp_path / "out" / "")


def test_a_family_without_export_keys_says_so_before_writing(tmp_path):
    keyless = TwinClip(**{**TWIN.__dict__, "name": "keyless", "export_keys": ()})
    families.register(keyless)
    try:
        alice = Identity.from_coefficients("<alice>", [torch.ones(2, 4), torch.ones(2, 4)], [_basis(), _basis()],
                                           model_family="keyless")
        with pytest.raises(InputError, match=r"names no export key .* cannot be exported\.$"):
            export_identity(alice, "a1111", tmp_path / "out" / "")
        assert not (tmp_path / "out").exists()
    finally:
        families.unregister("keyless")


def _basis():
    from celebbasis.basis import CelebBasis

    return CelebBasis(torch.zeros(2, 8), torch.eye(8)[:4].repeat(2, 1, 1), [4, 4], {"basis_sha256": "x"})
