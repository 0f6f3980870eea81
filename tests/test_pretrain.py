"""Instant identities: the identity network pretrained on the model's own celebrities.

The shipped toy network's instant identity of a held-out person must be far above no identity, and
the same check fails with a random network in its place (``test_a_random_network_fails_the_instant_check``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import celebbasis as cb
from celebbasis import toy
from celebbasis.config import PretrainConfig
from celebbasis.errors import FileFormatError, InputError
from celebbasis.identity import IdentityEncoder
from celebbasis.pretrain import PretrainedNetwork, fit_mlp, fit_ridge, pretrain, resolve_pretrained
from celebbasis.toy import world

PROMPTS = ["a photo of <p> person on a green background", "<p> person wearing a red shirt",
           "<p> person smiling on a blue background", "an illustration of <p> person on a yellow background"]
# Measured with the shipped network on person-2 (one thread, 2 images a prompt): 0.67 instantly, against 0.15
# with no identity; with its weights replaced by random ones (the e2e test below): 0.33. The held-out people's
# mean is in benchmarks/README.md.
INSTANT_GATE = 0.5
QUICK = dict(max_names=24, drawings=2, sample_steps=10, batch=16, min_names=1, filter=False, fit_steps=20)


@pytest.fixture(scope="module")
def quick_net(toy_pipe, toy_analyzer, tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrained") / "net.safetensors"
    return pretrain(toy_pipe, toy_analyzer, path, config=PretrainConfig(**QUICK), base_model="toy"), path


def _truth(i: int) -> world.Person:
    return world.Person(**json.loads((toy.toy_dir() / "people" / "people.json").read_text())[f"person-{i}.png"])


def _instant_likeness(pipe, toy_analyzer, pretrained, i: int = 2) -> float:
    result = cb.personalize(pipe, [str(toy.toy_photo(i))], ["p"], face_analyzer=toy_analyzer, show_progress=False,
                            config=cb.TrainConfig.preset("toy", steps=0, pretrained=str(pretrained)))
    assert result.identities[0].metadata["steps"] == 0
    images = [r.image for r in cb.generate(pipe, PROMPTS, identities=result.identities, num_images=2, show_progress=False)]
    return toy.score(images, _truth(i), [p for p in PROMPTS for _ in range(2)])["likeness"]


def test_ridge_and_the_fit_recover_a_known_map():
    g = torch.Generator().manual_seed(0)
    faces = torch.nn.functional.normalize(torch.randn(600, 32, generator=g), dim=-1)
    truth = IdentityEncoder(32, 2, 16, lift_to=64, seed=3)
    with torch.no_grad():
        targets = truth(faces)
    ridge = fit_ridge(faces[:500], targets[:500], 64, alpha=1e-4)
    with torch.no_grad():
        cos = (ridge(faces[500:]) * targets[500:]).sum(-1).mean()
    assert cos > 0.9
    mlp = fit_mlp(ridge.requires_grad_(True), faces[:500], targets[:500], steps=50, learning_rate=1e-3, weight_decay=0, seed=0)
    with torch.no_grad():
        assert (mlp(faces[500:]) * targets[500:]).sum(-1).mean() >= cos - 0.02
        pre = torch.nn.functional.linear(faces @ mlp.lift.T, mlp.linear.weight, mlp.linear.bias)
    assert 0.5 < float(pre.pow(2).mean().sqrt()) < 2  # as large as a fresh network's, so Adam's steps move it alike


def test_pretrain_writes_a_network_with_its_record(quick_net):
    net, path = quick_net
    loaded = PretrainedNetwork.load(path)
    m = loaded.metadata
    assert m["face_encoder"] == toy.TOY_FACE_ENCODER and m["base_model"] == "toy"
    assert m["counts"]["drawings"] == 48 and len(m["names_kept"]) == m["counts"]["names_kept"] <= 24
    assert m["pretrain_config"]["drawings"] == 2 and m["seed"] == "0"
    assert not path.with_name("net.work.safetensors").exists()
    faces = torch.nn.functional.normalize(torch.randn(3, 512), dim=-1)
    for a, b in zip(net.predict(faces), loaded.predict(faces)):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a.norm(dim=-1), torch.ones(3, 2))


def test_a_stopped_pretraining_resumes_to_the_same_network(toy_pipe, toy_analyzer, quick_net, tmp_path):
    path = tmp_path / "net.safetensors"

    def stop(done, total, seconds):
        if done == 16:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(toy_pipe, toy_analyzer, path, config=PretrainConfig(**QUICK), base_model="toy", progress=stop)
    assert not path.exists() and path.with_name("net.work.safetensors").exists()
    seen = []
    pretrain(toy_pipe, toy_analyzer, path, config=PretrainConfig(**QUICK), base_model="toy",
             progress=lambda done, total, s: seen.append(done))
    assert seen[0] == 32  # carried on after the first chunk
    faces = torch.nn.functional.normalize(torch.randn(4, 512), dim=-1)
    for a, b in zip(quick_net[0].predict(faces), PretrainedNetwork.load(path).predict(faces)):
        torch.testing.assert_close(a, b)


def test_drawings_of_another_model_or_setting_are_not_resumed(toy_pipe, toy_analyzer, tmp_path):
    path = tmp_path / "net.safetensors"

    def stop(done, total, seconds):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(toy_pipe, toy_analyzer, path, config=PretrainConfig(**QUICK), base_model="toy", progress=stop)
    work = path.with_name("net.work.safetensors")
    before = work.read_bytes()
    # same names, seeds and counts, but drawn otherwise: its face vectors are not this run's
    with pytest.raises(InputError, match="another model or setting.*sample_steps"):
        pretrain(toy_pipe, toy_analyzer, path, config=PretrainConfig(**{**QUICK, "sample_steps": 5}), base_model="toy")
    assert not path.exists() and work.read_bytes() == before


def test_a_network_is_refused_on_another_model_or_face_network(quick_net, tiny_pipe, astronaut, toy_pipe, tmp_path):
    _, path = quick_net
    with pytest.raises(InputError, match="another model") as e:
        cb.personalize(tiny_pipe, [astronaut], ["p"], config=cb.TrainConfig(steps=1, pretrained=str(path)),
                       show_progress=False)
    assert "\n" not in str(e.value)
    dlib_face = astronaut  # read by dlib, the network by the toy face network
    with pytest.raises(InputError, match="face network"):
        cb.personalize(toy_pipe, [dlib_face], ["p"], show_progress=False,
                       config=cb.TrainConfig.preset("toy", steps=0, pretrained=str(path)))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(FileFormatError):
        PretrainedNetwork.load(empty)


def test_instant_needs_a_network(tiny_pipe, astronaut):
    with pytest.raises(InputError, match="instant identity") as e:
        cb.personalize(tiny_pipe, [astronaut], ["p"], config=cb.TrainConfig(steps=0), show_progress=False)
    assert e.value.field == "pretrained"
    with pytest.raises(InputError, match="steps=0"):
        cb.TrainConfig(steps=0, pretrained="none")


def test_too_few_consistent_celebrities_is_refused(toy_pipe, toy_analyzer, tmp_path):
    cfg = PretrainConfig(**{**QUICK, "filter": True, "min_agreement": 1.01, "min_names": 5})
    with pytest.raises(InputError, match="celebrities are drawn as one person"):
        pretrain(toy_pipe, toy_analyzer, tmp_path / "n.safetensors", config=cfg, base_model="toy")
    assert not (tmp_path / "n.safetensors").exists()


def test_the_toy_world_ships_its_network(toy_pipe):
    net = resolve_pretrained("auto", toy_pipe)
    assert net is not None and net.name == toy.PRETRAINED_FILE
    assert resolve_pretrained("none", toy_pipe) is None
    assert (toy.toy_dir() / toy.PRETRAINED_FILE).stat().st_size < 3e6


def test_a_warm_start_begins_at_the_instant_identity(toy_pipe, toy_analyzer):
    from celebbasis.models import resolve_bases
    from celebbasis.train import Personalizer

    net = resolve_pretrained("auto", toy_pipe)
    face = toy_analyzer(toy.toy_photo(2))
    cfg = cb.TrainConfig.preset("toy", steps=2)
    with Personalizer(toy_pipe, [[face]], ["w"], cfg, resolve_bases(toy_pipe, None, None, "toy"), "toy",
                      face_net=toy_analyzer.encoder, pretrained=net) as t:
        before = t.identities()[0].coefficients
        torch.testing.assert_close(before, net.predict(face.embedding)[0][0])
        t.step()
        assert t.heads[0].linear.weight.requires_grad
    assert not net.heads[0].linear.weight.requires_grad  # the network itself is not trained


def test_the_shipped_network_draws_a_new_person_instantly(toy_pipe, toy_analyzer):
    """One forward pass, no training: a held-out person's attributes come back far above no identity."""
    floor = toy.score([r.image for r in cb.generate(toy_pipe, [p.replace("<p>", "a") for p in PROMPTS], num_images=2,
                                                     show_progress=False)], _truth(2), PROMPTS * 2)["likeness"]
    instant = _instant_likeness(toy_pipe, toy_analyzer, toy.toy_dir() / toy.PRETRAINED_FILE)
    assert instant >= INSTANT_GATE > floor + 0.15, (instant, floor)


@pytest.mark.e2e
def test_a_random_network_fails_the_instant_check(toy_pipe, toy_analyzer, tmp_path):
    """The instant check above, with the shipped network's weights replaced by random ones: below the gate."""
    net = PretrainedNetwork.load(toy.toy_dir() / toy.PRETRAINED_FILE)
    g = torch.Generator().manual_seed(0)
    for h in net.heads:
        h.linear.weight.copy_(torch.randn(h.linear.weight.shape, generator=g))
    net.save(tmp_path / "random.safetensors")
    assert _instant_likeness(toy_pipe, toy_analyzer, tmp_path / "random.safetensors") < INSTANT_GATE


def test_the_command_line_pretrains_and_adds_instantly(tmp_path, capsys):
    from celebbasis.cli import main

    net = tmp_path / "net.safetensors"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in QUICK.items() if k != "filter"] + ["--no-filter", "--toy", "-q"]
    assert main(["pretrain", "-o", str(net), *flags]) == 0
    assert main(["pretrain", "-o", str(net), *flags]) == 2  # no overwrite
    assert "already exists" in capsys.readouterr().err
    photo = str(toy.toy_photo(2))
    assert main(["add", photo, "--name", "p", "--toy", "--steps", "0", "--pretrained", str(net), "-o", str(tmp_path), "-q"]) == 0
    ident = cb.Identity.load(tmp_path / "p.safetensors")
    assert ident.metadata["steps"] == 0 and ident.metadata["pretrained"] == "net.safetensors"
    assert main(["add", photo, "--name", "q", "--toy", "--preset", "paper", "--steps", "0", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("celebbasis: error: --steps 0") and "\n" not in err


def test_instant_identities_compose_and_joint_training_warm_starts(toy_pipe, toy_analyzer):
    """Two new people at once: instant identities (one network pass each), then drawn together and with a
    celebrity; a joint run starts both from the pretrained network."""
    photos = [str(toy.toy_photo(2)), str(toy.toy_photo(3))]
    instant = cb.personalize(toy_pipe, photos, ["a", "b"], face_analyzer=toy_analyzer, show_progress=False,
                             config=cb.TrainConfig.preset("toy", steps=0)).identities
    assert not torch.equal(instant[0].coefficients, instant[1].coefficients)
    images = cb.generate(toy_pipe, ["<a> person and <b> person dancing", "<a> person and Anne Hathaway cooking"],
                         identities=instant, steps=2, show_progress=False)
    assert len(images) == 2
    seen = []
    joint = cb.personalize(toy_pipe, photos, ["c", "d"], face_analyzer=toy_analyzer, show_progress=False,
                           config=cb.TrainConfig.preset("toy", steps=2), preview=lambda s, ids: seen.append((s, ids)))
    assert seen[0][0] == 0  # before the first step, both people are their instant identities
    for x, y in zip(seen[0][1], instant):
        torch.testing.assert_close(x.coefficients, y.coefficients)
    assert all(i.metadata["pretrained"] == toy.PRETRAINED_FILE for i in joint.identities)


def test_a_left_over_run_or_a_wrong_name_is_refused(toy_pipe, toy_analyzer, tmp_path):
    with pytest.raises(InputError, match="is a .safetensors file") as e:
        pretrain(toy_pipe, toy_analyzer, tmp_path / "net.pt", config=PretrainConfig(**QUICK))
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())

    def stop(done, total, seconds):
        raise KeyboardInterrupt

    path = tmp_path / "net.safetensors"
    with pytest.raises(KeyboardInterrupt):
        pretrain(toy_pipe, toy_analyzer, path, config=PretrainConfig(**QUICK), progress=stop)
    with pytest.raises(InputError, match="belongs to another pretraining run. Delete it"):  # another seed: other drawings
        pretrain(toy_pipe, toy_analyzer, path, config=PretrainConfig(**{**QUICK, "seed": 1}))
    assert not path.exists() and path.with_name("net.work.safetensors").exists()
