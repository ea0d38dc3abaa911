"""The reference implementation's batch sampler (`data.sampler=reference`).

What the VPTSP-G reference (`datasampler/class_random_sampler.py`, after Roth et al.'s
DML codebase) does, restated:

- an epoch is `len(train images) // batch_size` batches, each drawn independently of the
  others (a class can come back in the next batch, an image too);
- a batch: `batch_size // samples_per_class` classes, then `samples_per_class` images of
  each class, all with `smart_sample` below (`random.sample`; when more are asked than
  there are, every element that many whole times plus a `random.sample` of the rest, then
  `random.shuffle`); the batch lists the classes in draw order, each class's images
  contiguous;
- the draws come from Python's global `random`, which the reference's `main.py` reseeds
  with `seed + epoch` at the start of every epoch; nothing else in its main process draws
  from `random` (crops and flips are torch draws, made in the loader's workers).

Here every epoch draws from a private `random.Random(seed + epoch)`. `random.seed(n)` and
`random.Random(n)` initialise the same Mersenne Twister state for an int n, and
`random.sample` / `random.shuffle` pick by position (they read only the sequence's
length), so for the same seed, the same classes in the same order (the reference: its
class keys sorted; here: ascending label) and the same images in each class in the same
order (the reference: the order its dataset file lists them; here: the records' order),
this yields the reference's batches, as indices into this dataset. It holds for the
CPython `random` module's algorithms, unchanged from 3.2 to at least 3.13.

Note what `seed + epoch` implies: seed s at epoch e draws the same batches as seed s+1 at
epoch e-1. Seeds meant as independent repeats should differ by more than max_epochs.

Under DDP (the reference's own `DistributedBatchSampler`, which its `main.py` never
reaches): every rank draws the whole epoch's stream, pads it by repeating its first
batches up to a multiple of the world size, and takes batches rank, rank+W, ...; so each
rank has its own batches and a W-device run trains on the one-device run's batches, W at a
time. Classes are not disjoint across the ranks of a step (independent draws).

Resume: the batches are a function of (seed, epoch) alone; `set_epoch` pins the epoch, as
for the balanced sampler. A resume within an epoch restarts it (nothing records the
position), like the balanced sampler.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from vpt_dml.errors import UserError

log = logging.getLogger(__name__)


def smart_sample(rng: random.Random, items: Sequence[int], n: int) -> list[int]:
    """n of `items`: `rng.sample` when there are enough, else every item n // len times
    plus a sample of n % len, shuffled (the reference's `_smart_sample`, draw for draw)."""
    if n <= len(items):
        return rng.sample(items, n)
    out = list(items) * (n // len(items))
    out.extend(rng.sample(items, n % len(items)))
    rng.shuffle(out)
    return out


class BalancedBatches(Sampler[list[int]]):
    """What both P x K batch samplers share: their arguments, the check on them and the
    epoch; a sampler indexes its classes in `index_classes`."""

    def __init__(
        self,
        labels: np.ndarray,
        batch_size: int,
        samples_per_class: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size % samples_per_class:
            raise UserError(
                f"batch_size={batch_size} is not a multiple of samples_per_class={samples_per_class}; "
                "set data.batch_size to a multiple of data.samples_per_class"
            )
        self.labels = np.asarray(labels)
        self.batch_size = batch_size
        self.k = samples_per_class
        self.classes_per_batch = batch_size // samples_per_class
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.index_classes()

    def index_classes(self) -> None:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose batches the next iteration draws."""
        self.epoch = epoch


class ReferenceBatchSampler(BalancedBatches):
    def index_classes(self) -> None:
        self.seed = int(self.seed)
        classes, inverse, counts = np.unique(self.labels, return_inverse=True, return_counts=True)
        # dataset indices of each class (ascending label), in the records' order
        by_class = np.argsort(inverse, kind="stable")
        self.members = [m.tolist() for m in np.split(by_class, np.cumsum(counts)[:-1])]
        self.class_positions = list(range(len(classes)))
        if self.classes_per_batch > len(classes):
            log.warning(
                "data.sampler=reference: a batch takes %d classes but the training split has %d; "
                "classes repeat within a batch, as in the reference",
                self.classes_per_batch,
                len(classes),
            )

    def batches_per_epoch(self) -> int:
        """The reference's epoch: len(images) // batch_size batches (for all ranks)."""
        return max(len(self.labels) // self.batch_size, 1)

    def __len__(self) -> int:
        return math.ceil(self.batches_per_epoch() / self.num_replicas)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of `epoch` in the reference's draw order (before the DDP split)."""
        rng = random.Random(self.seed + epoch)  # = main.py's random.seed(seed + epoch)
        batches = []
        for _ in range(self.batches_per_epoch()):
            batch: list[int] = []
            for c in smart_sample(rng, self.class_positions, self.classes_per_batch):
                batch.extend(smart_sample(rng, self.members[c], self.k))
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        # a generator: drawn at the first batch, so a set_epoch after the loader built its
        # iterator still counts
        batches = self.epoch_batches(self.epoch)
        self.epoch += 1
        total = len(self) * self.num_replicas
        while len(batches) < total:  # the reference's padding (repeated if W > 2 x batches)
            batches += batches[: total - len(batches)]
        yield from batches[self.rank : total : self.num_replicas]
