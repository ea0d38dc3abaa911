"""Class-prompt bank in host memory (METHOD.md §3 "Class-prompt bank").

Every class's prompts Q_l[c] and their optimizer moments live in host memory; a step
puts only the rows of the batch's classes on the device:

1. `gather(labels)` copies the batch's rows to the device as fresh leaf tensors
   (requires_grad), one per prompted layer, and returns them indexed per sample.
2. backward fills the leaves' .grad.
3. `step(group, kind)` (after the main optimizer step) applies a row-wise AdamW / SGD
   with the main param group's hyper-parameters and current lr; a class not in the batch
   does not move at all (no weight decay, no momentum drift), unlike a dense optimizer.
   The updated rows and moments go back to host memory.

Adam's step count t (bias correction), `step_count`:
- "per_row": each row counts its own steps, as one torch AdamW per class would: a row
  seen for the first time gets the full first-step correction.
- "global" (the reference's): one count for the whole bank, advanced once per applied
  training step (not on a skipped AMP-overflow step); the rows a step updates are
  corrected with that count, their moments stay per row. This is what an AdamW whose
  single parameter is replaced by the batch's rows every step does when its state's
  step is carried over, as the reference's optimizer does. A row first seen late is
  therefore barely bias-corrected (its first moves are smaller than per_row's).
SGD has no step count; its momentum buffer starts at a row's own first step in both modes.

Device memory and per-step cost depend on the number of rows in the batch, not on C.

Under DDP the step exchanges (class ids, row gradients) of all ranks and every rank
applies the same update to the union of the touched rows, so the bank stays identical
on every rank; rows of the same class from several ranks (or several accumulated
micro-batches) have their gradients summed, as a single process would.

Copies: host tables are ordinary (pageable) memory; the rows of a step pass through
pinned staging buffers, host->device copies of the next batch's rows run on a side
stream during the image branch (`prefetch`), and device->host write-backs are queued
asynchronously and completed lazily before the tables are next read. Pinning only the
staging buffers keeps gigabytes of page-locked memory out of the host.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from vpt_dml import distributed
from vpt_dml.errors import UserError

log = logging.getLogger("vpt_dml")

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STEP_COUNTS = ("per_row", "global")


def class_prompt_dtype(name: str) -> torch.dtype:
    if name not in STORAGE_DTYPES:
        raise UserError(
            f"model.proxy.class_prompt_dtype={name!r} is not supported; use float32 or bfloat16"
        )
    return STORAGE_DTYPES[name]


class ClassPromptStore(nn.Module):
    """Host-resident (C, M_l, D) tables with row-wise optimizer state.

    Not parameters and not buffers: `.to(device)` and DDP leave the tables alone; they
    reach checkpoints through `get_extra_state`.
    """

    def __init__(
        self,
        initial: Sequence[torch.Tensor],
        counts: Sequence[int],
        dtype: torch.dtype = torch.float32,
        step_count: str = "per_row",
    ) -> None:
        """initial: the (C, M_l, D) tables of the prompted layers (counts[l] > 0), in order.

        step_count: "per_row" or "global", Adam's bias-correction count (module docstring).
        """
        super().__init__()
        if step_count not in STEP_COUNTS:
            raise UserError(
                f"model.proxy.class_prompt_step={step_count!r}; use global (the reference's one "
                "Adam step count for the bank) or per_row (one count per class)"
            )
        self.step_count = step_count
        self.counts = list(counts)
        if len(initial) != sum(m > 0 for m in self.counts):
            raise ValueError("one initial table per prompted layer expected")
        self.dtype = dtype
        self.values = [t.detach().to("cpu", dtype).contiguous() for t in initial]
        num_classes = initial[0].shape[0] if initial else 0
        # Moments are allocated on the first step, for the optimizer actually used.
        self.moments: dict[str, list[torch.Tensor]] = {}
        self.steps = torch.zeros(num_classes, dtype=torch.int64)  # per row, in both modes
        # applied steps of the whole bank (shape (1,), not 0-d: byte views and chunked
        # broadcasts treat it like the other state tensors)
        self.global_steps = torch.zeros(1, dtype=torch.int64)
        self._fetched: list[tuple[torch.Tensor, list[torch.Tensor]]] = []  # (class ids, leaves)
        self._prefetched: tuple[torch.Tensor, list[torch.Tensor], Any] | None = None
        self._pending_write: (
            tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], Any] | None
        ) = None
        self._copy_stream = None
        self.last_device_bytes = 0  # class-prompt bytes held on the device in the last step

    # -- host <-> device ---------------------------------------------------------------
    def _flush(self) -> None:
        """Finish the queued device->host write-back before the tables are read."""
        if self._pending_write is None:
            return
        ids, pairs, event = self._pending_write
        if event is not None:
            event.synchronize()
        for table, rows in pairs:
            table.index_copy_(0, ids, rows)
        self._pending_write = None

    def _to_device(self, tables: Sequence[torch.Tensor], ids: torch.Tensor, device: torch.device):
        """Rows `ids` of each table on `device` (async through pinned memory on CUDA)."""
        if device.type != "cuda":
            return [t.index_select(0, ids).to(device) for t in tables], None
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        staged = []
        for t in tables:
            buf = torch.empty((len(ids), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
            staged.append(torch.index_select(t, 0, ids, out=buf))
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            rows = [s.to(device, non_blocking=True) for s in staged]
            event = torch.cuda.Event()
            event.record(stream)
        return rows, event

    def _to_host(
        self, tables: Sequence[torch.Tensor], ids: torch.Tensor, rows: Sequence[torch.Tensor]
    ) -> None:
        """Queue `tables[i][ids] = rows[i]`; completed by `_flush` (lazily on CUDA)."""
        self._flush()
        if rows and rows[0].device.type == "cuda":
            staged = []
            for r, t in zip(rows, tables):
                buf = torch.empty(r.shape, dtype=t.dtype, pin_memory=True)
                buf.copy_(r.to(t.dtype), non_blocking=True)
                staged.append(buf)
            event = torch.cuda.Event()
            event.record()
            self._pending_write = (ids, list(zip(tables, staged)), event)
        else:
            self._pending_write = (ids, [(t, r.to(t.dtype)) for t, r in zip(tables, rows)], None)
            self._flush()

    def prefetch(self, labels: torch.Tensor, device: torch.device) -> None:
        """Start copying the rows of `labels`' classes to `device` (overlaps the image branch)."""
        if device.type != "cuda":
            return  # nothing to overlap with on CPU: `gather` copies synchronously
        self._flush()
        ids = torch.unique(labels.cpu())
        rows, event = self._to_device(self.values, ids, device)
        self._prefetched = (ids, rows, event)

    # -- forward ---------------------------------------------------------------------
    def gather(self, labels: torch.Tensor) -> list[torch.Tensor | None]:
        """Per layer, the (B, M_l, D) prompts of each sample's class (None: no prompts)."""
        device = labels.device
        ids = torch.unique(labels.cpu())
        pre, self._prefetched = self._prefetched, None
        if pre is not None and torch.equal(pre[0], ids):
            rows, event = pre[1], pre[2]
            if event is not None:
                torch.cuda.current_stream(device).wait_event(event)
                for r in rows:
                    r.record_stream(torch.cuda.current_stream(device))
        else:
            self._flush()
            rows, _ = self._to_device(self.values, ids, device)
            if device.type == "cuda":
                torch.cuda.current_stream(device).wait_stream(self._copy_stream)
        leaves = [r.float().detach().requires_grad_(self.training) for r in rows]
        if self.training:
            self._fetched.append((ids.to(device), leaves))
        inverse = torch.searchsorted(ids.to(device), labels)
        out: list[torch.Tensor | None] = []
        it = iter(leaves)
        for m in self.counts:
            out.append(next(it)[inverse] if m > 0 else None)
        return out

    # -- optimizer ---------------------------------------------------------------------
    def discard(self) -> None:
        """Forget the rows fetched since the last step (e.g. a skipped step)."""
        self._fetched.clear()

    def _batch_gradients(self, divisor: float) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """(sorted class ids, per-layer summed gradients) of every rank's fetched rows."""
        if not self._fetched:
            local_ids, local_grads = None, None
        else:
            local_ids = torch.cat([ids for ids, _ in self._fetched])
            local_grads = [
                torch.cat(
                    [
                        leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                        for leaf in layer
                    ]
                )
                for layer in zip(*(leaves for _, leaves in self._fetched))
            ]
        self._fetched.clear()
        if distributed.world_size() > 1:
            if local_ids is None:
                raise RuntimeError(
                    "class-prompt store: a rank reached the optimizer step without a forward"
                )
            local_ids = distributed.all_gather_rows(local_ids)
            local_grads = [distributed.all_gather_rows(g) for g in local_grads]
        if local_ids is None:
            return None
        ids, inverse = torch.unique(local_ids, return_inverse=True)
        # With classes disjoint across ranks (the sampler's guarantee) no row is summed
        # twice, so the sum is exact and identical on every rank.
        grads = [
            torch.zeros((len(ids), *g.shape[1:]), dtype=torch.float32, device=g.device).index_add_(
                0, inverse, g.float()
            )
            / divisor
            for g in local_grads
        ]
        return ids, grads

    @torch.no_grad()
    def step(
        self,
        group: dict,
        kind: str,
        grad_scale: float = 1.0,
        grad_divisor: float = 1.0,
        skip: bool = False,
    ) -> bool:
        """Row-wise update of the rows fetched since the last step; True if applied.

        group: the main param group (lr, weight_decay, betas/eps or momentum/...).
        grad_scale: the AMP loss scale the backward used (16-mixed); gradients are divided
        by it. grad_divisor: extra divisor (world size under the global-batch DDP loss).
        skip: the main optimizer skipped this step (AMP overflow); the bank skips it too.
        """
        batch = self._batch_gradients(grad_divisor * grad_scale)
        if batch is None or skip:
            return False
        ids, grads = batch
        if not all(torch.isfinite(g).all() for g in grads):
            return False  # an overflowed fp16 step: the main optimizer skips it as well
        device = grads[0].device
        self._flush()
        ids_host = ids.cpu()
        names = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}
        if kind not in names:
            raise UserError(
                f"the class-prompt store supports adamw and sgd, not {kind!r}; use optim=adamw or optim=sgd"
            )
        moment_names = names[kind] if kind == "adamw" or group.get("momentum", 0) else ()
        for name in moment_names:
            if name not in self.moments:
                self.moments[name] = [torch.zeros_like(v) for v in self.values]
        tables = list(self.values) + [t for name in moment_names for t in self.moments[name]]
        rows, event = self._to_device(tables, ids_host, device)
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)
        rows = [r.float() for r in rows]
        n = len(self.values)
        params = rows[:n]
        moments = [rows[n * (i + 1) : n * (i + 2)] for i in range(len(moment_names))]
        # Every rank reaches here with the same gathered gradients and the same skip
        # decision, so both counts advance identically on every rank.
        self.steps[ids_host] += 1
        self.global_steps += 1
        # SGD reads t only to start a row's momentum at its own first step, in both modes
        use_global = kind == "adamw" and self.step_count == "global"
        t = self.global_steps.expand(len(ids_host)) if use_global else self.steps[ids_host]
        t = t.to(device=device, dtype=torch.float64)[:, None, None]
        lr = float(group["lr"])
        for i, (p, g) in enumerate(zip(params, grads)):
            if kind == "adamw":
                adamw_rows(p, g, moments[0][i], moments[1][i], t, lr, group)
            else:
                sgd_rows(p, g, moments[0][i] if moments else None, t, lr, group)
        self.last_device_bytes = sum(r.numel() * r.element_size() for r in rows) + sum(
            g.numel() * g.element_size() for g in grads
        )
        self._to_host(tables, ids_host, params + [m for ms in moments for m in ms])
        return True

    # -- state -------------------------------------------------------------------------
    def numel(self) -> int:
        return sum(v.numel() for v in self.values)

    def state(self) -> dict[str, Any]:
        """Host tables, moments, per-row and global step counts (shared, not copied)."""
        self._flush()
        return {
            "values": list(self.values),
            "moments": {k: list(v) for k, v in self.moments.items()},
            "steps": self.steps,
            "global_steps": self.global_steps,
        }

    def get_extra_state(self) -> dict[str, Any]:
        return self.state()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._flush()
        self._fetched.clear()
        self._prefetched = None
        values = state["values"]
        if [tuple(v.shape) for v in values] != [tuple(v.shape) for v in self.values]:
            raise UserError(
                "the checkpoint's class-prompt bank has shapes "
                f"{[tuple(v.shape) for v in values]}, this model {[tuple(v.shape) for v in self.values]}; "
                "resume with the same dataset and model.proxy.class_prompts"
            )
        for mine, theirs in zip(self.values, values):
            mine.copy_(theirs)
        self.moments = {
            k: [m.to(self.dtype).clone() for m in v] for k, v in state["moments"].items()
        }
        self.steps.copy_(state["steps"])
        if "global_steps" in state:
            self.global_steps.copy_(state["global_steps"])
        else:
            # A checkpoint from before the global count: the most-stepped row is a lower
            # bound of the steps applied (exact when a class was in every step). Only the
            # "global" mode reads it, where t is already large enough after a resume that
            # Adam's bias correction is close to 1 either way.
            self.global_steps.fill_(int(self.steps.max()) if len(self.steps) else 0)
            if self.step_count == "global":
                log.warning(
                    "the class-prompt bank's checkpoint has no global Adam step count (made "
                    "before model.proxy.class_prompt_step existed); continuing from %d, the "
                    "most-stepped class's count",
                    int(self.global_steps),
                )

    def broadcast_from_rank0(self) -> None:
        """Make every rank's bank equal rank 0's (fit start under DDP; seeds may differ)."""
        self._flush()
        for t in self.state_tensors():
            distributed.broadcast_host_(t)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every state tensor; the per-row step counts come last."""
        self._flush()
        moments = [m for ms in self.moments.values() for m in ms]
        return list(self.values) + moments + [self.global_steps, self.steps]


def adamw_rows(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    lr: float,
    group: dict,
) -> None:
    """torch.optim.AdamW's update, with a step count `t` per row (broadcast (R, 1, 1))."""
    if group.get("amsgrad") or group.get("maximize"):
        raise UserError("the class-prompt store does not implement amsgrad/maximize; turn them off")
    beta1, beta2 = group.get("betas", (0.9, 0.999))
    eps, wd = group.get("eps", 1e-8), group.get("weight_decay", 0.0)
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias1 = (1 - beta1**t).float()
    bias2_sqrt = (1 - beta2**t).sqrt().float()
    p.sub_(lr * m / bias1 / (v.sqrt() / bias2_sqrt + eps))


def sgd_rows(
    p: torch.Tensor,
    g: torch.Tensor,
    buf: torch.Tensor | None,
    t: torch.Tensor,
    lr: float,
    group: dict,
) -> None:
    """torch.optim.SGD's update; a row's momentum buffer starts at its own first step."""
    momentum, dampening = group.get("momentum", 0.0), group.get("dampening", 0.0)
    wd, nesterov = group.get("weight_decay", 0.0), group.get("nesterov", False)
    if wd:
        g = g.add(p, alpha=wd)
    if buf is not None:
        first = t == 1
        buf.copy_(torch.where(first, g, buf * momentum + (1 - dampening) * g))
        g = g.add(buf, alpha=momentum) if nesterov else buf
    p.sub_(lr * g)
