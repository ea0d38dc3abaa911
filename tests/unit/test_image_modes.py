"""Issue 19 finding 3: every image reaches the model as the pixels a viewer shows, on both
decode paths (data.fast_decode true / false), and `verify --decode` counts the conversions."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fake_layouts import fake_sop
from tests.unit.test_data_transforms import photo_like
from vpt_dml.data.images import conversion
from vpt_dml.data.transforms import build_transforms
from vpt_dml.data.verify import main as verify_main

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# one step of 8-bit, in the normalised units the model sees
ONE_LEVEL = 1 / 255 / min(STD) + 1e-5


def model_input(image, fast: bool, train: bool = False, seed: int = 0, size: int = 32):
    torch.manual_seed(seed)
    return build_transforms(size, MEAN, STD, train=train, fast=fast)(image)


def reopened(image: Image.Image, fmt: str, **kw) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    buf.seek(0)
    return Image.open(buf)


def gradient(h: int = 40, w: int = 56) -> np.ndarray:
    """Values 0..1, different along both axes (a flip or rotation shows)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return (0.7 * xx / (w - 1) + 0.3 * (yy / (h - 1)) ** 2).astype(np.float64)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("train", [False, True])
def test_16bit_png_reaches_the_model_as_its_8bit_version(fast, train):
    g = gradient()
    png16 = reopened(Image.fromarray(np.rint(g * 65535).astype(np.uint16)), "PNG")
    assert png16.mode.startswith("I")  # a 16-bit PNG, as PIL opens it
    png8 = reopened(Image.fromarray(np.rint(g * 255).astype(np.uint8)), "PNG")
    a = model_input(png16, fast, train)
    b = model_input(png8, fast, train)
    # today's code clips to 255: a white image, ~4 normalised units away
    assert (a - b).abs().max() <= ONE_LEVEL


def _rgb(h: int = 40, w: int = 56) -> np.ndarray:
    g = gradient(h, w)
    return np.rint(np.stack([g, 1 - g, (g * 3) % 1], -1) * 255).astype(np.uint8)


def displayed_and_encoded(mode: str) -> tuple[np.ndarray, Image.Image]:
    """(what a viewer shows, an image of `mode` that shows it); transparent areas are
    black underneath, so dropping the alpha (or a black background) gives another answer."""
    rgb = _rgb()
    h, w, _ = rgb.shape
    gray = rgb[..., 0]
    opaque = np.zeros((h, w), bool)
    opaque[:, : w // 2] = True
    white = np.full_like(rgb, 255)
    if mode == "I;16":
        return np.repeat(gray[..., None], 3, -1), Image.fromarray(gray.astype(np.uint16) * 257)
    if mode == "I":
        return np.repeat(gray[..., None], 3, -1), Image.fromarray(gray.astype(np.int32) * 257)
    if mode == "F":
        return np.repeat(gray[..., None], 3, -1), Image.fromarray(gray.astype(np.float32) / 255)
    if mode == "RGBA":
        alpha = np.where(opaque, 255, 0).astype(np.uint8)
        under = np.where(opaque[..., None], rgb, 0).astype(np.uint8)
        shown = np.where(opaque[..., None], rgb, white)
        return shown, Image.fromarray(np.dstack([under, alpha]), "RGBA")
    if mode == "LA":
        alpha = np.where(opaque, 255, 0).astype(np.uint8)
        under = np.where(opaque, gray, 0).astype(np.uint8)
        shown = np.repeat(np.where(opaque, gray, 255)[..., None], 3, -1)
        return shown, Image.fromarray(np.dstack([under, alpha]), "LA")
    if mode == "P":  # palette: index 0 (black) is the transparent colour
        index = np.where(opaque, (gray // 64) + 1, 0).astype(np.uint8)
        palette = [0, 0, 0] + [c for i in range(1, 5) for c in (60 * i, 255 - 50 * i, 30 * i)]
        im = Image.fromarray(index, "P")
        im.putpalette(palette + [0] * (768 - len(palette)))
        im.info["transparency"] = 0
        table = np.array(palette, np.uint8).reshape(-1, 3)
        shown = np.where(opaque[..., None], table[index], white)
        return shown, reopened(im, "PNG", transparency=0)
    if mode == "CMYK":
        cmyk = np.dstack([255 - rgb, np.zeros((h, w), np.uint8)])
        return rgb, Image.fromarray(cmyk, "CMYK")
    if mode == "L":
        return np.repeat(gray[..., None], 3, -1), Image.fromarray(gray, "L")
    raise AssertionError(mode)


MODES = ["I;16", "I", "F", "RGBA", "LA", "P", "CMYK", "L"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_reaches_the_model_as_displayed_on_both_paths(mode):
    shown, encoded = displayed_and_encoded(mode)
    assert encoded.mode == mode
    reference = Image.fromarray(shown, "RGB")
    for train in (False, True):
        outputs = {}
        for fast in (True, False):
            got = model_input(encoded.copy(), fast, train, seed=3)
            want = model_input(reference.copy(), fast, train, seed=3)
            assert (got - want).abs().max() <= ONE_LEVEL, (mode, fast, train)
            outputs[fast] = got
        # the two paths: same crop, resampling noise only
        assert (outputs[True] - outputs[False]).abs().mean() < 0.02


def exif_jpeg(stored: np.ndarray, orientation: int | None) -> Image.Image:
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    return reopened(Image.fromarray(stored), "JPEG", quality=95, **kw)


@pytest.mark.parametrize(
    "orientation, turn",
    [
        (6, Image.Transpose.ROTATE_270),
        (3, Image.Transpose.ROTATE_180),
        (8, Image.Transpose.ROTATE_90),
    ],
)
def test_exif_rotated_jpeg_equals_the_rotated_pixels(orientation, turn):
    stored = _rgb(48, 64)
    # the same JPEG data without the tag, decoded and turned as a viewer turns it
    shown = exif_jpeg(stored, None).convert("RGB").transpose(turn)
    for train in (False, True):
        for fast in (False, True):
            got = model_input(exif_jpeg(stored, orientation), fast, train, seed=5)
            want = model_input(shown.copy(), fast, train, seed=5)
            unturned = model_input(exif_jpeg(stored, None), fast, train, seed=5)
            assert (got - want).abs().max() <= ONE_LEVEL, (fast, train)
            assert (got - unturned).abs().mean() > 0.1  # the check can fail


def test_verify_decode_counts_converted_modes(tmp_path, capsys):
    root = fake_sop(tmp_path, train_classes=2, test_classes=2, per_class=2)
    files = sorted((root / "Stanford_Online_Products" / "bicycle_final").iterdir())
    for path, mode in zip(files, ["I;16", "I;16", "RGBA"]):
        _, im = displayed_and_encoded(mode)
        im.save(path, "PNG")
    exif_jpeg(_rgb(), 6).save(files[3], "JPEG", exif=exif_jpeg(_rgb(), 6).getexif().tobytes())
    verify_main(["sop", str(root), "--decode"])
    out = capsys.readouterr().out
    assert (
        "converted to displayed RGB: 4 image(s) (EXIF-rotated 1, I;16 2, RGBA+transparency 1)"
        in out
    )


@pytest.mark.parametrize("train", [False, True])
def test_exif_rotated_large_jpeg_fast_path_with_draft_matches_torchvision(train):
    stored = np.asarray(Image.open(photo_like(1200, 900)))
    for seed in range(3):
        image = exif_jpeg(stored, 6)
        fast = model_input(image, True, train, seed=seed, size=64)
        assert image.size[0] < 1200  # decoded at a reduced JPEG scale
        plain = model_input(exif_jpeg(stored, 6), False, train, seed=seed, size=64)
        assert (fast - plain).abs().mean() < 0.05, seed


def test_exif_rotated_jpeg_is_drafted_in_its_stored_frame():
    # displayed 400 x 1600: the eval resize needs 73 x 292, i.e. 292 x 73 stored: a quarter
    # scale (400 x 100) covers it; asked in the displayed frame, only the full size would
    image = exif_jpeg(np.asarray(Image.open(photo_like(1600, 400))), 6)
    model_input(image, True, size=64)
    assert image.size == (400, 100)


# orientation tag -> what a viewer does to the stored pixels (the EXIF / TIFF definitions)
TURNS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def save_oriented(stored: np.ndarray, path, fmt: str, orientation: int | None) -> None:
    im = Image.fromarray(stored)
    if fmt == "TIFF":  # the TIFF's own Orientation tag (274), not an EXIF block
        im.save(path, "TIFF", tiffinfo={274: orientation} if orientation else {})
        return
    kw = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}, "PNG": {}}[fmt]
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    im.save(path, fmt, **kw)


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG", "PNG", "WEBP"])
def test_every_orientation_reaches_the_model_as_displayed_through_the_loader(tmp_path, fmt):
    """Issue 28 item 7: Pillow reports a TIFF with a width/height-swapping orientation (5-8)
    in the displayed frame already; the fast path swapped its size a second time."""
    from vpt_dml.data.dataset import ImageDataset
    from vpt_dml.data.records import ImageRecords

    stored = _rgb(40, 64)  # not square: a swapped size distorts
    paths = []
    for o in range(1, 9):
        paths.append(tmp_path / f"o{o}.{fmt.lower()}")
        save_oriented(stored, paths[-1], fmt, o)
    plain = tmp_path / f"plain.{fmt.lower()}"
    save_oriented(stored, plain, fmt, None)
    records = ImageRecords([str(p) for p in paths], np.zeros(8), ["c"])
    with Image.open(plain) as im:  # the same file data without the tag, turned as a viewer does
        decoded = im.convert("RGB")
    for train in (False, True):
        outputs = {}
        for fast in (True, False):
            transform = build_transforms(32, MEAN, STD, train=train, fast=fast)
            loader = ImageDataset(records, transform)
            for i, o in enumerate(range(1, 9)):
                torch.manual_seed(11)
                got = loader[i][0]
                shown = decoded.transpose(TURNS[o]) if TURNS[o] is not None else decoded
                want = model_input(shown.copy(), fast, train, seed=11)
                err = (got - want).abs()
                assert err.max() <= ONE_LEVEL, (fmt, o, fast, train, float(err.mean()))
                outputs[fast, o] = got
        for o in range(1, 9):  # the two paths: same crop, resampling noise only
            assert (outputs[True, o] - outputs[False, o]).abs().mean() < 0.02, (fmt, o, train)


def trns_png(mode: str) -> tuple[np.ndarray, Image.Image]:
    """(what a viewer shows, a PNG whose tRNS chunk names a transparent colour): the right
    half holds that colour, shown as the white page under it."""
    rgb = _rgb()
    h, w, _ = rgb.shape
    opaque = np.zeros((h, w), bool)
    opaque[:, : w // 2] = True
    white = np.full_like(rgb, 255)
    if mode == "RGB":  # 8-bit RGB, transparent colour black (no opaque pixel is black)
        under = np.where(opaque[..., None], rgb, 0).astype(np.uint8)
        shown = np.where(opaque[..., None], rgb, white)
        return shown, reopened(Image.fromarray(under, "RGB"), "PNG", transparency=(0, 0, 0))
    if mode == "I;16":  # 16-bit grey, transparent value 1234 (a near-black no pixel has)
        gray = rgb[..., 0]
        under = np.where(opaque, gray.astype(np.uint16) * 257, 1234).astype(np.uint16)
        shown = np.repeat(np.where(opaque, gray, 255)[..., None], 3, -1)
        return shown, reopened(Image.fromarray(under), "PNG", transparency=1234)
    if mode == "L":  # 8-bit grey, transparent value 3 (already right: kept right)
        gray = np.maximum(rgb[..., 0], 4)
        under = np.where(opaque, gray, 3).astype(np.uint8)
        shown = np.repeat(np.where(opaque, gray, 255)[..., None], 3, -1)
        return shown, reopened(Image.fromarray(under, "L"), "PNG", transparency=3)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["RGB", "I;16", "L"])
def test_png_transparent_colour_is_composited_on_white_on_both_paths(mode):
    """Issue 28 item 9: an RGB PNG's tRNS colour was ignored (the RGB shortcut) and a 16-bit
    grey PNG's tRNS pixels stayed (near) black."""
    shown, encoded = trns_png(mode)
    assert encoded.mode == mode and "transparency" in encoded.info
    reference = Image.fromarray(shown, "RGB")
    for train in (False, True):
        for fast in (True, False):
            got = model_input(encoded.copy(), fast, train, seed=4)
            want = model_input(reference.copy(), fast, train, seed=4)
            assert (got - want).abs().max() <= ONE_LEVEL, (mode, fast, train)
    assert conversion(encoded) == f"{mode}+transparency"  # what verify --decode counts
