"""The cost-accuracy frontier of a PEFT-baselines sweep: Recall@1 against trainable
parameters (left) and against training images/s (right), one point per configuration,
seed error bars (95% t interval) where n > 1, the Pareto-optimal points ringed and joined
(fewer parameters / more images per second, and higher Recall@1)."""

from __future__ import annotations

from pathlib import Path

METRIC = "recall@1"
LABEL_KEYS = ("model/peft",)


def pareto(points: list[tuple[float, float]], more_x_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (y: higher is better)."""
    keep = []
    for i, (x, y) in enumerate(points):
        dominated = False
        for j, (x2, y2) in enumerate(points):
            better_x = x2 >= x if more_x_is_better else x2 <= x
            strictly = (x2 != x) or (y2 != y)
            if j != i and better_x and y2 >= y and strictly:
                dominated = True
                break
        if not dominated:
            keep.append(i)
    return keep


def _label(group, override_cols: list[str]) -> str:
    keys = [k for k in LABEL_KEYS if k in group.overrides] or override_cols
    return ",".join(group.overrides.get(k, "") for k in keys) or str(group.runs[0].path.name)


def plot_frontier(groups, override_cols: list[str], out: Path) -> bool:
    """Write the PNG when the configurations recorded different trainable-parameter
    counts; returns whether it was written."""
    pts = []
    for g in groups:
        s = g.stats("final").get(METRIC)
        params = g.mean_of("cost", "trainable_params")
        if s is None or params is None:
            continue
        err = (0.0, 0.0) if s.low is None else (100 * (s.mean - s.low), 100 * (s.high - s.mean))
        pts.append((g, _label(g, override_cols), params, g.mean_of("cost", "train_images_per_s"),
                    100 * s.mean, err, s.n))  # fmt: skip
    if len({p[2] for p in pts}) < 2:  # no cost axis to speak of (e.g. a seed or lr sweep)
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = [(2, "trainable parameters", False, True)]
    if all(p[3] is not None for p in pts):
        axes_spec.append((3, "training images / s", True, False))
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(5.5 * len(axes_spec), 4.2), squeeze=False)
    for ax, (xi, xlabel, more_better, logx) in zip(axes[0], axes_spec):
        xs = [p[xi] for p in pts]
        ys = [p[4] for p in pts]
        front = pareto(list(zip(xs, ys)), more_better)
        for i, p in enumerate(pts):
            ax.errorbar(xs[i], ys[i], yerr=[[p[5][0]], [p[5][1]]], fmt="o", capsize=3,
                        color="tab:red" if i in front else "tab:blue")  # fmt: skip
            ax.annotate(f"{p[1]}" + (f" (n={p[6]})" if p[6] > 1 else ""), (xs[i], ys[i]),
                        textcoords="offset points", xytext=(5, 4), fontsize=7)  # fmt: skip
        line = sorted(front, key=lambda i: xs[i])
        ax.plot([xs[i] for i in line], [ys[i] for i in line], "--", color="tab:red", lw=1,
                label="Pareto-optimal")  # fmt: skip
        ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=160, facecolors="none",
                   edgecolors="tab:red")  # fmt: skip
        if logx and min(xs) > 0:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel + (" (log)" if logx and min(xs) > 0 else ""))
        ax.set_ylabel(
            f"{METRIC} (%)" + (", 95% CI over seeds" if any(p[6] > 1 for p in pts) else "")
        )
        # a 2-seed t interval can reach past [0, 100]: keep the axis on possible values
        lows = [p[4] - p[5][0] for p in pts]
        highs = [p[4] + p[5][1] for p in pts]
        ax.set_ylim(max(0.0, min(lows) - 5), min(100.0, max(highs) + 5))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("cost-accuracy frontier (ringed: Pareto-optimal)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True
