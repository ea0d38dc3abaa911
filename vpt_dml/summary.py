"""The short table a run prints at the end: before, final and best side by side, and cost."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


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
    params = (result["provenance"].get("parameters") or {}).get("all")
    if params:
        lines.append(
            f"trainable params: {params['trainable']:,} ({params['tuned_pct']:.2f}% of backbone)"
        )
    elif cost.get("trainable_params"):
        lines.append(f"trainable params: {cost['trainable_params']:,}")
    return lines


def print_summary(result: dict, out_dir: Path) -> None:
    console = Console(stderr=False)
    console.print(metric_table(result))
    for line in cost_lines(result):
        console.print(line)
    if result.get("test_evaluations") is not None:
        console.print(f"test split evaluated {result['test_evaluations']} time(s)")
    console.print(f"run folder: {out_dir}  (metrics.json, checkpoints/last.ckpt)")
