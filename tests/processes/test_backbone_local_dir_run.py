"""`model.backbone.name=local-dir:/path` (issue 33) through the command line: a run on a
folder timm wrote records the folder's preprocessing in metrics.json (the folder itself:
tests/unit/test_backbone_local_dir.py)."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import REPO, run_cli

from tests.unit.test_backbone_local_dir import MEAN, STD, local_overrides, timm_folder


@pytest.mark.slow
def test_local_dir_run_records_the_folders_preprocessing_in_metrics_json(tmp_path):
    folder, _ = timm_folder(tmp_path)
    run_dir = tmp_path / "run"
    res = run_cli(
        [
            *local_overrides(folder, "eval_before_training=false"),
            "+trainer.limit_train_batches=1",
            f"hydra.run.dir={run_dir}",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["status"] == "finished"
    backbone = result["provenance"]["backbone"]
    pre = backbone["built"]["preprocessing"]
    assert (pre["mean"], pre["std"]) == (list(MEAN), list(STD))
    assert pre["config_sha256"] == hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    weights = str((folder / "model.safetensors").resolve())
    assert backbone["weights_file"]["file"] == weights
    assert (backbone["weights"], backbone["pretrained"]) == (weights, True)  # not "random init"
