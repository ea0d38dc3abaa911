"""What a researcher looks at after a run: a retrieval gallery and a Recall@K curve.

Both are written as PNG into <run dir>/images/ (for CSV users) and, when a W&B logger is
active, logged as images; the parameter breakdown goes to W&B as a table. Rank zero only.
The gallery re-embeds at most `max_images` test images (the whole test set of the demo),
so on a large dataset its neighbours come from that subset, as its title says.
`gallery="worst"` shows the test queries whose first positive ranked deepest (from the
run's per-query file, evaluation/per_query.py) instead of queries spread over the set.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader, Subset

from vpt_dml.errors import UserError
from vpt_dml.evaluation import per_query
from vpt_dml.evaluation.gallery import plot_gallery

log = logging.getLogger("vpt_dml")


def recall_curve(metrics: dict, stage: str = "test") -> list[tuple[int, float]]:
    prefix = f"{stage}/recall@"
    points = []
    for key, value in metrics.items():
        if key.startswith(prefix) and key[len(prefix) :].isdigit():
            points.append((int(key[len(prefix) :]), float(value)))
    return sorted(points)


def plot_recall_curve(points: list[tuple[int, float]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ks = [k for k, _ in points]
    ax.plot(ks, [100 * v for _, v in points], marker="o")
    ax.set_xscale("log", base=2 if max(ks) <= 64 else 10)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


GALLERY_CHOICES = ("random", "worst")


def worst_queries(columns: dict, n: int) -> np.ndarray:
    """Dataset indices of the n queries whose first positive ranked deepest (then lowest
    AP@R, then lower index)."""
    order = np.lexsort((columns["index"], columns["ap_at_r"], -columns["first_positive_rank"]))
    return np.asarray(columns["index"])[order[:n]]


class Dashboard(L.Callback):
    def __init__(
        self,
        num_queries: int = 8,
        top_k: int = 5,
        max_images: int = 2000,
        batch_size: int = 64,
        gallery: str = "random",
    ) -> None:
        if gallery not in GALLERY_CHOICES:
            raise UserError(
                f"callbacks.dashboard.gallery={gallery!r}: choose one of {', '.join(GALLERY_CHOICES)}"
            )
        self.gallery = gallery
        self.num_queries = num_queries
        self.top_k = top_k
        self.max_images = max_images
        self.batch_size = batch_size

    @staticmethod
    def _wandb(trainer: L.Trainer) -> list[WandbLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def _image_dir(self, trainer: L.Trainer) -> Path:
        out = Path(trainer.default_root_dir) / "images"
        out.mkdir(parents=True, exist_ok=True)
        return out

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        summary = getattr(pl_module, "parameter_summary", None)
        if not trainer.is_global_zero or not summary:
            return
        rows = [[name, r["trainable"], r["total"]] for name, r in summary.items()]
        for lg in self._wandb(trainer):
            lg.log_table(key="parameters", columns=["component", "trainable", "total"], data=rows)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        try:
            self._images(trainer, pl_module)
        except Exception as e:  # pictures are a convenience: never lose a finished run over them
            log.warning("retrieval images failed (%s: %s)", type(e).__name__, e)

    def _images(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = self._image_dir(trainer)
        images = {}
        points = recall_curve(trainer.callback_metrics)
        if points:
            images["recall_at_k"] = plot_recall_curve(points, out / "recall_at_k.png")
        loader = trainer.test_dataloaders
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "records"):
            images["retrieval_gallery"] = self._gallery(
                dataset, pl_module, out / "retrieval_gallery.png"
            )
        for lg in self._wandb(trainer):
            for key, path in images.items():
                lg.log_image(key=f"test/{key}", images=[str(path)])

    def _worst(self, pl_module: L.LightningModule) -> np.ndarray | None:
        run_dir = getattr(pl_module, "per_query_dir", None)
        name = "test_best" if getattr(pl_module, "per_query_held_out", False) else "test_final"
        path = Path(run_dir or ".") / per_query.FOLDER / f"{name}.parquet"
        if run_dir is None or not path.is_file():
            log.warning(
                "gallery=worst needs per-query results (eval.per_query): showing spread queries"
            )
            return None
        return worst_queries(per_query.read(path)[0], self.num_queries)

    @torch.no_grad()
    def _gallery(self, dataset, pl_module: L.LightningModule, out: Path) -> Path:
        n = len(dataset)
        worst = self._worst(pl_module) if self.gallery == "worst" else None
        chosen = np.linspace(0, n - 1, min(n, self.max_images)).astype(int)
        chosen = np.unique(np.concatenate([chosen, worst if worst is not None else []]).astype(int))
        is_query = np.asarray(dataset.query_mask)[chosen]
        is_gallery = np.asarray(dataset.gallery_mask)[chosen]
        loader = DataLoader(Subset(dataset, chosen.tolist()), batch_size=self.batch_size)
        was_training = pl_module.training
        pl_module.eval()
        emb, labels = [], []
        for images, batch_labels, _ in loader:
            emb.append(pl_module(images.to(pl_module.device)).float().cpu())
            labels.append(batch_labels)
        pl_module.train(was_training)
        emb, labels = torch.cat(emb), torch.cat(labels)
        sims = emb @ emb.T
        sims[:, ~torch.from_numpy(is_gallery)] = -float("inf")
        sims.fill_diagonal_(-float("inf"))  # never the query itself
        query_rows = np.flatnonzero(is_query)
        picks = query_rows[
            np.linspace(0, len(query_rows) - 1, min(self.num_queries, len(query_rows))).astype(int)
        ]
        if worst is not None:  # the worst queries, worst first
            picks = np.searchsorted(chosen, worst)
        k = min(self.top_k, int(is_gallery.sum()) - 1)
        paths = dataset.records.paths
        neighbours = []
        for q in picks:
            top = torch.topk(sims[q], k).indices.tolist()
            neighbours.append([(paths[chosen[j]], bool(labels[j] == labels[q])) for j in top])
        title = f"top-{k} among {len(chosen)} test images (green: same class, red: other class)"
        if worst is not None:
            title = f"worst {len(picks)} queries (deepest first positive); " + title
        return plot_gallery([paths[chosen[q]] for q in picks], neighbours, title, out)
