"""Inference constants derived from a model's parameters, computed once and kept while the parameters are unchanged.

At eager CPU inference polynext's kernels read weights in their own layouts (``ops.narrow_pointwise``: a 1x1
weight packed per tile of outputs; ``ops.polyconv_dw`` / ``ops.attention_convs``: depthwise taps), and the models
scale a projection's weight by its residual gate (Sigmoid-Scale, folded into the weight). Redone on every forward,
that is a pass over every 1x1 weight per layer: in a cpolynext_s inference step on a 2-core AMD EPYC (Zen 4), batch
32, about 2 % of the time in fp32 and 3 % in bf16 (``polynext profile``'s ``contiguous`` rows on the packed weights,
the ``mul`` rows on the gated ones). PyTorch has no such cache for eager modules (``torch.jit.freeze`` and
inductor's constant folding need a compiled graph), so it is kept here.

:func:`derived` keeps ``make()``'s value per (purpose, source tensors), for sources that are a model's own
parameters (``nn.Parameter``: the models' weights, the folded model's constants) or values it returned itself, and
small tensors compared by value (a gate, computed afresh each forward). Every use checks that each source is the same
live object with the same storage and version counter, which every in-place change through PyTorch advances
(``load_state_dict``, ``copy_`` under ``no_grad``, ``model.to(...)``, ``param.data = ...``), and that no optimizer has
stepped since (a step of any ``torch.optim`` optimizer, through its global post-step hook: the fused AdamW kernel
writes the parameters without advancing their version counters); an entry goes when its parameter does. Not seen:
writes through ``param.data`` (a tensor PyTorch does not version), and the parameters of a model built under
``inference_mode`` (they have no version counter; those values are not kept). After such writes call
:func:`clear`. Only the inference paths use it (the callers run it where autograd records nothing);
``keep(False)`` turns it off for A/B runs.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .fused import Switch

__all__ = ['derived', 'clear', 'keep', 'scaled_weight']

#: derived values kept (on) or recomputed on every use (off): ``with keep(False): ...`` (A/B runs)
keep = Switch()

#: (purpose, source ids) → (source states, weak references to the sources, compared values, the value)
_TABLE: Dict[tuple, tuple] = {}

#: optimizer steps taken in this process (any ``torch.optim`` optimizer): a kept value is valid for one count only
_steps = [0]


def _stepped(optimizer, args, kwargs) -> None:
    _steps[0] += 1


register_optimizer_step_post_hook(_stepped)


def _ours(t: torch.Tensor) -> bool:
    return getattr(t, '_polynext_derived', False)


def _keepable(t: torch.Tensor) -> bool:
    return _ours(t) or (isinstance(t, nn.Parameter) and not t.is_inference())


def _state(t: torch.Tensor) -> Tuple[int, int]:
    # (a value of ours is never written after it is made: its identity is its state)
    return t.data_ptr(), 0 if _ours(t) else t._version


def derived(purpose: str, sources: Sequence[torch.Tensor], make: Callable[[], torch.Tensor],
            values: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """``make()``, kept for later calls with the same ``purpose``, the same unchanged ``sources`` and equal
    ``values`` (module docstring); computed afresh where a source is not keepable or :data:`keep` is off."""
    if not (keep.on and all(_keepable(t) for t in sources)):
        return make()
    key = (purpose,) + tuple(id(t) for t in sources)
    state = (_steps[0],) + tuple(_state(t) for t in sources)
    hit = _TABLE.get(key)
    if (hit is not None and hit[0] == state and all(r() is t for r, t in zip(hit[1], sources))
            and all(torch.equal(a, b) for a, b in zip(hit[2], values))):
        return hit[3]
    with torch.no_grad():   # a constant: no autograd graph (which would also keep its sources alive)
        value = make()
        if any(value.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in sources):
            value = value.clone()   # (a view of a source would change with it)
    value._polynext_derived = True
    if hit is None:   # the entry goes with the first of its sources to go
        for t in sources:
            weakref.finalize(t, _TABLE.pop, key, None)
    _TABLE[key] = (state, tuple(weakref.ref(t) for t in sources), tuple(v.detach().clone() for v in values), value)
    return value


def clear() -> None:
    """Forget every kept value (after writing parameters through ``param.data``)."""
    _TABLE.clear()


def scaled_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A convolution's weight times a scale per output channel (or one for all), e.g. a residual gate folded into the
    projection before it: kept while the weight and the scale's values are unchanged."""
    return derived('scaled', (weight,), lambda: weight * scale.reshape(-1, *(1,) * (weight.dim() - 1)),
                   values=(scale,))
