"""What a SLURM partition can give a job, read before anything is submitted.

`sbatch` accepts requests that can never run (more CPUs or memory than a node has: the job
pends forever with reason PartitionConfig) and refuses others with a message about GRES.
`check_request` compares the launcher's request with the partition (`scontrol show
partition`, `sinfo`) and answers in one line naming the knob to change; `gpus_for` decides
the GPU request from the accelerator that will actually run in the job.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from vpt_dml.errors import UserError

UNLIMITED = ("UNLIMITED", "INFINITE", "NONE", "")


@dataclass
class Partition:
    name: str
    state: str
    nodes: int  # nodes in the partition
    cpus: int  # CPUs of its largest node
    mem_mb: int  # memory of its largest node (MB)
    gpus: int  # GPUs (gres gpu) of its best-equipped node
    max_time_min: int | None  # None: no limit
    max_nodes: int | None
    max_cpus_per_node: int | None
    max_mem_per_node_mb: int | None


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _minutes(value: str) -> int | None:
    """SLURM time ([days-]hours:minutes:seconds, minutes, ...) in whole minutes."""
    if value.upper() in UNLIMITED:
        return None
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:  # minutes
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:  # minutes:seconds
        h, (m, s) = 0, parts
    else:
        h, m, s = parts[-3:]
    return (int(days) if days else 0) * 1440 + h * 60 + m + (1 if s else 0)


def _number(value: str | None) -> int | None:
    if value is None or value.upper() in UNLIMITED:
        return None
    digits = re.match(r"\d+", value)
    return int(digits.group()) if digits else None


def _gpus(gres: str) -> int:
    """GPUs in a GRES string like `gpu:a100:4(S:0-1),shard:8`; 0 for `(null)`."""
    total = 0
    for item in gres.split(","):
        fields = re.sub(r"\(.*?\)", "", item).split(":")
        if fields[0] == "gpu":
            total = max(total, int(fields[-1]) if fields[-1].isdigit() else 1)
    return total


def read_partition(name: str | None) -> Partition | None:
    """The partition jobs go to (the default one when `name` is None); None when SLURM's
    commands do not answer (then nothing is checked here, sbatch decides)."""
    text = _run(["scontrol", "-o", "show", "partition"] + ([name] if name else []))
    if text is None:
        return None
    fields = None
    for line in text.splitlines():
        kv = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if name or kv.get("Default") == "YES":
            fields = kv
            break
    if fields is None:
        return None
    part = fields["PartitionName"]
    nodes_text = _run(["sinfo", "-h", "-N", "-p", part, "-o", "%N|%c|%m|%G"]) or ""
    cpus = mem = gpus = 0
    names = set()
    for line in nodes_text.splitlines():
        node, c, m, g = (line.split("|") + ["", "", "", ""])[:4]
        names.add(node)
        cpus = max(cpus, _number(c) or 0)
        mem = max(mem, _number(m) or 0)
        gpus = max(gpus, _gpus(g))
    return Partition(
        name=part,
        state=fields.get("State", "UP"),
        nodes=_number(fields.get("TotalNodes")) or len(names),
        cpus=cpus,
        mem_mb=mem,
        gpus=gpus,
        max_time_min=_minutes(fields.get("MaxTime", "UNLIMITED")),
        max_nodes=_number(fields.get("MaxNodes")),
        max_cpus_per_node=_number(fields.get("MaxCPUsPerNode")),
        max_mem_per_node_mb=_number(fields.get("MaxMemPerNode")),
    )


def gpus_for(accelerator: str, devices: int, part: Partition | None) -> int | None:
    """GPUs per node for a job whose trainer runs on `accelerator`: `auto` asks for GPUs
    only where the partition has them (Lightning then picks the CPU, as the job will)."""
    acc = str(accelerator).lower()
    if acc == "cpu":
        return None
    if acc == "auto":
        return devices if part is None or part.gpus > 0 else None
    if part is not None and part.gpus == 0 and acc in ("gpu", "cuda"):
        raise UserError(
            f"trainer.accelerator={accelerator}, but partition {part.name} has no GPUs (no gpu "
            "GRES on its nodes): give hydra.launcher.partition=<a GPU partition>, or "
            "trainer.accelerator=cpu (hydra.launcher.gpus_per_node follows it)"
        )
    return devices


def check_request(p: dict, part: Partition) -> None:
    """The launcher's request (`p`: hydra.launcher, resolved) against the partition."""
    where = f"partition {part.name}"
    if part.state.upper() not in ("UP",):
        raise UserError(f"{where} is {part.state}: give another hydra.launcher.partition")
    tasks = int(p.get("tasks_per_node") or 1)
    cpus = int(p.get("cpus_per_task") or 1)
    node_cpus = min(c for c in (part.cpus, part.max_cpus_per_node) if c) if part.cpus else None
    if node_cpus and tasks * cpus > node_cpus:
        raise UserError(
            f"hydra.launcher.cpus_per_task={cpus} x tasks_per_node={tasks} asks {tasks * cpus} "
            f"CPUs per node, but a node of {where} has {node_cpus}: give "
            f"hydra.launcher.cpus_per_task={max(node_cpus // tasks, 1)} or less"
        )
    mem_gb = p.get("mem_gb")
    node_mem = [m for m in (part.mem_mb, part.max_mem_per_node_mb) if m]
    if mem_gb and node_mem and float(mem_gb) * 1024 > min(node_mem):
        raise UserError(
            f"hydra.launcher.mem_gb={mem_gb} is more than a node of {where} has "
            f"({min(node_mem) / 1024:.1f} GB): give hydra.launcher.mem_gb={int(min(node_mem) / 1024)} "
            "or less"
        )
    gpus = p.get("gpus_per_node")
    if gpus and int(gpus) > part.gpus:
        raise UserError(
            f"hydra.launcher.gpus_per_node={gpus} (from trainer.devices and trainer.accelerator) "
            f"is more than a node of {where} has ({part.gpus}): lower trainer.devices, give "
            "trainer.accelerator=cpu, or another hydra.launcher.partition"
        )
    nodes = int(p.get("nodes") or 1)
    most = min(n for n in (part.nodes, part.max_nodes) if n) if part.nodes else None
    if most and nodes > most:
        raise UserError(
            f"trainer.num_nodes={nodes} (hydra.launcher.nodes) is more than {where} allows "
            f"({most}): give trainer.num_nodes={most} or less"
        )
    limit = p.get("timeout_min")
    if limit and part.max_time_min is not None and int(limit) > part.max_time_min:
        raise UserError(
            f"hydra.launcher.timeout_min={limit} is longer than {where}'s time limit "
            f"({part.max_time_min} min): give hydra.launcher.timeout_min={part.max_time_min} "
            "or less (a run at its time limit requeues itself and resumes)"
        )
