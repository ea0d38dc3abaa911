"""Dataset name -> loader returning `RetrievalSplits`, plus the official counts to check."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vpt_dml.data import cars, cub, inat, inshop, sop
from vpt_dml.data.class_folders import LAYOUT as CLASS_FOLDERS
from vpt_dml.data.class_folders import (
    describe_folder,
    load_class_folders,
    looks_like_class_folders,
)
from vpt_dml.data.layout import LayoutNotFound
from vpt_dml.data.records import RetrievalSplits
from vpt_dml.errors import DatasetError, UserError


@dataclass(frozen=True)
class DatasetSpec:
    load: Callable[[str], RetrievalSplits]
    official: dict[str, int]
    # the official layout's locator (raises DatasetError when absent); with
    # `class_folders_ok`, a one-folder-per-class copy is accepted in its place
    locate: Callable[[str], Path] | None = None
    class_folders_ok: bool = False


DATASETS: dict[str, DatasetSpec] = {
    "cub": DatasetSpec(cub.load_cub, cub.OFFICIAL_COUNTS, cub.find_cub_dir, class_folders_ok=True),
    "cars": DatasetSpec(
        cars.load_cars, cars.OFFICIAL_COUNTS, cars.find_cars_dir, class_folders_ok=True
    ),
    "sop": DatasetSpec(sop.load_sop, sop.OFFICIAL_COUNTS),
    "inshop": DatasetSpec(inshop.load_inshop, inshop.OFFICIAL_COUNTS),
    "inat": DatasetSpec(inat.load_inat, inat.OFFICIAL_COUNTS),
}


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)} (data=<name>)")
    return DATASETS[name]


def load_splits(name: str, root: str, **options) -> tuple[RetrievalSplits, dict[str, int]]:
    splits, official = _load(name, root, **options)
    splits.info.setdefault("root", str(root))
    return splits, official


def _load(name: str, root: str, **options) -> tuple[RetrievalSplits, dict[str, int]]:
    spec = dataset_spec(name)
    if spec.class_folders_ok and spec.locate is not None:
        try:
            spec.locate(root)
        except LayoutNotFound as official:
            if looks_like_class_folders(root):
                return load_class_folders(name, root), spec.official
            if not Path(root).expanduser().is_dir():
                raise
            raise DatasetError(
                f"{root} matches no {official.what} layout: expected the official one "
                f"({official.expected}) or {CLASS_FOLDERS}; found {describe_folder(root)}. "
                f"Fix the folder, or download it from {official.source} and set data.root "
                "to the folder that holds it"
            ) from None
    return spec.load(root, **options), spec.official


def count_mismatches(summary: dict[str, int], official: dict[str, int]) -> list[str]:
    """Human-readable differences between the counts found and the official ones."""
    return [
        f"{key}: found {summary.get(key)} expected {want}"
        for key, want in official.items()
        if summary.get(key) != want
    ]
