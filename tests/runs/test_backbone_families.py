"""Every backbone family the README names trains through the suite's own assembly:
plain ViT, registers + layer scale (DINOv2-style), distilled two-token DeiT and CLIP-style
(norm_pre, no patch-embedding bias). The fused step equals two passes on each; a non-ViT
name ends in one line; building never pretrains (that is `prepare_backbone`'s job)."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, bare_trainer
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from vpt_dml.errors import UserError, WeightsError
from vpt_dml.losses import ProxyAnchorLoss
from vpt_dml.models.build import build_embedder, build_model, prepare_backbone, training_outputs
from vpt_dml.module import VPTDMLModule

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
FAMILIES = {
    "vit_tiny_patch16_224": 1,  # prefix tokens: CLS
    "vit_small_patch14_reg4_dinov2": 5,  # CLS + 4 registers, layer scale
    "deit_tiny_distilled_patch16_224": 2,  # CLS + distillation token, pooled as their mean
    "vit_base_patch16_clip_224": 1,  # norm_pre, patch embedding without bias
}
NUM_CLASSES = 4


def model_cfg(name: str, **changes) -> dict:
    cfg = {
        "backbone": {"name": name, "pretrained": False, "weights": None, "kwargs": TINY},
        "peft": {"prompts": {"num": 3, "depth": 2, "step": 1}, "bitfit": True},
        "proxy": {
            "kind": "semantic_gru",
            "bias_ratio": 0.5,
            "class_prompts": {"num": 2, "depth": 2, "step": 0},
        },
        "embed_dim": 16,
        "fused_branches": True,
    }
    return {**cfg, **changes}


LOSS = {"_target_": "vpt_dml.losses.ProxyAnchorLoss", "positive_normalization": "all"}
# the real optim group (its _target_ nodes) at a higher lr
OPTIM = OmegaConf.load(REPO / "conf" / "optim" / "adamw.yaml")
OPTIM.merge_with({"lr": 1e-2, "lr_proxy": 1e-2})
OPTIM = OmegaConf.to_container(OPTIM, resolve=True)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.tensor([2, 2, 0, 0, 3, 3, 1, 1])


def step_grads(model, images, labels, fused: bool):
    emb, prox = training_outputs(model.embedder, model.proxies, fused)(images, labels)
    ProxyAnchorLoss(positive_normalization="all")(emb, labels, prox).backward()
    named = [*model.embedder.named_parameters(), *model.proxies.named_parameters()]
    return emb.detach(), prox.detach(), {n: p.grad for n, p in named if p.requires_grad}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fused_step_equals_two_passes_on_every_family(name):
    torch.manual_seed(0)
    model = build_model({"model": model_cfg(name), "loss": LOSS}, NUM_CLASSES)
    assert model.fused  # the family is covered by the fused pass, not skipped
    assert model.embedder.backbone.vit.num_prefix_tokens == FAMILIES[name]
    images, labels = batch()
    reference = step_grads(copy.deepcopy(model), images, labels, fused=False)
    fused = step_grads(model, images, labels, fused=True)
    for got, want in zip(fused[:2], reference[:2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert fused[2].keys() == reference[2].keys()
    for key, want in reference[2].items():
        got = fused[2][key]
        err = (got - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item() + 1e-7, f"{key}: {err:g}"
    assert fused[2]["backbone.prompts.tokens.0"].abs().sum() > 0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_one_training_step_through_the_lightning_module(name, tmp_path):
    torch.manual_seed(0)
    module = VPTDMLModule(model_cfg(name), LOSS, OPTIM, num_classes=NUM_CLASSES, eval_ks=(1,))
    images, labels = batch()
    data = DataLoader(TensorDataset(images, labels, torch.arange(8)), batch_size=8)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = bare_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=data)
    assert trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for n, p in module.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n  # trainable moved, frozen not


def test_non_vit_name_is_refused_before_pretraining_or_building(tmp_path: Path):
    out = tmp_path / "w.safetensors"
    backbone = {"name": "resnet18", "weights": str(out), "kwargs": TINY}
    with pytest.raises(UserError, match="ResNet, not a timm VisionTransformer"):
        prepare_backbone({"backbone": {**backbone, "synthetic_pretraining": {"output": str(out)}}})
    with pytest.raises(UserError, match="ResNet, not a timm VisionTransformer"):
        build_embedder({"backbone": {**backbone, "weights": None}, "peft": {}})
    assert not out.exists()


def test_building_never_pretrains_prepare_backbone_does(tmp_path: Path):
    out = tmp_path / "demo_backbone.safetensors"
    spec = {
        "output": str(out),
        "num_classes": 4,
        "images_per_class": 8,
        "epochs": 1,
        "batch_size": 16,
    }
    backbone = {"name": "vit_tiny_patch16_224", "weights": str(out), "kwargs": TINY}
    cfg = model_cfg("vit_tiny_patch16_224", backbone={**backbone, "synthetic_pretraining": spec})
    with pytest.raises(WeightsError, match="does not exist"):
        build_model({"model": cfg}, NUM_CLASSES)
    assert not out.exists()
    assert prepare_backbone(cfg) == out and out.is_file()
    from safetensors.torch import load_file

    saved = load_file(str(out))
    vit = build_model({"model": cfg}, NUM_CLASSES).embedder.backbone.vit
    for key, value in vit.state_dict().items():
        if key in saved:
            assert torch.equal(value, saved[key]), key
    assert prepare_backbone(cfg) == out  # made once: a second call reuses the file


class EvalSet(TensorDataset):
    has_gallery = False  # what RetrievalDataset tells evaluation/epoch.py


@pytest.mark.parametrize(("label", "key"), [(None, "val/recall@1"), ("before", "before/recall@1")])
def test_validation_logs_under_eval_label(label, key, tmp_path):
    torch.manual_seed(0)
    module = VPTDMLModule(
        model_cfg("vit_tiny_patch16_224"), LOSS, OPTIM, num_classes=NUM_CLASSES, eval_ks=(1, 2)
    )
    module.eval_label = label
    images, labels = batch()
    # the last batch repeats items, as DDP's padding does: de-duplicated by dataset index
    index = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 6, 7])
    data = DataLoader(EvalSet(images[index], labels[index], index), batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    out = trainer.validate(module, dataloaders=data, verbose=False)[0]
    with torch.no_grad():
        emb = module.eval()(images)
    from vpt_dml.evaluation import retrieval_metrics

    # the 8 distinct items once each: the repeated two were dropped
    want = retrieval_metrics(emb, labels, (1, 2))
    prefix = key.split("/")[0]
    assert key in out
    assert out == pytest.approx({f"{prefix}/{k}": v for k, v in want.items()})  # float64
    assert module._eval_buffer == []
