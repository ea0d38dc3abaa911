"""PEFT switches: what trains, what stays bit-identical, adapter and LoRA maths."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from tolerances import close

from vpt_dml.errors import UserError
from vpt_dml.models.adapter import add_adapters
from vpt_dml.models.params import parameter_breakdown
from vpt_dml.models.peft import apply_peft
from vpt_dml.module import VPTDMLModule

CONF = Path(__file__).resolve().parents[2] / "conf"
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
PEFTS = ["vptsp", "linear", "bitfit", "vpt_shallow", "vpt_deep", "adapter", "lora", "full"]


def peft_cfg(name: str, **changes) -> dict:
    """The option as Hydra composes it (option files inherit a base through defaults)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        node = compose("train", overrides=[f"model/peft={name}"]).model.peft
    cfg = OmegaConf.to_container(node)
    cfg.update(changes)
    return cfg


def tiny_module(peft: dict, proxy: dict | None = None, num_classes: int = 4) -> VPTDMLModule:
    torch.manual_seed(0)
    model = {
        "backbone": {"name": "vit_tiny_patch16_224", "kwargs": TINY},
        "peft": peft,
        "proxy": proxy
        or {"kind": "semantic_gru", "bias_ratio": 0.5, "class_prompts": {"num": 2, "depth": 2}},
        "embed_dim": 16,
    }
    loss = {"_target_": "vpt_dml.losses.ProxyAnchorLoss", "positive_normalization": "all"}
    # the real optim group (its _target_ nodes) with the keys it interpolates changed
    optim = OmegaConf.load(CONF / "optim" / "adamw.yaml")
    optim.merge_with({"lr": 1e-2, "lr_proxy": 1e-2, "t_max": 5, "eta_min": 0.0})
    optim = OmegaConf.to_container(optim, resolve=True)
    return VPTDMLModule(model, loss, optim, num_classes=num_classes)


def train_steps(module: VPTDMLModule, steps: int = 3) -> None:
    opt = module.configure_optimizers()["optimizer"]
    torch.manual_seed(1)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1])
    module.train()
    for _ in range(steps):
        opt.zero_grad()
        embeddings, proxies = module.training_outputs(images, labels)
        module.criterion(embeddings, labels, proxies).backward()
        opt.step()


@pytest.mark.parametrize("name", PEFTS)
def test_frozen_stay_bit_identical_and_trainable_change(name):
    module = tiny_module(peft_cfg(name))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    train_steps(module)
    vit_params = dict(module.embedder.backbone.vit.named_parameters())
    for n, p in module.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"{n} is trainable but did not change"
        else:
            assert p.grad is None, f"{n} is frozen but got a gradient"
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"
    trainable_vit = {n for n, p in vit_params.items() if p.requires_grad}
    biases = {n for n in vit_params if n.endswith(".bias") and ".lora_" not in n}
    added = {n for n in vit_params if ".adapter." in n or ".lora_" in n}
    expected = {
        "vptsp": biases,
        "bitfit": biases,
        "full": set(vit_params),
        "adapter": added,
        "lora": added,
    }.get(name, set())
    assert trainable_vit == expected
    n_prompts = sum(p.numel() for p in module.embedder.backbone.prompts.parameters())
    assert (n_prompts > 0) == (name in ("vptsp", "vpt_shallow", "vpt_deep"))


def test_switches_combine():
    module = tiny_module(peft_cfg("lora", bitfit=True, adapter={"enabled": True, "bottleneck": 4}))
    names = {n for n, p in module.embedder.backbone.vit.named_parameters() if p.requires_grad}
    assert any(".lora_" in n for n in names) and any(".adapter." in n for n in names)
    assert "blocks.0.attn.qkv.base_layer.bias" in names  # BitFit reaches the wrapped qkv
    assert "blocks.0.attn.qkv.base_layer.weight" not in names


def test_unknown_peft_key_is_a_user_error():
    with pytest.raises(UserError, match="model.peft"):
        apply_peft(nn.Linear(2, 2), {"bitfti": True})


@pytest.mark.parametrize("style", ["parallel", "sequential"])
def test_adapter_block_equals_adaptformer_formula(style):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY).eval()
    plain = copy.deepcopy(vit)
    x = torch.randn(2, 17, 32)
    (adapter, _) = add_adapters(vit, bottleneck=4, scale=0.5, style=style)
    with torch.no_grad():
        assert torch.equal(vit.blocks[0](x), plain.blocks[0](x))  # zero up-projection at init
        nn.init.normal_(adapter.up.weight)
        nn.init.normal_(adapter.up.bias)
        blk = plain.blocks[0]
        x1 = x + blk.attn(blk.norm1(x))
        m = blk.mlp(blk.norm2(x1))
        a_in = x1 if style == "parallel" else m
        want = x1 + m + 0.5 * adapter.up(torch.relu(adapter.down(a_in)))
        torch.testing.assert_close(vit.blocks[0](x), want, **close(torch.float32))


def test_lora_qkv_equals_low_rank_update():
    pytest.importorskip("peft")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY).eval()
    plain = copy.deepcopy(vit)
    apply_peft(vit, peft_cfg("lora", lora={"enabled": True, "rank": 2, "alpha": 6.0}))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit(images), plain(images))  # B = 0 at start
        qkv = vit.blocks[1].attn.qkv
        a, b = qkv.lora_A["default"].weight, qkv.lora_B["default"].weight
        nn.init.normal_(b)
        x = torch.randn(5, 32)
        ref = plain.blocks[1].attn.qkv
        want = x @ ref.weight.T + ref.bias + (6.0 / 2) * (x @ a.T @ b.T)
        torch.testing.assert_close(qkv(x), want, rtol=1e-5, atol=1e-5)


def test_parameter_breakdown_counts_each_component():
    module = tiny_module(peft_cfg("vptsp"))  # prompts 10 x 2 layers, class prompts 2 x 2 layers
    rows = parameter_breakdown(module)
    d, e, c = 32, 16, 4
    assert rows["prompts"] == {"trainable": 2 * 10 * d, "total": 2 * 10 * d}
    assert rows["class_prompts"]["trainable"] == c * 2 * 2 * d
    assert rows["head"]["trainable"] == 2 * d + d * e + e
    assert rows["proxy_head"]["trainable"] == 2 * d + d * e + e
    assert rows["gru"]["trainable"] == 2 * 3 * e * e + 3 * e
    assert rows["proxies"]["trainable"] == c * e
    vit = module.embedder.backbone.vit
    n_bias = sum(p.numel() for n, p in vit.named_parameters() if n.endswith(".bias"))
    assert rows["backbone_bias"] == {"trainable": n_bias, "total": n_bias}
    assert rows["backbone_weight"]["trainable"] == 0
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert rows["all"]["trainable"] == trainable
    backbone = sum(p.numel() for p in vit.parameters())
    assert rows["all"]["tuned_pct"] == pytest.approx(100 * trainable / backbone)  # float64
