"""The fast decode path keeps torchvision's crop semantics (draft-mode decoding included)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fake_layouts import fake_sop
from vpt_dml.data.datamodule import RetrievalDataModule
from vpt_dml.data.transforms import build_transforms
from vpt_dml.errors import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo_like(w: int, h: int) -> Image.Image:
    """A smooth gradient with structure at several scales, saved and reopened as JPEG."""
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    rgb = np.stack([np.sin(6 * xx) + yy, np.cos(9 * yy * xx), np.sin(3 * (xx + yy)) ** 2], -1)
    rgb = (rgb - rgb.min()) / (rgb.max() - rgb.min()) * 255
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, "JPEG", quality=95)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("size", [(500, 375), (1200, 900), (300, 700)])
def test_fast_eval_matches_plain(size):
    fast = build_transforms(64, MEAN, STD, train=False, fast=True)
    plain = build_transforms(64, MEAN, STD, train=False, fast=False)
    data = photo_like(*size)
    a = fast(Image.open(data))
    data.seek(0)
    b = plain(Image.open(data))
    assert a.shape == b.shape == (3, 64, 64)
    # in units of the normalised image (about 4 per full 0..255 range)
    assert (a - b).abs().mean() < 0.02
    assert (a - b).abs().max() < 0.25


def test_fast_eval_really_uses_draft_on_large_jpeg():
    data = photo_like(1200, 900)
    image = Image.open(data)
    build_transforms(64, MEAN, STD, train=False, fast=True)(image)
    assert image.size[0] < 1200  # decoded at a reduced JPEG scale


@pytest.mark.parametrize("size", [(500, 375), (1600, 1200)])
def test_fast_train_same_crop_and_flip_under_same_seed(size):
    fast = build_transforms(48, MEAN, STD, train=True, fast=True)
    plain = build_transforms(48, MEAN, STD, train=True, fast=False)
    data = photo_like(*size)
    diffs = []
    for seed in range(6):
        torch.manual_seed(seed)
        data.seek(0)
        a = fast(Image.open(data))
        torch.manual_seed(seed)
        data.seek(0)
        b = plain(Image.open(data))
        diffs.append((a - b).abs().mean().item())
        # a different crop is far off: the check can fail
        torch.manual_seed(seed + 100)
        data.seek(0)
        other = plain(Image.open(data))
        assert (a - other).abs().mean() > (a - b).abs().mean()
    assert max(diffs) < 0.05


def test_fast_handles_grayscale_and_png():
    for mode, fmt in (("L", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG")):
        buf = io.BytesIO()
        # opaque: transparency is composited onto white (tests/unit/test_image_modes.py)
        color = 128 if mode == "L" else (128, 128, 128, 255)[: len(mode)]
        Image.new(mode, (90, 70), color).save(buf, fmt)
        buf.seek(0)
        out = build_transforms(32, (0.5,) * 3, (0.5,) * 3, train=True)(Image.open(buf))
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert out.abs().max() < 0.02  # 128/255 normalised by 0.5/0.5 is ~0


def test_set_preprocessing_reaches_every_split(tmp_path):
    root = fake_sop(tmp_path, train_classes=2, test_classes=2, per_class=2)
    dm = RetrievalDataModule(name="sop", root=str(root), strict_counts=False, num_workers=0)
    dm.set_preprocessing(16, (0.5,) * 3, (0.25,) * 3)
    dm.setup("fit")
    image = dm.train_set[0][0]
    assert image.shape == (3, 16, 16) and dm.test_set[0][0].shape == (3, 16, 16)
    # std 0.25 around 0.5: pixel values in [0, 1] map to [-2, 2]
    assert image.min() >= -2.0 and image.max() <= 2.0 and image.abs().max() > 1.0
    dm.set_preprocessing(24, MEAN, STD)  # after setup: the next setup rebuilds the datasets
    dm.setup("test")
    assert dm.test_set[0][0].shape == (3, 24, 24)
    with pytest.raises(UserError, match="not a valid image size"):
        dm.set_preprocessing(0, MEAN, STD)
    with pytest.raises(UserError, match="one mean and std per channel"):
        dm.set_preprocessing(16, MEAN, STD[:2])
