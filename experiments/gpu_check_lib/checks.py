"""What makes a run fail the check: metrics outside [0, 1], non-finite losses, no csv."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

METRIC_NAME = re.compile(
    r"^(recall@\d+|precision@\d+|map@r\w*|r_precision\w*|nmi|f1)(_before)?$", re.IGNORECASE
)


def metric_leaves(obj, path: str = "") -> list[tuple[str, object]]:
    """(dotted path, value) of every metric-named leaf in metrics.json (any layout)."""
    out = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            sub = f"{path}.{key}" if path else str(key)
            if isinstance(value, (dict, list)):
                out += metric_leaves(value, sub)
            elif METRIC_NAME.match(str(key).rsplit("/", 1)[-1]):
                out.append((sub, value))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out += metric_leaves(value, f"{path}[{i}]")
    return out


def _bad_metric(value) -> bool:
    if value is None:
        return False  # e.g. best_epoch before any validation
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return not (math.isfinite(value) and 0.0 <= value <= 1.0)


def check_metrics_json(result: dict) -> list[str]:
    leaves = metric_leaves({k: v for k, v in result.items() if k not in ("cost", "provenance")})
    problems = [f"metrics.json {p} = {v!r} is not in [0, 1]" for p, v in leaves if _bad_metric(v)]
    if not any(p.rsplit(".", 1)[-1].rsplit("/", 1)[-1] == "recall@1" for p, _ in leaves):
        problems.append("metrics.json holds no recall@1")
    return problems


def check_csv(path: Path) -> list[str]:
    """csv/metrics.csv: every loss finite, every metric column in [0, 1]."""
    if not path.is_file():
        return [f"{path} is missing"]
    problems = []
    with path.open() as f:
        for row_no, row in enumerate(csv.DictReader(f), 2):
            for key, cell in row.items():
                if cell in (None, "") or key is None:
                    continue
                name = key.rsplit("/", 1)[-1]
                is_loss = "loss" in name
                if not (is_loss or METRIC_NAME.match(name)):
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    problems.append(f"{path.name} line {row_no}: {key}={cell!r} is not a number")
                    continue
                if is_loss and not math.isfinite(value):
                    problems.append(f"{path.name} line {row_no}: {key}={cell} is not finite")
                elif not is_loss and _bad_metric(value):
                    problems.append(f"{path.name} line {row_no}: {key}={cell} is not in [0, 1]")
    return problems


def check_losses(losses: list[float]) -> list[str]:
    if not losses:
        return ["no training loss was recorded"]
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        return [f"non-finite training loss at {len(bad)} step(s), first at step {bad[0]}"]
    return []
