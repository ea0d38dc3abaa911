"""`python -m vpt_dml.compare RUN_A RUN_B`: is A better than B on the same test queries?

Each metric's difference A - B (in points), its 95% paired bootstrap interval resampling
classes, and the paired permutation p-value (class-level sign flips), from the runs'
per-query files (`per_query/test_best.parquet`, or `--which final`). Refused in one line
when the runs were evaluated on different splits or query sets. When RUN_A and RUN_B are
sweep folders holding the same seeds, the seed-level paired interval (per-seed
differences, Student t) is shown as well. Method: vpt_dml/evaluation/paired.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vpt_dml.errors import UserError
from vpt_dml.evaluation import paired
from vpt_dml.reporting.compare import _runs, compare_runs, compare_seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vpt_dml.compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_a", type=Path, help="run folder (or sweep folder of seeds)")
    parser.add_argument(
        "run_b", type=Path, help="the baseline: run folder (or sweep folder of seeds)"
    )
    parser.add_argument("--which", choices=("best", "final"), default="best",
                        help="the selected epoch (default) or the final weights")  # fmt: skip
    parser.add_argument("--resamples", type=int, default=paired.RESAMPLES)
    parser.add_argument("--seed", type=int, default=0, help="of the bootstrap draws")
    args = parser.parse_args(argv)
    try:
        if args.resamples < 100:
            raise UserError(
                f"--resamples {args.resamples} is too few for a 95% interval; use >= 1000"
            )
        a_runs, b_runs = _runs(args.run_a), _runs(args.run_b)
        if len(a_runs) == 1 and len(b_runs) == 1:
            lines = compare_runs(a_runs[0], b_runs[0], args.which, args.resamples, args.seed)
        else:
            lines = compare_seeds(a_runs, b_runs, args.which)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
