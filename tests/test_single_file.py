"""Single-file checkpoints (A1111 ``models/Stable-diffusion/``, ComfyUI ``models/checkpoints/``).

Each tiny pipeline is written in the original layout by ``celebbasis.testing.save_single_file`` and read
back through diffusers' own ``from_single_file``, which must give the diffusers folder's weights exactly.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from celebbasis import generate, load_identity, personalize
from celebbasis.errors import ModelLoadError
from celebbasis.identity import Identity
from celebbasis.families import family_named
from celebbasis.config import TrainConfig
from celebbasis.models import load_pipeline, model_name
from celebbasis.signatures import encoders_signature
from celebbasis.single_file import save_single_file
from celebbasis.testing import save_tiny_pipeline, tiny_pipeline
from helpers import checkpoint_family, save_tiny_single_file

FAMILIES = ["sd1", "sd2", "sdxl"]
ENCODERS = ("unet", "vae", "text_encoder", "text_encoder_2")


def configs_only(folder: Path, dest: Path) -> Path:
    """A diffusers folder without its weights: what a hub id's configuration download holds."""
    return Path(shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin")))


@pytest.fixture(scope="session")
def models(tmp_path_factory, tiny_model_dir, tiny_single_file):
    """Per family: the seed-0 tiny pipeline as a diffusers folder, as a single file, and its configuration alone."""
    root = tmp_path_factory.mktemp("single")
    out = {"sd1": dict(folder=tiny_model_dir, file=tiny_single_file)}
    for family in ("sd2", "sdxl"):
        out[family] = dict(folder=save_tiny_pipeline(root / family, 0, family=family),
                           file=save_tiny_single_file(root / f"{family}Vision.safetensors", 0, family=family))
    for family, m in out.items():
        m["config"] = configs_only(m["folder"], root / f"{family}-config")
    return out


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def silent_hub(tmp_path, monkeypatch):
    """An empty cache and a Hub that accepts connections and never answers (a firewall, a captive portal)."""
    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    yield
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def state(pipe, name):
    module = getattr(pipe, name, None)
    return None if module is None else module.state_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_loads_the_folders_weights(models, family):
    m = models[family]
    pipe = load_pipeline(str(m["file"]), config=str(m["config"]))  # no weights in the config: all come from the file
    ref = load_pipeline(str(m["folder"]))
    assert type(pipe) is type(ref)
    assert checkpoint_family(m["file"]) == family
    for name in ENCODERS:
        got, want = state(pipe, name), state(ref, name)
        assert (got is None) == (want is None), name
        if want is None:
            continue
        assert got.keys() == want.keys(), name
        for k, v in want.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{name}.{k}"
    assert pipe.scheduler.config == ref.scheduler.config
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert pipe.tokenizer.get_vocab() == ref.tokenizer.get_vocab() and pipe.tokenizer.pad_token == ref.tokenizer.pad_token
    assert model_name(pipe) == m["file"].name
    assert encoders_signature(pipe) == encoders_signature(ref)


def test_tensors_only_ckpt_loads(tmp_path, models):
    ckpt = save_single_file(tiny_pipeline(0), tmp_path / "v1-5-pruned-emaonly.ckpt")
    pipe = load_pipeline(str(ckpt), config=str(models["sd1"]["config"]))
    ref = load_pipeline(str(models["sd1"]["folder"]))
    for k, v in ref.unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[k], v), k
    assert model_name(pipe) == "v1-5-pruned-emaonly.ckpt"


class Payload:
    """What a malicious pickle does: run code when loaded (here, make a folder)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickle_with_code_is_refused_unopened(tmp_path, models):
    ckpt, marker = tmp_path / "model.ckpt", tmp_path / "pwned"
    sd = save_single_file(tiny_pipeline(0), tmp_path / "ok.safetensors")
    from safetensors.torch import load_file

    torch.save({"state_dict": load_file(sd), "callbacks": Payload(marker)}, ckpt)
    with pytest.raises(ModelLoadError) as e:
        load_pipeline(str(ckpt), config=str(models["sd1"]["folder"]))
    msg = str(e.value)
    assert "\n" not in msg and "safetensors" in msg and "model.ckpt" in msg
    assert not marker.exists()


def test_offline_without_config_is_one_fast_line(models, no_hub):
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_pipeline(str(models["sdxl"]["file"]))
    msg = str(e.value)
    assert time.perf_counter() - t0 < 5
    assert "\n" not in msg and "--model-config" in msg and family_named("sdxl").default_model in msg and "SDXL" in msg
    with pytest.raises(ModelLoadError) as e:  # a hub id given but not cached: say so, never suggest passing it
        load_pipeline(str(models["sdxl"]["file"]), config="someone/not-cached-config")
    msg = str(e.value)
    assert "\n" not in msg and "someone/not-cached-config, which is not in the local Hugging Face cache" in msg
    assert "hf download someone/not-cached-config" in msg and "(e.g." not in msg


def test_silent_hub_fails_fast(models, silent_hub):
    """No answer from the Hub costs ~2 s, not minutes of retries: for a single file and for a hub id."""
    for model, expect in [(str(models["sd1"]["file"]), "--model-config"), ("someone/not-cached-model", "--model PATH")]:
        t0 = time.perf_counter()
        with pytest.raises(ModelLoadError) as e:
            load_pipeline(model)
        assert time.perf_counter() - t0 < 8, model
        assert "\n" not in str(e.value) and expect in str(e.value) and "cannot be reached" in str(e.value)


def test_config_of_another_architecture_is_refused(models):
    with pytest.raises(ModelLoadError, match=r"an SD 1.x checkpoint .* is a StableDiffusionXLPipeline") as e:
        load_pipeline(str(models["sd1"]["file"]), config=str(models["sdxl"]["folder"]))
    assert "\n" not in str(e.value)
    with pytest.raises(ModelLoadError) as e:  # same width, other layers: diffusers' own error, on one line
        load_pipeline(str(models["sd1"]["file"]), config=str(models["sd2"]["folder"]))
    assert "\n" not in str(e.value) and "--model-config" in str(e.value)


@pytest.mark.parametrize("keys, match", [
    ({"lora_unet_down_blocks_0.alpha": torch.ones(())}, "no UNet"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, "no SD 1.x/2.x or SDXL text encoder"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3),
      "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 8)}, "inpainting"),
    ({"model.diffusion_model.out.2.bias": torch.zeros(4),
      "conditioner.embedders.0.model.token_embedding.weight": torch.zeros(4, 8)}, "SDXL refiner"),
    ({"model.diffusion_model.out.2.bias": torch.zeros(4),
      "cond_stage_model.transformer.embeddings.token_embedding.weight": torch.zeros(4, 8)}, "old key layout"),
])
def test_files_that_are_not_a_full_model(tmp_path, keys, match):
    path = tmp_path / "thing.safetensors"
    save_file(keys, path)
    with pytest.raises(ModelLoadError, match=match) as e:
        load_pipeline(str(path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, match", [("missing.safetensors", "does not exist"), ("model.gguf", "single-file checkpoints ending in"),
                                         ("broken.safetensors", "not a readable safetensors file")])
def test_bad_paths(tmp_path, name, match):
    if name != "missing.safetensors":
        (tmp_path / name).write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=match):
        load_pipeline(str(tmp_path / name))


def test_identity_moves_between_file_and_folder(tmp_path, models, astronaut, caplog):
    """Learned on the single file, used on the diffusers folder of the same model, and the reverse: no warning."""
    m = models["sd1"]
    cfg = TrainConfig(steps=2, resolution=64, views=2)
    on_file = load_pipeline(str(m["file"]), config=str(m["folder"]))
    alice = personalize(on_file, [astronaut], ["alice"], config=cfg, show_progress=False).identities[0]
    assert alice.metadata["base_model"] == "tinyVision.safetensors"
    images = generate(on_file, "<alice> person", steps=2, height=64, width=64, show_progress=False)
    assert images[0].image.size == (64, 64)
    path = alice.save(tmp_path / "alice.safetensors")
    assert Identity.load(path).metadata["base_model"] == "tinyVision.safetensors"

    on_folder = load_pipeline(str(m["folder"]))
    bob = personalize(on_folder, [astronaut], ["bob"], config=cfg, show_progress=False).identities[0]
    caplog.clear()
    load_identity(load_pipeline(str(m["folder"])), path)
    load_identity(load_pipeline(str(m["file"]), config=str(m["folder"])), bob)
    assert "different text encoder" not in caplog.text


def test_cached_family_config_loads_offline(models, no_hub):
    """Without --model-config the family's configuration comes from the Hugging Face cache, with no network."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + family_named("sd1").default_model.replace("/", "--"))
    commit = "0" * 40
    configs_only(models["sd1"]["folder"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    pipe = load_pipeline(str(models["sd1"]["file"]))
    assert torch.equal(pipe.unet.conv_in.weight, load_pipeline(str(models["sd1"]["folder"])).unet.conv_in.weight)


def test_fp16_variant_and_dtype_for_every_module(tmp_path):
    from celebbasis.testing import tiny_pipeline

    folder = tmp_path / "fp16-only"
    tiny_pipeline(seed=0).save_pretrained(folder, variant="fp16")  # only *.fp16.safetensors files, as many hub repos have
    assert not list(folder.rglob("diffusion_pytorch_model.safetensors"))
    pipe = load_pipeline(str(folder), device="cpu", dtype="float16")
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float16}
    full = load_pipeline(str(folder), device="cpu", dtype="bfloat16")  # other dtypes: the same files, cast
    assert {full.unet.dtype, full.vae.dtype, full.text_encoder.dtype} == {torch.bfloat16}
