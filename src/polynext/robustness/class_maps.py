"""ImageNet class lists: the 1000 ImageNet-1k WordNet ids and the 200-class subsets of
ImageNet-A and ImageNet-R.

The lists ship as package data (``polynext/data/imagenet_subsets.json``, generated from timm's
``timm/data/_info`` by ``tools/make_imagenet_subsets.py``). Class ``i`` of every ImageNet-1k
classifier is ``imagenet_1k_wnids()[i]`` (the sorted wnids). A subset's classes are listed in
ascending ImageNet-1k index order, which is also the sorted order of their wnids, i.e. the
order of ``ImageFolder`` over the dataset's 200 class folders.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Dict, Tuple

__all__ = ['SubsetMap', 'imagenet_1k_wnids', 'imagenet_1k_index', 'subset_map', 'SUBSETS', 'read_package_json']

#: keys of the 200-class subsets in the data file
SUBSETS = ('imagenet_a', 'imagenet_r')


def read_package_json(name: str) -> dict:
    """A JSON file of ``polynext/data``."""
    return json.loads(resources.files('polynext').joinpath('data', name).read_text())


@lru_cache(maxsize=None)
def _subsets_file() -> dict:
    return read_package_json('imagenet_subsets.json')


@dataclass(frozen=True)
class SubsetMap:
    """A subset of the ImageNet-1k classes: its wnids and their ImageNet-1k indices (ascending)."""
    key: str
    name: str
    wnids: Tuple[str, ...]
    in1k_indices: Tuple[int, ...]

    def __len__(self) -> int:
        return len(self.wnids)

    def class_index(self) -> Dict[str, int]:
        """wnid → position in the subset (the target among the subset's restricted logits)."""
        return {w: i for i, w in enumerate(self.wnids)}


@lru_cache(maxsize=None)
def imagenet_1k_wnids() -> Tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in class-index order (sorted)."""
    return tuple(_subsets_file()['imagenet_1k'])


@lru_cache(maxsize=None)
def imagenet_1k_index() -> Dict[str, int]:
    """wnid → ImageNet-1k class index."""
    return {w: i for i, w in enumerate(imagenet_1k_wnids())}


@lru_cache(maxsize=None)
def subset_map(key: str) -> SubsetMap:
    """``'imagenet_a'`` or ``'imagenet_r'``."""
    if key not in SUBSETS:
        raise KeyError(f'unknown subset {key!r}; one of {SUBSETS}')
    entry = _subsets_file()[key]
    return SubsetMap(key=key, name=entry['name'], wnids=tuple(entry['wnids']),
                     in1k_indices=tuple(int(i) for i in entry['in1k_indices']))

