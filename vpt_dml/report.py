"""`python -m vpt_dml.report DIR...`: one table (Markdown + CSV) and a plot of many runs.

Every `metrics.json` under the given folders (single runs or whole sweeps) is read. Runs
whose resolved configs (config_resolved.yaml) differ only in `seed` and paths form one
group (reporting/grouping.py); each seed counts once: a second run of a seed already in
the group (a copy, a rerun) is listed as a `duplicate` row and not averaged. Each metric
is shown as the mean, standard deviation and 95% confidence interval (Student t, n-1
degrees of freedom) over the group's n seeds; a group of one run is shown as it is, with
n=1. Jobs without final metrics (failed, unfinished, interrupted, diverged; a submitit
sweep's `.submitit/` jobs included, with their last error line) are rows of their own
(reporting/jobs.py). Runs of different protocol stamps (vpt_dml/protocol.py) are refused
in one table unless `--mixed-protocols`, which adds the stamp column. With per-query
files, `report_worst.md` lists each run's lowest-Recall@1 classes; with trainable
parameters recorded, `report_frontier.png` plots the cost-accuracy frontier. Columns: the
overrides that differ between groups, the row kind (`final`: the run's `metrics`;
`before`: the evaluation before training, when the runs recorded it), n, the metrics (in
%), the cost of a run where recorded (training images/s, seconds per epoch and per
evaluation, peak memory, trainable parameters) and the tuned parameters as % of the
backbone. Rows follow the run folders in natural order (2 before 10).

The plot shows Recall@1 against the prompt count for a prompt-length sweep (one line per
depth), else against the first numeric override that varies, else one bar per group;
groups of several seeds carry their 95% interval as error bars.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vpt_dml.errors import UserError
from vpt_dml.reporting import grouping, jobs
from vpt_dml.reporting.jobs import Job

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
        result = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{f} is not valid JSON ({e.msg}); delete it or rerun that job") from None
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
        from vpt_dml.protocol import differing_fields

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
            f, jobs.read_json(f) or {}, [f"{k}={v}" for k, v in run.overrides.items()]
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


@dataclass
class Row:
    group: Group
    kind: str  # "final" | "before"
    stats: dict[str, Stat]


def rows_of(groups: list[Group]) -> list[Row]:
    rows = []
    for g in groups:
        rows.append(Row(g, "final", g.stats("final")))
        before = g.stats("before")
        if before:
            rows.append(Row(g, "before", before))
    return rows


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _cost(row: Row, key: str) -> str:
    if row.kind != "final":
        return ""
    value = row.group.mean_of("cost", key)
    return "" if value is None else f"{value:.{COST[key][1]}f}"


def _tuned(row: Row, attr: str) -> str:
    value = row.group.mean_of(attr)
    return "" if value is None else f"{value:.3f}"


def _n(row: Row) -> str:
    return str(max((s.n for s in row.stats.values()), default=len(row.group.runs)))


def table(c: Collected, markdown_cells: bool) -> list[list[str]]:
    """Header plus one line per row. Markdown: `mean ± std [low, high]` in one cell; CSV:
    the mean in the metric's column, then `<metric> std`, `... ci95 low`, `... ci95 high`
    columns when any group has several seeds. Metrics in %, as in the paper's tables.
    Duplicate runs and jobs without final metrics follow, their `note` saying why."""
    rows, override_cols, metric_cols, cost_cols = (
        rows_of(c.groups),
        c.override_cols,
        c.metric_cols,
        c.cost_cols,
    )
    spread = any(s.n > 1 for r in rows for s in r.stats.values())
    split = spread and not markdown_cells
    training_only = any(run.training_only_pct for row in rows for run in row.group.runs)
    header = ["run", *override_cols, *(["protocol"] if c.protocol_col else []), "eval", "n"]
    for m in metric_cols:
        header += [m] + ([f"{m} std", f"{m} ci95 low", f"{m} ci95 high"] if split else [])
    header += [COST[k][0] for k in cost_cols]
    header += (["training-only %"] if training_only else []) + ["tuned %"]
    lines = [header]
    for row in rows:
        cells = [row.group.label, *(row.group.overrides.get(k, "") for k in override_cols)]
        cells += [row.group.runs[0].stamp] if c.protocol_col else []
        cells += [row.kind, _n(row)]
        for m in metric_cols:
            s = row.stats.get(m)
            if s is None:
                cells += [""] * (4 if split else 1)
            elif split:
                cells += [_pct(s.mean), _pct(s.std), _pct(s.low), _pct(s.high)]
            elif s.n > 1:
                cells.append(f"{_pct(s.mean)} ± {_pct(s.std)} [{_pct(s.low)}, {_pct(s.high)}]")
            else:
                cells.append(_pct(s.mean))
        cells += [_cost(row, k) for k in cost_cols]
        if training_only:
            cells.append(_tuned(row, "training_only_pct"))
        cells.append(_tuned(row, "tuned_pct"))
        lines.append(cells)
    extra = [
        (str(run.path), run.overrides, run.stamp, "duplicate",
         f"seed {run.seed} again (counted: {first.path}); not averaged")
        for run, first in c.duplicates
    ] + [
        (str(j.folder or "(no run folder)"), grouping_overrides(j.overrides), "", j.status, j.note)
        for j in c.jobs
    ]  # fmt: skip
    if extra:
        header.append("note")
        for line in lines[1:]:
            line.append("")
        for path, overrides, stamp, kind, note in extra:
            cells = [path, *(overrides.get(k, "") for k in override_cols)]
            cells += [stamp] if c.protocol_col else []
            lines.append(cells + [kind, ""] + [""] * (len(header) - len(cells) - 3) + [note])
    return lines


def grouping_overrides(items: list[str]) -> dict[str, str]:
    return {k: grouping.shown(v) for k, v in parse_overrides(items).items()}


def markdown(lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    return "\n".join(out) + "\n"


def as_number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


LABEL_CHARS = 32  # plot labels wrap at this width (a long override must not leave the figure)


def wrapped(text: str, width: int = LABEL_CHARS) -> str:
    """`text` on lines of at most `width` characters, broken after `,` or at spaces where it
    can, else mid-word (an override's value often has neither)."""
    import textwrap

    spaced = text.replace(",", ", ")
    lines = textwrap.wrap(spaced, width, break_long_words=True, break_on_hyphens=False)
    return "\n".join(line.replace(", ", ",") for line in lines) or text


def plot(
    groups: list[Group], override_cols: list[str], out: Path, metric: str = "recall@1"
) -> None:
    import matplotlib.pyplot as plt

    fig = figure(groups, override_cols, metric)
    fig.savefig(out, dpi=120, bbox_inches="tight")  # and nothing past the edge is cut
    plt.close(fig)


def figure(groups: list[Group], override_cols: list[str], metric: str = "recall@1"):
    """The report's plot as a matplotlib Figure, laid out so every label lies inside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(g, s) for g in groups if (s := g.stats("final").get(metric)) is not None]
    numeric = [
        k
        for k in override_cols
        if all(as_number(g.overrides.get(k)) is not None for g, _ in points)
    ]
    x_key = PROMPT_NUM if PROMPT_NUM in numeric else (numeric[0] if numeric else None)

    def err(s: Stat) -> tuple[float, float]:
        return (0.0, 0.0) if s.low is None else (100 * (s.mean - s.low), 100 * (s.high - s.mean))

    fig, ax = plt.subplots(figsize=(6, 4))
    if x_key is None:
        labels = [
            wrapped(",".join(f"{k}={g.overrides.get(k, '')}" for k in override_cols) or g.label)
            for g, _ in points
        ]
        # room below the bars for the tallest label (7 pt lines, rotated 30 degrees)
        rows = max((label.count("\n") + 1 for label in labels), default=1)
        fig.set_size_inches(max(6, 0.5 * len(points) + 2), 4 + 0.12 * rows)
        errors = [err(s) for _, s in points]
        ax.bar(
            range(len(points)),
            [100 * s.mean for _, s in points],
            yerr=[[e[0] for e in errors], [e[1] for e in errors]],
            capsize=3,
        )
        ax.set_xticks(range(len(points)), labels, rotation=30, ha="right", fontsize=7)
    else:
        group_key = next((k for k in override_cols if k != x_key), None)
        lines: dict[str, list[tuple[float, Stat]]] = {}
        for g, s in points:
            label = wrapped(f"{group_key}={g.overrides.get(group_key)}") if group_key else metric
            lines.setdefault(label, []).append((as_number(g.overrides[x_key]), s))
        for label in sorted(lines, key=natural_key):
            line = sorted(lines[label], key=lambda p: p[0])
            errors = [err(s) for _, s in line]
            ax.errorbar(
                [x for x, _ in line],
                [100 * s.mean for _, s in line],
                yerr=[[e[0] for e in errors], [e[1] for e in errors]],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set_xlabel(wrapped("prompt count N" if x_key == PROMPT_NUM else x_key, 60))
        # beside the axes, not over the lines: a long label widens the figure, never clipped
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    seeds = max((s.n for _, s in points), default=1)
    ax.set_ylabel(f"{metric} (%)" + (",\nmean and 95% CI over seeds" if seeds > 1 else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_report(
    dirs: list[Path], out: Path, mixed: bool = False, worst: int = 5
) -> dict[str, Path]:
    c = collect(find_runs(dirs), dirs, mixed)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {
        "md": out.with_suffix(".md"),
        "csv": out.with_suffix(".csv"),
        "png": out.with_suffix(".png"),
    }
    paths["md"].write_text(markdown(table(c, True)))
    with paths["csv"].open("w", newline="") as f:
        csv.writer(f).writerows(table(c, False))
    plot(c.groups, c.override_cols, paths["png"])
    from vpt_dml.reporting import frontier, worst_classes

    if frontier.plot_frontier(c.groups, c.override_cols, out.with_name(out.name + "_frontier.png")):
        paths["frontier"] = out.with_name(out.name + "_frontier.png")
    text = worst_classes.section([r for g in c.groups for r in g.runs], worst)
    if text:
        paths["worst"] = out.with_name(out.name + "_worst.md")
        paths["worst"].write_text(text)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vpt_dml.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "dirs", nargs="+", type=Path, help="run folders, sweep folders or metrics.json files"
    )
    parser.add_argument(
        "--out", type=Path, help="output path without suffix (default: FIRST_DIR/report)"
    )
    parser.add_argument(
        "--mixed-protocols",
        action="store_true",
        help="allow runs of different protocol stamps in one table (adds the stamp column)",
    )
    parser.add_argument(
        "--worst", type=int, default=5, help="lowest-Recall@1 classes listed per run (0: none)"
    )
    args = parser.parse_args(argv)
    out = args.out or (args.dirs[0] if args.dirs[0].is_dir() else args.dirs[0].parent) / "report"
    try:
        paths = write_report(args.dirs, out, args.mixed_protocols, args.worst)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(paths["md"].read_text(), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
