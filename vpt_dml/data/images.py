"""Any decoded image as the 8-bit RGB pixels an image viewer shows.

Both decode paths (data/transforms.py: the fast path and the torchvision one) and
`python -m vpt_dml.data.verify --decode` go through `to_rgb`, so every image reaches the
model the same way whichever path decoded it.

Choices (what a viewer shows, where PIL's plain `convert("RGB")` does not):

- EXIF orientation is applied (the pixels as displayed, not as stored).
- 16-bit integer modes (I;16, I;16B, ...) are scaled by 255/65535 and rounded: PIL's own
  conversion clips them, turning most 16-bit images white.
- Mode "I" (32-bit integer): 0..65535 data (what 16-bit PNG/TIFF decode to) is scaled as
  16-bit; any other range is stretched from its minimum to its maximum.
- Mode "F" (float): 0..1 data is scaled by 255; any other range is stretched min..max.
- Transparency (RGBA, LA, PA, palette, RGB or 8/16-bit grayscale with a transparent
  colour: PNG's tRNS, matched at the stored depth) is composited onto WHITE, as browsers and most viewers show it on a page (and as product
  photos of SOP / In-Shop are shot): a black background would turn dark-on-transparent
  drawings into black squares.
- CMYK, YCbCr, palette without transparency, 1-bit and L: PIL's conversion (Adobe's
  inverted CMYK JPEGs are already un-inverted by PIL's decoder).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)
EXIF_ORIENTATION = 0x0112
# orientations that swap width and height (transpose, 90 and 270 degree rotations)
SWAPPING = {5, 6, 7, 8}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa"}
_16_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8; 1 when absent or invalid), read without decoding."""
    try:
        value = int(image.getexif().get(EXIF_ORIENTATION, 1))
    except (TypeError, ValueError, OSError, SyntaxError):
        return 1
    return value if 1 <= value <= 8 else 1


def size_is_stored(image: Image.Image) -> bool:
    """Whether `image.size` is the stored frame of a width/height-swapping orientation.

    Pillow reports a TIFF's size in the displayed frame already (its loader rotates the
    pixels itself); a JPEG's, PNG's or WebP's in the stored frame. Read from the file's
    own width/height tags, not from Pillow's version.
    """
    if orientation(image) not in SWAPPING:
        return False
    tags = getattr(image, "tag_v2", None)  # TIFF: ImageWidth 256, ImageLength 257
    if tags is not None and 256 in tags and 257 in tags:
        return tuple(image.size) == (tags[256], tags[257])
    return True


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed: the stored size swapped for a rotating orientation."""
    w, h = image.size
    return (h, w) if size_is_stored(image) else (w, h)


def conversion(image: Image.Image) -> str | None:
    """What `to_rgb` does to this image, as a short name (None: nothing, it is plain RGB)."""
    parts = []
    transparent = image.mode in _ALPHA_MODES or "transparency" in image.info
    if image.mode != "RGB" or transparent:
        parts.append(f"{image.mode}+transparency" if transparent else image.mode)
    if orientation(image) != 1:
        parts.append("EXIF-rotated")
    return ", ".join(parts) or None


def _transparent_value_mask(image: Image.Image) -> np.ndarray | None:
    """For an integer grey image with a transparent colour (PNG tRNS): its alpha, 0 where a
    pixel equals that colour (compared at the stored depth, before any scaling)."""
    value = image.info.get("transparency")
    if image.mode == "F" or not isinstance(value, int):
        return None
    return np.where(np.asarray(image) == value, 0, 255).astype(np.uint8)


def _scaled_to_8bit(image: Image.Image) -> Image.Image:
    a = np.asarray(image)
    if image.mode in _16_BIT:
        out = np.rint(a.astype(np.float32) * (255.0 / 65535.0))
    else:
        a = a.astype(np.float64)
        finite = np.isfinite(a)
        low, high = (a[finite].min(), a[finite].max()) if finite.any() else (0.0, 0.0)
        if image.mode == "I" and low >= 0 and high <= 65535:
            out = np.rint(a * (255.0 / 65535.0))
        elif image.mode == "F" and low >= 0 and high <= 1:
            out = np.rint(a * 255.0)
        else:
            span = high - low
            out = np.rint((a - low) * (255.0 / span)) if span > 0 else np.zeros_like(a)
        out = np.where(finite, out, 0)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "L")


def _onto_background(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as displayed (module docstring). Decodes the image: call `draft` first."""
    if orientation(image) != 1:
        image = ImageOps.exif_transpose(image)  # any mode; keeps palette and transparency
    mode = image.mode
    if mode in _16_BIT or mode in ("I", "F"):
        grey = _scaled_to_8bit(image)
        alpha = _transparent_value_mask(image)  # a 16-bit grey PNG's tRNS colour
        if alpha is None:
            return grey.convert("RGB")
        return _onto_background(Image.merge("LA", (grey, Image.fromarray(alpha, "L"))))
    # before the plain-RGB shortcut: an RGB PNG's tRNS colour is transparency too
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _onto_background(image)
    if mode == "RGB":
        return image
    return image.convert("RGB")
