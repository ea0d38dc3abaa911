"""The library behind `python -m vpt_dml.compare RUN_A RUN_B`: is A better than B on the same test queries?
(the command itself, its arguments and messages: vpt_dml/compare.py).

Each metric's difference A - B (in points), its 95% paired bootstrap interval resampling
classes, and the paired permutation p-value (class-level sign flips), from the runs'
per-query files (`per_query/test_best.parquet`, or `--which final`). Refused in one line
when the runs were evaluated on different splits or query sets. When RUN_A and RUN_B are
sweep folders holding the same seeds, the seed-level paired interval (per-seed
differences, Student t) is shown as well. Method: vpt_dml/evaluation/paired.py.
"""

from __future__ import annotations

import math
from pathlib import Path

from vpt_dml.errors import UserError
from vpt_dml.evaluation import paired, per_query
from vpt_dml.evaluation.protocol import FIELDS
from vpt_dml.runs.record import METRICS_JSON, RecordUnreadable, Status, has_record, read_record


def _runs(folder: Path) -> list[Path]:
    if not folder.exists():
        raise UserError(f"{folder} does not exist; give a run folder written by vpt_dml.run")
    found = [folder] if has_record(folder) else []
    found = found or sorted(f.parent for f in folder.rglob(METRICS_JSON))
    if not found:
        raise UserError(f"no metrics.json under {folder}; did the run finish?")
    return found


def _result(run: Path) -> dict:
    try:
        result = read_record(run)
    except RecordUnreadable as e:
        raise UserError(f"{e.path} is not valid JSON ({e.detail}); rerun that run") from None
    if result is None:
        raise UserError(f"no metrics.json in {run}; did the run finish?")
    if result["status"] != Status.FINISHED:
        raise UserError(f"{run} is {result.get('status')}, not finished: its numbers are not final")
    return result


def _split_hash(result: dict) -> str | None:
    return (result.get("protocol") or {}).get("split_sha256") or (
        (result.get("provenance") or {}).get("dataset") or {}
    ).get("split_sha256")


def check_same_split(ra: dict, rb: dict, a: Path, b: Path) -> list[str]:
    """Refuse different split hashes; return notes on other protocol differences."""
    ha, hb = _split_hash(ra), _split_hash(rb)
    if ha and hb and ha != hb:
        raise UserError(
            f"{a} and {b} were evaluated on different test splits (split hash {ha[:12]} vs "
            f"{hb[:12]}): compare runs of one dataset split"
        )
    pa, pb = ra.get("protocol") or {}, rb.get("protocol") or {}
    if pa and pb and pa.get("stamp") != pb.get("stamp"):
        fields = [f for f in paired_fields() if pa.get(f) != pb.get(f)]
        return [
            f"note: protocols differ in {', '.join(fields)} (stamps {pa.get('stamp')} vs {pb.get('stamp')})"
        ]
    return []


def paired_fields() -> tuple[str, ...]:
    return FIELDS


def _table(run: Path, which: str) -> tuple[dict, dict]:
    path = run / per_query.FOLDER / f"test_{which}.parquet"
    if not path.is_file():
        raise UserError(
            f"{run} has no {per_query.FOLDER}/test_{which}.parquet (run before per-query files, "
            f"eval.per_query=false, or a held-out run: try --which best); rerun it"
        )
    return per_query.read(path)


def _measured_ks(meta: dict) -> list[int]:
    """The Recall@K cut-offs a per-query file measured exactly (its `ks`, none past its
    `max_rank_exact`: a deeper first-positive rank only says "deeper than that")."""
    ks = [int(k) for k in meta.get("ks") or [1]]
    deepest = int(meta.get("max_rank_exact") or max(ks))
    return [k for k in ks if k <= deepest]


def common_ks(ma: dict, mb: dict) -> tuple[list[int], list[str]]:
    """The cut-offs both runs measured, and one note line naming those only one measured
    (comparing those would read the other run's deeper ranks as if they were exact)."""
    ka, kb = _measured_ks(ma), _measured_ks(mb)
    ks = sorted(set(ka) & set(kb))
    only = [f"recall@{k} ({'A' if k in ka else 'B'} only)" for k in sorted(set(ka) ^ set(kb))]
    notes = [f"note: not compared, measured by one run only: {', '.join(only)}"] if only else []
    return ks, notes


def _pts(x: float) -> str:
    return "" if math.isnan(x) else f"{100 * x:+.2f}"


def compare_runs(a: Path, b: Path, which: str, resamples: int, seed: int) -> list[str]:
    ra, rb = _result(a), _result(b)
    notes = check_same_split(ra, rb, a, b)
    (ta, ma), (tb, mb) = _table(a, which), _table(b, which)
    ks, dropped = common_ks(ma, mb)
    notes += dropped
    results = paired.compare_tables(ta, tb, ks, resamples, seed)
    some = next(iter(results.values()))
    if some.classes < paired.MIN_CLASSES:
        notes.append(
            f"warning: only {some.classes} classes: a class bootstrap needs about "
            f"{paired.MIN_CLASSES} or more, so the interval is unreliable (and p cannot go "
            f"below {paired.smallest_p(some.classes):.3g}); compare on a split with more classes"
        )
    lines = [
        f"A = {a}", f"B = {b}",
        f"{which} epoch, {len(ta['index'])} queries in {some.classes} classes; "
        f"95% paired bootstrap over classes ({resamples} draws), permutation p "
        f"({'exact' if some.p_exact else f'{resamples} sign flips'}) over classes",
        "| metric | A | B | A - B | 95% CI | p |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for m, r in results.items():
        lines.append(
            f"| {m} | {100 * r.a:.2f} | {100 * r.b:.2f} | {_pts(r.diff)} | "
            f"[{_pts(r.low)}, {_pts(r.high)}] | {r.p:.4g} |"
        )
    return notes + lines


def _by_seed(runs: list[Path], which: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for run in runs:
        result = _result(run)
        seed = (result.get("provenance") or {}).get("seed")
        if seed is None:
            raise UserError(f"{run} has no seed recorded (seed=null): it cannot be paired by seed")
        if seed in out:
            raise UserError(f"seed {seed} appears twice ({out[seed]['path']} and {run}); keep one")
        out[seed] = {"path": run, "metrics": (result.get(which) or {}).get("metrics") or {}}
    return out


def compare_seeds(a_runs: list[Path], b_runs: list[Path], which: str) -> list[str]:
    sa, sb = _by_seed(a_runs, which), _by_seed(b_runs, which)
    first = (sa.get(min(sa)) or {})["path"], (sb.get(min(sb)) or {})["path"]
    check_same_split(_result(first[0]), _result(first[1]), *first)
    metrics = [
        m
        for m in sa[min(sa)]["metrics"]
        if all(m in s["metrics"] for s in [*sa.values(), *sb.values()])
    ]
    lines = [f"seed-level ({which}): seeds {sorted(sa)}; A - B per seed, Student-t 95% interval",
             "| metric | A - B | 95% CI | n |", "|---|---|---|---|"]  # fmt: skip
    for m in metrics:
        mean, low, high, n = paired.seed_level(
            {s: v["metrics"][m] for s, v in sa.items()}, {s: v["metrics"][m] for s, v in sb.items()}
        )
        lines.append(f"| {m} | {_pts(mean)} | [{_pts(low)}, {_pts(high)}] | {n} |")
    return lines
