"""A generated instance-segmentation set for a first run with no download ("shapes").

Each image shows 1-5 filled shapes (circles, rectangles, triangles: the three categories) of
random size and position on the textured backgrounds of ``polynext.seg.synthetic``, each in its
category's hue band. Shapes drawn later cover earlier ones; an instance's mask is what stays
visible, its box the tight box of that mask, and instances with fewer than ``MIN_AREA`` visible
pixels are dropped. Every image is a pure function of (seed, split, index): nothing is stored, the
set is the same on every machine, and training and validation images never coincide.

``write_coco_folder`` writes the same images in the COCO layout (PNG files, COCO instances JSON
with category ids 1, 3, 7 to exercise the id mapping; unoccluded rectangles as polygons, other
masks as compressed RLE, and optional crowd regions as uncompressed RLE, as COCO stores them),
for tests and for trying ``--data`` without COCO.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np
import torch

from ..seg.synthetic import CLASS_HUES, SPLIT_CODES, _background, _hsv, _triangle_mask

__all__ = ['SHAPE_CATEGORIES', 'make_instances_sample', 'ShapesInstances', 'write_coco_folder', 'MIN_AREA',
           'FOLDER_CATEGORY_IDS']

SHAPE_CATEGORIES = ('circle', 'rectangle', 'triangle')
FOLDER_CATEGORY_IDS = (1, 3, 7)
MIN_AREA = 12


def make_instances_sample(seed: int, split: str, index: int, size: int = 64):
    """(image HxWx3 uint8, masks N×H×W bool, labels N in 1..3, unoccluded N bool) for one key."""
    rng = np.random.default_rng([int(seed), SPLIT_CODES[split] + 10, int(index)])
    img = _background(rng, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    shapes: List[Tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(1, 6))):
        cls = int(rng.integers(1, 4))
        r = rng.uniform(0.08, 0.2) * size
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
        shapes.append((cls, mask))
    masks, labels, whole = [], [], []
    covered = np.zeros((size, size), bool)
    for cls, mask in reversed(shapes):           # the last drawn is on top
        visible = mask & ~covered
        covered |= mask
        if visible.sum() >= MIN_AREA:
            masks.append(visible)
            labels.append(cls)
            whole.append(bool((visible == mask).all()))
    masks, labels, whole = masks[::-1], labels[::-1], whole[::-1]
    m = np.stack(masks) if masks else np.zeros((0, size, size), bool)
    return np.clip(img, 0, 255).astype(np.uint8), m, np.array(labels, np.int64), np.array(whole, bool)


def _boxes(masks: np.ndarray) -> np.ndarray:
    out = np.zeros((masks.shape[0], 4), np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        out[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return out


class ShapesInstances:
    """``len`` / ``read(i) -> (image CxHxW uint8, target)`` / ``coco_dataset()`` of one generated split."""

    def __init__(self, split: str, num_images: int, size: int = 64, seed: int = 0):
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split, self.num_images, self.size, self.seed = split, num_images, size, seed
        self.classes = SHAPE_CATEGORIES
        self.cat_ids = [1, 2, 3]
        self.label_of = {1: 1, 2: 2, 3: 3}
        self.skipped = 0
        self.description = f'generated shapes ({split}: {num_images} images of {size}x{size}, seed {seed})'

    def __len__(self) -> int:
        return self.num_images

    def name_of(self, index: int) -> str:
        return f'shapes/{self.split}/{index}'

    def image_id(self, index: int) -> int:
        return index + 1

    def read(self, index: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
        img, masks, labels, _ = make_instances_sample(self.seed, self.split, index, self.size)
        target = dict(boxes=torch.from_numpy(_boxes(masks)), labels=torch.from_numpy(labels),
                      masks=torch.from_numpy(masks.astype(np.uint8)), image_id=index + 1, size=(self.size, self.size))
        return torch.from_numpy(img).permute(2, 0, 1).contiguous(), target

    def coco_dataset(self) -> Dict[str, Any]:
        """The split as a COCO instances dict (compressed-RLE masks), for the evaluator."""
        return _coco_dict(self.seed, self.split, self.num_images, self.size, self.cat_ids, polygons=False, crowd=False)


def _rle(mask: np.ndarray) -> Dict[str, Any]:
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(size=[int(v) for v in rle['size']], counts=rle['counts'].decode('ascii'))


def _uncompressed_rle(mask: np.ndarray) -> Dict[str, Any]:
    flat = mask.astype(np.uint8).flatten(order='F')
    counts, last, run = [], 0, 0
    for v in flat:
        if v != last:
            counts.append(run)
            last, run = v, 0
        run += 1
    counts.append(run)
    return dict(size=list(mask.shape), counts=[int(c) for c in counts])


def _coco_dict(seed: int, split: str, n: int, size: int, cat_ids, polygons: bool, crowd: bool,
               file_ext: str = '.png') -> Dict[str, Any]:
    from pycocotools import mask as mask_utils
    images, anns = [], []
    for i in range(n):
        _, masks, labels, whole = make_instances_sample(seed, split, i, size)
        iid = i + 1
        images.append(dict(id=iid, file_name=f'{iid:012d}{file_ext}', width=size, height=size))
        for m, lab, w in zip(masks, labels, whole):
            x0, y0, x1, y1 = (float(v) for v in _boxes(m[None])[0])
            if polygons and w and lab == 2:       # an unoccluded rectangle: its outline as a polygon
                segm: Any = [[x0, y0, x1, y0, x1, y1, x0, y1]]
                area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(segm, size, size))))
            else:
                segm = _rle(m)
                area = float(m.sum())
            anns.append(dict(id=len(anns) + 1, image_id=iid, category_id=int(cat_ids[lab - 1]), iscrowd=0,
                             bbox=[x0, y0, x1 - x0, y1 - y0], area=area, segmentation=segm))
        if crowd and i % 4 == 3:                  # a crowd region in a corner (ignored in training)
            m = np.zeros((size, size), bool)
            m[: size // 6, : size // 6] = True
            anns.append(dict(id=len(anns) + 1, image_id=iid, category_id=int(cat_ids[0]), iscrowd=1,
                             bbox=[0.0, 0.0, float(size // 6), float(size // 6)], area=float(m.sum()),
                             segmentation=_uncompressed_rle(m)))
    cats = [dict(id=int(c), name=name, supercategory='shape') for c, name in zip(cat_ids, SHAPE_CATEGORIES)]
    return dict(info=dict(description=f'polynext generated shapes ({split}, seed {seed})'), licenses=[],
                images=images, annotations=anns, categories=cats)


def write_coco_folder(root: Union[str, Path], num_train: int = 8, num_val: int = 4, size: int = 64, seed: int = 0,
                      cat_ids=FOLDER_CATEGORY_IDS, crowd: bool = True) -> Path:
    """Write generated images in the COCO layout (``annotations/instances_{train,val}2017.json``,
    ``train2017/``, ``val2017/``); returns ``root``."""
    from PIL import Image
    root = Path(root)
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    for split, n in (('train', num_train), ('val', num_val)):
        folder = root / f'{split}2017'
        folder.mkdir(parents=True, exist_ok=True)
        data = _coco_dict(seed, split, n, size, cat_ids, polygons=True, crowd=crowd)
        for i, info in enumerate(data['images']):
            img = make_instances_sample(seed, split, i, size)[0]
            Image.fromarray(img).save(folder / info['file_name'])
        (root / 'annotations' / f'instances_{split}2017.json').write_text(json.dumps(data))
    return root
