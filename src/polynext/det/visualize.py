"""Predictions beside the ground truth, as a PNG: each row = ground truth | prediction, boxes and masks
drawn with torchvision's ``draw_segmentation_masks`` / ``draw_bounding_boxes``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, Union

import torch
import torch.nn as nn

__all__ = ['draw_instances', 'save_predictions', 'CLASS_COLOURS']

CLASS_COLOURS = ('#ffe119', '#f032e6', '#46f0f0', '#e6194b', '#3cb44b', '#4363d8', '#f58231', '#911eb4', '#bcf60c',
                 '#fabebe', '#008080', '#e6beff', '#9a6324')


def draw_instances(image: torch.Tensor, boxes: torch.Tensor, labels: Sequence[int], masks: torch.Tensor,
                   names: Sequence[str], scores: Sequence[float] = ()) -> torch.Tensor:
    """``image`` (3×H×W uint8) with the masks (N×H×W bool) filled and the boxes outlined and named."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
    colours = [CLASS_COLOURS[(int(lab) - 1) % len(CLASS_COLOURS)] for lab in labels]
    out = image
    if len(labels):
        out = draw_segmentation_masks(out, masks.bool(), alpha=0.45, colors=colours)
        text = [names[int(lab) - 1] + (f' {s:.2f}' if len(scores) else '') for lab, s in
                zip(labels, list(scores) or [0.0] * len(labels))]
        out = draw_bounding_boxes(out, boxes, labels=text if image.shape[-1] >= 128 else None, colors=colours,
                                  width=1)
    return out


@torch.no_grad()
def save_predictions(model: nn.Module, source: Any, path: Union[str, Path], eval_transform: Any,
                     device: torch.device, num_images: int = 4, score_threshold: float = 0.5,
                     upscale: int = 3) -> Path:
    """Run ``model`` on the first ``num_images`` of ``source`` and write a grid (ground truth | prediction,
    detections scoring ≥ ``score_threshold``), small images enlarged ``upscale`` times."""
    from PIL import Image
    from ..checkpoint import atomic_write
    from .evaluate import postprocess
    was_training = model.training
    model.eval()
    rows = []
    for i in range(min(num_images, len(source))):
        img, target = source.read(i)
        x, meta = eval_transform(img)
        out = postprocess(model([x.to(device).float().div_(255)])[0], meta)
        keep = out['scores'] >= score_threshold
        names = list(source.classes)
        truth = draw_instances(img, target['boxes'], target['labels'].tolist(), target['masks'], names)
        pred = draw_instances(img, out['boxes'][keep], out['labels'][keep].tolist(), out['masks'][keep], names,
                              out['scores'][keep].tolist())
        gap = torch.full((3, img.shape[1], 4), 255, dtype=torch.uint8)
        rows.append(torch.cat([truth, gap, pred], dim=2))
    model.train(was_training)
    width = max(r.shape[2] for r in rows)
    rows = [torch.nn.functional.pad(r, (0, width - r.shape[2], 0, 4), value=255) for r in rows]
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    picture = Image.fromarray(grid)
    if grid.shape[1] < 600:
        picture = picture.resize((grid.shape[1] * upscale, grid.shape[0] * upscale), Image.NEAREST)
    path = Path(path)
    atomic_write(path, lambda tmp: picture.save(tmp, format='PNG'))
    return path
