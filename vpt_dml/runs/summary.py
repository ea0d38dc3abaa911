"""The short table a run prints at the end: before, final and best side by side, and cost."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from vpt_dml.models.params import tuned_line
from vpt_dml.runs.callbacks.text_progress import table_to_run_log, to_run_log


def _column(part: dict | None, title: str) -> tuple[str, dict]:
    if not part:
        return title, {}
    epoch = f" epoch {part['epoch']}" if part.get("epoch") is not None else ""
    return f"{title}{epoch}\n({part['split']})", part.get("metrics") or {}


def metric_table(result: dict) -> Table:
    prov = result["provenance"]
    table = Table(
        title=f"{prov.get('task_name')} · {prov['dataset']['name']} · {prov['backbone']['name']}",
        caption=f"best chosen on: {result.get('selection')}",
    )
    columns = [
        _column(result.get("before"), "before"),
        _column(result.get("final"), "final"),
        _column(result.get("best"), "best"),
    ]
    columns = [(title, values) for title, values in columns if values]
    table.add_column("metric")
    for title, _ in columns:
        table.add_column(title, justify="right")
    names: list[str] = []
    for _, values in columns:
        names += [k for k in values if k not in names]
    for name in names:
        table.add_row(name, *(f"{100 * v[name]:.2f}" if name in v else "-" for _, v in columns))
    return table


def cost_lines(result: dict) -> list[str]:
    cost = result.get("cost") or {}
    lines = []
    if cost.get("train_images_per_s"):
        lines.append(
            f"training: {cost['train_images_per_s']:.1f} images/s, "
            f"{cost['train_epoch_s']:.1f} s/epoch"
        )
    if cost.get("eval_s"):
        lines.append(f"evaluation: {cost['eval_s']:.1f} s each")
    if cost.get("peak_memory_mib"):
        lines.append(f"peak memory: {cost['peak_memory_mib']:.0f} MiB ({cost['peak_memory_kind']})")
    params = result["provenance"].get("parameters") or {}
    if params.get("all"):
        # inference-time and training-only parts, each against the backbone's size
        lines.append(tuned_line(params))
    elif cost.get("trainable_params"):
        lines.append(f"trainable params: {cost['trainable_params']:,}")
    return lines


def print_summary(result: dict, out_dir: Path) -> None:
    """The table and its lines on the console and in the run folder's run.log."""
    console = Console(stderr=False)
    table = metric_table(result)
    console.print(table)
    table_to_run_log(table)
    lines = cost_lines(result)
    if result.get("test_evaluations") is not None:
        lines.append(f"test split evaluated {result['test_evaluations']} time(s)")
    lines.append(f"run folder: {out_dir}  (metrics.json, checkpoints/last.ckpt)")
    for line in lines:
        console.print(line)
        to_run_log(line)
    for warning in warning_lines(result):
        console.print(warning, style="bold red", markup=False)
        to_run_log(warning)


def warning_lines(result: dict) -> list[str]:
    """metrics.json's `warnings`, one line each: why the numbers above may mean nothing."""
    return [f"WARNING: {w}" for w in result.get("warnings") or []]
