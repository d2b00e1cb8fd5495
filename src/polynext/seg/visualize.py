"""Predictions beside the ground truth, as a PNG (one row per image: image | truth | prediction)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn

__all__ = ['palette', 'colourise', 'save_predictions']

#: the generated shapes' colours (background, circle, rectangle, triangle)
SHAPES_PALETTE = np.array([[40, 40, 40], [230, 25, 75], [60, 180, 75], [0, 130, 200]], np.uint8)


def palette(num_classes: int) -> np.ndarray:
    """(256, 3) uint8 colours: fixed random colours per class, black for the ignore index 255."""
    pal = np.random.default_rng(3).integers(30, 256, size=(256, 3)).astype(np.uint8)
    if num_classes <= len(SHAPES_PALETTE):
        pal[:num_classes] = SHAPES_PALETTE[:num_classes]
    pal[255] = 0
    return pal


def colourise(label: np.ndarray, pal: np.ndarray) -> np.ndarray:
    return pal[label.astype(np.int64).clip(0, 255)]


@torch.no_grad()
def save_predictions(model: nn.Module, source: Any, path: Union[str, Path], cfg: Any, device: torch.device,
                     num_images: int = 6, scale: Optional[int] = None) -> Path:
    """Run ``model`` (``cfg``'s evaluation protocol) on the first ``num_images`` of ``source`` and
    write a grid: each row = image | ground truth | prediction (ignored pixels black)."""
    from PIL import Image, ImageDraw
    from torchvision import tv_tensors
    from ..checkpoint import atomic_write
    from .inference import predict_logits
    from .transforms import build_eval_transform
    was_training = model.training
    model.eval()
    tf = build_eval_transform(cfg.eval_scale, cfg.mean, cfg.std)
    pal = palette(model.num_classes)
    rows = []
    try:
        for i in range(min(num_images, len(source))):
            img, label = source.read(i)
            x = tf(tv_tensors.Image(img)).as_subclass(torch.Tensor).unsqueeze(0).to(device)
            logits = predict_logits(model, x, cfg.eval_mode, model.num_classes, label.shape[-2:], cfg.eval_crop,
                                    cfg.eval_stride, window_batch=cfg.eval_window_batch)
            pred = logits.argmax(1)[0].cpu().numpy()
            rows.append(np.concatenate([img.permute(1, 2, 0).numpy(), colourise(label.numpy(), pal),
                                        colourise(pred, pal)], axis=1))
    finally:
        model.train(was_training)
    if not rows:
        raise ValueError('no images to show')
    per_row = 2 if len(rows) >= 4 else 1           # two (image, truth, prediction) triplets side by side
    h = max(r.shape[0] for r in rows)
    w = max(r.shape[1] for r in rows)
    tiles = [np.pad(r, ((0, h - r.shape[0] + 4), (0, w - r.shape[1] + (8 if per_row > 1 else 0)), (0, 0)),
                    constant_values=255) for r in rows]
    tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % per_row)
    grid = np.concatenate([np.concatenate(tiles[i:i + per_row], axis=1) for i in range(0, len(tiles), per_row)],
                          axis=0)
    if scale is None:
        scale = max(1, 192 // h)
    im = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    header = Image.new('RGB', (im.width, 16), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    tile_w = im.width // per_row
    col = (w * scale) // 3
    for t in range(per_row):
        for k, text in enumerate(('image', 'ground truth', 'prediction')):
            draw.text((t * tile_w + k * col + 4, 2), text, fill=(0, 0, 0))
    out = Image.new('RGB', (im.width, im.height + 16), (255, 255, 255))
    out.paste(header, (0, 0))
    out.paste(im, (0, 16))
    path = Path(path)
    atomic_write(path, lambda tmp: out.save(tmp, format='PNG'))
    return path
