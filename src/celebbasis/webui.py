"""``celebbasis webui``: a local Gradio app over the public API — Learn, Library, Create, Mix.

One job runs on the model at a time (Gradio's queue, concurrency 1); others wait with their
position shown. The app binds 127.0.0.1 unless told otherwise, caps uploads, sanitises names and
serves only its own folders. Everything it does is also a Python call: ``Library`` is the identities
folder, ``Photos`` the face analyses of uploads, ``WebApp`` the state over them (pipeline, face
analyzer) and what the tabs do with it, ``Handlers`` is what each button does, and
``build_ui`` only lays out components and wires them to handlers. Defaults come from
``TrainConfig`` and ``GenerateConfig``; the image size from the loaded model.
"""

# No ``from __future__ import annotations`` here: Gradio reads handler annotations (gr.Request,
# gr.SelectData) as objects, and the handlers are defined where ``gr`` is a local name.

import dataclasses
import datetime as _dt
import html
import logging
import queue
import threading
import time
import zipfile
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image, ImageDraw

from .config import EXPORT_FORMATS, WEBUI_HOST, WEBUI_PORT, GenerateConfig, TrainConfig, updated
from .errors import CelebBasisError, InputError, NoFaceFoundError
from .export import export_identity
from .families import family_of
from .files import check_new_file
from .face import MIN_FACE_PX, FaceAnalysis, FaceAnalyzer, same_person_threshold, unlike_photos
from .generate import generate, preview, save_images
from .identity import Identity, check_name
from .insert import PLACEHOLDER_RE, load_identity
from .mix import mix
from .pretrain import resolve_pretrained
from .models import SINGLE_FILE_SUFFIXES, pipeline_bases
from .resources import example_prompts
from .train import check_people, default_analyzer, personalize

logger = logging.getLogger(__name__)

MAX_UPLOAD = "20mb"
MAX_UPLOAD_PIXELS = 40_000_000
PHOTO_CACHE = 8  # photos whose face analysis is kept between Detect and Learn
MAX_STEPS_PER_PERSON = 1600  # the Learn slider's end (raised to the configured default if that is larger)


def _md(text) -> str:
    """User-facing text inside Markdown: ``<alice>`` must not turn into an HTML tag."""
    return html.escape(str(text))


def model_title(model: str) -> str:
    """What the page calls the model: a single-file checkpoint by its file name, anything else as given."""
    model = str(model or "")
    return Path(model).name if model.lower().endswith(SINGLE_FILE_SUFFIXES) else model


class Cancelled(Exception):
    """Raised inside training when the user pressed Cancel."""


@dataclasses.dataclass(frozen=True)
class Defaults:
    """What the page's fields start with: from ``TrainConfig``/``GenerateConfig`` and the model."""

    steps_per_person: int
    create_steps: int
    guidance: float
    width: int
    height: int
    num_images: int
    seed: int


@dataclasses.dataclass
class Detection:
    """What the Learn tab shows before training: each photo with its faces boxed, the training crops, notes."""

    boxed: list  # (photo with every face boxed, the one used in green; caption)
    crops: list  # (aligned training crop; caption)
    notes: list  # one line per photo, then a warning per photo that looks like someone else


class Library:
    """The identities folder: ``NAME.safetensors`` with its ``NAME.thumb.png`` and ``NAME.run.json``.

    A file is read again only when its mtime, size or inode change; unreadable files are skipped with one warning.
    """

    def __init__(self, folder):
        self.dir = Path(folder)
        self.exports = self.dir / "exports"
        self._cache: dict[Path, tuple[tuple, Identity | None]] = {}  # path -> ((mtime, size, inode), identity)
        self._cache_lock = threading.Lock()

    def scan(self) -> list[tuple[Path, tuple, Identity]]:
        """Every readable identity in the folder; a file is read again only when its mtime, size or inode change."""
        with self._cache_lock:
            fresh = {}
            for path in sorted(self.dir.glob("*.safetensors")):
                try:
                    st = path.stat()
                except FileNotFoundError:  # deleted while we looked
                    continue
                key = (st.st_mtime_ns, st.st_size, st.st_ino)
                hit = self._cache.get(path)
                if hit is None or hit[0] != key:
                    try:
                        hit = (key, Identity.load(path))
                    except CelebBasisError as e:
                        logger.warning("Skipping %s: %s", path.name, e)
                        hit = (key, None)  # remembered, so it is not read (and reported) again
                fresh[path] = hit
            self._cache = fresh
            return [(p, key, ident) for p, (key, ident) in fresh.items() if ident is not None]

    def identities(self) -> list[dict]:
        rows = []
        for path, _, ident in self.scan():
            thumb = path.with_suffix(".thumb.png")
            rows.append({"name": ident.name, "token": ident.token, "path": str(path),
                         "thumb": str(thumb) if thumb.exists() else None,
                         "model": ident.metadata.get("base_model", ""), "created": ident.metadata.get("created", "")})
        return rows

    def path(self, name: str) -> Path:
        return self.dir / f"{check_name(name)}.safetensors"

    def new_path(self, name: str, fix: str = "Pick another name.") -> Path:
        """Where a new identity ``name`` goes; refused, in the page's words, when one of that name exists."""
        return check_new_file(self.path(name), what=f"An identity named {name!r}", fix=fix)

    def get(self, name: str) -> Identity:
        path = self.path(name)
        found = next((ident for p, _, ident in self.scan() if p == path), None)
        if found is None:
            raise InputError(f"No identity named {name!r}.")
        return found

    def rename(self, old: str, new: str) -> str:
        src, dst = self.path(old), self.new_path(new)
        ident = self.get(old)
        dataclasses.replace(ident, token=f"<{check_name(new)}>").save(dst)
        for suffix in (".thumb.png", ".run.json"):
            if src.with_suffix(suffix).exists():
                src.with_suffix(suffix).rename(dst.with_suffix(suffix))
        src.unlink()
        return f"<{check_name(new)}>"

    def delete(self, name: str) -> None:
        path = self.path(name)
        if not path.exists():
            raise InputError(f"No identity named {name!r}.")
        for p in (path, path.with_suffix(".thumb.png"), path.with_suffix(".run.json")):
            p.unlink(missing_ok=True)

    def export(self, name: str, fmt: str) -> Path:
        """The identity file itself (``celebbasis``), or its export for a tool of ``EXPORT_FORMATS``."""
        path = self.path(name)
        if fmt == "celebbasis":
            return path
        if fmt not in EXPORT_FORMATS:  # before the name becomes a folder
            raise InputError(f"Unknown format {fmt!r}. Choose celebbasis or one of: {', '.join(EXPORT_FORMATS)}.")
        folder = self.exports / fmt
        folder.mkdir(parents=True, exist_ok=True)
        return export_identity(path, fmt, folder / f"{check_name(name)}.safetensors", overwrite=True)


class Photos:
    """Face analyses of uploaded photos, one per file version, the latest ``PHOTO_CACHE`` kept.

    Args:
        analyzer: returns the ``FaceAnalyzer`` (the app makes it on first use).
    """

    def __init__(self, analyzer):
        self._analyzer = analyzer
        self._photos: OrderedDict = OrderedDict()  # (photo path, version) -> (faces, FaceAnalysis), latest last
        self._lock = threading.Lock()

    def __call__(self, photo) -> tuple[list, FaceAnalysis]:
        """Every face in the photo (largest first) and the analysis of the largest, once per file version.

        What the Learn tab showed is what trains: ``learn`` reuses the analyses ``detect`` made.
        """
        path = Path(photo)
        key = (str(path), _file_key(path)) if path.is_file() else None
        with self._lock:
            if key in self._photos:
                self._photos.move_to_end(key)
                return self._photos[key]
        try:
            with Image.open(path) as im:
                w, h = im.size
        except (OSError, Image.DecompressionBombError):  # load_image below says what is wrong with the file
            w = h = 0
        if w * h > MAX_UPLOAD_PIXELS:
            raise InputError(f"{path.name} is {w}x{h}; the web UI takes up to {MAX_UPLOAD_PIXELS // 1_000_000} MP.")
        found = self._analyzer().find(path, label=path.name)  # named as uploaded, never by the server's upload folder
        if key is not None:
            with self._lock:
                self._photos[key] = found
                while len(self._photos) > PHOTO_CACHE:
                    self._photos.popitem(last=False)
        return found


class WebApp:
    """The state behind the web UI: one pipeline, one face analyzer, the identities folder (``Library``), and what
    the tabs do with them.

    Args:
        load: a function returning the diffusers pipeline (called once, on first use).
        identities_dir: where identities live (``NAME.safetensors`` + ``NAME.thumb.png``).
        train_config: training settings; the Learn tab's steps per person start at its default.
        generate_config: sampling settings the Create tab starts with (size: the model's own by default).
        model_label: what the page says the model is (a single-file checkpoint shows its file name).
        analyzer: the ``FaceAnalyzer`` (made on first use with ``face_encoder`` when ``None``).
        face_encoder: the identity network's spec for that analyzer: ``dlib``, ``toy`` (the toy world's), ...; default: the
            model's own (``train.default_analyzer``: the toy world's for the toy world), else dlib's.
    """

    def __init__(self, load, identities_dir, *, train_config: TrainConfig | None = None,
                 generate_config: GenerateConfig | None = None, model_label: str = "", analyzer=None,
                 face_encoder: str | None = None):
        self._load = load
        self._pipe = None
        self._analyzer = analyzer
        self._face_encoder = face_encoder
        self.lock = threading.Lock()  # one job on the pipeline at a time
        self.library = Library(identities_dir)
        self.dir = self.library.dir  # created by ``launch`` once the model loaded, or by the first file written
        self.outputs = self.dir / "outputs"
        self.train_config = train_config or TrainConfig()
        self.generate_config = generate_config or GenerateConfig()
        self.model_label = model_title(model_label)
        self._in_pipe: dict[str, tuple[Path, tuple, bool]] = {}  # token -> (file, version, loaded) in the pipeline
        self.photos = Photos(lambda: self.analyzer)

    # -- resources ---------------------------------------------------------------------------
    @property
    def pipe(self):
        if self._pipe is None:
            self._pipe = self._load()
        return self._pipe

    @property
    def analyzer(self):
        if self._analyzer is None:  # the face network asked for, else the model's own (the toy world's), else dlib's
            self._analyzer = FaceAnalyzer(encoder=self._face_encoder) if self._face_encoder else default_analyzer(self.pipe)
        return self._analyzer

    @property
    def native_size(self) -> int:
        """The model's own image size in pixels, as its family says (loads the model)."""
        return family_of(self.pipe).native_size(self.pipe)

    def defaults(self) -> Defaults:
        """The fields' starting values: the configs' defaults, sizes from the model when the config has none."""
        g = self.generate_config
        size = self.native_size if g.width is None or g.height is None else None
        warm = resolve_pretrained(self.train_config.pretrained, self.pipe) is not None
        return Defaults(steps_per_person=self.train_config.total_steps(1, warm=warm), create_steps=g.steps, guidance=g.guidance,
                        width=g.width or size, height=g.height or size, num_images=g.num_images, seed=g.seed)

    # -- library: the folder's (``Library``) -------------------------------------------------
    def identities(self) -> list[dict]:
        return self.library.identities()

    def rename(self, old: str, new: str) -> str:
        return self.library.rename(old, new)

    def delete(self, name: str) -> None:
        self.library.delete(name)

    def export(self, name: str, fmt: str) -> Path:
        return self.library.export(name, fmt)

    # -- learn -------------------------------------------------------------------------------
    def detect(self, photos) -> Detection:
        """Each photo with every face boxed (the one used in green), its training crop, and notes.

        With several photos of one person, a photo whose face is far from the others' is named in a warning.
        """
        photos = _paths(photos)
        if not photos:
            raise InputError("Upload a photo first.")
        out, vectors = Detection([], [], []), []
        for photo in photos:
            name = Path(photo).name
            about = f"{name}: " if len(photos) > 1 else ""
            try:
                faces, analysis = self.photos(photo)
            except NoFaceFoundError as e:
                out.notes.append(f"{about}{e}" if len(photos) > 1 else str(e))
                continue
            out.boxed.append((_boxed(analysis.image, faces), f"{name}: {len(faces)} face(s)"))
            out.crops.append((analysis.crop(256), name))
            out.notes.append(f"{about}Found one face." if len(faces) == 1 else f"{about}Found {len(faces)} faces; using the largest (green).")
            if analysis.face.width < MIN_FACE_PX:
                out.notes.append(f"{about}The face is only {int(analysis.face.width)} px wide; the likeness will be weak. "
                                 f"Use a photo with the face at least {MIN_FACE_PX} px wide.")
            vectors.append((name, analysis.embedding))
        if not out.boxed:
            raise NoFaceFoundError(" ".join(out.notes))
        out.notes += _unlike(vectors, self.analyzer.encoder)
        return out

    def learn(self, photos, names, steps_per_person: int, cancel: threading.Event, report=None,
              show=None) -> list[Identity]:
        """Personalize one person, or several jointly; ``report(step, total, loss)`` as it trains.

        Args:
            photos: a photo path, or one entry per person: a path, or a list of paths of that person.
            names: a name, a comma-separated string of names, or a list, in person order.
            steps_per_person: training steps per person (``TrainConfig.steps`` is the total); 0: the instant
                identities of the model's pretrained network.
            cancel: set it to stop training; nothing is written then.
            show: ``show(step, images)`` with a quick drawing of each person as learned so far: before the first
                step (from a pretrained network: the instant person, in about a second) and every quarter.
        """
        people = [[photos]] if isinstance(photos, (str, Path)) else [_paths(p) for p in photos if p]
        people = [p for p in people if p]
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        names = check_people(names, len(people))
        config = updated(self.train_config, steps=int(steps_per_person) * len(names))
        for n in names:
            self.library.new_path(n, fix="Pick another name or delete it in the Library.")
        analyses = [[self.photos(p)[1] for p in person] for person in people]

        def callback(step, total, loss):
            if cancel.is_set():
                raise Cancelled()
            if report is not None:
                report(step, total, loss)

        def sketch(step, identities):
            if cancel.is_set():
                raise Cancelled()
            if show is not None:
                show(step, preview(self.pipe, identities))

        with self.lock:
            if cancel.is_set():  # pressed while another run held the model
                raise Cancelled()
            result = personalize(self.pipe, analyses, names, config=config, face_analyzer=self.analyzer,
                                 show_progress=False, callback=callback, preview=sketch if show is not None else None)
            for ident, path in zip(result.identities, result.save(self.dir)):  # personalize loaded them already
                self._in_pipe[ident.token] = (path, _file_key(path), True)
        for a, n in zip(analyses, names):
            a[0].crop(128).save(self.library.path(n).with_suffix(".thumb.png"))
        return result.identities

    # -- create ------------------------------------------------------------------------------
    def _load_library(self, pipe) -> set[str]:
        """Load into the pipeline the identities it lacks or whose file changed; returns the library's tokens."""
        tokens = set()
        for path, key, ident in self.library.scan():
            loaded = self._in_pipe.get(ident.token)
            if loaded is None or loaded[:2] != (path, key):
                ok = True
                try:
                    load_identity(pipe, ident)
                except CelebBasisError as e:  # another model family: reported once, not on every click
                    logger.warning("Not loading %s: %s", path.name, e)
                    ok = False
                loaded = self._in_pipe[ident.token] = (path, key, ok)
            if loaded[2]:
                tokens.add(ident.token)
        return tokens

    def create(self, prompt: str, **settings) -> tuple[list[tuple[str, str]], Path]:
        """Draw ``prompt`` with the library's people; returns (path, caption) pairs and the folder.

        Args:
            settings: ``GenerateConfig`` fields over the app's ``generate_config`` (``steps=20, seed=3, ...``).
        """
        config = updated(self.generate_config, **settings)
        with self.lock:
            pipe = self.pipe
            known = self._load_library(pipe)
            unknown = sorted(set(PLACEHOLDER_RE.findall(prompt or "")) - known)
            if unknown:
                raise InputError(f"{', '.join(unknown)}: not in the library, or made for another model (usable here: "
                                 f"{', '.join(sorted(known)) or 'nobody yet'}). Learn the person in Learn, or click a person above.")
            results = generate(pipe, prompt, config=config, show_progress=False)
        folder = self.outputs / _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        paths = save_images(results, folder, grid=False)
        return [(str(p), f"{r.prompt} · seed {r.seed}") for p, r in zip(paths, results)], folder

    def zip_folder(self, folder: Path) -> Path:
        out = folder.with_suffix(".zip")
        with zipfile.ZipFile(out, "w") as z:
            for p in sorted(folder.glob("*.png")):
                z.write(p, p.name)
        return out

    # -- mix ---------------------------------------------------------------------------------
    def mix(self, a: str, b: str, celebrity: str, weight: float, name: str, **settings) -> tuple[str, str]:
        """Mix identity ``a`` with identity ``b`` or a celebrity; save it and draw one preview image.

        Args:
            settings: ``GenerateConfig`` fields for the preview (``seed=3, steps=20, ...``).
        """
        name = check_name(name)
        self.library.new_path(name)
        if not a:
            raise InputError("Pick the first identity.")
        first = self.library.get(a)
        other = celebrity.strip() if celebrity and celebrity.strip() else (self.library.get(b) if b else None)
        if other is None:
            raise InputError("Pick a second identity or type a celebrity name.")
        with self.lock:
            pipe = self.pipe
            mixed = mix([(first, 1.0 - float(weight)), (other, float(weight))], name, pipeline_bases(pipe), pipe)
        mixed.save(self.library.path(name))
        pairs, _ = self.create(f"a photo of {mixed.token} person", **{**settings, "num_images": 1})
        return pairs[0][0], mixed.token


def _paths(files) -> list[str]:
    """Upload values (a path, a list of paths, Gradio file objects, or nothing) -> list of paths."""
    if not files:
        return []
    if isinstance(files, (str, Path)):
        return [str(files)]
    return [str(getattr(f, "name", f)) for f in files if f]


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _boxed(image: Image.Image, faces) -> Image.Image:
    """The photo with every face boxed: the one used (the largest) in green, the others in orange."""
    shown = image.copy()
    draw = ImageDraw.Draw(shown)
    width = max(3, max(image.size) // 150)
    for i, f in enumerate(faces):
        draw.rectangle(f.box, outline=(0, 220, 0) if i == 0 else (220, 160, 0), width=width)
    return shown


def _unlike(vectors: list[tuple[str, np.ndarray]], encoder) -> list[str]:
    """Warnings about photos whose face does not look like the others' (``face.unlike_photos``)."""
    odd = unlike_photos([v for _, v in vectors], encoder)
    if not odd:
        return []
    rule = f"the same person is usually {same_person_threshold(encoder):.2f} or more"
    if len(vectors) == 2:  # which one is the odd one out cannot be told
        return [f"⚠ {vectors[0][0]} and {vectors[1][0]} do not look like the same person (face similarity "
                f"{odd[0][1]:.2f}; {rule}). Use photos of one person only."]
    return [f"⚠ {vectors[i][0]} does not look like the other photos (face similarity {sim:.2f}; {rule}). "
            "If it shows someone else, remove it." for i, sim in odd]


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError("The web UI needs Gradio: pip install 'celebbasis[webui]'") from None
    return gr


_WAITING = object()  # no training update within the poll interval


def _next(updates: queue.Queue, poll_s: float = 0.25):
    """The next training update, or ``_WAITING`` when none came within ``poll_s``."""
    try:
        return updates.get(timeout=poll_s)
    except queue.Empty:
        return _WAITING


class Handlers:
    """What the page's buttons do, as plain methods of the fields' values; ``build_ui`` wires them up.

    Each browser session (tab) cancels only its own training: ``learn`` registers its run under
    the session's id and ``cancel`` stops the run of the session that pressed it.
    """

    def __init__(self, app: WebApp):
        self.app = app
        self.gr = _gradio()
        self._runs: dict[str, threading.Event] = {}  # session id -> its running training's stop flag
        self._runs_lock = threading.Lock()

    # -- library -----------------------------------------------------------------------------
    def refresh(self, selected=None):
        """Gallery, table, and every person picker, from one scan of the folder."""
        gr, rows = self.gr, self.app.identities()
        names = [r["name"] for r in rows]
        keep = selected if selected in names else None  # the library selection survives a refresh
        return ([(r["thumb"], r["token"]) for r in rows if r["thumb"]],
                [[r["name"], r["token"], r["model"], r["created"]] for r in rows],
                gr.update(choices=names, value=keep), gr.update(choices=[r["token"] for r in rows], value=None),
                gr.update(choices=names), gr.update(choices=names))

    def rename(self, old, new) -> str:
        try:
            return f"Renamed to `{self.app.rename(old, new)}`."
        except CelebBasisError as e:
            return f"**{_md(e)}**"

    def delete(self, who, confirmed) -> str:
        if not confirmed:
            return "Tick the confirmation box first."
        try:
            self.app.delete(who)
        except CelebBasisError as e:
            return f"**{_md(e)}**"
        return f"Deleted {_md(who)}."

    def download(self, who, fmt):
        if not who:
            return None, "Pick an identity."
        try:
            return str(self.app.export(who, fmt)), ""
        except CelebBasisError as e:
            return None, f"**{_md(e)}**"

    # -- learn -------------------------------------------------------------------------------
    def detect(self, photos):
        if not _paths(photos):
            return None, None, ""
        try:
            found = self.app.detect(photos)
        except CelebBasisError as e:
            return None, None, f"**{_md(e)}**"
        return found.boxed, found.crops, "  \n".join(_md(n) for n in found.notes)

    def learn(self, photos, more, who, steps, session: str, progress=None):
        """Train in a thread and yield (status, loss table) as it goes; Cancel in this session stops it."""
        import pandas as pd

        gr, empty = self.gr, pd.DataFrame({"step": [], "loss": []})
        if not _paths(photos):
            yield "**Upload a photo first.**", gr.skip(), gr.skip()
            return
        stop, updates, box = threading.Event(), queue.Queue(), {}
        with self._runs_lock:
            self._runs[session] = stop

        def work():
            try:
                people = [_paths(photos)] + [[p] for p in _paths(more)]
                box["identities"] = self.app.learn(people, who, steps, stop, lambda s, t, lo: updates.put((s, t, lo)),
                                                   lambda s, images: updates.put(("preview", s, images)))
            except Exception as e:  # reported below
                box["error"] = e
            finally:
                updates.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        losses, t0 = [], time.time()
        try:
            yield "Preparing (faces, basis, model) …", empty, None
            announced = False
            while (item := _next(updates)) is not None:
                if stop.is_set() and not announced:  # this stream alone writes the status, so no reply can overtake it
                    announced = True
                    yield "Cancelling …", gr.skip(), gr.skip()
                if item is _WAITING:
                    continue
                if item[0] == "preview":  # the people as learned so far: instantly, then every quarter
                    _, step, images = item
                    what = "instantly, from the pretrained network" if step == 0 else f"after {step} steps"
                    yield gr.skip(), gr.skip(), [(im, what) for im in images]
                    continue
                step, total, loss = item
                losses.append(loss)
                if progress is not None:
                    progress(step / total, desc=f"step {step}/{total}")
                if step % max(1, total // 50) == 0 or step == total:
                    eta = (time.time() - t0) / step * (total - step)
                    yield (f"Learning: step {step}/{total}, loss {loss:.4f}, about {eta:.0f} s left",
                           pd.DataFrame({"step": list(range(1, len(losses) + 1)), "loss": losses}), gr.skip())
        finally:
            if thread.is_alive() and "identities" not in box:
                stop.set()  # Cancel was pressed or the page went away: stop training
            with self._runs_lock:
                if self._runs.get(session) is stop:
                    del self._runs[session]
        thread.join()
        err = box.get("error")
        if isinstance(err, Cancelled):
            yield "Cancelled; nothing was saved.", empty, gr.skip()
        elif err is not None:
            yield (f"**{_md(err)}**" if isinstance(err, CelebBasisError) else f"**Failed: {type(err).__name__}: {_md(err)}**"), gr.skip(), gr.skip()
        else:
            tokens = [i.token for i in box["identities"]]
            yield f"Learned {', '.join(f'`{t}`' for t in tokens)}. Use it in **Create**: `{tokens[0]} person …`", gr.skip(), gr.skip()

    def cancel(self, session: str):
        """Stop this session's training. Its own ``learn`` stream then reports "Cancelling …" and the end."""
        with self._runs_lock:
            stop = self._runs.get(session)
        if stop is None:
            return "Nothing is learning in this tab."
        stop.set()
        return self.gr.skip()

    # -- create ------------------------------------------------------------------------------
    def chip(self, text, token):
        if not token:
            return self.gr.skip(), self.gr.skip()
        sep = "" if not text or text.endswith(" ") else " "
        return f"{text or ''}{sep}{token} person", None

    def preset(self, sample) -> str:
        text = sample[0]
        for i, row in enumerate(self.app.identities()[:2]):
            text = text.replace(f"<id{i + 1}>", row["token"])
        return text

    def generate(self, prompt, negative, steps, guidance, seed, width, height, n):
        try:
            pairs, folder = self.app.create(prompt, negative_prompt=negative or None, steps=int(steps), guidance=float(guidance),
                                            seed=int(seed), width=int(width), height=int(height), num_images=int(n))
        except CelebBasisError as e:
            return self.gr.skip(), self.gr.skip(), f"**{_md(e)}**"
        return pairs, str(folder), f"{len(pairs)} image(s) in {_md(folder)}"

    @staticmethod
    def seed_of(caption: str):
        return int(caption.rsplit("seed", 1)[1]) if caption and "seed" in caption else None

    def zip(self, folder):
        return str(self.app.zip_folder(Path(folder))) if folder else None

    # -- mix ---------------------------------------------------------------------------------
    def mix(self, a, b, celebrity, weight, name, steps, guidance, seed, width, height):
        """Mix and draw the preview with the Create tab's sampling settings."""
        try:
            path, token = self.app.mix(a, b, celebrity, weight, name, steps=int(steps), guidance=float(guidance),
                                       seed=int(seed), width=int(width), height=int(height))
        except CelebBasisError as e:
            return None, f"**{_md(e)}**"
        return path, f"Saved `{token}`."


# -- layout: one builder per tab, returning its components -----------------------------------------

def header(app: WebApp) -> str:
    return f"# celebbasis\nPut anyone into Stable Diffusion from a few face photos. Model: `{app.model_label}`"


def _learn_tab(gr, d: Defaults) -> SimpleNamespace:
    with gr.Tab("Learn", id="learn"):
        with gr.Row():
            photo = gr.File(label="Photos of the person (one or more)", file_count="multiple", file_types=["image"],
                            height=260, elem_id="learn-photo")
            boxed = gr.Gallery(label="Faces found (the one used in green)", columns=2, height=260, interactive=False,
                               elem_id="learn-boxes")
            crop = gr.Gallery(label="Training crops", columns=2, height=260, interactive=False, elem_id="learn-crop")
        detect_msg = gr.Markdown(elem_id="learn-detect-msg")
        more = gr.File(label="More people, learned together with the first: one photo each (optional)",
                       file_count="multiple", file_types=["image"], height=120, elem_id="learn-more")
        with gr.Row():
            name = gr.Textbox(label="Name (the prompt word becomes <name>); for several people: names in order, "
                              "separated by commas", elem_id="learn-name")
            steps = gr.Slider(0, max(MAX_STEPS_PER_PERSON, d.steps_per_person), value=d.steps_per_person, step=1,
                              label="Steps per person (0: instantly, where the model has a pretrained network)",
                              elem_id="learn-steps")
        with gr.Row():
            button = gr.Button("Learn", variant="primary", elem_id="learn-button")
            cancel = gr.Button("Cancel", elem_id="learn-cancel")
        status = gr.Markdown(elem_id="learn-status")
        with gr.Row():
            sketch = gr.Gallery(label="The person as learned so far (instantly, then every quarter of the steps)",
                                columns=4, height=220, interactive=False, elem_id="learn-preview")
            plot = gr.LinePlot(x="step", y="loss", label="Loss", elem_id="learn-plot")
    return SimpleNamespace(photo=photo, boxed=boxed, crop=crop, detect_msg=detect_msg, more=more, name=name, steps=steps,
                           button=button, cancel=cancel, status=status, plot=plot, sketch=sketch)


def _library_tab(gr) -> SimpleNamespace:
    with gr.Tab("Library", id="library"):
        thumbs = gr.Gallery(label="People", columns=6, height="auto", elem_id="library-gallery")
        table = gr.Dataframe(headers=["name", "token", "model", "created"], interactive=False, elem_id="library-table")
        with gr.Row():
            name = gr.Dropdown(label="Identity", choices=[], elem_id="library-name")
            new_name = gr.Textbox(label="New name", elem_id="library-new-name")
            rename = gr.Button("Rename", elem_id="library-rename")
        with gr.Row():
            confirm = gr.Checkbox(label="Yes, delete it", elem_id="library-confirm")
            delete = gr.Button("Delete", variant="stop", elem_id="library-delete")
        with gr.Row():
            fmt = gr.Dropdown(["celebbasis", *EXPORT_FORMATS], value="celebbasis", label="Format",  # the file itself, or a tool's
                              elem_id="library-format")
            download = gr.Button("Download", elem_id="library-download")
            file = gr.File(label="File", elem_id="library-file")
        msg = gr.Markdown(elem_id="library-msg")
    return SimpleNamespace(thumbs=thumbs, table=table, name=name, new_name=new_name, rename=rename, confirm=confirm,
                           delete=delete, fmt=fmt, download=download, file=file, msg=msg)


def _create_tab(gr, d: Defaults) -> SimpleNamespace:
    with gr.Tab("Create", id="create"):
        chips = gr.Radio(choices=[], label="Click a person to insert them", elem_id="create-chips")
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="create-prompt")
        negative = gr.Textbox(label="Negative prompt", elem_id="create-negative")
        with gr.Row():
            steps = gr.Slider(1, max(150, d.create_steps), value=d.create_steps, step=1, label="Steps", elem_id="create-steps")
            guidance = gr.Slider(0, max(20, d.guidance), value=d.guidance, step=0.5, label="Guidance", elem_id="create-guidance")
            seed = gr.Number(value=d.seed, precision=0, label="Seed", elem_id="create-seed")
        with gr.Row():
            width = gr.Slider(64, max(1536, d.width), value=d.width, step=8, label="Width", elem_id="create-width")
            height = gr.Slider(64, max(1536, d.height), value=d.height, step=8, label="Height", elem_id="create-height")
            n = gr.Slider(1, max(8, d.num_images), value=d.num_images, step=1, label="Images", elem_id="create-n")
        presets = gr.Dataset(components=[gr.Textbox(visible=False)], samples=[[p] for p in example_prompts()],
                             label="Example prompts (<id1>/<id2>: the first people in the library)")
        button = gr.Button("Generate", variant="primary", elem_id="create-button")
        gallery = gr.Gallery(label="Results", columns=4, height="auto", elem_id="create-gallery")
        with gr.Row():
            use_seed = gr.Button("Use this seed", elem_id="create-use-seed")
            zip_button = gr.Button("Download all", elem_id="create-zip")
            zipped = gr.File(label="All images", elem_id="create-zip-file")
        msg = gr.Markdown(elem_id="create-msg")
    return SimpleNamespace(chips=chips, prompt=prompt, negative=negative, steps=steps, guidance=guidance, seed=seed,
                           width=width, height=height, n=n, presets=presets, button=button, gallery=gallery,
                           use_seed=use_seed, zip_button=zip_button, zipped=zipped, msg=msg,
                           last_folder=gr.State(None), picked_seed=gr.State(None))


def _mix_tab(gr) -> SimpleNamespace:
    with gr.Tab("Mix", id="mix"):
        with gr.Row():
            a = gr.Dropdown(label="Person", choices=[], elem_id="mix-a")
            b = gr.Dropdown(label="Mixed with person", choices=[], elem_id="mix-b")
            celebrity = gr.Textbox(label="…or a celebrity", placeholder="Anne Hathaway", elem_id="mix-celebrity")
        weight = gr.Slider(0, 1, value=0.5, step=0.05, label="Share of the second", elem_id="mix-weight")
        name = gr.Textbox(label="Name of the mix", elem_id="mix-name")
        button = gr.Button("Mix and preview", variant="primary", elem_id="mix-button")
        preview = gr.Image(label="Preview", interactive=False, elem_id="mix-preview")
        msg = gr.Markdown(elem_id="mix-msg")
    return SimpleNamespace(a=a, b=b, celebrity=celebrity, weight=weight, name=name, button=button, preview=preview, msg=msg)


# -- wiring: events of each tab --------------------------------------------------------------------

def _wire_learn(gr, h: Handlers, learn: SimpleNamespace, after) -> None:
    learn.photo.change(h.detect, learn.photo, [learn.boxed, learn.crop, learn.detect_msg])

    def on_learn(photos, more, who, steps, request: gr.Request, progress=gr.Progress()):
        yield from h.learn(photos, more, who, steps, request.session_hash, progress)

    def on_cancel(request: gr.Request):
        return h.cancel(request.session_hash)

    after(learn.button.click(on_learn, [learn.photo, learn.more, learn.name, learn.steps],
                             [learn.status, learn.plot, learn.sketch]))
    learn.cancel.click(on_cancel, None, learn.status, queue=False)


def _wire_library(h: Handlers, lib: SimpleNamespace, after) -> None:
    after(lib.rename.click(h.rename, [lib.name, lib.new_name], lib.msg))
    after(lib.delete.click(h.delete, [lib.name, lib.confirm], lib.msg))
    lib.download.click(h.download, [lib.name, lib.fmt], [lib.file, lib.msg])


def _wire_create(gr, h: Handlers, c: SimpleNamespace) -> None:
    c.chips.select(h.chip, [c.prompt, c.chips], [c.prompt, c.chips])
    c.presets.click(h.preset, c.presets, c.prompt)
    c.button.click(h.generate, [c.prompt, c.negative, c.steps, c.guidance, c.seed, c.width, c.height, c.n],
                   [c.gallery, c.last_folder, c.msg])

    def on_pick(evt: gr.SelectData):
        return h.seed_of(evt.value.get("caption", "") if isinstance(evt.value, dict) else "")

    c.gallery.select(on_pick, None, c.picked_seed)
    c.use_seed.click(lambda s, cur: cur if s is None else s, [c.picked_seed, c.seed], c.seed)
    c.zip_button.click(h.zip, c.last_folder, c.zipped)


def _wire_mix(h: Handlers, m: SimpleNamespace, c: SimpleNamespace, after) -> None:
    sampling = [c.steps, c.guidance, c.seed, c.width, c.height]  # the preview is drawn as Create would draw it
    after(m.button.click(h.mix, [m.a, m.b, m.celebrity, m.weight, m.name, *sampling], [m.preview, m.msg]))


def build_ui(app: WebApp):
    """The Gradio Blocks app: four tabs wired to ``Handlers(app)``. Loads the model (for its image size)."""
    gr = _gradio()
    h, d = Handlers(app), app.defaults()
    with gr.Blocks(title="celebbasis") as demo:
        gr.Markdown(header(app), elem_id="header")
        learn, lib, create, mix = _learn_tab(gr, d), _library_tab(gr), _create_tab(gr, d), _mix_tab(gr)
        listing = [lib.thumbs, lib.table, lib.name, create.chips, mix.a, mix.b]

        def after(event):  # whatever changed the folder: show it everywhere, keeping the library's selection
            event.then(h.refresh, lib.name, listing)

        demo.load(h.refresh, None, listing)
        _wire_learn(gr, h, learn, after)
        _wire_library(h, lib, after)
        _wire_create(gr, h, create)
        _wire_mix(h, mix, create, after)
    demo.queue(default_concurrency_limit=1)
    return demo


def check_address(host: str = WEBUI_HOST, port: int = WEBUI_PORT) -> None:
    """Refuse, before the model loads, a port that is not one or that another program holds."""
    import socket

    if not 1 <= port <= 65535:
        raise InputError(f"port {port} is not a port number. Pass port=N with N in 1-65535 (default {WEBUI_PORT}).", field="port")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as e:
        raise InputError(f"Cannot listen on {host}:{port} ({e.strerror or e}): another program (an earlier webui?) "
                         f"may be using it. Pass port=N for a free one, or stop the other one.", field="port") from None


def launch(app: WebApp, host: str = WEBUI_HOST, port: int = WEBUI_PORT, share: bool = False, block: bool = True):
    """Start the server and print its address; share links only when asked, with a warning.

    Returns the running Gradio app (``.close()`` stops it) once it stops, or at once with ``block=False``.

    Raises:
        InputError: ``port`` is no port number or another program holds it (``check_address``), before the model loads.
    """
    check_address(host, port)
    demo = build_ui(app)  # loads the model: a bad --model fails here, before any folder is made
    app.dir.mkdir(parents=True, exist_ok=True)
    if share:
        logger.warning("--share makes this app reachable by anyone with the link, including your GPU and photos.")
    # quiet: Gradio's own lines talk about launch(share=True); ours name the command-line flag
    demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD, allowed_paths=[str(app.dir)],
                prevent_thread_lock=True, show_error=True, quiet=True)
    print(f"Running on http://{host}:{demo.server_port}" + ("" if share else " (pass --share for a public link)"), flush=True)
    if block:  # our own wait: Ctrl-C and SIGTERM reach the command's handler without Gradio's notice
        try:
            while True:
                time.sleep(0.5)
        finally:
            demo.close()
    return demo
