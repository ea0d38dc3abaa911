"""Train/test image transforms derived from the backbone's own pretrained config.

Two implementations of the same preprocessing (METHOD.md §4):

- `build_transforms(..., fast=False)`: torchvision's PIL pipeline, the reference.
- `build_transforms(..., fast=True)` (the default): takes the *undecoded* PIL image, picks the
  crop first (same torch RNG calls as torchvision, so the same crop and flip under the same
  seed), then asks the JPEG decoder for a DCT-downscaled image (`Image.draft`) whenever the
  crop still has at least the output resolution at that scale, and resizes with torch's
  uint8 antialiased bilinear kernel. Output matches the reference up to resampling noise.

Both paths see the image as displayed (data/images.py: EXIF orientation, 16-bit and float
scaling, transparency onto white): crops are drawn in the displayed frame.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from vpt_dml.data.images import displayed_size, size_is_stored, to_rgb

# the uint8 view of PIL's buffer is only read (every step below allocates a new tensor)
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def eval_resize(image_size: int) -> int:
    """Short side before the center crop: 256 for 224 (the usual 0.875 crop ratio)."""
    return int(round(image_size * 256 / 224))


def build_transforms(
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    train: bool,
    fast: bool = True,
):
    """Train: RandomResizedCrop + flip. Test: Resize(size*256/224) + CenterCrop(size).

    The returned callable takes a PIL image (opened lazily is best for `fast`) and returns
    a normalised float tensor (3, size, size).
    """
    if fast:
        cls = FastTrainTransform if train else FastEvalTransform
        return cls(image_size, mean, std)
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    if train:
        crop = T.RandomResizedCrop(image_size, scale=RRC_SCALE, ratio=RRC_RATIO)
        return T.Compose([to_rgb, crop, T.RandomHorizontalFlip(), *normalize])
    return T.Compose(
        [to_rgb, T.Resize(eval_resize(image_size)), T.CenterCrop(image_size), *normalize]
    )


class _FastTransform:
    def __init__(self, image_size: int, mean, std) -> None:
        self.size = int(image_size)
        # x_norm = (x/255 - mean) / std, folded into one multiply-add on uint8 input
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t

    @staticmethod
    def decode(
        image: Image.Image, need_w: float, need_h: float
    ) -> tuple[torch.Tensor, float, float]:
        """Decode at the smallest JPEG scale that keeps >= need_w x need_h pixels of the full
        displayed frame; returns a (1, 3, H, W) uint8 view (displayed orientation) and the
        scale factors actually used."""
        full_w, full_h = displayed_size(image)
        # the decoder works in the stored frame: a rotating orientation swaps the request
        stored = (need_h, need_w) if size_is_stored(image) else (need_w, need_h)
        # a no-op for non-JPEG files and for images already decoded
        image.draft("RGB", (math.ceil(stored[0]), math.ceil(stored[1])))
        image = to_rgb(image)
        array = np.asarray(image)
        # HWC memory seen as NCHW channels-last: torch's fast uint8 resize path, no copy
        tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
        return tensor, image.size[0] / full_w, image.size[1] / full_h

    def resize(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if x.shape[-2:] == (h, w):
            return x
        return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x[0].float().mul_(self.scale).add_(self.shift).contiguous()


class FastTrainTransform(_FastTransform):
    def __call__(self, image: Image.Image) -> torch.Tensor:
        full_w, full_h = displayed_size(image)
        # torchvision's own sampler: identical crop for identical torch RNG state; it reads
        # only the size, given here as a zero-stride tensor of the displayed frame
        frame = torch.empty(1, 1, 1, dtype=torch.uint8).expand(1, full_h, full_w)
        top, left, h, w = T.RandomResizedCrop.get_params(frame, RRC_SCALE, RRC_RATIO)
        flip = torch.rand(1).item() < 0.5
        # the decoded crop must still cover size x size pixels
        shrink = min(w / self.size, h / self.size)
        x, sx, sy = self.decode(image, full_w / max(shrink, 1.0), full_h / max(shrink, 1.0))
        t0, l0 = int(round(top * sy)), int(round(left * sx))
        t1 = max(min(int(round((top + h) * sy)), x.shape[-2]), t0 + 1)
        l1 = max(min(int(round((left + w) * sx)), x.shape[-1]), l0 + 1)
        out = self.resize(x[..., t0:t1, l0:l1], self.size, self.size)
        if flip:
            out = out.flip(-1)
        return self.normalize(out)


class FastEvalTransform(_FastTransform):
    def __call__(self, image: Image.Image) -> torch.Tensor:
        full_w, full_h = displayed_size(image)
        short = eval_resize(self.size)
        # torchvision Resize(int): the short side becomes `short`, the long side is truncated
        if full_w <= full_h:
            new_w, new_h = short, int(short * full_h / full_w)
        else:
            new_w, new_h = int(short * full_w / full_h), short
        x, _, _ = self.decode(image, new_w, new_h)
        x = self.resize(x, new_h, new_w)
        top = int(round((new_h - self.size) / 2.0))
        left = int(round((new_w - self.size) / 2.0))
        return self.normalize(x[..., top : top + self.size, left : left + self.size])
