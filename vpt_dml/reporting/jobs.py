"""Jobs of a sweep that left no final metrics: failed, unfinished, interrupted, diverged.

Sources, in this order:
- a submitit sweep folder's `.submitit/<job id>/`: `<id>_submitted.pkl` (the job's
  overrides and number), `<id>_0_result.pkl` (("success", hydra JobReturn) or ("error",
  traceback)), `<id>_0_log.err` / `_log.out`. Hydra's launcher catches the task's own
  exceptions, so a job that raised in the task has a "success" result holding a FAILED
  JobReturn; a task that exited (our `error:` line, exit 2) has no result, its line is in
  the log. Each job is matched to its run folder by its overrides (`.hydra/overrides.yaml`),
  else by `hydra.sweep.subdir`'s default, the job number.
- any run folder (config_resolved.yaml or .hydra/) without metrics.json;
- a metrics.json whose status is not "finished".
The pickles are the user's own sweep files, read as submitit itself reads them.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class Job:
    folder: Path | None  # the run folder, when one was made
    overrides: list[str]
    status: str  # "failed" | "unfinished" | "interrupted" | "diverged"
    note: str  # the job's last error line, or what is known


def _load(path: Path):
    try:
        with path.open("rb") as f:
            return pickle.load(f)
    except Exception:  # a half-written or foreign pickle: the logs still say something
        return None


def _last_error_line(*logs: Path) -> str | None:
    """The last line of the logs that reads as an error (our `error:` line, an exception)."""
    for log in logs:
        try:
            lines = [
                ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()
            ]
        except OSError:
            continue
        for line in reversed(lines):
            if (
                line.startswith("error:")
                or "Error" in line.split(":", 1)[0]
                or line.startswith("interrupted:")
            ):
                return line
    return None


def _folder_overrides(folder: Path) -> list[str] | None:
    try:
        return list(yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or [])
    except (OSError, yaml.YAMLError):
        return None


def submitit_jobs(sweep: Path) -> list[Job]:
    """One Job per submitit job under sweep/.submitit that did not finish cleanly."""
    root = sweep / ".submitit"
    folders = {
        tuple(o): f.parent.parent
        for f in sweep.glob("*/.hydra/overrides.yaml")
        if (o := _folder_overrides(f.parent.parent)) is not None
    }
    jobs = []
    for job_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "%j"):
        jid = job_dir.name
        submitted = _load(job_dir / f"{jid}_submitted.pkl")
        args = getattr(submitted, "args", None) or ()
        overrides = list(args[0]) if args else []
        folder = folders.get(tuple(overrides))
        if folder is None and len(args) > 2 and (sweep / str(args[2])).is_dir():
            folder = sweep / str(args[2])
        if folder is not None and (folder / "metrics.json").is_file():
            continue  # the run folder speaks for itself
        result = _load(job_dir / f"{jid}_0_result.pkl")
        logs = (job_dir / f"{jid}_0_log.err", job_dir / f"{jid}_0_log.out")
        status, note = "unfinished", None
        if isinstance(result, tuple) and len(result) == 2:
            kind, value = result
            if kind == "error":
                status = "failed"
                lines = [ln for ln in str(value).splitlines() if ln.strip()]
                note = lines[-1].strip() if lines else "error"
            elif getattr(getattr(value, "status", None), "name", "") == "FAILED":
                status = "failed"
                err = getattr(value, "_return_value", None)
                note = f"{type(err).__name__}: {err}" if err is not None else "failed"
            else:
                note = "the job returned but wrote no metrics.json"
        logged = _last_error_line(*logs)
        if status == "unfinished" and logged:
            status, note = "failed", logged
        if note is None:
            note = f"submitit job {jid}: no result yet (still running, or killed)"
        jobs.append(Job(folder, overrides, status, f"[job {jid}] {note}"))
    return jobs


def folder_job(folder: Path) -> Job:
    """A run folder without metrics.json."""
    note = _last_error_line(folder / "run.log")
    lock = " (run.lock left: running, or killed)" if (folder / "run.lock").exists() else ""
    return Job(
        folder,
        _folder_overrides(folder) or [],
        "failed" if note else "unfinished",
        note or f"no metrics.json{lock}",
    )


def status_job(metrics_file: Path, result: dict, overrides: list[str]) -> Job | None:
    """A metrics.json that is not a finished run's."""
    status = result.get("status", "finished")
    if status == "finished":
        return None
    why = {
        "interrupted": "stopped by SIGTERM; resume it with ckpt_path=.../last.ckpt",
        "diverged": "training diverged; its numbers mean nothing",
    }.get(status, f"status {status!r}")
    extra = "; ".join(result.get("warnings") or [])
    return Job(metrics_file.parent, overrides, status, why + (f" ({extra})" if extra else ""))


def unfinished_folders(dirs: list[Path]) -> list[Path]:
    """Run folders (config_resolved.yaml or .hydra/ inside) that hold no metrics.json."""
    out = set()
    for d in dirs:
        if not Path(d).is_dir():
            continue
        for marker in [*Path(d).rglob("config_resolved.yaml"), *Path(d).rglob(".hydra")]:
            folder = marker.parent
            if ".submitit" not in folder.parts and not (folder / "metrics.json").exists():
                out.add(folder)
    return sorted(out)


def all_jobs(dirs: list[Path]) -> list[Job]:
    """Failed / unfinished jobs under dirs (submitit's view first, then bare folders)."""
    jobs: list[Job] = []
    seen: set[Path] = set()
    for d in dirs:
        for sub in sorted(Path(d).rglob(".submitit")) if Path(d).is_dir() else []:
            for job in submitit_jobs(sub.parent):
                jobs.append(job)
                if job.folder is not None:
                    seen.add(job.folder.resolve())
    for folder in unfinished_folders(dirs):
        if folder.resolve() not in seen:
            jobs.append(folder_job(folder))
    return jobs
