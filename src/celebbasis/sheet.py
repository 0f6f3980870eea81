"""Contact sheets: images laid out on one grid (``generate``'s ``grid.png``, ``evaluate``'s report, the demo)."""

from __future__ import annotations

import math

from PIL import Image


def contact_sheet(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Lay images out on a grid (row-major), sized to the largest image."""
    if not images:
        raise ValueError("no images")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet
