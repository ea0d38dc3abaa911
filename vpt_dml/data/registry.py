"""Dataset name -> loader returning `RetrievalSplits` (and the official counts to check)."""

from __future__ import annotations

from collections.abc import Callable

from vpt_dml.data import cub
from vpt_dml.data.records import RetrievalSplits
from vpt_dml.errors import UserError

# name -> (loader(root) -> splits, official counts or None)
LOADERS: dict[str, tuple[Callable[..., RetrievalSplits], dict[str, int] | None]] = {
    "cub": (cub.load_cub, cub.OFFICIAL_COUNTS),
}


def load_splits(name: str, root: str) -> tuple[RetrievalSplits, dict[str, int] | None]:
    if name not in LOADERS:
        raise UserError(f"unknown dataset {name!r}; choose one of {sorted(LOADERS)} (data=<name>)")
    loader, official = LOADERS[name]
    return loader(root), official


def count_mismatches(summary: dict[str, int], official: dict[str, int]) -> list[str]:
    """Human-readable differences between the counts found and the official ones."""
    return [
        f"{key}: found {summary.get(key)} expected {want}"
        for key, want in official.items()
        if summary.get(key) != want
    ]
