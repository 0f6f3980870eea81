"""The ``celebbasis`` command: parse flags, call the public API, turn errors into exit codes.

    celebbasis build-basis --model MODEL -o basis.safetensors
    celebbasis add alice.jpg --name alice --model MODEL -o identities/
    celebbasis generate "<alice> person cooking" --identity identities/alice.safetensors --model MODEL -o out/
    celebbasis demo [-o DIR] [--tiny]

Flags of settings come from the config dataclasses (``celebbasis.config``); this module adds only
what is about the command line itself (files, model choice, logging).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from pathlib import Path

from ._version import __version__
from .cli_flags import Parser, config_flags, config_from, config_values, flag, merged, parse, sections
from .cli_inputs import check_inputs, command_line_model_wins
from .config import (DEFAULT_CLIP_MODEL, EXPORT_FORMATS, GENERATE_PRESETS, GROUP_SIZE, TRAIN_PRESETS, WARM_STEPS, WEBUI_HOST,
                     WEBUI_PORT, BasisConfig, GenerateConfig, PretrainConfig, TrainConfig)
from .errors import CelebBasisError, InputError, first_line
from .families import FAMILIES, SD1, SDXL, TINY_MODEL, family_named, family_of_tiny
from .files import check_new_file

logger = logging.getLogger("celebbasis")

BANNER = "=" * 78

# The one table from a library setting or argument (``InputError.field``) to what sets it on the command line.
# A config field not listed is the flag of the same name (``learning_rate`` -> ``--learning-rate``).
FLAGS = {
    "name": "--name",
    "names": "--name",
    "ingredients": "IDENTITY or --celebrity",
    "photos": "PHOTO",
    "path": "-o",
    "prompts": "PROMPT or --prompts-file",
}


def flag_for(field: str) -> str:
    """The command line's name for the library setting ``field``."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def error_line(e: BaseException) -> str:
    """An error as the command line says it: the setting the library names (``field``, ``field=value``) as its flag.

    ``steps must be >= 1`` -> ``--steps must be >= 1``; ``Pass overwrite=True`` -> ``Pass --overwrite``;
    a message that does not name its setting gets the flag at the end.
    """
    text, field = str(e), getattr(e, "field", None)
    if not field:
        return text
    flag = flag_for(field)
    word = rf"(?<![\w<'/.-]){re.escape(field)}"
    text, fixes = re.subn(word + r"=(\S+?)(?=[\s,.;:)]|$)",
                          lambda m: flag if m.group(1) == "True" else f"{flag} {m.group(1)}", text)  # every fix it names
    text, said = re.subn(word + r"(?=[\s,.;:)]|$)", flag, text, count=1)  # where it first names the setting
    return text if fixes or said else f"{text} ({flag})"


# -- flags --------------------------------------------------------------------------------------------

def _common(p: Parser, model: bool = True) -> None:
    g = p.add_argument_group("common")
    if model:
        flag(p, g, "--model", help="hub id, local diffusers folder, or single-file checkpoint (.safetensors/.ckpt) of an SD 1.x/2.x "
                                   f"or SDXL model (default: {SD1.default_model})")
        flag(p, g, "--model-config", metavar="FOLDER_OR_HUB_ID",
             help="for a single-file --model (.safetensors/.ckpt): diffusers folder or hub id of the same architecture to "
                  "take the configuration from (default: the family's, from the HF cache or the Hub)")
        flag(p, g, "--sdxl", default=False, action="store_true",
             help=f"SDXL: default model {SDXL.default_model} (and a tiny SDXL with --tiny); the same as --family sdxl")
        flag(p, g, "--family", choices=tuple(FAMILIES),
             help="model family of the default model and of --tiny: sd1 (default), sd2 or sdxl")
        flag(p, g, "--tiny", default=False, action="store_true",
             help="use a tiny random model built in-process (for trying things out; images are noise)")
        flag(p, g, "--toy", default=False, action="store_true",
             help="use the packaged toy world: a small model of cartoon people, 64 px, where learning can be seen on a CPU")
        flag(p, g, "--revision", help="hub revision (branch, tag or commit) of --model")
        flag(p, g, "--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: auto)")
        flag(p, g, "--dtype", default="auto", help="auto (float16 on GPU, float32 on CPU), float32, float16 or bfloat16 (default: auto)")
    flag(p, g, "--config", metavar="TOML", help="read this command's flags from a TOML file (keys as flag names; settings may also go in "
                                                        "[train], [generate] or [basis] tables); flags given here win")
    flag(p, g, "--threads", type=int, metavar="N",
         help="CPU threads for torch (default: 1 for the toy world and small models, whose many short operations "
              "only wait for each other on a busy machine; torch's default for larger ones; or OMP_NUM_THREADS if set)")
    flag(p, g, "-v", "--verbose", default=False, action="store_true", help="debug logging and full tracebacks")
    flag(p, g, "-q", "--quiet", default=False, action="store_true", help="only warnings and errors, no progress bars")


def _train_flags(p: Parser) -> None:
    g = p.add_argument_group("training")
    flag(p, g, "--preset", metavar="NAME", help="start from a preset: paper = the paper's recipe (a fresh identity "
         "network, 400 steps a person); toy = the toy world's full-frame, unflipped views (implied by --toy)")
    config_flags(p, g, TrainConfig, presets={"--toy": TRAIN_PRESETS.get("toy", {})})  # the toy's once plugged in (help)
    flag(p, g, "--face-encoder", metavar="SPEC",
         help="identity network: dlib (default), toy (the toy world's; default with --toy), arcface:/path/backbone.pth "
              "(the paper's) or onnx:/path/model.onnx")
    flag(p, g, "--face-index", type=int, help="which face to use in photos with several (0 = largest; default: largest)")
    flag(p, g, "--basis", action="append", help="basis file from build-basis; twice for SDXL (default: built from the model and cached)")


def _output(p: Parser, default: str, what: str) -> None:
    flag(p, p, "-o", "--output", default=default, help=f"{what} (default: {default})")


def _overwrite(p: Parser, what: str = "replace an existing output file") -> None:
    flag(p, p, "--overwrite", default=False, action="store_true", help=what)


def _add_parsers(sub) -> None:
    p = sub.add_parser("build-basis", help="build the celeb basis of a model's text encoder")
    flag(p, p, "-o", "--output", required=True, help="basis file to write (.safetensors)")
    flag(p, p, "--names", help="text file of celebrity names, one a line (default: the packaged 646 names)")
    config_flags(p, p.add_argument_group("basis"), BasisConfig)
    _overwrite(p)
    _common(p)

    p = sub.add_parser("add", help="learn a new person (or several, jointly) from their photos")
    p.add_argument("photos", nargs="+", metavar="PHOTO",
                   help="a photo or a folder of photos per person, in --name order; with one --name, all are that person")
    flag(p, p, "--name", action="append", required=True, help="name of each person; the prompt word is <name>")
    _output(p, "identities", "folder for NAME.safetensors")
    _overwrite(p, "replace identities that already exist")
    _train_flags(p)
    _common(p)

    p = sub.add_parser("pretrain", help="learn the identity network once from the model's own celebrities: then `add` "
                                        "gives a person instantly (--steps 0) or in a few dozen steps")
    _output(p, "pretrained.safetensors", "the network file to write (resumes from NAME.work.safetensors after a stop)")
    _overwrite(p)
    g = p.add_argument_group("pretraining")
    config_flags(p, g, PretrainConfig)
    flag(p, g, "--face-encoder", metavar="SPEC",
         help="the face network users' photos will be read with: dlib (default), toy (default with --toy), arcface:PATH, onnx:PATH")
    flag(p, g, "--basis", action="append", help="basis file from build-basis; twice for SDXL (default: built from the model and cached)")
    _common(p)

    p = sub.add_parser("add-many", help="learn everyone in a folder (groups trained jointly; resumable; shards under accelerate launch)")
    p.add_argument("faces", metavar="FACES_DIR", help="folder: a photo is a person named after the file, a subfolder of photos one person named after it")
    _output(p, "identities", "folder for NAME.safetensors")
    flag(p, p, "--group-size", type=int, default=GROUP_SIZE, help=f"people trained jointly per group (default: {GROUP_SIZE}, as the paper)")
    _overwrite(p, "learn again people that already have an identity (default: skip them)")
    _train_flags(p)
    _common(p)


def _draw_parsers(sub) -> None:
    p = sub.add_parser("generate", help="draw prompts that use learned people")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help='e.g. "<alice> person and Barack Obama cooking in a kitchen"')
    flag(p, p, "--prompts-file", help="more prompts, one a line, or CATEGORY<TAB>PROMPT[<TAB>NEGATIVE] (from benchmark-prompts)")
    flag(p, p, "--identity", action="append", default=[], help="identity file to load (repeat for several people)")
    _output(p, "out", "folder for the PNGs")
    g = p.add_argument_group("sampling")
    flag(p, g, "--preset", choices=sorted(GENERATE_PRESETS), help="start from a preset: paper = DDIM, 50 steps, guidance 10, "
         "512 px, seed 42, 8 images (the official evaluation); other flags win")
    config_flags(p, g, GenerateConfig)
    _common(p)

    p = sub.add_parser("export", help="write an identity as a textual-inversion file for diffusers, A1111 or ComfyUI")
    p.add_argument("identity", metavar="IDENTITY", help="identity file (NAME.safetensors)")
    flag(p, p, "--format", default=EXPORT_FORMATS[0], choices=EXPORT_FORMATS, help=f"target tool (default: {EXPORT_FORMATS[0]})")
    flag(p, p, "-o", "--output", default=".", help="output file (NAME.safetensors, or NAME.pt with --pt) or folder, created if missing; "
         "a trailing / always means a folder (default: NAME.safetensors here)")
    flag(p, p, "--pt", default=False, action="store_true", help="A1111's classic .pt layout instead of safetensors (SD 1.x/2.x)")
    _overwrite(p)
    _common(p, model=False)

    p = sub.add_parser("import-embedding", help="turn a textual-inversion file into an identity (projected onto the basis)")
    p.add_argument("embedding", metavar="FILE", help="TI file: .safetensors, or .pt (read with weights_only=True)")
    _new_identity_flags(p, "name of the person; the prompt word is <name>")

    p = sub.add_parser("mix", help="mix identities (and celebrity names) into a new identity")
    p.add_argument("identities", nargs="*", metavar="IDENTITY", help="identity files to mix")
    flag(p, p, "--celebrity", action="append", default=[], help='a celebrity name to mix in, e.g. "Anne Hathaway" (repeatable)')
    flag(p, p, "--weights", type=float, nargs="+", kind=list,
         help="one weight per identity, then per celebrity (default: equal weights)")
    _new_identity_flags(p, "name of the mix; the prompt word is <name>")


def _new_identity_flags(p: Parser, name_help: str) -> None:
    """Flags of commands that write one new identity from existing material (import, mix)."""
    flag(p, p, "--name", required=True, help=name_help)
    _output(p, "identities", "folder for NAME.safetensors")
    flag(p, p, "--basis", action="append", help="basis file(s) (default: built from the model and cached)")
    _overwrite(p, "replace an existing identity")
    _common(p)


def _tool_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="score generated images: ID similarity, CLIP score, face-detection rate")
    p.add_argument("images", metavar="IMAGES_DIR", help="folder of generated images (PNG metadata gives the prompts)")
    flag(p, p, "--reference", action="append", required=True, metavar="[NAME=]PHOTO_OR_DIR",
         help="photo (or folder of photos) of a person; NAME=... ties it to <NAME> in prompts (repeat for several people)")
    _output(p, "report", "report folder")
    flag(p, p, "--prompts", help="prompts file, one line per image in file-name order: PROMPT or "
         "CATEGORY<TAB>PROMPT[<TAB>NEGATIVE] (default: PNG metadata)")
    flag(p, p, "--eval-encoder", default="auto", metavar="SPEC",
         help="evaluation face network: auto (default: toy for images of the toy world, by their PNG metadata or the "
              "--identity files; dlib otherwise), dlib, toy, arcface:PATH or onnx:PATH; use one that did not train the identity")
    flag(p, p, "--identity", action="append", default=[], help="identity files, to warn when they were trained with the evaluation network")
    flag(p, p, "--clip-model", default=DEFAULT_CLIP_MODEL, help=f"CLIP for the prompt score: hub id or local folder (default: {DEFAULT_CLIP_MODEL})")
    flag(p, p, "--no-clip", default=False, action="store_true", help="skip the CLIP score")
    _common(p, model=False)

    p = sub.add_parser("benchmark-prompts", help="write the paper's four prompt categories (with their negative prompts)")
    p.add_argument("names", nargs="+", metavar="NAME", help="identity names (alice or <alice>)")
    _output(p, "benchmark_prompts.txt", "prompts file (CATEGORY<TAB>PROMPT<TAB>NEGATIVE lines)")
    _overwrite(p)
    _common(p, model=False)

    p = sub.add_parser("webui", help="the local web app: learn, library, create, mix")
    sections(p, TrainConfig, GenerateConfig)  # its Learn and Create tabs start from --config's [train] and [generate]
    _output(p, "identities", "identities folder")
    flag(p, p, "--host", default=WEBUI_HOST, help=f"address to bind (default: {WEBUI_HOST}, this machine only)")
    flag(p, p, "--port", type=int, default=WEBUI_PORT, help=f"port (default: {WEBUI_PORT})")
    flag(p, p, "--share", default=False, action="store_true", help="also open a public Gradio share link (off by default)")
    _common(p)

    p = sub.add_parser("demo", help="learn the packaged public-domain face and draw the example prompts")
    _output(p, "celebbasis-demo", "output folder")
    flag(p, p, "--photo", action="append", help="your own photo(s) instead of the packaged one; a second photo also fills <id2> prompts")
    flag(p, p, "--num-images", type=int, help=f"images per prompt (default: {GenerateConfig.num_images})")
    flag(p, p, "--sample-steps", type=int, help=f"denoising steps (default: {GenerateConfig.steps}, "
                                                f"{GENERATE_PRESETS['tiny']['steps']} with --tiny)")
    _train_flags(p)
    _common(p)


def build_parser() -> Parser:
    parser = Parser(prog="celebbasis", description="Put anyone into Stable Diffusion from one face photo.")
    parser.add_argument("--version", action="version", version=f"celebbasis {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    _add_parsers(sub)
    _draw_parsers(sub)
    _tool_parsers(sub)
    parser.subparsers = dict(sub.choices)
    return parser


# -- shared steps of the commands -------------------------------------------------------------------

def _load(args, device: str | None = None):
    from .models import load_pipeline

    logger.info("Loading %s ...", "the tiny random model" if args.tiny else _model_label(args))
    pipe = load_pipeline(args.model, config=args.model_config, device=device or args.device, dtype=args.dtype,
                         revision=args.revision, tiny=args.tiny, sdxl=args.sdxl, toy=args.toy, family=args.family)
    if _THREADS:
        _THREADS[-1].model_loaded(pipe)  # the torch threads for this model (``_Threads``)
    return pipe


def _model_label(args) -> str:
    if args.toy:
        return "the toy world"
    family = family_named(args.family) if args.family else SDXL if args.sdxl else SD1
    return "tiny random model" if args.tiny else args.model or family.default_model


def _with(args, **changes) -> argparse.Namespace:
    """A copy of the parsed arguments with ``changes``: what the command line said stays as it was parsed."""
    return argparse.Namespace(**{**vars(args), **changes})


def _face_spec(args) -> str:
    """The --face-encoder given, else the toy world's with --toy, else dlib."""
    return getattr(args, "face_encoder", None) or ("toy" if getattr(args, "toy", False) else "dlib")


def _analyzer(args):
    """The run's face analyzer; its several-faces warning names our flag."""
    from . import _plug_in
    from .face import FaceAnalyzer

    _plug_in()  # a plug-in's face network (--face-encoder toy) is registered before the first model loads

    return FaceAnalyzer(encoder=_face_spec(args), face_index_hint="--face-index N (0 = largest)")


def _model_flags(args) -> str:
    """The model flags of this run, to repeat in the hints it prints."""
    out = []
    for name in ("tiny", "sdxl", "toy"):
        if getattr(args, name, False):
            out.append(f"--{name}")
    for name in ("family", "model", "model_config", "revision"):
        value = getattr(args, name, None)
        if value:
            out.append(f"--{name.replace('_', '-')} {_quote(value)}")
    for name in ("device", "dtype"):
        if getattr(args, name, "auto") != "auto":
            out.append(f"--{name} {args.__dict__[name]}")
    return " ".join(out)


def _quote(text) -> str:
    import shlex

    return shlex.quote(str(text))


def _plug_in_toy() -> None:
    """The toy world registers its training preset, face network and model (it imports torch: only when needed)."""
    from . import toy  # noqa: F401


def _train_config(args, presets: bool = True) -> TrainConfig:
    """The run's TrainConfig, checked before any model loads: the toy preset with --toy, then --preset, then the file
    and flags. ``presets=False``: the file and flags alone, to check them before torch is imported (``_settings``)."""
    preset = getattr(args, "preset", None)
    if not presets:
        return config_from(TrainConfig, vars(args))
    if getattr(args, "toy", False) or (preset and preset not in TRAIN_PRESETS):
        _plug_in_toy()
    if preset and preset not in TRAIN_PRESETS:
        raise InputError(f"Unknown --preset {preset}. Choose one of: {', '.join(sorted(TRAIN_PRESETS))}.")
    base = {**(TRAIN_PRESETS["toy"] if getattr(args, "toy", False) else {}), **(TRAIN_PRESETS[preset] if preset else {})}
    return config_from(TrainConfig, vars(args), base=base)


def _basis(args):
    if not args.basis:
        return None
    from .basis import CelebBasis

    return [CelebBasis.load(p) for p in args.basis]


def _warn_cpu(pipe) -> None:
    from .models import model_name

    if pipe.unet.device.type == "cpu" and not model_name(pipe).startswith(TINY_MODEL) and pipe.unet.config.sample_size >= 32:
        logger.warning("Training a full-size model on the CPU takes hours; a GPU (--device cuda) takes minutes.")


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


def _people(photos: list[str], names: list[str]) -> list[list[Path]]:
    """Each person's photos: one argument (photo or folder) per --name, or every argument for a single --name."""
    from .face import photos_in

    groups = [[Path(p) for p in photos]] if len(names) == 1 else [[Path(p)] for p in photos]
    out = []
    for group in groups:
        expanded = []
        for p in group:
            if p.is_dir():
                found = photos_in(p)
                if not found:
                    raise InputError(f"{p} is a folder without images. Pass photos of the person, or a folder of them.")
                expanded += found
            else:
                expanded.append(p)
        out.append(expanded)
    return out


def _personalize(args, pipe, people: list, names: list[str], out_dir: Path, overwrite: bool, analyzer=None):
    from .train import personalize

    _warn_cpu(pipe)
    result = personalize(pipe, [p[0] if isinstance(p, list) and len(p) == 1 else p for p in people], names,
                         config=_train_config(args), basis=_basis(args), face_index=args.face_index,
                         face_analyzer=analyzer or _analyzer(args), show_progress=not args.quiet)
    for p in result.save(out_dir, overwrite=overwrite):
        logger.info("Wrote %s", p)
    return result


def cmd_build_basis(args) -> int:
    from .basis import build_basis
    from .families import slot_suffix, text_encoders
    from .models import model_name
    from .signatures import format_signature, table_signature

    out = check_new_file(args.output, args.overwrite)
    _check_output_dir(out.parent)
    names = None
    if args.names:
        p = Path(args.names)
        if not p.is_file():
            raise InputError(f"{p}: no such names file. Pass a text file with one name a line.")
        names = p.read_text(encoding="utf-8").splitlines()
    cfg = config_from(BasisConfig, vars(args))
    pipe = _load(args)
    pairs = text_encoders(pipe)
    paths = [out.with_name(f"{out.stem}{slot_suffix(i)}{out.suffix}") for i in range(len(pairs))]
    for path in paths[1:]:  # SDXL: the second encoder's file is checked before anything is built or written
        check_new_file(path, args.overwrite, what=f"{path} (the second text encoder's basis)")
    bases = [build_basis(tok, te, names, n_components=cfg.n_components, n_tokens=cfg.n_tokens, dedupe=cfg.dedupe,
                         source=model_name(pipe), signature=format_signature(table_signature(tok, te))) for tok, te in pairs]
    for path, basis in zip(paths, bases):
        basis.save(path)
        logger.info("Wrote %s: %d slots x %d directions x %d dims, ranks %s.", path, basis.n_tokens, basis.n_components,
                    basis.embedding_dim, basis.ranks)
    return 0


def cmd_add(args) -> int:
    from .train import check_people

    out = Path(args.output)
    people = _people(args.photos, args.name)
    names = check_people(args.name, len(people))  # before any photo or model is read
    _train_config(args)  # bad settings fail before any photo or model is read
    _check_output_dir(out)
    for n in names:
        check_new_file(out / f"{n}.safetensors", args.overwrite)
    analyzer = _analyzer(args)
    analyses = [[analyzer(p, face_index=args.face_index) for p in photos] for photos in people]  # before the model loads
    pipe = _load(args)
    _personalize(args, pipe, analyses, names, out, args.overwrite, analyzer)
    _toy_preview(args, pipe, names, [a[0].image for a in analyses])
    flags = _model_flags(args)
    logger.info('Done. Use %s in prompts, e.g.: celebbasis generate "%s person reading a book" %s%s',
                " ".join(f"<{n}>" for n in names), f"<{names[0]}>",
                " ".join(f"--identity {_quote(out / (n + '.safetensors'))}" for n in names), f" {flags}" if flags else "")
    return 0


def cmd_pretrain(args) -> int:
    """The identity network learned from the model's celebrities (``celebbasis.pretrain.pretrain`` does the work)."""
    from tqdm.auto import tqdm

    from .models import model_name
    from .pretrain import pretrain

    out = Path(args.output)
    cfg = config_from(PretrainConfig, vars(args))
    if out.suffix != ".safetensors":
        raise InputError(f"{out}: the network is a .safetensors file; name it so with -o.")
    check_new_file(out, args.overwrite)
    _check_output_dir(out.parent)
    analyzer, bases = _analyzer(args), _basis(args)
    pipe = _load(args)
    bar = tqdm(desc="pretrain: drawings", unit="drawing", disable=args.quiet)

    def progress(done, total, seconds):
        bar.total = total
        bar.update(done - bar.n)

    with bar:
        net = pretrain(pipe, analyzer, out, config=cfg, bases=bases, base_model=model_name(pipe), overwrite=args.overwrite,
                       progress=progress)
    c = net.metadata["counts"]
    logger.info("Wrote %s: fitted on %d of %d celebrities (%d of %d drawings had a face); held-back people's cosine %s.",
                out, c["names_kept"], c["names"], c["drawings_with_a_face"], c["drawings"],
                ", ".join(f"{v:.3f}" for v in net.metadata["validation_cosine"]) or "-")
    flags = _model_flags(args)
    logger.info("Use it: celebbasis add PHOTO --name NAME --pretrained %s%s (%d warm steps; --steps 0: the instant identity)",
                _quote(out), f" {flags}" if flags else "", WARM_STEPS)
    return 0


PREVIEW_STEPS = 20  # DDIM steps of the toy world's quick preview (its 5 drawings: about 3 s on one busy core)


def _toy_preview(args, pipe, names: list[str], photos: list) -> None:
    """In the toy world, draw each new person once per prompt of the demo and say how much of the photo came back."""
    from .generate import generate
    from .models import model_name
    from .toy import TOY_MODEL, TOY_PROMPTS

    if args.quiet or model_name(pipe) != TOY_MODEL:
        return
    for name, photo in zip(names, photos):
        prompts = [p.replace("<id1>", f"<{name}>") for p in TOY_PROMPTS]
        _log_likeness(name, [r.image for r in generate(pipe, prompts, steps=PREVIEW_STEPS, show_progress=False)], photo,
                      "on a quick preview")


def _log_likeness(name: str, images: list, photo, where: str) -> None:
    """The toy world's likeness of ``images`` to ``photo``, between the world's own ceiling and floor."""
    from .toy import LIKENESS_CELEBRITIES, LIKENESS_NO_IDENTITY, likeness_to_photo

    logger.info("Likeness of <%s> %s: %.2f, the share of the photo's six attributes the toy world's scorer reads back "
                "in %d drawing(s) (its own celebrities: %.2f; no identity: %.2f).", name, where,
                likeness_to_photo(images, photo), len(images), LIKENESS_CELEBRITIES, LIKENESS_NO_IDENTITY)


def cmd_add_many(args) -> int:
    """Every person in a folder becomes an identity (``celebbasis.many.add_many`` does the work)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .many import add_many

    out = Path(args.output)
    config = _train_config(args)
    _check_output_dir(out)
    with logging_redirect_tqdm(loggers=[logger]):  # log lines go above the progress bar, not through it
        result = add_many(lambda device: _load(args, device), args.faces, out, config=config, bases=_basis(args),
                          group_size=args.group_size, overwrite=args.overwrite,
                          analyzer=_analyzer(args), face_index=args.face_index,
                          show_progress=not args.quiet)
    for p in result.written:
        logger.info("Wrote %s", p)
    learned = f"{len(result.written)} learned, {len(result.skipped)} already had an identity"
    if result.failed:
        logger.error("add-many: %s, %d skipped: %s Fix or remove those photos and run again to finish (people already "
                     "learned are skipped).", learned, len(result.failed), " ".join(result.failed))
        return 1
    logger.info("add-many: %s.", learned)
    return 0


def _generate_config(args) -> GenerateConfig:
    """The run's GenerateConfig: the preset (if any), then the TOML values and flags that were set."""
    preset = getattr(args, "preset", None)
    if not preset:
        return config_from(GenerateConfig, vars(args))
    return GenerateConfig.preset(preset, **config_values(GenerateConfig, vars(args)))


def cmd_generate(args) -> int:
    from .generate import generate, save_images
    from .identity import Identity
    from .prompts import PromptLine, negatives_for, read_prompt_file

    out = Path(args.output)
    config = _generate_config(args)
    _check_output_dir(out)
    lines = [PromptLine(p) for p in args.prompts] + (read_prompt_file(args.prompts_file) if args.prompts_file else [])
    if not lines:
        raise InputError("No prompt given. Pass a prompt, or --prompts-file FILE.")
    identities = [Identity.load(p) for p in args.identity]  # bad files fail before the model loads
    args = _follow_recorded_model(args, _identities_model(args, args.identity, identities))
    pipe = _load(args)
    results = generate(pipe, [line.prompt for line in lines], identities=identities, config=config,
                       negative_prompt=negatives_for(lines, config.negative_prompt), show_progress=not args.quiet)
    for r in results:
        category = next((line.category for line in lines if line.prompt == r.prompt and line.category), None)
        if category:
            r.metadata["category"] = category
    paths = save_images(results, out)
    grid = " and grid.png" if len(paths) > len(results) else ""
    logger.info("Wrote %d image(s)%s to %s", len(results), grid, out)
    return 0


def _eval_encoder(args, images, identities) -> str:
    """--eval-encoder, or with ``auto`` the toy world's network for its images (PNG ``model`` or the identities), else dlib."""
    from .evaluate import image_models
    from .toy import TOY_MODEL

    if args.eval_encoder != "auto":
        return args.eval_encoder
    models = image_models(images) | {i.metadata.get("base_model") for i in identities}
    if TOY_MODEL in models:
        logger.info("Evaluating with the toy world's face network (--eval-encoder toy): the images are the toy world's.")
        return "toy"
    return "dlib"


def cmd_evaluate(args) -> int:
    from .evaluate import ClipScorer, evaluate, find_images, write_report
    from .face import FaceAnalyzer, make_face_encoder
    from .identity import Identity
    from .prompts import read_prompt_file

    images = find_images(args.images)
    identities = [(p, Identity.load(p)) for p in args.identity]
    refs = []
    for spec in args.reference:
        name, eq, path = spec.partition("=")
        refs.append((f"<{name.strip('<>')}>", path) if eq else (None, spec))
    prompts = read_prompt_file(args.prompts) if args.prompts else None
    out = Path(args.output)
    _check_output_dir(out)
    spec = _eval_encoder(args, images, [i for _, i in identities])
    encoder = make_face_encoder(spec)  # a missing network file is reported first
    clip = None if args.no_clip else ClipScorer(args.clip_model)  # an offline CLIP fails before the detector loads
    analyzer = FaceAnalyzer(encoder=encoder)
    for p, identity in identities:
        trained = identity.metadata.get("face_encoder")
        if trained == analyzer.encoder.name:
            fix = ("The toy world has no other face network; its scorer (celebbasis.toy.score) is the independent measure"
                   if spec == "toy" else "Pass another --eval-encoder (arcface:PATH or onnx:PATH)")
            logger.warning("%s was trained with %s, the evaluation network too: ID similarity will read high. %s.",
                           p, trained, fix)
    report = evaluate(images, refs, analyzer=analyzer, clip=clip, prompts=prompts, show_progress=not args.quiet)
    write_report(report, out)
    s = report.summary()
    shown = {k: "–" if s[k] is None else f"{s[k]:.3f}" for k in ("id_similarity_mean", "clip_score_mean")}
    logger.info("%d images: face detection rate %.3f, ID similarity %s, CLIP score %s. Report in %s",
                s["n_images"], s["face_detection_rate"], shown["id_similarity_mean"], shown["clip_score_mean"], out)
    return 0


def cmd_benchmark_prompts(args) -> int:
    from .files import atomic_write
    from .identity import check_name
    from .prompts import benchmark_prompt_lines, prompt_file_text

    out = check_new_file(args.output, args.overwrite)
    _check_output_dir(out.parent)
    rows = benchmark_prompt_lines([check_name(n) for n in args.names])
    text = prompt_file_text(rows)
    atomic_write(out, lambda t: Path(t).write_text(text, encoding="utf-8"))
    logger.info("Wrote %d prompts to %s. The paper's protocol: celebbasis generate --prompts-file %s --preset paper "
                "--identity ...", len(rows), out, out)
    return 0


def cmd_webui(args) -> int:
    from .webui import WebApp, launch

    out = Path(args.output)
    _check_output_dir(out)
    app = WebApp(lambda: _load(args), out, model_label=_model_label(args), face_encoder=_face_spec(args),
                 train_config=_train_config(args), generate_config=_generate_config(args))
    launch(app, host=args.host, port=args.port, share=args.share)
    return 0


def cmd_demo(args) -> int:
    from .errors import ModelLoadError
    from .face import load_image
    from .files import atomic_write
    from .generate import generate, save_images
    from .resources import example_face, example_prompts
    from .sheet import contact_sheet
    from .toy import PAIR_SIZE, TOY_PAIR_PROMPTS, TOY_PROMPTS, toy_photo

    out = Path(args.output)
    config = _train_config(args)
    sampling = _demo_sampling(args, config.seed)  # checked before anything loads
    _check_output_dir(out)
    if args.photo and len(args.photo) > 2:
        raise InputError("The demo takes at most two --photo; use `celebbasis add` for more people.")
    if not (args.tiny or args.toy):
        try:
            pipe = _load(args)
        except ModelLoadError as e:
            print(f"\n{BANNER}\n  NO MODEL: {e}\n  Running the same pipeline in the TOY WORLD instead: a small model of cartoon\n"
                  f"  people that ships with celebbasis (64 px). Pass --model PATH for real pictures.\n{BANNER}\n",
                  file=sys.stderr)
            args = _with(args, toy=True)
    if args.tiny or args.toy:
        pipe = _load(args)
    if args.tiny and config.steps is None:
        args = _with(args, steps=100 * len(args.photo or [None]))
    photos = args.photo or [str(toy_photo(0) if args.toy else example_face())]
    all_prompts = TOY_PROMPTS if args.toy else example_prompts()
    names = ["id1", "id2"][: len(photos)]
    ids = out / "identities"
    replaced = [n for n in names if (ids / f"{n}.safetensors").exists()]
    if replaced:
        logger.warning("Replacing the earlier demo's %s in %s.", ", ".join(f"{n}.safetensors" for n in replaced), ids)
    result = _personalize(args, pipe, photos, names, ids, overwrite=True)
    with_photos = lambda ps: [p for p in ps if "<id2>" not in p or len(photos) > 1]  # noqa: E731
    pair_prompts = TOY_PAIR_PROMPTS if args.toy else []
    prompts = with_photos(all_prompts)
    skipped = len(all_prompts + pair_prompts) - len(with_photos(all_prompts + pair_prompts))
    if skipped:
        logger.info("Skipping %d prompt(s) with <id2>; pass a second --photo to draw them.", skipped)
    results = generate(pipe, prompts, config=sampling, show_progress=not args.quiet)
    pairs = generate(pipe, with_photos(pair_prompts), config=dataclasses.replace(sampling, **PAIR_SIZE),
                     show_progress=not args.quiet) if pair_prompts else []  # the toy world's two people in one picture
    save_images(results + pairs, out / "images")
    if args.toy:
        from .toy.world import halves, side_of

        for name, photo in zip(names, photos):
            photo = load_image(photo)
            _log_likeness(name, [r.image for r in results if f"<{name}>" in r.prompt], photo, "in these images")
            sides = [halves(r.image)[side_of(r.prompt, f"<{name}>")] for r in pairs if f"<{name}>" in r.prompt]
            if sides:
                _log_likeness(name, sides, photo, "on its side of the two-person pictures")
    results += pairs
    sheet = contact_sheet([load_image(p).resize(results[0].image.size) for p in photos] + [r.image for r in results],
                          columns=len(photos) + len(results))
    atomic_write(out / "contact_sheet.png", lambda tmp: sheet.save(tmp, format="PNG"))
    logger.info("Demo done: %d identity file(s) in %s, %d image(s) in %s; contact_sheet.png shows the photo(s), then "
                "every image.", len(result.identities), ids, len(results), out / "images")
    return 0


def _demo_sampling(args, seed: int) -> GenerateConfig:
    """The demo's sampling: ``GenerateConfig``'s defaults (its ``tiny`` preset with --tiny), the training seed.

    Its ``steps`` are the demo's --sample-steps (--steps is training's), and errors say so."""
    given = {k: v for k, v in (("num_images", args.num_images), ("steps", args.sample_steps)) if v is not None}
    try:
        return GenerateConfig.preset("tiny", **given, seed=seed) if args.tiny else GenerateConfig(**given, seed=seed)
    except InputError as e:
        if e.field != "steps":
            raise
        raise InputError(str(e).replace("steps", "sample_steps", 1), field="sample_steps") from None


def _bases(args, pipe):
    """The bases given with --basis, else the model's (built once, then cached)."""
    from .models import pipeline_bases

    return _basis(args) or pipeline_bases(pipe)


def _identity_target(args, name: str) -> Path:
    out = Path(args.output)
    _check_output_dir(out)
    return check_new_file(out / f"{name}.safetensors", args.overwrite)


def cmd_export(args) -> int:
    from .export import EXPORTERS, export_identity, export_path
    from .identity import Identity

    identity = Identity.load(args.identity)
    _check_output_dir(export_path(identity, args.output, args.pt).parent)
    path = export_identity(args.identity, args.format, args.output, pt=args.pt, overwrite=args.overwrite)
    use = EXPORTERS[args.format].usage(identity, path)
    logger.info("Wrote %s: %s", path, use)
    return 0


def _follow_recorded_model(args, recorded: str | None) -> argparse.Namespace:
    """With no model flag given, the arguments with the model an input file records (``base_model``): the toy
    world, the tiny model of the recorded family ("tiny-sd2" is SD 2.x's), or the model itself."""
    from .toy import TOY_MODEL

    if args.model or args.tiny or args.sdxl or args.toy or args.family or not recorded:
        return args
    tiny = family_of_tiny(recorded)
    if recorded == TOY_MODEL:
        followed = _with(args, toy=True)
    elif tiny is not None:
        followed = _with(args, tiny=True, family=tiny.name)
    elif recorded.startswith(TINY_MODEL):  # the tiny model of a family not registered here
        raise InputError(f"The input was made on {recorded}, the tiny model of a model family not registered here. "
                         "Pass --model (or --tiny with --family).")
    else:
        followed = _with(args, model=recorded)
    logger.info("Using %s, the model the input was made for (pass --model to choose another).", recorded)
    return followed


def _identities_model(args, paths: list[str], identities: list) -> str | None:
    """The model the identities were made for (``base_model``); ``None`` when a model flag was given or none records one.

    Raises:
        InputError: they record different models, and no model flag says which to use.
    """
    if args.model or args.tiny or args.sdxl or args.toy:
        return None
    recorded = {}
    for path, identity in zip(paths, identities):
        model = identity.metadata.get("base_model")
        if model:
            recorded.setdefault(model, path)
    if len(recorded) > 1:
        (a, pa), (b, pb) = list(recorded.items())[:2]
        raise InputError(f"{pa} was made for {a} but {pb} for {b}. Pass --model (or --toy, --tiny) to choose the model "
                         "to draw with, or identities made for one model.")
    return next(iter(recorded), None)


def cmd_import_embedding(args) -> int:
    from .export import import_embedding, read_embedding_file
    from .files import load_safetensors
    from .identity import check_name

    name = check_name(args.name)
    target = _identity_target(args, name)
    read_embedding_file(args.embedding)  # a bad file fails before the model loads
    recorded = load_safetensors(args.embedding)[1].get("base_model") if args.embedding.endswith(".safetensors") else None
    args = _follow_recorded_model(args, recorded)
    pipe = _load(args)
    identity, residuals = import_embedding(args.embedding, name, _bases(args, pipe), pipe=pipe)
    identity.save(target)
    logger.info("Wrote %s (%d vectors); relative residual of the projection: %s. 0 means the embedding lies in the basis.",
                target, identity.n_tokens, ", ".join(f"{r:.3f}" for r in residuals))
    return 0


def cmd_mix(args) -> int:
    from .identity import Identity, check_name
    from .mix import ingredients, mix

    name = check_name(args.name)
    target = _identity_target(args, name)
    identities = [Identity.load(p) for p in args.identities]
    pairs = ingredients(identities + list(args.celebrity), args.weights)  # before the model loads
    args = _follow_recorded_model(args, _identities_model(args, args.identities, identities))
    pipe = _load(args)
    identity = mix(pairs, name, _bases(args, pipe), pipe)
    identity.save(target)
    logger.info("Wrote %s: %s", target, " + ".join(f"{w:g} x {getattr(i, 'token', i)}" for i, w in pairs))
    return 0


COMMANDS = {"build-basis": cmd_build_basis, "add": cmd_add, "add-many": cmd_add_many, "pretrain": cmd_pretrain, "generate": cmd_generate, "export": cmd_export,
            "import-embedding": cmd_import_embedding, "mix": cmd_mix, "evaluate": cmd_evaluate,
            "benchmark-prompts": cmd_benchmark_prompts, "webui": cmd_webui, "demo": cmd_demo}


# -- logging and the process ------------------------------------------------------------------------

class _LoggingSetup:
    """The CLI's logging for one ``main`` call; put back as it was afterwards (tests call ``main`` in-process)."""

    NOISY = ("transformers", "diffusers", "huggingface_hub", "accelerate")

    def __init__(self, args):
        self.args = args

    def __enter__(self):
        args = self.args
        level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
        self.bars = self._progress_bars()  # imports the libraries first: transformers sets its level on import
        self.saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in map(logging.getLogger, ("celebbasis", *self.NOISY))]
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s"))
        root = logging.getLogger("celebbasis")
        root.handlers[:] = [handler]
        root.setLevel(level)
        root.propagate = False
        if not args.verbose:  # the libraries' own chatter (deprecations, load reports) is not for CLI users
            for name in self.NOISY:
                logging.getLogger(name).setLevel(logging.ERROR)
        if args.quiet:
            for lib in self.bars:
                lib.disable_progress_bar()
        return self

    @staticmethod
    def _progress_bars() -> dict:
        """diffusers' and transformers' progress-bar switches, with their state now."""
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        return {lib: lib.is_progress_bar_enabled() for lib in (diffusers_logging, transformers_logging)}

    def __exit__(self, *exc):
        for lg, handlers, level, propagate in self.saved:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
        for lib, enabled in self.bars.items():
            (lib.enable_progress_bar if enabled else lib.disable_progress_bar)()
        return False


def _settings(args) -> None:
    """The command's settings, made once here to check them before anything else (each command makes them again)."""
    if args.command in ("add", "add-many", "demo", "webui"):
        _train_config(args, presets=False)
    if args.command in ("generate", "webui"):
        _generate_config(args)
    if args.command == "demo":
        _demo_sampling(args, 0)
    if args.command == "build-basis":
        config_from(BasisConfig, vars(args))


class _Threads:
    """torch's threads for one ``main`` call, put back afterwards: ``--threads N``, else the user's
    ``OMP_NUM_THREADS``, else chosen for the model (``celebbasis.threads``): one thread for the toy world
    and the tiny model from the start, and for any model found small once it is loaded."""

    def __init__(self, args):
        self.args = args

    def __enter__(self):
        from .threads import torch_threads, user_set_threads

        args = self.args
        self.auto = getattr(args, "threads", None) is None and not user_set_threads()
        small = getattr(args, "toy", False) or getattr(args, "tiny", False) or getattr(args, "eval_encoder", "") == "toy"
        self.context = torch_threads(getattr(args, "threads", None) or (1 if self.auto and small else None))
        self.set = self.context.__enter__()
        _THREADS.append(self)  # ``_load`` reports the model it loaded
        return self

    def model_loaded(self, pipe) -> None:
        from .threads import threads_for

        if self.auto:
            n = threads_for(pipe)
            self.set(n)
            logger.debug("torch threads: %s for %s.", n or "torch's default", _model_label(self.args))

    def __exit__(self, *exc):
        _THREADS.remove(self)
        return self.context.__exit__(*exc)


_THREADS: list[_Threads] = []  # the running ``main`` call's thread choice (tests call ``main`` in-process)


class Terminated(KeyboardInterrupt):
    """SIGTERM, stopping the command as Ctrl-C does (exit 143 instead of 130)."""


def _on_sigterm(signum, frame):
    raise Terminated


def _out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 failure, 2 bad input, 130 interrupted, 143 terminated)."""
    import signal
    import warnings

    if {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
        _plug_in_toy()  # the help says what --toy changes
    parser = build_parser()
    args = parse(parser, argv)
    given = set(vars(args))  # what the command line itself set
    try:
        args = merged(parser, args)  # flag defaults <- --config TOML <- command line
        command_line_model_wins(args, given)
        _settings(args)  # bad settings first, then missing files and contradicting flags: before torch is imported
        check_inputs(args)
    except CelebBasisError as e:
        print(f"celebbasis: error: {error_line(e)}", file=sys.stderr)
        return e.exit_code
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        with _LoggingSetup(args), warnings.catch_warnings(), _Threads(args):
            if not args.verbose:  # library deprecation notices, for this command only
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    """The command, with every error turned into one line and an exit code."""
    try:
        return COMMANDS[args.command](args)
    except CelebBasisError as e:
        if args.verbose:
            raise
        print(f"celebbasis: error: {error_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        stopped = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"celebbasis: {stopped}; nothing was written for the unfinished work.", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:  # -v shows the traceback; otherwise one line
        if args.verbose:
            raise
        print(f"celebbasis: error: {_unexpected(e, args)}", file=sys.stderr)
        return 1


def _unexpected(e: Exception, args) -> str:
    """One line for an error no command raised on purpose: out of memory, a file system error, or a bug."""
    if isinstance(e, MemoryError) or _out_of_memory(e):
        hint = ("--low-memory, --resolution 384 or --batch-size 1" if args.command in ("add", "add-many", "demo")
                else "smaller --height/--width or --num-images 1")
        return f"out of memory on {getattr(args, 'device', 'the device')}. Try --dtype float16, {hint}."
    if isinstance(e, OSError):
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        return f"cannot read or write{where}: {e.strerror or e}. Check the path and free disk space."
    detail = f": {first_line(e, 400)}" if str(e).strip() else ""
    return f"internal error: {type(e).__name__}{detail}. Run again with -v for the traceback and report it."


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
