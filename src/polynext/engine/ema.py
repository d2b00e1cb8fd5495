"""Exponential moving average of the weights (timm ``ModelEmaV3``), with the references' start rules.

    ema ← decay · ema + (1 − decay) · weights          (parameters and floating buffers)

``EmaTracker(model, decay, start_epoch, init)`` updates once per optimizer step from
``start_epoch`` (0-based) on. ``init='first_update'`` makes the first update a copy of the weights
(``torch.optim.swa_utils.AveragedModel``, which the PolyNeXt scripts use from epoch 200);
``init='model'`` averages from the copy taken at creation (timm's ``--model-ema``, the MetaFormer
fine-tuning recipes). ``updates`` counts the updates; it is saved with the training state and
tells whether the EMA has started.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch.nn as nn

__all__ = ['EmaTracker', 'EMA_INITS']

EMA_INITS = ('first_update', 'model')


class EmaTracker:
    """An EMA of ``model`` with a start epoch and an update counter."""

    def __init__(self, model: nn.Module, decay: float, start_epoch: int = 0, init: str = 'first_update'):
        if init not in EMA_INITS:
            raise ValueError(f'init must be one of {EMA_INITS}, got {init!r}')
        from timm.utils import ModelEmaV3
        self.ema = ModelEmaV3(model, decay=decay)
        self.start_epoch = start_epoch
        self.init = init
        self.updates = 0

    @property
    def module(self) -> nn.Module:
        """The averaged model (evaluate it, save its ``state_dict()``)."""
        return self.ema.module

    @property
    def started(self) -> bool:
        return self.updates > 0

    def update(self, model: nn.Module, epoch: int) -> None:
        """One update after an optimizer step of (0-based) ``epoch``; nothing before ``start_epoch``."""
        if epoch < self.start_epoch:
            return
        if self.init == 'first_update' and self.updates == 0:
            self.ema.set(model)
        else:
            self.ema.update(model)
        self.updates += 1

    def restore(self, weights: Optional[Dict[str, Any]], updates: int, model: nn.Module) -> None:
        """Back to a saved state; without saved weights (an EMA turned on at resumption) start from ``model``."""
        from ..checkpoint import load_state_dict_strict
        if weights is not None:
            load_state_dict_strict(self.module, weights)
        else:
            self.ema.set(model)
        self.updates = int(updates)
