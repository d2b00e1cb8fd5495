"""Segmentation datasets: ADE20K (the ``ADEChallengeData2016`` folder) and the generated shapes.

ADE20K layout (as released at http://data.csail.mit.edu/places/ADEchallenge/)::

    ADEChallengeData2016/
        images/training/ADE_train_00000001.jpg ...        20,210 images
        images/validation/ADE_val_00000001.jpg ...        2,000 images
        annotations/training/ADE_train_00000001.png ...   one 8-bit PNG per image, same stem
        annotations/validation/ADE_val_00000001.png ...

Annotation values: 0 = "other" (not one of the 150 classes), 1..150 = the classes. With
``reduce_zero_label`` (the ADE20K protocol) 0 becomes the ignore index 255 and class k
becomes k − 1.

``SegSamples`` turns a source into training or evaluation samples. A training sample is
keyed by ``(index, epoch)`` (``ResumableDistributedSampler``) and its augmentation runs under
generators seeded by ``(seed, epoch, index)``, so it does not depend on the number of loader
workers, the rank or where a run was resumed. An image or annotation that cannot be read gives
an all-ignored sample and its index (``bad``), which the trainer names, counts and, past
``max_corrupt``, stops on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ..engine.determinism import sample_seed, seeded_rng
from ..errors import DataError
from .transforms import reduce_zero_label

__all__ = ['ADE20K_CLASSES', 'ADE20KSource', 'SegSamples', 'collate_train', 'collate_eval', 'ADE_SPLITS',
           'IMAGE_SUFFIXES']

ADE_SPLITS = {'train': 'training', 'val': 'validation'}
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')

#: the 150 ADE20K (SceneParsing) classes, in label order 0..149 after reduce_zero_label
ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk',
    'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand',
    'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove',
    'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle',
    'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
    'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven',
    'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher',
    'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan',
    'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag')


def _layout_help(root: Path) -> str:
    return (f'expected the ADEChallengeData2016 layout: {root}/images/{{training,validation}}/*.jpg and '
            f'{root}/annotations/{{training,validation}}/*.png (one PNG per image, same file stem)')


class ADE20KSource:
    """The (image, annotation) file pairs of one ADE20K split, checked on construction."""

    def __init__(self, root: Union[str, Path], split: str = 'train', reduce_zero_label: bool = True):
        if split not in ADE_SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f'dataset folder not found: {root}; {_layout_help(root)}')
        nested = root / 'ADEChallengeData2016'
        if not (root / 'images').is_dir() and (nested / 'images').is_dir():
            root = nested                                   # the parent of the extracted zip is fine too
        folder = ADE_SPLITS[split]
        img_dir, ann_dir = root / 'images' / folder, root / 'annotations' / folder
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise DataError(f'{d} is missing; {_layout_help(root)}')
        images = {p.stem: p for p in sorted(img_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        anns = {p.stem: p for p in sorted(ann_dir.iterdir()) if p.suffix.lower() == '.png'}
        if not images:
            raise DataError(f'no images (*.jpg) in {img_dir}; {_layout_help(root)}')
        no_ann = [s for s in images if s not in anns]
        no_img = [s for s in anns if s not in images]
        if no_ann or no_img:
            parts = []
            if no_ann:
                parts.append(f'{len(no_ann)} image(s) without an annotation (e.g. {images[no_ann[0]].name}: no '
                             f'{ann_dir / (no_ann[0] + ".png")})')
            if no_img:
                parts.append(f'{len(no_img)} annotation(s) without an image (e.g. {anns[no_img[0]].name})')
            raise DataError(f'{split} images and annotations do not match: {"; ".join(parts)}. Every image in '
                            f'{img_dir} needs a PNG of the same name in {ann_dir}')
        self.root, self.split = root, split
        self.pairs: List[Tuple[Path, Path]] = [(images[s], anns[s]) for s in sorted(images)]
        self.reduce_zero_label = reduce_zero_label
        self.classes = ADE20K_CLASSES
        self.description = f'ADE20K {folder} ({len(self.pairs)} images, {root})'

    def __len__(self) -> int:
        return len(self.pairs)

    def name_of(self, index: int) -> str:
        return str(self.pairs[index][0])

    def read(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(image 3xHxW uint8 RGB, label HxW uint8 after reduce_zero_label)."""
        from PIL import Image
        img_path, ann_path = self.pairs[index]
        with Image.open(img_path) as im:
            img = torch.from_numpy(np.array(im.convert('RGB'), dtype=np.uint8)).permute(2, 0, 1).contiguous()
        with Image.open(ann_path) as a:
            label = torch.from_numpy(np.array(a, dtype=np.uint8))   # palette or grey PNG: the stored values
        if label.ndim != 2:
            raise DataError(f'{ann_path} is not a single-channel label image (shape {tuple(label.shape)})')
        if tuple(label.shape) != tuple(img.shape[1:]):
            raise DataError(f'{ann_path} is {label.shape[1]}x{label.shape[0]} but its image {img_path.name} is '
                            f'{img.shape[2]}x{img.shape[1]}')
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        return img, label


class SegSamples(Dataset):
    """Samples of a source (``ADE20KSource`` or ``ShapesSource``) through a joint transform.

    Training (``train=True``): key ``(index, epoch)`` → ``(image CxHxW float, label HxW int64,
    bad)``. Evaluation: key ``index`` → ``(image float, label at the original size, index, bad)``.
    ``bad`` is the index when the files could not be read (then the label is all ``ignore_index``),
    else −1. A ``DataError`` (a real mismatch, e.g. sizes) is raised as is.
    """

    def __init__(self, source: Any, transform: Callable, train: bool, seed: int = 0, ignore_index: int = 255,
                 fallback_size: Tuple[int, int] = (512, 512)):
        self.source, self.transform, self.train = source, transform, train
        self.seed, self.ignore_index, self.fallback_size = seed, ignore_index, fallback_size

    def __len__(self) -> int:
        return len(self.source)

    def _read(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        try:
            img, label = self.source.read(index)
            return img, label, -1
        except DataError:
            raise
        except Exception:  # noqa: BLE001 - any decoding failure: unreadable file
            h, w = self.fallback_size
            return (torch.zeros(3, h, w, dtype=torch.uint8),
                    torch.full((h, w), self.ignore_index, dtype=torch.uint8), index)

    def __getitem__(self, key):
        if self.train:
            index, epoch = key if isinstance(key, tuple) else (key, 0)
            img, label, bad = self._read(index)
            with seeded_rng(sample_seed(self.seed, epoch, index)):
                img, mask = self.transform(tv_tensors.Image(img), tv_tensors.Mask(label))
            return img.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long(), bad
        img, label, bad = self._read(key)
        img = self.transform(tv_tensors.Image(img))
        return img.as_subclass(torch.Tensor), label.long(), key, bad


def collate_train(batch: Sequence[Tuple[torch.Tensor, torch.Tensor, int]]):
    imgs, labels, bad = zip(*batch)
    return torch.stack(imgs), torch.stack(labels), torch.tensor(bad, dtype=torch.long)


def collate_eval(batch):
    """Evaluation runs one image at a time (sizes differ): the single sample, batched."""
    if len(batch) != 1:
        raise ValueError('evaluation batches hold one image')
    img, label, index, bad = batch[0]
    return img.unsqueeze(0), label, index, bad
