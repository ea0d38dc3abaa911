"""Class-balanced batch sampling: bs/k distinct classes per batch, k images each.

Two samplers, chosen by `data.sampler` (`build_batch_sampler`): `balanced` (this module's
ClassBalancedBatchSampler, below) and `reference` (reference_sampler.py: the reference
implementation's independent draws, seeded with seed + epoch, used by the paper presets).

ClassBalancedBatchSampler: every class once per pass, each class's images in turn.

Deterministic in (seed, epoch). The sampler advances its own epoch each time it is
iterated, so any Trainer (or a plain loop) gets new batches every epoch; `set_epoch`
pins it (exact resume sets it to the resumed epoch). Under DDP every rank builds the same global plan for a
step (world_size * bs/k classes) and takes its own contiguous slice, so the classes of
one step are disjoint across ranks and each rank still sees k images per class.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from vpt_dml.data.reference_sampler import BalancedBatches, ReferenceBatchSampler
from vpt_dml.errors import UserError


class ClassBalancedBatchSampler(BalancedBatches):
    def index_classes(self) -> None:
        self.classes, inverse = np.unique(self.labels, return_inverse=True)
        self.members = [np.flatnonzero(inverse == i) for i in range(len(self.classes))]
        needed = self.classes_per_batch * self.num_replicas
        if needed > len(self.classes):
            raise UserError(
                f"a step needs {needed} distinct classes (batch_size/samples_per_class x devices) "
                f"but the training split has {len(self.classes)}; lower data.batch_size or raise samples_per_class"
            )

    def __len__(self) -> int:
        # METHOD.md §3: an epoch is len(train) // batch size steps (global batch under DDP).
        return max(len(self.labels) // (self.batch_size * self.num_replicas), 1)

    def global_plan(self) -> list[list[int]]:
        """Index lists of every step for all ranks together: each one is world*bs long."""
        rng = np.random.default_rng([self.seed, self.epoch])
        per_step = self.classes_per_batch * self.num_replicas
        # Per-class image queues, reshuffled when exhausted: every image is reached in turn.
        queues = [rng.permutation(m) for m in self.members]
        heads = np.zeros(len(self.members), dtype=np.int64)
        order = rng.permutation(len(self.classes))
        plan = []
        for _ in range(len(self)):
            if len(order) < per_step:
                # Classes left from this pass go first, then a fresh pass without them, so
                # every class is visited once per pass and a step never repeats a class.
                fresh = rng.permutation(len(self.classes))
                order = np.concatenate([order, fresh[~np.isin(fresh, order)]])
            step_classes, order = order[:per_step], order[per_step:]
            batch: list[int] = []
            for c in step_classes:
                for _ in range(self.k):
                    if heads[c] >= len(queues[c]):
                        queues[c] = rng.permutation(self.members[c])
                        heads[c] = 0
                    batch.append(int(queues[c][heads[c]]))
                    heads[c] += 1
            plan.append(batch)
        return plan

    def __iter__(self) -> Iterator[list[int]]:
        # a generator: the plan is drawn at the first batch, not when the loader builds
        # its iterator, so a set_epoch in between still counts
        plan = self.global_plan()
        self.epoch += 1
        start = self.rank * self.batch_size
        for step in plan:
            yield step[start : start + self.batch_size]


SAMPLERS: dict[str, type[Sampler[list[int]]]] = {
    "balanced": ClassBalancedBatchSampler,
    "reference": ReferenceBatchSampler,
}


def check_sampler(kind: str) -> str:
    if kind not in SAMPLERS:
        raise UserError(
            f"data.sampler={kind!r} is not a batch sampler; give one of {', '.join(SAMPLERS)}"
        )
    return kind


def build_batch_sampler(
    kind: str,
    labels: np.ndarray,
    batch_size: int,
    samples_per_class: int,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
) -> Sampler[list[int]]:
    """The training batch sampler `data.sampler` names; both are deterministic in (seed,
    epoch) and take `set_epoch` (exact resume pins the epoch with it)."""
    cls = SAMPLERS[check_sampler(kind)]
    return cls(labels, batch_size, samples_per_class, seed, num_replicas, rank)
