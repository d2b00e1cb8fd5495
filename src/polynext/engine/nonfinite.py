"""Catching non-finite losses and gradients (polynomial networks can overflow).

The trainer calls ``check_step(loss, grad_norm, ...)`` before every optimizer step. The
gradient norm is computed on the all-reduced gradient, so under DDP every rank sees the
same value and all ranks stop together. The step is skipped (the weights keep their last
finite values) and ``NonFiniteError`` names the step and the command that resumes from the
last good checkpoint. ``assert_finite_state`` guards every checkpoint write, so NaN or
infinite weights are never saved.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from ..errors import PolyNeXtError

__all__ = ['NonFiniteError', 'check_step', 'assert_finite_state', 'first_nonfinite']


class NonFiniteError(PolyNeXtError, FloatingPointError):
    """The loss or the gradient became NaN / infinite."""


def _as_float(x) -> float:
    return float(x.detach().float().item()) if torch.is_tensor(x) else float(x)


def check_step(loss, grad_norm, *, epoch: int, step: int, global_step: int, resume_hint: str = '') -> None:
    """Raise ``NonFiniteError`` if ``loss`` or ``grad_norm`` is NaN or infinite.

    ``step`` is the micro-batch index within ``epoch`` (0-based), ``global_step`` the number of
    optimizer steps taken so far. ``resume_hint`` is appended (e.g. the resume command).
    """
    loss_v = _as_float(loss)
    norm_v = _as_float(grad_norm) if grad_norm is not None else 0.0
    if math.isfinite(loss_v) and math.isfinite(norm_v):
        return
    what = f'loss {loss_v}' if not math.isfinite(loss_v) else f'gradient norm {norm_v} (loss {loss_v:.4g})'
    raise NonFiniteError(
        f'non-finite {what} at epoch {epoch} batch {step} (optimizer step {global_step + 1}); the step was '
        f'skipped and no checkpoint was written with these values. {resume_hint}'.rstrip())


def first_nonfinite(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Name of the first floating tensor holding a NaN / inf value, or ``None``."""
    for k, v in state_dict.items():
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    return None


def assert_finite_state(state_dict: Mapping[str, torch.Tensor], what: str = 'weights') -> None:
    """Refuse to save ``state_dict`` if any tensor is not finite."""
    bad = first_nonfinite(state_dict)
    if bad is not None:
        raise NonFiniteError(f"refusing to save {what}: tensor '{bad}' holds NaN or infinite values")
