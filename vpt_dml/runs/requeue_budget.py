"""Whether a SLURM allocation lets a run advance when it cannot resume mid-epoch exactly.

With DataLoader workers (or a batch sampler without `set_epoch`) an interruption keeps the
epoch-end checkpoint and the interrupted epoch is redone on resume: an allocation shorter
than start-up plus one epoch then never advances (each requeue redoes the same epoch). The
run says so as soon as it knows the epoch time: at the end of its first epoch, and at the
start of a requeued allocation from the epoch time its checkpoint recorded.
"""

from __future__ import annotations

import os
import subprocess
import sys

from vpt_dml.runs import cluster


def time_limit_s() -> float | None:
    """This SLURM job's time limit in seconds (squeue); None outside SLURM or unlimited."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or not cluster.in_slurm_job():
        return None
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%l"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not out or out.upper() in ("UNLIMITED", "NOT_SET", "INVALID"):
        return None
    days, _, rest = out.rpartition("-")
    parts = [int(p) for p in rest.split(":") if p.isdigit()]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts[-3:]
    return (int(days) if days.isdigit() else 0) * 86400 + h * 3600 + m * 60 + s


def warn_if_too_short(epoch_s: float, startup_s: float) -> str | None:
    """The warning line (also printed) when start-up plus one epoch exceed the limit."""
    limit = time_limit_s()
    if limit is None or startup_s + epoch_s < limit:
        return None
    line = (
        f"warning: start-up ({startup_s:.0f} s) plus one epoch ({epoch_s:.0f} s) exceed this "
        f"job's time limit ({limit:.0f} s), and with DataLoader workers an interrupted epoch "
        "is redone from its start: every requeue would redo the same epoch. Give a longer "
        "hydra.launcher.timeout_min, or data.num_workers=0 (exact mid-epoch resume)"
    )
    print(line, file=sys.stderr, flush=True)
    return line
