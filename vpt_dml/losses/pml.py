"""pytorch-metric-learning's losses (and miners) as `loss` options, through one adapter.

`loss=pml loss.name=MultiSimilarityLoss` (or a preset: conf/loss/pml_*.yaml) builds
`pytorch_metric_learning.losses.<name>(**kwargs)`, with `pytorch_metric_learning.miners.
<miner.name>(**miner.kwargs)` choosing the pairs / triplets when a miner is given. Needs
the `pml` extra (`pip install -e .[pml]`).

- Class count and embedding size: a loss whose constructor takes `num_classes` /
  `embedding_size` (ArcFace, SoftTriple, ProxyAnchor, CosFace, ...) gets them from the
  run in `bind` (the training classes after any validation hold-out, the model's E),
  never from the config.
- Its own parameters (ArcFace's class weights, SoftTriple's centres, ProxyAnchor's
  proxies) form their own optimizer group at `lr` / `weight_decay` (`param_group`).
- Precision: the loss runs in float32 (float64 kept) with autocast off. PML casts its
  parameters in place to the embeddings' dtype (`cast_types`), so a float16 batch under
  16-mixed would turn the class weights into float16 for good.
- The model's proxies are not read (`reads_proxies = False`): the module freezes plain
  learned proxies and refuses semantic ones (their branch would train on nothing).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
import torch.nn as nn

from vpt_dml.errors import UserError

SHAPE_ARGS = ("num_classes", "embedding_size")


def _library():
    try:
        from pytorch_metric_learning import losses, miners
    except ImportError:
        raise UserError(
            "loss=pml* needs pytorch-metric-learning: pip install -e '.[pml]'"
        ) from None
    return losses, miners


def _pml_class(module, kind: str, name: str):
    """`kind`: "losses" or "miners" (the PML module's name)."""
    cls = getattr(module, str(name), None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        suffix = kind[: -2 if kind == "losses" else -1].title()  # Loss, Miner
        known = sorted(
            n for n, c in vars(module).items() if inspect.isclass(c) and n.endswith(suffix)
        )
        raise UserError(
            f"loss{'.miner' if kind == 'miners' else ''}.name={name!r} is not a "
            f"pytorch_metric_learning.{kind} class; e.g. {', '.join(known[:6])}"
        )
    return cls


def _takes(cls, arg: str) -> bool:
    return arg in inspect.signature(cls.__init__).parameters


def _build(cls, kwargs: Mapping, key: str):
    try:
        return cls(**kwargs)
    except TypeError as e:  # an argument the class does not take
        raise UserError(f"{key}: {cls.__name__} refused {dict(kwargs)}: {e}") from None


class PMLLoss(nn.Module):
    """criterion(embeddings, labels, proxies) -> loss, as the suite's own losses; the
    proxies are ignored (the loss has its own class parameters, or none)."""

    reads_proxies = False

    def __init__(
        self,
        name: str,
        kwargs: dict | None = None,
        miner: dict | None = None,
        lr: float | None = None,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        losses, miners = _library()
        self.name = str(name)
        self.loss_class = _pml_class(losses, "losses", name)
        self.kwargs = dict(kwargs or {})
        given = sorted(set(self.kwargs) & set(SHAPE_ARGS))
        if given:
            raise UserError(
                f"loss.kwargs.{given[0]} is set by the run (the training classes, model.embed_dim); "
                "drop it"
            )
        self.loss: nn.Module | None = None
        if not any(_takes(self.loss_class, a) for a in SHAPE_ARGS):
            self.loss = _build(self.loss_class, self.kwargs, "loss.kwargs")
        self.miner = None
        if miner:
            miner = dict(miner)
            extra = sorted(set(miner) - {"name", "kwargs"})
            if extra or "name" not in miner:
                raise UserError(
                    "loss.miner takes {name: <pytorch_metric_learning.miners class>, kwargs: {...}}"
                    f"{'; unknown: ' + ', '.join(extra) if extra else ''}"
                )
            cls = _pml_class(miners, "miners", miner["name"])
            self.miner = _build(cls, dict(miner.get("kwargs") or {}), "loss.miner.kwargs")
        self.lr = lr
        self.weight_decay = weight_decay

    def bind(self, num_classes: int, embedding_size: int) -> None:
        """Build a loss that needs the run's class count / embedding size (called once by
        the module, before the optimizer exists)."""
        if self.loss is not None:
            return
        shape = {"num_classes": int(num_classes), "embedding_size": int(embedding_size)}
        args = {k: v for k, v in shape.items() if _takes(self.loss_class, k)}
        self.loss = _build(self.loss_class, {**self.kwargs, **args}, "loss.kwargs")

    def param_group(self) -> dict | None:
        """The optimizer group of the loss's own parameters (None: it has none)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return None
        if self.lr is None:
            raise UserError(f"loss.lr is null but {self.name} has its own parameters; set loss.lr")
        return {"params": params, "lr": self.lr, "weight_decay": self.weight_decay, "name": "loss"}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, proxies=None) -> torch.Tensor:
        if self.loss is None:
            raise RuntimeError(f"{self.name} needs bind(num_classes, embedding_size) first")
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        for p in self.loss.parameters():  # PML would cast them in place to `dtype`
            if p.dtype != dtype:
                raise UserError(
                    f"{self.name}'s parameters are {p.dtype}, the embeddings {dtype}: run the "
                    "loss in the parameters' precision (trainer.precision=32-true or *-mixed)"
                )
        with torch.autocast(embeddings.device.type, enabled=False):
            emb = embeddings.to(dtype)
            pairs = self.miner(emb, labels) if self.miner is not None else None
            return self.loss(emb, labels, pairs)
