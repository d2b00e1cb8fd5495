"""PolyConv's depthwise core at CPU inference in one pass over memory, by a C kernel.

    y = DW_out( DW_coarse(u) ⊙ flip_c(DW_fine(u)) )

Between its two pointwise convolutions PolyConv runs three depthwise convolutions and a product with a channel
reversal. PyTorch's path (oneDNN) makes that four passes over a tensor that does not fit in the caches at batch
32: the fine convolution, the reversed copy of its output, the coarse convolution with the product as its post-op
(``ops.fused.conv_mul``) and the output convolution, each at a memory-bound 8-12 GMAC/s on a 2-core AMD EPYC
(Zen 4), where the machine's FMA rate is about 90. In a cpolynext_t inference step that was 19 % of the time
(the depthwise class in ``polynext profile``) and the reversal 2.5 % more. No library fuses a chain of depthwise
convolutions, let alone one with a channel reversal in the middle, so the kernel (``polynext_polyconv_dw_*`` in
``csrc/cpu_kernels.c``, 9.) is written by hand: u's rows are read once, in order, into small zero-padded rings of
16 channels (the mirrored channels reversed as they are loaded), the product's rows go into another ring, and y's
rows are written once, every sum in registers.

Where: eager CPU inference (``ops.fused.eager_cpu_inference``: no autograd recording, not compiling / exporting /
tracing), channels-last float32 or bfloat16 activations (not float32 under CPU autocast, where PyTorch's path
would compute in bfloat16), PolyConv's geometry (odd k x k coarse kernel up to 9, dilation d, "same" padding;
3 x 3 fine and output kernels; stride 1, no bias), a CPU with AVX-512 or AVX2 (blocks of 8 channels), the kernels on
(``ops.cpu_kernels.kernels``, and ``ops.cpu_kernels.fused_polyconv`` for this kernel alone), at most
``MAX_CHANNELS`` channels. Elsewhere callers
take the separate operations. float32 results match PyTorch's (the taps are summed in oneDNN's order: logits
equal bit for bit in ``benchmarks/polyconv_dw.py``'s whole-model runs; the tests allow float32 rounding), bfloat16 ones are rounded once where PyTorch's path rounds after each operation (closer to
float32). Registered as ``polynext::polyconv_dw`` for the profiler (a depthwise convolution there, with the
three convolutions' MACs).

With AVX2 (no AVX-512) the same kernel runs blocks of 8 channels (``csrc/cpu_kernels.c``'s vector layer): on a 2-core
AMD EPYC Zen 3 x1.92-1.99 over PyTorch's path at 56x56-14x14, x1.19 at 7x7, the whole cpolynext_s x1.19
(``benchmarks/results/polyconv_dw_zen3.json``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .constants import derived
from .cpu_kernels import check_status, fused_polyconv, kernel_available, kernel_fn, library, profiling
from .fused import eager_cpu_inference

__all__ = ['polyconv_dw', 'polyconv_dw_applies', 'same_depthwise', 'depthwise_taps']

_DTYPES = (torch.float32, torch.bfloat16)
#: the kernel's limit (C > 1024 in the source: its per-block tables hold 64 blocks of 16 channels); PolyNeXt's
#: widest PolyConv (CPolyNeXt-L's last stage) is well below it, wider ones take PyTorch's path
MAX_CHANNELS = 1024


def same_depthwise(conv: nn.Conv2d, channels: int, kernel: int = 0, dilation: int = 1) -> bool:
    """A bias-free, stride-1, "same"-padded depthwise convolution on ``channels`` channels with a square odd
    kernel (of size ``kernel`` where given, up to 9) and dilation ``dilation``."""
    k = conv.kernel_size[0]
    return (conv.groups == conv.in_channels == conv.out_channels == channels and conv.bias is None
            and conv.kernel_size == (k, k) and k % 2 == 1 and k <= 9 and (not kernel or k == kernel)
            and conv.stride == (1, 1) and conv.dilation == (dilation, dilation) and conv.padding_mode == 'zeros'
            and conv.padding == (dilation * (k - 1) // 2,) * 2)


def polyconv_dw_applies(u: torch.Tensor, coarse: nn.Conv2d, fine: nn.Conv2d, out: nn.Conv2d) -> bool:
    """Whether :func:`polyconv_dw` serves PolyConv's inner activation ``u`` and its three depthwise convolutions
    (module docstring)."""
    if not (fused_polyconv.on and u.dim() == 4 and u.dtype in _DTYPES
            and u.is_contiguous(memory_format=torch.channels_last) and eager_cpu_inference(u)):
        return False
    if u.dtype == torch.float32 and torch.is_autocast_enabled('cpu'):
        return False
    c = u.shape[1]
    if c > MAX_CHANNELS:
        return False
    convs = (coarse, fine, out)
    if not (same_depthwise(coarse, c, dilation=coarse.dilation[0]) and same_depthwise(fine, c, 3)
            and same_depthwise(out, c, 3)):
        return False
    if any(m.weight.device != u.device or m.weight.dtype not in (torch.float32, u.dtype)
           or (torch.is_grad_enabled() and m.weight.requires_grad) for m in convs):
        return False
    return kernel_available() and library().polyconv_dw


def depthwise_taps(weight: torch.Tensor) -> torch.Tensor:
    """A depthwise weight (C, 1, k, k) as the kernel reads it: float32, tap-major (k*k, C); kept while the weight is
    unchanged (``ops.constants``)."""
    return derived('taps', (weight,), lambda: weight.reshape(weight.shape[0], -1).t().float().contiguous())


def _polyconv_dw(u: torch.Tensor, wc: torch.Tensor, wf: torch.Tensor, wo: torch.Tensor, dilation: int) -> torch.Tensor:
    n, c, h, w = u.shape
    k = round(wc.shape[0] ** 0.5)
    y = torch.empty_like(u)
    status = kernel_fn('polyconv_dw', u)(u.data_ptr(), wc.data_ptr(), wf.data_ptr(), wo.data_ptr(), y.data_ptr(),
                                         n, h, w, c, k, dilation, torch.get_num_threads())
    check_status('polyconv_dw', status, "a thread's row rings",
                 f'a {k}x{k} coarse kernel with dilation {dilation} on {c} channels', 'polyconv_dw_applies')
    return y


_LIB = torch.library.Library('polynext', 'FRAGMENT')
_LIB.define('polyconv_dw(Tensor u, Tensor coarse_taps, Tensor fine_taps, Tensor out_taps, int dilation) -> Tensor')
_LIB.impl('polyconv_dw', _polyconv_dw, 'CPU')


def polyconv_dw(u: torch.Tensor, coarse: nn.Conv2d, fine: nn.Conv2d, out: nn.Conv2d) -> torch.Tensor:
    """``out(coarse(u) * fine(u).flip(1))`` in one kernel (a new channels-last tensor of u's shape and dtype).
    Check :func:`polyconv_dw_applies` first."""
    wc, wf, wo = depthwise_taps(coarse.weight), depthwise_taps(fine.weight), depthwise_taps(out.weight)
    if profiling():
        return torch.ops.polynext.polyconv_dw(u, wc, wf, wo, coarse.dilation[0])
    return _polyconv_dw(u, wc, wf, wo, coarse.dilation[0])
