"""LayerNorm over the channels of channels-last activations at CPU inference, by a small C kernel.

    y = (x - mean_c x) / sqrt(var_c x + eps) · w  (+ b)  (+ residual)

PolyNeXt normalises over channels at every block (``LayerNorm2d``: PolyConv's closing norm, PolyAttn's
pre-norm, the norm inside PolyMLP), on channels-last tensors whose NHWC view has one row of C values per
pixel. PyTorch's CPU ``layer_norm`` runs these short rows (72-768 values) slowly, in bfloat16 most of all:
4-16 GB/s on a 2-core AMD EPYC (Zen 4), where an elementwise product of the same tensor ran at 30-55 GB/s,
so in bf16 the norms took 17 % of a cpolynext_s inference step (``polynext profile``) and removing them
entirely would make it 1.20x faster. The kernel (``csrc/cpu_kernels.c``) reads each row once, keeps it in L1 for the
two-pass statistics (the variance as the mean squared deviation, as PyTorch), and writes it once; in
bfloat16 it computes in float32 and rounds once. It can also add the residual that follows PolyConv's norm
in the same pass, and write in place, and normalise the product of the two halves of a wider row (PolyMLP's
(W_a x) ⊙ (W_b x)), formed as it reads, so that the product is never written. Why by hand: no maintained library has a fast norm for rows this
short on the CPU (inductor's generated kernel reaches 9-20 GB/s in bf16 here; ``benchmarks/cpu_kernels.py``
measures all three).

The kernel is one of ``ops.cpu_kernels`` (compiled on first use with the system's C compiler into the
polynext cache folder, sharing torch's OpenMP threads). It applies where the oneDNN fusions of
``ops.fused`` apply (eager CPU inference, no autograd recording, not compiling / exporting / tracing,
channels-last, same dtype), in float32 and bfloat16, on tensors of at least ``MIN_NUMEL`` values, and can be
turned off with ``fusion(False)`` (every CPU inference fusion) or ``ops.cpu_kernels.kernels(False)`` (the
hand-written kernels). Everywhere else, and where there is no compiler (one warning), :func:`channel_layer_norm` is
``F.layer_norm`` on the NHWC view. Outputs equal ``F.layer_norm``'s within float32 rounding (2e-6 relative
in the tests), in bfloat16 within one rounding.

It is registered as the operator ``polynext::channel_norm`` (profiler, ``torch.compile`` see an operator
with shapes, not a foreign call).

In training in eager mode on the CPU (:func:`trains`: float32, and bfloat16 under autocast) the norm is an
autograd function with kernels both ways: the forward is the same pass and also stores each row's mean and 1/std (8 bytes a row), and the backward
reads a row of the output's gradient and of the input into L1 and writes the input's gradient once (with the
product of halves, the gradients of both halves), the weight's and bias's gradients summed from per-thread partial
sums. PyTorch's path there is the product, ``layer_norm`` and the addition forward, and ``layer_norm``'s backward
and the product's backward: five passes over the tensors for the kernels' two. Gradients equal float64 autograd's
as closely as PyTorch's (tested). In bfloat16 autocast training (CPU autocast runs ``layer_norm`` in the input's
dtype, bfloat16, with the float32 parameters) the kernels read and write bfloat16 and compute in float32; there
PyTorch's own backward gets the weight's gradient wrong by 3-25 % of its largest value at cpolynext_t's norm shapes
(more with more rows; against float64 on the same bf16 values; torch 2.14.1), the kernels' within 6e-6
(``benchmarks/cpu_kernels.py --mode train --dtype bf16``; tested).
"""
from __future__ import annotations

import ctypes
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .cpu_kernels import kernel_available, library, profiling
from .fused import eager_cpu, eager_cpu_inference

__all__ = ['channel_layer_norm', 'channel_norm_nchw', 'product_norm_nchw', 'applies']

_MAX_C = 4096            # the kernel's row buffer (MAX_C in the source)
_DTYPES = (torch.float32, torch.bfloat16)
_PARAMS = (torch.Tensor, torch.nn.Parameter)
#: smaller tensors stay with F.layer_norm: a call costs about 10 µs against its 4-6 µs (Python, ctypes, the
#: thread pool's wake-up), which the faster rows paid back from about 50,000 values (96 channels) to 110,000
#: (432 channels) on a 2-core Zen 4 (a throwaway timing)
MIN_NUMEL = 65536
#: in float32 training, a plain norm (no product of halves, no residual) takes the kernels from this size: below
#: it, where the tensors stay in the caches, PyTorch's backward is as fast (forward + backward x0.90-0.93 at
#: 14x14x192 and 7x7x288, batch 32; x1.18 at 28x28x96, 2.4 million values; ``benchmarks/cpu_kernels.py --mode
#: train``, 2-core Zen 4); the product's and the residual's forms save whole passes and win at every size measured,
#: and so do bfloat16 ones (x1.17-2.28, the same benchmark with ``--dtype bf16``)
TRAIN_PLAIN_MIN_NUMEL = 1 << 21


def _run(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
         out: torch.Tensor, eps: float, lib: Optional[ctypes.CDLL] = None, product: bool = False,
         stats: Optional[torch.Tensor] = None) -> None:
    lib = lib or library()
    if x.dtype == torch.float32:
        fn = lib.polynext_channel_norm_f32
    else:   # bfloat16 rows, with bfloat16 parameters (a bf16 model) or float32 ones (bf16 autocast training)
        fn = lib.polynext_channel_norm_bf16 if weight.dtype == torch.bfloat16 else lib.polynext_channel_norm_bf16_w32
    c = out.shape[-1]
    status = fn(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                None if residual is None else residual.data_ptr(), out.data_ptr(),
                None if stats is None else stats.data_ptr(), out.numel() // c, c, eps, torch.get_num_threads(),
                int(product))
    if status != 0:
        raise RuntimeError(f'polynext::channel_norm: {c} channels is more than the kernel takes ({_MAX_C})')


def _channel_norm(x, weight, bias, residual, eps, product=False):
    if product:
        out = x.new_empty(x.shape[:-1] + (x.shape[-1] // 2,))
    else:
        out = torch.empty_like(x)
    _run(x, weight, bias, residual, out, eps, product=product)
    return out


def _channel_norm_(x, weight, bias, residual, eps):
    _run(x, weight, bias, residual, x, eps)
    return x


def _channel_norm_stats(x, weight, bias, residual, eps, product=False):
    """The training forward: the norm and each row's (mean, 1/std) in float32, for the backward."""
    out = x.new_empty(x.shape[:-1] + (x.shape[-1] // 2 if product else x.shape[-1],))
    stats = x.new_empty(x.shape[:-1] + (2,), dtype=torch.float32)
    _run(x, weight, bias, residual, out, eps, product=product, stats=stats)
    return out, stats


def _channel_norm_backward(grad, x, weight, stats, bias, product, lib=None):
    """dL/dx, dL/dweight and dL/dbias (an empty tensor without ``bias``) from the output's gradient and the saved
    statistics (``polynext_channel_norm_backward_{f32,bf16}``: x, the gradient and dL/dx in x's dtype); the
    per-thread partial sums of the weight's gradient (float32) are added here (a few hundred values each)."""
    c = grad.shape[-1]
    threads = torch.get_num_threads()
    dx = torch.empty_like(x)
    parts = x.new_zeros((2 if bias else 1, threads, c), dtype=torch.float32)
    lib = lib or library()
    fn = lib.polynext_channel_norm_backward_f32 if x.dtype == torch.float32 else lib.polynext_channel_norm_backward_bf16
    status = fn(
        grad.data_ptr(), x.data_ptr(), weight.data_ptr(), stats.data_ptr(), dx.data_ptr(), parts[0].data_ptr(),
        parts[1].data_ptr() if bias else None, grad.numel() // c, c, threads, int(product))
    if status != 0:
        raise RuntimeError(f'polynext::channel_norm_backward: {c} channels is more than the kernel takes ({_MAX_C})')
    sums = parts.sum(1).to(weight.dtype)
    return dx, sums[0], sums[1] if bias else sums.new_empty(0)


_LIB = torch.library.Library('polynext', 'FRAGMENT')
_LIB.define('channel_norm(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, float eps, bool product=False) '
            '-> Tensor')
_LIB.define('channel_norm_(Tensor(a!) x, Tensor weight, Tensor? bias, Tensor? residual, float eps) -> Tensor(a!)')
_LIB.define('channel_norm_stats(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, float eps, '
            'bool product=False) -> (Tensor, Tensor)')
_LIB.define('channel_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor stats, bool bias, bool product) '
            '-> (Tensor, Tensor, Tensor)')
_LIB.impl('channel_norm', _channel_norm, 'CPU')
_LIB.impl('channel_norm_', _channel_norm_, 'CPU')
_LIB.impl('channel_norm_stats', _channel_norm_stats, 'CPU')
_LIB.impl('channel_norm_backward', _channel_norm_backward, 'CPU')


class _ChannelNormFunction(torch.autograd.Function):
    """The norm in training, forward and backward by the kernels: y = norm(x or its halves' product) · w (+ b)
    (+ residual). Saves x and the rows' statistics (8 bytes a row), as PyTorch's layer_norm saves x, its mean
    and 1/std; with ``product`` it saves the wider x instead of the product (PyTorch keeps both)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, product):
        if profiling():
            y, stats = torch.ops.polynext.channel_norm_stats(x, weight, bias, residual, eps, product)
        else:
            y, stats = _channel_norm_stats(x, weight, bias, residual, eps, product)
        ctx.save_for_backward(x, weight, stats)
        ctx.bias, ctx.residual, ctx.product = bias is not None, residual is not None, product
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, stats = ctx.saved_tensors
        grad = grad.to(x.dtype).contiguous()
        if profiling():
            dx, dw, db = torch.ops.polynext.channel_norm_backward(grad, x, weight, stats, ctx.bias, ctx.product)
        else:
            dx, dw, db = _channel_norm_backward(grad, x, weight, stats, ctx.bias, ctx.product)
        return (dx, dw, db if ctx.bias else None, grad if ctx.residual else None, None, None)


def _row_width(x: torch.Tensor, product: bool, minimum: int) -> Optional[int]:
    """The kernel's row width C for ``x`` (half its last dimension with ``product``), or None where the kernel does
    not take it: an odd width to halve, fewer than ``minimum`` values out, more than the kernel's C, not contiguous."""
    numel, c = x.numel(), x.shape[-1]
    if product:
        if c % 2:
            return None
        numel, c = numel // 2, c // 2
    return c if numel >= minimum and c <= _MAX_C and x.is_contiguous() else None


def trains(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           residual: Optional[torch.Tensor], product: bool = False) -> bool:
    """Whether the kernels compute ``channel_layer_norm`` of these arguments with autograd (training in eager mode
    on the CPU, the kernels on): float32 rows, or bfloat16 ones with float32 parameters (bf16 autocast training,
    where PyTorch's ``layer_norm`` also computes in float32 and returns bfloat16); the training counterpart of
    :func:`applies`."""
    if weight is None or type(x) is not torch.Tensor or not torch.is_grad_enabled() or x.dtype not in _DTYPES:
        return False
    plain = not product and residual is None and x.dtype == torch.float32
    c = _row_width(x, product, TRAIN_PLAIN_MIN_NUMEL if plain else MIN_NUMEL)
    if c is None:
        return False
    tensors = [x, weight] + [t for t in (bias, residual) if t is not None]
    if not any(t.requires_grad for t in tensors):
        return False
    for t in (weight, bias):
        if t is not None and (t.dim() != 1 or t.shape[0] != c or not t.is_contiguous() or t.dtype != torch.float32
                              or t.device.type != 'cpu' or type(t) not in _PARAMS):
            return False
    if residual is not None and (residual.shape[:-1] != x.shape[:-1] or residual.shape[-1] != c
                                 or not residual.is_contiguous()):
        return False
    return eager_cpu(*((x,) if residual is None else (x, residual))) and kernel_available()


def applies(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             residual: Optional[torch.Tensor], product: bool = False) -> bool:
    """Whether the kernel computes ``channel_layer_norm`` of these arguments (the module docstring): cheapest
    checks first; a call costs a few microseconds more than ``F.layer_norm``'s, so tensors under ``MIN_NUMEL``
    values stay with it."""
    if weight is None or x.dtype not in _DTYPES or type(x) is not torch.Tensor:
        return False
    c = _row_width(x, product, MIN_NUMEL)
    if c is None:
        return False
    grad = torch.is_grad_enabled()
    for t in (weight, bias):   # parameters, or a plain tensor such as a gated weight
        if t is not None and (type(t) not in _PARAMS or t.dtype != x.dtype or t.device.type != 'cpu' or t.dim() != 1
                              or t.shape[0] != c or not t.is_contiguous() or (grad and t.requires_grad)):
            return False
    if residual is not None and (residual.shape[:-1] != x.shape[:-1] or residual.shape[-1] != c
                                 or not residual.is_contiguous()):
        return False
    return eager_cpu_inference(*((x,) if residual is None else (x, residual))) and kernel_available()


def channel_layer_norm(x: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], eps: float, residual: Optional[torch.Tensor] = None,
                       inplace: bool = False, product: bool = False) -> torch.Tensor:
    """``F.layer_norm(x, normalized_shape, weight, bias, eps) (+ residual)`` over the last dimension of ``x``
    (the NHWC view of a channels-last activation). ``inplace``: the result may be written into ``x`` (the
    caller owns it; it is then returned). ``product``: ``x`` holds 2C values per row and the norm is of
    ``x[..., :C] ⊙ x[..., C:]`` (PolyMLP's product of the halves of ``fc_in``), which the kernel forms as it
    reads. The C kernel where it applies (module docstring), else PyTorch."""
    if len(normalized_shape) == 1 and applies(x, weight, bias, residual, product):
        if profiling():   # through the dispatcher, so that the profiler records the operator and its shapes
            if inplace and not product:
                return torch.ops.polynext.channel_norm_(x, weight, bias, residual, eps)
            return torch.ops.polynext.channel_norm(x, weight, bias, residual, eps, product)
        if inplace and not product:
            return _channel_norm_(x, weight, bias, residual, eps)
        return _channel_norm(x, weight, bias, residual, eps, product)
    if len(normalized_shape) == 1 and trains(x, weight, bias, residual, product):
        return _ChannelNormFunction.apply(x, weight, bias, residual, eps, product)
    if len(normalized_shape) == 1 and residual is not None and residual.dtype != x.dtype \
            and trains(x, weight, bias, None, product):   # bf16 autocast: a bf16 norm added to the float32 stream
        return _ChannelNormFunction.apply(x, weight, bias, None, eps, product).add_(residual)
    if product:
        a, b = x.chunk(2, dim=-1)
        x = a * b
    y = F.layer_norm(x, normalized_shape, weight, bias, eps)
    return y if residual is None else y.add_(residual)


def channel_norm_nchw(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                      residual: Optional[torch.Tensor] = None, inplace: bool = False) -> torch.Tensor:
    """:func:`channel_layer_norm` over the channels of NCHW tensors (on their NHWC views, free for channels-last
    ones); returns NCHW."""
    res = None if residual is None else residual.permute(0, 2, 3, 1)
    return channel_layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps, residual=res,
                              inplace=inplace).permute(0, 3, 1, 2)


def product_norm_nchw(m: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      eps: float) -> Optional[torch.Tensor]:
    """Norm(m[:, :C] ⊙ m[:, C:]) of an NCHW tensor with 2C channels, in one pass, where the kernel applies
    (CPU inference: the product is formed as the rows are read, never written); None elsewhere, where the
    caller keeps its own form (in training, an autograd-friendly product)."""
    z = m.permute(0, 2, 3, 1)
    if not (applies(z, weight, bias, None, product=True) or trains(z, weight, bias, None, product=True)):
        return None
    return channel_layer_norm(z, (z.shape[-1] // 2,), weight, bias, eps, product=True).permute(0, 3, 1, 2)
