"""Learning-rate schedules and optimizer settings the `optim` config group builds.

conf/optim/*.yaml hold two `_target_` nodes: `optimizer` (a torch optimizer class,
`_partial_: true`, called with the module's parameter groups) and `scheduler` (this
module's `cosine_per_epoch`, `_partial_: true`, called with the optimizer).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR

from vpt_dml.errors import UserError


def cosine_per_epoch(optimizer: torch.optim.Optimizer, t_max: int, eta_min: float) -> dict:
    """Cosine annealing stepped once per epoch, in Lightning's lr_scheduler form.

    Past t_max the lr rises again, as torch's CosineAnnealingLR does (the released Cars
    ViT-B preset: T_max 50 for 60 epochs).
    """
    if int(t_max) < 1:
        raise UserError(f"optim.t_max={t_max} must be >= 1 (epochs of the cosine period)")
    scheduler = CosineAnnealingLR(optimizer, T_max=int(t_max), eta_min=float(eta_min))
    return {"scheduler": scheduler, "interval": "epoch"}


def device_step_kwargs(factory: Callable, device: torch.device) -> dict:
    """`fused=True` for an optimizer that offers it, on CUDA, unless the config chose.

    One kernel for the whole update instead of one per tensor, and with a GradScaler
    (16-mixed) no host sync: the fused step reads the overflow flag on the device. Same
    update formula; only float rounding differs from the per-tensor loop.
    """
    if device.type != "cuda":
        return {}
    keywords = getattr(factory, "keywords", {}) or {}
    if keywords.get("fused") is not None or keywords.get("foreach") is not None:
        return {}
    func = getattr(factory, "func", factory)
    try:
        accepts = "fused" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return {}
    return {"fused": True} if accepts else {}
