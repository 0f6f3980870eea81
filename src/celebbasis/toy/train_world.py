"""Train the toy world from scratch: ``python -m celebbasis.toy.train_world`` (``scripts/train-toy-world.sh``).

Stages, each resumable from its last checkpoint in ``--work`` (a finished stage is skipped):
  1. render   the images: celebrities, anonymous people, and the face/scorer people (disjoint sets);
  2. scorer   the attribute classifier (held-out accuracy printed per attribute);
  3. facenet  the CosFace face encoder;
  4. vae      a 4x-downsampling ``AutoencoderKL`` (L1 + small KL);
  5. latents  every diffusion image encoded once;
  6. text     the ``CLIPTextModel`` pretrained to read attributes and colour words from captions;
  7. diffusion  it and a ``UNet2DConditionModel`` trained jointly on captions (EMA weights kept);
  8. decoder  the VAE's decoder trained on, its encoder frozen: the latents the diffusion model learned
              stay the same, the pictures get sharper.
Each stage writes its weights into ``--out`` (the package's ``data/toy``) as it checkpoints, so the
world can be used before it is finished. Deterministic from ``--seed`` for a given thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from . import world
from .nets import ToyFaceNet, ToyScorer, to_tensor

logger = logging.getLogger("celebbasis.toy.train")

TEXT_WIDTH = 64
LATENT_SCALE = 4  # pixels per latent cell


# ---------------------------------------------------------------- rendering
def _render_chunk(items):
    return np.stack([np.asarray(world.render(world.Person(*p), world.Picture(*q))) for p, q in items])


def _render_all(items, workers):
    chunks = [items[i:i + 500] for i in range(0, len(items), 500)]
    with ProcessPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(_render_chunk, chunks)))


def _as_tuple(x):
    return tuple(x.__dict__.values())


GROUPS = ("celeb", "anon", "face", "scorer")  # in the order every stage indexes them


def stage_render(work: Path, args, groups=GROUPS) -> None:
    """Render ``groups`` (one file each, ``render-GROUP.npz``): the people of every group are drawn from the seed
    whatever is rendered, so a group rendered alone is the same images as rendered with the others."""
    groups = [g for g in groups if not (work / f"render-{g}.npz").exists()]
    if not groups:
        return
    from ..resources import celeb_names

    rng = np.random.default_rng(args.seed)
    names = celeb_names()
    celebs = world.celebrities(names)
    held_out = world.held_out_people(names)
    never = set(celebs.values()) | set(held_out)
    anon = world.random_people(args.anon_people, args.seed + 1, never)
    face = world.new_people(args.face_people, args.seed + 2, never)
    scorer = world.random_people(args.scorer_people, args.seed + 3, never)
    scorer += [held_out[i % len(held_out)] for i in range(args.scorer_test)]  # the last ones: held-out test renders
    records = []  # (group, person index or -1, Person, Picture)
    for i, name in enumerate(names):
        for _ in range(args.images_per_celebrity):
            records.append(("celeb", i, celebs[name], world.Picture.random(rng)))
    for i, p in enumerate(anon):
        records.append(("anon", -1, p, world.Picture.random(rng)))
    for i, p in enumerate(face):
        for _ in range(args.images_per_face_person):
            records.append(("face", i, p, world.Picture.random(rng)))
    for i, p in enumerate(scorer):
        records.append(("scorer", i, p, world.Picture.random(rng)))
    for name in groups:
        mine = [r for r in records if r[0] == name]
        t = time.time()
        images = _render_all([(_as_tuple(p), _as_tuple(q)) for _, _, p, q in mine], args.workers)
        logger.info("rendered %d images of %s in %.0f s", len(images), name, time.time() - t)
        out = work / f"render-{name}.npz"
        np.savez(out.with_suffix(".tmp.npz"), images=images, group=np.array([name] * len(mine)),
                 index=np.array([r[1] for r in mine]), person=np.array([_as_tuple(r[2]) for r in mine]),
                 picture=np.array([_as_tuple(r[3]) for r in mine]))
        os.replace(out.with_suffix(".tmp.npz"), out)


def stage_photos(out: Path, args) -> None:
    """Photos of new people for the demo and the tests: held-out people on white (as a transparent render is)."""
    from ..resources import celeb_names
    from . import N_TOY_PHOTOS

    rng = np.random.default_rng(args.seed + 5)
    people = world.held_out_people(celeb_names())[:N_TOY_PHOTOS]
    (out / "people").mkdir(parents=True, exist_ok=True)
    white = world.PICTURE["background"].index("white")
    for i, person in enumerate(people):
        im = world.render(person, world.Picture.random(rng, background=white, smiling=0))
        im.save(out / "people" / f"person-{i}.png")
    (out / "people" / "people.json").write_text(json.dumps(
        {f"person-{i}.png": person.labels() for i, person in enumerate(people)}, indent=1) + "\n")


def _load(work: Path, groups=GROUPS):
    """The rendered ``groups``, concatenated in ``GROUPS`` order."""
    parts = [np.load(work / f"render-{g}.npz") for g in GROUPS if g in groups]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0].files}


# ---------------------------------------------------------------- small training loop helpers
def _checkpointed(work: Path, name: str, modules: dict, total: int, step_fn, every: int, on_save=None, rngs=()):
    """Run ``step_fn(step)`` from the last checkpoint to ``total`` steps, saving every ``every``.

    ``rngs`` (torch and numpy generators) are saved and restored too, so a resumed run draws what an
    uninterrupted one would."""
    ckpt = work / f"{name}.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        for k, m in modules.items():
            m.load_state_dict(state[k])
        torch.set_rng_state(state["torch_rng"])
        for r, saved in zip(rngs, state.get("rngs", [])):
            if isinstance(r, torch.Generator):
                r.set_state(saved)
            else:
                r.bit_generator.state = json.loads(saved)
        start = state["step"]
        logger.info("%s: resuming at step %d", name, start)
    if start >= total:
        return
    t, losses = time.time(), []
    for step in range(start, total):
        losses.append(step_fn(step))
        if (step + 1) % every == 0 or step + 1 == total:
            state = {k: m.state_dict() for k, m in modules.items()}
            state.update(step=step + 1, torch_rng=torch.get_rng_state(),
                         rngs=[r.get_state() if isinstance(r, torch.Generator) else json.dumps(r.bit_generator.state)
                               for r in rngs])
            torch.save(state, ckpt.with_suffix(".tmp"))
            os.replace(ckpt.with_suffix(".tmp"), ckpt)
            logger.info("%s step %d/%d loss %.4f (%.2f s/step)", name, step + 1, total, float(np.mean(losses)),
                        (time.time() - t) / len(losses))
            with open(work / f"{name}.curve.jsonl", "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": float(np.mean(losses))}) + "\n")
            t, losses = time.time(), []
            if on_save:
                on_save(step + 1)


def _update(opt, loss) -> float:
    """One optimiser step on ``loss``; returns its value."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def _set_lr(opt, base, s: int, total: int, warmup: int = 0, floor: float = 0.0) -> None:
    """The one learning-rate schedule of every stage: linear warm-up over ``warmup`` steps, then cosine from
    ``base`` down to ``floor`` x ``base`` at ``total``. ``base`` is one rate, or one per parameter group."""
    factor = min(1.0, (s + 1) / warmup) if warmup else 1.0
    cosine = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * s / total))
    for group, rate in zip(opt.param_groups, base if isinstance(base, (list, tuple)) else [base] * len(opt.param_groups)):
        group["lr"] = rate * factor * cosine


def _augment(x: torch.Tensor, g: torch.Generator, blur: bool) -> torch.Tensor:
    """Flip (identity-preserving in this world, as the face network's input in training is) and jitter."""
    n = x.shape[0]
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    scale = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1)
    x = ((x + 1) * scale - 1).clamp(-1, 1)
    if blur:  # generated images are softer than renders
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None]) / 16
        soft = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3).contiguous(), groups=3)
        which = torch.rand(n, generator=g) < 0.5
        x = torch.where(which[:, None, None, None], soft, x)
        x = x + 0.03 * torch.randn(x.shape, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)
    return x


def _labels(d, idx):
    person, picture = d["person"][idx], d["picture"][idx]
    lab = {k: torch.from_numpy(person[:, i]) for i, k in enumerate(world.IDENTITY)}
    lab.update(background=torch.from_numpy(picture[:, 0]), shirt=torch.from_numpy(picture[:, 1]),
               smiling=torch.from_numpy(picture[:, 2]))
    return lab


def _partners(d, rows):
    """A drawer of two-person pictures from ``rows`` (indices into ``d``): ``draw(rng, n, match_extra)`` gives (n, 2)
    rows, left and right: two different people with the same background. With ``match_extra`` the right person
    also wears the left one's shirt colour with probability 1/2, and smiles as the left one does with probability
    1/2, so that captions can say so."""
    picture, person = d["picture"][rows], d["person"][rows]
    buckets = {}
    for j, q in enumerate(picture):
        for key in ((q[0], None, None), (q[0], q[1], None), (q[0], None, q[2]), (q[0], q[1], q[2])):
            buckets.setdefault(key, []).append(j)
    buckets = {k: np.array(v) for k, v in buckets.items()}

    def draw(rng: np.random.Generator, n: int, match_extra: bool) -> np.ndarray:
        out = np.empty((n, 2), dtype=np.int64)
        for i in range(n):
            left = int(rng.integers(len(rows)))
            q = picture[left]
            shirt, smile = (rng.random() < 0.5, rng.random() < 0.5) if match_extra else (False, False)
            bucket = buckets[(q[0], q[1] if shirt else None, q[2] if smile else None)]
            if not (person[bucket] != person[left]).any(1).any():  # nobody else matches that much: the background
                bucket = buckets[(q[0], None, None)]
            while True:
                right = int(bucket[rng.integers(len(bucket))])
                if (person[right] != person[left]).any():
                    break
            out[i] = left, right
        return rows[out]

    return draw


def _join(images, pairs) -> np.ndarray:
    """(n, 64, 128, 3): each pair's two pictures side by side (``world.join``)."""
    return np.concatenate([images[pairs[:, 0]], images[pairs[:, 1]]], axis=2)


# ---------------------------------------------------------------- scorer and face network
def stage_scorer(work: Path, out: Path, args, d) -> None:
    idx = np.flatnonzero(d["group"] == "scorer")
    train_idx, test_idx = idx[:-args.scorer_test], idx[-args.scorer_test:]  # test: held-out people
    train_idx = np.concatenate([train_idx, np.flatnonzero(d["group"] == "anon")])
    torch.manual_seed(args.seed + 10)
    net = ToyScorer()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(args.seed + 11)
    images = d["images"]

    def step(s):
        _set_lr(opt, 2e-3, s, args.scorer_steps)
        b = train_idx[torch.randint(len(train_idx), (128,), generator=g).numpy()]
        x = _augment(to_tensor(images[b]), g, blur=True)
        logits = net(x)
        lab = _labels(d, b)
        loss = sum(F.cross_entropy(logits[k], lab[k]) for k in logits)
        return _update(opt, loss)

    net.train()
    _checkpointed(work, "scorer", {"net": net, "opt": opt}, args.scorer_steps, step, 250, rngs=(g,))
    net.eval()
    with torch.no_grad():
        logits = {k: torch.cat(v) for k, v in _batched(net, to_tensor(images[test_idx])).items()}
    lab = _labels(d, test_idx)
    acc = {k: float((logits[k].argmax(-1) == lab[k]).float().mean()) for k in logits}
    logger.info("scorer held-out accuracy (%d renders of new people): %s", len(test_idx),
                ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    _save_net(net, out / "scorer.safetensors", {"held_out_accuracy": json.dumps(acc), "held_out_renders": str(len(test_idx))})


def _batched(net, x, n=256):
    out = {}
    for i in range(0, len(x), n):
        for k, v in net(x[i:i + n]).items():
            out.setdefault(k, []).append(v)
    return out


def stage_facenet(work: Path, out: Path, args, d) -> None:
    idx = np.flatnonzero(d["group"] == "face")
    who = torch.from_numpy(d["index"][idx])
    n_people = int(who.max()) + 1
    torch.manual_seed(args.seed + 20)
    net = ToyFaceNet()
    proxies = torch.nn.Parameter(F.normalize(torch.randn(n_people, 512), dim=-1))
    opt = torch.optim.AdamW([*net.parameters(), proxies], lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(args.seed + 21)
    images = d["images"]
    holder = torch.nn.ParameterDict({"proxies": proxies})

    def step(s):
        _set_lr(opt, 2e-3, s, args.facenet_steps)
        j = torch.randint(len(idx), (128,), generator=g)
        x = _augment(to_tensor(images[idx[j.numpy()]]), g, blur=True)
        cos = net(x) @ F.normalize(proxies, dim=-1).T
        y = who[j]
        margin = F.one_hot(y, n_people) * 0.35  # CosFace
        loss = F.cross_entropy(30 * (cos - margin), y)
        return _update(opt, loss)

    net.train()
    _checkpointed(work, "facenet", {"net": net, "opt": opt, "proxies": holder}, args.facenet_steps, step, 250, rngs=(g,))
    net.eval()
    # Same vs different person on the scorer's held-out people (never seen by this network).
    test = np.flatnonzero(d["group"] == "scorer")[-args.scorer_test:]
    with torch.no_grad():
        v = torch.cat([net(to_tensor(d["images"][test[i:i + 256]])) for i in range(0, len(test), 256)])
    person = [tuple(p) for p in d["person"][test]]
    same = torch.tensor([[a == b for b in person] for a in person])
    cos = v @ v.T
    off = ~torch.eye(len(test), dtype=torch.bool)
    stats = {"same_person_cosine": float(cos[same & off].mean()) if (same & off).any() else float("nan"),
             "different_people_cosine": float(cos[~same].mean())}
    logger.info("face network on new people: %s", stats)
    _save_net(net, out / "facenet.safetensors", {k: f"{v:.4f}" for k, v in stats.items()})


def _save_net(net, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(path) + ".tmp", metadata={"format": "celebbasis.toy", **meta})
    os.replace(str(path) + ".tmp", path)


# ---------------------------------------------------------------- VAE
def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=16,
                         layers_per_block=1, sample_size=world.RESOLUTION)


def _perceptual(out: Path):
    """A perceptual distance (as LPIPS is to Stable Diffusion's VAE): the squared differences of the face network's
    feature maps after each of its four stages. It makes the small parts that tell people apart (eyebrows,
    glasses, facial hair) count for more than their few pixels do in L1."""
    net = ToyFaceNet()
    net.load_state_dict({k: v.float() for k, v in _load_file(out / "facenet.safetensors").items()}, strict=False)
    stages = [m for m in net.eval().requires_grad_(False).trunk if isinstance(m, torch.nn.Sequential)]

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total, x, y = 0.0, a, b
        for layer in net.trunk:
            x, y = layer(x), layer(y)
            if any(layer is m for m in stages):
                total = total + F.mse_loss(x, y)
        return total

    return distance


def stage_vae(work: Path, args, d):
    torch.manual_seed(args.seed + 30)
    vae = make_vae()
    perceptual = _perceptual(args.out) if args.vae_perceptual else None
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 31)
    idx = np.flatnonzero(np.isin(d["group"], ["celeb", "anon"]))
    images = d["images"]

    pair_rng, pairs = np.random.default_rng(args.seed + 32), _partners(d, idx)

    def step(s):
        _set_lr(opt, 1e-3, s, args.vae_steps, warmup=100, floor=0.1)
        if pair_rng.random() < args.pair_fraction:  # two-person pictures, half as many: as many pixels
            x = to_tensor(_join(images, pairs(pair_rng, args.vae_batch // 2, match_extra=False)))
        else:
            x = to_tensor(images[idx[torch.randint(len(idx), (args.vae_batch,), generator=g).numpy()]])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + 1e-6 * post.kl().mean()
        if perceptual is not None:
            loss = loss + args.vae_perceptual * perceptual(rec, x)
        return _update(opt, loss)

    vae.train()
    _checkpointed(work, "vae", {"vae": vae, "opt": opt}, args.vae_steps, step, 200, rngs=(g, pair_rng))
    vae.eval()
    _log_round_trip(vae, work / "vae-round-trip.json", args.out)
    return vae


def _log_round_trip(vae, path: Path, out: Path) -> None:
    if not path.exists():
        acc = round_trip(vae, out)
        logger.info("VAE round trip of held-out renders, attributes read right: %s",
                    ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        path.write_text(json.dumps(acc, indent=1) + "\n")


def round_trip(vae, out: Path, n: int = 600, seed: int = 99) -> dict[str, float]:
    """How often the scorer (``out``'s) reads each attribute right after a VAE round trip of ``n`` renders of the
    held-out people (random pictures): the VAE's ceiling on likeness (the identity attributes) and on prompt
    fidelity (the background, the shirt, the smile; ``smiling_kept``: of the smiling pictures, how many still smile)."""
    from ..resources import celeb_names

    scorer = ToyScorer()
    scorer.load_state_dict({k: v.float() for k, v in _load_file(out / "scorer.safetensors").items()}, strict=False)
    scorer.eval()
    rng = np.random.default_rng(seed)
    people = world.held_out_people(celeb_names())
    chosen = [people[i % len(people)] for i in range(n)]
    pictures = [world.Picture.random(rng) for _ in chosen]
    x = to_tensor(np.stack([np.asarray(world.render(p, pic)) for p, pic in zip(chosen, pictures)]))
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(x[i:i + 100]).latent_dist.mean).sample for i in range(0, n, 100)])
        read = {k: torch.cat(v).argmax(-1).numpy() for k, v in _batched(scorer, rec.clamp(-1, 1)).items()}
    truth = {k: np.array([getattr(p, k) for p in chosen]) for k in world.IDENTITY}
    truth.update({k: np.array([pic.labels()[k] for pic in pictures]) for k in ("background", "shirt", "smiling")})
    out = {k: float(np.mean(read[k] == t)) for k, t in truth.items()}
    out["smiling_kept"] = float(np.mean(read["smiling"][truth["smiling"] == 1] == 1))
    return out


def _load_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def stage_latents(work: Path, vae, d, args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every diffusion image encoded once: the single pictures (celebrities and anonymous people, in ``d``'s
    order), and ``--pairs`` two-person pictures of celebrities (their rows in the single pictures, and latents)."""
    path = work / "latents.npz"
    if not path.exists():
        idx = np.flatnonzero(np.isin(d["group"], ["celeb", "anon"]))
        celeb = np.flatnonzero(d["group"][idx] == "celeb")  # positions in ``idx``: the latents' rows
        pairs = _partners(d, idx[celeb])(np.random.default_rng(args.seed + 33), args.pairs, match_extra=True)

        def encode(x):
            with torch.no_grad():
                return np.concatenate([vae.encode(to_tensor(x[i:i + 128])).latent_dist.mean.numpy()
                                       for i in range(0, len(x), 128)]).astype(np.float32)

        t = time.time()
        singles = encode(d["images"][idx])
        pair_rows = np.searchsorted(idx, pairs)  # rows of ``singles``
        doubles = np.concatenate([encode(_join(d["images"], pairs[i:i + 1024])) for i in range(0, len(pairs), 1024)]) \
            if len(pairs) else np.zeros((0, *singles.shape[1:-1], 2 * singles.shape[-1]), np.float32)
        logger.info("encoded %d pictures and %d pairs in %.0f s", len(singles), len(doubles), time.time() - t)
        np.savez(path.with_suffix(".tmp.npz"), singles=singles, pairs=pair_rows, pair_latents=doubles)
        os.replace(path.with_suffix(".tmp.npz"), path)
    f = np.load(path)
    return f["singles"], f["pairs"], f["pair_latents"]


# ---------------------------------------------------------------- text encoder + UNet
def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                            num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, projection_dim=TEXT_WIDTH)
    te = CLIPTextModel(config)
    # Token vectors about unit length, like the celeb basis's unit-norm coefficient rows expect of the spread.
    torch.nn.init.normal_(te.get_input_embeddings().weight, std=TEXT_WIDTH ** -0.5)
    return te


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.RESOLUTION // LATENT_SCALE, in_channels=4, out_channels=4, block_out_channels=(64, 96, 128),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8, norm_num_groups=16)


# SD's noise schedule (scaled-linear betas), for training (DDPM) and the shipped sampler (DDIM).
NOISE_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _averaged(model, ema):
    """A copy of ``model`` holding the moving average's weights (``EMAModel``), for the pipeline written out."""
    out = copy.deepcopy(model)
    ema.copy_to(out.parameters())
    return out


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type="epsilon")


def _caption_batch(b, d, idx, names, rng, templates):
    """Captions of rows ``b`` (of ``idx``) as the diffusion stage draws them, 10 % empty."""
    group, who, picture = d["group"][idx], d["index"][idx], d["picture"][idx]
    out = []
    for j in b:
        pic = world.Picture(*picture[j])
        if rng.random() < 0.1:
            out.append("")
        elif group[j] == "anon":
            out.append(_anon_caption(pic, rng, templates))
        else:
            out.append(world.caption(names[who[j]], pic, rng, templates))
    return out


def _pair_captions(rows, d, idx, names, rng):
    """Captions of two-person pictures (``rows``: (n, 2) rows of ``idx``, left and right), 10 % empty."""
    who, picture = d["index"][idx], d["picture"][idx]
    out = []
    for left, right in rows:
        if rng.random() < 0.1:
            out.append("")
            continue
        a, b = world.Picture(*picture[left]), world.Picture(*picture[right])
        out.append(world.pair_caption(names[who[left]], names[who[right]], a, rng, same_shirt=a.shirt == b.shirt,
                                      both_smiling=bool(a.smiling and b.smiling)))
    return out


def stage_text(work: Path, args, d):
    """Pretrain the text encoder to tell, from a caption, what the picture shows: each identity attribute of a
    named person, the background and shirt colours and the smile when the caption says them. Stable Diffusion's
    text encoder comes pretrained; this gives ours informative features before the UNet learns to read them."""
    from ..resources import celeb_names, clip_tokenizer
    from ..prompts import TEMPLATES

    tokenizer, names = clip_tokenizer(), celeb_names()
    torch.manual_seed(args.seed + 60)
    te = make_text_encoder(tokenizer)
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(TEXT_WIDTH, len(v)) for k, v in world.SCORED.items()})
    opt = torch.optim.AdamW([*te.parameters(), *heads.parameters()], lr=1e-3, weight_decay=0.0)
    idx = np.flatnonzero(np.isin(d["group"], ["celeb", "anon"]))
    rng = np.random.default_rng(args.seed + 61)
    named = d["group"][idx] == "celeb"

    def step(s):
        b = rng.integers(len(idx), size=256)
        caps = _caption_batch(b, d, idx, names, rng, TEMPLATES)
        ids = tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        h = te(ids)[0]  # (B, 77, d)
        feat = h.mean(1)
        lab = _labels(d, idx[b])
        said = [world.colour_words(c) for c in caps]
        loss = 0.0
        for k, head in heads.items():
            if k in world.IDENTITY:
                keep = torch.from_numpy(named[b] & np.array([c != "" for c in caps]))
                target = lab[k]
            else:
                keep = torch.tensor([k in w for w in said])
                target = torch.tensor([w.get(k, 0) for w in said])
            if keep.any():
                loss = loss + F.cross_entropy(head(feat[keep]), target[keep])
        return _update(opt, loss)

    _checkpointed(work, "text", {"te": te, "heads": heads, "opt": opt}, args.text_steps, step, 100, rngs=(rng,))
    return te


def stage_diffusion(work: Path, out: Path, args, d, vae, latents, pairs, pair_latents, te=None) -> None:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr

    from ..resources import celeb_names, clip_tokenizer
    from ..prompts import TEMPLATES

    tokenizer = clip_tokenizer()
    names = celeb_names()
    torch.manual_seed(args.seed + 40)
    te, unet = te if te is not None else make_text_encoder(tokenizer), make_unet()
    ema_te, ema_unet = EMAModel(te.parameters(), decay=args.ema), EMAModel(unet.parameters(), decay=args.ema)
    emb = te.get_input_embeddings().weight
    decay, no_decay = [p for p in [*te.parameters(), *unet.parameters()] if p is not emb and p.ndim > 1], \
        [p for p in [*te.parameters(), *unet.parameters()] if p is emb or p.ndim <= 1]
    text = {id(p) for p in te.parameters()}
    groups = [{"params": [p for p in ps if (id(p) in text) == is_text], "weight_decay": wd, "scale": scale}
              for ps, wd in ((decay, 1e-2), (no_decay, 0.0)) for is_text, scale in ((True, args.text_lr_scale), (False, 1.0))]
    opt = torch.optim.AdamW([g_ for g_ in groups if g_["params"]], lr=args.lr)
    noise_sched = DDPMScheduler(**NOISE_SCHEDULE)
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    lat = torch.from_numpy(latents) * scale
    pair_lat = torch.from_numpy(pair_latents) * scale
    idx = np.flatnonzero(np.isin(d["group"], ["celeb", "anon"]))
    rng = np.random.default_rng(args.seed + 41)
    g = torch.Generator().manual_seed(args.seed + 42)
    te.train(), unet.train()

    def step(s):
        _set_lr(opt, [group_["scale"] * args.lr for group_ in opt.param_groups], s, args.diffusion_steps, warmup=100,
                floor=0.1)
        if len(pairs) and rng.random() < args.pair_fraction:  # half as many two-person pictures: as many pixels
            b = rng.integers(len(pairs), size=args.batch // 2)
            caps, x0 = _pair_captions(pairs[b], d, idx, names, rng), pair_lat[b]
        else:
            b = rng.integers(len(idx), size=args.batch)
            caps, x0 = _caption_batch(b, d, idx, names, rng, TEMPLATES), lat[b]
        ids = tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (len(x0),), generator=g)
        xt = noise_sched.add_noise(x0, noise, t)
        cond = te(ids)[0]
        loss = F.mse_loss(unet(xt, t, cond).sample, noise, reduction="none").mean((1, 2, 3))
        if args.snr_gamma:  # Min-SNR weighting (Hang et al. 2023), as diffusers' training scripts' --snr_gamma
            snr = compute_snr(noise_sched, t)
            loss = loss * snr.clamp(max=args.snr_gamma) / snr
        loss = loss.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*te.parameters(), *unet.parameters()], 1.0)
        opt.step()
        ema_te.step(te.parameters())
        ema_unet.step(unet.parameters())
        return loss.item()

    def export(s):
        save_pipeline(out / "pipeline", vae, _averaged(te, ema_te), _averaged(unet, ema_unet), tokenizer,
                      {"diffusion_steps": s, "seed": args.seed})

    _checkpointed(work, "diffusion", {"te": te, "unet": unet, "ema_te": ema_te, "ema_unet": ema_unet, "opt": opt},
                  args.diffusion_steps, step, args.save_every, on_save=export, rngs=(g, rng))
    if not (out / "pipeline" / "model_index.json").exists():
        export(args.diffusion_steps)


def _anon_caption(pic, rng, templates):
    text = world.caption("X", pic, rng, templates)
    return text.replace("face of X person", "face of a person").replace("X person", "person")


def save_pipeline(path: Path, vae, te, unet, tokenizer, meta: dict) -> None:
    """The world as a diffusers folder (fp16 weights), written beside and then renamed into place."""
    import shutil

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(te), tokenizer=tokenizer,
                                   unet=copy.deepcopy(unet), scheduler=make_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False).to(torch.float16)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(tmp / "tokenizer", ignore_errors=True)  # the package's own CLIP tokenizer is used
    (tmp / "world.json").write_text(json.dumps(meta, indent=1) + "\n")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- decoder
def stage_decoder(work: Path, out: Path, args, d, vae, latents, pairs, pair_latents) -> None:
    """More decoder training on the encoder's (now fixed) latents, then the pipeline written with it."""
    from diffusers.training_utils import EMAModel

    from ..resources import clip_tokenizer

    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 50)
    idx = np.flatnonzero(np.isin(d["group"], ["celeb", "anon"]))  # the rows of ``latents``
    images, lat, pair_lat = d["images"], torch.from_numpy(latents), torch.from_numpy(pair_latents)

    def step(s):
        _set_lr(opt, 5e-4, s, args.decoder_steps, floor=0.1)
        if len(pairs) and torch.rand(1, generator=g).item() < args.pair_fraction:
            j = torch.randint(len(pairs), (16,), generator=g)
            x, z = to_tensor(_join(images, idx[pairs[j.numpy()]])), pair_lat[j]
        else:
            j = torch.randint(len(idx), (32,), generator=g)
            x, z = to_tensor(images[idx[j.numpy()]]), lat[j]
        loss = (vae.decode(z).sample - x).abs().mean()
        return _update(opt, loss)

    vae.decoder.train()
    _checkpointed(work, "decoder", {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv, "opt": opt},
                  args.decoder_steps, step, 200, rngs=(g,))
    vae.eval()
    tokenizer = clip_tokenizer()  # the pipeline again: the diffusion stage's EMA weights with the new decoder
    state = torch.load(work / "diffusion.pt", weights_only=True)
    te, unet = make_text_encoder(tokenizer), make_unet()
    for module, key in ((te, "ema_te"), (unet, "ema_unet")):
        ema = EMAModel(module.parameters())
        ema.load_state_dict(state[key])
        ema.copy_to(module.parameters())
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    _log_round_trip(vae, work / "decoder-round-trip.json", out)
    save_pipeline(out / "pipeline", vae, te, unet, tokenizer,
                  {"diffusion_steps": int(state["step"]), "decoder_steps": args.decoder_steps, "seed": args.seed,
                   "vae_round_trip": json.loads((work / "decoder-round-trip.json").read_text())})


# ---------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("toy-world-work"), help="checkpoints and rendered data")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "toy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="rendering processes")
    p.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    p.add_argument("--images-per-celebrity", type=int, default=40)
    p.add_argument("--anon-people", type=int, default=6000)
    p.add_argument("--face-people", type=int, default=2000)
    p.add_argument("--images-per-face-person", type=int, default=5)
    p.add_argument("--scorer-people", type=int, default=10000)
    p.add_argument("--scorer-test", type=int, default=2000)
    p.add_argument("--scorer-steps", type=int, default=1200)
    p.add_argument("--facenet-steps", type=int, default=1200)
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-perceptual", type=float, default=0.1,
                   help="weight of the VAE's perceptual loss (the face network's features; 0: L1 alone)")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--diffusion-steps", type=int, default=6000)
    p.add_argument("--decoder-steps", type=int, default=400)
    p.add_argument("--text-steps", type=int, default=600, help="text encoder pretraining steps (batch 256)")
    p.add_argument("--text-lr-scale", type=float, default=0.2, help="the text encoder's learning rate in the diffusion "
                                                                      "stage, relative to --lr")
    p.add_argument("--pairs", type=int, default=20000, help="two-person pictures of celebrities encoded for diffusion")
    p.add_argument("--pair-fraction", type=float, default=0.25,
                   help="the share of VAE, diffusion and decoder steps whose batch is two-person pictures")
    p.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting (0: plain epsilon MSE)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--stages", default="render,scorer,facenet,vae,latents,text,diffusion,decoder")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(args.work / "train.log")])
    (args.work / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    stages = args.stages.split(",")
    t0 = time.time()
    needs = {"scorer": ("scorer", "anon"), "facenet": ("face", "scorer")}  # the other stages: celeb, anon
    groups = {g for stage in stages if stage != "render" for g in needs.get(stage, ("celeb", "anon"))} or set(GROUPS)
    if "render" in stages:
        stage_render(args.work, args, groups)
        stage_photos(args.out, args)
    d = _load(args.work, groups)
    if "scorer" in stages:
        stage_scorer(args.work, args.out, args, d)
    if "facenet" in stages:
        stage_facenet(args.work, args.out, args, d)
    te = stage_text(args.work, args, d) if "text" in stages else None  # captions only: before the images' stages
    if {"vae", "latents", "diffusion", "decoder"} & set(stages):
        vae = stage_vae(args.work, args, d)
        latents, pairs, pair_latents = stage_latents(args.work, vae, d, args)
        if "diffusion" in stages:
            stage_diffusion(args.work, args.out, args, d, vae, latents, pairs, pair_latents, te)
        if "decoder" in stages:
            stage_decoder(args.work, args.out, args, d, vae, latents, pairs, pair_latents)
    logger.info("done in %.0f min", (time.time() - t0) / 60)


if __name__ == "__main__":
    main()
