"""Helpers shared by the per-dataset loaders: locating the official files, reading them,
and the zero-shot split by class id."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from vpt_dml.data.records import ImageRecords, RetrievalSplits, named_records
from vpt_dml.errors import DatasetError, LayoutNotFound


def find_base(
    root: str | Path, marker: str, subdirs: Sequence[str], what: str, expected: str, source: str
) -> Path:
    """The first of root/<subdir> (then root itself) that holds `marker`, else a clear error."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise LayoutNotFound(
            f"data.root {root} does not exist: {what} expected there ({expected}); download it from {source}",
            what,
            expected,
            source,
        )
    for candidate in [*(root / s for s in subdirs), root]:
        if (candidate / marker).is_file():
            return candidate
    raise LayoutNotFound(
        f"{what} not found under {root}: expected {expected}; download it from {source} "
        "and set data.root to the folder that holds it",
        what,
        expected,
        source,
    )


def read_rows(path: Path, columns: int, skip: int = 0) -> list[list[str]]:
    """Whitespace-separated rows with at least `columns` fields, after `skip` header lines."""
    if not path.is_file():
        raise DatasetError(
            f"missing metadata file {path}: the copy is incomplete; re-extract the archive"
        )
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if lineno <= skip or not line.strip():
            continue
        parts = line.split()
        if len(parts) < columns:
            raise DatasetError(
                f"{path}:{lineno}: expected {columns} columns, got {line.strip()!r}; the file is damaged"
            )
        rows.append(parts)
    return rows


def split_by_class_id(
    name: str,
    paths: list[str],
    class_ids: np.ndarray,
    num_train_classes: int,
    names_by_id: Mapping[int, str] | None = None,
) -> RetrievalSplits:
    """Zero-shot split: the `num_train_classes` smallest class ids train, the others test."""
    class_ids = np.asarray(class_ids, dtype=np.int64)
    classes = np.unique(class_ids)
    if len(classes) < 2:
        raise DatasetError(
            f"{name}: found {len(classes)} class(es); a zero-shot split needs at least 2"
        )
    n_train = min(num_train_classes, len(classes) - 1)
    train_mask = class_ids <= classes[n_train - 1]

    def part(mask: np.ndarray) -> ImageRecords:
        return named_records([p for p, m in zip(paths, mask) if m], class_ids[mask], names_by_id)

    return RetrievalSplits(name, part(train_mask), part(~train_mask))


def records_from_rows(paths: list[str], class_ids: list[int]) -> ImageRecords:
    return named_records(paths, class_ids)
