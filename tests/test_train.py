"""Personalization on the tiny model with real faces."""

from __future__ import annotations

import ast
import copy
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from celebbasis.basis import build_basis
from celebbasis.errors import InputError
from celebbasis.face import same_person_threshold
from celebbasis.identity import Identity
from celebbasis.config import TrainConfig
from celebbasis.prompts import TEMPLATES
from celebbasis.testing import tiny_pipeline
from celebbasis.train import PersonalizeResult, Personalizer, personalize
from celebbasis.train.augment import ViewJitter, augment_view
from celebbasis.train.trainer import needs_loss_scaling

CFG = dict(resolution=64, seed=0, views=4)
SRC = Path(__file__).parents[1] / "src" / "celebbasis"


def frozen_state(pipe):
    return {f"{m}.{k}": v.detach().clone() for m in ("vae", "unet", "text_encoder")
            for k, v in getattr(pipe, m).state_dict().items()}


def module_flags(pipe):
    """Every parameter's requires_grad and every submodule's train/eval mode."""
    mods = ("vae", "unet", "text_encoder")
    grads = {f"{m}.{k}": p.requires_grad for m in mods for k, p in getattr(pipe, m).named_parameters()}
    modes = {f"{m}.{k}": sub.training for m in mods for k, sub in getattr(pipe, m).named_modules()}
    return grads, modes


class Spy:
    """A face network that records every face it is shown and passes it on."""

    def __init__(self, net):
        self.net, self.name, self.embedding_dim, self.landmarks = net, net.name, net.embedding_dim, net.landmarks
        self.seen = []

    def align(self, image, face):
        return self.net.align(image, face)

    def embed(self, aligned):
        self.seen.append(np.asarray(aligned).copy())
        return self.net.embed(aligned)


def trainer_for(pipe, people, names=("alice",), **cfg):
    basis = build_basis(pipe.tokenizer, pipe.text_encoder)
    face_net = cfg.pop("face_net", None)
    return Personalizer(pipe, list(people), list(names), TrainConfig(**{**CFG, **cfg}), basis, "tiny", face_net=face_net)


# -- the recipe ---------------------------------------------------------------------------------------

def test_training_changes_only_the_identity_network(tiny_pipe, astronaut):
    before, flags = frozen_state(tiny_pipe), module_flags(tiny_pipe)
    result = personalize(tiny_pipe, [astronaut], ["alice"], config=TrainConfig(steps=3, **CFG), show_progress=False)
    after = frozen_state(tiny_pipe)
    for k, v in before.items():
        if k.endswith("token_embedding.weight"):
            assert torch.equal(after[k][:49408], v)  # the vocabulary's rows never change
            assert torch.allclose(after[k][49408:], result.identities[0].embeddings)  # new word ready to draw
        else:
            assert torch.equal(after[k], v), k
    assert module_flags(tiny_pipe) == flags  # requires_grad and modes given back as found


def test_the_official_81_templates():
    assert len(TEMPLATES) == 81  # ldm/data/face_id.py imagenet_templates_small, repeats kept
    assert "a depiction of a {}" in TEMPLATES and "an illustration of a {}" in TEMPLATES
    assert TEMPLATES[0] == "a photo of a {}" and TEMPLATES[27] == "an illustration of a {}"
    assert TEMPLATES[54] == "a depiction of a {}" and TEMPLATES[-1] == "a depiction of a small {}"
    assert TEMPLATES.count("a rendering of a {}") == 3  # repeats weigh the draw as in the official list


def test_loss_on_a_fixed_batch_goes_down(tiny_pipe, astronaut):
    trainer = trainer_for(tiny_pipe, [astronaut], learning_rate=5e-2)
    assert isinstance(trainer.opt, torch.optim.AdamW) and trainer.opt.param_groups[0]["weight_decay"] == 0.01
    batch = trainer.sample_batch()
    with torch.no_grad():
        first = trainer.loss(batch).item()
    w0 = trainer.heads[0].linear.weight.detach().clone()
    for _ in range(15):
        trainer.step(batch)
    with torch.no_grad():
        last = trainer.loss(batch).item()
    assert last < first
    assert not torch.equal(trainer.heads[0].linear.weight, w0)


def test_weight_decay_comes_from_the_config(tiny_pipe, astronaut):
    assert TrainConfig().weight_decay == 0.01  # torch's AdamW default, as the official optimiser
    trainer = trainer_for(tiny_pipe, [astronaut], weight_decay=0.05, face_per_photo=True, views=1)
    assert trainer.opt.param_groups[0]["weight_decay"] == 0.05


def test_v_prediction_target(astronaut):
    pipe = tiny_pipeline(prediction_type="v_prediction")
    trainer = trainer_for(pipe, [astronaut], face_per_photo=True)
    b = trainer.sample_batch()
    ac = trainer.noise_scheduler.alphas_cumprod[b["timesteps"]].view(-1, 1, 1, 1)
    v = ac.sqrt() * b["noise"] - (1 - ac).sqrt() * b["latents"]  # v = alpha_t * eps - sigma_t * x0
    assert torch.allclose(b["target"], v, atol=1e-5)
    assert torch.isfinite(torch.tensor(trainer.step(b)))


@pytest.mark.parametrize("momentum, kept", [(0.0, "last view"), (1 - 1e-9, "first view")])
def test_saved_coefficients_are_the_moving_average_over_views(tiny_pipe, astronaut, momentum, kept):
    # The average's two ends, without restating its formula: momentum 0 keeps the last view's prediction,
    # momentum ~1 the first one (the average starts from the first prediction, not from random numbers).
    trainer = trainer_for(copy.deepcopy(tiny_pipe), [astronaut], ema_momentum=momentum)
    seen = []
    for _ in range(3):
        batch = trainer.sample_batch()
        with torch.no_grad():
            seen.append(trainer.coefficients(batch)[0].clone())  # encoder 0: (B, K, n), each view its own
        trainer.step(batch)
    views = [c for step in seen for c in step]
    expected = views[-1] if kept == "last view" else views[0]
    ident = trainer.identities()[0]
    assert torch.allclose(ident.coefficients, expected, atol=1e-5)
    assert not torch.allclose(views[0], views[-1], atol=1e-3)  # training moved: the two ends differ


def test_saved_average_is_not_renormalised(tiny_pipe, astronaut):
    # As the official code samples: the raw moving average of unit rows, shorter where the predictions varied.
    trainer = trainer_for(copy.deepcopy(tiny_pipe), [astronaut], ema_momentum=0.5, learning_rate=0.5)
    for _ in range(3):
        trainer.step()
    lengths = trainer.identities()[0].coefficients.norm(dim=-1)
    assert (lengths < 1 - 1e-4).all() and (lengths > 0.5).all()


def test_learning_rate_scales_with_the_batch(tiny_pipe, astronaut):
    # The official code's AdamW rate is its base rate x batch size; scale_lr=False takes the rate as given.
    assert trainer_for(tiny_pipe, [astronaut], batch_size=3).opt.param_groups[0]["lr"] == pytest.approx(3 * 5e-3)
    unscaled = trainer_for(tiny_pipe, [astronaut], batch_size=3, learning_rate=0.02, scale_lr=False)
    assert unscaled.opt.param_groups[0]["lr"] == 0.02


def test_joint_training_saves_each_person(tmp_path, tiny_pipe, astronaut, hopper):
    result = personalize(tiny_pipe, [astronaut, hopper], ["alice", "grace"], config=TrainConfig(steps=4, **CFG),
                         show_progress=False)
    paths = result.save(tmp_path)
    assert [p.name for p in paths] == ["alice.safetensors", "grace.safetensors"]
    a, g = (Identity.load(p) for p in paths)
    assert a.token == "<alice>" and g.token == "<grace>"
    assert a.metadata["source_photos"] == ["astronaut.png"] and a.metadata["source_photo"] == "astronaut.png"
    assert not torch.allclose(a.coefficients, g.coefficients)
    run = json.loads((tmp_path / "alice.run.json").read_text())
    assert run["names"] == ["alice", "grace"] and run["config"]["steps"] == 4 and len(run["losses"]) == 4
    assert run["seed"] == 0 and "torch_version" in run and run["face_vectors"] == "per view"
    with pytest.raises(InputError, match="already exists"):
        result.save(tmp_path)


def test_same_seed_same_identity(_tiny_pipe, astronaut):
    runs = [personalize(copy.deepcopy(_tiny_pipe), [astronaut], ["a"], config=TrainConfig(steps=2, **CFG),
                        show_progress=False) for _ in range(2)]
    assert torch.equal(runs[0].identities[0].coefficients, runs[1].identities[0].coefficients)
    assert runs[0].losses == runs[1].losses


# -- augmentation as the official dataset ------------------------------------------------------------

def test_augment_keeps_size_and_black_canvas(astronaut):
    rng = np.random.default_rng(0)
    cfg = TrainConfig(min_scale=0.3, max_scale=0.3)
    view = np.asarray(augment_view(astronaut.crop(128), 128, rng, cfg)[0])
    assert view.shape == (128, 128, 3)
    filled = (view.sum(-1) > 0).mean()
    assert 0.05 < filled <= 0.3 * 0.33 + 0.01  # height 30 % of the side, width 0.9-1.1 of that, rest black


def test_jitter_is_drawn_like_torchvision_colorjitter():
    rng = np.random.default_rng(0)
    draws = [ViewJitter.draw(rng, TrainConfig()) for _ in range(400)]
    assert 0.4 < np.mean([d.flip for d in draws]) < 0.6  # p = 0.5
    assert all(sorted(d.order) == [0, 1, 2, 3] for d in draws)
    assert {d.order[0] for d in draws} == {0, 1, 2, 3} and len({d.order for d in draws}) > 20  # random order
    factors = np.array([d.factors for d in draws])  # brightness, contrast, saturation, hue
    assert (factors[:, :3] >= 0.8).all() and (factors[:, :3] <= 1.2).all() and np.abs(factors[:, 3]).max() <= 0.01
    assert factors[:, :3].min() < 0.82 and factors[:, :3].max() > 1.18
    off = ViewJitter.draw(rng, TrainConfig(jitter=0.0, hue=0.0))
    assert off.factors == (None, None, None, None)  # skipped, as torchvision skips a zero range


def test_colour_order_matters_and_flip_commutes(astronaut):
    im = astronaut.crop(64)
    factors = (1.2, 0.8, 1.2, 0.01)
    forward = np.asarray(ViewJitter(False, (0, 1, 2, 3), factors)(im))
    backward = np.asarray(ViewJitter(False, (3, 2, 1, 0), factors)(im))
    assert not np.array_equal(forward, backward)
    flipped = np.asarray(ViewJitter(True, (0, 1, 2, 3), factors)(im))
    assert np.array_equal(flipped, forward[:, ::-1])
    assert ViewJitter(False, (0, 1, 2, 3), (None,) * 4)(im) is im


def test_shrink_like_the_official_add_bg():
    rng = np.random.default_rng(1)
    cfg = TrainConfig(jitter=0.0, hue=0.0, flip_p=0.0)
    white = Image.new("RGB", (100, 100), "white")
    heights = []
    for _ in range(200):
        view = np.asarray(augment_view(white, 100, rng, cfg)[0])
        ys, xs = np.nonzero(view.sum(-1) > 0)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert (view.sum(-1) > 0).sum() == h * w  # one rectangle, black elsewhere
        assert 10 <= h <= 100 and int(0.9 * h) - 1 <= w <= min(100, 1.1 * h)  # width/height in 0.9-1.1
        heights.append(h)
    assert min(heights) < 20 and max(heights) > 90  # height 10-100 % of the canvas


# -- the face network sees every view -----------------------------------------------------------------

def test_each_view_has_its_own_face_vector(tiny_pipe, astronaut, face_analyzer):
    spy = Spy(face_analyzer.encoder)
    trainer = trainer_for(tiny_pipe, [astronaut], views=6, steps=10, face_net=spy)
    faces = trainer.pool[0].face  # (6, 128)
    assert len(spy.seen) == 6 and faces.shape == (6, 128)
    grey = astronaut.aligned.astype(np.float32).mean(-1)
    flips = []
    for chip in spy.seen:  # the network's own input, flipped or not and colour-jittered
        assert chip.shape == astronaut.aligned.shape and not np.array_equal(chip, astronaut.aligned)
        plain, mirror = (np.corrcoef(chip.astype(np.float32).mean(-1).ravel(), g.ravel())[0, 1] for g in (grey, grey[:, ::-1]))
        assert max(plain, mirror) > 0.97  # the same chip up to brightness and contrast
        flips.append(mirror > plain)
    assert any(flips) and not all(flips)
    assert len({tuple(f.tolist()) for f in faces}) == 6  # six different vectors
    assert (faces @ torch.from_numpy(astronaut.embedding) > 0.95).all()  # all of the same person
    batch = trainer.sample_batch()
    assert all(any(torch.equal(f, g) for g in faces) for f in batch["faces"])
    assert torch.allclose(trainer.coefficients(batch)[0], trainer.heads[0](batch["faces"]))  # each sample its own input


@pytest.mark.parametrize("views, expect_pool", [(6, True), (0, False)])
def test_frozen_work_is_done_once(tiny_pipe, astronaut, face_analyzer, views, expect_pool):
    spy = Spy(face_analyzer.encoder)
    calls = []
    encode = tiny_pipe.vae.encode
    tiny_pipe.vae.encode = lambda x, *a, **k: calls.append(len(x)) or encode(x, *a, **k)
    trainer = trainer_for(tiny_pipe, [astronaut], steps=10, views=views, face_net=spy)
    built, embedded = sum(calls), len(spy.seen)
    for _ in range(5):
        trainer.step()
    if expect_pool:
        assert built == embedded == 6 and sum(calls) == 6 and len(spy.seen) == 6  # neither runs inside the loop
        assert trainer.pool[0].mean.shape == (6, 4, 8, 8)
    else:
        assert built == embedded == 0 and sum(calls) == 10 and len(spy.seen) == 10  # the recipe's way: new views
    b = trainer.sample_batch()
    for cap in b["captions"]:
        assert any(cap == t.format("face of <alice> person") for t in TEMPLATES)


# -- checks and state -----------------------------------------------------------------------------------

@pytest.mark.parametrize("names, match", [(["a", "a"], "more than once"), (["a"], "2 photo"), (["a b", "c"], "Invalid name")])
def test_bad_names_fail_before_training(tiny_pipe, astronaut, names, match):
    with pytest.raises(InputError, match=match):
        personalize(tiny_pipe, [astronaut, astronaut], names, config=TrainConfig(steps=1, **CFG), show_progress=False)


@pytest.mark.parametrize("kwargs", [dict(steps=-1), dict(resolution=100), dict(min_scale=0.0), dict(ema_momentum=1.0),
                                    dict(face_dim=-1), dict(flip_p=1.5), dict(jitter=1.0), dict(aspect_jitter=1.0)])
def test_config_validation(kwargs):
    with pytest.raises(InputError):
        TrainConfig(**kwargs)


def test_a_joint_run_refuses_two_face_encoders(tiny_pipe, astronaut, hopper):
    import dataclasses

    other = dataclasses.replace(hopper, encoder_name="arcface-r100:0123456789ab")
    with pytest.raises(InputError, match="different face encoders"):
        personalize(tiny_pipe, [astronaut, other], ["a", "b"], config=TrainConfig(steps=1, **CFG), show_progress=False)


@pytest.mark.parametrize("mark", ["unet hook", "pipeline hooks"])
def test_an_offloaded_pipeline_is_refused(tiny_pipe, astronaut, mark):
    if mark == "unet hook":
        tiny_pipe.unet.down_blocks[0]._hf_hook = object()  # what accelerate's add_hook_to_module leaves
    else:
        tiny_pipe._all_hooks = [object()]  # what enable_model_cpu_offload leaves
    with pytest.raises(InputError, match="offload"):
        personalize(tiny_pipe, [astronaut], ["a"], config=TrainConfig(steps=1, **CFG), show_progress=False)


@pytest.mark.parametrize("device, dtypes, expected", [
    ("cuda", [torch.float16], True), ("cuda", [torch.bfloat16, torch.float16], True),
    ("cuda", [torch.bfloat16], False), ("cuda", [torch.float32], False),
    ("mps", [torch.float16], False), ("cpu", [torch.float16], False),
])
def test_loss_scaling_only_for_cuda_float16(device, dtypes, expected):
    assert needs_loss_scaling(device, dtypes) is expected


def test_the_pipeline_is_given_back_as_found_even_after_an_error(tiny_pipe, astronaut):
    unet = tiny_pipe.unet
    unet.train()
    unet.conv_in.requires_grad_(False)  # an unusual state, to be given back exactly
    before = module_flags(tiny_pipe)
    assert not unet.is_gradient_checkpointing

    def stop(step, total, loss):
        assert unet.is_gradient_checkpointing and not unet.training and not unet.conv_out.weight.requires_grad
        if step == 2:
            raise RuntimeError("stopped by the user")

    with pytest.raises(RuntimeError, match="stopped"):
        personalize(tiny_pipe, [astronaut], ["a"], config=TrainConfig(steps=5, low_memory=True, **CFG),
                    callback=stop, show_progress=False)
    assert module_flags(tiny_pipe) == before and not unet.is_gradient_checkpointing


def test_no_global_random_state_is_touched(tiny_pipe, astronaut):
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    personalize(tiny_pipe, [astronaut], ["a"], config=TrainConfig(steps=2, **CFG), show_progress=False)
    assert torch.equal(torch.random.get_rng_state(), states[0])
    np_state = np.random.get_state()
    assert np.array_equal(np_state[1], states[1][1]) and np_state[2] == states[1][2]
    assert random.getstate() == states[2]
    for path in [*(SRC / "train").glob("*.py"), SRC / "identity.py", SRC / "insert.py"]:
        module, text = path.name, path.read_text()
        for call in ("torch.manual_seed(", "np.random.seed(", "random.seed(", "torch.cuda.manual_seed"):
            assert call not in text, (module, call)


def test_low_memory_runs_checkpointing_with_the_same_loss_and_gradient(_tiny_pipe, astronaut):
    def run(low_memory):
        pipe = copy.deepcopy(_tiny_pipe)
        trainer = trainer_for(pipe, [astronaut], low_memory=low_memory, face_per_photo=True)
        assert pipe.unet.is_gradient_checkpointing == low_memory
        calls = []
        block = pipe.unet.up_blocks[-1].resnets[-1]  # after cross-attention: its activations depend on the words
        block.register_forward_pre_hook(lambda *_: calls.append(1))  # pre: recomputation may stop before the end
        batch = trainer.sample_batch()
        loss = trainer.loss(batch)
        forward = len(calls)
        loss.backward()
        trainer.close()
        assert not pipe.unet.is_gradient_checkpointing  # given back
        return loss.item(), trainer.heads[0].linear.weight.grad.clone(), forward, len(calls) - forward

    (l0, g0, f0, b0), (l1, g1, f1, b1) = run(False), run(True)
    assert f0 == f1 == 1 and b0 == 0 and b1 == 1  # checkpointing recomputes the block during backward
    assert l0 == pytest.approx(l1, abs=1e-6)
    assert torch.allclose(g0, g1, atol=1e-5)


def test_functions_stay_short():
    sizes = {}
    for path in (SRC / "train").glob("*.py"):
        tree = ast.parse(path.read_text())
        sizes.update({(path.stem, n.name): n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)})
    assert sizes[("run", "personalize")] <= 60 and sizes[("trainer", "__init__")] <= 60
    assert max(sizes.values()) <= 76  # STYLE.md: no function over ~76 lines


# -- several photos of one person ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def alice_photos(tmp_path_factory, face_analyzer, astronaut_path, mirrored_path):
    """Three photos of one person: the original, its mirror image, and a cropped, rescaled copy."""
    im = Image.open(astronaut_path).convert("RGB")
    w, h = im.size
    path = tmp_path_factory.mktemp("alice") / "astronaut_cropped.jpg"
    im.crop((w // 16, h // 16, w - w // 16, h - h // 10)).resize((int(w * 0.7), int(h * 0.66))).save(path, quality=92)
    return [face_analyzer(p) for p in (astronaut_path, mirrored_path, path)]


@pytest.fixture(scope="module")
def grace_photos(tmp_path_factory, face_analyzer, hopper_path, hopper):
    im = Image.open(hopper_path).convert("RGB")
    path = tmp_path_factory.mktemp("grace") / "hopper_small.png"
    im.resize((im.width * 3 // 4, im.height * 3 // 4)).save(path)
    return [hopper, face_analyzer(path)]


def test_several_photos_make_one_identity(tmp_path, tiny_pipe, face_analyzer, alice_photos, caplog):
    result = personalize(tiny_pipe, [alice_photos], ["alice"], config=TrainConfig(steps=3, **{**CFG, "views": 6}),
                         face_analyzer=face_analyzer, show_progress=False)
    assert len(result.identities) == 1
    (path,) = result.save(tmp_path)
    ident = Identity.load(path)
    assert ident.metadata["source_photos"] == ["astronaut.png", "astronaut_mirrored.png", "astronaut_cropped.jpg"]
    assert ident.metadata["source_photo"] == "astronaut.png"
    run = json.loads((tmp_path / "alice.run.json").read_text())
    assert len(run["photos"]["alice"]) == 3
    agreement = run["photo_agreement"]["alice"]
    assert [Path(x["photo"]).name for x in agreement] == ident.metadata["source_photos"]
    assert all(x["cosine_to_mean"] > 0.95 for x in agreement)
    assert "does not look like" not in caplog.text


def test_views_spread_over_photos_and_cost_no_more(tiny_pipe, alice_photos, astronaut):
    one = trainer_for(copy.deepcopy(tiny_pipe), [astronaut], views=6, steps=10)
    three = trainer_for(tiny_pipe, [alice_photos], views=6, steps=10)
    assert three.pool[0].mean.shape == one.pool[0].mean.shape == (6, 4, 8, 8)  # the pool stays views
    assert three.pool[0].photo.bincount().tolist() == [2, 2, 2]  # evenly over the photos
    for face, p in zip(three.pool[0].face, three.pool[0].photo):  # each view's vector from its own photo
        own = torch.from_numpy(alice_photos[p].embedding)
        assert face @ own >= max(face @ torch.from_numpy(a.embedding) for a in alice_photos) - 0.02


def test_two_people_with_two_photos_each_learn_jointly(tmp_path, tiny_pipe, face_analyzer, alice_photos, grace_photos):
    result = personalize(tiny_pipe, [alice_photos[:2], grace_photos], ["alice", "grace"],
                         config=TrainConfig(steps=4, **CFG), face_analyzer=face_analyzer, show_progress=False)
    a, g = result.identities
    assert a.metadata["source_photos"] == ["astronaut.png", "astronaut_mirrored.png"]
    assert g.metadata["source_photos"] == ["grace_hopper.jpg", "hopper_small.png"]
    assert not torch.allclose(a.coefficients, g.coefficients)
    assert set(result.run["photo_agreement"]) == {"alice", "grace"}


def test_a_photo_of_someone_else_is_named(tiny_pipe, face_analyzer, alice_photos, hopper, caplog):
    caplog.set_level(logging.WARNING, logger="celebbasis.train")
    personalize(tiny_pipe, [alice_photos[:2] + [hopper]], ["alice"], config=TrainConfig(steps=1, **CFG),
                face_analyzer=face_analyzer, show_progress=False)
    warnings = [r.getMessage() for r in caplog.records if "does not look like" in r.getMessage()]
    assert len(warnings) == 1 and "grace_hopper.jpg" in warnings[0] and "leave it out of alice's photos" in warnings[0]


def test_identical_photos_count_once(tiny_pipe, face_analyzer, astronaut, caplog):
    caplog.set_level(logging.INFO, logger="celebbasis.train")
    result = personalize(tiny_pipe, [[astronaut, astronaut]], ["alice"], config=TrainConfig(steps=1, **CFG),
                         face_analyzer=face_analyzer, show_progress=False)
    assert result.identities[0].metadata["source_photos"] == ["astronaut.png"]
    assert "counts it once" in caplog.text


def test_same_person_thresholds_separate_the_test_faces(astronaut, hopper, alice_photos):
    threshold = same_person_threshold(astronaut.encoder_name)
    assert threshold == same_person_threshold(type("Enc", (), {"name": "dlib-resnet-v1"})())
    assert float(astronaut.embedding @ hopper.embedding) < threshold  # two people
    assert all(float(a.embedding @ b.embedding) > threshold for a in alice_photos for b in alice_photos)
    assert same_person_threshold(type("Enc", (), {"same_person_cosine": 0.5, "name": "x"})()) == 0.5


# -- saving a group ---------------------------------------------------------------------------------------

@pytest.fixture
def two_identities(tiny_pipe):
    basis = build_basis(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    g = torch.Generator().manual_seed(0)
    coeffs = [torch.nn.functional.normalize(torch.randn(2, 32, generator=g), dim=-1) for _ in range(2)]
    people = [Identity.from_coefficients(t, c, basis) for t, c in zip(("<alice>", "<grace>"), coeffs)]
    return PersonalizeResult(people, [0.1], {"names": ["alice", "grace"]})


def test_save_writes_all_of_a_group_or_none(tmp_path, two_identities, monkeypatch):
    (tmp_path / "grace.safetensors").mkdir()  # in the way: found before anything is written
    with pytest.raises(InputError, match="is a folder"):
        two_identities.save(tmp_path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["grace.safetensors"]
    (tmp_path / "grace.safetensors").rmdir()

    real_save = Identity.save

    def failing_save(self, path):
        if self.name == "grace":
            raise OSError("disk full")
        return real_save(self, path)

    monkeypatch.setattr(Identity, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        two_identities.save(tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(Identity, "save", real_save)

    import os

    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "grace.run.json" and Path(src).name.endswith(".staged"):
            raise OSError("gone")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="gone"):
        two_identities.save(tmp_path)
    assert list(tmp_path.iterdir()) == []  # alice's files, already in place, were taken back
    monkeypatch.setattr(os, "replace", real_replace)
    assert [p.name for p in two_identities.save(tmp_path)] == ["alice.safetensors", "grace.safetensors"]
    names = ["alice.run.json", "alice.safetensors", "grace.run.json", "grace.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names

    # Overwriting: a failure half-way puts every old file back as it was.
    before = {n: (tmp_path / n).read_bytes() for n in names}
    two_identities.run["names"] = ["changed"]
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="gone"):
        two_identities.save(tmp_path, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    two_identities.save(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert json.loads((tmp_path / "alice.run.json").read_text())["names"] == ["changed"]


def test_a_failed_or_cancelled_run_leaves_no_words_behind(tiny_pipe, astronaut):
    tokenizer, rows = tiny_pipe.tokenizer, tiny_pipe.text_encoder.get_input_embeddings().num_embeddings

    def cancel(step, total, loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        personalize(tiny_pipe, [astronaut], ["alice"], config=TrainConfig(steps=3, **CFG), show_progress=False, callback=cancel)
    odd = copy.deepcopy(tiny_pipe)
    odd.scheduler.register_to_config(prediction_type="sample")  # refused during set-up, after the words were made
    with pytest.raises(InputError, match="prediction type"):
        personalize(odd, [astronaut], ["alice"], config=TrainConfig(steps=1, **CFG), show_progress=False)
    for pipe in (tiny_pipe, odd):
        assert "<alice>" not in pipe.tokenizer.get_added_vocab()
        assert pipe.text_encoder.get_input_embeddings().num_embeddings == rows
    assert tiny_pipe.tokenizer is tokenizer  # the caller's own tokenizer object, given back
