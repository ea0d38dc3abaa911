"""An in-process sweep (`-m` with Hydra's own launcher): a failed job is recorded, the next
one runs.

Hydra's basic launcher runs the jobs one after another in this process; an exit code is
the whole sweep's, so a failed job (bad input, diverged, a crash) is noted here and
`vpt_dml.run` says so, one line per job, when the sweep is over.
"""

from __future__ import annotations

import sys

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode

from vpt_dml.runs.cluster import launcher_kind


class _FailedJobs:
    lines: list[str] = []
    codes: list[int] = []


_failed = _FailedJobs()


def in_process_sweep() -> bool:
    """`-m` with Hydra's own launcher: every job runs inside this process."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    return launcher_kind(HydraConfig.get()) is None


def _swept(argv: list[str], task: list[str]) -> list[str]:
    """The job's values of the keys the command line sweeps (all of its overrides when the
    command line cannot be read)."""
    try:
        parsed = OverridesParser.create().parse_overrides(
            [a for a in argv if not a.startswith("-")]
        )
        keys = {o.key_or_group for o in parsed if o.is_sweep_override()}
    except Exception:  # noqa: BLE001 - the line is still useful with every override
        return list(task)
    return [t for t in task if t.split("=", 1)[0].lstrip("+~") in keys] or list(task)


def record_failed_job(code: int, why: str) -> None:
    """This job of an in-process sweep failed with exit code `code` for reason `why`."""
    hc = HydraConfig.get()
    shown = " ".join(_swept(sys.argv[1:], list(hc.overrides.task)))
    _failed.lines.append(
        f"failed: job {hc.job.num} ({shown}) in {hc.runtime.output_dir}: {why} (exit {code})"
    )
    _failed.codes.append(code)


def report_failed_jobs() -> int | None:
    """After the sweep: one line per failed job on stderr; the exit code of the first
    failed job, None when none failed."""
    if not _failed.lines:
        return None
    for line in _failed.lines:
        print(line, file=sys.stderr)
    n = len(_failed.lines)
    print(
        f"sweep: {n} job(s) failed, the others ran; rerun the same command (same "
        "hydra.sweep.dir) after a fix: finished jobs are skipped",
        file=sys.stderr,
    )
    code = _failed.codes[0]
    _failed.lines, _failed.codes = [], []
    return code


def job_failed(code: int, why: str) -> None:
    """The run failed (its line already printed): exit with `code`; in a sweep run inside
    this process the job is recorded instead and the next job runs (`report_failed_jobs`
    names it when the sweep is over)."""
    if in_process_sweep():
        record_failed_job(code, why)
        return None
    sys.exit(code)
