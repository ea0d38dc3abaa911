"""Prompted ViT and backbones: equality with timm, prompt placement, init, weights."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from vpt_dml.errors import WeightsError
from vpt_dml.models.backbone import create_backbone
from vpt_dml.models.build import build_embedder
from vpt_dml.models.prompted_vit import PromptedViT, layer_counts, xavier_normal_tokens

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
# plain CLS ViT, distilled two-token ViT, DINOv2-style (registers + layer scale), CLIP (pre-norm)
MODELS = {
    "vit_tiny_patch16_224": {},
    "deit_tiny_distilled_patch16_224": {},
    "vit_small_patch14_reg4_dinov2": {"img_size": 32, "patch_size": 8},
    "vit_base_patch16_clip_224": {},
}


def tiny_vit(name: str = "vit_tiny_patch16_224") -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, **{**TINY, **MODELS[name]})


@pytest.mark.parametrize("name", list(MODELS))
def test_no_prompts_no_head_equals_timm_feature(name):
    vit = tiny_vit(name).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = vit(images)  # timm's own pooled CLS (pre-logits) feature
        got = PromptedViT(vit, []).eval()(images)
        cfg = {
            "backbone": {"name": name, "kwargs": {**TINY, **MODELS[name]}},
            "peft": {"prompts": {"num": 0, "depth": 0, "step": 0}},
            "embed_dim": None,
        }
        torch.manual_seed(0)
        embedder = build_embedder(cfg).eval()
    assert torch.equal(got, want)
    torch.testing.assert_close(embedder(images), F.normalize(want, dim=-1), rtol=0, atol=1e-6)


def reference_deep_prompts(vit, images, prompts):
    """The reference code's forward: prompts prepended before CLS, dropped after each block."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    for blk, p in zip(vit.blocks, prompts):
        n = 0 if p is None else p.shape[0]
        if n:
            x = torch.cat([p.expand(x.shape[0], -1, -1), x], dim=1)
        x = blk(x)[:, n:]
    return vit.forward_head(vit.norm(x), pre_logits=True)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_deep_prompts_equal_reference_forward(name):
    vit = tiny_vit(name).eval()
    pv = PromptedViT(vit, [3, 2]).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = pv(images)
        want = reference_deep_prompts(vit, images, pv.prompts.per_layer())
        plain = vit(images)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, rtol=1e-5, atol=1e-4)  # the prompts do act


def test_per_sample_prompts_equal_shared_prompts_per_sample():
    vit = tiny_vit().eval()
    pv = PromptedViT(vit, [2, 2]).eval()
    images = torch.randn(3, 3, 32, 32)
    per_sample = [torch.randn(3, 2, 32), None]
    with torch.no_grad():
        batched = pv(images, per_sample)
        one_by_one = torch.cat([pv(images[i : i + 1], [per_sample[0][i], None]) for i in range(3)])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)


def test_layer_counts_block_step_and_depth():
    assert layer_counts(80, 11, 2, 12) == [80 - 2 * i for i in range(11)] + [0]
    assert layer_counts(5, 4, 5, 12) == [5] + [0] * 11  # CUB ViT-B: class prompts on layer 0 only
    assert layer_counts(10, 12, 0, 2) == [10, 10]  # layers past the backbone are ignored
    assert layer_counts(90, 12, 5, 12)[-1] == 35
    assert PromptedViT(tiny_vit(), layer_counts(4, 12, 3, 2)).prompts.counts == [4, 1]


def test_prompt_init_is_torch_xavier_normal_of_the_full_tensor():
    torch.manual_seed(3)
    want = nn.init.xavier_normal_(torch.empty(7, 5, 16))[:, :2]
    torch.manual_seed(3)
    assert torch.equal(xavier_normal_tokens(7, 5, 16, keep=2), want)
    torch.manual_seed(4)
    shared = nn.init.xavier_normal_(torch.empty(1, 10, 16))[0]
    torch.manual_seed(4)
    assert torch.equal(xavier_normal_tokens(10, 16), shared)


def test_local_weights_file_is_loaded(tmp_path):
    from safetensors.torch import save_file

    src = tiny_vit()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = create_backbone("vit_tiny_patch16_224", weights=str(path), kwargs=TINY)
    for (k, a), (_, b) in zip(src.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_missing_weights_file_names_both_ways(tmp_path):
    with pytest.raises(WeightsError, match="pretrained=true") as err:
        create_backbone("vit_tiny_patch16_224", weights=str(tmp_path / "nope.safetensors"))
    assert "does not exist" in str(err.value)


def test_hub_unreachable_names_both_ways(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    with pytest.raises(WeightsError) as err:
        create_backbone("vit_tiny_patch16_224", pretrained=True, kwargs=TINY)
    msg = str(err.value)
    # pretrained=true is already set: the line names what stood in the way, not that
    assert "model.backbone.pretrained=true" not in msg and "model.backbone.weights=" in msg
    assert "\n" not in msg
