"""The smaller messages a user reads: each names things as the user's files and config do."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tests.fake_layouts import fake_cub, fake_sop, put
from vpt_dml.data.datamodule import RetrievalDataModule
from vpt_dml.data.registry import load_splits
from vpt_dml.errors import DatasetError, UserError
from vpt_dml.models.depth import prompt_counts, resolve_depth
from vpt_dml.models.params import format_breakdown, parameter_breakdown


def test_empty_class_is_named_by_its_folder(tmp_path: Path) -> None:
    root = fake_cub(tmp_path, classes=4, per_class=1)
    (root / "CUB_200_2011" / "images" / "002.Bird_2" / "Bird_2_0.jpg").unlink()
    dm = RetrievalDataModule(
        name="cub", root=str(root), strict_counts=False, skip_broken=True, num_workers=0
    )
    with pytest.raises(DatasetError, match=r"cub train class 002\.Bird_2 has no images left"):
        dm.load()


def test_layout_matching_nothing_names_the_expected_layouts(tmp_path: Path) -> None:
    (tmp_path / "README.txt").write_text("my photos")
    put(tmp_path / "stuff" / "a.jpg")
    with pytest.raises(DatasetError) as info:
        load_splits("cub", str(tmp_path))
    msg = str(info.value)
    assert "\n" not in msg and "matches no CUB-200-2011 layout" in msg
    assert "<root>/CUB_200_2011/images.txt" in msg  # the official layout
    assert "one folder per class (<root>/<class>/*.jpg with at least 2 classes" in msg
    assert "found README.txt, stuff/ (1 image)" in msg and "download it from" in msg


class _Parts(nn.Module):
    """Parameter names as VPTDMLModule has them, with round sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.embedder = nn.Module()
        self.embedder.backbone = nn.Module()
        self.embedder.backbone.vit = nn.Linear(99, 10)  # 990 weights (frozen) + 10 biases
        self.embedder.backbone.vit.weight.requires_grad_(False)
        self.embedder.backbone.prompts = nn.Module()
        self.embedder.backbone.prompts.tokens = nn.ParameterList([nn.Parameter(torch.zeros(2, 5))])
        self.embedder.head = nn.Linear(5, 2)  # 12
        self.proxies = nn.Module()
        self.proxies.cell = nn.GRUCell(2, 2)  # 36
        self.proxies.bias = nn.Parameter(torch.zeros(4, 2))  # 8


def test_tuned_line_separates_inference_from_training_only() -> None:
    rows = parameter_breakdown(_Parts())
    assert rows["inference"]["trainable"] == 10 + 10 + 12
    assert rows["training_only"]["trainable"] == 36 + 8
    assert rows["all"]["trainable"] == 76
    text = format_breakdown(rows)
    assert text.splitlines()[-1] == (
        "tuned: 32 inference-time (3.20% of the backbone) + 44 training-only "
        "(4.40%: gru, proxies; not in the exported model)"
    )
    assert "% tuned)" not in text


def test_prompt_depth_above_the_backbone_is_an_error() -> None:
    with pytest.raises(UserError) as info:
        prompt_counts({"num": 4, "depth": 12, "step": 0}, 4, "model.peft.prompts")
    assert str(info.value) == (
        "model.peft.prompts.depth=12 is deeper than the backbone's 4 layers; "
        "set it to at most 4, or to all for every layer"
    )
    with pytest.raises(UserError, match=r"model.proxy.class_prompts.depth=5 is deeper"):
        prompt_counts({"num": 2, "depth": 5}, 4, "model.proxy.class_prompts")
    assert prompt_counts({"num": 3, "depth": "all", "step": 1}, 4, "x") == [3, 2, 1, 0]
    assert prompt_counts({"num": 3, "depth": 2}, 4, "x") == [3, 3, 0, 0]
    assert prompt_counts({"num": 0, "depth": 12}, 4, "x") == [0, 0, 0, 0]  # no prompts at all
    with pytest.raises(UserError, match="is not a layer count"):
        resolve_depth("deep", 4, "model.peft.prompts.depth")


def test_samples_per_class_above_the_smallest_class_warns_once(tmp_path: Path, caplog) -> None:
    root = fake_sop(tmp_path, train_classes=5, per_class=2)
    dm = RetrievalDataModule(
        name="sop",
        root=str(root),
        strict_counts=False,
        num_workers=0,
        batch_size=8,
        samples_per_class=4,
    )
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
        dm.train_set = None  # a second setup (e.g. after set_preprocessing) warns no more
        dm.setup("fit")
    warnings = [m for r in caplog.records if (m := r.getMessage()).startswith("data.samples")]
    assert warnings == [
        "data.samples_per_class=4 but 5 of 5 training classes have fewer images (smallest: 2): "
        "those classes will repeat images within a batch"
    ]
