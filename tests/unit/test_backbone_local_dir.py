"""`model.backbone.name=local-dir:/path` (issue 33): a folder written by timm itself.

timm's save_for_hf writes config.json (architecture, model_args, pretrained_cfg with the
preprocessing) + model.safetensors. The suite builds the folder's architecture, loads its
weights strictly, feeds its mean/std to the training and evaluation transforms (read back
here from the transforms), records the preprocessing with the sha256 of config.json in
metrics.json, and names a preprocessing that differs from the architecture's default in a
warning, also for a bare weights file with such a config.json beside it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pytest
import timm
import torch
from conftest import compose_config, tiny_overrides
from hydra.utils import instantiate
from PIL import Image

from vpt_dml.errors import UserError
from vpt_dml.models.backbone import built_report, create_backbone, data_config

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
MEAN, STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)  # not SigLIP's default 0.5 / 0.5
ARCH = "vit_base_patch16_siglip_224"


def timm_folder(tmp_path: Path, name: str = "siglip_folder") -> tuple[Path, torch.nn.Module]:
    """A tiny SigLIP saved by timm with its own preprocessing."""
    from timm.models import save_for_hf

    torch.manual_seed(3)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **TINY).eval()
    folder = tmp_path / name
    save_for_hf(
        model,
        str(folder),
        safe_serialization=True,
        data_config={"mean": MEAN, "std": STD, "interpolation": "bicubic", "crop_pct": 1.0},
    )
    return folder, model


def local_overrides(folder: Path, *extra: str) -> list[str]:
    return tiny_overrides(
        "model/backbone=timm",
        f"model.backbone.name=local-dir:{folder}",
        "model.backbone.pretrained=false",
        "++model.backbone.kwargs={}",  # the folder's model_args describe the model
        *extra,
    )


def test_folder_weights_load_strictly_and_its_mean_std_reach_the_transforms(tmp_path, caplog):
    folder, saved = timm_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vpt_dml"):
        vit = create_backbone(f"local-dir:{folder}")
    # the folder's weights, not a random init: same features as the saved model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), saved(x), rtol=1e-5, atol=1e-6)
    # a preprocessing other than the architecture's default is named in a warning
    warned = [r.getMessage() for r in caplog.records if "preprocessing" in r.getMessage()]
    assert any(str(folder) in m and ARCH in m and "0.1" in m for m in warned), warned
    # recorded with the sha256 of config.json (metrics.json's provenance.backbone.built)
    pre = built_report(vit)["preprocessing"]
    sha = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    assert pre["config_sha256"] == sha and pre["source"] == f"local-dir:{folder}"
    assert (pre["mean"], pre["std"], pre["interpolation"]) == (list(MEAN), list(STD), "bicubic")

    # the datamodule's transforms, set up as a run sets them (data_config -> set_preprocessing)
    cfg = compose_config(local_overrides(folder), tmp_path)
    dm = instantiate(cfg.data, _convert_="all")  # as a run builds its datamodule
    dm.load()
    pre = data_config(vit)
    dm.set_preprocessing(pre["image_size"], pre["mean"], pre["std"])
    dm.setup("fit")
    gray = Image.new("RGB", (40, 40), (51, 51, 51))  # 0.2 in every channel
    for transform in (dm.train_set.transform, dm.test_set.transform):
        out = transform(gray)
        got_per_channel = out.flatten(1).mean(1)
        want = torch.tensor([(0.2 - m) / s for m, s in zip(MEAN, STD, strict=True)])
        torch.testing.assert_close(got_per_channel, want, rtol=1e-5, atol=1e-5)


def test_hub_snapshot_folder_resolves_to_its_main_snapshot(tmp_path):
    folder, saved = timm_folder(tmp_path)
    cache = tmp_path / "models--timm--tiny_siglip"
    snap = cache / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    shutil.copytree(folder, snap)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("abc123\n")
    vit = create_backbone(f"local-dir:{cache}")
    assert data_config(vit)["mean"] == MEAN
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), saved(x), rtol=1e-5, atol=1e-6)


def test_bare_weights_file_with_a_config_beside_it_is_named_in_a_warning(tmp_path, caplog):
    folder, _ = timm_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vpt_dml"):
        vit = create_backbone(ARCH, weights=str(folder / "model.safetensors"), kwargs=TINY)
    assert data_config(vit)["mean"] == (0.5, 0.5, 0.5)  # the architecture's default is used...
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "config.json" in warned and f"local-dir:{folder}" in warned  # ...and named


@pytest.mark.parametrize(
    "setup, match",
    [
        ("missing", "does not exist"),
        ("no_config", "has no config.json"),
        ("no_weights", "no weights"),
    ],
)
def test_a_folder_timm_cannot_read_is_one_line(tmp_path, setup, match):
    folder, _ = timm_folder(tmp_path)
    if setup == "missing":
        folder = tmp_path / "nowhere"
    elif setup == "no_config":
        (folder / "config.json").unlink()
    else:
        (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match=match) as e:
        create_backbone(f"local-dir:{folder}")
    assert "\n" not in str(e.value)
