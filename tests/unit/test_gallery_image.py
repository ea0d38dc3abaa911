"""The retrieval gallery (runs/callbacks/dashboard.plot_gallery): one row per query, the
query first, then its neighbours framed green (same class) or red (another class)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vpt_dml.evaluation.gallery import (
    CELL,
    FRAME,
    GAP,
    OTHER_CLASS,
    QUERY,
    SAME_CLASS,
    plot_gallery,
)


def solid(tmp_path: Path, name: str, rgb: tuple[int, int, int]) -> str:
    path = tmp_path / f"{name}.png"
    Image.new("RGB", (40, 30), rgb).save(path)
    return str(path)


def test_gallery_cells_show_each_image_in_its_place_framed_by_its_class(tmp_path: Path):
    q0, q1 = solid(tmp_path, "q0", (10, 20, 30)), solid(tmp_path, "q1", (200, 200, 0))
    same, other = solid(tmp_path, "same", (0, 0, 255)), solid(tmp_path, "other", (255, 0, 255))
    out = plot_gallery(
        [q0, q1], [[(same, True), (other, False)], [(other, False)]], "t", tmp_path / "g.png"
    )
    image = np.asarray(Image.open(out).convert("RGB"))
    pitch = CELL + 2 * FRAME + GAP
    top = image.shape[0] - 2 * pitch  # two rows under the title and the headers
    assert image.shape[1] == GAP + 3 * pitch and top > 0

    def cell(row: int, col: int) -> tuple[tuple, tuple, tuple]:
        """(centre pixel, frame pixel left of the thumbnail, pixel just outside the frame)"""
        x, y = GAP + col * pitch + FRAME, top + row * pitch + FRAME
        mid = y + CELL // 2
        return (tuple(image[mid, x + CELL // 2]), tuple(image[mid, x - 1]),
                tuple(image[mid, x - FRAME - 1]))  # fmt: skip

    white = (255, 255, 255)
    assert cell(0, 0) == ((10, 20, 30), QUERY, white)  # the query: a 1 px black frame
    assert cell(0, 1) == ((0, 0, 255), SAME_CLASS, white)
    assert cell(0, 2) == ((255, 0, 255), OTHER_CLASS, white)
    assert cell(1, 0)[0] == (200, 200, 0)
    assert cell(1, 1) == ((255, 0, 255), OTHER_CLASS, white)
    assert cell(1, 2) == (white, white, white)  # the second query has one neighbour
    # the query's frame is 1 px: the frame width's pixel inside it is white
    x, y = GAP + FRAME, top + FRAME + CELL // 2
    assert tuple(image[y, x - FRAME]) == white
