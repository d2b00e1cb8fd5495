"""Sliding-window attention for dense prediction: ``set_attention_window(model, windows)``.

At detection resolution (800x1333) the stride-16 stage has about 4,200 tokens, and global
softmax attention over them keeps a 4200² score matrix per head and layer. MetaFormer Table 9
ran CAFormer's attention "in sliding window" there (Longformer / Neighborhood Attention,
``polynext.ops.window_attention``); APolyNeXt needs no window (its chunked polynomial kernel
keeps memory linear in the tokens), but gets the same option for the comparison.

``windows`` has one entry per attention stage, in stage order (CAFormer: stages 3 and 4;
APolyNeXt: its attention stages); 0 keeps that stage global. A single int applies to every
attention stage. The weights do not change (same modules, same parameter names), so a
classification checkpoint loads as before, and ``windows=()`` restores global attention.

Supported: polynext's ``PolyAttn`` (PolyNeXt models) and timm's MetaFormer ``Attention``
(CAFormer), whose stage flattens the map to (B, N, C): that stage is given a forward that tells
its attention layers the grid size (``WindowedMetaFormerStage``; no new state).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models.metaformer import Attention as MetaFormerAttention
from timm.models.metaformer import MetaFormerStage
from timm.models._manipulate import checkpoint_seq

from ..errors import ConfigError
from ..ops.window_attention import neighborhood_attention, neighborhood_macs
from .polynext import PolyAttn

__all__ = ['set_attention_window', 'attention_stages', 'WindowedAttention', 'WindowedMetaFormerStage',
           'window_attention_macs']


class WindowedAttention(MetaFormerAttention):
    """timm's MetaFormer ``Attention`` (same parameters) over a sliding window of ``window`` tokens.

    ``window`` 0 / None: global attention (timm's forward). The grid size comes from the stage."""
    window: Optional[int] = None
    grid: Optional[Tuple[int, int]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.window or self.grid is None:
            return super().forward(x)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = neighborhood_attention(q, k, v, self.grid, self.window, 'softmax', scale=self.scale)
        x = x.transpose(1, 2).reshape(b, n, self.attention_dim)
        return self.proj_drop(self.proj(x))


class WindowedMetaFormerStage(MetaFormerStage):
    """timm's ``MetaFormerStage`` (attention stages flatten to (B, N, C)) that tells its windowed
    attention layers the grid size before running its blocks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        b, c, h, w = x.shape
        for block in self.blocks:
            if isinstance(block.token_mixer, WindowedAttention):
                block.token_mixer.grid = (h, w)
        x = x.reshape(b, c, -1).transpose(1, 2)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.transpose(1, 2).reshape(b, c, h, w)


def attention_stages(model: nn.Module) -> List[List[nn.Module]]:
    """The attention layers of ``model``, grouped by stage in forward order."""
    groups: List[List[nn.Module]] = []
    for module in model.modules():
        if isinstance(module, MetaFormerStage):
            found = [b.token_mixer for b in module.blocks if isinstance(b.token_mixer, MetaFormerAttention)]
            if found:
                groups.append(found)
        elif type(module).__name__ == 'PolyNeXtStage':
            found = [m for m in module.modules() if isinstance(m, PolyAttn)]
            if found:
                groups.append(found)
    return groups


def _windows(windows: Union[int, Sequence[int], None], stages: int) -> List[int]:
    if windows is None:
        return [0] * stages
    if isinstance(windows, int):
        return [windows] * stages
    windows = [int(w or 0) for w in windows]
    if not windows:
        return [0] * stages
    if len(windows) != stages:
        raise ConfigError(f'attn_window has {len(windows)} entries but the backbone has {stages} attention stage(s); '
                          f'give one window per attention stage (0 = global), or one number for all')
    return windows


def set_attention_window(model: nn.Module, windows: Union[int, Sequence[int], None]) -> int:
    """Switch the attention stages of ``model`` to sliding windows (0 = global); returns the number of
    windowed layers. A model without supported attention layers and a non-zero window is an error."""
    groups = attention_stages(model)
    if not groups:
        if any(_windows(windows, 1) if isinstance(windows, int) or windows is None else windows):
            raise ConfigError('attn_window is set but the backbone has no attention layer that polynext can window '
                              '(PolyNeXt PolyAttn, MetaFormer / CAFormer Attention); drop attn_window')
        return 0
    count = 0
    for layers, window in zip(groups, _windows(windows, len(groups))):
        if window < 0:
            raise ConfigError(f'attn_window entries must be >= 0 (0 = global), got {window}')
        for layer in layers:
            if isinstance(layer, PolyAttn):
                if layer.fully_polynomial and window:
                    raise ConfigError('the fully polynomial (bn) attention has per-position norms of one input size '
                                      'and cannot run in windows')
                layer.window = window or None
            else:
                if not isinstance(layer, WindowedAttention):
                    layer.__class__ = WindowedAttention
                layer.window = window or None
            count += bool(window)
    for module in model.modules():   # stages of windowed timm attention pass the grid size on
        if isinstance(module, MetaFormerStage) and not isinstance(module, WindowedMetaFormerStage) and any(
                isinstance(b.token_mixer, WindowedAttention) for b in module.blocks):
            module.__class__ = WindowedMetaFormerStage
    return count


def window_attention_macs(module: nn.Module, inputs, output) -> Optional[int]:
    """MACs of the attention core of a windowed layer (QKᵀ and AV over the windows), for counters."""
    if isinstance(module, WindowedAttention) and module.window and module.grid is not None:
        b = inputs[0].shape[0]
        return neighborhood_macs(b * module.num_heads, module.grid, module.window, module.head_dim)
    if isinstance(module, PolyAttn) and module.window:
        b, _, h, w = inputs[0].shape
        return neighborhood_macs(b * module.num_heads, (h, w), module.window, module.head_dim)
    return None
