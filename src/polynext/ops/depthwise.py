"""Dilated depthwise convolution with a fast backward on CPUs.

PolyConv's coarse branch is a depthwise convolution with dilation 2 (3x3 in stage 0, 5x5 later).
Its forward runs well in oneDNN, but PyTorch's CPU backward for a *dilated* depthwise convolution
falls back to a generic path that is 5-10x slower than the backward of the same convolution
without dilation (measured on AMD EPYC, channels-last, batch 32: 5x5 dilation 2 on 96 channels at
56x56 takes 530 ms against 15 ms for the forward). In a CPolyNeXt training step that one layer
type was the largest single cost. No library provides a faster one, so the backward is written
here from two exact identities:

* grad input: for stride 1 and "same" padding, the gradient of a correlation is the correlation of
  the output gradient with the spatially flipped kernel, with the same dilation and padding (a
  forward convolution, fast);
* grad weight: a convolution with dilation d reads, for an output pixel of phase (a, b) =
  (h mod d, w mod d), only input pixels of the same phase. Splitting input and output gradient
  into their d² phase images turns the dilated weight gradient into the sum of d² weight
  gradients of an undilated convolution with padding (k − 1) / 2 (fast).

On small maps (the last stages of a low-resolution model: 2x2 and 4x4 maps at 64 px input) many
taps of the dilated kernel only ever meet the zero padding: with offset o = d·i − d·(k−1)/2, a tap
with |o| ≥ H is dead on a map of height H. Their weight gradient is exactly zero and they add
nothing to the input gradient, so the backward runs on the live centre of the kernel (a 5x5
dilation-2 kernel is a 3x3 one on a 4x4 map and a 1x1 one on a 2x2 map) and pads the weight
gradient back with zeros. The forward is never cropped: its bits stay those of ``F.conv2d``.

Below 14x14 on channels-last maps the weight gradient is computed tap by tap (the input shifted
by each tap's offset, times the output gradient, summed over batch and pixels, channels innermost):
4-7x faster than autograd's generic dilated path there.

For kernels wider than 3 (5x5) the phase split's weight gradient is further cut into columns
of width 3 and 1, the widths oneDNN's fast depthwise weight-gradient kernel takes
(``_wide_phase_weight_grad``). The same cut serves *undilated* 5x5 depthwise convolutions (PolyAttn's
Q and K convolutions; one phase), whose backward PyTorch also sends to oneDNN's generic kernel: forward +
backward on a Zen 4, batch 32, 160 channels at 14x14, 6.1 → 4.8 ms in fp32 and 12.2 → 3.2 ms under bf16
autocast (``benchmarks/depthwise_backward.py apolynext_s [--dtype bf16]``).

Where ``ops.cpu_kernels`` is built (a C compiler on the machine) and the maps are channels-last float32 or
bfloat16, the weight gradient of every routed layer comes instead from its ``polynext_dw_wgrad`` kernel: an
image's input and output gradient copied in one pass into planes of 16 channels (the input's zero-padded),
then every tap's sum in a register, float32 sums (also under bf16 autocast, where oneDNN's sums were
bfloat16). Dead taps then need no crop: they only meet the padding's zeros. Forward + backward of the routed
layers against the phase split and column cut, on a 2-core AMD EPYC (Zen 4), batch 32, the CPolyNeXt-T and
APolyNeXt-T / S shapes: x1.51-2.75 in fp32 and x1.63-3.08 under bf16 autocast
(``benchmarks/depthwise_backward.py``, its "no kernel" column). Undilated 3x3 layers take the function only for
this kernel, from 64 channels at 56x56 an image (``_MIN_NUMEL_3X3``: the S models' stage-0 PolyConv), where
oneDNN's weight gradient slows to half its rate; smaller ones stay with oneDNN's fast kernel.

All are exact in real arithmetic (float64 agreement ~1e-11 in the tests); the phase split is 4-6x
faster than autograd's backward at the PolyNeXt shapes of 14x14 and larger, the crop and the
per-tap gradient 2-30x on smaller maps (``benchmarks/depthwise_backward.py``). The function is used for stride-1,
same-padded depthwise convolutions on the CPU when a gradient is needed that are dilated, wider than 3, or 3x3
layers the weight-gradient kernel serves (above); everything else (inference, CUDA, other undilated convolutions)
calls ``F.conv2d`` directly.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu_kernels import kernel_available, kernel_fn
from .fused import eager_cpu

__all__ = ['depthwise_conv2d', 'DepthwiseConv2dFunction', 'StridedDepthwiseConv2d']

#: below this many output pixels per image the phase split costs more than it saves (7x7 and 8x8 maps)
_MIN_PIXELS = 14 * 14
#: undilated 3x3 layers take the function, for its weight-gradient kernel, on channels-last maps of at least this many
#: values an image (from 64 channels at 56x56: the S models' stage 0, 72 channels). Forward + backward against
#: autograd's (oneDNN), 2-core Zen 4, batch 32 (``benchmarks/depthwise_backward.py``, the autograd column): 72 channels
#: at 56x56 x1.28-1.34 in fp32 and x1.35 under bf16 autocast; in a throwaway timing of the backward alone oneDNN's
#: weight gradient took 6.8 ms there against 3.3 ms at 64 channels and the kernel 3.5 ms. Below it oneDNN's fast
#: kernel stays: 48 channels at 56x56 ran x0.87-0.93 and 96 at 28x28 x0.85-1.08 in fp32, 144 at 28x28 x1.07 (two
#: throwaway runs with every 3x3 layer from 28x28 routed).
_MIN_NUMEL_3X3 = 64 * 56 * 56


class DepthwiseConv2dFunction(torch.autograd.Function):
    """y = depthwise_conv2d(x, w, dilation=d, padding=d·(k−1)/2), stride 1, no bias; fast backward
    (dilated kernels, and undilated ones wider than 3)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
        # autocast is resolved here, once: the backward then runs in the forward's compute dtype
        dtype = torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else x.dtype
        ctx.dtypes = (x.dtype, weight.dtype)
        ctx.dilation = dilation
        xc, wc = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(xc, wc)
        k = weight.shape[-1]
        with torch.autocast('cpu', enabled=False):
            return F.conv2d(xc, wc, padding=dilation * (k - 1) // 2, dilation=dilation, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        d = ctx.dilation
        k = weight.shape[-1]
        channels = weight.shape[0]
        grad = grad.to(x.dtype)
        height, width = x.shape[-2:]
        # the live centre of the kernel: dead taps only meet padding (module docstring)
        cut_h, cut_w = _dead_taps(k, d, height), _dead_taps(k, d, width)
        live = weight[:, :, cut_h:k - cut_h, cut_w:k - cut_w]
        kh, kw = live.shape[-2:]
        pad = [d * (kh - 1) // 2, d * (kw - 1) // 2]
        dil = [d if kh > 1 else 1, d if kw > 1 else 1]
        grad_x = grad_w = None
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        with torch.autocast('cpu', enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = F.conv2d(grad, live.flip(-1, -2), padding=pad, dilation=dil,
                                  groups=channels).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                acc = torch.promote_types(ctx.dtypes[1], torch.float32)
                grad_w = _kernel_weight_grad(x, grad, k, d)   # the C kernel where it is built (module docstring)
                if grad_w is None:   # PyTorch's kernels: the column cut, the phase split, the tap-by-tap gradient
                    if cut_h == cut_w == 0 and k > 3 and (height * width >= _MIN_PIXELS or d == 1):
                        grad_w = _wide_phase_weight_grad(x, grad, k, d).to(acc)
                    elif cut_h == cut_w == 0 and height * width >= _MIN_PIXELS:
                        c = (k - 1) // 2
                        for a in range(d):
                            for b in range(d):
                                xp = x[:, :, a::d, b::d].contiguous(memory_format=fmt)
                                gp = grad[:, :, a::d, b::d].contiguous(memory_format=fmt)
                                part = torch.ops.aten.convolution_backward(
                                    gp, xp, weight, None, [1, 1], [c, c], [1, 1], False, [0, 0], channels,
                                    [False, True, False])[1].to(acc)
                                grad_w = part if grad_w is None else grad_w.add_(part)
                    elif fmt == torch.channels_last:
                        grad_w = F.pad(_tap_weight_grad(x, grad, kh, kw, d).to(acc), (cut_w, cut_w, cut_h, cut_h))
                    else:
                        grad_w = torch.ops.aten.convolution_backward(
                            grad, x, live, None, [1, 1], pad, dil, False, [0, 0], channels,
                            [False, True, False])[1].to(acc)
                        grad_w = F.pad(grad_w, (cut_w, cut_w, cut_h, cut_h))
                grad_w = grad_w.to(ctx.dtypes[1])
                if grad_w.stride() != weight.stride():   # the weight's own layout (a channels-last model's is
                    grad_w = torch.empty_like(weight, dtype=grad_w.dtype).copy_(grad_w)   # not standard): DDP's
        return grad_x, grad_w, None                                                      # buckets follow it


def _kernel_applies(*maps: torch.Tensor) -> bool:
    """Whether ``polynext_dw_wgrad`` can take these maps: channels-last float32 / bfloat16, eager CPU work, the
    kernels built and on."""
    return (maps[0].dtype in (torch.float32, torch.bfloat16)
            and maps[0].is_contiguous(memory_format=torch.channels_last) and eager_cpu(*maps) and kernel_available())


def _kernel_weight_grad(x: torch.Tensor, grad: torch.Tensor, k: int, d: int) -> Optional[torch.Tensor]:
    """The weight gradient (C, 1, k, k) in float32 by ``ops.cpu_kernels``' ``polynext_dw_wgrad`` (an image's
    input and output gradient packed into planes of 16 channels, every tap's sum in a register), or None where it
    does not apply: no compiled kernel, not eager CPU work, x not channels-last, a dtype other than float32 and
    bfloat16, k even or above 7. Dead taps need no crop there: they only meet the padding's zeros."""
    if not (k % 2 == 1 and k <= 7 and _kernel_applies(x, grad)):
        return None
    g = grad.contiguous(memory_format=torch.channels_last)
    n, channels, height, width = x.shape
    threads = torch.get_num_threads()
    part = torch.zeros(threads, k, k, channels)
    if kernel_fn('dw_wgrad', x)(x.data_ptr(), g.data_ptr(), part.data_ptr(), n, height, width, channels, k, d,
                                threads) != 0:
        raise MemoryError(f'polynext_dw_wgrad: out of memory for one image\'s {height}x{width}x{channels} planes per '
                          'thread; free memory, or run with POLYNEXT_CPU_KERNELS=0 (PyTorch\'s path, no such buffers)')
    return part.sum(0).permute(2, 0, 1).unsqueeze(1)


def _phase_stack(t: torch.Tensor, d: int, pad: int, slack: int) -> torch.Tensor:
    """A flat buffer holding the d² phase images of ``t`` (N, C, H, W; H and W multiples of d) stacked
    along the batch, channels innermost: (d²·N, H/d, W/d + pad, C) with ``pad`` zero columns on the
    right, preceded and followed by ``slack`` zero pixels."""
    n, c, h, w = t.shape
    hp, wp = h // d, w // d
    size = d * d * n * hp * (wp + pad) * c
    buf = t.new_empty(size + 2 * slack * c)
    buf[:slack * c].zero_()
    buf[slack * c + size:].zero_()
    body = buf[slack * c:slack * c + size].view(d, d, n, hp, wp + pad, c)
    body[..., wp:, :].zero_()
    body[..., :wp, :].copy_(t.permute(0, 2, 3, 1).reshape(n, hp, d, wp, d, c).permute(2, 4, 0, 1, 3, 5))
    return buf


def _wide_phase_weight_grad(x: torch.Tensor, grad: torch.Tensor, k: int, d: int) -> torch.Tensor:
    """Weight gradient of a same-padded, dilation-d depthwise k x k convolution, k > 3, on maps of
    14x14 and larger.

    The phase split turns it into the weight gradient of an undilated k x k convolution of the
    phase images, but oneDNN's depthwise weight-gradient kernel only takes kernels 1 or 3 wide;
    a 5x5 one goes to its generic grouped kernel, 5-8x slower than the forward (measured with
    ONEDNN_VERBOSE on an AMD EPYC). So the kernel is cut into columns: lags -1..1 in one k x 3
    weight gradient, every further lag s in a k x 1 one of the input shifted by s columns. The
    shift costs no copy: the phase images of x and of the output gradient are stacked along the
    batch in one buffer with ``half`` zero columns right of each row (maps not a multiple of d are
    zero-padded first, which adds nothing to the sums), and x shifted by s is the same buffer read
    from s pixels further on. Every product of the output gradient with a pixel that wrapped into
    the next or previous row lands on a zero column. The weight gradient is 2-3x faster than the
    plain phase split at the CPolyNeXt shapes, the layer's forward + backward about 1.7x
    (``benchmarks/depthwise_backward.py``)."""
    height, width = x.shape[-2:]
    ph, pw = -height % d, -width % d
    if ph or pw:
        x, grad = F.pad(x, (0, pw, 0, ph)), F.pad(grad, (0, pw, 0, ph))
    n, channels, height, width = x.shape
    half = (k - 1) // 2
    xs, gs = _phase_stack(x, d, half, half), _phase_stack(grad, d, half, 0)
    shape = (d * d * n, height // d, width // d + half, channels)
    numel = shape[0] * shape[1] * shape[2] * channels
    g_img = gs.view(shape).permute(0, 3, 1, 2)

    def lags(shift: int, kw: int) -> torch.Tensor:          # columns shift-(kw-1)/2 .. shift+(kw-1)/2
        start = (half + shift) * channels
        x_img = xs[start:start + numel].view(shape).permute(0, 3, 1, 2)
        return torch.ops.aten.convolution_backward(
            g_img, x_img, x.new_empty(channels, 1, k, kw), None, [1, 1], [half, (kw - 1) // 2], [1, 1],
            False, [0, 0], channels, [False, True, False])[1]

    columns = list(lags(0, 3).unbind(-1))
    for s in range(2, half + 1):
        columns = [lags(-s, 1)[..., 0]] + columns + [lags(s, 1)[..., 0]]
    return torch.stack(columns, -1)


def _tap_weight_grad(x: torch.Tensor, grad: torch.Tensor, kh: int, kw: int, d: int) -> torch.Tensor:
    """Weight gradient of a same-padded, dilation-d depthwise (kh x kw) convolution of channels-last
    maps, tap by tap: tap (i, j) is the sum over batch and pixels of grad times the input shifted by
    the tap's offset. In the NHWC view both operands keep the channels innermost, so each tap is one
    vectorised multiply-and-reduce; below 14x14 this is 4-7x faster than autograd's backward (which
    takes a generic path for dilated depthwise convolutions)."""
    height, width = x.shape[-2:]
    ph, pw = d * (kh - 1) // 2, d * (kw - 1) // 2
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))          # N, H + 2ph, W + 2pw, C
    g = grad.permute(0, 2, 3, 1)
    out = torch.empty(kh, kw, x.shape[1], dtype=x.dtype, device=x.device)
    for i in range(kh):
        for j in range(kw):
            torch.sum(xp[:, i * d:i * d + height, j * d:j * d + width, :] * g, (0, 1, 2), out=out[i, j])
    return out.permute(2, 0, 1).unsqueeze(1)                           # (C, 1, kh, kw)


def _dead_taps(k: int, d: int, size: int) -> int:
    """Taps at each end of a k-tap, dilation-d, same-padded kernel that never meet a map of ``size``
    pixels: tap i reads offset d·i − d·(k−1)/2, dead when its magnitude is at least ``size``."""
    half = (k - 1) // 2
    return sum(1 for i in range(half) if d * (half - i) >= size)


def _kernel_serves_3x3(x: torch.Tensor) -> bool:
    """Whether an undilated 3x3 layer on ``x`` takes the function: the weight-gradient kernel applies
    (:func:`_kernel_applies`) and an image has ``_MIN_NUMEL_3X3`` values."""
    return x.shape[-3] * x.shape[-2] * x.shape[-1] >= _MIN_NUMEL_3X3 and _kernel_applies(x)


def depthwise_conv2d(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a depthwise ``nn.Conv2d``; the fast-backward function where it applies.

    It applies on the CPU, with autograd recording, for a bias-free, stride-1, square-kernel depthwise
    convolution with "same" padding that is dilated (the phase split on maps of at least 14x14, the crop
    of dead taps and a per-tap weight gradient on smaller channels-last maps) or wider than 3 (PolyAttn's
    5x5 Q / K convolutions: the column cut at every map size). Undilated 3x3 ones (PolyConv's fine and output
    convolutions) take it only for the weight-gradient kernel, on maps of at least 64 channels at 56x56
    (``_MIN_NUMEL_3X3``); elsewhere oneDNN's fast kernel serves them."""
    k = conv.kernel_size[0]
    d = conv.dilation[0]
    if (x.device.type == 'cpu' and torch.is_grad_enabled()
            and (x.requires_grad or conv.weight.requires_grad) and conv.bias is None
            and conv.groups == conv.in_channels == conv.out_channels and conv.stride == (1, 1)
            and conv.kernel_size == (k, k) and conv.dilation == (d, d) and conv.padding == (d * (k - 1) // 2,) * 2
            and conv.padding_mode == 'zeros'
            and (d > 1 or k > 3 or (k == 3 and _kernel_serves_3x3(x)))
            and (d == 1 or x.shape[-1] * x.shape[-2] >= _MIN_PIXELS
                 or x.is_contiguous(memory_format=torch.channels_last) or _dead_taps(k, d, min(x.shape[-2:])) > 0)):
        return DepthwiseConv2dFunction.apply(x, conv.weight, d)
    return conv(x)


class StridedDepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, k, stride, padding, groups=channels, bias=False)``, the stage-boundary
    reduction of PolyNeXt's 'sep3x3' downsampling; in CPU training under bf16 / fp16 autocast it runs in
    float32.

    PyTorch's CPU backward of a strided depthwise convolution in bf16 takes a generic path: on a Zen 4 (AVX-512
    with bf16), batch 32, forward + backward of the 3x3 stride-2 layer on 48 channels at 56x56 took 25.0 ms
    under bf16 autocast against 7.5 ms in float32 inside it (the input cast included), 288 channels at 14x14
    26.9 against 1.7 ms (``benchmarks/depthwise_backward.py apolynext_t apolynext_s --dtype bf16``). The layer
    has a few MACs per pixel, so float32 loses no precision; it keeps its float32 input for backward (+2.6 % of
    apolynext_t's bf16 training memory). The next 1x1 convolution casts back to the autocast dtype. Inference
    (no gradient) and CUDA keep autocast's choice. Same parameters and state dict as ``nn.Conv2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == 'cpu' and torch.is_grad_enabled() and torch.is_autocast_enabled('cpu'):
            with torch.autocast('cpu', enabled=False):
                return super().forward(x.float())
        return super().forward(x)
