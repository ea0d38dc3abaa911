"""A resume continues the same run (issue 19, findings 1 and 11): a changed setting is
refused naming the keys and both values, a change listed in resume_overrides is applied
and recorded, an old checkpoint without a stored config warns once; the resumed run's CSV
history equals a straight run's (no second `before` row, no partial rows)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_config, tiny_overrides
from omegaconf import open_dict

from vpt_dml.errors import UserError
from vpt_dml.run import Interrupted, train


def run_in(root: Path, folder: str, *extra: str, data: Path | None = None):
    cfg = compose_config(tiny_overrides(*extra), root)
    with open_dict(cfg):
        cfg.paths.data_dir = str(data or root.parent / "data")
        cfg.paths.output_dir = str(root / folder)
        cfg.hydra.runtime.output_dir = cfg.paths.output_dir
    return cfg


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The run folder of a finished 1-epoch tiny run (lr 0.003 in the optimizer state)."""
    root = tmp_path_factory.mktemp("resume_config")
    cfg = run_in(root, "run", "trainer.max_epochs=1", data=root / "data")
    train(cfg)
    return Path(cfg.paths.output_dir)


def last(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        # the optimizer state's lr used to win silently while 0.1 was recorded
        ("optim.lr=0.1", "optim.lr=0.1 here but 0.003 in the checkpoint"),
        ("seed=1", "seed=1 here but 0 in the checkpoint"),
        ("data.batch_size=4", "data.batch_size=4 here but 8 in the checkpoint"),
        ("loss=proxy_nca", "loss._target_=vpt_dml.losses.ProxyNCALoss here but"),
        ("model.proxy.bias_ratio=0.25", "model.proxy.bias_ratio=0.25 here but"),
    ],
)
def test_changed_setting_on_resume_is_refused_before_anything_runs(
    finished: Path, override: str, shown: str
):
    before = (finished / "config_resolved.yaml").read_text(), last(finished).stat().st_mtime_ns
    cfg = run_in(
        finished.parent, "run", "trainer.max_epochs=2", override, f"ckpt_path={last(finished)}",
        data=finished.parent / "data",
    )  # fmt: skip
    with pytest.raises(UserError) as err:
        train(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert shown in message, message
    assert "resume_overrides" in message
    # the refused command left the run as it was: its recorded config and checkpoint
    after = (finished / "config_resolved.yaml").read_text(), last(finished).stat().st_mtime_ns
    assert after == before


def test_resume_overrides_cannot_name_a_key_the_checkpoint_overrides(finished: Path, tmp_path):
    cfg = run_in(
        tmp_path, "other", "trainer.max_epochs=2", "optim.lr=0.1", "resume_overrides=[optim.lr]",
        f"ckpt_path={last(finished)}", data=finished.parent / "data",
    )  # fmt: skip
    with pytest.raises(UserError, match=r"optim\.lr cannot change on resume.*optimizer"):
        train(cfg)
    cfg = run_in(
        tmp_path, "other", "trainer.max_epochs=2", "resume_overrides=[data.batch_sizes]",
        f"ckpt_path={last(finished)}", data=finished.parent / "data",
    )  # fmt: skip
    with pytest.raises(UserError, match=r"resume_overrides names data\.batch_sizes"):
        train(cfg)


def test_allowed_change_is_applied_and_recorded_with_its_epoch(finished: Path, tmp_path):
    first_steps = torch.load(last(finished), weights_only=True)["global_step"]
    cfg = run_in(
        tmp_path, "resumed", "trainer.max_epochs=2", "data.batch_size=4",
        "resume_overrides=[data.batch_size]", f"ckpt_path={last(finished)}",
        data=finished.parent / "data",
    )  # fmt: skip
    train(cfg)
    out = Path(cfg.paths.output_dir)
    result = json.loads((out / "metrics.json").read_text())
    changed = [
        {"key": "data.batch_size", "from": 8, "to": 4, "at_epoch": 1},
        {"key": "trainer.max_epochs", "from": 1, "to": 2, "at_epoch": 1},
    ]
    assert result["resume"] == {"from": str(last(finished)), "changed": changed}
    ckpt = torch.load(last(out), weights_only=True)
    # applied: the second epoch ran twice as many (half-size) batches as the first
    assert ckpt["global_step"] == 3 * first_steps
    # the next resume compares with the new value and still knows what changed when
    run = ckpt["callbacks"]["ExactResume"]["run"]
    assert run["config"]["data"]["batch_size"] == 4 and run["changed"] == changed


def test_checkpoint_without_a_stored_config_warns_once_and_resumes(
    finished: Path, tmp_path, capsys
):
    ckpt = torch.load(last(finished), weights_only=True)
    del ckpt["callbacks"]["ExactResume"]["run"]["config"]  # as written before configs were stored
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    cfg = run_in(
        tmp_path,
        "resumed",
        "trainer.max_epochs=2",
        f"ckpt_path={old}",
        data=finished.parent / "data",
    )
    train(cfg)
    err = capsys.readouterr().err
    assert err.count("stores no run config") == 1, err
    result = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert result["status"] == "finished"
    assert any("stores no run config" in w for w in result["warnings"])
    assert result["resume"]["from"] == str(old)


# -- the CSV history of a resumed run (finding 11) -----------------------------------------
class SigtermAfter(L.Callback):
    """SIGTERM to this process after batch `batch` of epoch `epoch` (as a scheduler sends it)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


def csv_shape(run_dir: Path) -> list[tuple]:
    """(epoch, step, the logged keys) per row; cost/ values are timings, so left out."""
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        (
            r["epoch"],
            r["step"],
            tuple(sorted(k for k, v in r.items() if v and k not in ("epoch", "step"))),
        )
        for r in rows
    ]


def test_resumed_csv_equals_a_straight_runs_without_repeated_or_partial_rows(
    tmp_path: Path, resume_pair: dict
):
    # the straight run: the session's (these settings, on the same generated data)
    target = f"{SigtermAfter.__module__}.SigtermAfter"
    cut = run_in(
        tmp_path, "cut", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
        f"+callbacks.sigterm={{_target_: {target}, epoch: 1, batch: 1}}",
    )  # fmt: skip
    with pytest.raises(Interrupted):
        train(cut)
    cut_dir = Path(cut.paths.output_dir)
    partial = csv_shape(cut_dir)
    # the interrupted epoch logged rows (steps 3, 4) that its redo logs again
    assert any(step in ("3", "4") for _, step, _ in partial), partial
    resumed = run_in(
        tmp_path, "cut", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
        f"ckpt_path={last(cut_dir)}",
    )  # fmt: skip
    train(resumed)
    straight_dir = resume_pair["straight"]
    want, got = csv_shape(straight_dir), csv_shape(cut_dir)
    assert got == want
    assert sum(any(k.startswith("before/") for k in keys) for *_, keys in got) == 1
    # the evaluation before training is the original run's, kept from the checkpoint
    a = json.loads((straight_dir / "metrics.json").read_text())
    b = json.loads((cut_dir / "metrics.json").read_text())
    assert b["before"] == a["before"] and b["before"] is not None
    for key, value in a["metrics"].items():
        assert abs(b["metrics"][key] - value) <= 1e-6, key


def test_old_rows_after_the_checkpoint_are_dropped_even_without_sigterm(finished: Path, tmp_path):
    """Resuming a finished run from an earlier checkpoint: its later rows (the final test)
    are gone, the earlier ones kept with their values."""
    run_dir = tmp_path / "copy"
    shutil.copytree(finished, run_dir)
    (run_dir / "run.lock").unlink(missing_ok=True)
    before = csv_shape(run_dir)
    steps = torch.load(last(run_dir), weights_only=True)["global_step"]
    tests = [r for r in before if any(k.startswith("test/") for k in r[2])]
    assert tests and all(int(s) >= steps for _, s, _ in tests)
    from vpt_dml.runs.resume import trim_csv_history

    dropped = trim_csv_history(run_dir / "csv" / "metrics.csv", steps)
    after = csv_shape(run_dir)
    assert dropped == len(before) - len(after) >= 1
    assert after == [r for r in before if int(r[1]) < steps or re.search("before/", str(r[2]))]
