"""Per-query results of one evaluation: one row per counted query, from the very ranks the
metrics were computed from (evaluation/retrieval.py `metrics_from_ranks`), so the file's
means are the metrics, bit for bit (`means`).

Columns: `index` (dataset index of the query in the evaluation set), `label` (its class),
`positives` (R), `first_positive_rank` (1-based; exact up to `max_rank_exact` in the file's
metadata, a larger value only says "deeper than that"), `ap_at_r` (MAP@R's per-query AP),
`r_precision`, `ap_vptsp` (the reference code's AP variant). Queries without a positive
(R = 0) count in no metric and are not rows; the metadata says how many there were.

Written for the test split as `<run dir>/per_query/test_final.parquet` (final weights) and
`test_best.parquet` (the selected epoch); every evaluated test-split epoch is kept in
`per_query/epochs/` until the run finishes and picks its best.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from vpt_dml.errors import UserError

COLUMNS = (
    "index",
    "label",
    "positives",
    "first_positive_rank",
    "ap_at_r",
    "r_precision",
    "ap_vptsp",
)
FOLDER = "per_query"
EPOCHS = "epochs"


def per_query_from_ranks(
    num_positives: torch.Tensor, negatives_above: torch.Tensor, same: bool
) -> dict[str, torch.Tensor]:
    """Per counted query, the terms `metrics_from_ranks` averages (the same expressions,
    so the means agree to the last bit); `valid` marks the counted queries."""
    valid = num_positives > 0
    r = num_positives[valid].double()
    n = negatives_above[valid].double()
    j = torch.arange(1, n.shape[1] + 1, dtype=torch.float64, device=n.device)
    rank = n + j
    listed = j <= r[:, None]

    def average_precision(depth: torch.Tensor) -> torch.Tensor:
        inside = listed & (rank <= depth[:, None])
        return torch.where(inside, j / rank, 0).sum(1) / depth

    if rank.shape[1] == 0:  # only lone queries
        empty = torch.zeros(0, dtype=torch.float64, device=n.device)
        return {"valid": valid, "positives": r.long(), "first_positive_rank": empty.long(),
                "ap_at_r": empty, "r_precision": empty, "ap_vptsp": empty}  # fmt: skip
    return {
        "valid": valid,
        "positives": num_positives[valid].long(),
        "first_positive_rank": rank[:, 0].long(),
        "ap_at_r": average_precision(r),
        "r_precision": (listed & (rank <= r[:, None])).sum(1) / r,
        "ap_vptsp": average_precision(r + (1 if same else 0)),
    }


def means(columns: dict, ks) -> dict[str, float]:
    """metrics.json's retrieval metrics from a per-query table (a `read` result or the
    dict `table` builds), computed as `metrics_from_ranks` computes them."""

    def t(name):
        return torch.as_tensor(np.array(columns[name]))

    first = t("first_positive_rank").double()
    out = {f"recall@{k}": float((first <= k).double().mean()) for k in ks}
    for metric, column in (("map@r", "ap_at_r"), ("r_precision", "r_precision"),
                           ("map@r_vptsp", "ap_vptsp")):  # fmt: skip
        out[metric] = float(t(column).double().mean())
    return out


def table(ranks, same: bool, query_index: torch.Tensor, query_labels: torch.Tensor) -> dict:
    """The per-query columns (numpy) of one evaluation; `ranks`: its PositiveRanks,
    `query_index` / `query_labels`: the dataset index and class of each ranked query."""
    values = per_query_from_ranks(ranks.num_positives, ranks.negatives_above, same)
    valid = values.pop("valid").cpu()
    out = {
        "index": query_index.cpu()[valid].long().numpy(),
        "label": query_labels.cpu()[valid].long().numpy(),
    }
    out.update({k: v.cpu().numpy() for k, v in values.items()})
    out["_lone_queries"] = int((~valid).sum())
    return out


def write(path: Path, columns: dict, meta: dict) -> Path:
    """One parquet file; `meta` (JSON) goes into the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: columns[k] for k in COLUMNS}
    extra = {k.lstrip("_"): v for k, v in columns.items() if k.startswith("_")}
    tbl = pa.table(data).replace_schema_metadata({"vpt_dml": json.dumps({**meta, **extra})})
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(tbl, tmp)
    tmp.replace(path)  # a reader never sees half a file
    return path


def read(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(columns, metadata) of a per-query file."""
    import pyarrow.parquet as pq

    try:
        tbl = pq.read_table(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable per-query file ({e}); rerun that run") from None
    missing = [c for c in COLUMNS if c not in tbl.column_names]
    if missing:
        raise UserError(f"{path} lacks columns {missing}; it was not written by vpt_dml")
    meta = json.loads((tbl.schema.metadata or {}).get(b"vpt_dml", b"{}"))
    return {c: tbl.column(c).to_numpy() for c in COLUMNS}, meta


def epoch_file(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / FOLDER / EPOCHS / f"epoch{epoch:04d}.parquet"


def finalize(run_dir: Path, best_epoch: int | None) -> dict[str, str]:
    """Keep the selected epoch's file as test_best.parquet and drop the per-epoch ones;
    returns {"final": path, "best": path} for the files that exist."""
    folder = Path(run_dir) / FOLDER
    if best_epoch is not None and epoch_file(run_dir, best_epoch).is_file():
        epoch_file(run_dir, best_epoch).replace(folder / "test_best.parquet")
    shutil.rmtree(folder / EPOCHS, ignore_errors=True)
    return {
        kind: str(folder / f"test_{kind}.parquet")
        for kind in ("final", "best")
        if (folder / f"test_{kind}.parquet").is_file()
    }


def save_evaluation(
    run_dir: Path, label: str, epoch: int, columns: dict, ks, held_out: bool
) -> Path | None:
    """Write one evaluation's table where it belongs: a test-split validation epoch
    (data.val_classes=0) to per_query/epochs/, the test stage to test_final (final weights)
    or, under data.val_classes>0 (the selected checkpoint is tested), to test_best."""
    meta = {"ks": list(ks), "max_rank_exact": max(ks), "epoch": epoch}
    if label == "val" and not held_out:
        return write(epoch_file(run_dir, epoch), columns, {**meta, "stage": "val"})
    if label == "test":
        name = "test_best.parquet" if held_out else "test_final.parquet"
        return write(Path(run_dir) / FOLDER / name, columns, {**meta, "stage": "test"})
    return None  # "before", or validation classes: not the test split
