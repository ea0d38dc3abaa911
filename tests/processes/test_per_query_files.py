"""Per-query files written by a run through the command line equal metrics.json's numbers
(self-retrieval and In-Shop query/gallery)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, run_cli, tiny_overrides
from tests.fake_layouts import fake_inshop
from vpt_dml.evaluation import per_query


def finished(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def assert_files_equal_metrics(run: Path, best_epoch_expected: bool = True) -> None:
    result = finished(run)
    for kind in ("final", "best"):
        columns, meta = per_query.read(run / "per_query" / f"test_{kind}.parquet")
        want = {k: v for k, v in result[kind]["metrics"].items() if k not in ("nmi", "f1")}
        got = per_query.means(columns, meta["ks"])
        assert got == want, kind  # every metric, exactly
    assert result["per_query"] == {
        "final": str(run / "per_query" / "test_final.parquet"),
        "best": str(run / "per_query" / "test_best.parquet"),
    }
    assert not (run / "per_query" / "epochs").exists()
    proto = result["protocol"]
    from vpt_dml.evaluation.protocol import stamp_of

    assert proto["stamp"] == stamp_of(proto) and len(proto["split_sha256"]) == 64


@pytest.mark.slow
def test_run_writes_per_query_files_equal_to_metrics_json_self_retrieval(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = tiny_overrides("trainer.max_epochs=2", "eval_before_training=false")
    proc = run_cli([*args, f"hydra.run.dir={run}", f"paths.data_dir={tmp_path / 'data'}"], REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_files_equal_metrics(run)


@pytest.mark.slow
def test_run_writes_per_query_files_equal_to_metrics_json_inshop(tmp_path: Path) -> None:
    root = fake_inshop(tmp_path / "inshop")
    run = tmp_path / "run"
    args = tiny_overrides(
        "data=inshop", f"data.root={root}", "data.strict_counts=false", "data.batch_size=4",
        "trainer.max_epochs=2", "eval_before_training=false",
    )  # fmt: skip
    args = [a for a in args if not a.startswith("data.synthetic.")]
    proc = run_cli([*args, f"hydra.run.dir={run}"], REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_files_equal_metrics(run)
    columns, _ = per_query.read(run / "per_query" / "test_final.parquet")
    # 4 query images of 2 test items; the gallery-only item is never a query
    assert sorted(columns["index"].tolist()) == [0, 1, 2, 3]
    assert np.array_equal(columns["positives"], np.ones(4))
