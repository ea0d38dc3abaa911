"""The LightningModule: wires the embedder, the proxies, the loss and the optimizers.

Training: image branch embeddings + proxies (learned or semantic) -> Proxy Anchor.
Evaluation: image branch only; embeddings gathered from all ranks, de-duplicated by
dataset index, metrics computed once and logged identically on every rank.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import lightning as L
import torch
import torch.nn as nn

from vpt_dml import distributed
from vpt_dml.errors import UserError
from vpt_dml.evaluation import clustering_metrics, retrieval_metrics
from vpt_dml.losses import ProxyAnchorLoss, ProxyNCALoss
from vpt_dml.models.class_prompt_store import ClassPromptStore
from vpt_dml.models.embedder import build_embedder
from vpt_dml.models.params import format_breakdown, parameter_breakdown
from vpt_dml.models.precision import cast_frozen_weights_
from vpt_dml.models.prompted_vit import layer_counts
from vpt_dml.models.proxies import LearnedProxies
from vpt_dml.models.semantic_proxies import SemanticProxies
from vpt_dml.models.two_branch import two_branch_outputs

log = logging.getLogger("vpt_dml")


def build_proxies(
    cfg: Mapping, num_classes: int, feature_dim: int, embed_dim: int, num_layers: int
) -> nn.Module:
    kind = cfg.get("kind", "learned")
    if kind == "learned":
        return LearnedProxies(num_classes, embed_dim)
    if kind in ("semantic_mix", "semantic_gru"):
        q = cfg.get("class_prompts") or {}
        counts = layer_counts(q.get("num", 0), q.get("depth", 0), q.get("step", 0), num_layers)
        update = "mix" if kind == "semantic_mix" else cfg.get("update", "gru_relu")
        if not 0.0 <= cfg.get("bias_ratio", 0.5) <= 1.0:
            raise UserError(f"model.proxy.bias_ratio={cfg['bias_ratio']} must lie in [0, 1]")
        return SemanticProxies(
            num_classes,
            feature_dim,
            embed_dim,
            counts,
            update=update,
            bias_ratio=cfg.get("bias_ratio", 0.5),
            dropout=cfg.get("dropout", 0.0),
            mix_lambda=cfg.get("mix_lambda", 0.8),
            **class_prompt_store_kwargs(cfg),
        )
    raise UserError(f"unknown model.proxy.kind {kind!r}; use learned, semantic_mix or semantic_gru")


def class_prompt_store_kwargs(cfg: Mapping) -> dict:
    """`model.proxy.class_prompt_store`: device (dense table) or host (the reference's bank,
    models/class_prompt_store.py); `class_prompt_dtype`: float32 | bfloat16 host storage."""
    store = cfg.get("class_prompt_store", "device")
    if store not in ("device", "host"):
        raise UserError(f"model.proxy.class_prompt_store={store!r}; use device or host")
    return {
        "class_prompt_store": store,
        "class_prompt_dtype": cfg.get("class_prompt_dtype", "float32"),
    }


def build_loss(cfg: Mapping) -> nn.Module:
    if "_target_" in cfg:  # TEMP shim (lead drops): the arch helper's instantiate replaces this
        from hydra.utils import instantiate

        return instantiate(dict(cfg))
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
        clustering_every_epoch: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embedder = build_embedder(model)
        self.clustering_every_epoch = clustering_every_epoch
        if model.get("frozen_weights_dtype") == "bfloat16":
            # cast once instead of on every autocast step; needs bf16-mixed precision
            cast_frozen_weights_(self.embedder, torch.bfloat16)
        if model.get("compile", False):
            # compile the inner blocks in place (state-dict keys unchanged), not the module
            for block in self.embedder.backbone.vit.blocks:
                block.compile()
        feature_dim = self.embedder.feature_dim
        embed_dim = model.get("embed_dim") or feature_dim
        num_layers = self.embedder.backbone.num_layers
        self.proxies = build_proxies(
            model.get("proxy", {}), num_classes, feature_dim, embed_dim, num_layers
        )
        self.criterion = build_loss(loss)
        self.optim_cfg = dict(optim)
        self.eval_ks = tuple(eval_ks)
        self._eval_buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder(images)

    # -- training ----------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels, _ = batch
        if self.hparams["model"].get("fused_branches", False) and isinstance(
            self.proxies, SemanticProxies
        ):
            # image and semantic branch as one 2B pass: same maths, less work (two_branch.py)
            embeddings, proxies = two_branch_outputs(self.embedder, self.proxies, images, labels)
        else:
            embeddings = self.embedder(images)
            proxies = self.proxies(images, labels, self.embedder.backbone)
        # DDP: the loss sees the global batch on every rank (gradient maths: distributed.py)
        embeddings, labels = distributed.gather_batch(embeddings, labels)
        loss = self.criterion(embeddings, labels, proxies)
        self.log(
            "train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels)
        )
        return loss

    # -- class-prompt store (model.proxy.class_prompt_store=host) ------------------------
    @property
    def class_prompt_store(self) -> ClassPromptStore | None:
        return getattr(getattr(self.proxies, "class_prompts", None), "store", None)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.class_prompt_store is not None:  # H2D copy overlaps the image branch
            self.class_prompt_store.prefetch(batch[1], self.device)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The main step, then the store's row-wise step with the main group's settings.

        16-mixed: the store's gradients carry the GradScaler's scale of this backward (read
        before the step) and are divided by it; when the scaler skips the step (overflow,
        seen as a lowered scale) the store skips it too. bf16/32: no scaling.
        """
        store = self.class_prompt_store
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and store is not None else 1.0
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if store is None:
            return
        skipped = scaler is not None and float(scaler.get_scale()) < scale
        group = next(g for g in optimizer.param_groups if g.get("name") == "main")
        kind = (
            "sgd"
            if isinstance(getattr(optimizer, "optimizer", optimizer), torch.optim.SGD)
            else "adamw"
        )
        # the global-batch loss gives each rank W x its rows' gradient (distributed.py)
        store.step(
            group, kind, grad_scale=scale, grad_divisor=self.trainer.world_size, skip=skipped
        )

    def parameter_groups(self) -> list[dict]:
        """Two groups: "main" (everything trainable but B) at lr, "proxy" (B) at lr_proxy.

        The reference builds two optimizers of the same class, one per group, both
        cosine-annealed with the same T_max/eta_min and stepped together. With one class and
        one schedule, per-group state and per-group lr make that exactly one optimizer with
        two param groups (SGD momentum, Adam moments are per parameter anyway). The reference
        applies the same weight decay to B; optim.weight_decay_proxy overrides it.
        """
        proxy, main = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (proxy if name.startswith("proxies.bias") else main).append(p)
        o = self.optim_cfg
        wd = o.get("weight_decay", 0.0)
        wd_proxy = o.get("weight_decay_proxy")
        groups = [{"params": main, "lr": o["lr"], "weight_decay": wd, "name": "main"}]
        if proxy:
            groups.append(
                {
                    "params": proxy,
                    "lr": o["lr_proxy"],
                    "weight_decay": wd if wd_proxy is None else wd_proxy,
                    "name": "proxy",
                }
            )
        return groups

    def configure_optimizers(self):
        o = self.optim_cfg
        groups = self.parameter_groups()
        if "optimizer" in o:  # TEMP shim (lead drops): arch helper's vpt_dml.optim replaces this
            from hydra.utils import instantiate

            opt = instantiate(o["optimizer"])(groups)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, T_max=int(o["t_max"]), eta_min=float(o["eta_min"])
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if o["name"] == "sgd":
            opt = torch.optim.SGD(groups, lr=o["lr"], momentum=o.get("momentum", 0.9))
        elif o["name"] == "adamw":
            opt = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o.get("betas", (0.9, 0.999))))
        else:
            raise UserError(f"unknown optim.name {o['name']!r}; use sgd or adamw")
        if int(o["t_max"]) < 1:
            raise UserError(f"optim.t_max={o['t_max']} must be >= 1 (epochs of the cosine period)")
        # Cosine per epoch with the preset's own T_max; past T_max the lr rises again
        # (Cars ViT-B: T_max 50 for 60 epochs), as torch's CosineAnnealingLR does.
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=int(o["t_max"]), eta_min=float(o["eta_min"])
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_fit_start(self) -> None:
        if self.class_prompt_store is not None:
            if self.trainer.gradient_clip_val:
                raise UserError(
                    "trainer.gradient_clip_val does not reach the host class-prompt store; "
                    "set trainer.gradient_clip_val=null or model.proxy.class_prompt_store=device"
                )
            self.class_prompt_store.broadcast_from_rank0()  # DDP: start identical
        # parameters kept outside the module (a host-side class-prompt store) report here
        extra_fn = getattr(self.proxies, "external_parameter_counts", None)
        self.parameter_summary = parameter_breakdown(self, extra_fn() if extra_fn else None)
        flat = {
            f"params/{comp}/{key}": value
            for comp, row in self.parameter_summary.items()
            for key, value in row.items()
        }
        for logger in self.loggers:
            logger.log_hyperparams(flat)
        if self.trainer.is_global_zero:
            log.info(
                "parameters (trainable / total):\n%s", format_breakdown(self.parameter_summary)
            )

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
        # metrics run where the embeddings are: torch path on GPU, bf16 candidates on CPU
        labels, index = labels.to(emb.device), index.to(emb.device)
        # images skipped as undecodable (data.skip_broken=true) carry label -1: left out
        kept = labels >= 0
        emb, labels, index = emb[kept], labels[kept], index[kept]
        if dataset.has_gallery:
            q = dataset.query_mask.to(emb.device)[index]
            g = dataset.gallery_mask.to(emb.device)[index]
            metrics = retrieval_metrics(emb[q], labels[q], self.eval_ks, emb[g], labels[g])
        else:
            metrics = retrieval_metrics(emb, labels, self.eval_ks)
        # k-means over thousands of classes is slow (SOP: minutes): test stage only, unless
        # eval.clustering_every_epoch is set
        if stage == "test" or self.clustering_every_epoch:
            metrics.update(self._clustering(emb, labels))
        for key, value in metrics.items():
            # identical on every rank already: no sync needed
            self.log(f"{stage}/{key}", value, prog_bar=key == "recall@1", rank_zero_only=False)
        return metrics

    def _clustering(self, emb: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """NMI / F1 on all evaluated items; computed on rank 0 and broadcast, since
        multi-threaded k-means need not give identical clusters on every rank."""
        classes = len(torch.unique(labels))
        if classes < 2 or len(labels) <= classes:
            log.warning("NMI/F1 skipped: k-means needs >= 2 classes and more items than classes")
            return {}
        result = None
        if self.trainer.is_global_zero:
            # on GPU: torch k-means on the device; on CPU: faiss k-means when installed
            result = clustering_metrics(emb, labels, seed=0)
        if self.trainer.world_size > 1:
            result = self.trainer.strategy.broadcast(result, src=0)
        return result

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
