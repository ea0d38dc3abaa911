"""Per-query files: one row per counted query, from the ranks the metrics use; their means
are metrics.json's numbers to the last bit (self-retrieval and In-Shop query/gallery)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_cli, tiny_overrides
from tests.fake_layouts import fake_inshop
from vpt_dml.evaluation import per_query
from vpt_dml.evaluation.retrieval import retrieval_metrics

KS = (1, 2, 4, 8)


def awkward_embeddings(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Poorly separated embeddings with exact duplicates (ties) and a singleton class."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, 6, generator=g)
    emb[5] = emb[3]  # an exact tie
    labels = torch.randint(0, 7, (n,), generator=g)
    labels[-1] = 99  # a lone query: counted in no metric
    return emb, labels


@pytest.mark.parametrize("gallery", [False, True], ids=["self-retrieval", "query-gallery"])
def test_means_of_the_table_are_the_metrics_bit_for_bit(gallery: bool) -> None:
    emb, labels = awkward_embeddings(97, seed=4)
    kwargs = {}
    if gallery:
        g_emb, g_labels = awkward_embeddings(131, seed=5)
        g_labels[-1] = 98  # the query class 99 has no gallery image
        kwargs = {"gallery_embeddings": g_emb, "gallery_labels": g_labels}
    ranks: list = []
    metrics = retrieval_metrics(emb, labels, KS, keep_ranks=ranks, **kwargs)
    tbl = per_query.table(*ranks[0], torch.arange(len(labels)), labels)
    assert tbl["_lone_queries"] >= 1 and 99 not in tbl["label"]
    means = per_query.means(tbl, KS)
    assert set(means) == set(metrics)
    for key, value in metrics.items():
        assert means[key] == value, key  # exact, not approx


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


def test_worst_gallery_picks_the_deepest_first_positives() -> None:
    from vpt_dml.errors import UserError
    from vpt_dml.runs.callbacks.dashboard import Dashboard, worst_queries

    cols = {"index": np.array([10, 11, 12, 13, 14]), "first_positive_rank": np.array([1, 7, 3, 7, 2]),
            "ap_at_r": np.array([1.0, 0.2, 0.4, 0.1, 0.5])}  # fmt: skip
    # rank 7 twice: the lower AP first; then rank 3
    assert worst_queries(cols, 3).tolist() == [13, 11, 12]
    with pytest.raises(UserError, match="gallery"):
        Dashboard(gallery="worse")
