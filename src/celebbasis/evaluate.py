"""Evaluation as in the paper (§4, METHOD §6): identity similarity, prompt fidelity, detection rate.

- Identity similarity: cosine between the face vector of a reference photo and of each face found
  in a generated image, with an evaluation network that should differ from the training one.
  Images with several people match faces to references by the best total cosine (Hungarian
  assignment, exhaustive for the few faces an image holds). Images without a face are counted in
  the detection rate and left out of the mean.
- Prompt fidelity: CLIP score, ``100 * max(cos(image, text), 0)``, the text being the prompt with
  each identity word replaced by "person".
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, ModelLoadError
from .insert import PLACEHOLDER_RE

logger = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
CATEGORIES = ("style", "single action", "with a celebrity", "two identities")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Celebrities the example and benchmark prompts use that the basis name list lacks.
_PROMPT_CELEBRITIES = ("Barack Obama", "Emma Watson")
_STYLE_WORDS = ("painting", "sketch", "style", "drawing", "watercolor", "watercolour", "anime", "cartoon", "illustration",
                "render", "pixel art", "mosaic", "pop art", "ukiyo-e", "comic", "statue", "sculpture", "oil")


def clip_text(prompt: str) -> str:
    """The prompt CLIP scores against: ``<alice> person`` (or a bare ``<alice>``) becomes ``person``."""
    text = re.sub(r"<[^<>\s]+>(\s+person)?", "person", prompt)
    return re.sub(r"\s+", " ", text).strip()


def categorize(prompt: str, n_identities: int) -> str:
    """One of the paper's four prompt categories, guessed from the prompt."""
    from .resources import celeb_names

    if n_identities >= 2:
        return "two identities"
    low = prompt.lower()
    if any(name.lower() in low for name in (*celeb_names(), *_PROMPT_CELEBRITIES)):
        return "with a celebrity"
    if any(w in low for w in _STYLE_WORDS):
        return "style"
    return "single action"


def benchmark_prompts(names: list[str]) -> list[tuple[str, str]]:
    """The paper's protocol prompts for the given identities: (category, prompt) pairs."""
    if not names:
        raise InputError("Pass at least one identity name for the benchmark prompts.")
    style = ["an oil painting of {} person", "a pencil sketch of {} person", "{} person in the style of Van Gogh",
             "an anime drawing of {} person", "a watercolor painting of {} person"]
    action = ["{} person is playing the guitar", "{} person eats bread in front of the Eiffel Tower",
              "{} person is reading a book in a library", "{} person rides a bicycle in the park",
              "{} person wearing a spacesuit on the moon"]
    celeb = ["{} person and Barack Obama cooking together in a kitchen", "{} person and Anne Hathaway are baking a cake",
             "{} person shakes hands with Taylor Swift", "{} person and Leonardo DiCaprio on a red carpet",
             "{} person and Emma Watson having coffee"]
    two = ["{} person and {} person enjoy a candlelight dinner", "{} person shakes hands with {} person on a stage",
           "{} person and {} person dancing", "{} person and {} person playing chess", "{} person and {} person hiking"]
    out = []
    for n in names:
        tok = f"<{n.strip('<>')}>"
        out += [("style", p.format(tok)) for p in style]
        out += [("single action", p.format(tok)) for p in action]
        out += [("with a celebrity", p.format(tok)) for p in celeb]
    for a, b in itertools.combinations([f"<{n.strip('<>')}>" for n in names], 2):
        out += [("two identities", p.format(a, b)) for p in two]
    return out


def read_prompt_file(path) -> list[tuple[str | None, str]]:
    """Lines ``prompt`` or ``category<TAB>prompt`` -> (category or None, prompt)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such prompts file. Pass a text file with one prompt a line.")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        cat, tab, prompt = line.partition("\t")
        out.append((cat.strip(), prompt.strip()) if tab else (None, line.strip()))
    return out


class ClipScorer:
    """CLIP score of (image, text) with a transformers CLIP model (hub id or local folder)."""

    def __init__(self, model: str = DEFAULT_CLIP):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(model).eval()
            self.processor = CLIPProcessor.from_pretrained(model)
        except OSError as e:
            raise ModelLoadError(
                f"Cannot load the CLIP model {model!r} ({str(e).splitlines()[0][:160]}). Offline? Pass a local folder "
                "with --clip-model PATH, or --no-clip to skip the CLIP score."
            ) from None
        self.torch = torch
        self.name = model

    def __call__(self, image, text: str) -> float:
        torch = self.torch
        inputs = self.processor(text=[text], images=[image], return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
        cos = torch.nn.functional.cosine_similarity(img, txt).item()
        return 100.0 * max(cos, 0.0)


def best_assignment(sim: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (reference, face) maximising the total similarity; ``sim`` is (n_refs, n_faces)."""
    n_ref, n_face = sim.shape
    k = min(n_ref, n_face)
    best, best_pairs = -np.inf, []
    for refs in itertools.permutations(range(n_ref), k):
        for faces in itertools.permutations(range(n_face), k):
            total = sum(sim[r, f] for r, f in zip(refs, faces))
            if total > best:
                best, best_pairs = total, list(zip(refs, faces))
    return best_pairs


@dataclass
class ImageResult:
    path: str
    prompt: str
    category: str
    face_found: bool
    n_faces: int
    id_similarity: float | None
    clip_score: float | None
    matches: dict = field(default_factory=dict)


@dataclass
class Report:
    images: list[ImageResult]
    encoder: str
    clip_model: str | None

    def summary(self) -> dict:
        def mean(xs):
            xs = [x for x in xs if x is not None]
            return round(float(np.mean(xs)), 6) if xs else None

        n = len(self.images)
        out = {
            "n_images": n,
            "face_detection_rate": round(sum(r.face_found for r in self.images) / n, 6) if n else None,
            "id_similarity_mean": mean(r.id_similarity for r in self.images),
            "clip_score_mean": mean(r.clip_score for r in self.images),
            "eval_encoder": self.encoder,
            "clip_model": self.clip_model,
            "categories": {},
        }
        for cat in sorted({r.category for r in self.images}):
            rows = [r for r in self.images if r.category == cat]
            out["categories"][cat] = {
                "n_images": len(rows),
                "face_detection_rate": round(sum(r.face_found for r in rows) / len(rows), 6),
                "id_similarity_mean": mean(r.id_similarity for r in rows),
                "clip_score_mean": mean(r.clip_score for r in rows),
            }
        return out

    def to_json(self) -> dict:
        return {**self.summary(), "images": [asdict(r) for r in self.images]}


def _identities(value: str | None) -> list[str]:
    """The ``identities`` PNG field (a JSON list of tokens); anything else counts as absent."""
    try:
        tokens = json.loads(value) if value else []
    except ValueError:
        return []
    return [t for t in tokens if isinstance(t, str)] if isinstance(tokens, list) else []


def _image_meta(path: Path) -> dict:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return dict(getattr(im, "text", {}) or {})
    except Exception:
        return {}


def evaluate(images: list, references: list[tuple[str | None, str]], *, analyzer=None, clip: ClipScorer | None = None,
             prompts: list[tuple[str | None, str]] | None = None, show_progress: bool = True) -> Report:
    """Score generated images against reference photos.

    Args:
        images: image paths (their PNG text gives prompt, identities and category when present).
        references: ``(token or None, photo path)``; a token ties the reference to ``<token>`` in prompts.
        analyzer: ``FaceAnalyzer`` with the evaluation network (dlib's when ``None``).
        clip: a ``ClipScorer``, or ``None`` to skip prompt fidelity.
        prompts: ``(category, prompt)`` per image, in order, overriding the PNG metadata.

    Returns:
        ``Report`` with one ``ImageResult`` per image.
    """
    from tqdm.auto import tqdm

    from .face import FaceAnalyzer, load_image

    if not images:
        raise InputError("No images to evaluate. Pass a folder with PNG/JPEG images.")
    if not references:
        raise InputError("No reference photo. Pass the person's photo with --reference.")
    if prompts is not None and len(prompts) != len(images):
        raise InputError(f"{len(prompts)} prompts for {len(images)} images. Give one prompt per image, in file-name order.")
    analyzer = analyzer or FaceAnalyzer()
    refs = [(tok, analyzer(path).embedding) for tok, path in references]
    results = []
    for i, path in enumerate(tqdm(images, desc="evaluate", disable=not show_progress, unit="image")):
        path = Path(path)
        meta = _image_meta(path)
        category, prompt = prompts[i] if prompts is not None else (meta.get("category"), meta.get("prompt", ""))
        tokens = _identities(meta.get("identities")) or sorted(set(PLACEHOLDER_RE.findall(prompt)))
        category = category or categorize(prompt, len(tokens))
        image = load_image(path)
        arr = np.asarray(image)
        faces = analyzer.detector.detect(arr)
        embs = [analyzer.encoder.embed(analyzer.encoder.align(arr, f)) for f in faces]
        named = [j for j, (tok, _) in enumerate(refs) if tok and tok in tokens]
        wanted = named or list(range(min(max(1, len(tokens)), len(refs))))
        sim_value, matches = None, {}
        if embs:
            sim = np.array([[float(refs[r][1] @ e) for e in embs] for r in wanted])  # (refs, faces)
            pairs = best_assignment(sim)
            sim_value = float(np.mean([sim[a, b] for a, b in pairs]))
            matches = {(refs[wanted[a]][0] or f"reference{wanted[a]}"): round(float(sim[a, b]), 6) for a, b in pairs}
        score = clip(image, clip_text(prompt)) if clip is not None and prompt else None
        results.append(ImageResult(str(path), prompt, category, bool(embs), len(embs),
                                   None if sim_value is None else round(sim_value, 6),
                                   None if score is None else round(score, 4), matches))
    return Report(results, analyzer.encoder.name, getattr(clip, "name", None))


def write_report(report: Report, out_dir) -> list[Path]:
    """``report.json``, ``report.md``, ``contact_sheet.png`` and ``scatter.png`` in ``out_dir``."""
    from PIL import Image

    from .files import atomic_write
    from .generate import contact_sheet

    out_dir = Path(out_dir)
    data = report.to_json()
    paths = [atomic_write(out_dir / "report.json", lambda t: Path(t).write_text(json.dumps(data, indent=2), encoding="utf-8"))]

    def fmt(x, digits=3):
        return "–" if x is None else f"{x:.{digits}f}"

    lines = ["# celebbasis evaluation", "",
             f"Images: {data['n_images']} · face detection rate: {fmt(data['face_detection_rate'])} · "
             f"ID similarity: {fmt(data['id_similarity_mean'])} · CLIP score: {fmt(data['clip_score_mean'], 2)}",
             f"Evaluation face network: `{report.encoder}` · CLIP: `{report.clip_model or 'not scored'}`", "",
             "## By category", "", "| category | images | detection rate | ID similarity | CLIP score |", "|---|---|---|---|---|"]
    for cat, row in data["categories"].items():
        lines.append(f"| {cat} | {row['n_images']} | {fmt(row['face_detection_rate'])} | {fmt(row['id_similarity_mean'])} | "
                     f"{fmt(row['clip_score_mean'], 2)} |")
    lines += ["", "## By prompt", "", "| prompt | category | images | detection rate | ID similarity | CLIP score |",
              "|---|---|---|---|---|---|"]
    for prompt in dict.fromkeys(r.prompt for r in report.images):
        rows = [r for r in report.images if r.prompt == prompt]
        ids = [r.id_similarity for r in rows if r.id_similarity is not None]
        clips = [r.clip_score for r in rows if r.clip_score is not None]
        lines.append(f"| {prompt.replace('|', '/') or '(none)'} | {rows[0].category} | {len(rows)} | "
                     f"{fmt(sum(r.face_found for r in rows) / len(rows))} | {fmt(float(np.mean(ids)) if ids else None)} | "
                     f"{fmt(float(np.mean(clips)) if clips else None, 2)} |")
    text = "\n".join(lines) + "\n"
    paths.append(atomic_write(out_dir / "report.md", lambda t: Path(t).write_text(text, encoding="utf-8")))

    thumbs = []
    for r in report.images:
        im = Image.open(r.path).convert("RGB")
        im.thumbnail((256, 256))
        thumbs.append(im)
    sheet = contact_sheet(thumbs)
    paths.append(atomic_write(out_dir / "contact_sheet.png", lambda t: sheet.save(t, format="PNG")))
    paths.append(_scatter(report, out_dir / "scatter.png"))
    return paths


def _scatter(report: Report, path: Path) -> Path:
    """ID similarity vs CLIP score per category, as the paper's figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError("The scatter plot needs matplotlib: pip install 'celebbasis[eval]'") from None
    from .files import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    for cat in sorted({r.category for r in report.images}):
        pts = [(r.clip_score, r.id_similarity) for r in report.images
               if r.category == cat and r.clip_score is not None and r.id_similarity is not None]
        if pts:
            x, y = zip(*pts)
            ax.scatter(x, y, label=cat, alpha=0.8)
            ax.scatter([np.mean(x)], [np.mean(y)], marker="*", s=200, edgecolors="black")
    ax.set_xlabel("CLIP score (prompt fidelity)")
    ax.set_ylabel("ID similarity")
    ax.set_title("celebbasis: identity vs prompt fidelity")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda t: fig.savefig(t, format="png"))
    plt.close(fig)
    return path


def find_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder. Pass the folder that generate wrote its images to.")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in ("grid.png",))
    if not images:
        raise InputError(f"{folder} holds no PNG/JPEG/WebP images.")
    return images
