"""Turning out-of-memory failures into one actionable message.

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

from ..errors import PolyNeXtError

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


_OOM_TEXT = ('out of memory', "can't allocate memory", 'cannot allocate memory', 'failed to allocate')


def is_oom_error(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)) and not isinstance(e, OutOfMemory):
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
