"""PolyConv's product of its coarse branch with its channel-reversed fine branch, in one pass each way on the CPU.

    y = a ⊙ flip_c(b),   i.e.  y[:, c] = a[:, c] · b[:, C−1−c]

    dL/da = g ⊙ flip_c(b),   dL/db = flip_c(g ⊙ a)

PyTorch writes ``b.flip(1)`` first and multiplies (three passes over the activation and two writes where one
pass reads two tensors and writes one), and its backward multiplies twice and reverses one product (five tensors
written where two are needed); in a CPolyNeXt-T training step on a 2-core AMD EPYC (Zen 4) the products'
backward alone at the 56x56 and 28x28 maps took 48 ms of 2.5 s (``polynext profile``,
``benchmarks/results/profile_t_train_kernels_0_zen4.json``). Forward + backward, the kernels ran x1.16-1.54 faster
in float32 and x1.57-1.83 in bfloat16 at cpolynext_t's shapes (``benchmarks/cpu_kernels.py --mode train``). The kernels of
``ops.cpu_kernels`` (``polynext_flip_mul_*``) read a row of each operand once, in reverse where the flip asks,
and write each result once.

Where: eager CPU work (``ops.fused.eager_cpu``), training and inference, channels-last float32 or bfloat16
activations of at least ``MIN_NUMEL`` values, the kernels on. At CPU inference PolyConv normally takes the
oneDNN post-op product instead (``ops.fused.conv_mul``: the product written by the coarse convolution itself),
so this serves training and the inference that cannot fuse. Everywhere else (``torch.compile``, export, CUDA,
NCHW tensors, float64) it is ``a * b.flip(1)``. Values are bit-identical to that expression (one float32 product,
one rounding in bfloat16), gradients too (tested). Registered as ``polynext::flip_mul`` and
``polynext::flip_mul_backward`` for the profiler.
"""
from __future__ import annotations

import torch

from .cpu_kernels import kernel_available, kernel_fn, profiling
from .fused import eager_cpu

__all__ = ['flip_product']

#: a call costs a few microseconds of Python and ctypes: forward + backward broke even at 16,000-31,000 values and
#: won x1.2-1.8 from 65,000 (fp32 and bf16, a throwaway timing on a 2-core Zen 4), so this keeps a margin; the same
#: size as ``ops.channel_norm.MIN_NUMEL``
MIN_NUMEL = 65536
_DTYPES = (torch.float32, torch.bfloat16)


def _rows(t: torch.Tensor):
    c = t.shape[1]
    return t.numel() // c, c


def _flip_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(a)
    kernel_fn('flip_mul', a)(a.data_ptr(), b.data_ptr(), y.data_ptr(), *_rows(a), torch.get_num_threads())
    return y


def _flip_mul_backward(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    da, db = torch.empty_like(a), torch.empty_like(b)
    kernel_fn('flip_mul_backward', a)(g.data_ptr(), a.data_ptr(), b.data_ptr(), da.data_ptr(), db.data_ptr(),
                                      *_rows(a), torch.get_num_threads())
    return da, db


_LIB = torch.library.Library('polynext', 'FRAGMENT')
_LIB.define('flip_mul(Tensor a, Tensor b) -> Tensor')
_LIB.define('flip_mul_backward(Tensor grad, Tensor a, Tensor b) -> (Tensor, Tensor)')
_LIB.impl('flip_mul', _flip_mul, 'CPU')
_LIB.impl('flip_mul_backward', _flip_mul_backward, 'CPU')


class _FlipProductFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return torch.ops.polynext.flip_mul(a, b) if profiling() else _flip_mul(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        if profiling():
            return torch.ops.polynext.flip_mul_backward(grad, a, b)
        return _flip_mul_backward(grad, a, b)


def _applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dim() == 4 and a.shape == b.shape and a.dtype in _DTYPES and a.numel() >= MIN_NUMEL
            and a.is_contiguous(memory_format=torch.channels_last) and b.is_contiguous(memory_format=torch.channels_last)
            and eager_cpu(a, b) and kernel_available())


def flip_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b.flip(1)`` for NCHW tensors of one shape: by the kernels where they apply (module docstring)."""
    if _applies(a, b):
        return _FlipProductFunction.apply(a, b)
    return a * b.flip(1)
