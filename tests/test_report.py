"""vpt_dml.report: metrics.json files of a sweep -> Markdown/CSV table + PNG plot."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tests.conftest import REPO, run_cli, tiny_overrides
from vpt_dml.report import main


def fake_run(
    folder: Path,
    overrides: list[str],
    recall1: float,
    tuned_pct: float,
    before: dict | None = None,
    cost: dict | None = None,
) -> None:
    folder.mkdir(parents=True)
    result = {
        "metrics": {"recall@1": recall1, "recall@2": recall1 + 0.1},
        "provenance": {"overrides": overrides, "parameters": {"all": {"tuned_pct": tuned_pct}}},
    }
    if before is not None:  # as vpt_dml.results writes it
        result["before"] = {"split": "test", "metrics": before}
    if cost is not None:
        result["cost"] = cost
    (folder / "metrics.json").write_text(json.dumps(result))


def test_interrupted_runs_are_rows_of_their_own_not_averaged(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    fake_run(sweep / "0", ["seed=0"], 0.5, 1.0)
    fake_run(sweep / "1", ["seed=1"], 0.7, 1.0)
    stopped = json.loads((sweep / "1" / "metrics.json").read_text())
    (sweep / "1" / "metrics.json").write_text(json.dumps({**stopped, "status": "interrupted"}))
    assert main([str(sweep)]) == 0
    _, rows = read_csv(sweep / "report.csv")
    assert [(r["eval"], r["n"], r["recall@1"]) for r in rows] == [
        ("final", "1", "50.00"),
        ("interrupted", "", ""),
    ]
    assert "ckpt_path=" in rows[1]["note"]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    rows = list(csv.reader(path.open()))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def test_sweep_table_has_varying_overrides_metrics_and_tuned_pct(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    for i, (num, depth, r1) in enumerate([(1, 6, 0.5), (10, 6, 0.6), (1, 12, 0.55), (10, 12, 0.7)]):
        overrides = [
            "+experiment=demo",
            f"model.peft.prompts.num={num}",
            f"model.peft.prompts.depth={depth}",
        ]
        fake_run(sweep / str(i), overrides, r1, 0.1 * num)
    assert main([str(sweep)]) == 0
    rows = list(csv.reader((sweep / "report.csv").open()))
    header = rows[0]
    # +experiment=demo is the same in every run: no column for it
    assert header == [
        "run",
        "model.peft.prompts.num",
        "model.peft.prompts.depth",
        "eval",
        "n",
        "recall@1",
        "recall@2",
        "tuned %",
    ]
    by_run = {Path(r[0]).name: r for r in rows[1:]}
    assert by_run["3"][1:] == ["10", "12", "final", "1", "70.00", "80.00", "1.000"]
    assert len(by_run) == 4
    md = (sweep / "report.md").read_text()
    assert md.count("\n") == 6 and "| 70.00 |" in md
    assert (sweep / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "70.00" in capsys.readouterr().out


def test_rows_follow_run_numbers_as_numbers(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for i in (0, 1, 2, 10, 11):
        fake_run(sweep / str(i), [f"model.peft.prompts.num={i}"], 0.5, 0.1)
    assert main([str(sweep)]) == 0
    _, rows = read_csv(sweep / "report.csv")
    assert [Path(r["run"]).name for r in rows] == ["0", "1", "2", "10", "11"]


def test_seeds_are_grouped_with_mean_std_and_t_interval(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    values = {"a": [0.50, 0.54, 0.61, 0.55], "b": [0.70]}
    job = 0
    for lr, recalls in values.items():
        for seed, r1 in enumerate(recalls):
            fake_run(sweep / str(job), [f"optim.lr={lr}", f"seed={seed}"], r1, 0.2)
            job += 1
    assert main([str(sweep)]) == 0
    header, rows = read_csv(sweep / "report.csv")
    assert "seed" not in header and header[:4] == ["run", "optim.lr", "eval", "n"]
    a, b = rows
    x = np.array(values["a"])
    mean, std = x.mean(), x.std(ddof=1)
    half = stats.t.ppf(0.975, df=len(x) - 1) * std / math.sqrt(len(x))
    assert (a["optim.lr"], a["n"]) == ("a", "4")
    for column, want in [
        ("recall@1", mean),
        ("recall@1 std", std),
        ("recall@1 ci95 low", mean - half),
        ("recall@1 ci95 high", mean + half),
    ]:
        assert float(a[column]) == pytest.approx(100 * want, abs=0.006), column
    # one seed: shown as it is, marked n=1, no spread
    assert (b["n"], b["recall@1"], b["recall@1 std"], b["recall@1 ci95 low"]) == (
        "1",
        "70.00",
        "",
        "",
    )
    md = (sweep / "report.md").read_text()
    assert (
        f"{100 * mean:.2f} ± {100 * std:.2f} [{100 * (mean - half):.2f}, {100 * (mean + half):.2f}]"
        in md
    )


def test_before_row_and_cost_columns(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cost = {
        "train_images_per_s": 812.25,
        "train_epoch_s": 31.5,
        "eval_s": 4.25,
        "peak_memory_mib": 2048.4,
        "trainable_params": 123456,
    }
    for i, peft in enumerate(["vptsp", "bitfit"]):
        fake_run(
            sweep / str(i),
            [f"model/peft={peft}"],
            0.6 + 0.1 * i,
            0.5,
            before={"recall@1": 0.3, "map@r": 0.1},
            cost={**cost, "trainable_params": cost["trainable_params"] * (i + 1)},
        )
    assert main([str(sweep)]) == 0
    header, rows = read_csv(sweep / "report.csv")
    assert header[header.index("recall@1") :] == [
        "recall@1",
        "recall@2",
        "map@r",
        "train img/s",
        "s/epoch",
        "s/eval",
        "peak MiB",
        "trainable params",
        "tuned %",
    ]
    assert [(r["model/peft"], r["eval"]) for r in rows] == [
        ("vptsp", "final"),
        ("vptsp", "before"),
        ("bitfit", "final"),
        ("bitfit", "before"),
    ]
    final, before = rows[0], rows[1]
    assert (final["recall@1"], final["map@r"], before["recall@1"], before["map@r"]) == (
        "60.00",
        "",
        "30.00",
        "10.00",
    )
    assert [final[c] for c in ("train img/s", "s/epoch", "peak MiB", "trainable params")] == [
        "812.2",
        "31.5",
        "2048",
        "123456",
    ]
    assert rows[2]["trainable params"] == "246912" and before["train img/s"] == ""


def test_no_runs_is_one_line_error(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no metrics.json") and "\n" not in err


@pytest.mark.slow
def test_seed_sweep_on_demo_data_reports_mean_std_and_interval(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *tiny_overrides("eval_before_training=false"),
        "seed=0,1,2",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = run_cli(args, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main([str(sweep)]) == 0
    header, rows = read_csv(sweep / "report.csv")
    assert len(rows) == 1 and rows[0]["n"] == "3"
    runs = [json.loads(f.read_text())["metrics"] for f in sorted(sweep.rglob("metrics.json"))]
    assert len(runs) == 3
    t = stats.t.ppf(0.975, df=2)
    spread = 0.0
    for metric in ("recall@1", "map@r", "r_precision"):
        x = np.array([r[metric] for r in runs])
        mean, std = x.mean(), x.std(ddof=1)
        half = t * std / math.sqrt(3)
        row = rows[0]
        assert float(row[metric]) == pytest.approx(100 * mean, abs=0.006)
        assert float(row[f"{metric} std"]) == pytest.approx(100 * std, abs=0.006)
        low, high = float(row[f"{metric} ci95 low"]), float(row[f"{metric} ci95 high"])
        assert low == pytest.approx(100 * (mean - half), abs=0.006)
        assert high == pytest.approx(100 * (mean + half), abs=0.006)
        assert all(low <= 100 * v <= high for v in x)
        spread += std
    assert spread > 0  # the seeds really gave different runs
