"""Export: only the tuned tensors, >=20x smaller than the checkpoint, same embeddings."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf, open_dict
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import compose_config, tiny_overrides
from vpt_dml.errors import UserError
from vpt_dml.export import main
from vpt_dml.models.build import build_embedder
from vpt_dml.run import train
from vpt_dml.serving.exported import export_run, load_exported, run_checkpoint

# Frozen weights dominate, as in a real ViT (the TINY_* backbone is too small to show it).
EXPORT_BACKBONE = [
    "++model.backbone.kwargs={img_size: 32, patch_size: 8, embed_dim: 96, depth: 4, num_heads: 3}",
    "model.embed_dim=16",
]


EXPORT_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}


def vit_weights_file(out: Path, seed: int = 0) -> Path:
    """A ViT of EXPORT_VIT's shape as a local weights file (what a download would be)."""
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **EXPORT_VIT)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(out))
    return out


def train_run(root: Path, weights: Path | None = None, *extra: str) -> Path:
    """A tiny run on the backbone file `weights` (None: a random-init backbone)."""
    backbone = [f"model.backbone.weights={weights}"] if weights else []
    overrides = tiny_overrides(*EXPORT_BACKBONE, *backbone, "eval_before_training=false", *extra)
    cfg = compose_config(overrides, root)
    train(cfg)
    return Path(cfg.paths.output_dir)


def backbone_weights_file(run_dir: Path, out: Path) -> Path:
    """The run's backbone as a local weights file, read back from its last.ckpt."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    prefix = "embedder.backbone.vit."
    vit = {
        k.removeprefix(prefix): v.contiguous()
        for k, v in ckpt["state_dict"].items()
        if k.startswith(prefix)
    }
    save_file(vit, str(out))
    return out


def trained_embedder(run_dir: Path):
    """The trained image branch straight from last.ckpt (the reference for the export)."""
    model_cfg = OmegaConf.to_container(
        OmegaConf.load(run_dir / "config_resolved.yaml").model, resolve=True
    )
    embedder = build_embedder(model_cfg)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    state = {
        k.removeprefix("embedder."): v
        for k, v in ckpt["state_dict"].items()
        if k.startswith("embedder.")
    }
    embedder.load_state_dict(state)
    return embedder.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    weights = vit_weights_file(root / "backbone.safetensors")
    run_dir = train_run(root, weights)
    out = root / "model.safetensors"
    report = export_run(run_dir, out)
    return {"run_dir": run_dir, "file": out, "report": report, "weights": weights}


def test_export_holds_only_tuned_tensors_and_is_small(exported) -> None:
    report = exported["report"]
    assert report["checkpoint_bytes"] >= 20 * report["export_bytes"], report
    with safe_open(str(exported["file"]), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "head.fc.weight" in keys and "backbone.prompts.tokens.0" in keys
    assert "backbone.vit.blocks.0.attn.qkv.bias" in keys  # BitFit
    assert not any(k.endswith(".weight") and k.startswith("backbone.vit.") for k in keys)
    assert not any(k.startswith("proxies") for k in keys)  # training aids stay behind
    assert json.loads(meta["fingerprint"])["backbone"] == "vit_tiny_patch16_224"


def test_exported_embeddings_equal_trained_model(exported) -> None:
    model = load_exported(exported["file"], backbone_weights=str(exported["weights"]))
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained_embedder(exported["run_dir"])(images)
    torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-6)


def test_load_refuses_other_backbone(exported, tmp_path: Path) -> None:
    # same name and shapes, other frozen weights
    other = vit_weights_file(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(UserError, match="checksum mismatch"):
        load_exported(exported["file"], backbone_weights=str(other))


def test_export_of_a_random_init_run_loads_back(tmp_path: Path, capsys) -> None:
    """Issue 19 finding 11: the backbone of a random-init run cannot be rebuilt by name,
    so the export carries it; loading needs no other file and gives the run's embeddings."""
    run_dir = train_run(tmp_path)  # pretrained=false, weights=null
    out = tmp_path / "model.safetensors"
    assert main([str(run_dir), str(out)]) == 0
    torch.manual_seed(123)  # another init than the run's, should anything rebuild one
    model = load_exported(out)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = trained_embedder(run_dir)(images)
    torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-6)
    assert "frozen tensors are in" in capsys.readouterr().out  # and says why it is larger


def test_cli_reports_error_in_one_line(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "missing_run"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "config_resolved.yaml" in err


def test_export_rejects_checkpoint_of_another_model(exported, tmp_path: Path) -> None:
    other = tmp_path / "run"
    other.mkdir()
    cfg = OmegaConf.load(exported["run_dir"] / "config_resolved.yaml")
    with open_dict(cfg):
        cfg.model.embed_dim = 8  # the checkpoint's head is 16-d
    (other / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg))
    ckpt = exported["run_dir"] / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match="does not match the model"):
        export_run(other, tmp_path / "x.safetensors", which=str(ckpt))


def test_best_is_the_checkpoint_the_run_names_not_a_name_sort(exported, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(exported["run_dir"], run)
    ckpts = run / "checkpoints"
    # an earlier run's best-epoch000.ckpt sorts after this run's -v1, which metrics.json names
    shutil.copy(ckpts / "last.ckpt", ckpts / "best-epoch000-v1.ckpt")
    result = json.loads((run / "metrics.json").read_text())
    result["best"]["checkpoint"] = str(ckpts / "best-epoch000-v1.ckpt")
    (run / "metrics.json").write_text(json.dumps(result))
    assert run_checkpoint(run, "best") == ckpts / "best-epoch000-v1.ckpt"
    # a killed run has no metrics.json: its last.ckpt's ModelCheckpoint state names the best
    (run / "metrics.json").unlink()
    named = Path(exported["run_dir"]).joinpath("checkpoints").glob("best*.ckpt")
    assert run_checkpoint(run, "best").name == next(named).name


def test_export_refuses_an_unsafe_pickle_in_one_line(exported, tmp_path: Path, capsys) -> None:
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hook": os.system}, evil)
    out = tmp_path / "x.safetensors"
    assert main([str(exported["run_dir"]), str(out), "--checkpoint", str(evil)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "posix.system" in err
    assert not out.exists()


def test_export_onnx_of_a_run_equals_the_exported_model(exported, tmp_path: Path, capsys) -> None:
    from vpt_dml.serving.onnx_export import run_onnx

    out = tmp_path / "model.onnx"
    assert main([str(exported["run_dir"]), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "max abs diff" in printed
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    model = load_exported(exported["file"], backbone_weights=str(exported["weights"]))
    expected = model(images).numpy()
    torch.testing.assert_close(
        torch.from_numpy(run_onnx(out, images.numpy())),
        torch.from_numpy(expected),
        rtol=0,
        atol=1e-4,
    )
    assert main([str(exported["run_dir"])]) == 2  # neither output named
    assert "--onnx" in capsys.readouterr().err
