"""`python -m vpt_dml.report DIR...`: one table (Markdown + CSV) and a plot of many runs.

Every `metrics.json` under the given folders (single runs or whole sweeps) becomes a row:
the overrides that differ between runs as columns, then the metrics, then the tuned
parameters as % of the backbone. The plot shows Recall@1 against the prompt count for a
prompt-length sweep (one line per depth), else against the first numeric override that
varies, else one bar per run.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from vpt_dml.errors import UserError

PROMPT_NUM = "model.peft.prompts.num"
PROMPT_DEPTH = "model.peft.prompts.depth"


def find_runs(dirs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for d in dirs:
        d = Path(d)
        if d.is_file() and d.name == "metrics.json":
            files.append(d)
        elif d.is_dir():
            files.extend(sorted(d.rglob("metrics.json")))
        else:
            raise UserError(f"{d} does not exist; give run or sweep folders written by vpt_dml.run")
    if not files:
        raise UserError(f"no metrics.json under {', '.join(map(str, dirs))}; did the runs finish?")
    return files


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def collect(files: list[Path]) -> tuple[list[dict], list[str], list[str]]:
    """Rows plus the override columns (those that vary) and the metric columns."""
    rows = []
    for f in files:
        try:
            result = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise UserError(
                f"{f} is not valid JSON ({e.msg}); delete it or rerun that job"
            ) from None
        prov = result.get("provenance", {})
        params = (prov.get("parameters") or {}).get("all") or {}
        rows.append(
            {
                "run": str(f.parent),
                "overrides": parse_overrides(prov.get("overrides") or []),
                "metrics": result.get("metrics", {}),
                "tuned_pct": params.get("tuned_pct"),
            }
        )
    keys = []
    for row in rows:
        keys += [k for k in row["overrides"] if k not in keys]
    varying = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]
    override_cols = varying if len(rows) > 1 else keys
    metric_cols: list[str] = []
    for row in rows:
        metric_cols += [k for k in row["metrics"] if k not in metric_cols]
    return rows, override_cols, metric_cols


def table(rows: list[dict], override_cols: list[str], metric_cols: list[str]) -> list[list[str]]:
    """Header plus one line per run; metrics in %, as in the paper's tables."""
    header = ["run", *override_cols, *metric_cols, "tuned %"]
    lines = [header]
    for row in rows:
        metrics = [
            f"{100 * row['metrics'][m]:.2f}" if m in row["metrics"] else "" for m in metric_cols
        ]
        tuned = "" if row["tuned_pct"] is None else f"{row['tuned_pct']:.3f}"
        lines.append(
            [row["run"], *(row["overrides"].get(k, "") for k in override_cols), *metrics, tuned]
        )
    return lines


def markdown(lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    return "\n".join(out) + "\n"


def as_number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def plot(rows: list[dict], override_cols: list[str], out: Path, metric: str = "recall@1") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if metric in r["metrics"]]
    numeric = [
        k for k in override_cols if all(as_number(r["overrides"].get(k)) is not None for r in rows)
    ]
    x_key = PROMPT_NUM if PROMPT_NUM in numeric else (numeric[0] if numeric else None)
    fig, ax = plt.subplots(figsize=(6, 4))
    if x_key is None:
        labels = [
            ",".join(f"{k}={r['overrides'].get(k, '')}" for k in override_cols) or r["run"]
            for r in rows
        ]
        ax.bar(range(len(rows)), [100 * r["metrics"][metric] for r in rows])
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
    else:
        group_key = next((k for k in override_cols if k != x_key), None)
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            label = f"{group_key}={r['overrides'].get(group_key)}" if group_key else metric
            groups.setdefault(label, []).append(
                (as_number(r["overrides"][x_key]), 100 * r["metrics"][metric])
            )
        for label, points in sorted(groups.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xlabel("prompt count N" if x_key == PROMPT_NUM else x_key)
        ax.legend(fontsize=7)
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_report(dirs: list[Path], out: Path) -> dict[str, Path]:
    rows, override_cols, metric_cols = collect(find_runs(dirs))
    lines = table(rows, override_cols, metric_cols)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {
        "md": out.with_suffix(".md"),
        "csv": out.with_suffix(".csv"),
        "png": out.with_suffix(".png"),
    }
    paths["md"].write_text(markdown(lines))
    with paths["csv"].open("w", newline="") as f:
        csv.writer(f).writerows(lines)
    plot(rows, override_cols, paths["png"])
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
    args = parser.parse_args(argv)
    out = args.out or (args.dirs[0] if args.dirs[0].is_dir() else args.dirs[0].parent) / "report"
    try:
        paths = write_report(args.dirs, out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(paths["md"].read_text(), end="")
    print(f"wrote {paths['md']}, {paths['csv']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
