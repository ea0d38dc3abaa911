"""The runs behind a report (`python -m vpt_dml.report`, whose docstring says what the
report shows): every metrics.json found (read through runs/record.py), grouped by resolved
config with one row per seed, failed and unfinished jobs beside them, the columns.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from vpt_dml.errors import UserError
from vpt_dml.evaluation.protocol import differing_fields
from vpt_dml.reporting import grouping, jobs
from vpt_dml.reporting.jobs import Job
from vpt_dml.runs.record import RecordUnreadable, read_record

PROMPT_NUM = "model.peft.prompts.num"
PROMPT_DEPTH = "model.peft.prompts.depth"
SEED = "seed"
# metrics.json "cost" keys: (column, decimals)
COST = {
    "train_images_per_s": ("train img/s", 1),
    "train_epoch_s": ("s/epoch", 1),
    "eval_s": ("s/eval", 1),
    "peak_memory_mib": ("peak MiB", 0),
    "trainable_params": ("trainable params", 0),
}
CONFIDENCE = 0.95


def natural_key(text: str) -> list:
    """Sort key that orders the numbers inside a string as numbers: run2 < run10."""
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)
    ]


def find_runs(dirs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for d in dirs:
        d = Path(d)
        if d.is_file() and d.name == "metrics.json":
            files.append(d)
        elif d.is_dir():
            files.extend(d.rglob("metrics.json"))
        else:
            raise UserError(f"{d} does not exist; give run or sweep folders written by vpt_dml.run")
    return sorted(set(files), key=lambda f: natural_key(str(f)))


parse_overrides = grouping.parse_overrides


@dataclass
class Run:
    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float]
    before: dict[str, float]
    cost: dict[str, float]
    tuned_pct: float | None
    training_only_pct: float | None
    key: tuple = ()
    seed: object = None
    protocol: dict = field(default_factory=dict)

    @property
    def stamp(self) -> str:
        return self.protocol.get("stamp") or "none"


def _numbers(d: dict | None, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in (d or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key.removeprefix(prefix)] = float(value)
    return out


def read_run(f: Path) -> Run:
    try:
        result = read_record(f) or {}
    except RecordUnreadable as e:
        raise UserError(
            f"{f} is not valid JSON ({e.detail}); delete it or rerun that job"
        ) from None
    prov = result.get("provenance", {})
    params = prov.get("parameters") or {}
    # the inference-time share is the paper's "tuned %"; older runs only have "all"
    tuned = (params.get("inference") or params.get("all") or {}).get("tuned_pct")
    before = result.get("before")
    if isinstance(before, dict) and isinstance(before.get("metrics"), dict):
        before = before["metrics"]  # metrics.json: {"split": ..., "metrics": {...}}
    before = _numbers(before, "before/")
    metrics = _numbers(result.get("metrics"))
    if before:  # the zero-shot row replaces the flat "<metric>_before" entries
        metrics = {k: v for k, v in metrics.items() if not k.endswith("_before")}
    overrides = parse_overrides(prov.get("overrides") or [])
    return Run(
        path=f.parent,
        overrides={k: grouping.shown(v) for k, v in overrides.items()},
        key=(*grouping.config_key(f.parent, overrides), ("data", grouping.data_location(result))),
        seed=grouping.seed_of(f.parent, prov),
        protocol=result.get("protocol") or {},
        metrics=metrics,
        before=before,
        cost=_numbers(result.get("cost")),
        tuned_pct=tuned,
        training_only_pct=(params.get("training_only") or {}).get("tuned_pct"),
    )


@dataclass
class Stat:
    """Mean, sample standard deviation and the Student-t interval of n values."""

    values: list[float]
    mean: float = field(init=False)
    std: float | None = field(init=False)
    low: float | None = field(init=False)
    high: float | None = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.values)
        self.mean = sum(self.values) / n
        if n < 2:
            self.std = self.low = self.high = None
            return
        from scipy.stats import t

        self.std = math.sqrt(sum((v - self.mean) ** 2 for v in self.values) / (n - 1))
        half = float(t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * self.std / math.sqrt(n)
        self.low, self.high = self.mean - half, self.mean + half

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass
class Group:
    """Runs that differ only in their seed."""

    runs: list[Run]

    @property
    def overrides(self) -> dict[str, str]:
        return {k: v for k, v in self.runs[0].overrides.items() if k != SEED}

    @property
    def label(self) -> str:
        if len(self.runs) == 1:
            return str(self.runs[0].path)
        parents = {r.path.parent for r in self.runs}
        if len(parents) == 1:
            return f"{parents.pop()}/{{{','.join(r.path.name for r in self.runs)}}}"
        return f"{self.runs[0].path} (+{len(self.runs) - 1} more)"

    def stats(self, kind: str) -> dict[str, Stat]:
        """Per metric, over the runs that have it; kind: "final" or "before"."""
        values: dict[str, list[float]] = {}
        for run in self.runs:
            for key, value in (run.metrics if kind == "final" else run.before).items():
                values.setdefault(key, []).append(value)
        return {k: Stat(v) for k, v in values.items()}

    def mean_of(self, attr: str, key: str | None = None) -> float | None:
        values = [getattr(r, attr) if key is None else getattr(r, attr).get(key) for r in self.runs]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None


def group_runs(runs: list[Run], by_stamp: bool) -> tuple[list[Group], list[tuple[Run, Run]]]:
    """Groups of one resolved config (and stamp); each seed once: (groups, duplicates as
    (run, the run of that seed already counted)). seed=null runs are all distinct."""
    groups: dict[tuple, Group] = {}
    seeds: dict[tuple, dict] = {}
    duplicates = []
    for run in runs:
        key = (run.key, run.stamp if by_stamp else None)
        counted = seeds.setdefault(key, {})
        if run.seed is not None and run.seed in counted:
            duplicates.append((run, counted[run.seed]))
            continue
        if run.seed is not None:
            counted[run.seed] = run
        groups.setdefault(key, Group([])).runs.append(run)
    return list(groups.values()), duplicates  # first-run order: the runs come naturally sorted


def check_protocols(runs: list[Run], mixed: bool) -> bool:
    """True when the table needs a protocol column; refuses mixed stamps unless `mixed`."""
    stamps = sorted({r.stamp for r in runs})
    if len(stamps) < 2:
        return False
    if not mixed:
        fields = differing_fields([r.protocol for r in runs if r.protocol]) or ["stamp"]
        raise UserError(
            f"the runs were measured under {len(stamps)} protocols (stamps "
            f"{', '.join(stamps)}; they differ in {', '.join(fields)}): their numbers are not "
            "comparable in one table; report them separately or pass --mixed-protocols"
        )
    return True


@dataclass
class Collected:
    groups: list[Group]
    duplicates: list[tuple[Run, Run]]
    jobs: list[Job]
    override_cols: list[str]
    metric_cols: list[str]
    cost_cols: list[str]
    protocol_col: bool


def collect(files: list[Path], dirs: list[Path], mixed: bool = False) -> Collected:
    """Groups, duplicates, failed / unfinished jobs and the table's columns."""
    runs, stopped = [], []
    for f in files:
        run = read_run(f)
        job = jobs.status_job(
            f, read_record(f) or {}, [f"{k}={v}" for k, v in run.overrides.items()]
        )
        (stopped if job else runs).append(job or run)
    failed = jobs.all_jobs(dirs) + stopped
    if not runs:
        if failed:
            raise UserError(
                f"no finished run under the folders ({len(failed)} job(s) failed or did not "
                f"finish, e.g. {failed[0].folder or 'a submitit job'}: {failed[0].note})"
            )
        raise UserError(f"no metrics.json under {', '.join(map(str, dirs))}; did the runs finish?")
    protocol_col = check_protocols(runs, mixed)
    groups, duplicates = group_runs(runs, protocol_col)
    keys: list[str] = []
    for g in groups:
        keys += [k for k in g.overrides if k not in keys]
    varying = [k for k in keys if len({g.overrides.get(k) for g in groups}) > 1]
    override_cols = varying if len(groups) > 1 else keys
    metric_cols: list[str] = []
    for run in runs:
        for key in [*run.metrics, *run.before]:
            if key not in metric_cols:
                metric_cols.append(key)
    cost_cols = [k for k in COST if any(k in r.cost for r in runs)]
    return Collected(
        groups, duplicates, failed, override_cols, metric_cols, cost_cols, protocol_col
    )
