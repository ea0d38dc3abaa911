"""The in-memory description of a retrieval dataset: image paths, labels and splits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageRecords:
    """Image files with integer class labels (contiguous from 0 within the split).

    `class_names[label]` is the dataset's own name of that class (its folder, or its id in
    the metadata): messages name classes the way the user's files do.
    """

    paths: list[str]
    labels: np.ndarray
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise ValueError("paths and labels differ in length")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return int(np.unique(self.labels).size)

    def class_name(self, label: int) -> str:
        label = int(label)
        if 0 <= label < len(self.class_names):
            return str(self.class_names[label])
        return str(label)

    def subset(self, mask: np.ndarray) -> ImageRecords:
        idx = np.flatnonzero(mask)
        return ImageRecords([self.paths[i] for i in idx], self.labels[idx], self.class_names)


def relabel(labels: np.ndarray) -> np.ndarray:
    """Map arbitrary class ids to 0..C-1 in sorted order of the original ids."""
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.astype(np.int64)


def named_records(
    paths: list[str], class_ids, names_by_id: Mapping[int, str] | None = None
) -> ImageRecords:
    """Records labelled 0..C-1 in sorted id order, each class named as the dataset names it
    (`names_by_id[id]`, else the id itself)."""
    ids = np.asarray(class_ids, dtype=np.int64)
    names = names_by_id or {}
    ordered = np.unique(ids).tolist()
    return ImageRecords(paths, relabel(ids), [str(names.get(i, i)) for i in ordered])


@dataclass
class RetrievalSplits:
    """Zero-shot splits: train classes never appear in test.

    `gallery` is set for query/gallery protocols (In-Shop); otherwise `test` is both the
    query set and the gallery, and each query is left out of its own neighbours.
    """

    name: str
    train: ImageRecords
    test: ImageRecords
    gallery: ImageRecords | None = None
    counts: dict[str, int] = field(default_factory=dict)
    # how the copy was read: "root" (data.root, the manifest's base), "images" (In-Shop)
    info: dict = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        out = {
            "train_images": len(self.train),
            "train_classes": self.train.num_classes,
            "test_images": len(self.test),
            "test_classes": self.test.num_classes,
        }
        if self.gallery is not None:
            # query/gallery protocols count the test classes over both sets (In-Shop: 3,985 items)
            both = np.concatenate([self.test.labels, self.gallery.labels])
            out["test_classes"] = int(np.unique(both).size)
            out["gallery_images"] = len(self.gallery)
        return out

    def all_records(self) -> list[tuple[str, ImageRecords]]:
        parts = [("train", self.train), ("test", self.test)]
        return parts + ([("gallery", self.gallery)] if self.gallery is not None else [])
