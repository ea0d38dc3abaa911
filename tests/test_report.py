"""vpt_dml.report: metrics.json files of a sweep -> Markdown/CSV table + PNG plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from vpt_dml.report import main


def fake_run(folder: Path, overrides: list[str], recall1: float, tuned_pct: float) -> None:
    folder.mkdir(parents=True)
    result = {
        "metrics": {"recall@1": recall1, "recall@2": recall1 + 0.1},
        "provenance": {"overrides": overrides, "parameters": {"all": {"tuned_pct": tuned_pct}}},
    }
    (folder / "metrics.json").write_text(json.dumps(result))


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
        "recall@1",
        "recall@2",
        "tuned %",
    ]
    by_run = {Path(r[0]).name: r for r in rows[1:]}
    assert by_run["3"][1:] == ["10", "12", "70.00", "80.00", "1.000"]
    assert len(by_run) == 4
    md = (sweep / "report.md").read_text()
    assert md.count("\n") == 6 and "| 70.00 |" in md
    assert (sweep / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "70.00" in capsys.readouterr().out


def test_no_runs_is_one_line_error(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no metrics.json") and "\n" not in err
