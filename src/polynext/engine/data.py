"""Data loading shared by every task: loaders with a worker cap, and the unreadable-image limit.

* ``make_loader(dataset, sampler, batch_size, workers, seed, ...)``: a ``DataLoader`` with at
  most as many worker processes as this process may use cores (more only compete for them), and
  its own seeded generator (the loader's base seed never touches the global generator, so the
  model's initialisation and the training streams do not depend on the number of workers).
* ``readable_batches(batches, skipped)``: the ``(x, y)`` of each ``(x, y, bad)`` batch of an
  evaluation loader without its unreadable items (``bad >= 0``, see the tasks' sample wrappers),
  whose indices are collected in ``skipped``.
* ``corrupt_limit(max_corrupt, n)``: unreadable images tolerated in a split of ``n``: a fraction
  (``max_corrupt`` < 1) or a count (>= 1).
* ``CorruptImages``: the unreadable images of one split. Each rank reports the indices its
  dataset skipped; ``add`` gathers them from every rank, logs each new name once and stops the
  run past the limit with the first names and the fix. The names are saved with the training
  state, so a resumed run keeps counting.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError
from .distributed import all_gather_objects

__all__ = ['make_loader', 'usable_cores', 'readable_batches', 'corrupt_limit', 'CorruptImages']


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    if hasattr(os, 'sched_getaffinity'):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def make_loader(dataset: Dataset, sampler: Optional[Sampler], batch_size: int, workers: int, seed: int,
                pin_memory: bool = False, drop_last: bool = False,
                collate_fn: Optional[Callable] = None) -> DataLoader:
    """A ``DataLoader`` with ``min(workers, usable cores)`` persistent workers and a seeded generator."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    workers = min(workers, usable_cores())
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=pin_memory, drop_last=drop_last, generator=gen, persistent_workers=workers > 0)


def readable_batches(batches: Iterable[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     skipped: List[int]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` of each ``(x, y, bad)`` batch with the unreadable items left out (their indices appended to
    ``skipped``); a batch with nothing readable is left out."""
    for x, y, bad in batches:
        keep = bad < 0
        if not bool(keep.all()):
            skipped += bad[~keep].tolist()
            x, y = x[keep], y[keep]
            if len(y) == 0:
                continue
        yield x, y


def corrupt_limit(max_corrupt: float, num_images: int) -> int:
    """Unreadable images tolerated: a fraction of ``num_images`` (< 1) or a count (>= 1)."""
    return int(max_corrupt * num_images) if max_corrupt < 1 else int(max_corrupt)


class CorruptImages:
    """Unreadable images of one split (see the module doc).

    ``what`` names an item in messages ('train image'); ``name_of(index)`` gives an item's file
    name; ``log(message)`` writes to the run's log.
    """

    def __init__(self, what: str, num_images: int, max_corrupt: float, name_of: Callable[[int], str],
                 log: Callable[[str], Any]):
        self.what = what
        self.num_images = num_images
        self.max_corrupt = max_corrupt
        self.limit = corrupt_limit(max_corrupt, num_images)
        self.name_of = name_of
        self.log = log
        self.names: List[str] = []

    def add(self, local_indices: Iterable[int]) -> None:
        """Gather this rank's skipped indices with every rank's (a collective), log, check the limit."""
        gathered = all_gather_objects(sorted(set(int(i) for i in local_indices)))
        names = sorted({self.name_of(i) for part in gathered for i in part})
        new = [n for n in names if n not in self.names]
        for n in new:
            self.log(f'warning: unreadable {self.what} skipped: {n}')
        self.names = sorted(set(self.names) | set(new))
        if len(self.names) > self.limit:
            shown = ', '.join(self.names[:3])
            raise DataError(f'{len(self.names)} of {self.num_images} {self.what}s cannot be read (limit {self.limit}, '
                            f'max_corrupt={self.max_corrupt:g}), e.g. {shown}; fix or remove them, or raise the '
                            f'limit with --set max_corrupt=...')
