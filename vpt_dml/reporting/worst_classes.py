"""The classes a run retrieves worst: lowest Recall@1 first, with their query counts,
from the run's per-query file (per_query/test_best.parquet, else test_final)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vpt_dml.evaluation import per_query


def per_query_file(run_dir: Path) -> Path | None:
    for name in ("test_best.parquet", "test_final.parquet"):
        if (Path(run_dir) / per_query.FOLDER / name).is_file():
            return Path(run_dir) / per_query.FOLDER / name
    return None


def worst(columns: dict, n: int) -> list[tuple[int, float, int]]:
    """(class, Recall@1, queries) of the n lowest-Recall@1 classes (ties: smaller class
    first, then lower label)."""
    labels = np.asarray(columns["label"])
    hit = (np.asarray(columns["first_positive_rank"]) <= 1).astype(np.float64)
    classes, inverse = np.unique(labels, return_inverse=True)
    sizes = np.bincount(inverse)
    recall = np.bincount(inverse, weights=hit) / sizes
    order = np.lexsort((classes, sizes, recall))[:n]
    return [(int(classes[i]), float(recall[i]), int(sizes[i])) for i in order]


def section(runs, n: int) -> str:
    """Markdown: per run with a per-query file, its n worst classes."""
    if n <= 0:
        return ""
    parts = []
    for run in runs:
        f = per_query_file(run.path)
        if f is None:
            continue
        columns, _ = per_query.read(f)
        rows = [f"| {c} | {100 * r:.2f} | {size} |" for c, r, size in worst(columns, n)]
        parts.append(
            f"### {run.path} ({f.name})\n\n| class | recall@1 | queries |\n|---|---|---|\n"
            + "\n".join(rows)
            + "\n"
        )
    return ("## Worst classes (lowest Recall@1)\n\n" + "\n".join(parts)) if parts else ""
