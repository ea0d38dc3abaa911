"""Collective helpers for DDP training (all no-ops in a single process).

Global batch under DDP. Every rank all-gathers the batch's embeddings, semantic
embeddings and labels in rank order (`gather_batch`, differentiable) and computes the
same fold of H and the same loss L on the global batch, so H and the proxies stay
identical on every rank without broadcasting them. Gradient maths: the all-gather's
backward sums the gradients the W ranks send to a rank's own slice, so a rank's local
tensors receive W * dL/dx; DDP then averages the parameter gradients over the W ranks,
which gives exactly dL/dθ of a single process on the global batch for every parameter
(those used after the gather, e.g. the GRU cell and B, get the full dL/dθ on every rank,
and their average is that too). The class-prompt store is outside DDP, so it divides its
exchanged row gradients by W itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# every variable a launcher sets for a process that is not global rank 0: Lightning's DDP
# children (LOCAL_RANK, NODE_RANK), torchrun (RANK, LOCAL_RANK, GROUP_RANK), srun
# (SLURM_PROCID). NODE_RANK=1 LOCAL_RANK=0 is the first process of the second node: not zero.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def is_global_zero() -> bool:
    """THE rank-zero test of the suite: global rank 0, or a process outside DDP.

    Inside a process group its rank decides; before the group exists (the run folder, the
    seed, error lines, the watchdog) the launchers' environment does: any rank variable
    other than 0 means another rank."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    for var in RANK_VARIABLES:
        value = os.environ.get(var, "0").strip() or "0"
        if value.isdigit() and int(value) != 0:
            return False
    return True


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (one all-reduce under DDP)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int32)
    t = t.to(_collective_device(t))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _collective_device(t: torch.Tensor) -> torch.device:
    """NCCL moves only CUDA tensors; gloo takes them where they are."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def gather_batch(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor concatenated over ranks in rank order (same length on every rank).

    Differentiable for tensors that require grad (see the module docstring).
    """
    if world_size() == 1:
        return tensors
    from torch.distributed.nn.functional import all_gather as all_gather_autograd

    out = []
    for t in tensors:
        if t.requires_grad:
            out.append(torch.cat(all_gather_autograd(t), dim=0))
        else:
            parts = [torch.empty_like(t) for _ in range(world_size())]
            dist.all_gather(parts, t.contiguous())
            out.append(torch.cat(parts, dim=0))
    return tuple(out)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` (any length along dim 0) of every rank, concatenated in rank order; no autograd."""
    if world_size() == 1:
        return t
    device = _collective_device(t)
    n = torch.tensor([t.shape[0]], device=device)
    sizes = [torch.empty_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)


def broadcast_host_(t: torch.Tensor, chunk: int = 1 << 24) -> None:
    """Overwrite `t` with rank 0's copy, in chunks (host tables can be gigabytes)."""
    if world_size() == 1:
        return
    device = _collective_device(t)
    flat = t.view(-1)
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk].to(device)
        dist.broadcast(part, src=0)
        if part.data_ptr() != flat[start:].data_ptr():
            flat[start : start + chunk].copy_(part)


_shared_seed: int | None = None


@contextlib.contextmanager
def shared_rng(step: int) -> Iterator[None]:
    """Inside, torch's RNG gives the same draws on every rank (e.g. the fold's dropout).

    Seeded by rank 0's initial seed (exchanged once) and `step`; the surrounding RNG
    state is restored afterwards, so the data augmentation streams are untouched.
    """
    global _shared_seed
    if world_size() == 1:
        yield
        return
    if _shared_seed is None:
        seed = torch.tensor([torch.initial_seed() % (1 << 62)], dtype=torch.int64)
        seed = seed.to(_collective_device(seed))
        dist.broadcast(seed, src=0)
        _shared_seed = int(seed)
    devices = (
        [torch.cuda.current_device()]
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((_shared_seed + 1_000_003 * step) % (1 << 63))
        yield
