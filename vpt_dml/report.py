"""`python -m vpt_dml.report DIR...`: one table (Markdown + CSV) and a plot of many runs.

Every `metrics.json` under the given folders (single runs or whole sweeps) is read. Runs
whose resolved configs (config_resolved.yaml) differ only in `seed` and paths form one
group (reporting/grouping.py); each seed counts once: a second run of a seed already in
the group (a copy, a rerun) is listed as a `duplicate` row and not averaged. Each metric
is shown as the mean, standard deviation and 95% confidence interval (Student t, n-1
degrees of freedom) over the group's n seeds; a group of one run is shown as it is, with
n=1. Jobs without final metrics (failed, unfinished, interrupted, diverged; a submitit
sweep's `.submitit/` jobs included, with their last error line) are rows of their own
(reporting/jobs.py). Runs of different protocol stamps (vpt_dml/evaluation/protocol.py) are refused
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
import sys
from pathlib import Path

from vpt_dml.errors import UserError
from vpt_dml.reporting.table import write_report


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
