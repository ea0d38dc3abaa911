"""A SLURM partition's limits against the launcher's request, without a cluster: the
parsing of scontrol/sinfo fields and the one-line refusals naming the knob."""

from __future__ import annotations

import pytest

from vpt_dml.errors import UserError
from vpt_dml.runs.slurm_limits import Partition, _gpus, _minutes, check_request, gpus_for


def part(**kw) -> Partition:
    base = dict(name="p", state="UP", nodes=2, cpus=16, mem_mb=64000, gpus=0,
                max_time_min=None, max_nodes=None, max_cpus_per_node=None,
                max_mem_per_node_mb=None)  # fmt: skip
    return Partition(**{**base, **kw})


def test_slurm_fields_parse() -> None:
    assert _minutes("UNLIMITED") is None
    assert _minutes("2-00:00:00") == 2880
    assert _minutes("1:30:00") == 90
    assert _minutes("45") == 45
    assert _minutes("00:30") == 1  # minutes:seconds, rounded up
    assert _gpus("(null)") == 0
    assert _gpus("gpu:a100:4(S:0-1),shard:8") == 4
    assert _gpus("gpu:2") == 2


def test_gpus_follow_the_accelerator_that_will_run() -> None:
    cpu_only, with_gpus = part(gpus=0), part(gpus=4)
    assert gpus_for("auto", 2, cpu_only) is None  # Lightning will pick the CPU there
    assert gpus_for("auto", 2, with_gpus) == 2
    assert gpus_for("cpu", 2, with_gpus) is None
    assert gpus_for("auto", 2, None) == 2  # no SLURM answer: as asked
    with pytest.raises(UserError, match=r"trainer.accelerator=gpu.*no GPUs.*gpus_per_node"):
        gpus_for("gpu", 1, cpu_only)


@pytest.mark.parametrize(
    ("request_", "partition", "knob"),
    [
        ({"cpus_per_task": 8, "tasks_per_node": 4}, {}, "hydra.launcher.cpus_per_task=4 or less"),
        ({"mem_gb": 128}, {}, "hydra.launcher.mem_gb=62 or less"),
        ({"mem_gb": 32}, {"max_mem_per_node_mb": 16000}, "hydra.launcher.mem_gb=15 or less"),
        ({"gpus_per_node": 2}, {"gpus": 1}, "hydra.launcher.gpus_per_node=2"),
        ({"nodes": 3}, {}, "trainer.num_nodes=2 or less"),
        ({"timeout_min": 1440}, {"max_time_min": 60}, "hydra.launcher.timeout_min=60 or less"),
        ({}, {"state": "DOWN"}, "partition p is DOWN"),
    ],
)
def test_a_request_the_partition_cannot_meet_is_refused_naming_the_knob(
    request_, partition, knob
) -> None:
    with pytest.raises(UserError) as e:
        check_request(request_, part(**partition))
    assert knob in str(e.value) and "\n" not in str(e.value)


def test_a_request_that_fits_passes() -> None:
    check_request(
        {"cpus_per_task": 4, "tasks_per_node": 4, "mem_gb": 60, "nodes": 2, "timeout_min": 60},
        part(max_time_min=60),
    )
