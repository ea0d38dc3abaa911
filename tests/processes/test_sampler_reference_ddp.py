"""data.sampler=reference (issue 32) under DDP: the ranks train on their turns of the
reference implementation's batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose_config, run_cli
from test_ddp import ddp_overrides, free_port

from vpt_dml.data.reference_sampler import ReferenceBatchSampler
from vpt_dml.train import build_datamodule


@pytest.mark.both_cores
@pytest.mark.slow
def test_ddp_ranks_train_on_their_turns_of_the_reference_batches(tmp_path: Path):
    """2 gloo processes, k=1: 4 of 8 classes a rank, so classes meet across ranks; the
    store's per-row step counts say which classes each step trained, on any rank."""
    run_dir, state_dir = tmp_path / "run", tmp_path / "rank_state"
    overrides = ddp_overrides(tmp_path, 1, 0.0) + ["data.sampler=reference", "seed=3"]
    args = overrides + [
        "trainer=ddp_cpu",
        f"hydra.run.dir={run_dir}",
        "+callbacks.save_rank_state._target_=vpt_dml.runs.callbacks.rank_state.SaveRankState",
        f"+callbacks.save_rank_state.dirpath={state_dir}",
    ]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = run_cli(args, cwd=REPO, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]

    r0, r1 = torch.load(state_dir / "rank0.pt"), torch.load(state_dir / "rank1.pt")
    assert r0["memory"].numpy().tobytes() == r1["memory"].numpy().tobytes()
    for a, b in zip(r0["store"], r1["store"]):
        assert (
            a.contiguous().view(torch.uint8).numpy().tobytes()
            == b.contiguous().view(torch.uint8).numpy().tobytes()
        )
    # what the sampler hands each rank: the one-device epoch's batches in turn
    cfg = compose_config(overrides, tmp_path)
    labels = build_datamodule(cfg).load().train.labels
    batches = ReferenceBatchSampler(labels, 4, 1, seed=3).epoch_batches(0)
    steps = [batches[i : i + 2] for i in range(0, len(batches), 2)]
    want = np.zeros(labels.max() + 1, dtype=np.int64)
    for step in steps:
        want[np.unique(labels[np.concatenate(step)])] += 1
    assert any(len(set(labels[a]) & set(labels[b])) for a, b in steps)  # classes meet
    assert r0["store"][-1].long().tolist() == want.tolist()
