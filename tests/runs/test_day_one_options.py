"""Options a new user tries on day one (issue 19, findings 10 and 11): each ends in a
working run or one `error:` line naming the key and the fix, never a traceback or a
silently different run."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_in_process, compose_config, tiny_overrides
from omegaconf import open_dict

from vpt_dml.errors import UserError
from vpt_dml.run import train


def tiny(tmp_path: Path, *extra: str):
    cfg = compose_config(tiny_overrides(*extra), tmp_path)
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path.parent / "data")  # one generated dataset for all
    return cfg


def result_of(cfg) -> dict:
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


@pytest.mark.parametrize("option", ["logger=none", "callbacks=none", "seed=null"])
def test_option_runs(tmp_path: Path, option: str):
    cfg = tiny(tmp_path, option)
    metrics = train(cfg)
    result = result_of(cfg)
    assert result["status"] == "finished"
    assert 0 <= metrics["recall@1"] <= 1
    out = Path(cfg.paths.output_dir)
    if option == "logger=none":
        assert not (out / "csv").exists()
    if option == "callbacks=none":
        assert not (out / "checkpoints").exists() and not (out / "images").exists()
    if option == "seed=null":
        # a drawn seed, the same in every record, so the run can be repeated
        seed = result["provenance"]["seed"]
        assert isinstance(seed, int)
        saved = yaml.safe_load((out / "config_resolved.yaml").read_text())
        assert saved["seed"] == saved["data"]["seed"] == seed


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ("data.batch_size=0", "data.batch_size=0 must be a positive integer"),
        ("data.samples_per_class=0", "data.samples_per_class=0 must be a positive integer"),
        ("optim.lr=-1", "optim.lr=-1 is negative"),
        ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 is negative"),
        # 0 used to mean "no head" silently; null is the one spelling of that
        ("model.embed_dim=0", "model.embed_dim=null for no head"),
    ],
)
def test_value_no_run_can_use_is_one_line(tmp_path: Path, option: str, words: str):
    with pytest.raises(UserError) as err:
        train(tiny(tmp_path, option))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_no_head_is_spelled_null(tmp_path: Path):
    cfg = tiny(tmp_path, "model.embed_dim=null")
    train(cfg)
    assert result_of(cfg)["status"] == "finished"


def test_resume_with_fewer_epochs_than_done_is_refused(tmp_path: Path):
    first = tiny(tmp_path / "a", "trainer.max_epochs=2", "eval_before_training=false")
    train(first)
    ckpt = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match=r"holds 2 completed epoch\(s\) but trainer\.max_epochs=1"):
        train(tiny(tmp_path / "b", "trainer.max_epochs=1", f"ckpt_path={ckpt}"))
    # the same number re-runs the final test only (e.g. after a SIGTERM during it)
    again = tiny(tmp_path / "c", "trainer.max_epochs=2", f"ckpt_path={ckpt}")
    train(again)
    assert (
        result_of(again)["provenance"]["global_step"]
        == result_of(first)["provenance"]["global_step"]
    )


def test_fast_dev_run_is_marked_a_smoke_test(tmp_path: Path):
    cfg = tiny(tmp_path, "trainer.fast_dev_run=true")
    train(cfg)
    result = result_of(cfg)
    assert result["status"] == "smoke test"
    assert any("fast_dev_run" in w for w in result["warnings"])


# -- the command line, before Hydra parses it (subprocesses) --------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("option", "words"),
    [
        ("callbacks=null", "callbacks=none runs without the optional callbacks"),
        ("logger=null", "logger=none runs without loggers"),
        ("hydra.run.dir={tmp}/über", "quote the value for Hydra inside the shell's quotes"),
    ],
)
def test_command_line_hydra_would_answer_with_a_traceback_is_one_line(
    tmp_path: Path, option: str, words: str
):
    res = cli_in_process([*tiny_overrides(), option.format(tmp=tmp_path)], cwd=REPO)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    if "über" in option:  # the fix it shows is a command line that works
        fix = errors[0].rsplit(": ", 1)[-1]
        assert shlex.split(fix) == [f"hydra.run.dir='{tmp_path}/über'"]
