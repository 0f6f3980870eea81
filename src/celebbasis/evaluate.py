"""Evaluation as in the paper (§4, METHOD §6): identity similarity, prompt fidelity, detection rate.

- Identity similarity: cosine between the face vector of a reference (a photo, or the re-normalised
  mean over a folder of photos of one person) and of each face found in a generated image, with an
  evaluation network that should differ from the training one. Images with several people match
  faces to references by the best total cosine (the Hungarian method, ``linear_sum_assignment``).
  Images without a face are counted in the detection rate and left out of the mean.
- Prompt fidelity: CLIP score, ``100 * max(cos(image, text), 0)``, the text being the prompt with
  each identity word replaced by "person".
- Categories: the paper's four (``prompts.CATEGORIES``); an image's comes from its prompt
  (``prompts.categorize``). The protocol prompts themselves are in ``prompts``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config import DEFAULT_CLIP_MODEL
from .errors import InputError, MissingDependencyError, NoFaceFoundError, first_line
from .face import IMAGE_SUFFIXES, FaceAnalyzer, load_image, photos_in
from .files import atomic_write
from .insert import PLACEHOLDER_RE
from .models import load_clip
from .prompts import PromptLine, categorize
from .sheet import contact_sheet

logger = logging.getLogger(__name__)

UNKNOWN_CATEGORY = "unknown"  # images without a prompt: nothing to guess a category from


def clip_text(prompt: str) -> str:
    """The prompt CLIP scores against: ``<alice> person`` (or a bare ``<alice>``) becomes ``person``."""
    text = re.sub(r"<[^<>\s]+>(\s+person)?", "person", prompt)
    return re.sub(r"\s+", " ", text).strip()


class ClipScorer:
    """CLIP score of (image, text) with a transformers CLIP model (hub id or local folder).

    The model is loaded by ``models.load_clip``: from the local cache first, offline in about two
    seconds with one line saying what to pass instead.

    Raises:
        ModelLoadError: a missing or broken folder, or a hub id neither cached nor downloadable.
    """

    def __init__(self, model: str = DEFAULT_CLIP_MODEL):
        import torch

        self.model, self.processor = load_clip(model)
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
    """Pairs (reference, face) maximising the total similarity (Hungarian method).

    Args:
        sim: (n_refs, n_faces) similarities; either side may be the longer.

    Returns:
        ``min(n_refs, n_faces)`` pairs, sorted by reference.

    Example:
        >>> best_assignment(np.array([[0.9, 0.8], [0.7, 0.1]]))  # greedy would take 0.9, then 0.1
        [(0, 1), (1, 0)]
    """
    from scipy.optimize import linear_sum_assignment

    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"sim must be (n_refs, n_faces), got shape {sim.shape}")
    if 0 in sim.shape:
        return []
    refs, faces = linear_sum_assignment(sim, maximize=True)
    return [(int(r), int(f)) for r, f in zip(refs, faces)]


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
    """The PNG text fields of an image (``{}`` for other formats); a file Pillow cannot read warns and gives ``{}``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return dict(getattr(im, "text", {}) or {})
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        logger.warning("Cannot read the metadata of %s (%s); its prompt is unknown.", path, first_line(e))
        return {}


def image_models(images) -> set[str]:
    """The models that drew ``images``, as their PNG ``model`` field records them (images without one add nothing)."""
    return {m for m in (_image_meta(Path(p)).get("model") for p in images) if m}


def reference_embedding(analyzer, path) -> np.ndarray:
    """The (D,) unit identity vector of a reference: one photo, or the re-normalised mean over a folder's photos.

    Raises:
        InputError: an empty folder, or a photo without a usable face.
    """
    path = Path(path)
    if not path.is_dir():
        return analyzer(path).embedding
    photos = photos_in(path)
    if not photos:
        raise InputError(f"Reference folder {path} holds no PNG/JPEG/WebP photos. Pass a photo, or a folder of photos of one person.")
    vectors = np.stack([analyzer(p).embedding for p in photos])  # (N, D)
    mean = vectors.mean(0)
    norm = float(np.linalg.norm(mean))
    if norm < 1e-6:
        raise InputError(f"The photos in {path} average to no identity at all; are they all the same person?")
    logger.info("Reference %s: the mean face of %d photos.", path, len(photos))
    return (mean / norm).astype(np.float32)


def _prompt_line(item) -> PromptLine:
    if isinstance(item, PromptLine):
        return item
    category, prompt = item
    return PromptLine(prompt or "", category)


def evaluate(images: list, references: list[tuple[str | None, str]], *, analyzer=None, clip: ClipScorer | None = None,
             prompts: list[PromptLine | tuple[str | None, str]] | None = None, show_progress: bool = True) -> Report:
    """Score generated images against reference photos.

    Which references an image's faces are matched to: those whose token the image names (PNG
    ``identities``, else the prompt's ``<tokens>``); with unnamed references, the first as many as
    the prompt names; with no prompt at all, every reference (best assignment over all of them).

    Args:
        images: image paths (their PNG text gives prompt, identities and category when present).
        references: ``(token or None, path)``; ``path`` is a photo, or a folder of photos of one
            person (their mean face vector). A token ties the reference to ``<token>`` in prompts.
        analyzer: ``FaceAnalyzer`` with the evaluation network (dlib's when ``None``).
        clip: a ``ClipScorer``, or ``None`` to skip prompt fidelity.
        prompts: a ``PromptLine`` (or ``(category, prompt)`` pair) per image, in order, overriding
            the PNG metadata.

    Returns:
        ``Report`` with one ``ImageResult`` per image.

    Example:
        >>> report = evaluate(find_images("out/"), [("<alice>", "alice.jpg")], clip=None)
        >>> write_report(report, "report/")
    """
    from tqdm.auto import tqdm

    if not images:
        raise InputError("No images to evaluate. Pass a folder with PNG/JPEG images.")
    if not references:
        raise InputError("No reference photo. Give a photo (or folder of photos) of each person to compare with.")
    if prompts is not None and len(prompts) != len(images):
        raise InputError(f"{len(prompts)} prompts for {len(images)} images. Give one prompt per image, in file-name order.")
    lines = None if prompts is None else [_prompt_line(p) for p in prompts]
    analyzer = analyzer or FaceAnalyzer()
    refs = [(tok, reference_embedding(analyzer, path)) for tok, path in references]
    results, unprompted = [], 0
    for i, path in enumerate(tqdm(images, desc="evaluate", disable=not show_progress, unit="image")):
        path = Path(path)
        meta = _image_meta(path)
        line = lines[i] if lines is not None else PromptLine(meta.get("prompt", ""), meta.get("category"))
        prompt = line.prompt
        tokens = _identities(meta.get("identities")) or sorted(set(PLACEHOLDER_RE.findall(prompt)))
        if not prompt:
            unprompted += 1
        category = line.category or (categorize(prompt, len(tokens)) if prompt else UNKNOWN_CATEGORY)
        image = load_image(path)
        arr = np.asarray(image)
        try:
            faces = analyzer.detect(arr, path)
            embs = [analyzer.embed(arr, f, path)[1] for f in faces]
        except NoFaceFoundError as e:
            logger.warning("%s Counted as no face.", e)
            embs = []
        named = [j for j, (tok, _) in enumerate(refs) if tok and tok in tokens]
        if named:
            wanted = named
        elif tokens:
            wanted = list(range(min(len(tokens), len(refs))))
        else:  # nobody named: every reference competes for every face
            wanted = list(range(len(refs)))
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
    if unprompted:
        logger.warning(
            "%d of %d images have no prompt metadata: their category is %r, they get no CLIP score, and their faces "
            "are matched against every reference. Pass a prompts file (one line per image in file-name "
            "order) to fix this.", unprompted, len(images), UNKNOWN_CATEGORY)
    return Report(results, analyzer.encoder.name, getattr(clip, "name", None))


def write_report(report: Report, out_dir) -> list[Path]:
    """``report.json``, ``report.md``, ``contact_sheet.png`` and ``scatter.png`` in ``out_dir``."""

    out_dir = Path(out_dir)
    figure_cls = _figure_class()  # before anything is written: a missing matplotlib leaves no half report
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
        im = load_image(r.path)
        im.thumbnail((256, 256))
        thumbs.append(im)
    sheet = contact_sheet(thumbs)
    paths.append(atomic_write(out_dir / "contact_sheet.png", lambda t: sheet.save(t, format="PNG")))
    scatter = _scatter(report, out_dir / "scatter.png", figure_cls)
    if scatter is not None:
        paths.append(scatter)
    return paths


def _figure_class():
    """matplotlib's ``Figure`` (no pyplot: the caller's plotting backend is left alone)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("The scatter plot needs matplotlib: pip install 'celebbasis[eval]'") from None
    return Figure


def _scatter(report: Report, path: Path, figure_cls) -> Path | None:
    """ID similarity vs CLIP score per category, as the paper's figure.

    Without any image that has both, the measured one per category (a strip plot); with neither,
    no figure (``None``, and an info line says why).
    """
    rows = report.images
    cats = sorted({r.category for r in rows})
    both = any(r.clip_score is not None and r.id_similarity is not None for r in rows)
    if not both:
        metric = next((m for m in ("id_similarity", "clip_score") if any(getattr(r, m) is not None for r in rows)), None)
        if metric is None:
            logger.info("No face found and no CLIP score in any image: %s not drawn.", path.name)
            return None
        logger.info("%s shows %s only: no image has both an ID similarity and a CLIP score.", path.name,
                    "ID similarity" if metric == "id_similarity" else "the CLIP score")
    fig = figure_cls(figsize=(6, 4.5), dpi=100)
    ax = fig.subplots()
    if both:
        for k, cat in enumerate(cats):
            pts = [(r.clip_score, r.id_similarity) for r in rows
                   if r.category == cat and r.clip_score is not None and r.id_similarity is not None]
            if pts:
                x, y = zip(*pts)
                ax.scatter(x, y, label=cat, alpha=0.8, color=f"C{k}")
                ax.scatter([np.mean(x)], [np.mean(y)], marker="*", s=200, color=f"C{k}", edgecolors="black")
        ax.set_xlabel("CLIP score (prompt fidelity)")
        ax.set_ylabel("ID similarity")
        ax.set_title("celebbasis: identity vs prompt fidelity")
    else:
        label = "ID similarity" if metric == "id_similarity" else "CLIP score (prompt fidelity)"
        values = {c: [getattr(r, metric) for r in rows if r.category == c and getattr(r, metric) is not None] for c in cats}
        cats = [c for c in cats if values[c]]
        jitter = np.random.default_rng(0)
        for k, cat in enumerate(cats):
            y = values[cat]
            ax.scatter(k + jitter.uniform(-0.15, 0.15, len(y)), y, label=cat, alpha=0.8, color=f"C{k}")
            ax.scatter([k], [np.mean(y)], marker="*", s=200, color=f"C{k}", edgecolors="black")
        ax.set_xticks(range(len(cats)), cats)
        ax.set_xlim(-0.6, len(cats) - 0.4)
        ax.set_ylabel(label)
        ax.set_title(f"celebbasis: {label} by category ({'no CLIP score' if metric == 'id_similarity' else 'no face found'})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda t: fig.savefig(t, format="png"))
    return path


def find_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder. Pass the folder that generate wrote its images to.")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in ("grid.png",))
    if not images:
        raise InputError(f"{folder} holds no PNG/JPEG/WebP images.")
    return images
