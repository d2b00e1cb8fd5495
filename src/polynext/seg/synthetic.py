"""A generated segmentation set for a first run with no download ("shapes").

Each image shows 1-4 filled shapes (circles, rectangles, triangles) of random size and
position on a textured background (a colour gradient, stripes of random frequency and
direction, and pixel noise). Classes: 0 background, 1 circle, 2 rectangle, 3 triangle; shapes
drawn later cover earlier ones. Each shape class has its own hue band (red, green, blue, ±25°,
random saturation and brightness), and backgrounds are weakly saturated: colour tells the
classes apart first and the outline refines the masks, which lets a small network reach a good
mIoU within minutes on a CPU.

Every image is a pure function of (seed, split, index): nothing is stored, the set is the
same on every machine, and the training and validation images never coincide.
``write_ade20k_folder`` writes the same images in the ``ADEChallengeData2016`` layout (JPEG
images, PNG annotations with 0 = "other", class c stored as c + 1), for tests and for trying
``--data`` without ADE20K.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple, Union

import numpy as np
import torch

__all__ = ['SHAPE_CLASSES', 'make_shapes_sample', 'ShapesSource', 'write_ade20k_folder', 'SPLIT_CODES']

SHAPE_CLASSES = ('background', 'circle', 'rectangle', 'triangle')
SPLIT_CODES = {'train': 0, 'val': 1}
#: hue (degrees) of each shape class: red circles, green rectangles, blue triangles
CLASS_HUES = {1: 0.0, 2: 120.0, 3: 240.0}


def _hsv(h: float, sat: float, val: float) -> np.ndarray:
    """One RGB colour (0-255) from hue (degrees), saturation and value in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + h / 60.0) % 6.0
    return 255.0 * (val - val * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0 = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.3), rng.uniform(0.3, 0.9))
    c1 = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.3), rng.uniform(0.3, 0.9))
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    img = c0 * (1 - t) + c1 * t
    freq, phase, theta = rng.uniform(2, 9), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
    stripes = np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)[..., None]
    img = img + rng.uniform(10, 40) * stripes
    img = img + rng.normal(0, rng.uniform(4, 14), img.shape)
    return img


def _triangle_mask(rng: np.random.Generator, size: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    start = rng.uniform(0, 2 * np.pi)
    angles = start + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.35, 0.35, 3)
    py, px = cy + r * np.sin(angles), cx + r * np.cos(angles)
    inside = np.ones((size, size), bool)
    for i in range(3):
        j = (i + 1) % 3
        cross = (px[j] - px[i]) * (yy - py[i]) - (py[j] - py[i]) * (xx - px[i])
        s = np.sign((px[j] - px[i]) * (cy - py[i]) - (py[j] - py[i]) * (cx - px[i]))
        inside &= cross * s >= 0
    return inside


def make_shapes_sample(seed: int, split: str, index: int, size: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """(image HxWx3 uint8, label HxW uint8 in 0..3) for one (seed, split, index)."""
    rng = np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])
    img = _background(rng, size)
    label = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(SHAPE_CLASSES)))
        r = rng.uniform(0.08, 0.22) * size
        cy, cx = rng.uniform(r * 0.6, size - r * 0.6, 2)
        if cls == 1:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif cls == 2:
            hh, hw = r * rng.uniform(0.6, 1.0), r * rng.uniform(0.6, 1.0)
            mask = (np.abs(yy - cy) <= hh) & (np.abs(xx - cx) <= hw)
        else:
            mask = _triangle_mask(rng, size, cy, cx, r * 1.25)
        colour = _hsv(CLASS_HUES[cls] + rng.uniform(-25, 25), rng.uniform(0.55, 1.0), rng.uniform(0.5, 1.0))
        img[mask] = colour + rng.normal(0, 6, (int(mask.sum()), 3))
        label[mask] = cls
    return np.clip(img, 0, 255).astype(np.uint8), label


class ShapesSource:
    """``len`` and ``read(i) -> (image CxHxW uint8 tensor, label HxW uint8 tensor)`` of one split."""

    def __init__(self, split: str, num_images: int, size: int = 64, seed: int = 0):
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split, self.num_images, self.size, self.seed = split, num_images, size, seed
        self.classes = SHAPE_CLASSES
        self.description = f'generated shapes ({split}: {num_images} images of {size}x{size}, seed {seed})'

    def __len__(self) -> int:
        return self.num_images

    def name_of(self, index: int) -> str:
        return f'shapes/{self.split}/{index}'

    def read(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        img, label = make_shapes_sample(self.seed, self.split, index, self.size)
        return torch.from_numpy(img).permute(2, 0, 1).contiguous(), torch.from_numpy(label)


def write_ade20k_folder(root: Union[str, Path], num_train: int = 8, num_val: int = 4, size: int = 64,
                        seed: int = 0, border: int = 2) -> Path:
    """Write shapes images in the ``ADEChallengeData2016`` layout; returns ``root``.

    Annotations store class c as c + 1 and a ``border``-pixel frame of 0 ("other"), which
    ``reduce_zero_label`` turns into the ignore index."""
    from PIL import Image
    root = Path(root)
    for split, folder, n in (('train', 'training', num_train), ('val', 'validation', num_val)):
        (root / 'images' / folder).mkdir(parents=True, exist_ok=True)
        (root / 'annotations' / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, label = make_shapes_sample(seed, split, i, size)
            ann = label + 1
            if border:
                ann[:border], ann[-border:], ann[:, :border], ann[:, -border:] = 0, 0, 0, 0
            stem = f'ADE_{folder[:5]}_{i:08d}'
            Image.fromarray(img).save(root / 'images' / folder / f'{stem}.jpg', quality=95)
            Image.fromarray(ann.astype(np.uint8)).save(root / 'annotations' / folder / f'{stem}.png')
    return root
