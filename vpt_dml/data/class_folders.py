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
from vpt_dml.data.records import ImageRecords, RetrievalSplits, named_records
from vpt_dml.errors import DatasetError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def _class_dirs(folder: Path) -> list[Path]:
    return [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


LAYOUT = (
    "one folder per class (<root>/<class>/*.jpg with at least 2 classes, "
    "or <root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg)"
)


def _with_images(folder: Path, enough: int) -> int:
    """How many class folders under `folder` hold images, counting up to `enough`."""
    found = 0
    for d in _class_dirs(folder):
        found += bool(_images(d))
        if found >= enough:
            break
    return found


def looks_like_class_folders(root: str | Path) -> bool:
    """Class folders with images: 2 or more at the top, or at least one in train/ and test/."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return False
    if (root / "train").is_dir() and (root / "test").is_dir():
        return all(_with_images(root / part, 1) for part in ("train", "test"))
    return _with_images(root, 2) >= 2


def describe_folder(root: str | Path, limit: int = 6) -> str:
    """What a folder holds, in a few words: 'README.txt, stuff/ (1 image)'."""
    root = Path(root).expanduser()
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    if not entries:
        return "an empty folder"
    parts = []
    for p in entries[:limit]:
        if p.is_dir():
            n = len(_images(p))
            parts.append(f"{p.name}/ ({n} image{'s' if n != 1 else ''})")
        else:
            parts.append(p.name)
    more = len(entries) - limit
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


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
    return named_records(paths, ids, dict(enumerate(names)))


def load_class_folders(
    name: str, root: str | Path, num_train_classes: int | None = None
) -> RetrievalSplits:
    root = Path(root).expanduser()
    if not looks_like_class_folders(root):
        raise DatasetError(f"{root} is not {LAYOUT}; found {describe_folder(root)}")
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
    return split_by_class_id(
        name, paths, ids, num_train_classes or len(names) // 2, dict(enumerate(names))
    )
