"""The LightningModule: the training step, the optimizer's parameter groups, the host
class-prompt store's hooks, and the evaluation buffer.

The model comes from models/build.py, the loss and the optimizer / scheduler from the
config groups' `_target_` nodes, the evaluation metrics from evaluation/epoch.py.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from vpt_dml import distributed
from vpt_dml.errors import UserError
from vpt_dml.evaluation import per_query
from vpt_dml.evaluation.epoch import epoch_metrics
from vpt_dml.models.build import build_model
from vpt_dml.models.class_prompt_store import ClassPromptStore
from vpt_dml.models.params import format_breakdown, is_proxy_bias, parameter_breakdown
from vpt_dml.models.semantic_proxies import SemanticProxies
from vpt_dml.optim import device_step_kwargs

log = logging.getLogger("vpt_dml")


def from_config(node: Mapping, key: str):
    """hydra.utils.instantiate with the constructors' UserErrors kept as one line."""
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise UserError(f"{key} needs a _target_ (see conf/{key.split('.')[0]}/*.yaml)")
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"{key}: {str(cause).strip().splitlines()[-1]}") from None


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
        built = build_model({"model": model, "loss": loss}, num_classes)
        self.embedder, self.proxies = built.embedder, built.proxies
        # (images, labels) -> (embeddings, proxies): fused or two passes, chosen by build_model
        self.training_outputs = built.training_outputs
        self.criterion = from_config(loss, "loss")
        if hasattr(self.criterion, "bind"):  # its own class parameters (losses/pml.py)
            self.criterion.bind(num_classes, model.get("embed_dim") or self.embedder.feature_dim)
        if not getattr(self.criterion, "reads_proxies", True):
            if isinstance(self.proxies, SemanticProxies):  # the branch would train on nothing
                raise UserError(
                    f"loss {loss.get('name', loss['_target_'])} does not read the semantic "
                    "proxies (VPTSP keeps its Proxy Anchor loss): add model/proxy=learned"
                )
            self.proxies.requires_grad_(False)  # unread: neither trained nor counted
        self.optim_cfg = dict(optim)
        self.eval_ks = tuple(eval_ks)
        self.clustering_every_epoch = clustering_every_epoch
        self.eval_label: str | None = None  # overrides "val" in the logged keys
        self._eval_buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # one {"stage", "epoch", rows, distinct, effective_rank} per evaluation (epoch.py)
        self.embedding_health_log: list[dict] = []
        self.per_query_dir = None  # run.py: where per-query tables go (evaluation/per_query.py)
        self.per_query_held_out = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder(images)

    # -- training ----------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels, _ = batch
        embeddings, proxies = self.training_outputs(images, labels)
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
        inner = getattr(optimizer, "optimizer", optimizer)
        kind = "sgd" if isinstance(inner, torch.optim.SGD) else "adamw"
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
        # a loss's own parameters (ArcFace's W, ...): their own group and lr (losses/pml.py)
        own = self.criterion.param_group() if hasattr(self.criterion, "param_group") else None
        in_own = {id(p) for p in own["params"]} if own else set()
        for name, p in self.named_parameters():
            if p.requires_grad and id(p) not in in_own:
                (proxy if is_proxy_bias(name) else main).append(p)
        o = self.optim_cfg
        wd = o.get("weight_decay", 0.0)
        wd_proxy = o.get("weight_decay_proxy")
        groups = [{"params": main, "lr": o["lr"], "weight_decay": wd, "name": "main"}]
        if proxy:
            wd_proxy = wd if wd_proxy is None else wd_proxy
            groups.append(
                {"params": proxy, "lr": o["lr_proxy"], "weight_decay": wd_proxy, "name": "proxy"}
            )
        return groups + ([own] if own else [])

    def configure_optimizers(self):
        factory = from_config(self.optim_cfg.get("optimizer"), "optim.optimizer")
        try:
            opt = factory(self.parameter_groups(), **device_step_kwargs(factory, self.device))
        except TypeError as e:  # a key the optimizer class does not take
            raise UserError(f"optim.optimizer: {e}") from None
        schedule = from_config(self.optim_cfg.get("scheduler"), "optim.scheduler")
        return {"optimizer": opt, "lr_scheduler": schedule(opt)}

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

    # -- evaluation: fill the buffer here, metrics in evaluation/epoch.py ---------------
    def _collect(self, batch) -> None:
        images, labels, index = batch
        self._eval_buffer.append((self.embedder(images).float(), labels, index))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._collect(batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._collect(batch)

    def _evaluate(self, stage: str, label: str) -> dict[str, float]:
        buffer, self._eval_buffer = self._eval_buffer, []
        # k-means over thousands of classes is slow (SOP: minutes): test stage only, unless
        # eval.clustering_every_epoch is set
        clustering = stage == "test" or self.clustering_every_epoch
        health: dict = {}
        tables = [] if self.per_query_dir is not None else None
        metrics = epoch_metrics(
            buffer, self.trainer, stage, self.eval_ks, clustering, health, per_query=tables
        )
        # the epoch as MetricHistory records it: set for fit's evaluations only
        fitting = self.trainer.state.fn == "fit"
        epoch = self.trainer.current_epoch if fitting else None
        self.embedding_health_log.append({"stage": label, "epoch": epoch, **health})
        if tables and self.trainer.is_global_zero:
            per_query.save_evaluation(self.per_query_dir, label, self.current_epoch, tables[0],
                                      self.eval_ks, self.per_query_held_out)  # fmt: skip
        for key, value in metrics.items():
            # identical on every rank already: no sync needed; float64, as computed (a
            # python float would be logged as float32 and metrics.json would lose bits)
            value = torch.tensor(value, dtype=torch.float64)
            self.log(f"{label}/{key}", value, prog_bar=key == "recall@1", rank_zero_only=False)
        return metrics

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["embedding_health"] = [dict(r) for r in self.embedding_health_log]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # resume: the earlier epochs' records; testing a checkpoint keeps the later ones
        have = {(r["stage"], r["epoch"]) for r in self.embedding_health_log}
        saved = [
            dict(r)
            for r in checkpoint.get("embedding_health") or []
            if (r["stage"], r["epoch"]) not in have
        ]
        self.embedding_health_log = saved + self.embedding_health_log

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val", self.eval_label or "val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test", "test")
