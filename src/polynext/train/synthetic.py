"""A generated classification set for short ablation runs: cluttered digits.

scikit-learn's bundled 8x8 handwritten digits (1797 images, no download) are drawn into a larger
canvas the way a detector would meet them:

* the digit is upsampled to 50-70 % of the canvas, rotated by up to ±15°, sheared by up to ±0.2,
  and put at a random position (the whole digit stays inside);
* its contrast is random (0.7-1.0 above a background of 0-0.15);
* 1-3 fragments of other digits (a random 4x4 window of the 8x8 image, upsampled to 20-30 % of
  the canvas and rotated freely) are drawn first at 30-60 % of the digit's contrast, so strokes
  of other classes sit next to the right one;
* Gaussian pixel noise with a standard deviation of 0.02-0.08 is added.

The class cannot be read from a fixed set of pixels: position, size, angle, shear and clutter
all vary, so the model has to build position-invariant features of stroke configurations (which
strokes meet which), the kind of interaction that products of feature maps provide.

Train and val images come from disjoint digit images: the stratified 80/20 split with seed 0 of
the digits demo (1437 / 360 source images). Every image is a pure function of
(seed, split, index), as in ``polynext.seg.synthetic``: nothing is stored, the set is the same
on every machine, and the label of image ``index`` is ``index % 10`` (balanced splits).
"""
from __future__ import annotations

import functools
import math
from typing import Dict, List, Tuple

import numpy as np

__all__ = ['CLASSES', 'SPLIT_CODES', 'make_cluttered_digit', 'cluttered_digits_arrays']

CLASSES: Tuple[str, ...] = tuple(str(c) for c in range(10))
SPLIT_CODES = {'train': 0, 'val': 1}


@functools.lru_cache(maxsize=1)
def _digits() -> Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray]]:
    """(images N x 8 x 8 in [0, 1], targets, {split: source indices}) with the demo's split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    idx = np.arange(len(d.target))
    tr, va = train_test_split(idx, test_size=0.2, stratify=d.target, random_state=0)
    return d.images / 16.0, d.target, dict(train=np.sort(tr), val=np.sort(va))


def _render(patch: np.ndarray, size: int, angle: float, shear: float) -> np.ndarray:
    """``patch`` (values in [0, 1]) upsampled to ``size`` pixels, sheared and rotated (canvas grows to fit)."""
    from PIL import Image
    img = Image.fromarray(np.round(patch * 255).astype(np.uint8), 'L').resize((size, size), Image.BILINEAR)
    if shear:
        w = size + int(math.ceil(abs(shear) * size))
        # x_in = x_out + shear * (y_out - size / 2) - offset: a horizontal shear about the centre row
        off = (w - size) / 2
        img = img.transform((w, size), Image.AFFINE, (1, shear, -shear * size / 2 - off, 0, 1, 0), Image.BILINEAR)
    img = img.rotate(angle, resample=Image.BILINEAR, expand=True)
    return np.asarray(img, np.float32) / 255.0


def _paste(canvas: np.ndarray, alpha: np.ndarray, level: float, rng: np.random.Generator) -> None:
    """Blend ``level`` into ``canvas`` through ``alpha`` at a random position where it fits."""
    size = canvas.shape[0]
    h, w = min(alpha.shape[0], size), min(alpha.shape[1], size)
    alpha = alpha[:h, :w]
    y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    region = canvas[y:y + h, x:x + w]
    region += (level - region) * alpha


def make_cluttered_digit(seed: int, split: str, index: int, size: int = 64) -> Tuple[np.ndarray, int]:
    """(image H x W x 3 uint8, class index) of one (seed, split, index)."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    images, targets, splits = _digits()
    rng = np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])
    label = int(index) % len(CLASSES)
    sources = splits[split]
    digit = images[int(rng.choice(sources[targets[sources] == label]))]

    background = rng.uniform(0.0, 0.15)
    contrast = rng.uniform(0.7, 1.0)
    canvas = np.full((size, size), background, np.float32)
    for _ in range(int(rng.integers(1, 4))):
        other = images[int(rng.choice(sources))]
        y0, x0 = rng.integers(0, 5, 2)
        frag = _render(other[y0:y0 + 4, x0:x0 + 4], max(2, int(rng.uniform(0.2, 0.3) * size)), rng.uniform(0, 360), 0.0)
        _paste(canvas, frag, background + contrast * rng.uniform(0.3, 0.6), rng)
    alpha = _render(digit, int(rng.uniform(0.5, 0.7) * size), rng.uniform(-15, 15), rng.uniform(-0.2, 0.2))
    _paste(canvas, alpha, background + contrast, rng)
    canvas += rng.normal(0.0, rng.uniform(0.02, 0.08), canvas.shape).astype(np.float32)
    grey = np.clip(np.round(canvas * 255), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), label


def cluttered_digits_arrays(split: str, num_images: int, size: int = 64, seed: int = 0) -> Tuple[np.ndarray, List[int]]:
    """All images of a split as one (N, H, W, 3) uint8 array, and their labels."""
    out = np.empty((num_images, size, size, 3), np.uint8)
    labels = []
    for i in range(num_images):
        out[i], y = make_cluttered_digit(seed, split, i, size)
        labels.append(y)
    return out, labels
