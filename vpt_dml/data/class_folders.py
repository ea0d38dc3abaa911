"""The common pre-arranged layout: one folder per class.

    <root>/<class>/*.jpg                      all images; classes sorted, first half train
    <root>/train/<class>/*, <root>/test/<class>/*
        disjoint class names: used as given (a zero-shot split made in advance);
        shared class names (a classification split, as in Kaggle's Cars196): merged per
        class, then split by class like the flat layout.

Classes sort by their leading number when every folder has one ("001.Black_footed..."),
otherwise by name.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from vpt_dml.data.layout import split_by_class_id
from vpt_dml.data.records import ImageRecords, RetrievalSplits, relabel
from vpt_dml.errors import DatasetError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def _class_dirs(folder: Path) -> list[Path]:
    return [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def looks_like_class_folders(root: str | Path) -> bool:
    root = Path(root).expanduser()
    if not root.is_dir():
        return False
    tops = (
        [root / "train", root / "test"]
        if (root / "train").is_dir() and (root / "test").is_dir()
        else [root]
    )
    for top in tops:
        dirs = _class_dirs(top)
        if not dirs or not any(_images(d) for d in dirs[:5]):
            return False
    return True


def _sort_key(names: list[str]):
    numbered = all(re.match(r"\d+", n) for n in names)
    return (lambda n: (int(re.match(r"\d+", n).group()), n)) if numbered else (lambda n: n)


def _scan(folders: list[Path]) -> dict[str, list[str]]:
    """class name -> image paths, merged over `folders`; an empty class folder is an error."""
    out: dict[str, list[str]] = {}
    for top in folders:
        for d in _class_dirs(top):
            images = _images(d)
            if not images:
                raise DatasetError(
                    f"class folder {d} holds no images; remove it or restore its images"
                )
            out.setdefault(d.name, []).extend(str(p) for p in images)
    return out


def _records(classes: dict[str, list[str]], names: list[str]) -> ImageRecords:
    paths = [p for n in names for p in classes[n]]
    ids = np.concatenate([np.full(len(classes[n]), i) for i, n in enumerate(names)])
    return ImageRecords(paths, relabel(ids), names)


def load_class_folders(
    name: str, root: str | Path, num_train_classes: int | None = None
) -> RetrievalSplits:
    root = Path(root).expanduser()
    if not looks_like_class_folders(root):
        raise DatasetError(f"{root} is not a one-folder-per-class layout (<root>/<class>/*.jpg)")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = _scan([root / "train"]), _scan([root / "test"])
        if not set(train) & set(test):  # already a zero-shot split
            return RetrievalSplits(
                name,
                _records(train, sorted(train, key=_sort_key(list(train)))),
                _records(test, sorted(test, key=_sort_key(list(test)))),
            )
        classes = _scan([root / "train", root / "test"])
    else:
        classes = _scan([root])
    names = sorted(classes, key=_sort_key(list(classes)))
    paths = [p for n in names for p in classes[n]]
    ids = np.concatenate([np.full(len(classes[n]), i) for i, n in enumerate(names)])
    return split_by_class_id(name, paths, ids, num_train_classes or len(names) // 2, names)
