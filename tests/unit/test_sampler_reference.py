"""data.sampler=reference: the reference implementation's batches (issue 32).

The reference (VPTSP-G `datasampler/class_random_sampler.py` + `main.py`) draws each batch
from Python's global `random`, reseeded with `random.seed(seed + epoch)` at every epoch
start: `random.sample` of bs/k class keys (sorted keys), then `random.sample` of k entries
of each class's image list; a list shorter than asked is taken whole as many times as it
fits, plus a `random.sample` of the rest, then `random.shuffle`d. The batch holds the
entries' dataset indices. An epoch is len(images) // bs batches.
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import bare_trainer, compose_config, tiny_overrides
from omegaconf import open_dict

from tests.fake_layouts import fake_sop
from vpt_dml.data.datamodule import RetrievalDataModule
from vpt_dml.data.reference_sampler import ReferenceBatchSampler
from vpt_dml.data.sampler import ClassBalancedBatchSampler
from vpt_dml.errors import UserError
from vpt_dml.run import train
from vpt_dml.runs.config_schema import check_config
from vpt_dml.train import build_datamodule

PRESETS = [
    "cub_deep_small", "cub_deep", "cars_deep_small", "cars_deep", "sop_deep_small",
    "sop_deep", "inshop_deep_small", "inshop_deep", "inat_deep",
]  # fmt: skip

# A small table, labels in record order: class 0 = images [1, 3, 5], class 1 = [2],
# class 2 = [0, 4, 8], class 3 = [6, 7] (ascending label, then the records' order).
LABELS = [2, 0, 1, 0, 2, 0, 3, 3, 2]


def test_first_batches_pinned_to_the_reference_draws():
    """Seed 7, bs 4, k 2: 9 // 4 = 2 batches per epoch, 2 classes each.

    Derivation (the reference's calls, with main.py's random.seed(7 + epoch)):
    epoch 0, random.seed(7):
      batch 0: random.sample([0, 1, 2, 3], 2) -> [2, 0]
               random.sample(images of 2 = [0, 4, 8], 2) -> [4, 0]
               random.sample(images of 0 = [1, 3, 5], 2) -> [1, 5]
      batch 1: random.sample([0, 1, 2, 3], 2) -> [2, 3]
               random.sample([0, 4, 8], 2) -> [0, 8];  random.sample([6, 7], 2) -> [6, 7]
    epoch 1, random.seed(8):
      batch 0: classes [1, 3]; class 1 has 1 image < k = 2: [2] twice + random.sample([2], 0)
               = [], random.shuffle -> [2, 2];  random.sample([6, 7], 2) -> [6, 7]
      batch 1: classes [0, 3]; [1, 5]; [6, 7]
    The steps are replayed below on the global `random`, exactly as the reference calls it.
    """
    state = random.getstate()
    try:
        random.seed(7)
        assert random.sample([0, 1, 2, 3], 2) == [2, 0]
        assert random.sample([0, 4, 8], 2) == [4, 0]
        assert random.sample([1, 3, 5], 2) == [1, 5]
        assert random.sample([0, 1, 2, 3], 2) == [2, 3]
        assert random.sample([0, 4, 8], 2) == [0, 8]
        assert random.sample([6, 7], 2) == [6, 7]
        random.seed(8)
        assert random.sample([0, 1, 2, 3], 2) == [1, 3]
        repeated = [2, 2] + random.sample([2], 0)
        random.shuffle(repeated)
        assert repeated == [2, 2]
        assert random.sample([6, 7], 2) == [6, 7]
        assert random.sample([0, 1, 2, 3], 2) == [0, 3]
        assert random.sample([1, 3, 5], 2) == [1, 5]
        assert random.sample([6, 7], 2) == [6, 7]
    finally:
        random.setstate(state)

    sampler = ReferenceBatchSampler(np.array(LABELS), 4, 2, seed=7)
    assert len(sampler) == 2
    assert list(sampler) == [[4, 0, 1, 5], [0, 8, 6, 7]]  # epoch 0
    assert list(sampler) == [[2, 2, 6, 7], [1, 5, 6, 7]]  # epoch 1: advances by itself


def test_more_classes_or_images_asked_than_there_are():
    """Seed 7, bs 15, k 3: 5 classes of 4 and 3 images of classes with 1-3.

    random.seed(7): 5 > 4 classes: [0, 1, 2, 3] once + random.sample([0, 1, 2, 3], 1) -> [2],
    random.shuffle -> [2, 0, 2, 3, 1]; then class 2: random.sample([0, 4, 8], 3) -> [0, 8, 4];
    class 0: -> [5, 1, 3]; class 2 again: -> [0, 8, 4]; class 3 (2 images): [6, 7] once +
    random.sample([6, 7], 1) -> [7], shuffled -> [7, 7, 6]; class 1 (1 image): [2, 2, 2] +
    random.sample([2], 0), shuffled -> [2, 2, 2]. 9 // 15 = 0 batches: one is drawn.
    """
    state = random.getstate()
    try:
        random.seed(7)
        assert random.sample([0, 1, 2, 3], 1) == [2]
        classes = [0, 1, 2, 3, 2]
        random.shuffle(classes)
        assert classes == [2, 0, 2, 3, 1]
        assert random.sample([0, 4, 8], 3) == [0, 8, 4]
        assert random.sample([1, 3, 5], 3) == [5, 1, 3]
        assert random.sample([0, 4, 8], 3) == [0, 8, 4]
        assert random.sample([6, 7], 1) == [7]
        three = [6, 7, 7]
        random.shuffle(three)
        assert three == [7, 7, 6]
    finally:
        random.setstate(state)
    sampler = ReferenceBatchSampler(np.array(LABELS), 15, 3, seed=7)
    assert list(sampler) == [[0, 8, 4, 5, 1, 3, 0, 8, 4, 7, 7, 6, 2, 2, 2]]


def reference_epoch(image_dict: dict, n_images: int, bs: int, k: int, seed: int, epoch: int):
    """The reference's epoch restated on the global `random` (main.py's reseed included):
    image_dict maps class key -> [[path, dataset index], ...] as its BaseDataset builds it."""

    def pick(items, n):
        if n <= len(items):
            return random.sample(items, n)
        out = [x for _ in range(n // len(items)) for x in items]
        out += random.sample(items, n % len(items))
        random.shuffle(out)
        return out

    random.seed(seed + epoch)
    keys = list(image_dict)
    batches = []
    for _ in range(n_images // bs):
        batch = []
        for key in pick(keys, bs // k):
            batch += [entry[-1] for entry in pick(image_dict[key], k)]
        batches.append(batch)
    return batches


@pytest.mark.parametrize("bs,k", [(32, 1), (8, 2), (12, 4)])
def test_equals_the_global_stream_reseeded_each_epoch(bs: int, k: int):
    # 60 classes of 1-5 images (random.sample: its set-based path for 2-3 classes, its pool
    # path for 32), sparse class ids, records in a scrambled order
    gen = np.random.default_rng(0)
    ids = np.repeat(gen.choice(1000, 60, replace=False), gen.integers(1, 6, 60))
    labels = gen.permutation(ids)
    # the reference's dataset: sorted class keys, each class's images in record order
    image_dict = {
        int(c): [[f"img{i}.jpg", int(i)] for i in np.flatnonzero(labels == c)]
        for c in np.unique(labels)
    }
    sampler = ReferenceBatchSampler(labels, bs, k, seed=11)
    state = random.getstate()
    try:
        for epoch in range(3):
            sampler.set_epoch(epoch)
            want = reference_epoch(image_dict, len(labels), bs, k, 11, epoch)
            assert list(sampler) == want
            # the private stream leaves the global one alone
            random.seed(0)
            before = random.getstate()
            sampler.set_epoch(epoch)
            list(sampler)
            assert random.getstate() == before
    finally:
        random.setstate(state)


def test_seed_plus_epoch_and_set_epoch():
    a = ReferenceBatchSampler(np.array(LABELS * 4), 4, 2, seed=7)
    b = ReferenceBatchSampler(np.array(LABELS * 4), 4, 2, seed=8)
    assert len(a) == 36 // 4
    a.set_epoch(3)
    first = list(a)
    a.set_epoch(3)
    assert list(a) == first  # pinned by set_epoch: what a resume at epoch 3 draws
    assert list(a) != first  # then epoch 4
    # the reference's seed + epoch: seed 7's epoch 1 is seed 8's epoch 0
    a.set_epoch(1)
    assert list(a) == list(b)


def test_ddp_ranks_take_turns_on_the_one_device_batches():
    labels = np.array(LABELS + LABELS + [4, 4, 4])  # 21 images: 5 batches of 4
    one = ReferenceBatchSampler(labels, 4, 2, seed=3).epoch_batches(0)
    assert len(one) == 5
    ranks = [ReferenceBatchSampler(labels, 4, 2, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # ceil(5 / 2): the reference pads
    got = [list(s) for s in ranks]
    # padded with the first batch; rank r takes batches r, r + 2, ...
    assert got[0] == [one[0], one[2], one[4]]
    assert got[1] == [one[1], one[3], one[0]]
    # world 4 with 1 batch: the padding repeats it
    tiny = ReferenceBatchSampler(np.array(LABELS), 8, 2, seed=3, num_replicas=4, rank=3)
    assert list(tiny) == ReferenceBatchSampler(np.array(LABELS), 8, 2, seed=3).epoch_batches(0)


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


def sop_datamodule(tmp_path: Path, sampler: str) -> RetrievalDataModule:
    dm = RetrievalDataModule(
        name="sop",
        root=str(fake_sop(tmp_path, train_classes=6, per_class=3)),
        strict_counts=False,
        num_workers=0,
        batch_size=4,
        samples_per_class=2,
        seed=5,
        sampler=sampler,
    )
    dm.set_preprocessing(16, (0.5,) * 3, (0.5,) * 3)
    return dm


def test_the_datamodule_trains_on_the_sampler_it_is_given(tmp_path: Path):
    dm = sop_datamodule(tmp_path, "reference")
    module = _Recorder()
    trainer = bare_trainer(
        tmp_path, max_epochs=3, limit_val_batches=0, use_distributed_sampler=False
    )
    trainer.fit(module, datamodule=dm)
    labels = dm.train_set.records.labels
    want = ReferenceBatchSampler(labels, 4, 2, seed=5)
    assert [module.seen[e] for e in range(3)] == [want.epoch_batches(e) for e in range(3)]
    balanced = ClassBalancedBatchSampler(labels, 4, 2, seed=5)
    assert module.seen[0] != balanced.global_plan()


def test_an_unknown_sampler_is_a_one_line_error(tmp_path: Path):
    with pytest.raises(UserError, match=r"data.sampler='shuffled' .* one of balanced, reference"):
        sop_datamodule(tmp_path, "shuffled")


@pytest.mark.parametrize("preset", PRESETS)
def test_the_paper_presets_draw_as_the_reference(preset: str, tmp_path: Path):
    cfg = compose_config([], tmp_path, experiment=preset)
    assert cfg.data.sampler == "reference"
    check_config(cfg)
    with open_dict(cfg):
        cfg.data.root = str(tmp_path)
    assert build_datamodule(cfg).sampler == "reference"
    # the sampler is the preset's recipe: it stays with another dataset option
    assert compose_config(["data=synthetic"], tmp_path, preset).data.sampler == "reference"
    assert compose_config(["data.sampler=balanced"], tmp_path, preset).data.sampler == "balanced"


@pytest.mark.parametrize("experiment", [None, "demo"])
def test_the_demo_and_the_default_keep_the_balanced_sampler(experiment, tmp_path: Path):
    cfg = compose_config([], tmp_path, experiment=experiment)
    assert cfg.data.sampler == "balanced"


def run_tiny(tmp_path: Path, name: str, *extra: str, sampler: str = "reference"):
    cfg = compose_config(tiny_overrides(f"data.sampler={sampler}", *extra), tmp_path)
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path.parent / "data")  # one generated dataset
        cfg.paths.output_dir = str(tmp_path / name)
        cfg.hydra.runtime.output_dir = cfg.paths.output_dir
    metrics = train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    return metrics, ckpt


def test_resume_with_the_reference_sampler_equals_the_straight_run(tmp_path: Path):
    straight, straight_ckpt = run_tiny(tmp_path, "straight", "trainer.max_epochs=2")
    run_tiny(tmp_path, "first", "trainer.max_epochs=1")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed, resumed_ckpt = run_tiny(
        tmp_path, "resumed", "trainer.max_epochs=2", f"ckpt_path={last}"
    )
    assert resumed_ckpt["global_step"] == straight_ckpt["global_step"]
    for key, value in straight_ckpt["state_dict"].items():
        torch.testing.assert_close(
            resumed_ckpt["state_dict"][key], value, rtol=0, atol=1e-6, msg=key
        )
    assert straight.keys() == resumed.keys()
    for key, value in straight.items():
        assert abs(resumed[key] - value) <= 1e-6, key
    # the switch reaches training: the balanced sampler's run ends elsewhere
    _, balanced_ckpt = run_tiny(tmp_path, "balanced", "trainer.max_epochs=2", sampler="balanced")
    memory = "proxies.memory"
    assert not torch.equal(balanced_ckpt["state_dict"][memory], straight_ckpt["state_dict"][memory])
