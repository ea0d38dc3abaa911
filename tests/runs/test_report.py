"""vpt_dml.report: metrics.json files of a sweep -> Markdown/CSV table + PNG plot."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

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
    if before is not None:  # as vpt_dml.runs.record writes it
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


# --- finding 2: statistics over the resolved config, each seed once, failed jobs listed --


def resolved_run(folder: Path, seed: int, recall1: float, flag: str = "false",
                 protocol: dict | None = None) -> Path:  # fmt: skip
    """A finished run as vpt_dml.run writes it: metrics.json and config_resolved.yaml
    (paths and logger folders inside the run folder, as the real file has them)."""
    fake_run(folder, [f"model.backbone.pretrained={flag}", f"seed={seed}"], recall1, 0.5)
    result = json.loads((folder / "metrics.json").read_text())
    result["provenance"]["seed"] = seed
    if protocol is not None:
        result["protocol"] = protocol
    (folder / "metrics.json").write_text(json.dumps(result))
    # data.seed: ${seed} (conf/data/base.yaml) follows the seed: not a configuration key
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("seed: 0\ndata:\n  seed: ${seed}\n")
    (folder / "config_resolved.yaml").write_text(
        f"seed: {seed}\ndata:\n  seed: {seed}\nmodel:\n  backbone:\n    pretrained: false\n"
        f"logger:\n  csv:\n    save_dir: {folder}\n"
        f"paths:\n  output_dir: {folder}\n  data_dir: /data\n"
    )
    return folder


def test_the_same_sweep_in_two_report_folders_counts_each_seed_once(tmp_path: Path) -> None:
    one, copy = tmp_path / "sweep", tmp_path / "copy_of_sweep"
    for seed, r1 in enumerate([0.50, 0.60]):
        resolved_run(one / str(seed), seed, r1)
        resolved_run(copy / str(seed), seed, r1)
    assert main([str(one), "--out", str(tmp_path / "alone")]) == 0
    assert main([str(one), str(copy), "--out", str(tmp_path / "both")]) == 0
    _, alone = read_csv(tmp_path / "alone.csv")
    _, both = read_csv(tmp_path / "both.csv")
    assert [(r["eval"], r["n"]) for r in both] == [
        ("final", "2"), ("duplicate", ""), ("duplicate", ""),
    ]  # fmt: skip
    # the interval is the 2-seed one, not a 4-"seed" one ~7x narrower
    for column in ("recall@1", "recall@1 ci95 low", "recall@1 ci95 high"):
        assert both[0][column] == alone[0][column]
    assert "seed 0 again" in both[1]["note"] and "not averaged" in both[1]["note"]


def test_two_copies_of_one_seed_are_one_run_and_a_duplicate(tmp_path: Path) -> None:
    resolved_run(tmp_path / "a" / "0", 0, 0.5)
    resolved_run(tmp_path / "b" / "0", 0, 0.5)
    assert main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    _, rows = read_csv(tmp_path / "r.csv")
    assert [(r["eval"], r["n"], r["recall@1"]) for r in rows] == [
        ("final", "1", "50.00"), ("duplicate", "", ""),
    ]  # fmt: skip
    assert "±" not in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("with_resolved_config", [True, False])
def test_false_and_False_are_one_configuration(tmp_path: Path, with_resolved_config) -> None:
    for seed, flag in enumerate(["false", "False"]):
        resolved_run(tmp_path / "s" / str(seed), seed, 0.5 + 0.1 * seed, flag=flag)
        if not with_resolved_config:  # an older run: the overrides, read as YAML values
            (tmp_path / "s" / str(seed) / "config_resolved.yaml").unlink()
    assert main([str(tmp_path / "s")]) == 0
    _, rows = read_csv(tmp_path / "s" / "report.csv")
    assert [(r["eval"], r["n"]) for r in rows] == [("final", "2")]


def test_a_crashed_job_without_metrics_is_a_failed_row_with_its_error(tmp_path: Path) -> None:
    resolved_run(tmp_path / "s" / "0", 0, 0.5)
    crashed = tmp_path / "s" / "1"
    crashed.mkdir()
    (crashed / "config_resolved.yaml").write_text("seed: 1\n")
    (crashed / "run.log").write_text("[INFO] training\nerror: data.batch_size=0 must be >= 1\n")
    killed = tmp_path / "s" / "2"
    killed.mkdir()
    (killed / "config_resolved.yaml").write_text("seed: 2\n")
    assert main([str(tmp_path / "s")]) == 0
    _, rows = read_csv(tmp_path / "s" / "report.csv")
    assert [(Path(r["run"]).name, r["eval"], r["n"]) for r in rows] == [
        ("0", "final", "1"), ("1", "failed", ""), ("2", "unfinished", ""),
    ]  # fmt: skip
    assert rows[1]["note"] == "error: data.batch_size=0 must be >= 1"
    assert "no metrics.json" in rows[2]["note"]


# --- protocol stamps ------------------------------------------------------------------


def test_mixed_protocol_stamps_are_refused_without_the_flag(tmp_path: Path, capsys) -> None:
    from vpt_dml.evaluation.protocol import stamp_of

    p32 = {"split_sha256": "a" * 64, "image_resolution": 32, "ks": [1, 2]}
    p64 = {**p32, "image_resolution": 64}
    for p in (p32, p64):
        p["stamp"] = stamp_of(p)
    resolved_run(tmp_path / "s" / "0", 0, 0.5, protocol=p32)
    resolved_run(tmp_path / "s" / "1", 1, 0.7, protocol=p64)
    assert main([str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "image_resolution" in err and "--mixed-protocols" in err
    assert main([str(tmp_path / "s"), "--mixed-protocols"]) == 0
    header, rows = read_csv(tmp_path / "s" / "report.csv")
    # one configuration, but two protocols: two rows, never one mean over both
    assert "protocol" in header
    assert [(r["protocol"], r["n"], r["recall@1"]) for r in rows] == [
        (p32["stamp"], "1", "50.00"), (p64["stamp"], "1", "70.00"),
    ]  # fmt: skip


# --- worst classes and the frontier -----------------------------------------------------


def test_worst_classes_lists_lowest_recall_classes_with_sizes(tmp_path: Path) -> None:
    from vpt_dml.evaluation import per_query

    run = resolved_run(tmp_path / "s" / "0", 0, 0.5)
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 3])
    first = np.array([1, 1, 2, 1, 3, 5, 4, 1])  # recall@1: 1, 1/3, 0, 1
    cols = {"index": np.arange(8), "label": labels, "positives": np.ones(8, int),
            "first_positive_rank": first, "ap_at_r": 1.0 / first,
            "r_precision": (first == 1) * 1.0, "ap_vptsp": 1.0 / first}  # fmt: skip
    per_query.write(run / "per_query" / "test_best.parquet", cols, {"ks": [1]})
    assert main([str(tmp_path / "s"), "--worst", "2"]) == 0
    text = (tmp_path / "s" / "report_worst.md").read_text()
    assert "| 2 | 0.00 | 2 |\n| 1 | 33.33 | 3 |" in text


def test_frontier_marks_the_pareto_optimal_methods() -> None:
    from vpt_dml.reporting.frontier import pareto

    # (params, recall): b is beaten by a (fewer params, higher recall); c costs more but wins
    points = [(100, 0.6), (200, 0.5), (1000, 0.7), (1000, 0.65)]
    assert pareto(points, more_x_is_better=False) == [0, 2]
    # images/s: more is better
    assert pareto([(50, 0.6), (80, 0.6), (10, 0.9)], more_x_is_better=True) == [1, 2]


def test_a_task_exception_kept_by_hydras_submitit_launcher_is_a_failed_row(tmp_path: Path) -> None:
    """Hydra's launcher catches the task's exception: submitit records "success" with a
    FAILED JobReturn (the files laid out as submitit writes them, real classes)."""
    import pickle

    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import DelayedSubmission

    sweep = tmp_path / "sweep"
    resolved_run(sweep / "0", 0, 0.5)
    job_dir = sweep / ".submitit" / "4242"
    job_dir.mkdir(parents=True)
    overrides = ["optim.lr=-1"]
    (sweep / "1" / ".hydra").mkdir(parents=True)
    (sweep / "1" / ".hydra" / "overrides.yaml").write_text("- optim.lr=-1\n")
    DelayedSubmission(print, overrides, "hydra.sweep.dir", 1, "job_id_for_1", {}).dump(
        job_dir / "4242_submitted.pkl"
    )
    ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
    ret._return_value = ValueError("Invalid learning rate: -1")
    (job_dir / "4242_0_result.pkl").write_bytes(pickle.dumps(("success", ret)))
    (job_dir / "4242_0_log.err").write_text("Seed set to 0\n")
    assert main([str(sweep)]) == 0
    _, rows = read_csv(sweep / "report.csv")
    assert [(Path(r["run"]).name, r["eval"]) for r in rows] == [("0", "final"), ("1", "failed")]
    assert rows[1]["note"] == "[job 4242] ValueError: Invalid learning rate: -1"


# --- issue 28 items 3, 9, 16 ---------------------------------------------------------------


def test_two_datasets_at_two_places_are_two_groups_not_seeds_of_one(tmp_path: Path) -> None:
    """paths.data_dir=A,B (or VPT_DML_DATA): `paths` is no configuration key, but the
    data a run read is; the same seed on both is no duplicate either."""
    for data, seeds in (("A", (0, 1)), ("B", (0, 1))):
        for seed in seeds:
            run = resolved_run(tmp_path / "s" / f"{data}{seed}", seed, 0.5 + 0.1 * seed)
            result = json.loads((run / "metrics.json").read_text())
            result["protocol"] = {"stamp": "same", "data_root": str(tmp_path / data / "cub")}
            (run / "metrics.json").write_text(json.dumps(result))
    assert main([str(tmp_path / "s")]) == 0
    _, rows = read_csv(tmp_path / "s" / "report.csv")
    assert [(r["eval"], r["n"]) for r in rows] == [("final", "2"), ("final", "2")]


def test_dict_overrides_are_read_with_hydras_grammar(tmp_path: Path) -> None:
    for i, width in enumerate((96, 192)):
        kwargs = f"++model.backbone.kwargs={{img_size:32,embed_dim:{width}}}"
        fake_run(tmp_path / "s" / str(i), [kwargs, "optim.lr=1e-3"], 0.5, 1.0)
    assert main([str(tmp_path / "s")]) == 0
    header, rows = read_csv(tmp_path / "s" / "report.csv")
    assert "model.backbone.kwargs" in header and "optim.lr" not in header
    assert [json.loads(r["model.backbone.kwargs"]) for r in rows] == [
        {"img_size": 32, "embed_dim": 96},
        {"img_size": 32, "embed_dim": 192},
    ]


def _texts_outside(fig) -> list[str]:
    """The drawn texts of a figure that reach past its edge (what a saved PNG cuts): tick
    labels within the axis limits, axis labels, legend entries."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            texts += [t.label1 for t in axis.get_major_ticks() if lo <= t.get_loc() <= hi]
            texts.append(axis.label)
        if ax.get_legend() is not None:
            texts += ax.get_legend().get_texts()
    box = fig.bbox
    out = []
    for t in texts:
        if not t.get_text():
            continue
        e = t.get_window_extent(renderer)
        if e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1:
            out.append(t.get_text())
    assert len(texts) > 5  # the check saw the labels
    return out


@pytest.mark.parametrize("shape", ["bars", "lines"])
def test_report_png_keeps_long_labels_inside_the_figure(tmp_path: Path, shape: str) -> None:
    """Issue 28 item 16: long override labels were cut at the figure's edge."""
    import matplotlib.pyplot as plt

    from vpt_dml.reporting.plots import figure
    from vpt_dml.reporting.runs import collect, find_runs

    long = "model.backbone.kwargs={img_size:224,embed_dim:768,depth:12,num_heads:12}"
    for i in range(3):
        if shape == "bars":
            overrides = [f"{long[:-1]},mlp_ratio:{i}}}", f"data.name=dataset_number_{i}_long"]
        else:
            overrides = [f"model.peft.prompts.num={i + 1}", f"{long[:-1]},qkv_bias:{i % 2}}}"]
        fake_run(tmp_path / "s" / str(i), overrides, 0.5 + 0.1 * i, 1.0)
    c = collect(find_runs([tmp_path / "s"]), [tmp_path / "s"])
    fig = figure(c.groups, c.override_cols)
    try:
        assert _texts_outside(fig) == []
    finally:
        plt.close(fig)
