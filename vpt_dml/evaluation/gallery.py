"""The retrieval gallery as one PNG: a row per query, the query, then its top-k framed
green (same class) or red (another class). Written by the run's dashboard
(runs/callbacks/dashboard.py) and by `vpt_dml.retrieve --gallery-png` (serving/search.py);
PIL only, so neither needs matplotlib or Lightning for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def thumbnail(path: str, size: int = 96) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size)))


# frame colours of a gallery cell: matplotlib's tab:green / tab:red, black for the query
SAME_CLASS, OTHER_CLASS, QUERY = (44, 160, 44), (214, 39, 40), (0, 0, 0)
CELL, FRAME, GAP = 96, 3, 6  # thumbnail side, frame width, space between cells (px)


def plot_gallery(
    query_paths: list[str], neighbours: list[list[tuple[str, bool]]], title: str, out: Path
) -> Path:
    """One row per query: the query (thin black frame), then its top-k, framed green
    (same class) or red. Tiled with PIL: a grid of matplotlib axes took ~1.6 s for 8 x 6
    cells, more than the rest of a small run."""
    from PIL import Image, ImageDraw

    cols = 1 + max(len(n) for n in neighbours)
    pitch = CELL + 2 * FRAME + GAP
    top = 2 * 14 + GAP  # the title line, then the column headers
    canvas = Image.new("RGB", (GAP + cols * pitch, top + len(query_paths) * pitch), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, 2), title, fill=QUERY)
    for col in range(cols):
        draw.text((GAP + col * pitch + FRAME, 16), "query" if col == 0 else f"#{col}", fill=QUERY)
    for row, (query, hits) in enumerate(zip(query_paths, neighbours)):
        for col, (path, correct) in enumerate([(query, None)] + list(hits)):
            x, y = GAP + col * pitch, top + row * pitch
            colour = QUERY if correct is None else (SAME_CLASS if correct else OTHER_CLASS)
            width = 1 if correct is None else FRAME
            inner = (x + FRAME - width, y + FRAME - width)
            outer = (x + FRAME + CELL + width - 1, y + FRAME + CELL + width - 1)
            draw.rectangle([inner, outer], fill=colour)
            canvas.paste(Image.fromarray(thumbnail(path, CELL)), (x + FRAME, y + FRAME))
    canvas.save(out)
    return out
