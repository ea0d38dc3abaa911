"""The report's table (Markdown and CSV cells) and the files it writes."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from vpt_dml.reporting import frontier, grouping, worst_classes
from vpt_dml.reporting.plots import plot
from vpt_dml.reporting.runs import COST, Collected, Group, Stat, collect, find_runs, parse_overrides


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
    if frontier.plot_frontier(c.groups, c.override_cols, out.with_name(out.name + "_frontier.png")):
        paths["frontier"] = out.with_name(out.name + "_frontier.png")
    text = worst_classes.section([r for g in c.groups for r in g.runs], worst)
    if text:
        paths["worst"] = out.with_name(out.name + "_worst.md")
        paths["worst"].write_text(text)
    return paths
