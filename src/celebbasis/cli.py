"""The ``celebbasis`` command: parse flags, call the public API, turn errors into exit codes.

    celebbasis build-basis --model MODEL -o basis.safetensors
    celebbasis add alice.jpg --name alice --model MODEL -o identities/
    celebbasis generate "<alice> person cooking" --identity identities/alice.safetensors --model MODEL -o out/
    celebbasis demo [-o DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ._version import __version__
from .errors import CelebBasisError, InputError

logger = logging.getLogger("celebbasis")

BANNER = "=" * 78


def _setup_logging(args) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if not args.verbose else "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("celebbasis")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import warnings

        warnings.filterwarnings("ignore")
        for name in ("transformers", "diffusers", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        if args.quiet:
            lib.disable_progress_bar()
        else:
            lib.enable_progress_bar()


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    g = p.add_argument_group("common")
    if model:
        g.add_argument("--model", default=None, help="hub id or local diffusers folder of an SD 1.x/2.x or SDXL model "
                       "(default: stable-diffusion-v1-5/stable-diffusion-v1-5)")
        g.add_argument("--sdxl", action="store_true", help="SDXL: default model stabilityai/stable-diffusion-xl-base-1.0 (and a tiny SDXL with --tiny)")
        g.add_argument("--tiny", action="store_true", help="use a tiny random model built in-process (for trying things out; images are noise)")
        g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --model")
        g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
        g.add_argument("--dtype", default="auto", help="auto (float16 on GPU, float32 on CPU), float32, float16 or bfloat16")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument("--config", default=None, metavar="TOML",
                   help="read this command's flags from a TOML file (keys as flag names); flags given here win")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    g.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")


def _train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=None, help="optimisation steps (default: 400 per person)")
    g.add_argument("--resolution", type=int, default=None, help="training resolution in pixels (default: the model's, 512 for SD 1.x)")
    g.add_argument("--batch-size", type=int, default=2, help="views per step (default: 2, as the paper)")
    g.add_argument("--learning-rate", type=float, default=1e-2, help="AdamW learning rate (default: 0.01)")
    g.add_argument("--views", type=int, default=64, help="augmented views per person encoded once up front (default: 64; 0: new views every step)")
    g.add_argument("--low-memory", action="store_true", help="gradient checkpointing: less GPU memory, about 30%% slower")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU, long runs)")
    g.add_argument("--face-encoder", default="dlib", metavar="SPEC",
                   help="identity network: dlib (default), arcface:/path/backbone.pth (the paper's) or onnx:/path/model.onnx")
    g.add_argument("--face-index", type=int, default=None, help="which face to use in photos with several (0 = largest; default: largest)")
    g.add_argument("--basis", action="append", default=None,
                   help="basis file from build-basis; twice for SDXL (default: built from the model and cached)")


def _new_identity_flags(p: argparse.ArgumentParser, name_help: str) -> None:
    """Flags of commands that write one new identity from existing material (import, mix)."""
    p.add_argument("--name", required=True, help=name_help)
    p.add_argument("-o", "--output", default="identities", help="folder for NAME.safetensors (default: identities/)")
    p.add_argument("--basis", action="append", default=None, help="basis file(s) (default: built from the model and cached)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing identity")
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="celebbasis", description="Put anyone into Stable Diffusion from one face photo.")
    parser.add_argument("--version", action="version", version=f"celebbasis {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build-basis", help="build the celeb basis of a model's text encoder")
    p.add_argument("-o", "--output", required=True, help="basis file to write (.safetensors)")
    p.add_argument("--names", default=None, help="text file of celebrity names, one a line (default: the packaged 646 names)")
    p.add_argument("--n-components", type=int, default=512, help="directions per token slot (default: 512, capped at the model's width)")
    p.add_argument("--n-tokens", type=int, default=2, help="token vectors per identity (default: 2)")
    p.add_argument("--dedupe", action="store_true", help="count each distinct name token once per slot (default: every occurrence, as the paper)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _common(p)

    p = sub.add_parser("add", help="learn a new person (or several, jointly) from one photo each")
    p.add_argument("photos", nargs="+", metavar="PHOTO", help="one face photo per person")
    p.add_argument("--name", action="append", default=[], required=True, help="name of each person, in photo order; the prompt word is <name>")
    p.add_argument("-o", "--output", default="identities", help="folder for NAME.safetensors (default: identities/)")
    p.add_argument("--overwrite", action="store_true", help="replace identities that already exist")
    _train_flags(p)
    _common(p)

    p = sub.add_parser("add-many", help="learn every photo in a folder (groups trained jointly; resumable; shards under accelerate launch)")
    p.add_argument("faces", metavar="FACES_DIR", help="folder of face photos, one person each; the file name becomes the name")
    p.add_argument("-o", "--output", default="identities", help="folder for NAME.safetensors (default: identities/)")
    p.add_argument("--group-size", type=int, default=2, help="people trained jointly per group (default: 2, as the paper)")
    p.add_argument("--overwrite", action="store_true", help="learn again people that already have an identity (default: skip them)")
    _train_flags(p)
    _common(p)

    p = sub.add_parser("generate", help="draw prompts that use learned people")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help='e.g. "<alice> person and Barack Obama cooking in a kitchen"')
    p.add_argument("--prompts-file", default=None, help="more prompts, one a line, or CATEGORY<TAB>PROMPT (from benchmark-prompts)")
    p.add_argument("--identity", action="append", default=[], help="identity file to load (repeat for several people)")
    p.add_argument("-o", "--output", default="out", help="folder for the PNGs (default: out/)")
    p.add_argument("--negative-prompt", default=None, help="what the images should not show")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    p.add_argument("--batch-images", type=int, default=4, help="images per model call; prompts are batched up to it (default: 4)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width, a multiple of 8 (default: the model's)")
    from .generate import SCHEDULERS

    p.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULERS), help="sampler (default: ddim)")
    _common(p)

    p = sub.add_parser("export", help="write an identity as a textual-inversion file for diffusers, A1111 or ComfyUI")
    p.add_argument("identity", metavar="IDENTITY", help="identity file (NAME.safetensors)")
    p.add_argument("--format", default="diffusers", choices=["diffusers", "a1111", "comfyui"], help="target tool (default: diffusers)")
    p.add_argument("-o", "--output", default=".", help="output file or folder (default: NAME.safetensors here)")
    p.add_argument("--pt", action="store_true", help="A1111's classic .pt layout instead of safetensors (SD 1.x/2.x)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    _common(p, model=False)

    p = sub.add_parser("import-embedding", help="turn a textual-inversion file into an identity (projected onto the basis)")
    p.add_argument("embedding", metavar="FILE", help="TI file: .safetensors, or .pt (read with weights_only=True)")
    _new_identity_flags(p, "name of the person; the prompt word is <name>")

    p = sub.add_parser("mix", help="mix identities (and celebrity names) into a new identity")
    p.add_argument("identities", nargs="*", metavar="IDENTITY", help="identity files to mix")
    p.add_argument("--celebrity", action="append", default=[], help='a celebrity name to mix in, e.g. "Anne Hathaway" (repeatable)')
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one weight per identity, then per celebrity (default: equal weights)")
    _new_identity_flags(p, "name of the mix; the prompt word is <name>")

    p = sub.add_parser("evaluate", help="score generated images: ID similarity, CLIP score, face-detection rate")
    p.add_argument("images", metavar="IMAGES_DIR", help="folder of generated images (PNG metadata gives the prompts)")
    p.add_argument("--reference", action="append", default=[], required=True, metavar="[NAME=]PHOTO",
                   help="photo of a person; NAME=PHOTO ties it to <NAME> in prompts (repeat for several people)")
    p.add_argument("-o", "--output", default="report", help="report folder (default: report/)")
    p.add_argument("--prompts", default=None, help="prompts file, one per image in file-name order (default: PNG metadata)")
    p.add_argument("--eval-encoder", default="dlib", metavar="SPEC",
                   help="evaluation face network: dlib (default), arcface:PATH or onnx:PATH; use one that did not train the identity")
    p.add_argument("--identity", action="append", default=[], help="identity files, to warn when they were trained with the evaluation network")
    p.add_argument("--clip-model", default="openai/clip-vit-base-patch32", help="CLIP for the prompt score: hub id or local folder")
    p.add_argument("--no-clip", action="store_true", help="skip the CLIP score")
    _common(p, model=False)

    p = sub.add_parser("benchmark-prompts", help="write the paper's four prompt categories for some identities")
    p.add_argument("names", nargs="+", metavar="NAME", help="identity names (alice or <alice>)")
    p.add_argument("-o", "--output", default="benchmark_prompts.txt", help="prompts file (CATEGORY<TAB>PROMPT lines)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    _common(p, model=False)

    p = sub.add_parser("webui", help="the local web app: learn, library, create, mix")
    p.add_argument("-o", "--output", default="identities", help="identities folder (default: identities/)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    _common(p)

    p = sub.add_parser("demo", help="learn the packaged public-domain face and draw the example prompts")
    p.add_argument("-o", "--output", default="celebbasis-demo", help="output folder (default: celebbasis-demo/)")
    p.add_argument("--photo", action="append", default=None, help="use your own photo(s) instead of the packaged one; a second photo also fills <id2> prompts")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    p.add_argument("--sample-steps", type=int, default=None, help="denoising steps (default: 50, 20 with --tiny)")
    _train_flags(p)
    _common(p)
    return parser


def _load(args):
    from .models import DEFAULT_MODEL, DEFAULT_SDXL_MODEL, load_pipeline

    model = args.model or (DEFAULT_SDXL_MODEL if args.sdxl else DEFAULT_MODEL)
    logger.info("Loading %s ...", "the tiny random model" if args.tiny else model)
    return load_pipeline(model, device=args.device, dtype=args.dtype, revision=args.revision, tiny=args.tiny, sdxl=args.sdxl)


MIN_FREE_BYTES = 50 * 1024 * 1024  # refuse to start on a nearly full disk


def _check_output_dir(path: Path) -> None:
    """Fail before any heavy work if the output folder cannot be written or the disk is full."""
    import shutil
    import tempfile

    if path.exists() and not path.is_dir():
        raise InputError(f"Output {path} is a file, not a folder. Pass a folder with -o.")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"Cannot create {path}: {probe} is a file. Choose another folder with -o.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".celebbasis-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(f"Cannot write to {path} ({e.strerror or e}). Choose another folder with -o.") from None
    free = shutil.disk_usage(probe).free
    if free < MIN_FREE_BYTES:
        raise InputError(
            f"Only {free // (1024 * 1024)} MB free where {path} would go. Free some space or choose another folder with -o."
        )


def _train_config(args, pipe, n_people: int):
    from .train import TrainConfig

    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                       resolution=resolution, seed=args.seed, views_per_identity=args.views,
                       compile=args.compile, low_memory=args.low_memory)


def _basis(args):
    if not args.basis:
        return None
    from .basis import CelebBasis

    return [CelebBasis.load(p) for p in args.basis]


def cmd_build_basis(args) -> int:
    from .basis import build_basis
    from .models import model_name

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise InputError(f"{out} already exists. Pass --overwrite to replace it.")
    _check_output_dir(out.parent)
    names = None
    if args.names:
        p = Path(args.names)
        if not p.is_file():
            raise InputError(f"{p}: no such names file. Pass a text file with one name a line.")
        names = p.read_text(encoding="utf-8").splitlines()
    from .insert import text_encoders

    pipe = _load(args)
    for i, (tok, te) in enumerate(text_encoders(pipe)):
        path = out if i == 0 else out.with_name(f"{out.stem}_{i + 1}{out.suffix}")
        basis = build_basis(tok, te, names, n_components=args.n_components, n_tokens=args.n_tokens, dedupe=args.dedupe,
                            source=model_name(pipe))
        basis.save(path)
        logger.info("Wrote %s: %d slots x %d directions x %d dims, ranks %s.", path, basis.n_tokens, basis.n_components,
                    basis.embedding_dim, basis.ranks)
    return 0


def _personalize(args, pipe, photos, names, out_dir: Path, overwrite: bool, analyzer=None, show_progress: bool = True):
    from .face import FaceAnalyzer
    from .models import TINY_MODEL, model_name
    from .train import personalize

    if pipe.unet.device.type == "cpu" and model_name(pipe) != TINY_MODEL and pipe.unet.config.sample_size >= 32:
        logger.warning("Training a full-size model on the CPU takes hours; a GPU (--device cuda) takes minutes.")
    cfg = _train_config(args, pipe, len(photos))
    result = personalize(pipe, photos, names, config=cfg, basis=_basis(args), face_index=args.face_index,
                         face_analyzer=analyzer or FaceAnalyzer(encoder=args.face_encoder),
                         show_progress=show_progress and not args.quiet)
    paths = result.save(out_dir, overwrite=overwrite)
    for p in paths:
        logger.info("Wrote %s", p)
    return result


def cmd_add(args) -> int:
    from .identity import check_name

    out = Path(args.output)
    names = [check_name(n) for n in args.name]
    if len(names) != len(args.photos):
        raise InputError(f"{len(args.photos)} photo(s) but {len(names)} --name(s). Pass one --name per photo, in the same order.")
    _check_output_dir(out)
    for n in names:
        if (out / f"{n}.safetensors").exists() and not args.overwrite:
            raise InputError(f"{out / (n + '.safetensors')} already exists. Pass --overwrite to replace it, or choose another --name.")
    from .face import FaceAnalyzer

    analyzer = FaceAnalyzer(encoder=args.face_encoder)
    photos = [analyzer(p, face_index=args.face_index) for p in args.photos]  # bad photos fail before the model loads
    pipe = _load(args)
    _personalize(args, pipe, photos, names, out, args.overwrite, analyzer)
    tokens = " ".join(f"<{n}>" for n in names)
    logger.info('Done. Use %s in prompts, e.g.: celebbasis generate "%s person reading a book" %s', tokens,
                f"<{names[0]}>", " ".join(f"--identity {out / (n + '.safetensors')}" for n in names))
    return 0


def cmd_add_many(args) -> int:
    """Every photo in a folder becomes an identity. Under ``accelerate launch`` (or torchrun) each
    process takes every N-th group; a rerun skips identities that already exist."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from .evaluate import IMAGE_SUFFIXES
    from .face import FaceAnalyzer
    from .identity import name_from_filename

    folder, out = Path(args.faces), Path(args.output)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder. Pass a folder of face photos.")
    if args.group_size < 1:
        raise InputError(f"--group-size must be >= 1, got {args.group_size}.")
    _check_output_dir(out)
    photos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not photos:
        raise InputError(f"{folder} holds no JPEG/PNG/WebP photos.")
    names, seen = [], set()
    for p in photos:
        base = name = name_from_filename(p.stem)
        k = 2
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        names.append(name)
    todo = [(p, n) for p, n in zip(photos, names) if args.overwrite or not (out / f"{n}.safetensors").exists()]
    if len(todo) < len(photos):
        logger.info("%d of %d people already have an identity in %s; skipping them.", len(photos) - len(todo), len(photos), out)
    groups = [todo[i : i + args.group_size] for i in range(0, len(todo), args.group_size)]
    state = PartialState(cpu=args.device == "cpu")
    mine = groups[state.process_index :: state.num_processes]
    if state.num_processes > 1:
        args.device = str(state.device)
        logger.info("Process %d of %d: %d of %d groups.", state.process_index + 1, state.num_processes, len(mine), len(groups))
    failed = []
    if mine:
        analyzer = FaceAnalyzer(encoder=args.face_encoder)
        pipe = _load(args)
        bar = tqdm(mine, desc="add-many", unit="group", disable=args.quiet or not state.is_local_main_process)
        for group in bar:
            ok = []
            for photo, name in group:
                try:
                    ok.append((analyzer(photo, face_index=args.face_index), name))
                except InputError as e:
                    failed.append(str(e))
                    logger.warning("Skipping %s: %s", photo, e)
            if ok:
                _personalize(args, pipe, [a for a, _ in ok], [n for _, n in ok], out, True, analyzer, show_progress=False)
    if failed:
        logger.error("%d photo(s) could not be used; fix or remove them and run again to finish.", len(failed))
        return 1
    return 0


def cmd_generate(args) -> int:
    from .generate import generate, save_images
    from .identity import Identity

    from .evaluate import read_prompt_file

    out = Path(args.output)
    _check_output_dir(out)
    items = [(None, p) for p in args.prompts] + (read_prompt_file(args.prompts_file) if args.prompts_file else [])
    if not items:
        raise InputError("No prompt given. Pass a prompt, or --prompts-file FILE.")
    identities = [Identity.load(p) for p in args.identity]  # bad files fail before the model loads
    pipe = _load(args)
    results = generate(pipe, [p for _, p in items], identities=identities, negative_prompt=args.negative_prompt,
                       num_images=args.num_images, steps=args.steps, guidance=args.guidance, height=args.height,
                       width=args.width, seed=args.seed, scheduler=args.scheduler, show_progress=not args.quiet,
                       batch_images=args.batch_images)
    categories = {p: c for c, p in items if c}
    for r in results:
        if r.prompt in categories:
            r.metadata["category"] = categories[r.prompt]
    paths = save_images(results, out)
    logger.info("Wrote %d image(s) to %s", len(paths), out)
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import ClipScorer, evaluate, find_images, read_prompt_file, write_report
    from .face import FaceAnalyzer
    from .identity import Identity

    images = find_images(args.images)
    refs = []
    for spec in args.reference:
        name, eq, path = spec.partition("=")
        refs.append((f"<{name.strip('<>')}>", path) if eq else (None, spec))
    prompts = read_prompt_file(args.prompts) if args.prompts else None
    out = Path(args.output)
    _check_output_dir(out)
    analyzer = FaceAnalyzer(encoder=args.eval_encoder)
    for p in args.identity:
        trained = Identity.load(p).metadata.get("face_encoder")
        if trained == analyzer.encoder.name:
            logger.warning("%s was trained with %s, the evaluation network too: ID similarity will read high. "
                           "Pass another --eval-encoder (arcface:PATH or onnx:PATH).", p, trained)
    clip = None if args.no_clip else ClipScorer(args.clip_model)
    report = evaluate(images, refs, analyzer=analyzer, clip=clip, prompts=prompts, show_progress=not args.quiet)
    write_report(report, out)
    s = report.summary()
    logger.info("%d images: face detection rate %.3f, ID similarity %s, CLIP score %s. Report in %s",
                s["n_images"], s["face_detection_rate"], s["id_similarity_mean"], s["clip_score_mean"], out)
    return 0


def cmd_benchmark_prompts(args) -> int:
    from .evaluate import benchmark_prompts
    from .files import atomic_write
    from .identity import check_name

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise InputError(f"{out} already exists. Pass --overwrite to replace it.")
    _check_output_dir(out.parent)
    rows = benchmark_prompts([check_name(n) for n in args.names])
    text = "".join(f"{c}\t{p}\n" for c, p in rows)
    atomic_write(out, lambda t: Path(t).write_text(text, encoding="utf-8"))
    logger.info("Wrote %d prompts to %s. The paper's protocol: celebbasis generate --prompts-file %s --scheduler ddim "
                "--steps 50 --guidance 10 --height 512 --width 512 --num-images 4 --seed 0 --identity ...", len(rows), out, out)
    return 0


def cmd_webui(args) -> int:
    from .models import DEFAULT_MODEL, DEFAULT_SDXL_MODEL
    from .webui import WebApp, launch

    out = Path(args.output)
    _check_output_dir(out)
    label = "tiny random model" if args.tiny else args.model or (DEFAULT_SDXL_MODEL if args.sdxl else DEFAULT_MODEL)
    size = 64 if args.tiny else 1024 if args.sdxl else 512
    app = WebApp(lambda: _load(args), out, default_steps=50 if args.tiny else 400, model_label=label, default_size=size)
    launch(app, host=args.host, port=args.port, share=args.share)
    return 0


def cmd_demo(args) -> int:
    from .errors import ModelLoadError
    from .generate import generate, save_images
    from .resources import example_face, example_prompts

    out = Path(args.output)
    _check_output_dir(out)
    photos = args.photo or [str(example_face())]
    if len(photos) > 2:
        raise InputError("The demo takes at most two --photo; use `celebbasis add` for more people.")
    if not args.tiny:
        try:
            pipe = _load(args)
        except ModelLoadError as e:
            print(f"\n{BANNER}\n  NO MODEL: {e}\n  Running the same pipeline on a TINY RANDOM model instead.\n"
                  f"  Its images are noise by design; pass --model PATH for real pictures.\n{BANNER}\n", file=sys.stderr)
            args.tiny = True
    if args.tiny:
        pipe = _load(args)
        if args.steps is None:
            args.steps = 100 * len(photos)
    names = ["id1", "id2"][: len(photos)]
    result = _personalize(args, pipe, photos, names, out / "identities", overwrite=True)
    prompts = [p for p in example_prompts() if "<id2>" not in p or len(photos) > 1]
    skipped = len(example_prompts()) - len(prompts)
    if skipped:
        logger.info("Skipping %d two-person prompt(s); pass a second --photo to draw them.", skipped)
    steps = args.sample_steps or (20 if args.tiny else 50)
    results = generate(pipe, prompts, num_images=args.num_images, steps=steps, seed=args.seed,
                       show_progress=not args.quiet)
    save_images(results, out / "images")
    logger.info("Demo done: %d identity file(s) in %s, %d image(s) in %s (grid.png shows them all).",
                len(result.identities), out / "identities", len(results), out / "images")
    return 0


def _bases(args, pipe):
    """The bases given with --basis, else the model's (built once, then cached)."""
    from .basis import cached_basis
    from .insert import text_encoders
    from .models import model_name

    given = _basis(args)
    if given:
        return given
    return [cached_basis(tok, te, source=model_name(pipe)) for tok, te in text_encoders(pipe)]


def _identity_target(args, name: str) -> Path:
    out = Path(args.output)
    _check_output_dir(out)
    target = out / f"{name}.safetensors"
    if target.exists() and not args.overwrite:
        raise InputError(f"{target} already exists. Pass --overwrite to replace it, or choose another --name.")
    return target


def cmd_export(args) -> int:
    from .export import export_identity
    from .identity import Identity

    identity = Identity.load(args.identity)
    out = Path(args.output)
    _check_output_dir(out if out.is_dir() or out.suffix == "" else out.parent)
    path = export_identity(identity, args.format, out, pt=args.pt, overwrite=args.overwrite)
    use = {
        "diffusers": f'pipe.load_textual_inversion("{path}"), then "{identity.token} person ..." in prompts',
        "a1111": f'copy it into stable-diffusion-webui/embeddings/, then "{path.stem} person ..." in prompts',
        "comfyui": f'copy it into ComfyUI/models/embeddings/, then "embedding:{path.stem} person ..." in prompts',
    }[args.format]
    logger.info("Wrote %s: %s", path, use)
    return 0


def cmd_import_embedding(args) -> int:
    from .export import import_embedding, read_embedding_file
    from .identity import check_name
    from .insert import encoders_fingerprint
    from .models import model_name

    name = check_name(args.name)
    target = _identity_target(args, name)
    read_embedding_file(args.embedding)  # a bad file fails before the model loads
    pipe = _load(args)
    identity, residuals = import_embedding(args.embedding, name, _bases(args, pipe), base_model=model_name(pipe))
    identity.metadata["text_encoder_sha256"] = encoders_fingerprint(pipe)
    identity.save(target)
    logger.info("Wrote %s (%d vectors); relative residual of the projection: %s. 0 means the embedding lies in the basis.",
                target, identity.n_tokens, ", ".join(f"{r:.3f}" for r in residuals))
    return 0


def cmd_mix(args) -> int:
    from .identity import Identity, check_name
    from .insert import encoders_fingerprint
    from .mix import mix

    name = check_name(args.name)
    target = _identity_target(args, name)
    items = [Identity.load(p) for p in args.identities] + list(args.celebrity)
    if not items:
        raise InputError("Nothing to mix. Pass identity files and/or --celebrity NAME.")
    weights = args.weights or [1.0 / len(items)] * len(items)
    if len(weights) != len(items):
        raise InputError(f"{len(items)} ingredient(s) but {len(weights)} --weights. Pass one weight per identity, then per celebrity.")
    pipe = _load(args)
    identity = mix(list(zip(items, weights)), name, _bases(args, pipe), pipe)
    identity.metadata["text_encoder_sha256"] = encoders_fingerprint(pipe)
    identity.save(target)
    logger.info("Wrote %s: %s", target, " + ".join(f"{w:g} x {getattr(i, 'token', i)}" for i, w in zip(items, weights)))
    return 0


COMMANDS = {"build-basis": cmd_build_basis, "add": cmd_add, "add-many": cmd_add_many, "generate": cmd_generate, "export": cmd_export,
            "import-embedding": cmd_import_embedding, "mix": cmd_mix, "evaluate": cmd_evaluate,
            "benchmark-prompts": cmd_benchmark_prompts, "webui": cmd_webui, "demo": cmd_demo}


def _with_config(parser: argparse.ArgumentParser, argv, args) -> argparse.Namespace:
    """Parse again with the TOML file's values as defaults, so flags on the command line win."""
    import tomllib

    path = Path(args.config)
    if not path.is_file():
        raise InputError(f"{path}: no such config file. Pass a TOML file, e.g. configs/sd15.toml.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid TOML ({e}). Fix the file.") from None
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    valid = {a.dest for a in sub._actions if a.dest not in ("help", "config")}
    values = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise InputError(f"{path}: {', '.join(unknown)} is not a flag of `celebbasis {args.command}`. "
                         f"Valid keys: {', '.join(sorted(valid))}.")
    sub.set_defaults(**values)
    return parser.parse_args(argv)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def _out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 failure, 2 bad input, 130 interrupted)."""
    import signal

    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        if args.config:
            args = _with_config(parser, argv, args)
        return COMMANDS[args.command](args)
    except CelebBasisError as e:
        if args.verbose:
            raise
        print(f"celebbasis: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("celebbasis: interrupted; nothing was written for the unfinished work.", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as e:
        if args.verbose or not (isinstance(e, MemoryError) or _out_of_memory(e)):
            raise
        hint = ("--low-memory, --resolution 384 or --batch-size 1" if args.command in ("add", "add-many", "demo")
                else "smaller --height/--width or --num-images 1")
        print(f"celebbasis: error: out of memory on {getattr(args, 'device', 'the device')}. Try --dtype float16, {hint}.",
              file=sys.stderr)
        return 1
    except OSError as e:
        if args.verbose:
            raise
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"celebbasis: error: cannot read or write{where}: {e.strerror or e}. Check the path and free disk space.",
              file=sys.stderr)
        return 1
    except Exception as e:  # a bug: say so in one line; -v shows the traceback
        if args.verbose:
            raise
        print(f"celebbasis: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
              "Run again with -v for the traceback and report it.", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
