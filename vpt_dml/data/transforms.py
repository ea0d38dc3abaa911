"""Train/test image transforms derived from the backbone's own pretrained config."""

from __future__ import annotations

from torchvision import transforms as T


def build_transforms(image_size: int, mean: tuple[float, ...], std: tuple[float, ...], train: bool):
    """Train: RandomResizedCrop + flip. Test: Resize(size*256/224) + CenterCrop(size)."""
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    if train:
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *normalize])
    resize = int(round(image_size * 256 / 224))
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), *normalize])
