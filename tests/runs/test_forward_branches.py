"""The fused VPTSP training step (PromptedViT.forward_branches, chosen by models/build.py)
computes exactly the two-pass step.

float32 throughout (the GRU fold runs in fp32), so "exactly" means to float tolerance.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from vpt_dml.errors import UserError
from vpt_dml.losses import ProxyAnchorLoss
from vpt_dml.models.build import training_outputs
from vpt_dml.models.embedder import Embedder
from vpt_dml.models.heads import EmbeddingHead
from vpt_dml.models.peft import set_backbone_trainable
from vpt_dml.models.precision import cast_frozen_weights_
from vpt_dml.models.prompted_vit import PromptedViT, checkpointed_layers
from vpt_dml.models.semantic_proxies import SemanticProxies

NUM_CLASSES = 4
# Per layer: different lengths, equal lengths, one branch without prompts, none at all.
PROMPTS = [4, 3, 0, 2, 0]
CLASS_PROMPTS = [2, 3, 3, 0, 0]


def tiny_vit(**kwargs) -> torch.nn.Module:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=5, num_heads=2, num_classes=0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**args, **kwargs})


def build(full: bool = False, **vit_kwargs) -> tuple[Embedder, SemanticProxies]:
    torch.manual_seed(0)
    vit = tiny_vit(**vit_kwargs)
    for p in vit.parameters():
        p.requires_grad_(False)
    set_backbone_trainable(vit, bitfit=True, full=full)
    embedder = Embedder(PromptedViT(vit, PROMPTS), EmbeddingHead(32, 16))
    proxies = SemanticProxies(NUM_CLASSES, 32, 16, CLASS_PROMPTS, update="gru_relu", bias_ratio=0.5)
    return embedder, proxies


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float32)
    return images, torch.tensor([2, 2, 0, 0, 3, 3, 1, 1])


def step(embedder, proxies, images, labels, fused: bool):
    """One training step's outputs and the gradients of every trainable parameter."""
    emb, prox = training_outputs(embedder, proxies, fused)(images, labels)
    loss = ProxyAnchorLoss()(emb, labels, prox)
    loss.backward()
    named = list(embedder.named_parameters()) + list(proxies.named_parameters())
    grads = {n: p.grad.clone() for n, p in named if p.requires_grad}
    return emb.detach(), prox.detach(), proxies.memory.clone(), grads


def assert_same(a, b) -> None:
    for x, y in zip(a[:3], b[:3], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert a[3].keys() == b[3].keys()
    for name in a[3]:
        assert_close_to_scale(a[3][name], b[3][name], name)


def assert_close_to_scale(x: torch.Tensor, ref: torch.Tensor, name: str = "") -> None:
    """fp32 agreement relative to the tensor's scale (gradients here reach ~100)."""
    err = (x - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item() + 1e-7, f"{name}: max error {err:g}"


@pytest.mark.parametrize("checkpointing", [False, True, 0.4])
def test_fused_step_equals_two_passes(checkpointing) -> None:
    embedder, proxies = build()
    assert training_outputs(embedder, proxies, True).func.__name__ == "fused_outputs"
    images, labels = batch()
    reference = step(copy.deepcopy(embedder), copy.deepcopy(proxies), images, labels, fused=False)
    embedder.backbone.set_grad_checkpointing(checkpointing)
    fused = step(embedder, proxies, images, labels, fused=True)
    assert_same(fused, reference)
    # the gradients reach prompts, class prompts, BitFit biases and the GRU; frozen weights get none
    grads = fused[3]
    assert grads["backbone.prompts.tokens.0"].abs().sum() > 0
    assert grads["class_prompts.tokens.0"].abs().sum() > 0
    assert grads["backbone.vit.blocks.4.mlp.fc2.bias"].abs().sum() > 0
    assert grads["cell.input.weight"].abs().sum() > 0
    assert embedder.backbone.vit.blocks[0].attn.qkv.weight.grad is None


def test_average_pooling_keeps_every_token_and_equals_two_passes() -> None:
    embedder, proxies = build(global_pool="avg")  # every output token counts: no CLS-only layer
    images, labels = batch()
    reference = step(copy.deepcopy(embedder), copy.deepcopy(proxies), images, labels, fused=False)
    assert_same(step(embedder, proxies, images, labels, fused=True), reference)


class OtherBlock(torch.nn.Module):
    """A block type the fused pass does not re-implement (here: timm's block, wrapped)."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.inner = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_unknown_block_type_falls_back_to_two_passes() -> None:
    embedder, proxies = build()
    vit = embedder.backbone.vit
    vit.blocks[1] = OtherBlock(vit.blocks[1])
    assert not embedder.backbone.fuses_branches
    outputs = training_outputs(embedder, proxies, fused=True)
    assert outputs.func.__name__ == "two_pass_outputs"
    images, labels = batch()
    reference = step(copy.deepcopy(embedder), copy.deepcopy(proxies), images, labels, fused=False)
    assert_same(step(embedder, proxies, images, labels, fused=True), reference)


def test_single_branch_fast_path_equals_prompted_vit_with_full_finetuning() -> None:
    embedder, _ = build(full=True)
    backbone = embedder.backbone.double()  # no GRU here: float64 shows the maths are equal
    images = batch()[0].double()
    ref = copy.deepcopy(backbone)
    ref(images).pow(2).sum().backward()
    (out,) = backbone.forward_branches(images, [backbone.prompts.per_layer()])
    out.pow(2).sum().backward()
    torch.testing.assert_close(out, ref(images), rtol=1e-10, atol=1e-12)  # float64
    for (name, p), q in zip(backbone.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=name)  # float64


def test_checkpointed_layers() -> None:
    assert checkpointed_layers(12, True) == set(range(12))
    assert checkpointed_layers(12, False) == checkpointed_layers(12, 0.0) == set()
    assert checkpointed_layers(12, 0.5) == {0, 2, 4, 6, 8, 10}
    with pytest.raises(UserError, match="grad_checkpointing"):
        checkpointed_layers(12, 1.5)


@pytest.mark.parametrize("setting", [True, 0.4])
def test_checkpointing_recomputes_in_both_forwards(setting) -> None:
    """The one checkpointing path serves forward and forward_branches: layers marked
    for recompute run their forward again during backward."""
    embedder, _ = build()
    backbone = embedder.backbone.train()
    backbone.set_grad_checkpointing(setting)
    calls = []
    for i, blk in enumerate(backbone.vit.blocks):
        blk.norm2.register_forward_hook(lambda *_, i=i: calls.append(i))
    images = batch()[0]
    for run in (
        lambda: backbone(images),
        lambda: backbone.forward_branches(images, [backbone.prompts.per_layer()])[0],
    ):
        calls.clear()
        out = run()
        forward_calls = list(calls)
        out.sum().backward()
        recomputed = sorted(calls[len(forward_calls) :])
        assert forward_calls == list(range(5))
        assert recomputed == sorted(backbone.checkpointed) != []


def test_frozen_weights_in_compute_dtype_train_under_autocast() -> None:
    embedder, proxies = build()
    reference = copy.deepcopy(embedder)
    cast_frozen_weights_(embedder)
    vit = embedder.backbone.vit
    assert vit.blocks[0].attn.qkv.weight.dtype == torch.bfloat16  # frozen: cast once
    assert vit.patch_embed.proj.weight.dtype == torch.bfloat16
    assert vit.blocks[0].attn.qkv.bias.dtype == torch.float32  # trainable: fp32 master copy
    assert vit.blocks[0].norm1.weight.dtype == torch.float32
    images, labels = batch()
    trainable = [p for p in [*embedder.parameters(), *proxies.parameters()] if p.requires_grad]
    before = {n: p.detach().clone() for n, p in embedder.named_parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb, prox = training_outputs(embedder, proxies, True)(images, labels)
        ref_emb = reference(images)
        loss = ProxyAnchorLoss()(emb, labels, prox)
    loss.backward()
    opt.step()
    # the same bf16 maths as autocast over fp32 weights, up to bf16 rounding
    torch.testing.assert_close(emb.float(), ref_emb.float(), rtol=0.05, atol=0.05)
    for name, p in embedder.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == p.requires_grad, name


# -- loss, optimizer and scheduler come from the config groups' _target_ nodes ------------
def tiny_module(loss: dict | None = None, optim: dict | None = None):
    from vpt_dml.module import VPTDMLModule

    model = {
        "backbone": {
            "name": "vit_tiny_patch16_224",
            "kwargs": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
        },
        "peft": {"prompts": {"num": 2, "depth": 2}, "bitfit": True},
        "proxy": {"kind": "semantic_gru", "class_prompts": {"num": 1, "depth": 1}},
        "embed_dim": 16,
    }
    loss = loss or {"_target_": "vpt_dml.losses.ProxyNCALoss", "scale": 4.0}
    optim = optim or {
        "lr": 0.1,
        "lr_proxy": 0.5,
        "weight_decay": 1e-3,
        "weight_decay_proxy": 0.0,
        "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.8},
        "scheduler": {
            "_target_": "vpt_dml.optim.cosine_per_epoch",
            "_partial_": True,
            "t_max": 4,
            "eta_min": 0.01,
        },
    }
    return VPTDMLModule(model, loss, optim, num_classes=NUM_CLASSES)


def test_loss_optimizer_and_schedule_are_the_nodes_objects() -> None:
    module = tiny_module()
    assert type(module.criterion).__name__ == "ProxyNCALoss" and module.criterion.scale == 4.0
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]
    assert isinstance(opt, torch.optim.SGD) and sched["interval"] == "epoch"
    main, proxy = opt.param_groups
    assert (main["name"], main["lr"], main["weight_decay"], main["momentum"]) == (
        "main",
        0.1,
        1e-3,
        0.8,
    )
    assert (proxy["name"], proxy["lr"], proxy["weight_decay"]) == ("proxy", 0.5, 0.0)
    assert [p.shape for p in proxy["params"]] == [module.proxies.bias.shape]
    lrs = []
    for _ in range(5):
        lrs.append(main["lr"])
        opt.step()
        sched["scheduler"].step()
    assert lrs[4] == pytest.approx(0.01)  # float64; eta_min at t_max = 4
    assert lrs[2] == pytest.approx(0.01 + 0.09 * 0.5)  # float64


@pytest.mark.parametrize(
    ("loss", "optim_change", "message"),
    [
        ({"_target_": "vpt_dml.losses.ProxyAnchorLoss", "proxy_range": "x"}, {}, "proxy_range"),
        ({"name": "proxy_anchor"}, {}, "loss needs a _target_"),
        (None, {"scheduler": {"t_max": 0}}, "optim.t_max=0"),
        (None, {"optimizer": {"momentun": 0.9}}, "optim.optimizer: .*momentun"),
    ],
)
def test_bad_loss_or_optim_node_is_one_line_user_error(loss, optim_change, message) -> None:
    optim = None
    if optim_change:
        base = tiny_module().optim_cfg
        optim = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
        for key, change in optim_change.items():
            optim[key].update(change)
    with pytest.raises(UserError, match=message) as err:
        tiny_module(loss, optim).configure_optimizers()
    assert "\n" not in str(err.value)


def test_fused_adamw_only_on_cuda_and_only_when_unset() -> None:
    from functools import partial

    from vpt_dml.optim import device_step_kwargs

    adamw = partial(torch.optim.AdamW, lr=1e-3)
    assert device_step_kwargs(adamw, torch.device("cuda")) == {"fused": True}
    assert device_step_kwargs(adamw, torch.device("cpu")) == {}
    assert device_step_kwargs(partial(adamw, foreach=False), torch.device("cuda")) == {}
    assert device_step_kwargs(partial(adamw, fused=False), torch.device("cuda")) == {}
