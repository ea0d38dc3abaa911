"""The report's plot: Recall@1 against the prompt count (one line per depth), else against
the first numeric override that varies, else one bar per group; 95% intervals as error bars.
"""

from __future__ import annotations

from pathlib import Path

from vpt_dml.reporting.runs import PROMPT_NUM, Group, Stat, natural_key


def as_number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def plot(
    groups: list[Group], override_cols: list[str], out: Path, metric: str = "recall@1"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(g, s) for g in groups if (s := g.stats("final").get(metric)) is not None]
    numeric = [
        k
        for k in override_cols
        if all(as_number(g.overrides.get(k)) is not None for g, _ in points)
    ]
    x_key = PROMPT_NUM if PROMPT_NUM in numeric else (numeric[0] if numeric else None)

    def err(s: Stat) -> tuple[float, float]:
        return (0.0, 0.0) if s.low is None else (100 * (s.mean - s.low), 100 * (s.high - s.mean))

    fig, ax = plt.subplots(figsize=(6, 4))
    if x_key is None:
        labels = [
            ",".join(f"{k}={g.overrides.get(k, '')}" for k in override_cols) or g.label
            for g, _ in points
        ]
        errors = [err(s) for _, s in points]
        ax.bar(
            range(len(points)),
            [100 * s.mean for _, s in points],
            yerr=[[e[0] for e in errors], [e[1] for e in errors]],
            capsize=3,
        )
        ax.set_xticks(range(len(points)), labels, rotation=30, ha="right", fontsize=7)
    else:
        group_key = next((k for k in override_cols if k != x_key), None)
        lines: dict[str, list[tuple[float, Stat]]] = {}
        for g, s in points:
            label = f"{group_key}={g.overrides.get(group_key)}" if group_key else metric
            lines.setdefault(label, []).append((as_number(g.overrides[x_key]), s))
        for label in sorted(lines, key=natural_key):
            line = sorted(lines[label], key=lambda p: p[0])
            errors = [err(s) for _, s in line]
            ax.errorbar(
                [x for x, _ in line],
                [100 * s.mean for _, s in line],
                yerr=[[e[0] for e in errors], [e[1] for e in errors]],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set_xlabel("prompt count N" if x_key == PROMPT_NUM else x_key)
        ax.legend(fontsize=7)
    seeds = max((s.n for _, s in points), default=1)
    ax.set_ylabel(f"{metric} (%)" + (", mean and 95% CI over seeds" if seeds > 1 else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
