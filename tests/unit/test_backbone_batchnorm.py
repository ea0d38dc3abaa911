"""Hybrid ViTs with BatchNorm: a frozen backbone's statistics do not move (issue 28, 6).

timm's hybrid ViTs (vit_small_resnet26d_224, vit_base_resnet50d_224, ...) have a ResNet
stem with BatchNorm. Lightning puts the whole module in train mode, which used to update
the frozen stem's running statistics on every step, even under model/peft=linear: the
metrics then came from a drifted backbone. Frozen normalisation layers now stay in eval
mode; with full fine-tuning (their scale trains) they update as in timm.
Real timm model (pretrained=False, 32 px, one ViT block), real Lightning training steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import REPO, bare_trainer
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from vpt_dml.models.build import build_embedder
from vpt_dml.module import VPTDMLModule

NAME = "vit_small_resnet26d_224"  # ResNet-26d stem: 31 BatchNorm layers
KWARGS = dict(img_size=32, embed_dim=32, depth=1, num_heads=2)
PEFT = {
    "linear": {"name": "linear"},
    "vptsp": {"name": "vptsp", "prompts": {"num": 2, "depth": 1, "step": 0}, "bitfit": True},
    "full": {"name": "full", "full": True},
}
LOSS = {"_target_": "vpt_dml.losses.ProxyAnchorLoss", "positive_normalization": "all"}
OPTIM = OmegaConf.load(REPO / "conf" / "optim" / "adamw.yaml")
OPTIM.merge_with({"lr": 1e-2, "lr_proxy": 1e-2})
OPTIM = OmegaConf.to_container(OPTIM, resolve=True)


def model_cfg(peft: str) -> dict:
    return {
        "backbone": {"name": NAME, "pretrained": False, "weights": None, "kwargs": KWARGS},
        "peft": PEFT[peft],
        "proxy": {"kind": "learned"},
        "embed_dim": 16,
    }


def norm_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: b.detach().clone()
        for n, b in module.named_buffers()
        if n.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def fit(peft: str, tmp_path: Path) -> tuple[VPTDMLModule, dict, dict]:
    torch.manual_seed(0)
    module = VPTDMLModule(model_cfg(peft), LOSS, OPTIM, num_classes=4, eval_ks=(1,))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 32, 32, generator=g) * 2 + 0.5  # far from BN's init stats
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3] * 2)
    data = DataLoader(TensorDataset(images, labels, torch.arange(16)), batch_size=8)
    before = norm_buffers(module.embedder.backbone.vit)
    assert len(before) >= 3 * 31  # the hybrid's stem is there
    trainer = bare_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=data)
    assert trainer.global_step == 2
    return module, before, norm_buffers(module.embedder.backbone.vit)


@pytest.mark.parametrize("peft", ["linear", "vptsp"])
def test_frozen_batchnorm_statistics_do_not_move_in_training(peft: str, tmp_path: Path):
    module, before, after = fit(peft, tmp_path)
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved == []
    # the layers stay in eval mode while the module trains (Lightning set train mode)
    vit = module.embedder.backbone.vit
    assert module.training
    bns = [m for m in vit.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    if peft == "vptsp":  # BitFit: BN biases train (their statistics do not)
        assert all(m.bias.requires_grad and not m.weight.requires_grad for m in bns)


def test_trainable_batchnorm_still_updates_under_full_fine_tuning(tmp_path: Path):
    module, before, after = fit("full", tmp_path)
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(moved) == len(before)  # every running mean/var and step count
    counts = [v for n, v in after.items() if n.endswith("num_batches_tracked")]
    assert all(int(c) == 2 for c in counts)


def test_eval_output_is_unchanged_by_a_train_mode_forward():
    """The frozen backbone gives the same features whatever mode its module is in."""
    torch.manual_seed(0)
    embedder = build_embedder(model_cfg("linear"))
    x = torch.randn(4, 3, 32, 32) * 3
    embedder.eval()
    with torch.no_grad():
        want = embedder(x)
        embedder.train()
        embedder(x)  # a training-mode pass (updates nothing now)
        embedder.eval()
        got = embedder(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
