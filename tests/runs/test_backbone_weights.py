"""Strict loading of `model.backbone.weights`: right ViT weights load with nothing missing,
anything else (another architecture, a tensor short, garbage) stops with one line; prefixed
and nested state dicts load like the plain file; the weights report names the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from conftest import REPO, cli_in_process, tiny_overrides
from safetensors.torch import save_file

from vpt_dml.errors import WeightsError
from vpt_dml.models.backbone import create_backbone
from vpt_dml.models.weights import weights_report

NAME = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def source_state(num_classes: int = 10, **overrides) -> dict[str, torch.Tensor]:
    """A tiny ViT's full state dict, classifier head included, as a downloaded file has it."""
    torch.manual_seed(0)
    model = timm.create_model(
        NAME, pretrained=False, num_classes=num_classes, **{**TINY, **overrides}
    )
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def load(path: Path) -> nn.Module:
    torch.manual_seed(123)  # another random init: everything must come from the file
    return create_backbone(NAME, weights=str(path), kwargs=TINY)


def assert_equal_to(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert own.keys() == {k for k in state if not k.startswith("head.")}
    for k, v in own.items():
        assert torch.equal(v, state[k]), k


def one_line_error(path: Path) -> str:
    with pytest.raises(WeightsError) as err:
        load(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_right_weights_load_with_nothing_missing_and_are_reported(tmp_path: Path, suffix: str):
    state = source_state()
    path = save(state, tmp_path / f"vit{suffix}")
    model = load(path)
    assert_equal_to(model, state)
    report = weights_report(model)
    assert report["missing"] == 0 and report["unexpected"] == 0 and report["mis_shaped"] == 0
    assert report["classifier_keys_dropped"] == 2  # head.weight, head.bias
    assert report["file"] == str(path.resolve())
    assert report["size_bytes"] == path.stat().st_size
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report["prefix_stripped"] is None and report["nested_key"] is None
    # no file, no report
    assert weights_report(create_backbone(NAME, kwargs=TINY)) is None


def test_a_checkpoint_one_tensor_short_or_long_or_of_another_size_is_refused(tmp_path: Path):
    state = source_state()
    short = {k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}
    msg = one_line_error(save(short, tmp_path / "short.safetensors"))
    n = len(create_backbone(NAME, kwargs=TINY).state_dict())
    assert f"1 of {n} backbone tensors missing (e.g. blocks.1.mlp.fc2.bias)" in msg
    assert "0 unexpected" in msg and "0 mis-shaped" in msg

    extra = {**state, "blocks.0.attn.q_norm.weight": torch.ones(16)}
    msg = one_line_error(save(extra, tmp_path / "extra.safetensors"))
    assert "1 unexpected (e.g. blocks.0.attn.q_norm.weight)" in msg

    wider = source_state(embed_dim=48, num_heads=3)
    msg = one_line_error(save(wider, tmp_path / "wider.safetensors"))
    assert "mis-shaped (e.g. cls_token: file [1, 1, 48], model [1, 1, 32])" in msg
    assert "seems to hold a ViT (width 48, 2 blocks, patch 8" in msg


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_resnet_weights_are_refused_naming_resnet(tmp_path: Path, suffix: str):
    resnet = timm.create_model("resnet10t", pretrained=False)
    path = save(
        {k: v.contiguous() for k, v in resnet.state_dict().items()}, tmp_path / f"r{suffix}"
    )
    msg = one_line_error(path)
    n = len(create_backbone(NAME, kwargs=TINY).state_dict())
    assert f"{n} of {n} backbone tensors missing (e.g. cls_token, pos_embed)" in msg
    assert f"{len(resnet.state_dict())} unexpected (e.g. " in msg
    assert "seems to hold a ResNet" in msg


def test_resnet_weights_stop_the_run_with_one_error_line(tmp_path: Path):
    resnet = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "resnet.safetensors"
    save({k: v.contiguous() for k, v in resnet.state_dict().items()}, path)
    res = cli_in_process(
        [
            *tiny_overrides(f"model.backbone.weights={path}"),
            f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=REPO,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ResNet" in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("wrap", "nested", "prefix", "outside"),
    [
        (lambda sd: {f"backbone.{k}": v for k, v in sd.items()}, None, "backbone.", 0),
        (lambda sd: {f"module.{k}": v for k, v in sd.items()}, None, "module.", 0),
        (lambda sd: {f"model.{k}": v for k, v in sd.items()}, None, "model.", 0),
        (lambda sd: {"state_dict": sd, "epoch": 3}, "state_dict", None, 0),
        (lambda sd: {"model": sd}, "model", None, 0),
        # a DINO-style teacher: ViT under 'backbone.', its projection head outside
        (
            lambda sd: {
                "teacher": {
                    **{f"backbone.{k}": v for k, v in sd.items()},
                    "head.mlp.0.weight": torch.zeros(4, 32),
                },
                "epoch": 7,
            },
            "teacher",
            "backbone.",
            1,
        ),
        (
            lambda sd: {"state_dict": {f"module.backbone.{k}": v for k, v in sd.items()}},
            "state_dict",
            "module.backbone.",
            0,
        ),
    ],
)
def test_prefixed_and_nested_weights_load_like_the_plain_file(
    tmp_path: Path, wrap, nested, prefix, outside
):
    state = source_state()
    plain = load(save(state, tmp_path / "plain.safetensors"))
    wrapped = load(save(wrap(state), tmp_path / "wrapped.pth"))
    for (k, a), (_, b) in zip(plain.state_dict().items(), wrapped.state_dict().items()):
        assert torch.equal(a, b), k
    report = weights_report(wrapped)
    assert (report["nested_key"], report["prefix_stripped"]) == (nested, prefix)
    assert report["keys_outside_prefix"] == outside
    assert report["missing"] == report["unexpected"] == 0


def test_prefixed_safetensors_load_too(tmp_path: Path):
    state = source_state()
    model = load(save({f"backbone.{k}": v for k, v in state.items()}, tmp_path / "p.safetensors"))
    assert_equal_to(model, state)
    assert weights_report(model)["prefix_stripped"] == "backbone."


def test_unreadable_files_are_one_line_errors(tmp_path: Path):
    garbage = bytes(range(256)) * 64
    (tmp_path / "g.pth").write_bytes(garbage)
    assert "is not a readable PyTorch checkpoint" in one_line_error(tmp_path / "g.pth")
    (tmp_path / "g.safetensors").write_bytes(garbage)
    assert "is not a readable safetensors file" in one_line_error(tmp_path / "g.safetensors")
    (tmp_path / "g.npz").write_bytes(garbage)
    assert "is not a readable .npz archive" in one_line_error(tmp_path / "g.npz")
    np.savez(tmp_path / "other.npz", **{"block1/unit01/a/kernel": np.zeros(3)})
    msg = one_line_error(tmp_path / "other.npz")
    assert "does not fit" in msg and "seems to hold a BiT ResNet" in msg
    (tmp_path / "empty.bin").write_bytes(b"")
    assert "is not a readable PyTorch checkpoint" in one_line_error(tmp_path / "empty.bin")

    good = save(source_state(), tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(good[: len(good) // 2])
    assert "is not a readable PyTorch checkpoint" in one_line_error(tmp_path / "cut.pth")

    torch.save(nn.Linear(2, 2), tmp_path / "pickled_module.pth")  # a whole pickled object
    assert "refuses to unpickle" in one_line_error(tmp_path / "pickled_module.pth")

    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "no_tensors.pth")
    assert "not a state dict of tensors" in one_line_error(tmp_path / "no_tensors.pth")


def jax_npz(state: dict[str, torch.Tensor], heads: int, depth: int) -> dict[str, np.ndarray]:
    """The original (non big_vision) JAX ViT .npz layout of a timm state dict."""

    def a(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy().copy()

    out = {
        "embedding/kernel": a(state["patch_embed.proj.weight"].permute(2, 3, 1, 0)),
        "embedding/bias": a(state["patch_embed.proj.bias"]),
        "cls": a(state["cls_token"]),
        "Transformer/posembed_input/pos_embedding": a(state["pos_embed"]),
        "Transformer/encoder_norm/scale": a(state["norm.weight"]),
        "Transformer/encoder_norm/bias": a(state["norm.bias"]),
    }
    for i in range(depth):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        dim = state[b + "attn.proj.weight"].shape[0]
        qkv_w = state[b + "attn.qkv.weight"].chunk(3)
        qkv_b = state[b + "attn.qkv.bias"].chunk(3)
        for n, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b):
            out[f"{p}MultiHeadDotProductAttention_1/{n}/kernel"] = a(w.T.reshape(dim, heads, -1))
            out[f"{p}MultiHeadDotProductAttention_1/{n}/bias"] = a(bias.reshape(heads, -1))
        proj = state[b + "attn.proj.weight"].reshape(dim, heads, -1).permute(1, 2, 0)
        out[f"{p}MultiHeadDotProductAttention_1/out/kernel"] = a(proj)
        out[f"{p}MultiHeadDotProductAttention_1/out/bias"] = a(state[b + "attn.proj.bias"])
        for j, norm in ((0, "norm1"), (2, "norm2")):
            out[f"{p}LayerNorm_{j}/scale"] = a(state[f"{b}{norm}.weight"])
            out[f"{p}LayerNorm_{j}/bias"] = a(state[f"{b}{norm}.bias"])
        for r in range(2):
            out[f"{p}MlpBlock_3/Dense_{r}/kernel"] = a(state[f"{b}mlp.fc{r + 1}.weight"].T)
            out[f"{p}MlpBlock_3/Dense_{r}/bias"] = a(state[f"{b}mlp.fc{r + 1}.bias"])
    return out


def test_jax_npz_loads_through_timm_and_a_short_one_is_refused(tmp_path: Path):
    state = source_state(num_classes=0)
    arrays = jax_npz(state, TINY["num_heads"], TINY["depth"])
    np.savez(tmp_path / "vit.npz", **arrays)
    model = load(tmp_path / "vit.npz")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=1e-6, msg=k)
    report = weights_report(model)
    assert report["format"] == "npz" and report["missing"] == 0 and report["unexpected"] is None

    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    np.savez(tmp_path / "short.npz", **arrays)
    msg = one_line_error(tmp_path / "short.npz")
    assert "does not fit" in msg and "Dense_1/bias" in msg and "seems to hold a JAX ViT" in msg


def test_a_run_records_its_weights_file_in_metrics_json(tmp_path: Path):
    """metrics.json names the exact weights: size, SHA-256 and 0 missing / 0 unexpected."""
    import hashlib
    import json

    from conftest import compose_config
    from hydra.core.hydra_config import HydraConfig

    from vpt_dml.run import train

    path = save(source_state(), tmp_path / "vit.safetensors")
    cfg = compose_config(tiny_overrides(f"model.backbone.weights={path}"), tmp_path)
    HydraConfig.instance().set_config(cfg)
    train(cfg)
    backbone = json.loads((tmp_path / "run" / "metrics.json").read_text())["provenance"]["backbone"]
    report = backbone["weights_file"]
    assert (report["missing"], report["unexpected"]) == (0, 0)
    assert report["size_bytes"] == path.stat().st_size
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
