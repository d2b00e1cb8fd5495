"""Datasets and transforms for classification training and evaluation.

Datasets (``TrainConfig.dataset``):

* ``folder``: ImageNet-style ``DATA/train/<class>/*`` and ``DATA/val/<class>/*`` (torchvision
  ``ImageFolder``; any number of classes; train and val must list the same classes).
* ``cifar10`` / ``svhn``: torchvision's loaders on a local folder (``download`` passed through).
* ``tiny_imagenet``: ``DATA/train/<wnid>/images/*.JPEG`` and ``DATA/val`` either in class
  folders or as released (``val/images`` + ``val_annotations.txt``); ``download`` fetches the
  official zip with torchvision's downloader.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download),
  upsampled to ``img_size`` and made RGB; split stratified 80/20 with seed 0 → 1437 train /
  360 val images.
* ``cluttered_digits``: generated from the digits (``polynext.train.synthetic``): each digit
  drawn at a random size, angle, shear, position and brightness into an ``img_size`` canvas with
  fragments of other digits and pixel noise; ``cluttered_train`` / ``cluttered_val`` images from
  the disjoint source digits of the 80/20 split (no download, the same images on every machine).

Transforms are timm's and torchvision's pieces. ``aug_pipeline='reference'`` builds the
PolyNeXt authors' order: ``RandomResizedCropAndInterpolation`` → horizontal flip → timm
``rand_augment_transform(cfg, {})`` (default hparams: grey 128 fill, random bilinear/bicubic,
as the reference passes an empty dict) → ToTensor → Normalize → timm ``RandomErasing``
(``mode='pixel'``: per-pixel N(0, 1), one box). ``'timm'`` is ``timm.data.create_transform``
(used by the MetaFormer ``train.py``). Evaluation: Resize(shorter side ``eval_resize``) →
CenterCrop(``eval_crop``) → ToTensor → Normalize.

Every sample goes through ``Samples``: unreadable images are skipped (the next readable image
takes the place in the batch) and reported by index, so the trainer can name them, count them
and stop past ``max_corrupt``; the augmentation of each training sample is seeded by
(seed, epoch, index), so it does not depend on workers, ranks or resumption.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

from torch.utils.data import Dataset

from ..engine.determinism import sample_seed, seeded_rng
from ..errors import DataError
from .recipes import TrainConfig

__all__ = ['Samples', 'DataBundle', 'build_transforms', 'build_eval_transform', 'build_data', 'build_eval_data',
           'load_digits_split']

TINY_IMAGENET_URL = 'http://cs231n.stanford.edu/tiny-imagenet-200.zip'
#: images tried in a row (the requested one and its successors) before a batch slot gives up
MAX_READ_TRIES = 10


class Samples(Dataset):
    """``(image, target, skipped)`` with unreadable images skipped and seeded augmentation.

    ``key`` is an index or ``(index, epoch)`` (from ``ResumableDistributedSampler``). With an
    epoch, the transform runs under generators seeded by ``sample_seed(seed, epoch, index)``.
    ``skipped`` is the index of the requested image when it could not be read (the next
    readable image is returned in its place), else -1.
    """

    def __init__(self, base: Dataset, transform: Optional[Callable], seed: int = 0):
        self.base = base
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def path_of(self, index: int) -> str:
        samples = getattr(self.base, 'samples', None)
        if samples is not None and 0 <= index < len(samples):
            return str(samples[index][0])
        return f'#{index}'

    def __getitem__(self, key: Any) -> Tuple[Any, int, int]:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        n = len(self.base)
        skipped = -1
        last_error: Optional[BaseException] = None
        for attempt in range(MAX_READ_TRIES):
            i = (index + attempt) % n
            try:
                img, target = self.base[i]
                break
            except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
                if attempt == 0:
                    skipped = index     # reported by index; the trainer names, counts and logs it
                last_error = e
        else:
            raise DataError(f'{MAX_READ_TRIES} images in a row cannot be read, starting at {self.path_of(index)} '
                            f'({type(last_error).__name__}: {last_error}); check the data folder')
        if self.transform is not None:
            if epoch is None:
                img = self.transform(img)
            else:
                with seeded_rng(sample_seed(self.seed, epoch, index)):
                    img = self.transform(img)
        return img, int(target), skipped


@dataclass
class DataBundle:
    train: Optional[Samples]
    val: Samples
    classes: List[str]
    description: str = ''
    notes: List[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------

def build_eval_transform(img_resize: int, crop: Optional[int], interpolation: str,
                         mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Resize(shorter side) → CenterCrop → ToTensor → Normalize (no crop: the resize size)."""
    from torchvision import transforms as T
    from timm.data.transforms import str_to_interp_mode
    return T.Compose([
        T.Resize(img_resize, interpolation=str_to_interp_mode(interpolation)),
        T.CenterCrop(crop or img_resize),
        T.ToTensor(),
        T.Normalize(mean=list(mean), std=list(std)),
    ])


def build_transforms(cfg: TrainConfig) -> Tuple[Callable, Callable]:
    """(train transform, eval transform) of a recipe."""
    from torchvision import transforms as T
    from timm.data import RandomResizedCropAndInterpolation, create_transform, rand_augment_transform
    from timm.data.random_erasing import RandomErasing

    eval_tf = build_eval_transform(cfg.eval_resize, cfg.eval_crop, cfg.eval_interpolation, cfg.mean, cfg.std)
    if cfg.aug_pipeline == 'timm':
        train_tf = create_transform(
            input_size=cfg.img_size, is_training=True, scale=cfg.crop_scale, ratio=cfg.crop_ratio, hflip=cfg.hflip,
            color_jitter=cfg.color_jitter, auto_augment=cfg.randaugment, interpolation=cfg.train_interpolation,
            mean=cfg.mean, std=cfg.std, re_prob=cfg.random_erasing, re_mode='pixel', re_count=1)
        return train_tf, eval_tf
    steps: List[Callable] = [RandomResizedCropAndInterpolation(
        cfg.img_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, interpolation=cfg.train_interpolation)]
    if cfg.hflip > 0:
        steps.append(T.RandomHorizontalFlip(p=cfg.hflip))
    if cfg.randaugment:
        # the reference passes an empty hparams dict: timm's defaults (fill 128 grey, random resampling)
        steps.append(rand_augment_transform(cfg.randaugment, {}))
    elif cfg.color_jitter:
        steps.append(T.ColorJitter(*(cfg.color_jitter,) * 3))
    steps += [T.ToTensor(), T.Normalize(mean=list(cfg.mean), std=list(cfg.std))]
    if cfg.random_erasing > 0:
        steps.append(RandomErasing(cfg.random_erasing, mode='pixel', max_count=1, device='cpu'))
    return T.Compose(steps), eval_tf


# ---------------------------------------------------------------------------------------
# Base datasets
# ---------------------------------------------------------------------------------------

class _ImageList(Dataset):
    """A fixed list of (path, class index) read with torchvision's default loader."""

    def __init__(self, samples: List[Tuple[str, int]], classes: List[str]):
        from torchvision.datasets.folder import default_loader
        self.samples = samples
        self.classes = classes
        self.loader = default_loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        return self.loader(path), target


class _InMemory(Dataset):
    def __init__(self, images: List[Any], targets: List[int], classes: List[str]):
        self.images, self.targets, self.classes = images, targets, classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


def load_digits_split(img_size: int, seed: int = 0) -> Tuple[_InMemory, _InMemory]:
    """scikit-learn digits as RGB PIL images of ``img_size``, stratified 80/20 split (seed 0)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)   # values 0..16
    images = [Image.fromarray(p, mode='L').resize((img_size, img_size), Image.BICUBIC).convert('RGB')
              for p in pixels]
    idx = np.arange(len(images))
    tr, va = train_test_split(idx, test_size=0.2, stratify=digits.target, random_state=seed)
    classes = [str(c) for c in range(10)]
    pick = lambda ids: _InMemory([images[i] for i in ids], [int(digits.target[i]) for i in ids], classes)  # noqa: E731
    return pick(sorted(tr)), pick(sorted(va))


@functools.lru_cache(maxsize=4)
def _cluttered_split(split: str, num_images: int, size: int) -> '_InMemory':
    """One split of the generated cluttered digits as PIL images (cached: a process that trains
    several runs, e.g. the ablation cells, generates each split once)."""
    from PIL import Image
    from .synthetic import CLASSES, cluttered_digits_arrays
    images, labels = cluttered_digits_arrays(split, num_images, size)
    return _InMemory([Image.fromarray(a) for a in images], labels, list(CLASSES))


def _need_dir(path: Optional[str], what: str, layout: str) -> Path:
    if not path:
        raise DataError(f'{what} needs a data folder: pass --data DIR ({layout})')
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f'data folder not found: {p} ({layout})')
    if not p.is_dir():
        raise DataError(f'--data must be a folder, but {p} is a file ({layout})')
    return p


def _image_folder(root: Path, what: str) -> Dataset:
    from torchvision.datasets import ImageFolder
    if not root.is_dir():
        raise DataError(f'{what}: folder {root} not found; expected class sub-folders in it '
                        f'({root}/<class>/<image>)')
    try:
        return ImageFolder(str(root))
    except FileNotFoundError as e:
        msg = str(e).split('. Supported')[0]
        raise DataError(f'{what}: {msg.rstrip(".")} — expected {root}/<class>/<image> with image files') from None


def _folder_pair(root: Path, what: str) -> Tuple[Dataset, Dataset]:
    layout = 'DIR/train/<class>/<image> and DIR/val/<class>/<image>'
    for split in ('train', 'val'):
        if not (root / split).is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir())[:6]
            raise DataError(f'{root} has no {split}/ folder (it holds {present or "no folders"}); expected {layout}')
    train = _image_folder(root / 'train', f'{what} train')
    val = _image_folder(root / 'val', f'{what} val')
    _check_same_classes(train.classes, val.classes, root)
    return train, val


def _check_same_classes(train: List[str], val: List[str], root: Path) -> None:
    if train != val:
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        detail = (f"'{only_val[0]}' is in val/ but not in train/" if only_val else
                  f"'{only_train[0]}' is in train/ but not in val/")
        raise DataError(f'{root}: train/ has {len(train)} classes and val/ has {len(val)}; {detail}. Both must hold '
                        f'the same class folders')


def _torchvision_set(cls_name: str, root: Path, download: bool, **kw) -> Dataset:
    import torchvision.datasets as D
    cls = getattr(D, cls_name)
    try:
        return cls(str(root), download=download, **kw)
    except RuntimeError as e:
        if 'not found' in str(e).lower() or 'corrupted' in str(e).lower():
            raise DataError(f'{cls_name} not found in {root} ({str(e).splitlines()[0]}); pass --download to fetch '
                            f'it, or point --data at the folder that holds it') from None
        raise


def _tiny_imagenet(root: Path, download: bool) -> Tuple[Dataset, Dataset]:
    if not (root / 'train').is_dir() and (root / 'tiny-imagenet-200').is_dir():
        root = root / 'tiny-imagenet-200'
    if not (root / 'train').is_dir():
        if not download:
            raise DataError(f'Tiny-ImageNet not found in {root} (expected {root}/train and {root}/val); pass '
                            f'--download to fetch it')
        from torchvision.datasets.utils import download_and_extract_archive
        download_and_extract_archive(TINY_IMAGENET_URL, str(root))
        root = root / 'tiny-imagenet-200'
    train = _image_folder(root / 'train', 'Tiny-ImageNet train')
    val_dir = root / 'val'
    ann = val_dir / 'val_annotations.txt'
    if ann.is_file():   # the released layout: val/images/*.JPEG + annotations
        index = {c: i for i, c in enumerate(train.classes)}
        samples = []
        for line in ann.read_text().splitlines():
            parts = line.split('\t')
            if len(parts) >= 2:
                if parts[1] not in index:
                    raise DataError(f"{ann}: class '{parts[1]}' of {parts[0]} is not a train/ class")
                samples.append((str(val_dir / 'images' / parts[0]), index[parts[1]]))
        if not samples:
            raise DataError(f'{ann} lists no images')
        return train, _ImageList(samples, list(train.classes))
    val = _image_folder(val_dir, 'Tiny-ImageNet val')
    _check_same_classes(train.classes, val.classes, root)
    return train, val


def _base_datasets(cfg: TrainConfig) -> Tuple[Dataset, Dataset, List[str], str]:
    kind = cfg.dataset
    if kind == 'digits':
        train, val = load_digits_split(cfg.img_size)
        return train, val, train.classes, (f'scikit-learn digits (8x8 → {cfg.img_size}x{cfg.img_size} RGB), '
                                           f'stratified 80/20 split seed 0')
    if kind == 'cluttered_digits':
        train = _cluttered_split('train', cfg.cluttered_train, cfg.img_size)
        val = _cluttered_split('val', cfg.cluttered_val, cfg.img_size)
        return train, val, train.classes, (f'generated cluttered digits ({cfg.img_size}x{cfg.img_size}, '
                                           f'from scikit-learn digits split 80/20 seed 0)')
    if kind == 'folder':
        root = _need_dir(cfg.data, f"recipe for '{cfg.model}' on ImageNet-style folders",
                         'DIR/train/<class>/<image> and DIR/val/<class>/<image>')
        train, val = _folder_pair(root, str(root))
        return train, val, list(train.classes), f'image folders {root}'
    if kind in ('cifar10', 'svhn'):
        if cfg.download and cfg.data:
            Path(cfg.data).expanduser().mkdir(parents=True, exist_ok=True)
        root = _need_dir(cfg.data, kind.upper(), 'a folder that holds the dataset, or an empty one with --download')
        if kind == 'cifar10':
            train = _torchvision_set('CIFAR10', root, cfg.download, train=True)
            val = _torchvision_set('CIFAR10', root, cfg.download, train=False)
            return train, val, list(train.classes), f'CIFAR-10 in {root}'
        train = _torchvision_set('SVHN', root, cfg.download, split='train')
        val = _torchvision_set('SVHN', root, cfg.download, split='test')
        return train, val, [str(c) for c in range(10)], f'SVHN (train / test) in {root}'
    if kind == 'tiny_imagenet':
        if cfg.download and cfg.data:
            Path(cfg.data).expanduser().mkdir(parents=True, exist_ok=True)
        root = _need_dir(cfg.data, 'Tiny-ImageNet', 'the tiny-imagenet-200 folder, or an empty one with --download')
        train, val = _tiny_imagenet(root, cfg.download)
        return train, val, list(train.classes), f'Tiny-ImageNet in {root}'
    raise DataError(f'unknown dataset kind {kind!r}')


def build_data(cfg: TrainConfig, with_train: bool = True) -> DataBundle:
    """Train and val ``Samples`` of a recipe, with their transforms."""
    train_base, val_base, classes, desc = _base_datasets(cfg)
    if len(train_base) == 0 or len(val_base) == 0:
        raise DataError(f'{desc}: the {"train" if len(train_base) == 0 else "val"} split holds no images')
    train_tf, eval_tf = build_transforms(cfg)
    train = Samples(train_base, train_tf, seed=cfg.seed) if with_train else None
    return DataBundle(train=train, val=Samples(val_base, eval_tf), classes=list(classes),
                      description=f'{desc}: {len(train_base)} train / {len(val_base)} val images, '
                                  f'{len(classes)} classes')


def build_eval_data(dataset: str, data: Optional[str], transform: Callable, split: str = 'val',
                    download: bool = False, img_size: int = 32) -> Tuple[Samples, List[str], str]:
    """An evaluation set: ``folder`` (``DIR/val`` if present, else ``DIR`` itself holds the class
    folders), ``cifar10`` / ``svhn`` (test split), ``tiny_imagenet`` (val), ``digits`` (val split)."""
    if dataset == 'folder':
        root = _need_dir(data, 'validation', 'DIR/val/<class>/<image>, or DIR/<class>/<image>')
        sub = root / split
        ds = _image_folder(sub if sub.is_dir() else root, f'{root}')
        where = sub if sub.is_dir() else root
        return Samples(ds, transform), list(ds.classes), f'image folders {where}'
    cfg = TrainConfig(dataset=dataset, data=data, download=download, img_size=img_size)
    _, val, classes, desc = _base_datasets(cfg)
    return Samples(val, transform), list(classes), desc
