"""Debug aid for DDP: each rank's H and class-prompt bank saved at the end of fit."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class SaveRankState(Callback):
    """At the end of fit each rank saves H and the class-prompt bank to
    `dirpath/rank{r}.pt`, so a test can check that the ranks agree byte for byte."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer, pl_module) -> None:
        proxies = pl_module.proxies
        state: dict = {}
        if hasattr(proxies, "memory"):
            state["memory"] = proxies.memory.detach().cpu().clone()
        store = getattr(getattr(proxies, "class_prompts", None), "store", None)
        if store is not None:
            state["store"] = [t.clone() for t in store.state_tensors()]
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.dirpath / f"rank{trainer.global_rank}.pt")
