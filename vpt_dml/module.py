"""The LightningModule: wires the embedder, the proxies, the loss and the optimizers.

Training: image branch embeddings + proxies (learned or semantic) -> Proxy Anchor.
Evaluation: image branch only; embeddings gathered from all ranks, de-duplicated by
dataset index, metrics computed once and logged identically on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning as L
import torch
import torch.nn as nn

from vpt_dml.evaluation import retrieval_metrics
from vpt_dml.losses import ProxyAnchorLoss, ProxyNCALoss
from vpt_dml.models.embedder import build_embedder
from vpt_dml.models.params import parameter_breakdown
from vpt_dml.models.prompted_vit import layer_counts
from vpt_dml.models.proxies import LearnedProxies
from vpt_dml.models.semantic_proxies import SemanticProxies
from vpt_dml.errors import UserError


def build_proxies(cfg: Mapping, num_classes: int, feature_dim: int, embed_dim: int, num_layers: int) -> nn.Module:
    kind = cfg.get("kind", "learned")
    if kind == "learned":
        return LearnedProxies(num_classes, embed_dim)
    if kind in ("semantic_mix", "semantic_gru"):
        q = cfg.get("class_prompts") or {}
        counts = layer_counts(q.get("num", 0), q.get("depth", 0), q.get("step", 0), num_layers)
        update = "mix" if kind == "semantic_mix" else cfg.get("update", "gru_relu")
        return SemanticProxies(
            num_classes,
            feature_dim,
            embed_dim,
            counts,
            update=update,
            bias_ratio=cfg.get("bias_ratio", 0.5),
            dropout=cfg.get("dropout", 0.0),
            mix_lambda=cfg.get("mix_lambda", 0.8),
        )
    raise UserError(f"unknown model.proxy.kind {kind!r}; use learned, semantic_mix or semantic_gru")


def build_loss(cfg: Mapping) -> nn.Module:
    cfg = dict(cfg)
    name = cfg.pop("name", "proxy_anchor")
    if name == "proxy_anchor":
        return ProxyAnchorLoss(**cfg)
    if name == "proxy_nca":
        return ProxyNCALoss(**cfg)
    raise UserError(f"unknown loss.name {name!r}; use proxy_anchor or proxy_nca")


class VPTDMLModule(L.LightningModule):
    def __init__(
        self,
        model: Mapping,
        loss: Mapping,
        optim: Mapping,
        num_classes: int,
        eval_ks: Sequence[int] = (1, 2, 4, 8),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embedder = build_embedder(model)
        feature_dim = self.embedder.feature_dim
        embed_dim = model.get("embed_dim") or feature_dim
        num_layers = self.embedder.backbone.num_layers
        self.proxies = build_proxies(model.get("proxy", {}), num_classes, feature_dim, embed_dim, num_layers)
        self.criterion = build_loss(loss)
        self.optim_cfg = dict(optim)
        self.eval_ks = tuple(eval_ks)
        self._eval_buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder(images)

    # -- training ----------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels, _ = batch
        embeddings = self.embedder(images)
        proxies = self.proxies(images, labels, self.embedder.backbone)
        loss = self.criterion(embeddings, labels, proxies)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels))
        return loss

    def parameter_groups(self) -> list[dict]:
        """Proxies / proxy bias B get their own lr (lr_proxy), everything else lr."""
        proxy, main = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (proxy if name.startswith("proxies.bias") else main).append(p)
        o = self.optim_cfg
        wd = o.get("weight_decay", 0.0)
        groups = [{"params": main, "lr": o["lr"], "weight_decay": wd, "name": "main"}]
        if proxy:
            groups.append({"params": proxy, "lr": o["lr_proxy"], "weight_decay": wd, "name": "proxy"})
        return groups

    def configure_optimizers(self):
        o = self.optim_cfg
        groups = self.parameter_groups()
        if o["name"] == "sgd":
            opt = torch.optim.SGD(groups, lr=o["lr"], momentum=o.get("momentum", 0.9))
        elif o["name"] == "adamw":
            opt = torch.optim.AdamW(groups, lr=o["lr"])
        else:
            raise UserError(f"unknown optim.name {o['name']!r}; use sgd or adamw")
        # Cosine per epoch with the presets' own T_max (may be shorter than the run: Cars ViT-B).
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=o["t_max"], eta_min=o["eta_min"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_fit_start(self) -> None:
        self.parameter_summary = parameter_breakdown(self)

    # -- evaluation --------------------------------------------------------------------
    def _collect(self, batch) -> None:
        images, labels, index = batch
        self._eval_buffer.append((self.embedder(images).float(), labels, index))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._collect(batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._collect(batch)

    def gather_embeddings(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All ranks' (embeddings, labels, index), padding removed, sorted by index."""
        emb = torch.cat([b[0] for b in self._eval_buffer])
        labels = torch.cat([b[1] for b in self._eval_buffer])
        index = torch.cat([b[2] for b in self._eval_buffer])
        self._eval_buffer.clear()
        if self.trainer.world_size > 1:
            emb, labels, index = (self.all_gather(t).flatten(0, 1) for t in (emb, labels, index))
        index, first = unique_first(index)
        return emb[first], labels[first], index

    def _evaluate(self, stage: str) -> dict[str, float]:
        emb, labels, index = self.gather_embeddings()
        loader = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        dataset = loader.dataset
        emb, labels = emb.cpu(), labels.cpu()
        if dataset.has_gallery:
            q = dataset.query_mask[index.cpu()]
            g = dataset.gallery_mask[index.cpu()]
            metrics = retrieval_metrics(emb[q], labels[q], self.eval_ks, emb[g], labels[g])
        else:
            metrics = retrieval_metrics(emb, labels, self.eval_ks)
        for key, value in metrics.items():
            # identical on every rank already: no sync needed
            self.log(f"{stage}/{key}", value, prog_bar=key == "recall@1", rank_zero_only=False)
        return metrics

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")


def unique_first(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values and the position of each one's first occurrence."""
    order = torch.argsort(index, stable=True)
    sorted_idx = index[order]
    keep = torch.ones_like(sorted_idx, dtype=torch.bool)
    keep[1:] = sorted_idx[1:] != sorted_idx[:-1]
    return sorted_idx[keep], order[keep]
