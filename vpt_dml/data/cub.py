"""CUB-200-2011 in its official layout.

    <root>/CUB_200_2011/images/NNN.Name/*.jpg
    <root>/CUB_200_2011/images.txt               "<image_id> <relative path>"
    <root>/CUB_200_2011/image_class_labels.txt   "<image_id> <class_id>"

Zero-shot split (METHOD.md §4): the first half of the classes (1-100) train, the rest test.
The `train_test_split.txt` file is the classification split and is deliberately unused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vpt_dml.data.layout import find_base
from vpt_dml.data.records import ImageRecords, RetrievalSplits, named_records
from vpt_dml.errors import DatasetError

OFFICIAL_COUNTS = {
    "train_images": 5864,
    "train_classes": 100,
    "test_images": 5924,
    "test_classes": 100,
}
SOURCE = "https://www.vision.caltech.edu/datasets/cub_200_2011/"


def find_cub_dir(root: str | Path) -> Path:
    expected = "<root>/CUB_200_2011/images.txt, image_class_labels.txt and images/"
    return find_base(
        root,
        "images.txt",
        ["CUB_200_2011"],
        "CUB-200-2011",
        expected,
        SOURCE + " (CUB_200_2011.tgz)",
    )


def _read_two_columns(path: Path) -> dict[int, str]:
    if not path.is_file():
        raise DatasetError(
            f"missing metadata file {path}: the CUB copy is incomplete; re-extract CUB_200_2011.tgz"
        )
    out: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DatasetError(f"{path}:{lineno}: expected '<id> <value>', got {line!r}")
        out[int(parts[0])] = parts[1].strip()
    return out


def load_cub(root: str | Path, num_train_classes: int | None = None) -> RetrievalSplits:
    """Parse a CUB-layout folder; the first `num_train_classes` classes (default: half) train."""
    base = find_cub_dir(root)
    images = _read_two_columns(base / "images.txt")
    labels = _read_two_columns(base / "image_class_labels.txt")
    missing = sorted(set(images) - set(labels))
    if missing:
        raise DatasetError(
            f"{base}/image_class_labels.txt has no label for image id {missing[0]} ({len(missing)} in all)"
        )
    ids = sorted(images)
    paths = [str(base / "images" / images[i]) for i in ids]
    class_ids = np.array([int(labels[i]) for i in ids], dtype=np.int64)
    classes = np.unique(class_ids)
    cut = classes[(num_train_classes or len(classes) // 2) - 1]
    # a class is named by its folder ("002.Laysan_Albatross"), as the user sees it on disk
    folder_of = {int(labels[i]): Path(images[i]).parent.name for i in ids}
    train_mask = class_ids <= cut

    def part(mask: np.ndarray) -> ImageRecords:
        return named_records([p for p, m in zip(paths, mask) if m], class_ids[mask], folder_of)

    return RetrievalSplits("cub", part(train_mask), part(~train_mask))
