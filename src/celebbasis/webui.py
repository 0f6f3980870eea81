"""``celebbasis webui``: a local Gradio app over the public API — Learn, Library, Create, Mix.

One job runs on the model at a time (Gradio's queue, concurrency 1); others wait with their
position shown. The app binds 127.0.0.1 unless told otherwise, caps uploads, sanitises names and
serves only its own folders. Everything it does is also a Python call (see ``WebApp``).
"""

from __future__ import annotations

import datetime as _dt
import logging
import queue
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import CelebBasisError, InputError
from .identity import Identity, check_name

logger = logging.getLogger(__name__)

MAX_UPLOAD = "20mb"
MAX_UPLOAD_PIXELS = 40_000_000


def _md(text) -> str:
    """User-facing text inside Markdown: ``<alice>`` must not turn into an HTML tag."""
    import html

    return html.escape(str(text))


class Cancelled(Exception):
    """Raised inside training when the user pressed Cancel."""


class WebApp:
    """The state behind the web UI: one pipeline, one face analyzer, the identities folder.

    Args:
        load: a function returning the diffusers pipeline (called once, on first use).
        identities_dir: where identities live (``NAME.safetensors`` + ``NAME.thumb.png``).
        default_steps: training steps offered by default.
        model_label: what the page says the model is.
        default_size: image size offered by default (the model's native size).
    """

    def __init__(self, load, identities_dir, default_steps: int = 400, model_label: str = "", default_size: int = 512):
        self._load = load
        self._pipe = None
        self._analyzer = None
        self.lock = threading.Lock()
        self.dir = Path(identities_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.outputs = self.dir / "outputs"
        self.outputs.mkdir(exist_ok=True)
        self.exports = self.dir / "exports"
        self.exports.mkdir(exist_ok=True)
        self.default_steps = default_steps
        self.model_label = model_label
        self.default_size = default_size

    # -- resources ---------------------------------------------------------------------------
    @property
    def pipe(self):
        if self._pipe is None:
            self._pipe = self._load()
        return self._pipe

    @property
    def analyzer(self):
        if self._analyzer is None:
            from .face import FaceAnalyzer

            self._analyzer = FaceAnalyzer()
        return self._analyzer

    # -- library -----------------------------------------------------------------------------
    def identities(self) -> list[dict]:
        rows = []
        for path in sorted(self.dir.glob("*.safetensors")):
            try:
                ident = Identity.load(path)
            except CelebBasisError:
                continue
            thumb = path.with_suffix(".thumb.png")
            rows.append({"name": ident.name, "token": ident.token, "path": str(path),
                         "thumb": str(thumb) if thumb.exists() else None,
                         "model": ident.metadata.get("base_model", ""), "created": ident.metadata.get("created", "")})
        return rows

    def _path(self, name: str) -> Path:
        return self.dir / f"{check_name(name)}.safetensors"

    def rename(self, old: str, new: str) -> str:
        src, dst = self._path(old), self._path(new)
        if not src.exists():
            raise InputError(f"No identity named {old!r}.")
        if dst.exists():
            raise InputError(f"An identity named {new!r} already exists. Pick another name.")
        ident = Identity.load(src)
        ident.token = f"<{check_name(new)}>"
        ident.save(dst)
        for suffix in (".thumb.png", ".run.json"):
            if src.with_suffix(suffix).exists():
                src.with_suffix(suffix).rename(dst.with_suffix(suffix))
        src.unlink()
        return ident.token

    def delete(self, name: str) -> None:
        path = self._path(name)
        if not path.exists():
            raise InputError(f"No identity named {name!r}.")
        for p in (path, path.with_suffix(".thumb.png"), path.with_suffix(".run.json")):
            p.unlink(missing_ok=True)

    def export(self, name: str, fmt: str) -> Path:
        from .export import export_identity

        path = self._path(name)
        if fmt == "celebbasis":
            return path
        folder = self.exports / fmt
        folder.mkdir(exist_ok=True)
        return export_identity(path, fmt, folder / f"{check_name(name)}.safetensors", overwrite=True)

    # -- learn -------------------------------------------------------------------------------
    def detect(self, photo) -> tuple[Image.Image, Image.Image, str]:
        """The photo with every face boxed (the one used in green) and the aligned training crop."""
        from .face import load_image

        if not photo:
            raise InputError("Upload a photo first.")
        with Image.open(photo) as im:
            if im.width * im.height > MAX_UPLOAD_PIXELS:
                raise InputError(f"The photo is {im.width}x{im.height}; the web UI takes up to {MAX_UPLOAD_PIXELS // 1_000_000} MP.")
        image = load_image(photo)
        faces = self.analyzer.detector.detect(np.asarray(image))
        if not faces:
            raise InputError("No face found. Use a photo where the face is frontal, well lit and at least 64 px wide.")
        shown = image.copy()
        draw = ImageDraw.Draw(shown)
        width = max(2, image.width // 200)
        for i, f in enumerate(faces):
            draw.rectangle(f.box, outline=(0, 220, 0) if i == 0 else (220, 160, 0), width=width)
        from .face import crop_face

        crop = crop_face(image, faces[0], 256)
        msg = f"Found {len(faces)} face(s); using the largest (green)." if len(faces) > 1 else "Found one face."
        return shown, crop, msg

    def learn(self, photos, names, steps: int, cancel: threading.Event, report=None) -> list[Identity]:
        """Personalize one photo, or several people jointly; ``report(step, total, loss)`` as it trains.

        Args:
            photos: a photo path, or one path per person.
            names: a name, a comma-separated string of names, or a list, in photo order.

        Nothing is written unless training finishes; ``cancel`` stops it.
        """
        from .train import TrainConfig, personalize

        photos = [photos] if isinstance(photos, (str, Path)) else [p for p in photos if p]
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        names = [check_name(n) for n in names]
        if len(names) != len(photos):
            raise InputError(f"{len(photos)} photo(s) but {len(names)} name(s). Give one name per photo, separated by commas.")
        for n in names:
            if self._path(n).exists():
                raise InputError(f"An identity named {n!r} already exists. Pick another name or delete it in the Library.")
        analyses = [self.analyzer(p) for p in photos]

        def callback(step, total, loss):
            if cancel.is_set():
                raise Cancelled()
            if report is not None:
                report(step, total, loss)

        with self.lock:
            pipe = self.pipe
            resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
            cfg = TrainConfig(steps=int(steps) * len(names), resolution=resolution)
            result = personalize(pipe, analyses, names, config=cfg, show_progress=False, callback=callback)
        result.save(self.dir)
        for a, n in zip(analyses, names):
            a.crop(128).save(self._path(n).with_suffix(".thumb.png"))
        return result.identities

    # -- create ------------------------------------------------------------------------------
    def create(self, prompt: str, negative: str, steps: int, guidance: float, seed: int, width: int, height: int,
               n: int) -> tuple[list[tuple[str, str]], Path]:
        """Generate with every identity in the library loaded; returns (path, caption) pairs and the folder."""
        from .generate import generate, save_images

        identities = [Identity.load(r["path"]) for r in self.identities()]
        with self.lock:
            pipe = self.pipe
            results = generate(pipe, prompt, identities=identities, negative_prompt=negative or None,
                               num_images=int(n), steps=int(steps), guidance=float(guidance), seed=int(seed),
                               width=int(width), height=int(height), show_progress=False)
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
    def mix(self, a: str, b: str, celebrity: str, weight: float, name: str, seed: int) -> tuple[str, str]:
        """Mix identity ``a`` with identity ``b`` or a celebrity; save it and draw a preview."""
        from .basis import cached_basis
        from .insert import text_encoders
        from .mix import mix

        name = check_name(name)
        if self._path(name).exists():
            raise InputError(f"An identity named {name!r} already exists. Pick another name.")
        if not a:
            raise InputError("Pick the first identity.")
        first = Identity.load(self._path(a))
        other = celebrity.strip() if celebrity and celebrity.strip() else (Identity.load(self._path(b)) if b else None)
        if other is None:
            raise InputError("Pick a second identity or type a celebrity name.")
        with self.lock:
            pipe = self.pipe
            bases = [cached_basis(tok, te) for tok, te in text_encoders(pipe)]
            mixed = mix([(first, 1.0 - float(weight)), (other, float(weight))], name, bases, pipe)
        mixed.save(self._path(name))
        pairs, _ = self.create(f"a photo of {mixed.token} person", "", 20, 7.5, seed,
                               *(2 * [pipe.unet.config.sample_size * pipe.vae_scale_factor]), 1)
        return pairs[0][0], mixed.token


def build_ui(app: WebApp):
    """The Gradio Blocks app."""
    try:
        import gradio as gr
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError("The web UI needs Gradio: pip install 'celebbasis[webui]'") from None
    import pandas as pd

    from .resources import example_prompts

    def names():
        return [r["name"] for r in app.identities()]

    def library_rows():
        return [[r["name"], r["token"], r["model"], r["created"]] for r in app.identities()]

    def library_gallery():
        return [(r["thumb"], r["token"]) for r in app.identities() if r["thumb"]]

    def fail(e: Exception):
        raise gr.Error(str(e))

    with gr.Blocks(title="celebbasis") as demo:
        gr.Markdown(f"# celebbasis\nPut anyone into Stable Diffusion from one face photo. Model: `{app.model_label}`")
        with gr.Tab("Learn", id="learn"):
            with gr.Row():
                photo = gr.Image(type="filepath", label="Face photo", elem_id="learn-photo", sources=["upload"])
                boxed = gr.Image(label="Detected faces", interactive=False, elem_id="learn-boxes")
                crop = gr.Image(label="Training crop", interactive=False, elem_id="learn-crop")
            detect_msg = gr.Markdown(elem_id="learn-detect-msg")
            more = gr.File(label="More people, learned together with the first (optional)", file_count="multiple",
                           file_types=["image"], elem_id="learn-more")
            with gr.Row():
                name = gr.Textbox(label="Name (the prompt word becomes <name>); for several people: names in order, "
                                  "separated by commas", elem_id="learn-name")
                steps = gr.Slider(1, 1600, value=app.default_steps, step=1, label="Steps per person", elem_id="learn-steps")
            with gr.Row():
                learn_btn = gr.Button("Learn", variant="primary", elem_id="learn-button")
                cancel_btn = gr.Button("Cancel", elem_id="learn-cancel")
            status = gr.Markdown(elem_id="learn-status")
            plot = gr.LinePlot(x="step", y="loss", label="Loss", elem_id="learn-plot")

        with gr.Tab("Library", id="library"):
            thumbs = gr.Gallery(label="People", columns=6, height="auto", elem_id="library-gallery")
            table = gr.Dataframe(headers=["name", "token", "model", "created"], interactive=False, elem_id="library-table")
            with gr.Row():
                lib_name = gr.Dropdown(label="Identity", choices=[], elem_id="library-name")
                new_name = gr.Textbox(label="New name", elem_id="library-new-name")
                rename_btn = gr.Button("Rename")
            with gr.Row():
                confirm = gr.Checkbox(label="Yes, delete it", elem_id="library-confirm")
                delete_btn = gr.Button("Delete", variant="stop", elem_id="library-delete")
            with gr.Row():
                fmt = gr.Dropdown(["celebbasis", "diffusers", "a1111", "comfyui"], value="celebbasis", label="Format")
                download_btn = gr.Button("Download", elem_id="library-download")
                download = gr.File(label="File", elem_id="library-file")
            lib_msg = gr.Markdown(elem_id="library-msg")

        with gr.Tab("Create", id="create"):
            chips = gr.Radio(choices=[], label="Click a person to insert them", elem_id="create-chips")
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="create-prompt")
            negative = gr.Textbox(label="Negative prompt", elem_id="create-negative")
            with gr.Row():
                c_steps = gr.Slider(1, 150, value=50 if app.default_size >= 256 else 10, step=1, label="Steps", elem_id="create-steps")
                guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance")
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="create-seed")
            with gr.Row():
                width = gr.Slider(64, 1536, value=app.default_size, step=8, label="Width", elem_id="create-width")
                height = gr.Slider(64, 1536, value=app.default_size, step=8, label="Height", elem_id="create-height")
                n = gr.Slider(1, 8, value=2, step=1, label="Images", elem_id="create-n")
            presets = gr.Dataset(components=[gr.Textbox(visible=False)], samples=[[p] for p in example_prompts()],
                                 label="Example prompts (<id1>/<id2>: pick people above first)")
            gen_btn = gr.Button("Generate", variant="primary", elem_id="create-button")
            gallery = gr.Gallery(label="Results", columns=4, height="auto", elem_id="create-gallery")
            with gr.Row():
                use_seed = gr.Button("Use this seed", elem_id="create-use-seed")
                zip_btn = gr.Button("Download all")
                zipped = gr.File(label="All images")
            create_msg = gr.Markdown(elem_id="create-msg")
            last_folder = gr.State(None)
            picked_seed = gr.State(None)

        with gr.Tab("Mix", id="mix"):
            with gr.Row():
                mix_a = gr.Dropdown(label="Person", choices=[], elem_id="mix-a")
                mix_b = gr.Dropdown(label="Mixed with person", choices=[], elem_id="mix-b")
                mix_celeb = gr.Textbox(label="…or a celebrity", placeholder="Anne Hathaway", elem_id="mix-celebrity")
            mix_w = gr.Slider(0, 1, value=0.5, step=0.05, label="Share of the second", elem_id="mix-weight")
            mix_name = gr.Textbox(label="Name of the mix", elem_id="mix-name")
            mix_btn = gr.Button("Mix and preview", variant="primary", elem_id="mix-button")
            mix_img = gr.Image(label="Preview", interactive=False, elem_id="mix-preview")
            mix_msg = gr.Markdown(elem_id="mix-msg")

        # -- events ----------------------------------------------------------------------------
        def refresh(selected=None):
            ns = names()
            tokens = [f"<{x}>" for x in ns]
            keep = selected if selected in ns else None  # the library selection survives a refresh
            return (library_gallery(), library_rows(), gr.update(choices=ns, value=keep), gr.update(choices=tokens, value=None),
                    gr.update(choices=ns), gr.update(choices=ns))

        refresh_outputs = [thumbs, table, lib_name, chips, mix_a, mix_b]
        demo.load(refresh, None, refresh_outputs)

        def on_detect(path):
            if not path:
                return None, None, ""
            try:
                shown, c, msg = app.detect(path)
            except CelebBasisError as e:
                return None, None, f"**{_md(e)}**"
            return shown, c, msg

        photo.change(on_detect, photo, [boxed, crop, detect_msg])

        cancel_event = threading.Event()

        def on_learn(path, extra, who, n_steps, progress=gr.Progress()):
            cancel_event.clear()
            updates: queue.Queue = queue.Queue()
            box: dict = {}

            def work():
                try:
                    photos = [path] + [getattr(f, "name", f) for f in (extra or [])]
                    box["identity"] = app.learn(photos, who, n_steps, cancel_event, lambda s, t, lo: updates.put((s, t, lo)))
                except Exception as e:  # reported below
                    box["error"] = e
                finally:
                    updates.put(None)

            if not path:
                raise gr.Error("Upload a photo first.")
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            losses, t0 = [], time.time()
            yield "Preparing (face, basis, model) …", pd.DataFrame({"step": [], "loss": []})
            try:
                while True:
                    item = updates.get()
                    if item is None:
                        break
                    step, total, loss = item
                    losses.append(loss)
                    progress(step / total, desc=f"step {step}/{total}")
                    if step % max(1, total // 50) == 0 or step == total:
                        eta = (time.time() - t0) / step * (total - step)
                        yield (f"Learning: step {step}/{total}, loss {loss:.4f}, about {eta:.0f} s left",
                               pd.DataFrame({"step": list(range(1, len(losses) + 1)), "loss": losses}))
            finally:
                if thread.is_alive() and "identity" not in box:
                    cancel_event.set()  # Cancel was pressed or the page went away: stop training
            thread.join()
            if isinstance(box.get("error"), Cancelled):
                yield "Cancelled; nothing was saved.", pd.DataFrame({"step": [], "loss": []})
                return
            if "error" in box:
                err = box["error"]
                yield (f"**{_md(err)}**" if isinstance(err, CelebBasisError) else f"**Failed: {type(err).__name__}: {_md(err)}**"), gr.skip()
                return
            tokens = [i.token for i in box["identity"]]
            yield (f"Learned {', '.join(f'`{t}`' for t in tokens)}. Use it in **Create**: `{tokens[0]} person …`",
                   gr.skip())

        learn_event = learn_btn.click(on_learn, [photo, more, name, steps], [status, plot])
        learn_event.then(refresh, lib_name, refresh_outputs)

        def on_cancel():
            cancel_event.set()
            return "Cancelling …"

        cancel_btn.click(on_cancel, None, status, queue=False)

        def on_rename(old, new):
            try:
                token = app.rename(old, new)
            except CelebBasisError as e:
                return f"**{_md(e)}**"
            return f"Renamed to `{token}`."

        rename_btn.click(on_rename, [lib_name, new_name], lib_msg).then(lambda: refresh(None), None, refresh_outputs)

        def on_delete(who, ok):
            if not ok:
                return "Tick the confirmation box first."
            try:
                app.delete(who)
            except CelebBasisError as e:
                return f"**{_md(e)}**"
            return f"Deleted {who}."

        delete_btn.click(on_delete, [lib_name, confirm], lib_msg).then(refresh, lib_name, refresh_outputs)

        def on_download(who, f):
            if not who:
                return None, "Pick an identity."
            try:
                return str(app.export(who, f)), ""
            except CelebBasisError as e:
                return None, f"**{_md(e)}**"

        download_btn.click(on_download, [lib_name, fmt], [download, lib_msg])

        def on_chip(text, token):
            if not token:
                return gr.skip(), gr.skip()
            sep = "" if not text or text.endswith(" ") else " "
            return f"{text or ''}{sep}{token} person", None

        chips.select(on_chip, [prompt, chips], [prompt, chips])

        def on_preset(sample):
            text = sample[0]
            ns = [f"<{x}>" for x in names()]
            for i, tok in enumerate(ns[:2]):
                text = text.replace(f"<id{i + 1}>", tok)
            return text

        presets.click(on_preset, presets, prompt)

        def on_generate(p, neg, st, g, sd, w, h, k):
            try:
                pairs, folder = app.create(p, neg, st, g, sd, w, h, k)
            except CelebBasisError as e:
                return gr.skip(), gr.skip(), f"**{_md(e)}**"
            return pairs, str(folder), f"{len(pairs)} image(s) in {folder}"

        gen_btn.click(on_generate, [prompt, negative, c_steps, guidance, seed, width, height, n], [gallery, last_folder, create_msg])

        def on_pick(evt: gr.SelectData):
            caption = evt.value.get("caption", "") if isinstance(evt.value, dict) else ""
            return int(caption.rsplit("seed", 1)[1]) if "seed" in caption else None

        gallery.select(on_pick, None, picked_seed)
        use_seed.click(lambda s, cur: cur if s is None else s, [picked_seed, seed], seed)
        zip_btn.click(lambda f: str(app.zip_folder(Path(f))) if f else None, last_folder, zipped)

        def on_mix(a, b, celeb, w, who, sd):
            try:
                path, token = app.mix(a, b, celeb, w, who, sd)
            except CelebBasisError as e:
                return None, f"**{_md(e)}**"
            return path, f"Saved `{token}`."

        mix_btn.click(on_mix, [mix_a, mix_b, mix_celeb, mix_w, mix_name, seed], [mix_img, mix_msg]).then(refresh, lib_name, refresh_outputs)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(app: WebApp, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True):
    """Start the server (share links only when asked, with a warning)."""
    demo = build_ui(app)
    if share:
        logger.warning("--share makes this app reachable by anyone with the link, including your GPU and photos.")
    logger.info("celebbasis web UI on http://%s:%d", host, port)
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD,
                       allowed_paths=[str(app.dir)], prevent_thread_lock=not block, show_error=True)

