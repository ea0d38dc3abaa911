"""Checkpoint files that are whole or absent: atomic writes, disk-full as one line.

Lightning's own writer serialises to memory, then copies from a temporary file in /tmp
into place: when the disk fills during the copy, a truncated `best-epoch002.ckpt` or
`last.ckpt` is left where the good one was. `AtomicCheckpointIO` writes beside the target
(`.<name>.tmp-<pid>`, same file system), fsyncs, and renames over it: a reader sees the
old file or the new one, never a part. ENOSPC (or a full quota) removes the temporary file
and raises `DiskFull`: one line naming the folder, the space the checkpoint needs and
the space left. A state holding NaN/inf is refused (`Diverged`): a diverged run keeps its
last finite checkpoint.

`DiskSpaceCheck` warns at the start of fit when the checkpoint folder has less free
space than KEPT_AT_ONCE checkpoints of this model.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from vpt_dml.errors import DiskFull, Diverged
from vpt_dml.runs.durable import sync_folder

log = logging.getLogger("vpt_dml")

# best + last on disk, and a new one being written before the old one is replaced
KEPT_AT_ONCE = 3
FULL = {errno.ENOSPC, errno.EDQUOT}
# torch's zip format: each tensor is a record (headers, 64-byte alignment): ~380 bytes seen
PER_TENSOR_BYTES = 512
# the pickled rest: hyper-parameters, loop and callback states, RNG states
FIXED_BYTES = 16 * 2**10


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def tensors(obj: Any, prefix: str = ""):
    """(name, tensor) of every tensor in a nested checkpoint dict."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}[{i}]")


def checkpoint_bytes(checkpoint: Mapping) -> int:
    """What torch.save writes, from above: the tensors' bytes and their records."""
    found = [t for _, t in tensors(checkpoint)]
    data = sum(t.numel() * t.element_size() for t in found)
    return data + PER_TENSOR_BYTES * len(found) + FIXED_BYTES


def first_non_finite(checkpoint: Mapping) -> str | None:
    """The first weight or optimizer state holding NaN/inf (callbacks' states may hold a
    legitimate inf, e.g. ModelCheckpoint's best score before any evaluation)."""
    state = {k: checkpoint[k] for k in ("state_dict", "optimizer_states") if k in checkpoint}
    for name, t in tensors(state):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        bad = first_non_finite(checkpoint)
        if bad is not None:
            raise Diverged(
                f"the state to save holds NaN/inf ({bad}): {path} was not written, "
                "the checkpoint on disk is the last finite one; lower optim.lr",
                {"reason": "checkpoint", "tensor": bad, "checkpoint": str(path)},
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            # torch.save reports a failed write as RuntimeError, the OSError in its context
            if _disk_full(e):
                raise DiskFull(no_space_message(path, checkpoint_bytes(checkpoint))) from None
            raise
        sync_folder(path.parent)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


def _disk_full(e: BaseException | None) -> bool:
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in FULL:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def no_space_message(path: Path, need: int) -> str:
    free = shutil.disk_usage(path.parent).free
    earlier = sorted(p.name for p in path.parent.glob("*.ckpt"))
    kept = f"the checkpoints there ({', '.join(earlier)}) are intact" if earlier else ""
    last = path.parent / "last.ckpt"
    # advise only what exists: before the first epoch's last.ckpt there is nothing to resume
    then = (
        f"then resume with ckpt_path={last}"
        if last.is_file()
        else "then start the run again (no epoch was saved to resume from)"
    )
    return (
        f"no space left in {path.parent} to write {path.name}: it needs about {mib(need)}, "
        f"{mib(free)} free; {kept + '; ' if kept else ''}free space there (or point "
        f"paths.output_dir at a larger disk), {then}"
    )


def estimated_checkpoint_bytes(module: torch.nn.Module) -> int:
    """The module's state plus two optimizer moments per trainable value (AdamW; SGD with
    momentum keeps one): an upper estimate before any checkpoint exists."""
    state = [t for _, t in tensors(module.state_dict())]  # extra states may be dicts
    trainable = [p for p in module.parameters() if p.requires_grad]
    data = sum(t.numel() * t.element_size() for t in state)
    data += 2 * sum(p.numel() * p.element_size() for p in trainable)
    return data + PER_TENSOR_BYTES * (len(state) + 2 * len(trainable)) + FIXED_BYTES


class DiskSpaceCheck(L.Callback):
    """Warns once, at the start of fit, when checkpoints may not fit on the disk."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        folders = {
            Path(c.dirpath)
            for c in trainer.checkpoint_callbacks  # Lightning's own list, its default one too
            if isinstance(c, ModelCheckpoint) and c.dirpath
        }
        need = KEPT_AT_ONCE * estimated_checkpoint_bytes(pl_module)
        for folder in sorted(folders):
            free = free_bytes(folder)
            if free is not None and free < need:
                log.warning(
                    "only %s free in %s: this run keeps up to %d checkpoints of about %s there "
                    "(best, last, one being written); free space or point paths.output_dir "
                    "at a larger disk",
                    mib(free),
                    folder,
                    KEPT_AT_ONCE,
                    mib(need / KEPT_AT_ONCE),
                )


def free_bytes(folder: Path) -> int | None:
    """Free space where `folder` is or will be created (its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None
