"""Exact resume: 1 epoch + resume from last.ckpt to 2 epochs == 2 epochs straight (CPU);
a resume in the run's own folder appends to its CSV history. Both read the session's one
straight/resumed pair (conftest.resume_pair: the resume is in its own folder)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from tolerances import EXACT


def ckpt_of(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def test_resume_equals_straight_run(resume_pair: dict) -> None:
    straight, resumed = resume_pair["metrics"]["straight"], resume_pair["metrics"]["resumed"]
    straight_ckpt, resumed_ckpt = ckpt_of(resume_pair["straight"]), ckpt_of(resume_pair["resumed"])
    first_ckpt = ckpt_of(resume_pair["first"])
    assert resumed_ckpt["epoch"] == straight_ckpt["epoch"] == 1
    assert resumed_ckpt["global_step"] == straight_ckpt["global_step"]
    # the memory H moved during epoch 2, and identically in both runs
    memory = "proxies.memory"
    assert not torch.equal(first_ckpt["state_dict"][memory], straight_ckpt["state_dict"][memory])
    for key, value in straight_ckpt["state_dict"].items():
        torch.testing.assert_close(resumed_ckpt["state_dict"][key], value, **EXACT, msg=key)
    for a, b in zip(straight_ckpt["optimizer_states"], resumed_ckpt["optimizer_states"]):
        for pid, state in a["state"].items():
            for name, t in state.items():
                torch.testing.assert_close(b["state"][pid][name], t, **EXACT)
    assert straight_ckpt["lr_schedulers"] == resumed_ckpt["lr_schedulers"]
    assert straight.keys() == resumed.keys()
    assert resumed == straight  # bit equality: the same computation on the same machine


def csv_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_resume_in_its_own_folder_appends_the_csv_history(resume_pair: dict) -> None:
    first, after = csv_rows(resume_pair["first"]), csv_rows(resume_pair["resumed"])

    def trained_epochs(rows: list[dict]) -> list[str]:
        return [r["epoch"] for r in rows if r.get("train/loss_epoch")]

    assert trained_epochs(first) == ["0"]
    step = ckpt_of(resume_pair["first"])["global_step"]
    # every row up to the checkpoint is still there, in order and with its values; the
    # first run's final test (logged after its checkpoint) is replaced by the resumed one's
    kept = [r for r in first if int(r["step"]) < step]
    assert len(kept) < len(first) and len(after) > len(kept)
    for old, new in zip(kept, after):
        assert {k: v for k, v in new.items() if k in old} == old
    assert trained_epochs(after) == ["0", "1"]
    assert [r["epoch"] for r in after if r.get("test/recall@1")] == ["2"]
