"""+hparams_search=optuna through `python -m vpt_dml.run -m +experiment=demo
+hparams_search=optuna`: a tiny 2-trial search, rerun for 1 more trial: one study of 3,
each trial's value the validation Recall@1 of its run folder, best_trial.yaml beside the
study; a diverging trial is recorded as failed and the search goes on; a rerun with other
fixed settings is refused before it adds a trial; a search without validation classes is
refused before any trial."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli, tiny_overrides
from omegaconf import OmegaConf

from tests.unit.test_optuna_search import HELD_OUT, VALIDATION
from vpt_dml.runs.search import BEST_FILE

optuna = pytest.importorskip("optuna")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")


@pytest.mark.slow
def test_a_search_without_validation_classes_is_refused_before_any_trial(tmp_path: Path):
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    done = run_cli([*_args(tmp_path, 2), "data.val_classes=0"], cwd=tmp_path, env=env)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(lines) == 1 and "data.val_classes>0" in lines[0]
    assert not list((tmp_path / "search").glob("*/metrics.json"))
    assert not (tmp_path / "search" / "study.db").exists()


def _args(tmp_path: Path, trials: int) -> list[str]:
    tiny = [o for o in tiny_overrides(*HELD_OUT) if not o.startswith(("logger=", "data="))]
    return [
        "-m",
        "+experiment=demo",
        "+hparams_search=optuna",
        *tiny,
        "eval_before_training=false",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={tmp_path / 'search'}",
        f"hydra.sweeper.n_trials={trials}",
        "model.peft.prompts.depth=choice(1,2)",  # the tiny ViT has 2 blocks
    ]


@pytest.mark.slow
def test_tiny_search_continues_its_study(tmp_path: Path):
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    for trials in (2, 1):  # a study of 2, continued for 1 more
        done = run_cli(_args(tmp_path, trials), cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    search = tmp_path / "search"
    storage = f"sqlite:///{search}/study.db"
    study = optuna.load_study(study_name="vptsp_g", storage=storage)
    trials = study.trials
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    best_before = study.best_trial.number

    # other fixed settings would rank unlike runs in one study: refused before any trial
    done = run_cli([*_args(tmp_path, 1), "optim.weight_decay=0.1"], cwd=tmp_path, env=env)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(lines) == 1 and "optim.weight_decay" in lines[0]
    assert len(optuna.load_study(study_name="vptsp_g", storage=storage).trials) == 3

    # a diverging trial is a failed trial: recorded as such, the search goes on
    diverging = "optim.lr=tag(log, interval(1e19, 1e20))"  # a range: no fixed setting changes
    done = run_cli([*_args(tmp_path, 1), diverging], cwd=tmp_path, env=env)
    # an in-process sweep names its failed jobs and exits with the first one's code (3)
    assert done.returncode == 3 and "diverged:" in done.stderr, done.stderr[-3000:]
    study = optuna.load_study(study_name="vptsp_g", storage=storage)
    assert [t.state for t in study.trials][3:] == [optuna.trial.TrialState.FAIL]
    assert study.best_trial.number == best_before

    # two dated runs of job folders; each trial's value is its folder's validation R@1
    folders = sorted(p.parent for p in search.glob("*/metrics.json"))
    records = [json.loads((f / "metrics.json").read_text()) for f in folders]
    assert [r["status"] for r in records].count("diverged") == 1
    folders = [f for f, r in zip(folders, records) if r["status"] != "diverged"]
    records = [r for r in records if r["status"] != "diverged"]
    assert len(folders) == 3 and len({f.name.rsplit("_job", 1)[0] for f in folders}) == 2
    assert all(r["status"] == "finished" and r["final"]["split"] == VALIDATION for r in records)
    assert sorted(t.value for t in trials) == sorted(
        r["final"]["metrics"]["recall@1"] for r in records
    )

    best = OmegaConf.to_container(OmegaConf.load(search / BEST_FILE))
    assert best["trials_complete"] == 3 and best["trials_total"] == 4
    assert best["best"]["value"] == study.best_value
    assert best["best"]["trial"] == study.best_trial.number
    folder = json.loads((Path(best["best"]["folder"]) / "metrics.json").read_text())
    assert folder["final"]["metrics"]["recall@1"] == study.best_value
    for key, value in study.best_params.items():
        assert f"{key}={value}" in best["overrides"]
    assert "data.val_classes=0.25" in best["overrides"]
    assert not any("hparams_search=optuna" in o for o in best["overrides"])
    assert best["rerun_with_seeds"].endswith("+hparams_search=seeds")
