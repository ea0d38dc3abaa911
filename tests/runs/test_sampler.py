"""Class-balanced batches: k per class, deterministic, disjoint across ranks, full coverage;
evaluation shards that neither lose nor double an image."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import bare_trainer
from torch.utils.data.distributed import DistributedSampler

from tests.fake_layouts import fake_sop
from vpt_dml.data.datamodule import RetrievalDataModule
from vpt_dml.data.sampler import ClassBalancedBatchSampler
from vpt_dml.errors import UserError
from vpt_dml.evaluation.epoch import unique_first

# uneven classes: 12 classes with 1..6 images
LABELS = np.repeat(np.arange(12), [1, 2, 3, 4, 5, 6] * 2)


def epoch_batches(sampler: ClassBalancedBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("bs,k", [(8, 2), (6, 3), (5, 1)])
def test_k_images_of_each_of_bs_over_k_classes(bs: int, k: int):
    sampler = ClassBalancedBatchSampler(LABELS, bs, k, seed=3)
    batches = epoch_batches(sampler, 0)
    assert len(batches) == len(LABELS) // bs
    for batch in batches:
        labels = LABELS[batch]
        assert len(batch) == bs
        # contiguous runs of k images of one class, bs/k distinct classes
        runs = labels.reshape(bs // k, k)
        assert (runs == runs[:, :1]).all()
        assert len(set(runs[:, 0])) == bs // k


def test_deterministic_in_seed_and_epoch():
    a = ClassBalancedBatchSampler(LABELS, 8, 2, seed=1)
    b = ClassBalancedBatchSampler(LABELS, 8, 2, seed=1)
    assert epoch_batches(a, 4) == epoch_batches(b, 4)
    assert epoch_batches(a, 4) != epoch_batches(a, 5)
    assert epoch_batches(a, 4) != epoch_batches(ClassBalancedBatchSampler(LABELS, 8, 2, seed=2), 4)


def test_two_ranks_get_disjoint_classes_each_step():
    ranks = [
        ClassBalancedBatchSampler(LABELS, 4, 2, seed=0, num_replicas=2, rank=r) for r in (0, 1)
    ]
    for epoch in range(3):
        steps = [epoch_batches(s, epoch) for s in ranks]
        assert len(steps[0]) == len(steps[1]) == len(LABELS) // 8
        for b0, b1 in zip(*steps):
            assert not set(LABELS[b0]) & set(LABELS[b1])
            assert len(b0) == len(b1) == 4
            for b in (b0, b1):
                assert (LABELS[b].reshape(2, 2)[:, 0] == LABELS[b].reshape(2, 2)[:, 1]).all()


def test_every_image_reached_over_epochs():
    seen: set[int] = set()
    for world in (1, 2):
        seen.clear()
        samplers = [
            ClassBalancedBatchSampler(LABELS, 4, 1, seed=0, num_replicas=world, rank=r)
            for r in range(world)
        ]
        for epoch in range(8):
            for s in samplers:
                seen.update(i for batch in epoch_batches(s, epoch) for i in batch)
        assert seen == set(range(len(LABELS)))


def test_too_few_classes_and_bad_multiple_are_user_errors():
    with pytest.raises(UserError, match="not a multiple"):
        ClassBalancedBatchSampler(LABELS, 7, 2)
    with pytest.raises(UserError, match="needs 16 distinct classes"):
        ClassBalancedBatchSampler(LABELS, 16, 2, num_replicas=2)


@pytest.mark.parametrize("n", [7, 8])
def test_eval_shards_cover_every_image_once(n: int):
    # the eval loader's sharding (DistributedSampler, padded) + the module's de-duplication
    data = list(range(n))
    shards = [list(DistributedSampler(data, 2, r, shuffle=False)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])  # equal lengths: all_gather needs them
    gathered = torch.tensor(shards[0] + shards[1])
    index, first = unique_first(gathered)
    assert index.tolist() == data
    assert sorted(gathered[first].tolist()) == data


class _Recorder(L.LightningModule):
    """Records each training batch's dataset indices; trains one throwaway weight."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[list[int]]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append(batch[2].tolist())
        return (self.w * batch[0].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_plain_trainer_gets_new_batches_every_epoch(tmp_path: Path):
    # no ExactResume, no run.py: the sampler advances its epoch by itself
    dm = RetrievalDataModule(
        name="sop",
        root=str(fake_sop(tmp_path, train_classes=6, per_class=3)),
        strict_counts=False,
        num_workers=0,
        batch_size=4,
        samples_per_class=2,
        seed=5,
    )
    dm.set_preprocessing(16, (0.5,) * 3, (0.5,) * 3)
    module = _Recorder()
    trainer = bare_trainer(
        tmp_path, max_epochs=3, limit_val_batches=0, use_distributed_sampler=False
    )
    trainer.fit(module, datamodule=dm)
    reference = ClassBalancedBatchSampler(dm.train_set.records.labels, 4, 2, seed=5)
    assert [module.seen[e] for e in range(3)] == [epoch_batches(reference, e) for e in range(3)]
    assert module.seen[0] != module.seen[1] != module.seen[2]
