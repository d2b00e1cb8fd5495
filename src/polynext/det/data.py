"""COCO instance data: the standard layout, annotation decoding, and the training / evaluation samples.

Layout (as released at cocodataset.org)::

    COCO/
        annotations/instances_train2017.json    118,287 images, 860,001 annotations
        annotations/instances_val2017.json      5,000 images
        train2017/000000000009.jpg ...
        val2017/000000000139.jpg ...

What is read as mmdetection's ``CocoDataset`` (v2) reads it:

* categories in id order become labels 1 … C (0 is torchvision's background); the results JSON
  maps them back to the category ids;
* a box is [x, y, x + w, y + h]; annotations with w < 1, h < 1 or area ≤ 0 are dropped;
* ``iscrowd`` regions are not training targets (mmdetection puts them in ``gt_bboxes_ignore``,
  which its assigner ignores with ``ignore_iof_thr=-1``); the evaluator treats them as COCO does;
* masks: polygons (a list of [x1, y1, x2, y2, ...]), uncompressed RLE (``counts`` a list) and
  compressed RLE (``counts`` a string), decoded with pycocotools;
* training skips images without a usable annotation and images under 32 px (``filter_empty_gt``,
  ``min_size=32``); evaluation keeps every image.

Bad input is one ``DataError`` naming the problem and the fix, raised before anything runs: a
missing folder or annotation file, an annotation of an image id that ``images`` does not list, a
``category_id`` that ``categories`` does not list, no usable annotation at all.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..engine.determinism import sample_seed, seeded_rng
from ..errors import DataError

__all__ = ['CocoSource', 'DetSamples', 'collate', 'decode_segmentation', 'coco_api', 'require_pycocotools',
           'COCO_SPLITS']

COCO_SPLITS = ('train', 'val')


def require_pycocotools():
    """``pycocotools.mask`` / ``pycocotools.coco``, or one message naming the install command."""
    try:
        import pycocotools.coco  # noqa: F401
        import pycocotools.mask
        return pycocotools
    except ImportError:
        raise DataError("detection needs pycocotools (COCO's official API and evaluator): "
                        "pip install 'polynext[det]' (or pip install pycocotools)") from None


def coco_api(dataset: Dict[str, Any]):
    """A ``pycocotools.coco.COCO`` over an already loaded annotation dict (its index messages hidden)."""
    require_pycocotools()
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def decode_segmentation(segm: Any, h: int, w: int) -> np.ndarray:
    """One annotation's mask (H×W uint8) from polygons, uncompressed RLE or compressed RLE."""
    mask_utils = require_pycocotools().mask
    if isinstance(segm, list):                       # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm.get('counts'), list):       # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, h, w)
    else:                                            # compressed RLE
        rle = segm
    return mask_utils.decode(rle)


class CocoSource:
    """One split of a COCO-layout folder: ``read(i) -> (image CxHxW uint8, target)``.

    ``target``: ``boxes`` (N×4 float, xyxy), ``labels`` (N int64, 1 … C), ``masks`` (N×H×W uint8),
    ``image_id``, ``size`` (H, W). ``train=True`` keeps only images with a usable annotation."""

    def __init__(self, root: Union[str, Path], split: str = 'val', train: bool = False,
                 ann_file: Optional[Union[str, Path]] = None, image_dir: Optional[Union[str, Path]] = None):
        if split not in COCO_SPLITS:
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        root = Path(root)
        if not root.is_dir():
            raise DataError(f'COCO folder not found: {root}; pass --data DIR with annotations/, train2017/ and val2017/')
        self.ann_file = Path(ann_file) if ann_file else root / 'annotations' / f'instances_{split}2017.json'
        self.image_dir = Path(image_dir) if image_dir else root / f'{split}2017'
        if not self.ann_file.is_file():
            raise DataError(f'missing annotation file {self.ann_file}; a COCO folder holds '
                            f'annotations/instances_{{train,val}}2017.json (unzip annotations_trainval2017.zip into it)')
        if not self.image_dir.is_dir():
            raise DataError(f'missing image folder {self.image_dir}; unzip {split}2017.zip into {root}')
        try:
            data = json.loads(self.ann_file.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f'cannot read {self.ann_file} as JSON ({str(e).splitlines()[0]}); re-download it') from None
        for key in ('images', 'annotations', 'categories'):
            if key not in data:
                raise DataError(f"{self.ann_file} has no '{key}' list; it is not a COCO instances file")
        self.dataset = data
        self.split, self.train, self.root = split, train, root
        cats = sorted(data['categories'], key=lambda c: c['id'])
        self.cat_ids = [int(c['id']) for c in cats]
        self.classes = tuple(str(c['name']) for c in cats)
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.images = {int(im['id']): im for im in data['images']}
        self.anns: Dict[int, List[Dict[str, Any]]] = {i: [] for i in self.images}
        for ann in data['annotations']:
            iid, cid = int(ann['image_id']), int(ann['category_id'])
            if iid not in self.images:
                raise DataError(f"{self.ann_file}: annotation {ann.get('id')} refers to image id {iid}, which 'images' "
                                f'does not list; fix the file (every annotation needs a listed image)')
            if cid not in self.label_of:
                raise DataError(f"{self.ann_file}: annotation {ann.get('id')} has category_id {cid}, which "
                                f"'categories' does not list ({len(self.cat_ids)} categories, ids "
                                f'{self.cat_ids[0]}-{self.cat_ids[-1]}); fix the category ids')
            self.anns[iid].append(ann)
        ids = sorted(self.images)
        if train:
            ids = [i for i in ids if self._usable(self.anns[i]) and
                   min(int(self.images[i]['width']), int(self.images[i]['height'])) >= 32]
            if not ids:
                raise DataError(f'{self.ann_file}: no image has a usable (non-crowd, non-empty) annotation, so there is '
                                f'nothing to train on; check that the annotations belong to these images')
        self.ids = ids
        self.skipped = len(self.images) - len(ids)
        self.description = f'COCO {split}2017 ({len(ids)} images{", " + str(self.skipped) + " without annotations skipped" if self.skipped else ""}, {len(self.classes)} classes)'

    @staticmethod
    def _box(ann: Dict[str, Any]) -> Optional[List[float]]:
        x, y, w, h = (float(v) for v in ann['bbox'])
        if w < 1 or h < 1 or float(ann.get('area', w * h)) <= 0:
            return None
        return [x, y, x + w, y + h]

    def _usable(self, anns: Sequence[Dict[str, Any]]) -> bool:
        return any(not a.get('iscrowd', 0) and self._box(a) is not None for a in anns)

    def __len__(self) -> int:
        return len(self.ids)

    def name_of(self, index: int) -> str:
        return str(self.image_dir / self.images[self.ids[index]]['file_name'])

    def image_id(self, index: int) -> int:
        return self.ids[index]

    def read(self, index: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
        from torchvision.io import ImageReadMode, decode_image, read_file
        iid = self.ids[index]
        info = self.images[iid]
        img = decode_image(read_file(str(self.image_dir / info['file_name'])), mode=ImageReadMode.RGB)
        h, w = int(img.shape[1]), int(img.shape[2])
        if (h, w) != (int(info['height']), int(info['width'])):
            raise DataError(f"{self.name_of(index)} is {w}x{h} but {self.ann_file.name} says "
                            f"{info['width']}x{info['height']}; the image and the annotations do not belong together")
        boxes, labels, masks = [], [], []
        for ann in self.anns[iid]:
            box = self._box(ann)
            if ann.get('iscrowd', 0) or box is None:
                continue
            boxes.append(box)
            labels.append(self.label_of[int(ann['category_id'])])
            masks.append(decode_segmentation(ann['segmentation'], h, w))
        target = dict(boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      labels=torch.tensor(labels, dtype=torch.int64),
                      masks=torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.uint8),
                      image_id=iid, size=(h, w))
        return img, target


class DetSamples(Dataset):
    """Samples of a source (``CocoSource`` or ``ShapesInstances``) through a transform.

    Training (``train=True``): key ``(index, epoch)`` → ``(image uint8, target, bad)``, the
    augmentation seeded by (seed, epoch, index). Evaluation: key ``index`` → ``(image uint8 resized,
    target at the original size, meta, bad)``. ``bad`` is the index of an image that could not be
    read (then a blank image without targets stands in), else −1."""

    def __init__(self, source: Any, transform: Callable, train: bool, seed: int = 0,
                 fallback_size: Tuple[int, int] = (64, 64)):
        self.source, self.transform, self.train, self.seed = source, transform, train, seed
        self.fallback_size = fallback_size

    def __len__(self) -> int:
        return len(self.source)

    def _read(self, index: int):
        try:
            img, target = self.source.read(index)
            return img, target, -1
        except DataError:
            raise
        except Exception:  # noqa: BLE001 - any decoding failure: unreadable file
            h, w = self.fallback_size
            target = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                          masks=torch.zeros(0, h, w, dtype=torch.uint8), image_id=self.source.image_id(index),
                          size=(h, w))
            return torch.zeros(3, h, w, dtype=torch.uint8), target, index

    def __getitem__(self, key):
        if self.train:
            index, epoch = key if isinstance(key, tuple) else (key, 0)
            img, target, bad = self._read(index)
            with seeded_rng(sample_seed(self.seed, epoch, index)):
                img, target = self.transform(img, target)
            return img, target, bad
        img, target, bad = self._read(key)
        resized, meta = self.transform(img)
        meta.update(image_id=target['image_id'], index=key)
        return resized, target, meta, bad


def collate(batch):
    """Lists (images differ in size; the model pads them)."""
    return tuple(list(x) for x in zip(*batch))
