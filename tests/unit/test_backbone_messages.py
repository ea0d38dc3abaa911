"""Backbone messages and records that were wrong or unhelpful (issue 28, 16).

- model.backbone.weights=DIR says it is a folder and which file to give;
- with model.backbone.pretrained=true already set, a hub failure does not advise setting
  it: it says what stood in the way (HF_HUB_OFFLINE, the network);
- weight files (*.safetensors, ...) are git-ignored.
Real timm, no network: HF_HUB_OFFLINE=1 (tests/conftest.py).
"""

from __future__ import annotations

import subprocess

import pytest
import timm
from conftest import REPO

from vpt_dml.errors import WeightsError
from vpt_dml.models.backbone import create_backbone

NAME = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def test_weights_folder_is_named_a_folder_with_the_file_to_give(tmp_path):
    folder = tmp_path / "vit_tiny"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError) as err:
        create_backbone(NAME, weights=str(folder), kwargs=TINY)
    msg = str(err.value)
    assert "does not exist" not in msg and "\n" not in msg
    assert "is a folder (it holds model.safetensors)" in msg
    assert f"model.backbone.weights={folder / 'model.safetensors'}" in msg


def test_empty_weights_folder_says_it_holds_no_checkpoint(tmp_path):
    with pytest.raises(WeightsError, match=r"is a folder \(it holds no such file\)"):
        create_backbone(NAME, weights=str(tmp_path), kwargs=TINY)


def test_hub_failure_with_pretrained_set_names_the_offline_switch(monkeypatch):
    """Real timm with HF_HUB_OFFLINE=1: pretrained=true is set, so not advised again."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as err:
        create_backbone(NAME, pretrained=True, kwargs=TINY)
    msg = str(err.value)
    assert "model.backbone.pretrained=true" not in msg
    assert "HF_HUB_OFFLINE is set in the environment: unset it" in msg
    assert "model.backbone.weights=/path/to/model.safetensors" in msg and "\n" not in msg


def test_hub_unreachable_with_pretrained_set_names_the_network(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):  # no network in tests: the hub's own error
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", unreachable)
    with pytest.raises(WeightsError) as err:
        create_backbone(NAME, pretrained=True, kwargs=TINY)
    msg = str(err.value)
    assert "model.backbone.pretrained=true" not in msg
    assert "could not fetch it from the Hugging Face hub: check the network" in msg
    assert "We couldn't connect" in msg


@pytest.mark.parametrize(
    "name", ["w.safetensors", "sub/model.safetensors", "vit.onnx", "vit.pth", "vit.npz"]
)
def test_weight_files_are_git_ignored(name):
    res = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", "-q", "--no-index", name],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, f"{name} is not git-ignored"
