"""Parameter and MAC counting, the way both papers count.

MACs = ``torch.utils.flop_counter.FlopCounterMode`` FLOPs / 2 for one image in eval mode. The
counter sees convolutions, (add)mm and bmm; norms, activations, pooling and elementwise
products are not counted (as in the papers, which used fvcore / ptflops). timm's fused
attention (SDPA) is invisible to the counter on CPU, so it is switched off while counting.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_params', 'count_macs', 'unfused_attention']


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily turn off timm's fused attention so its matmuls are visible to counters."""
    changed = []
    for m in model.modules():
        if getattr(m, 'fused_attn', False) is True:
            changed.append(m)
            m.fused_attn = False
    try:
        yield
    finally:
        for m in changed:
            m.fused_attn = True


def _input_size(model: nn.Module, input_size: Optional[Union[int, Sequence[int]]]) -> Tuple[int, int, int]:
    if input_size is None:
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        return tuple(cfg.get('input_size', (3, 224, 224)))
    if isinstance(input_size, int):
        return (3, input_size, input_size)
    if len(input_size) == 2:
        return (3,) + tuple(input_size)
    return tuple(input_size)


def count_macs(model: nn.Module, input_size: Optional[Union[int, Sequence[int]]] = None,
               by_op: bool = False) -> Union[float, Tuple[float, Dict[str, float]]]:
    """MACs for one image (batch 1, eval mode). ``input_size``: int, (H, W) or (C, H, W);
    default: the model's ``pretrained_cfg['input_size']``."""
    size = _input_size(model, input_size)
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), unfused_attention(model), counter:
            model(torch.zeros((1,) + size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    total = counter.get_total_flops() / 2
    if not by_op:
        return total
    ops = {str(k).replace('aten.', ''): v / 2 for k, v in counter.get_flop_counts().get('Global', {}).items()}
    return total, ops
