"""PolyAttn's depthwise convolutions at CPU inference, read from and written into the attention's head layout.

    [qk, v] = W_qkv x;   Q = DW5x5_q(qk) · sigmoid(l_h),  K = DW5x5_k(qk),  V = DW3x3_v(v)   → (B, heads, N, d)
    O = attention(Q, K, V)                                                                  (B, heads, N, d)
    y = DW3x3_o(O)                                                                          → (B, A, H, W)

The convolutions work on channels-last maps and the attention on heads, (B, heads, N, d) with each head's d
channels contiguous per token. PyTorch's path converts between the two with copies: the attention makes Q, K and V
contiguous heads (three copies), multiplies Q by the head scale (one pass more), and its output goes back to
channels-last for the output convolution (one copy), while oneDNN's 5x5 depthwise kernels run at 15-18 GMAC/s on a
2-core AMD EPYC (Zen 4; ``polynext profile apolynext_s``, the ``conv2d 32x160x14x14`` rows). In a channels-last
map a head's d channels of a token are already contiguous, so a depthwise convolution can read one layout and write
the other at no cost: ``polynext_heads_dw_*`` (``csrc/cpu_kernels.c``, 14.) copies an image's 16 channels once
into a zero-padded plane in L1, computes every output from it with the sums in registers (the taps in oneDNN's
order), and writes them straight into the other layout; Q and K, both convolutions of ``qk``, come from one plane.
The head scale is folded into Q's weights (exact in real arithmetic; float32 rounding), and the Q/K/V projection
is one 1x1 convolution whose output the kernel reads at its channel offsets (``ops.pointwise.split_pointwise``
is not needed). No library offers a convolution between two layouts; this is written by hand for that.

Where: eager CPU inference (``ops.fused.eager_cpu_inference``), channels-last float32 or bfloat16 activations (not
float32 under CPU autocast), a head dimension and attention width that are multiples of 16, bias-free stride-1
"same" depthwise convolutions with odd square kernels up to 9, a CPU with AVX-512 or AVX2, the kernels on
(``ops.cpu_kernels.kernels``, and ``ops.cpu_kernels.heads_convs`` for these alone). Elsewhere the model takes
PyTorch's path. Registered as ``polynext::attention_convs`` and ``polynext::heads_conv`` for the profiler
(depthwise convolutions there, with their MACs).
"""
from __future__ import annotations

import ctypes
from typing import Sequence, Tuple

import torch
import torch.nn as nn

from .constants import derived
from .cpu_kernels import check_status, heads_convs, kernel_available, kernel_fn, library, profiling
from .fused import eager_cpu_inference
from .polyconv_dw import depthwise_taps, same_depthwise

__all__ = ['attention_convs_applies', 'attention_convs', 'heads_conv', 'scaled_taps']

_DTYPES = (torch.float32, torch.bfloat16)


def attention_convs_applies(x: torch.Tensor, attn_dim: int, head_dim: int, convs: Sequence[nn.Conv2d]) -> bool:
    """Whether the kernel serves a PolyAttn whose Q/K/V projection takes ``x``, with attention width ``attn_dim``,
    head dimension ``head_dim`` and its depthwise convolutions ``convs`` (module docstring)."""
    if not (heads_convs.on and x.dim() == 4 and x.dtype in _DTYPES and attn_dim % 16 == 0 and head_dim % 16 == 0
            and x.is_contiguous(memory_format=torch.channels_last) and eager_cpu_inference(x)):
        return False
    if x.dtype == torch.float32 and torch.is_autocast_enabled('cpu'):
        return False
    if not all(same_depthwise(m, attn_dim) for m in convs):
        return False
    if any(m.weight.device != x.device or m.weight.dtype not in (torch.float32, x.dtype)
           or (torch.is_grad_enabled() and m.weight.requires_grad) for m in convs):
        return False
    return kernel_available() and library().heads_dw


def scaled_taps(weight: torch.Tensor, head_scale: torch.Tensor) -> torch.Tensor:
    """Q's depthwise weight (A, 1, k, k) times its head's scale (``heads`` values, each for ``A / heads``
    consecutive channels), as the kernel reads it (:func:`ops.polyconv_dw.depthwise_taps`); kept while the weight and
    the scale's values are unchanged (``ops.constants``)."""
    s = head_scale.detach().float().reshape(-1)

    def make() -> torch.Tensor:
        w = weight.float() * s.repeat_interleave(weight.shape[0] // s.numel()).view(-1, 1, 1, 1)
        return w.reshape(w.shape[0], -1).t().contiguous()
    return derived('scaled_taps', (weight,), make, values=(s,))


def _layout(*strides: int):
    return (ctypes.c_int64 * 4)(*strides)


def _run(x: torch.Tensor, offset: int, x_layout, taps: Sequence[torch.Tensor], outs: Sequence[torch.Tensor],
         y_layout, n: int, h: int, w: int, c: int) -> None:
    k = round(taps[0].shape[0] ** 0.5)
    ptr = x.data_ptr() + offset * x.element_size()
    w2, y2 = (taps[1].data_ptr(), outs[1].data_ptr()) if len(taps) > 1 else (None, None)
    status = kernel_fn('heads_dw', x)(ptr, x_layout, taps[0].data_ptr(), outs[0].data_ptr(), w2, y2, y_layout,
                                      n, h, w, c, k, torch.get_num_threads())
    check_status('attention_convs', status, "a thread's plane", f'a {k}x{k} depthwise convolution on {c} channels',
                 'attention_convs_applies')


def _attention_convs(qkv: torch.Tensor, q_taps: torch.Tensor, k_taps: torch.Tensor, v_taps: torch.Tensor,
                     heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, c2, h, w = qkv.shape
    a, hw = c2 // 2, h * w
    d = a // heads
    q, k, v = (qkv.new_empty(b, heads, hw, d) for _ in range(3))
    src, dst = _layout(hw * c2, c2, 0, a), _layout(heads * hw * d, d, hw * d, d)
    _run(qkv, 0, src, (q_taps, k_taps), (q, k), dst, b, h, w, a)   # Q and K: one plane of qk
    _run(qkv, a, src, (v_taps,), (v,), dst, b, h, w, a)
    return q, k, v


def _heads_conv(o: torch.Tensor, taps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, heads, hw, d = o.shape
    a = heads * d
    y = torch.empty(b, a, height, width, dtype=o.dtype, memory_format=torch.channels_last)
    _run(o, 0, _layout(heads * hw * d, d, hw * d, d), (taps,), (y,), _layout(hw * a, a, 0, a), b, height, width, a)
    return y


_LIB = torch.library.Library('polynext', 'FRAGMENT')
_LIB.define('attention_convs(Tensor qkv, Tensor q_taps, Tensor k_taps, Tensor v_taps, int heads) '
            '-> (Tensor, Tensor, Tensor)')
_LIB.impl('attention_convs', _attention_convs, 'CPU')
_LIB.define('heads_conv(Tensor o, Tensor taps, int height, int width) -> Tensor')
_LIB.impl('heads_conv', _heads_conv, 'CPU')


def attention_convs(qkv: torch.Tensor, q_taps: torch.Tensor, k_taps: torch.Tensor, v_taps: torch.Tensor,
                    heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K and V as contiguous (B, heads, H W, d) tensors from the channels-last projection ``qkv`` (B, 2A, H, W):
    Q and K the depthwise convolutions of its first A channels by ``q_taps`` and ``k_taps``, V of the rest by
    ``v_taps`` (each float32 (k*k, A), :func:`ops.polyconv_dw.depthwise_taps`; Q's head scale folded in,
    :func:`scaled_taps`). Check :func:`attention_convs_applies` first."""
    qkv = qkv.contiguous(memory_format=torch.channels_last)
    if profiling():
        return torch.ops.polynext.attention_convs(qkv, q_taps, k_taps, v_taps, heads)
    return _attention_convs(qkv, q_taps, k_taps, v_taps, heads)


def heads_conv(o: torch.Tensor, taps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The depthwise convolution by ``taps`` (float32 (k*k, A)) of the attention's output ``o`` (B, heads, H W, d),
    as a channels-last (B, A, H, W) tensor. Check :func:`attention_convs_applies` first."""
    o = o.contiguous()
    if profiling():
        return torch.ops.polynext.heads_conv(o, taps, height, width)
    return _heads_conv(o, taps, height, width)
