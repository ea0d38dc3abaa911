"""A generated fine-grained image dataset written in the CUB-200-2011 layout.

Each class is a combination of a few parameters (shape, body hue, stripe hue; the demo
backbone's pretraining classes also vary the stripe period), so classes differ in
details, as in fine-grained benchmarks. Instances vary in rotation, scale, position,
stripe angle, background, clutter and noise. The images are written once to a
cache folder (keyed by the generation parameters) and read back by the real CUB loader,
so the demo and the tests exercise the same code path as a downloaded dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ellipse")
HUE_LEVELS = 24  # neighbouring hues 15 degrees apart: a fine-grained cue
STRIPE_HUE_LEVELS = 6  # colour of the stripes; flip- and crop-invariant like the body hue
NOISE_SIGMA = 20.0
GENERATOR_VERSION = 3  # bump when the drawing code changes, so caches are rebuilt


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], offset: float = 0.0) -> list[tuple[float, float]]:
        pts = []
        for i in range(n):
            a = rot + offset + 2 * math.pi * i / n
            rr = r * radii[i % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts

    if shape == "square":
        return ring(4, [1.0], math.pi / 4)
    if shape == "triangle":
        return ring(3, [1.0], -math.pi / 2)
    if shape == "diamond":
        return ring(4, [1.0, 0.6])
    if shape == "star":
        return ring(10, [1.0, 0.45])
    if shape == "cross":
        return ring(12, [1.0, 1.0, 0.45])
    if shape == "hexagon":
        return ring(6, [1.0])
    if shape == "ellipse":
        return ring(32, [1.0 - 0.45 * abs(math.sin(math.pi * i / 16)) for i in range(32)])
    return ring(32, [1.0])  # circle


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb) * 255


# The dataset's classes form one family (like CUB's birds): two shapes with one stripe
# period, told apart by shape, body hue and stripe hue. Backbone pretraining for the demo draws
# its classes from outside the family, so no dataset class is ever seen in pretraining.
FAMILY_SHAPES = ("star", "hexagon")
FAMILY_PERIOD = 5
PERIODS = (3, 5, 8)
COARSE_HUE_BANDS = 3  # pretraining labels know colour only roughly


def class_parameters(num_classes: int, seed: int, family: bool = True) -> list[dict]:
    """Distinct parameter combinations, one per class, in a seeded order.

    family=True: the fine-grained dataset classes; family=False: pretraining classes.
    """
    rng = np.random.default_rng([seed, int(family)])
    params = []
    seen = set()
    while len(params) < num_classes:
        p = {
            "shape": SHAPES[int(rng.integers(len(SHAPES)))],
            "hue": round(float(rng.integers(HUE_LEVELS)) / HUE_LEVELS, 4),
            "stripe_hue": round(float(rng.integers(STRIPE_HUE_LEVELS)) / STRIPE_HUE_LEVELS, 4),
            "stripe_period": int(rng.choice(PERIODS)),
        }
        if family:
            p["shape"] = FAMILY_SHAPES[int(rng.integers(len(FAMILY_SHAPES)))]
            p["stripe_period"] = FAMILY_PERIOD
        elif p["shape"] in FAMILY_SHAPES and p["stripe_period"] == FAMILY_PERIOD:
            continue
        key = tuple(p.values())
        if key not in seen:
            seen.add(key)
            params.append(p)
    return params


def draw_instance(p: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of a class: the class's striped shape under a random pose and background."""
    bg = rng.uniform(40, 215, size=3) * rng.uniform(0.6, 1.0)
    canvas = np.ones((size, size, 3)) * bg
    # Background clutter: a few faint blobs that carry no class information.
    clutter = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(clutter)
    for _ in range(3):
        x, y, rad = rng.uniform(0, size, 2).tolist() + [rng.uniform(size * 0.05, size * 0.2)]
        d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=int(rng.uniform(40, 120)))
    canvas += (np.asarray(clutter, dtype=np.float64)[..., None] / 255.0) * rng.uniform(-60, 60, 3)

    r = size * rng.uniform(0.25, 0.42)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, 2) * size
    rot = rng.uniform(0, 2 * math.pi)
    mask_img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask_img).polygon(_polygon(p["shape"], cx, cy, r, rot), fill=255)
    mask = np.asarray(mask_img, dtype=np.float64)[..., None] / 255.0

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(0, math.pi)  # a nuisance: a flip would confuse an angle class cue
    period = p["stripe_period"] * size / 64
    stripes = (np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) > 0)[
        ..., None
    ]
    fg = _hsv_to_rgb(p["hue"], rng.uniform(0.65, 0.95), rng.uniform(0.75, 1.0))
    fg2 = _hsv_to_rgb(p["stripe_hue"], 0.9, 0.45)
    shape_px = np.where(stripes, fg, fg2)
    img = canvas * (1 - mask) + shape_px * mask
    img += rng.normal(0, NOISE_SIGMA, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def synthetic_signature(num_classes: int, images_per_class: int, image_size: int, seed: int) -> str:
    spec = dict(v=GENERATOR_VERSION, c=num_classes, n=images_per_class, s=image_size, seed=seed)
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def write_synthetic_cub(
    cache_dir: str | Path,
    num_classes: int = 20,
    images_per_class: int = 20,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Generate (once) and return the folder that holds `CUB_200_2011/`.

    Written to a temporary folder and renamed into place, so concurrent processes (DDP
    ranks, sweep jobs) never see a half-written dataset.
    """
    sig = synthetic_signature(num_classes, images_per_class, image_size, seed)
    root = Path(cache_dir).expanduser() / f"synthetic-{sig}"
    if (root / "CUB_200_2011" / "images.txt").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".synthetic-{sig}-", dir=root.parent))
    base = tmp / "CUB_200_2011"
    image_lines, label_lines, class_lines, split_lines = [], [], [], []
    image_id = 0
    for c, p in enumerate(class_parameters(num_classes, seed), 1):
        folder = f"{c:03d}.{p['shape']}_h{int(p['hue'] * HUE_LEVELS):02d}_s{int(p['stripe_hue'] * STRIPE_HUE_LEVELS)}_p{p['stripe_period']}"
        (base / "images" / folder).mkdir(parents=True)
        class_lines.append(f"{c} {folder}")
        rng = np.random.default_rng([seed, c])
        for j in range(images_per_class):
            image_id += 1
            rel = f"{folder}/{folder.split('.', 1)[1]}_{j:04d}.jpg"
            draw_instance(p, image_size, rng).save(base / "images" / rel, quality=92)
            image_lines.append(f"{image_id} {rel}")
            label_lines.append(f"{image_id} {c}")
            split_lines.append(f"{image_id} {int(j % 2 == 0)}")
    for name, lines in [
        ("images.txt", image_lines),
        ("image_class_labels.txt", label_lines),
        ("classes.txt", class_lines),
        ("train_test_split.txt", split_lines),
    ]:
        (base / name).write_text("\n".join(lines) + "\n")
    try:
        os.replace(tmp, root)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def source_images(
    num_classes: int, images_per_class: int, image_size: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """In-memory images of pretraining classes from outside the dataset's family.

    The labels are coarse (shape x stripe period x one of 3 body-hue bands; the stripe hue
    and the exact body hue ignored), as
    ImageNet's labels are coarse next to CUB's species: the fine cues stay in the
    features but are not emphasised, which is what metric-learning fine-tuning adds.
    Returns uint8 NHWC images and int64 coarse labels.
    """
    params = class_parameters(num_classes, seed, family=False)
    images, labels = [], []
    for c, p in enumerate(params):
        rng = np.random.default_rng([seed, 10_000 + c])
        band = int(p["hue"] * COARSE_HUE_BANDS) % COARSE_HUE_BANDS
        coarse = (
            SHAPES.index(p["shape"]) * len(PERIODS) + PERIODS.index(p["stripe_period"])
        ) * COARSE_HUE_BANDS + band
        for _ in range(images_per_class):
            images.append(np.asarray(draw_instance(p, image_size, rng)))
            labels.append(coarse)
    return np.stack(images), np.asarray(labels, dtype=np.int64)
