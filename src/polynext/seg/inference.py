"""Whole-image and sliding-window inference (MMSegmentation ``whole_inference`` /
``slide_inference``) and the evaluation loop.

Sliding window: windows of ``crop`` × ``crop`` every ``stride`` pixels; the grid has
``max(H − crop + stride − 1, 0) // stride + 1`` rows (columns alike) and the last window is
moved back to end at the border, so every pixel is covered. Each window's logits (resized to
the window) are added into a full-size map and divided by the number of windows covering each
pixel, i.e. logits are averaged over overlaps. An image smaller than the window is decoded
whole without padding. Windows are run ``window_batch`` at a time (one forward per group):
the model is in eval mode, so batching does not change the result.

The logits are resized (bilinear) to the label's original size before the argmax.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import ConfusionMatrix

__all__ = ['whole_inference', 'slide_inference', 'window_boxes', 'predict_logits', 'evaluate']


def _encode_decode(model: nn.Module, x: torch.Tensor, align_corners: bool) -> torch.Tensor:
    logits = model(x)['out']
    return F.interpolate(logits.float(), size=x.shape[2:], mode='bilinear', align_corners=align_corners)


def whole_inference(model: nn.Module, img: torch.Tensor, out_size: Optional[Sequence[int]] = None,
                    align_corners: bool = False) -> torch.Tensor:
    """Logits of the whole image (N, K, H, W), resized to ``out_size`` when given."""
    logits = _encode_decode(model, img, align_corners)
    if out_size is not None and tuple(out_size) != tuple(logits.shape[2:]):
        logits = F.interpolate(logits, size=tuple(out_size), mode='bilinear', align_corners=align_corners)
    return logits


def window_boxes(height: int, width: int, crop: int, stride: int) -> List[Tuple[int, int, int, int]]:
    """mmseg's sliding-window boxes ``(y1, y2, x1, x2)``."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y1, x1 = r * stride, c * stride
            y2, x2 = min(y1 + crop, height), min(x1 + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


def slide_inference(model: nn.Module, img: torch.Tensor, num_classes: int, crop: int = 512, stride: int = 341,
                    out_size: Optional[Sequence[int]] = None, align_corners: bool = False,
                    window_batch: int = 4) -> torch.Tensor:
    """Logits averaged over ``crop`` windows every ``stride`` pixels (N, K, H, W)."""
    n, _, h, w = img.shape
    boxes = window_boxes(h, w, crop, stride)
    preds = img.new_zeros((n, num_classes, h, w), dtype=torch.float32)
    count = img.new_zeros((1, 1, h, w), dtype=torch.float32)
    for start in range(0, len(boxes), max(1, window_batch)):
        group = boxes[start:start + window_batch]
        shapes = {(y2 - y1, x2 - x1) for y1, y2, x1, x2 in group}
        if len(shapes) == 1:   # same-size windows (always, unless the image is smaller than a window)
            crops = torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in group])
            outs = _encode_decode(model, crops, align_corners).split(n)
        else:
            outs = [_encode_decode(model, img[:, :, y1:y2, x1:x2], align_corners) for y1, y2, x1, x2 in group]
        for (y1, y2, x1, x2), out in zip(group, outs):
            preds[:, :, y1:y2, x1:x2] += out
            count[:, :, y1:y2, x1:x2] += 1
    preds = preds / count
    if out_size is not None and tuple(out_size) != (h, w):
        preds = F.interpolate(preds, size=tuple(out_size), mode='bilinear', align_corners=align_corners)
    return preds


def predict_logits(model: nn.Module, img: torch.Tensor, mode: str, num_classes: int, out_size=None,
                   crop: int = 512, stride: int = 341, align_corners: bool = False,
                   window_batch: int = 4) -> torch.Tensor:
    if mode == 'slide':
        return slide_inference(model, img, num_classes, crop, stride, out_size, align_corners, window_batch)
    if mode == 'whole':
        return whole_inference(model, img, out_size, align_corners)
    raise ValueError(f"inference mode must be 'slide' or 'whole', got {mode!r}")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, num_classes: int, device: torch.device, mode: str = 'slide',
             crop: int = 512, stride: int = 341, ignore_index: int = 255, align_corners: bool = False,
             amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False, window_batch: int = 4,
             show_progress: bool = False, desc: str = 'eval', total: Optional[int] = None):
    """The local confusion matrix over ``loader`` (``(image 1xCxHxW, label HxW, index, bad)``)
    and the list of unreadable indices. Reduce the matrix across ranks afterwards."""
    from ..engine.run import progress
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device=device)
    bad: List[int] = []
    amp = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext())
    try:
        for img, label, index, skipped in progress(loader, total=total, desc=desc, enabled=show_progress):
            if skipped >= 0:
                bad.append(int(skipped))
                continue
            img = img.to(device, non_blocking=True)
            if channels_last:
                img = img.contiguous(memory_format=torch.channels_last)
            with amp:
                logits = predict_logits(model, img, mode, num_classes, label.shape[-2:], crop, stride, align_corners,
                                        window_batch)
            cm.update(logits.argmax(dim=1)[0], label.to(device))
    finally:
        model.train(was_training)
    return cm, bad
