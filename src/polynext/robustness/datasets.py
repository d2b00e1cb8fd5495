"""Folder layouts of the robustness datasets, read by WordNet id.

Every dataset is a folder of ``<wnid>/<image>`` class folders (ImageNet-C: one per corruption
and severity). Targets come from the wnid of the folder, not from its position among the
folders, so a set with a few classes (or a severity folder with an empty class) still scores
against the right ImageNet-1k (or subset) index; a folder that is not a known wnid is an error.

* ``--val``, ``--sketch``: ``DIR/<wnid>/*`` over the 1000 ImageNet-1k wnids (``DIR/val`` and
  ``DIR/sketch`` are taken if ``DIR`` itself holds no wnid folders).
* ``--imagenet-a``, ``--imagenet-r``: ``DIR/<wnid>/*`` over the dataset's 200 wnids.
* ``--imagenet-c``: ``DIR/<corruption>/<severity 1-5>/<wnid>/*`` (also
  ``DIR/<category>/<corruption>/...`` with the categories noise / blur / weather / digital of
  the released tarballs).

Images are listed once per cell when it is evaluated and read by the loader workers, one
batch at a time (never all in memory).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

from torchvision.datasets import ImageFolder

from ..errors import DataError
from .class_maps import imagenet_1k_index, subset_map
from .protocols import CORRUPTION_CATEGORIES, CORRUPTIONS, SEVERITIES, Protocol

__all__ = ['WnidFolder', 'class_index_for', 'resolve_class_root', 'ImageNetCLayout', 'scan_imagenet_c',
           'open_cell_dataset', 'LAYOUTS']

WNID = re.compile(r'^n\d{8}$')

#: the expected layout of each dataset, as shown in error messages and the README
LAYOUTS = {
    'clean': 'DIR/<wnid>/<image> (ImageNet-1k val in class folders)',
    'imagenet_c': 'DIR/<corruption>/<severity 1-5>/<wnid>/<image>',
    'imagenet_a': 'DIR/<wnid>/<image> (the 200 ImageNet-A class folders)',
    'imagenet_r': 'DIR/<wnid>/<image> (the 200 ImageNet-R class folders)',
    'sketch': 'DIR/<wnid>/<image> (the 1000 ImageNet-Sketch class folders)',
}
_OPTIONS = {'clean': '--val', 'imagenet_c': '--imagenet-c', 'imagenet_a': '--imagenet-a',
            'imagenet_r': '--imagenet-r', 'sketch': '--sketch'}


def _subdirs(path: Path) -> List[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.'))
    except FileNotFoundError:
        return []


def class_index_for(protocol: Protocol) -> Tuple[Dict[str, int], str]:
    """(wnid → target index, what the classes are) for a protocol: subset positions or IN-1k indices."""
    if protocol.subset:
        sub = subset_map(protocol.subset)
        return sub.class_index(), f'the {len(sub)} {sub.name} classes'
    return imagenet_1k_index(), 'the 1000 ImageNet-1k classes'


class WnidFolder(ImageFolder):
    """A torchvision ``ImageFolder`` over ``root/<wnid>/*`` whose targets are ``class_index[wnid]``
    (not the folder's position); a folder that is not in the map is an error."""

    def __init__(self, root, class_index: Mapping[str, int], what: str, option: str = 'the data folder'):
        self._class_index = dict(class_index)
        self._what = what
        self._option = option
        super().__init__(str(root), allow_empty=True)

    def find_classes(self, directory: str):
        present = _subdirs(Path(directory))
        unknown = [w for w in present if w not in self._class_index]
        if unknown:
            more = f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''
            raise DataError(f"{self._option} {directory}: folder '{unknown[0]}'{more} is not one of {self._what}; "
                            f"point {self._option} at the folder that holds the class folders")
        if not present:
            raise DataError(f'{self._option} {directory} holds no class folders; expected {directory}/<wnid>/<image>')
        return present, {w: self._class_index[w] for w in present}


def resolve_class_root(root: Path, dataset: str) -> Path:
    """The folder that holds the wnid folders: ``root`` itself, or its single sub-folder / ``val`` /
    ``sketch`` when ``root`` holds no wnid folders (the layouts of the released archives)."""
    option = _OPTIONS[dataset]
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f'{option}: folder not found: {root} (expected {LAYOUTS[dataset]})')
    if not root.is_dir():
        raise DataError(f'{option}: {root} is a file; pass the folder (expected {LAYOUTS[dataset]})')
    subs = _subdirs(root)
    if any(WNID.match(s) for s in subs):
        return root
    for name in ([subs[0]] if len(subs) == 1 else []) + ['val', 'sketch']:
        inner = root / name
        if inner.is_dir() and any(WNID.match(s) for s in _subdirs(inner)):
            return inner
    shown = ', '.join(subs[:5]) + (', ...' if len(subs) > 5 else '') if subs else 'no folders'
    raise DataError(f'{option} {root} holds no <wnid> class folders (it holds {shown}); expected {LAYOUTS[dataset]}')


@dataclass
class ImageNetCLayout:
    """Where each (corruption, severity) folder of an ImageNet-C copy is."""
    root: Path
    cells: Dict[Tuple[str, int], Path]
    missing: List[str]                       # 'fog' (no folder at all) or 'frost/3'
    ignored: List[str] = field(default_factory=list)   # other top-level folders (e.g. the extra corruptions)

    @property
    def complete(self) -> bool:
        return not self.missing


def _has_class_folders(path: Path) -> bool:
    return any(WNID.match(s) for s in _subdirs(path))


def scan_imagenet_c(root: Path) -> ImageNetCLayout:
    """Find the 15 × 5 cells under ``root`` (no image is listed yet)."""
    root = Path(root).expanduser()
    option = _OPTIONS['imagenet_c']
    if not root.is_dir():
        what = 'is a file' if root.exists() else 'not found'
        raise DataError(f'{option}: folder {what}: {root} (expected {LAYOUTS["imagenet_c"]})')
    top = _subdirs(root)
    cells: Dict[Tuple[str, int], Path] = {}
    missing: List[str] = []
    for c in CORRUPTIONS:
        where = root / c
        if not where.is_dir():
            category = next(k for k, v in CORRUPTION_CATEGORIES.items() if c in v)
            where = root / category / c
        if not where.is_dir():
            missing.append(c)
            continue
        absent = []
        for s in SEVERITIES:
            cell = where / str(s)
            if cell.is_dir() and _has_class_folders(cell):
                cells[(c, s)] = cell
            else:
                absent.append(s)
        if len(absent) == len(SEVERITIES):
            missing.append(c)
        else:
            missing += [f'{c}/{s}' for s in absent]
    known = set(CORRUPTIONS) | set(CORRUPTION_CATEGORIES)
    ignored = [d for d in top if d not in known]
    if not cells:
        shown = ', '.join(top[:6]) + (', ...' if len(top) > 6 else '') if top else 'no folders'
        hint = (f'; {root} looks like one corruption: pass its parent folder'
                if top and all(d.isdigit() for d in top) else '')
        raise DataError(f'{option} {root} holds none of the 15 corruption folders (it holds {shown}){hint}; expected '
                        f'{LAYOUTS["imagenet_c"]}, e.g. DIR/gaussian_noise/1/n01440764/<image>')
    return ImageNetCLayout(root=root, cells=cells, missing=missing, ignored=ignored)


def open_cell_dataset(root: Path, protocol: Protocol, dataset: str, transform):
    """``Samples`` over one folder of wnid folders with the protocol's targets and ``transform``."""
    from ..train.data import Samples
    class_index, what = class_index_for(protocol)
    base = WnidFolder(root, class_index, what, option=_OPTIONS[dataset])
    if len(base) == 0:
        raise DataError(f'{_OPTIONS[dataset]} {root}: the class folders hold no images')
    return Samples(base, transform), len(base.classes)


def expected_classes(protocol: Protocol) -> int:
    return len(class_index_for(protocol)[0])


def describe_missing(missing: List[str], limit: int = 12) -> str:
    shown = missing[:limit]
    more = f' and {len(missing) - limit} more' if len(missing) > limit else ''
    return ', '.join(shown) + more


def missing_cells_message(layout: ImageNetCLayout) -> str:
    whole = [m for m in layout.missing if '/' not in m]
    sev = [m for m in layout.missing if '/' in m]
    parts = []
    if whole:
        parts.append(f'{len(whole)} of the 15 corruptions ({describe_missing(whole)})')
    if sev:
        parts.append(f'{len(sev)} severity folder{"s" if len(sev) > 1 else ""} ({describe_missing(sev)})')
    return ' and '.join(parts)
