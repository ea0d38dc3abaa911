"""The short table a run prints at the end."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_summary(result: dict, out_dir: Path) -> None:
    metrics = result["metrics"]
    prov = result["provenance"]
    table = Table(
        title=f"{prov.get('task_name')} · {prov['dataset']['name']} · {prov['backbone']['name']}"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{100 * value:.2f}")
    params = (prov.get("parameters") or {}).get("all")
    if params:
        table.add_row(
            "trainable params", f"{params['trainable']:,} ({params['tuned_pct']:.2f}% of backbone)"
        )
    console = Console(stderr=False)
    console.print(table)
    console.print(f"run folder: {out_dir}  (metrics.json, checkpoints/last.ckpt)")
