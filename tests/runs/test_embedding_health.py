"""Issue 19 finding 4: a collapsed model is reported with its embedding health and a
warning (metrics.json and the summary), its status staying "finished"."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.conftest import compose_config, tiny_overrides
from vpt_dml.evaluation.health import collapsed, embedding_health
from vpt_dml.run import train


def test_health_of_constructed_embedding_sets():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(200, 16, generator=g)
    healthy = embedding_health(spread)
    assert healthy["distinct"] == 200 and healthy["effective_rank"] > 12
    assert collapsed(healthy) is None
    # one point, at different lengths: cosine ranking cannot tell the rows apart
    point = torch.rand(200, 1, generator=g) * torch.randn(1, 16, generator=g)
    h = embedding_health(point)
    assert h["distinct"] <= 2 and h["effective_rank"] == 0.0
    assert "distinct" in collapsed(h)
    # one point up to noise far below any meaningful difference: rows distinct, no spread
    unit = torch.nn.functional.normalize(torch.randn(1, 16, generator=g), dim=1)
    noisy = unit + 1e-5 * torch.randn(200, 16, generator=g)
    h = embedding_health(noisy)
    assert h["distinct"] > 100 and h["effective_rank"] == 0.0 and collapsed(h)
    # distinct rows, but spread along one short line (an arc, once normalised)
    t = torch.rand(200, 1, generator=g)
    a = torch.randn(1, 16, generator=g)
    line = a + t * 0.3 * torch.randn(1, 16, generator=g)
    h = embedding_health(line)
    assert h["distinct"] == 200 and h["effective_rank"] < 1.5 and "rank" in collapsed(h)


def test_collapsed_run_says_so_in_metrics_json_and_the_summary(tmp_path, capsys):
    # optim.lr=1e6: after one step every test embedding is the same point (issue 19)
    cfg = compose_config(tiny_overrides("optim.lr=1e6"), tmp_path)
    train(cfg)
    result = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert result["status"] == "finished"
    health = result["embedding_health"]
    rows = health["final"]["rows"]
    assert rows == 24 and health["final"]["distinct"] == 1
    # the untrained model was healthy: no warning for it
    assert health["before"]["distinct"] == rows and health["before"]["effective_rank"] > 3
    warnings = result["warnings"]
    assert any(w.startswith("final (test, epoch 0): the embeddings collapsed") for w in warnings)
    assert not any(w.startswith("before") for w in warnings)
    out = capsys.readouterr().out
    assert "WARNING: final (test, epoch 0): the embeddings collapsed" in " ".join(out.split())
