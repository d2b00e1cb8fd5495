"""One training step, the same for every task: micro-batches, then the optimizer step.

A task's loop stays explicit; ``TrainStep`` does the parts that do not depend on the task::

    step = TrainStep(model, optimizer, precision, layout, meters=meters, ema=ema, clip_grad=5.0)
    for k, (x, y) in enumerate(micro_batches):
        x, y = step.to_device(x, y)
        with step.micro_batch(sync=last_of_the_step):    # DDP no_sync before the last one, OOM advice
            with step.autocast():
                loss = criterion(model(x), y)             # the task's forward and loss
            step.backward(loss)                           # (loss / accumulation), scaled under fp16
        if last_of_the_step:
            step.optimizer_step(float(loss), epoch=epoch, batch=k)

``optimizer_step``: unscale (fp16), global-norm clip (``clip_grad``; without it the norm is still
measured), the non-finite check before the weights change (fp16 overflow is the scaler's business:
it skips the step) and the run's ``NonFinitePolicy`` (``stop`` raises ``NonFiniteError`` with the
recovery command of ``resume_hint``; ``skip`` leaves the step out, up to ``limit`` in a row; ``rollback``
raises for ``engine.run.launch`` to go back to the last checkpoint), the optimizer step, ``zero_grad``,
the gradient norm into the meters (finite only), the EMA update and ``global_step + 1`` (a skipped
step counts too, as the fp16 scaler's skipped steps do, so that iteration-counted loops stay in step).

The model may be wrapped in ``DistributedDataParallel`` (``wrap_model``): gradients are then
all-reduced on the last micro-batch of each step only, so every rank sees the same norm and all
ranks stop together on a non-finite value.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from .distributed import DistEnv
from .ema import EmaTracker
from .memory import BatchLayout, oom_advice
from .metrics import Meters
from .nonfinite import NonFiniteError, NonFinitePolicy, nonfinite_what, where
from .precision import Precision

__all__ = ['TrainStep', 'to_channels_last', 'unwrap', 'wrap_model']


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model.to(memory_format=torch.channels_last)``, with its (1, C, 1, 1) parameters (per-channel scales)
    kept in standard strides: channels-last restrides them, autograd gives their gradients standard strides,
    and DDP's gradient buckets follow the parameter's (a mismatch costs a warning and a copy every step)."""
    model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        if p.dim() == 4 and p.shape[0] == 1 and p.shape[2:] == (1, 1):
            p.data = p.data.clone(memory_format=torch.contiguous_format)
    return model


def wrap_model(model: nn.Module, env: DistEnv, sync_batchnorm: bool = False,
               log: Optional[Callable[[str], None]] = None) -> nn.Module:
    """``DistributedDataParallel`` over the ranks (the model itself in one process).

    ``sync_batchnorm``: BatchNorm statistics over every rank's images (torch's SyncBatchNorm runs on
    CUDA only; on CPU each process keeps its own statistics, which ``log`` is told)."""
    if not env.distributed:
        return model
    if sync_batchnorm:
        if env.device.type == 'cuda':
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif log is not None:
            log('note: BatchNorm statistics are per process on CPU (SyncBatchNorm needs CUDA)')
    return nn.parallel.DistributedDataParallel(model, device_ids=[env.device] if env.device.type == 'cuda' else None)


class TrainStep:
    """Micro-batch context, backward and optimizer step of one training process (see the module doc)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision, layout: BatchLayout,
                 meters: Meters, *, device: torch.device, clip_grad: Optional[float] = None,
                 channels_last: bool = False, ema: Optional[EmaTracker] = None,
                 resume_hint: Callable[[], str] = lambda: '', nonfinite: NonFinitePolicy = NonFinitePolicy(),
                 log: Optional[Callable[[str], None]] = None):
        self.model = model
        self.optimizer = optimizer
        self.precision = precision
        self.layout = layout
        self.meters = meters
        self.device = device
        self.clip = clip_grad if clip_grad is not None else float('inf')
        self.channels_last = channels_last
        self.ema = ema
        self.resume_hint = resume_hint
        self.nonfinite = nonfinite
        self.log = log
        self.nonfinite_in_a_row = 0   # non-finite steps skipped in a row (policy 'skip')
        self.skipped_steps = 0        # ... in this process, in all
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.global_step = 0          # optimizer steps taken

    @property
    def module(self) -> nn.Module:
        return unwrap(self.model)

    def distribute(self, env: DistEnv, sync_batchnorm: bool = False,
                   log: Optional[Callable[[str], None]] = None) -> None:
        """Wrap the model in ``DistributedDataParallel`` (``wrap_model``); call after restoring a checkpoint."""
        self.model = wrap_model(self.model, env, sync_batchnorm, log)

    def to_device(self, x: torch.Tensor, *targets: torch.Tensor) -> Sequence[torch.Tensor]:
        """The batch on the device (asynchronous copies; channels-last images when the run uses it)."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x, *(t.to(self.device, non_blocking=True) for t in targets))

    def autocast(self):
        return self.precision.autocast()

    @contextlib.contextmanager
    def micro_batch(self, sync: bool) -> Iterator[None]:
        """Forward and backward of one micro-batch: DDP's ``no_sync`` unless ``sync`` (the last micro-batch of
        an optimizer step), and an out-of-memory error turned into advice that keeps the effective batch."""
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        no_sync = self.model.no_sync() if (ddp and not sync) else contextlib.nullcontext()
        with oom_advice(self.layout, 'training'), no_sync:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss / accumulation`` (gradients add up to the mean over the effective batch)."""
        self.precision.backward(loss / self.layout.accumulation)

    def optimizer_step(self, loss: float, *, epoch: int, batch: int) -> float:
        """Unscale, clip, check, step, EMA (see the module doc); returns the gradient norm (NaN: skipped).

        ``epoch`` (0-based) is the epoch (or pass over the data) and ``batch`` the micro-batch within it:
        they date a non-finite value in the message and gate the EMA's start."""
        self.precision.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        # fp16: an infinite gradient is the scaler's business (it skips the step and lowers the scale)
        what = nonfinite_what(loss, norm if self.precision.scaler is None else 0.0)
        if what is not None:
            self._non_finite(what, epoch, batch)
            return float('nan')
        self.nonfinite_in_a_row = 0
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.meters.add_grad_norm(norm)
        if self.ema is not None:
            self.ema.update(self.module, epoch)
        return float(norm)

    def _non_finite(self, what: str, epoch: int, batch: int) -> None:
        """The policy at a non-finite loss / gradient norm: skip the step, or raise ``NonFiniteError``."""
        at = where(epoch, batch, self.global_step)
        policy = self.nonfinite
        self.nonfinite_in_a_row += 1
        if policy.action == 'skip' and self.nonfinite_in_a_row <= policy.limit:
            self.precision.skip(self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            self.skipped_steps += 1
            if self.log is not None:
                self.log(f'warning: non-finite {what} at {at}; step skipped ({self.nonfinite_in_a_row} in a row, '
                         f'the run stops after {policy.limit}: nonfinite_limit)')
            return
        self.optimizer.zero_grad(set_to_none=True)
        head = f'non-finite {what} at {at}; the step was skipped and no checkpoint holds these values.'
        if policy.action == 'skip':
            head = (f'non-finite {what} at {at}, {self.nonfinite_in_a_row} optimizer steps in a row (more than '
                    f'nonfinite_limit={policy.limit}); the run stopped and no checkpoint holds these values.')
        raise NonFiniteError(f'{head} {self.resume_hint()}'.rstrip(), rollback=policy.action == 'rollback')
