"""Issue 33: every backbone family the README lists, as the suite builds and runs it.

Per family (tiny pretrained=False instances of timm's own architectures):
- zero prompts + BitFit at its initial values: the suite's feature equals timm's
  forward_features + pooling (forward_head(pre_logits=True));
- with prompts: the fused step (K/V-only prompts for timm's ViT Block, timm's own Eva
  blocks on padded + masked prompts) equals the two-pass step in values and gradients;
- Eva with RoPE: prompts get no rotary embedding and patches keep theirs, checked against
  timm's own way of exempting tokens from RoPE (counting them as prefix tokens), values
  and gradients; the prompts do act;
- the pool reads timm's token layout (prompt outputs never reach it);
- BitFit, adapters and LoRA reach the Eva attention's parameters; a class the prompted
  forward cannot serve is refused in one line.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn

from vpt_dml.errors import UserError
from vpt_dml.losses import ProxyAnchorLoss
from vpt_dml.models.backbone import built_report, create_backbone
from vpt_dml.models.build import build_embedder, build_model, training_outputs
from vpt_dml.models.peft import apply_peft
from vpt_dml.models.prompted_vit import PromptedViT

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
# family -> (timm name, extra kwargs, timm class, fused path, pool)
FAMILIES = {
    "in21k ViT": ("vit_small_patch16_224.augreg_in21k", {}, "VisionTransformer", True, "token"),
    "CLIP ViT, norm_pre": ("vit_base_patch16_clip_224", {}, "VisionTransformer", True, "token"),
    "DINOv2, registers + layer scale": (
        "vit_small_patch14_reg4_dinov2",
        {},
        "VisionTransformer",
        True,
        "token",
    ),
    "SigLIP 2, map pool": (
        "vit_base_patch16_siglip_224.v2_webli",
        {},
        "VisionTransformer",
        True,
        "map",
    ),
    "EVA-02": ("eva02_tiny_patch14_224", {}, "Eva", True, "avg"),
    # layer scale 0.5 instead of 1e-5 so that the prompts visibly act at init
    "DINOv3": ("vit_small_patch16_dinov3", {"init_values": 0.5}, "Eva", True, "avg"),
    "DINOv3, CLS pool, qkv bias": (
        "vit_small_patch16_dinov3_qkvb",
        {"init_values": 0.5, "global_pool": "token"},
        "Eva",
        True,
        "token",
    ),
    "Perception Encoder": ("vit_pe_core_tiny_patch16_384", {}, "Eva", True, "map"),
    "RoPE ViT, mixed (per-layer) RoPE": (
        "vit_small_patch16_rope_mixed_224",
        {"init_values": 0.5},
        "Eva",
        True,
        "token",
    ),
}
EVA = [f for f, spec in FAMILIES.items() if spec[2] == "Eva"]
RTOL, ATOL = 1e-5, 1e-6  # float32 (dtype-derived: GEMM summation order)


def cfg_of(family: str, prompts: int = 0, class_depth: int = 2, **peft) -> dict:
    name, extra, *_ = FAMILIES[family]
    return {
        "backbone": {
            "name": name,
            "pretrained": False,
            "weights": None,
            "kwargs": {**TINY, **extra},
        },
        "peft": {"prompts": {"num": prompts, "depth": 2, "step": 1}, "bitfit": True, **peft},
        "proxy": {
            "kind": "semantic_gru",
            "bias_ratio": 0.5,
            "class_prompts": {"num": 2, "depth": class_depth, "step": 0},
        },
        "embed_dim": 16,
        "fused_branches": True,
    }


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_zero_prompts_bitfit_at_init_equal_timms_forward_and_pool(family):
    name, extra, cls, _, pool = FAMILIES[family]
    torch.manual_seed(0)
    embedder = build_embedder({**cfg_of(family), "embed_dim": None}).eval()
    vit = embedder.backbone.vit
    assert type(vit).__name__ == cls
    assert built_report(vit)["pooling"]["pool"] == pool
    # BitFit opened every bias, nothing else of the backbone
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1].endswith("bias") for n in trainable)
    x = images()
    with torch.no_grad():
        want = vit.forward_head(vit.forward_features(x), pre_logits=True)
        got = embedder.backbone(x)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    # and timm's own instance of the same seed gives the same feature (nothing was changed)
    torch.manual_seed(0)
    fresh = timm.create_model(name, pretrained=False, num_classes=0, **TINY, **extra).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.forward_head(fresh.forward_features(x), True), want, rtol=RTOL, atol=ATOL
        )


def step(model, x, labels, fused: bool):
    emb, prox = training_outputs(model.embedder, model.proxies, fused)(x, labels)
    ProxyAnchorLoss(positive_normalization="all")(emb, labels, prox).backward()
    named = [*model.embedder.named_parameters(), *model.proxies.named_parameters()]
    return emb.detach(), prox.detach(), {n: p.grad for n, p in named if p.requires_grad}


# image prompts 3, 2 per layer; class prompts 2, 2 (layer 1: same length, no mask) or
# 2, 0 (every layer: lengths differ, the Eva pass pads and masks)
@pytest.mark.parametrize("class_depth", [2, 1])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompted_step_fused_equals_two_pass(family, class_depth):
    fuses = FAMILIES[family][3]
    torch.manual_seed(0)
    model = build_model({"model": cfg_of(family, prompts=3, class_depth=class_depth)}, 4)
    assert model.fused == fuses
    x, labels = images(8), torch.tensor([2, 2, 0, 0, 3, 3, 1, 1])
    reference = step(copy.deepcopy(model), x, labels, fused=False)
    for key in ("backbone.prompts.tokens.0", "class_prompts.tokens.0"):
        assert reference[2][key].abs().sum() > 0, key  # both prompt sets train
    biases = [k for k in reference[2] if k.startswith("backbone.vit.blocks.0.attn")]
    assert biases and all(reference[2][k].abs().sum() > 0 for k in biases), biases
    fused = step(model, x, labels, fused=True)
    for got, want in zip(fused[:2], reference[:2], strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert fused[2].keys() == reference[2].keys()
    for key, want in reference[2].items():
        err = (fused[2][key] - want).abs().max().item()
        assert err <= RTOL * want.abs().max().item() + 1e-7, f"{key}: {err:g}"


def timm_exempted_reference(vit, x, prompts):
    """Prompts after the prefix, exempted from RoPE by timm's own mechanism: each block's
    attention counts them as prefix tokens (num_prefix_tokens + n) and rotates the rest."""
    x = vit.patch_embed(x)
    x, rope = vit._pos_embed(x)
    x = vit.norm_pre(x)
    p = vit.num_prefix_tokens
    for layer, (blk, prompt) in enumerate(zip(vit.blocks, prompts, strict=True)):
        r = rope[layer] if getattr(vit, "rope_mixed", False) else rope
        n = 0 if prompt is None else prompt.shape[0]
        x = torch.cat([x[:, :p], prompt.expand(x.shape[0], -1, -1), x[:, p:]], 1) if n else x
        blk.attn.num_prefix_tokens = p + n
        try:
            x = blk(x, rope=r)
        finally:
            blk.attn.num_prefix_tokens = p
        x = torch.cat([x[:, :p], x[:, p + n :]], 1)
    return vit.forward_head(vit.norm(x), pre_logits=True)


@pytest.mark.parametrize("family", EVA)
def test_eva_prompts_get_no_rotary_embedding_patches_keep_theirs(family):
    torch.manual_seed(0)
    embedder = build_embedder({**cfg_of(family, prompts=3), "embed_dim": None}).eval()
    backbone, vit = embedder.backbone, embedder.backbone.vit
    assert vit.rope is not None
    prompts = backbone.prompts.per_layer()
    x = images()
    got = backbone(x)
    got.square().sum().backward()
    got_grads = [p.grad.clone() for p in backbone.prompts.tokens]
    bias = next(p for n, p in vit.named_parameters() if p.requires_grad)
    got_bias = bias.grad.clone()
    backbone.zero_grad()
    want = timm_exempted_reference(vit, x, prompts)
    want.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    for g, p in zip(got_grads, backbone.prompts.tokens, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got_bias, bias.grad, rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        plain = vit.forward_head(vit.forward_features(x), pre_logits=True)
        # prompts act; without positions their order within a layer does not matter
        assert (got - plain).abs().max() > 1e-3 * plain.abs().max()
        shuffled = [p.flip(0) if p is not None else None for p in prompts]
        torch.testing.assert_close(backbone(x, shuffled), got, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_pool_reads_timms_token_layout_with_prompts(family):
    torch.manual_seed(0)
    embedder = build_embedder({**cfg_of(family, prompts=3), "embed_dim": None}).eval()
    vit = embedder.backbone.vit
    seen = []
    hook = vit.norm.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        embedder.backbone(images())
    hook.remove()
    assert seen == [vit.num_prefix_tokens + vit.patch_embed.num_patches]


def eva02() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=0, **TINY)


def test_bitfit_trains_evas_qkv_biases():
    vit = eva02()
    apply_peft(vit, {"bitfit": True})
    assert vit.blocks[0].attn.q_bias.requires_grad and vit.blocks[0].attn.v_bias.requires_grad
    vit.forward_features(images()).sum().backward()
    assert vit.blocks[0].attn.q_bias.grad.abs().sum() > 0


def test_lora_on_evas_qkv_acts():
    """EvaAttention with q/v biases reads qkv.weight directly: LoRA must still act."""
    pytest.importorskip("peft")
    vit = eva02().eval()
    x = images()
    with torch.no_grad():
        before = vit.forward_features(x)
    apply_peft(vit, {"lora": {"enabled": True, "rank": 2}})
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), before, rtol=RTOL, atol=ATOL)
    vit.forward_features(x).square().sum().backward()
    lora_b = vit.blocks[0].attn.qkv.lora_B["default"].weight
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0
    with torch.no_grad():
        lora_b.normal_()
        assert (vit.forward_features(x) - before).abs().max() > 1e-3


def test_adapters_on_eva_blocks_start_as_identity_and_train():
    vit = eva02().eval()
    x = images()
    with torch.no_grad():
        before = vit.forward_features(x)
    apply_peft(vit, {"adapter": {"enabled": True, "bottleneck": 4}})
    out = vit.forward_features(x)
    torch.testing.assert_close(out, before, rtol=RTOL, atol=ATOL)
    out.square().sum().backward()
    assert vit.blocks[-1].mlp.adapter.up.weight.grad.abs().sum() > 0


def test_a_class_the_prompted_forward_cannot_serve_is_refused_in_one_line():
    with pytest.raises(UserError) as e:
        create_backbone("beit_base_patch16_224", kwargs=TINY)
    assert "Beit" in str(e.value) and "\n" not in str(e.value)
    assert "VisionTransformer or Eva" in str(e.value)


def test_prompted_forward_on_eva_equals_timm_with_zero_length_prompts():
    vit = eva02().eval()
    with torch.no_grad():
        got = PromptedViT(vit, [0, 0])(images())
        want = vit.forward_head(vit.forward_features(images()), pre_logits=True)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_small_patch16_rope_mixed_224"])
def test_fused_pass_with_patch_dropout_equals_two_passes_under_the_same_draw(name):
    """timm's patch dropout gives the rope rows a batch dim: the fused pass repeats them
    per branch. Under the same seed both branches keep the same patches as the fused pass."""
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, num_classes=0, patch_drop_rate=0.5, **TINY)
    backbone = PromptedViT(vit, [3, 2]).train()
    x = images(4)
    branches = [backbone.prompts.per_layer(), [torch.randn(4, 2, 64), None]]
    torch.manual_seed(5)
    fused = backbone.forward_branches(x, branches)
    for got, prompts in zip(fused, branches, strict=True):
        torch.manual_seed(5)
        torch.testing.assert_close(got, backbone(x, prompts), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("fused", [False, True])
def test_gradient_checkpointing_on_eva_changes_nothing(fused):
    """Checkpointed layers get their rope rows again in the recomputation."""
    torch.manual_seed(0)
    model = build_model({"model": cfg_of("DINOv3", prompts=3, class_depth=1)}, 4)
    x, labels = images(8), torch.tensor([2, 2, 0, 0, 3, 3, 1, 1])
    reference = step(copy.deepcopy(model), x, labels, fused)
    model.embedder.backbone.set_grad_checkpointing(True)
    got = step(model, x, labels, fused)
    torch.testing.assert_close(got[0], reference[0], rtol=RTOL, atol=ATOL)
    for key, want in reference[2].items():
        torch.testing.assert_close(got[2][key], want, rtol=RTOL, atol=ATOL)


def test_lora_on_a_layer_the_forward_never_calls_is_refused_in_one_line(monkeypatch):
    """Without the switch to call `qkv`, EVA's attention reads qkv.weight directly: the
    wrapped layer is never called, and the build says so instead of training nothing."""
    pytest.importorskip("peft")
    import vpt_dml.models.lora as lora

    monkeypatch.setattr(lora, "call_qkv_module", lambda vit: None)
    with pytest.raises(UserError, match="never called") as e:
        apply_peft(eva02(), {"lora": {"enabled": True, "rank": 2}})
    assert "blocks.0.attn.qkv" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("family", ["DINOv3", "EVA-02", "Perception Encoder", "SigLIP 2, map pool"])
def test_prompted_embedder_exports_to_onnx_with_the_same_embeddings(family, tmp_path):
    """The inference model (prompts, RoPE rows, pool) through ONNX, checked by onnxruntime."""
    pytest.importorskip("onnxruntime")
    from vpt_dml.serving.onnx_export import export_onnx

    torch.manual_seed(0)
    embedder = build_embedder(cfg_of(family, prompts=3)).eval()
    report = export_onnx(embedder, 32, tmp_path / "m.onnx", "vptsp", "tracer")
    assert report["max_abs_diff"] <= report["atol"]


def test_lora_qkv_on_eva02_with_separate_projections_names_them_in_one_line():
    """EVA-02 B/L have q_proj, k_proj, v_proj instead of qkv: the refusal names them."""
    pytest.importorskip("peft")
    kwargs = {**TINY, "img_size": 28, "patch_size": 14}
    vit = timm.create_model("eva02_base_patch14_224", pretrained=False, num_classes=0, **kwargs)
    with pytest.raises(UserError, match=r"targets=\[q_proj,k_proj,v_proj\]") as e:
        apply_peft(vit, {"lora": {"enabled": True}})
    assert "\n" not in str(e.value)
    apply_peft(vit, {"lora": {"enabled": True, "targets": ["q_proj", "k_proj", "v_proj"]}})
    vit.forward_features(torch.randn(1, 3, 28, 28)).square().sum().backward()
    assert vit.blocks[0].attn.k_proj.lora_B["default"].weight.grad.abs().sum() > 0
