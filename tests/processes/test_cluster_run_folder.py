"""The run folder name every process of a torchrun / SLURM job agrees on: the stamp read
from the job's environment (the launcher's composition: tests/unit/test_cluster.py)."""

from __future__ import annotations

import pytest

from vpt_dml.runs import cluster


@pytest.mark.both_cores
def test_every_process_of_a_job_names_the_same_run_folder() -> None:
    # SLURM: the job id, kept by a requeued job; an array task has its own folder
    assert cluster.run_stamp({"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "x"}) == "slurm-77"
    array = {"SLURM_JOB_ID": "80", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}
    assert cluster.run_stamp({**array, "SLURM_JOB_NAME": "x"}) == "slurm-77_3"
    # an interactive allocation is not a batch job: the time of day as usual
    assert cluster.run_stamp({"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "bash"}) is None
    # torchrun: the rendezvous id when there is one, else torchrun's own start time
    elastic = {"TORCHELASTIC_RUN_ID": "none", "LOCAL_RANK": "1"}
    assert cluster.run_stamp({**elastic, "TORCHELASTIC_RUN_ID": "exp7"}) == "torchrun-exp7"
    start = 1_700_000_000.0
    from datetime import datetime

    assert cluster.run_stamp(elastic, parent_start=start) == datetime.fromtimestamp(start).strftime(
        "%Y-%m-%d_%H-%M-%S"
    )
    assert cluster.run_stamp({}) is None
