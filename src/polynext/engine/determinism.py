"""Reproducible, resumable data order and random state.

* ``ResumableDistributedSampler``: torch's ``DistributedSampler`` (the same shuffled shard per
  rank for a given seed and epoch) that can start part-way into an epoch, so a run resumed
  from a mid-epoch checkpoint skips exactly the batches it already trained on, without
  loading them. It yields ``(index, epoch)`` keys so that the dataset can seed each sample.
* ``ShardSampler``: the validation shard of one rank, ``range(rank, n, world)`` with no
  padding, so reduced metrics count every image exactly once.
* ``seeded_rng(seed)``: runs a block (one sample's augmentation) with Python's, NumPy's and
  torch's CPU generators seeded from ``sample_seed(base, epoch, index)`` and restores them
  afterwards. Augmentation then depends only on (seed, epoch, index), not on the number of
  loader workers, the rank or where a run was resumed.
* ``capture_rng_state()`` / ``restore_rng_state(state)``: the generators that drive dropout,
  drop path and Mixup/CutMix in the training process (Python, NumPy, torch CPU and CUDA),
  as tensors and plain containers (loadable with ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import contextlib
import itertools
import random
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

__all__ = ['ResumableDistributedSampler', 'ShardSampler', 'sample_seed', 'seeded_rng', 'seed_everything',
           'capture_rng_state', 'restore_rng_state']


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` yielding ``(index, epoch)`` that can skip the first samples of an epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.start = 0

    def set_start(self, num_samples: int) -> None:
        """Skip this rank's first ``num_samples`` samples of the current epoch (0: a full epoch)."""
        if not 0 <= num_samples <= self.num_samples:
            raise ValueError(f'start {num_samples} is outside this epoch of {self.num_samples} samples')
        self.start = num_samples

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.epoch
        for index in itertools.islice(super().__iter__(), self.start, None):
            yield index, epoch

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Rank ``rank``'s share ``range(rank, n, world)`` of an evaluation set, in order, no padding."""

    def __init__(self, num_items: int, num_replicas: int = 1, rank: int = 0):
        self.indices = range(rank, num_items, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on (base seed, epoch, sample index)."""
    state = np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed Python / NumPy / torch-CPU generators for a block, then restore their previous state.

    Only the CPU generator of torch is touched (``default_generator``), never CUDA's."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def capture_rng_state() -> Dict[str, Any]:
    """This process's generator states, in tensors and plain containers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        'python': random.getstate(),
        'numpy': dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                      has_gauss=int(has_gauss), cached_gaussian=float(cached)),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def restore_rng_state(state: Optional[Dict[str, Any]]) -> None:
    if not state:
        return
    random.setstate(_to_tuple(state['python']))
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        cuda = list(state['cuda'])[:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
