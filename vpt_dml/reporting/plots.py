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


LABEL_CHARS = 32  # plot labels wrap at this width (a long override must not leave the figure)


def wrapped(text: str, width: int = LABEL_CHARS) -> str:
    """`text` on lines of at most `width` characters, broken after `,` or at spaces where it
    can, else mid-word (an override's value often has neither)."""
    import textwrap

    spaced = text.replace(",", ", ")
    lines = textwrap.wrap(spaced, width, break_long_words=True, break_on_hyphens=False)
    return "\n".join(line.replace(", ", ",") for line in lines) or text


def plot(
    groups: list[Group], override_cols: list[str], out: Path, metric: str = "recall@1"
) -> None:
    import matplotlib.pyplot as plt

    fig = figure(groups, override_cols, metric)
    fig.savefig(out, dpi=120, bbox_inches="tight")  # and nothing past the edge is cut
    plt.close(fig)


def figure(groups: list[Group], override_cols: list[str], metric: str = "recall@1"):
    """The report's plot as a matplotlib Figure, laid out so every label lies inside it."""
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
            wrapped(",".join(f"{k}={g.overrides.get(k, '')}" for k in override_cols) or g.label)
            for g, _ in points
        ]
        # room below the bars for the tallest label (7 pt lines, rotated 30 degrees)
        rows = max((label.count("\n") + 1 for label in labels), default=1)
        fig.set_size_inches(max(6, 0.5 * len(points) + 2), 4 + 0.12 * rows)
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
            label = wrapped(f"{group_key}={g.overrides.get(group_key)}") if group_key else metric
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
        ax.set_xlabel(wrapped("prompt count N" if x_key == PROMPT_NUM else x_key, 60))
        # beside the axes, not over the lines: a long label widens the figure, never clipped
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    seeds = max((s.n for _, s in points), default=1)
    ax.set_ylabel(f"{metric} (%)" + (",\nmean and 95% CI over seeds" if seeds > 1 else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
