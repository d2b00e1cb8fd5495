"""Mixed precision: the autocast context and the gradient scaler of a training process.

``Precision(device, amp, cpu_amp)`` decides once, for every task:

* ``amp='bf16'`` / ``'fp16'`` autocasts on CUDA, and on the CPU only when ``cpu_amp`` is set (CPU
  autocast is slow on most CPUs; it exists for testing the mixed-precision path without a GPU);
  ``'none'``, or a CPU run without ``cpu_amp``, runs fp32;
* fp16 needs loss scaling: a ``torch.amp.GradScaler`` for the device type (CUDA or CPU) skips the
  steps whose gradients overflowed and lowers the scale; bf16 (the references' choice) and fp32
  need none.

The trainer puts the forward (and, where the task wants it, the loss) inside ``autocast()``, calls
``backward(loss)`` and lets ``engine.step.TrainStep`` unscale, clip and step through ``unscale_``
and ``step``.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Dict, Optional

import torch

__all__ = ['Precision', 'AMP_CHOICES']

#: values of the ``amp`` config field of every task
AMP_CHOICES = ('bf16', 'fp16', 'none')


class Precision:
    """Autocast dtype (``None``: fp32) and the fp16 gradient scaler of one process."""

    def __init__(self, device: torch.device, amp: str = 'none', cpu_amp: bool = False):
        if amp not in AMP_CHOICES:
            raise ValueError(f'amp must be one of {AMP_CHOICES}, got {amp!r}')
        self.device_type = device.type
        self.dtype: Optional[torch.dtype] = None
        if amp != 'none' and (device.type == 'cuda' or cpu_amp):
            self.dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None

    @property
    def name(self) -> str:
        """'bf16', 'fp16' or 'fp32': what the forward actually runs in."""
        return {torch.bfloat16: 'bf16', torch.float16: 'fp16'}.get(self.dtype, 'fp32')

    def autocast(self) -> ContextManager:
        """``torch.autocast`` for the device and dtype, or a no-op in fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled by the fp16 scaler when there is one."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale (fp16) before they are clipped or checked."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; with fp16 the scaler's step (skipped on overflow) and scale update."""
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def skip(self, optimizer: torch.optim.Optimizer) -> None:
        """Leave out an optimizer step after ``unscale_`` (a non-finite step that the run skips): fp16's scaler
        still updates its scale (and lowers it, having seen the non-finite gradients)."""
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> Optional[Dict[str, Any]]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)
