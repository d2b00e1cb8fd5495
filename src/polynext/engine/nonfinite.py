"""Catching non-finite losses and gradients (polynomial networks can overflow), and what to do then.

The trainer calls ``check_step(loss, grad_norm, ...)`` before every optimizer step. The
gradient norm is computed on the all-reduced gradient, so under DDP every rank sees the
same value and all ranks act together. The step is never taken with these values (the
weights keep their last finite values); what happens next is the run's ``on_nonfinite``
policy (``NonFinitePolicy``), as large-scale trainers do:

* ``stop`` (default): ``NonFiniteError`` names the step and a command that resumes from the
  last good checkpoint with a lower learning rate (``--resume RUN --set lr=...``);
* ``skip``: the step is skipped and training goes on; more than ``nonfinite_limit`` non-finite
  steps in a row stop the run as ``stop`` does;
* ``rollback``: the run goes back to its last good checkpoint (``last.state.pt``; the start when
  none was written yet) with the learning rate multiplied by ``rollback_lr_factor``, at most
  ``nonfinite_limit`` times per run (``engine.run.launch`` does it, with the resume machinery).

``assert_finite_state`` guards every checkpoint write, so NaN or infinite weights are never saved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from ..errors import ConfigError, PolyNeXtError

__all__ = ['NonFiniteError', 'NonFinitePolicy', 'NONFINITE_POLICIES', 'check_step', 'nonfinite_what',
           'assert_finite_state', 'first_nonfinite']

NONFINITE_POLICIES = ('stop', 'skip', 'rollback')


class NonFiniteError(PolyNeXtError, FloatingPointError):
    """The loss or the gradient became NaN / infinite (``rollback``: the run may go back and retry)."""

    def __init__(self, message: str, rollback: bool = False):
        super().__init__(message)
        self.rollback = rollback


@dataclass(frozen=True)
class NonFinitePolicy:
    """What a run does at a non-finite loss or gradient (see the module doc)."""
    action: str = 'stop'
    limit: int = 3                  # skip: non-finite steps in a row; rollback: rollbacks per run
    lr_factor: float = 0.5          # rollback: lr multiplier per rollback

    @classmethod
    def of(cls, cfg: Any) -> 'NonFinitePolicy':
        """The policy of a task config (fields ``on_nonfinite``, ``nonfinite_limit``, ``rollback_lr_factor``)."""
        return cls(getattr(cfg, 'on_nonfinite', 'stop'), getattr(cfg, 'nonfinite_limit', 3),
                   getattr(cfg, 'rollback_lr_factor', 0.5))

    @staticmethod
    def check_config(cfg: Any) -> None:
        """``ConfigError`` for a bad ``on_nonfinite`` / ``nonfinite_limit`` / ``rollback_lr_factor``."""
        if cfg.on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"bad value for 'on_nonfinite': {cfg.on_nonfinite!r}; choose one of "
                              f"{', '.join(NONFINITE_POLICIES)}")
        if cfg.nonfinite_limit < 0:
            raise ConfigError(f"bad value for 'nonfinite_limit': {cfg.nonfinite_limit}; it must be >= 0")
        if not 0.0 < cfg.rollback_lr_factor < 1.0:
            raise ConfigError(f"bad value for 'rollback_lr_factor': {cfg.rollback_lr_factor}; it must be between 0 "
                              f"and 1 (the lr is multiplied by it at each rollback)")


def _as_float(x) -> float:
    return float(x.detach().float().item()) if torch.is_tensor(x) else float(x)


def nonfinite_what(loss, grad_norm) -> Optional[str]:
    """``None`` when ``loss`` and ``grad_norm`` are finite, else what is not (``'loss nan'``, ...)."""
    loss_v = _as_float(loss)
    norm_v = _as_float(grad_norm) if grad_norm is not None else 0.0
    if math.isfinite(loss_v) and math.isfinite(norm_v):
        return None
    return f'loss {loss_v}' if not math.isfinite(loss_v) else f'gradient norm {norm_v} (loss {loss_v:.4g})'


def where(epoch: int, batch: int, global_step: int) -> str:
    """'optimizer step 3 (epoch 1, batch 3)': every count 1-based, as a user counts."""
    return f'optimizer step {global_step + 1} (epoch {epoch + 1}, batch {batch + 1})'


def check_step(loss, grad_norm, *, epoch: int, step: int, global_step: int, resume_hint: str = '') -> None:
    """Raise ``NonFiniteError`` if ``loss`` or ``grad_norm`` is NaN or infinite.

    ``epoch`` (the pass over the data) and ``step`` (the micro-batch within it) are 0-based
    counters, ``global_step`` the number of optimizer steps taken so far; the message counts
    from 1. ``resume_hint`` is appended (the command that recovers)."""
    what = nonfinite_what(loss, grad_norm)
    if what is None:
        return
    raise NonFiniteError(
        f'non-finite {what} at {where(epoch, step, global_step)}; the step was skipped and no checkpoint holds '
        f'these values. {resume_hint}'.rstrip())


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
