"""Detection transforms of the Swin / ConvNeXt 3x configs (mmdetection v2), on torchvision v2 functionals.

Training (``TrainTransform``)::

    RandomFlip(0.5)
    AutoAugment, one policy drawn uniformly:
      [Resize(shorter side one of 480, 512, …, 800; longer ≤ 1333)]
      [Resize(shorter one of 400, 500, 600) → RandomCrop(absolute_range 384-600, negative crops allowed)
       → Resize(shorter one of 480 … 800)]

Evaluation (``EvalTransform``): resize to shorter 800 / longer ≤ 1333, keeping the ratio.
Normalisation and padding to a multiple of 32 happen in the model (``DetTransform``).

mmcv's keep-ratio rule (``rescale_size``): scale = min(long / max(h, w), short / min(h, w)), new
size = round(h · scale), round(w · scale); boxes are multiplied by the per-axis ratios new / old
and clipped to the image, masks resized with nearest neighbour. Images are resized bilinearly
without anti-aliasing (OpenCV's ``INTER_LINEAR``, mmcv's default). Crops drop boxes left with
zero width or height, and their masks.

Written with torchvision's ``transforms.v2.functional`` (resize, crop, flip of images, boxes and
masks); the size rule and the crop-size draw are mmdetection's and have no v2 equivalent.
"""
from __future__ import annotations

import random
from typing import Any, Dict, Sequence, Tuple

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = ['rescale_size', 'resize', 'crop', 'hflip', 'TrainTransform', 'EvalTransform', 'MS_SCALES']

#: the multi-scale training sizes of the 3x configs (shorter side)
MS_SCALES = tuple(range(480, 801, 32))
CROP_PRE_SCALES = (400, 500, 600)


def rescale_size(h: int, w: int, short: int, long: int) -> Tuple[int, int]:
    """mmcv ``rescale_size`` for keep-ratio scale (long, short): the new (h, w)."""
    scale = min(long / max(h, w), short / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize(img: torch.Tensor, target: Dict[str, Any], size: Tuple[int, int]) -> Tuple[torch.Tensor, Dict[str, Any]]:
    h, w = img.shape[-2:]
    nh, nw = size
    img = TF.resize(img, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=False)
    t = dict(target)
    if 'boxes' in t:
        boxes = t['boxes'] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, nw)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, nh)
        t['boxes'] = boxes
    if 'masks' in t:
        m = t['masks']
        t['masks'] = (TF.resize(m, [nh, nw], interpolation=InterpolationMode.NEAREST) if m.shape[0]
                      else m.new_zeros((0, nh, nw)))
    return img, t


def crop(img: torch.Tensor, target: Dict[str, Any], top: int, left: int, height: int,
         width: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
    img = TF.crop(img, top, left, height, width)
    t = dict(target)
    boxes = t['boxes'] - torch.tensor([left, top, left, top], dtype=t['boxes'].dtype)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    t['boxes'], t['labels'] = boxes[keep], t['labels'][keep]
    t['masks'] = t['masks'][keep][:, top:top + height, left:left + width]
    return img, t


def hflip(img: torch.Tensor, target: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, Any]]:
    w = img.shape[-1]
    t = dict(target)
    b = t['boxes'].clone()
    b[:, 0], b[:, 2] = w - target['boxes'][:, 2], w - target['boxes'][:, 0]
    t['boxes'] = b
    t['masks'] = target['masks'].flip(-1)
    return img.flip(-1), t


class TrainTransform:
    """The 3x configs' training augmentation; draws from Python's ``random`` (seeded per sample)."""

    def __init__(self, scales: Sequence[int] = MS_SCALES, max_size: int = 1333, flip: float = 0.5,
                 crop_pre_scales: Sequence[int] = CROP_PRE_SCALES, crop_range: Tuple[int, int] = (384, 600),
                 crop_policy: bool = True):
        self.scales, self.max_size, self.flip = tuple(scales), max_size, flip
        self.crop_pre_scales, self.crop_range, self.crop_policy = tuple(crop_pre_scales), tuple(crop_range), crop_policy

    def _resize(self, img, target, scales):
        short = random.choice(scales)
        return resize(img, target, rescale_size(img.shape[-2], img.shape[-1], short, self.max_size))

    def __call__(self, img: torch.Tensor, target: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        if random.random() < self.flip:
            img, target = hflip(img, target)
        if not self.crop_policy or random.randrange(2) == 0:
            return self._resize(img, target, self.scales)
        img, target = self._resize(img, target, self.crop_pre_scales)
        h, w = img.shape[-2:]
        lo, hi = self.crop_range
        ch = random.randint(min(h, lo), min(h, hi))
        cw = random.randint(min(w, lo), min(w, hi))
        top = random.randint(0, max(h - ch, 0))
        left = random.randint(0, max(w - cw, 0))
        img, target = crop(img, target, top, left, ch, cw)
        return self._resize(img, target, self.scales)


class EvalTransform:
    """Keep-ratio resize to (short, long); returns the image and its meta (original size, scales)."""

    def __init__(self, short: int = 800, max_size: int = 1333):
        self.short, self.max_size = short, max_size

    def __call__(self, img: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        h, w = img.shape[-2:]
        nh, nw = rescale_size(h, w, self.short, self.max_size)
        out = TF.resize(img, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=False)
        return out, dict(orig_size=(int(h), int(w)), scale=(nw / w, nh / h))
