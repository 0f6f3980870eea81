"""Photos in: any image Pillow reads as upright 8-bit RGB, and the images of a folder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import InputError

logger = logging.getLogger(__name__)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # the images evaluate reads from a folder of generated images
MAX_PIXELS = 64_000_000  # refuse larger images: decompression bombs, and no face needs more


def photos_in(folder) -> list[Path]:
    """The images directly inside ``folder`` — any file Pillow opens, as for a single photo — sorted by name.

    Hidden files are ignored; other files that are not images are skipped with a note naming them.
    """
    photos, skipped = [], []
    for p in sorted(Path(folder).iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        (photos if _is_image(p) else skipped).append(p)
    if skipped:
        logger.info("Skipping %d file(s) in %s that are not images: %s.", len(skipped), folder,
                    ", ".join(p.name for p in skipped[:5]) + (" …" if len(skipped) > 5 else ""))
    return photos


def _is_image(path: Path) -> bool:
    """Whether Pillow recognises the file (reads its header only)."""
    try:
        with Image.open(path):
            return True
    except Image.DecompressionBombError:
        return True  # an image; ``load_image`` refuses it with its own message
    except (OSError, ValueError, SyntaxError):
        return False


def load_image(path, label=None) -> Image.Image:
    """Open any image Pillow reads as upright 8-bit RGB.

    EXIF orientation is applied; CMYK, 16-bit, greyscale, palette and alpha images become RGB
    (transparency over white); animated images use their first frame.

    ``label`` is what messages call the file (default: ``path``), e.g. the name it was uploaded under.

    Raises:
        InputError: missing, a folder, empty, not an image, truncated, or larger than ``MAX_PIXELS``.
    """
    from PIL import UnidentifiedImageError

    path = Path(path)
    label = label or path
    if not path.exists():
        raise InputError(f"{label}: no such file. Check the path to the photo.")
    if path.is_dir():
        raise InputError(f"{label} is a folder. Pass a photo file (JPEG, PNG, WebP, ...).")
    if path.stat().st_size == 0:
        raise InputError(f"{label} is empty (0 bytes). Pass a real photo.")
    try:
        # The size is checked from the header before any pixel is decoded (no warnings filter: it would be
        # process-wide, and the web UI loads photos from several threads).
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{im.width}x{im.height}")
            if getattr(im, "n_frames", 1) > 1:
                logger.warning("%s has %d frames; using the first.", label, im.n_frames)
                im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            f"{label} has too many pixels (over {MAX_PIXELS // 1_000_000} MP, or a decompression bomb). "
            "Resize the photo; a face needs far fewer pixels."
        ) from None
    except UnidentifiedImageError:
        raise InputError(f"{label} is not an image Pillow can read. Pass a JPEG, PNG or WebP photo.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{label} could not be decoded ({e}). The file is truncated or damaged; export it again.") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (16-bit scaled down, alpha composited over white)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        a = a / (65535.0 if im.mode != "I" or a.max() > 255 else 255.0)
        im = Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")

