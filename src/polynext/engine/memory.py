"""The batch layout of a run, and turning out-of-memory failures into one actionable message.

``BatchLayout.split(batch_size, device_batch_size, world_size)`` is the one place that computes
effective batch = per-device batch × devices × accumulation steps: a recipe stores the effective
batch and the per-device batch, and the accumulation follows from the number of devices (a batch
that does not split into whole steps is refused with the fix).


``oom_advice(batch)`` wraps a training or evaluation step: CUDA's ``OutOfMemoryError`` and
the CPU allocator's "can't allocate memory" become ``OutOfMemory`` (a one-line user error)
that suggests a smaller per-device batch with more gradient accumulation, which keeps the
effective batch, and therefore the recipe, unchanged.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import ConfigError, PolyNeXtError

__all__ = ['OutOfMemory', 'BatchLayout', 'is_oom_error', 'oom_advice']


class OutOfMemory(PolyNeXtError, MemoryError):
    """The batch does not fit in the device's memory."""


@dataclass(frozen=True)
class BatchLayout:
    """effective batch = per-device batch × devices × accumulation steps."""
    device_batch: int
    world_size: int = 1
    accumulation: int = 1

    @property
    def effective(self) -> int:
        return self.device_batch * self.world_size * self.accumulation

    @staticmethod
    def check(batch_size: int, device_batch_size: int) -> None:
        """``ConfigError`` unless the effective batch is a whole number of per-device batches."""
        if batch_size % device_batch_size:
            raise ConfigError(f'the effective batch {batch_size} is not a multiple of the per-device batch '
                              f'{device_batch_size}; change --batch-size or --device-batch-size')

    @classmethod
    def split(cls, batch_size: int, device_batch_size: int, world_size: int = 1) -> 'BatchLayout':
        """The layout of an effective batch on ``world_size`` devices (accumulation = what is left)."""
        per_step = device_batch_size * world_size
        if batch_size % per_step:
            raise ConfigError(
                f'the effective batch {batch_size} cannot be split into {world_size} device(s) × '
                f'{device_batch_size} per device × whole accumulation steps; choose --device-batch-size so that '
                f'{batch_size} is a multiple of (device batch × {world_size})')
        return cls(device_batch_size, world_size, batch_size // per_step)


#: what torch's and Python's allocators say when memory runs out (CUDA, the CPU allocator, others)
_OOM_TEXT = ('out of memory', "can't allocate memory", 'cannot allocate memory', 'failed to allocate',
             'not enough memory', "defaultcpuallocator: can't allocate")


def is_oom_error(e: BaseException) -> bool:
    """True for allocation failures: CUDA OOM, ``MemoryError``, torch's CPU allocator (not our own advice)."""
    if isinstance(e, OutOfMemory):
        return False
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXT)


def advice(layout: BatchLayout, where: str = 'training') -> str:
    b = layout.device_batch
    eff = (f'effective batch {layout.effective} = {b} per device × {layout.world_size} device(s) × '
           f'{layout.accumulation} accumulation step(s)')
    if b <= 1:
        return (f'out of memory during {where} even with 1 image per device ({eff}); use a smaller model or '
                f'image size, or a device with more memory')
    smaller = max(1, b // 2)
    acc = layout.accumulation * (b // smaller) if b % smaller == 0 else None
    keep = (f' (accumulation becomes {acc}, the effective batch stays {layout.effective})' if acc else '')
    return (f'out of memory during {where} with {eff}. Use --device-batch-size {smaller}{keep}.')


@contextlib.contextmanager
def oom_advice(layout: BatchLayout, where: str = 'training') -> Iterator[None]:
    """Re-raise an out-of-memory error as ``OutOfMemory`` with the suggestion."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only OOM errors are converted, others re-raised as is
        if not is_oom_error(e):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemory(advice(layout, where)) from None
