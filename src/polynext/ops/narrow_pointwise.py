"""1x1 convolutions at CPU inference by a C kernel with narrow register tiles (72 or 48 outputs).

    y = W x   (+ y, the residual addition after PolyMLP's output projection)

PolyNeXt's depth-over-width design keeps its first stages narrow: CPolyNeXt-S / APolyNeXt-S run 72 channels at
56x56 and 144 at 28x28 (the T models 48 and 96), and every block there has three or four 1x1 convolutions with 48
to 144 outputs. oneDNN's kernels for such narrow products run well below its rate for wide ones: on a 2-core AMD
EPYC (Zen 4), batch 32, fp32, 72 → 72 channels at 56x56 at 48-52 GMAC/s, 48 → 48 at 48, against 80-100 for 288
channels at 14x14 (``polynext profile``: 55-64 % of the 1x1 peak for these layers inside the step, 14-17 % of a
CPolyNeXt-S inference step). In ``polynext_pointwise_f32`` (``csrc/cpu_kernels.c``, 10.) a tile of 5 pixels x 72
outputs (or 8 x 48) keeps its sums in registers for the whole sum over the input channels, each input value
broadcast once per tile, the next tile of outputs after it: x1.13-1.41 over oneDNN for the 48- and 72-channel
layers at 56x56, x1.05-1.25 at 28x28 and x0.98-1.22 for the wider layers at 14x14 and 7x7 (38 of PolyNeXt-T/S's 39
served shapes faster, 288 → 504 at 14x14 x0.98; the weight's packing on every call included;
``benchmarks/narrow_pointwise.py``, ``benchmarks/results/narrow_pointwise_zen4.json``). No library chooses tiles
this narrow, so it is written here.

Where: eager CPU inference (``ops.fused.eager_cpu_inference``), channels-last float32 activations (not under CPU
autocast), a float32 weight, no bias, a multiple of 72 or 48 output channels (``tile_width``), at most ``MAX_IN``
input channels, a CPU with AVX-512 or AVX2 (4 pixels x 24 outputs a tile there), the kernels on (``ops.cpu_kernels.kernels`` and
``ops.cpu_kernels.narrow_pointwise`` for this one alone). Elsewhere PyTorch's convolution. The sums run over the
input channels in order in float32, as oneDNN's did here (logits equal bit for bit in the benchmark's whole-model
runs; the tests allow float32 rounding). Registered as ``polynext::pointwise`` / ``polynext::pointwise_add_`` for the
profiler (1x1 convolutions there).

:func:`pointwise_norm` (``polynext_pointwise_norm_f32``, 11.) is the same convolution with the channel LayerNorm of
``ops.channel_norm`` as its epilogue, for the two norms of a PolyNeXt block that follow a 1x1 convolution: PolyConv's
``pw_out`` with its closing norm and the residual addition, PolyMLP's ``fc_in`` with its product of halves and its
norm. A pixel tile's outputs stay in a buffer on the stack and are normalised from there by the norm kernel's own row
functions, so the convolution's output is never written to memory nor read back (2N floats a pixel fewer), and the
values are those of the two kernels one after the other. PolyConv's form writes its output into the residual stream
it adds where the block owns that stream (``inplace``: each pixel's residual is read just before its output is
written), so no new tensor crosses memory (at 56x56 and batch 32 a 29 MB write and its read-for-ownership fewer);
switch ``ops.cpu_kernels.norm_in_place``. Switch: ``ops.cpu_kernels.pointwise_norm``; profiler operators
``polynext::pointwise_norm`` / ``pointwise_norm_`` (1x1 convolutions there, the norm inside them).

:func:`poly_mlp_` (``polynext_poly_mlp_f32``, 12.) is a PolyNeXt block's whole PolyMLP residual in one kernel, added
into the residual stream in place: for a block of pixels ``fc_in`` into a buffer, its product and norm (the row
functions again) into another, ``fc_out`` added into the stream's rows. Only the stream is read and written; the
separate kernels write and read the 2H-wide input projection (the epilogue kernel saves that) and the H-wide hidden
tensor besides. The values are those of the epilogue kernel and the residual kernel one after the other (logits equal
bit for bit). Switch: ``ops.cpu_kernels.fused_mlp``; profiler operator ``polynext::poly_mlp_`` (1x1 convolutions
there, both projections' MACs).

Both fused kernels also run a bf16 model (``polynext_pointwise_norm_bf16`` / ``polynext_poly_mlp_bf16``, 13.: AVX-512
BF16's pair dot product, the weight packed as pairs of inputs, an even number of them): the sums are float32 into the
norm, where oneDNN's bf16 convolution rounds them to bf16 first; the norm's output and the stream are rounded once,
as the separate path rounds them. The plain kernel stays float32 (oneDNN's bf16 1x1 convolutions already run near
this machine's bf16 peak; what the fused kernels save is memory traffic).

Measured on a 2-core AMD EPYC (Zen 4), batch 32, interleaved (``benchmarks/narrow_pointwise.py``,
``benchmarks/results/pointwise_fused_zen4.json`` and ``pointwise_fused_bf16_zen4.json``): in fp32 the norm epilogue
per layer x0.99-1.35 over the kernel and the norm kernel one after the other (most at 56x56 and 28x28), the whole
PolyMLP x1.04-1.19 over the epilogue and residual kernels, the whole model with every 1x1 kernel x1.16-1.22 over
oneDNN; in bf16 x0.99-1.29, x0.92-1.63 and x1.07-1.13 over oneDNN's bf16 path.

With AVX2 and no AVX-512 (a 2-core AMD EPYC Zen 3) the tile is 4 pixels x 24 outputs (16 vector registers), a chunk
3 or 2 such columns over 16 pixels, the float32 weight packed per 24-output column (:func:`_pack`'s ``cols``: the
library's ``polynext_pointwise_cols()``). Measured there (``benchmarks/results/narrow_pointwise_zen3.json``): per
layer x0.96-1.12 over oneDNN, the norm epilogue x1.04-1.21, the whole PolyMLP x1.07-1.17, the whole model with every
1x1 kernel x1.08-1.11 over oneDNN.
"""
from __future__ import annotations

from typing import Optional

import torch

from .cpu_kernels import check_status, fused_mlp as mlp_switch, kernel_available, library, \
    narrow_pointwise as narrow_switch, norm_in_place, pointwise_norm as norm_switch, profiling
from .constants import derived
from .fused import eager_cpu_inference

__all__ = ['narrow_pointwise', 'narrow_pointwise_applies', 'pointwise_norm', 'poly_mlp_', 'tile_width', 'TILES',
           'MAX_IN', 'MAX_NORM_OUT']

#: the kernel's register tiles: 72 outputs x 5 pixels, or 48 x 8 (the first that divides a layer's outputs)
TILES = (72, 48)


def tile_width(out_channels: int) -> int:
    """The tile width the kernel takes for this many outputs (the first of ``TILES`` that divides them), or 0 where
    none does (oneDNN's path)."""
    return next((t for t in TILES if out_channels % t == 0), 0)


#: the kernel's limit on input channels (its partial-tile buffer on the stack)
MAX_IN = 1024

#: :func:`pointwise_norm`'s limit on output channels (its tile's row buffer on the stack; PWN_MAX_N in the source)
MAX_NORM_OUT = 2048


def _served(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], bf16: bool) -> bool:
    """Whether the kernels take ``F.conv2d(x, weight, bias)``: float32, or with ``bf16`` also bfloat16 (an even
    number of inputs, the bf16 kernels built: AVX-512 BF16)."""
    dtype_ok = x.dtype == torch.float32 or (bf16 and x.dtype == torch.bfloat16 and x.shape[1] % 2 == 0)
    if not (narrow_switch.on and dtype_ok and bias is None and x.dim() == 4 and weight.dtype == x.dtype
            and weight.dim() == 4 and weight.shape[2:] == (1, 1)
            and tile_width(weight.shape[0]) and weight.shape[1] == x.shape[1] <= MAX_IN
            and weight.device == x.device and not (torch.is_grad_enabled() and weight.requires_grad)
            and x.is_contiguous(memory_format=torch.channels_last) and not torch.is_autocast_enabled('cpu')
            and eager_cpu_inference(x)):
        return False
    return kernel_available() and (library().pointwise if x.dtype == torch.float32 else library().pointwise_bf16)


def narrow_pointwise_applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`narrow_pointwise` serves ``F.conv2d(x, weight, bias)`` (module docstring)."""
    return _served(x, weight, bias, bf16=False)


def _packed(weight: torch.Tensor) -> torch.Tensor:
    """(N, K, 1, 1) → this process's kernel's layout (:func:`_pack`), kept while the weight is unchanged
    (``ops.constants``; the packing in the key: a process may load two builds, ``benchmarks/kernel_source_ab.py``)."""
    cols = library().pointwise_cols
    return derived(f'packed/{cols}', (weight,), lambda: _pack(weight, cols))


def _pack(weight: torch.Tensor, cols: int = 0) -> torch.Tensor:
    """(N, K, 1, 1) → the kernel's layout: per chunk of CW outputs, (K, CW) row-major, or with ``cols`` (the AVX2
    build's ``polynext_pointwise_cols()``: 24) per column of ``cols`` outputs within the chunk, (K, cols) row-major;
    for bfloat16 (the pair dot product's operand) (K / 2, CW, 2): each output's two consecutive inputs side by
    side."""
    n, k = weight.shape[:2]
    cw = tile_width(n)
    if weight.dtype == torch.bfloat16:
        return weight.reshape(n // cw, cw, k // 2, 2).permute(0, 2, 1, 3).contiguous().reshape(-1)
    cols = cols or cw
    return weight.reshape(n // cols, cols, k).transpose(1, 2).contiguous().reshape(-1)


def _call(x: torch.Tensor, wp: torch.Tensor, y: torch.Tensor, accumulate: bool) -> None:
    n = y.shape[1]
    status = library().polynext_pointwise_f32(x.data_ptr(), wp.data_ptr(), y.data_ptr(), x.numel() // x.shape[1],
                                              x.shape[1], n, tile_width(n), int(accumulate), torch.get_num_threads())
    check_status('pointwise', status, '', f'{x.shape[1]} → {n} channels', 'narrow_pointwise_applies')


def _pointwise(x: torch.Tensor, wp: torch.Tensor, out_channels: int) -> torch.Tensor:
    y = torch.empty((x.shape[0], out_channels) + tuple(x.shape[2:]), dtype=x.dtype,
                    memory_format=torch.channels_last)
    _call(x, wp, y, False)
    return y


def _pointwise_add_(x: torch.Tensor, wp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _call(x, wp, y, True)
    return y


def _pointwise_norm(x: torch.Tensor, wp: torch.Tensor, norm_weight: torch.Tensor, norm_bias: Optional[torch.Tensor],
                    residual: Optional[torch.Tensor], out_channels: int, eps: float, product: bool,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    n = out_channels
    y = out if out is not None else torch.empty((x.shape[0], n // 2 if product else n) + tuple(x.shape[2:]),
                                                dtype=x.dtype, memory_format=torch.channels_last)
    fn = library().polynext_pointwise_norm_f32 if x.dtype == torch.float32 else library().polynext_pointwise_norm_bf16
    status = fn(
        x.data_ptr(), wp.data_ptr(), y.data_ptr(), norm_weight.data_ptr(),
        None if norm_bias is None else norm_bias.data_ptr(), None if residual is None else residual.data_ptr(),
        x.numel() // x.shape[1], x.shape[1], n, tile_width(n), eps, int(product), torch.get_num_threads())
    check_status('pointwise_norm', status, '', f'{x.shape[1]} → {n} channels', 'pointwise_norm')
    return y


def _poly_mlp_(x: torch.Tensor, wp_in: torch.Tensor, norm_weight: torch.Tensor, norm_bias: Optional[torch.Tensor],
               wp_out: torch.Tensor, hidden2: int, eps: float) -> torch.Tensor:
    k = x.shape[1]
    fn = library().polynext_poly_mlp_f32 if x.dtype == torch.float32 else library().polynext_poly_mlp_bf16
    status = fn(
        x.data_ptr(), wp_in.data_ptr(), norm_weight.data_ptr(), None if norm_bias is None else norm_bias.data_ptr(),
        wp_out.data_ptr(), x.data_ptr(), x.numel() // k, k, hidden2, tile_width(hidden2), tile_width(k), eps,
        torch.get_num_threads())
    check_status('poly_mlp_', status, "a thread's buffers", f'{k} → {hidden2} → {k} channels', 'poly_mlp_')
    return x


_LIB = torch.library.Library('polynext', 'FRAGMENT')
_LIB.define('pointwise(Tensor x, Tensor packed_weight, int out_channels) -> Tensor')
_LIB.define('pointwise_add_(Tensor x, Tensor packed_weight, Tensor(a!) out) -> Tensor(a!)')
_LIB.impl('pointwise', _pointwise, 'CPU')
_LIB.impl('pointwise_add_', _pointwise_add_, 'CPU')
_LIB.define('pointwise_norm(Tensor x, Tensor packed_weight, Tensor norm_weight, Tensor? norm_bias, Tensor? residual, '
            'int out_channels, float eps, bool product) -> Tensor')
_LIB.impl('pointwise_norm', _pointwise_norm, 'CPU')
_LIB.define('pointwise_norm_(Tensor x, Tensor packed_weight, Tensor norm_weight, Tensor? norm_bias, '
            'Tensor(a!) residual, int out_channels, float eps) -> Tensor(a!)')
_LIB.impl('pointwise_norm_', lambda x, wp, nw, nb, res, n, eps: _pointwise_norm(x, wp, nw, nb, res, n, eps, False, res),
          'CPU')
_LIB.define('poly_mlp_(Tensor(a!) x, Tensor packed_in, Tensor norm_weight, Tensor? norm_bias, Tensor packed_out, '
            'int hidden2, float eps) -> Tensor(a!)')
_LIB.impl('poly_mlp_', _poly_mlp_, 'CPU')


def narrow_pointwise(x: torch.Tensor, weight: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight)`` as a new channels-last tensor, or with ``out`` (a channels-last float32 tensor of the
    output's shape, which the caller owns) ``out += F.conv2d(x, weight)`` in place, returning ``out``. Check
    :func:`narrow_pointwise_applies` first."""
    wp = _packed(weight)
    if out is None:
        return torch.ops.polynext.pointwise(x, wp, weight.shape[0]) if profiling() else \
            _pointwise(x, wp, weight.shape[0])
    if not (out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
            and out.shape == (x.shape[0], weight.shape[0]) + tuple(x.shape[2:])):
        raise ValueError(f'narrow_pointwise: out must be a channels-last float32 tensor of shape '
                         f'{(x.shape[0], weight.shape[0]) + tuple(x.shape[2:])}, got {tuple(out.shape)} {out.dtype}')
    return torch.ops.polynext.pointwise_add_(x, wp, out) if profiling() else _pointwise_add_(x, wp, out)


def _norm_param(p: Optional[torch.Tensor], channels: int, dtype: torch.dtype) -> bool:
    return p is None or (p.dtype == dtype and p.shape == (channels,) and p.device.type == 'cpu'
                         and not (torch.is_grad_enabled() and p.requires_grad))


def _as_f32(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A norm parameter as the kernels read it: contiguous float32 (a bf16 model's are converted, exactly)."""
    return None if p is None else p.to(torch.float32).contiguous()


def pointwise_norm(x: torch.Tensor, weight: torch.Tensor, norm_weight: Optional[torch.Tensor],
                   norm_bias: Optional[torch.Tensor], eps: float, residual: Optional[torch.Tensor] = None,
                   product: bool = False, inplace: bool = False) -> Optional[torch.Tensor]:
    """A 1x1 convolution by ``weight`` (no bias) followed by the channel LayerNorm, in one kernel where it serves
    (module docstring), as a new channels-last tensor, or with ``inplace`` written into ``residual`` (a tensor the
    caller owns: each pixel's residual is read before its output is written, so no new tensor crosses memory); None
    elsewhere (nothing written; the caller runs its own path):

        LayerNorm_c(conv(x)) * norm_weight (+ norm_bias) (+ residual)
        LayerNorm_c(conv(x)[:, :N/2] * conv(x)[:, N/2:]) * norm_weight (+ norm_bias)     (``product``)
    """
    if inplace and (residual is None or product):
        raise ValueError('pointwise_norm: inplace writes into the residual; pass residual= (and not product=True)')
    n = weight.shape[0]
    c = n // 2 if product else n
    if not (norm_switch.on and norm_weight is not None and n <= MAX_NORM_OUT and (not product or n % 2 == 0)
            and _norm_param(norm_weight, c, x.dtype) and _norm_param(norm_bias, c, x.dtype)
            and (residual is None or (not product and residual.dtype == x.dtype
                                      and residual.shape == (x.shape[0], n) + tuple(x.shape[2:])
                                      and residual.is_contiguous(memory_format=torch.channels_last)))
            and _served(x, weight, None, bf16=True)):
        return None
    wp = _packed(weight)
    norm_weight, norm_bias = _as_f32(norm_weight), _as_f32(norm_bias)
    if inplace and norm_in_place.on:
        if profiling():
            return torch.ops.polynext.pointwise_norm_(x, wp, norm_weight, norm_bias, residual, n, float(eps))
        return _pointwise_norm(x, wp, norm_weight, norm_bias, residual, n, float(eps), False, residual)
    if profiling():
        return torch.ops.polynext.pointwise_norm(x, wp, norm_weight, norm_bias, residual, n, float(eps), product)
    return _pointwise_norm(x, wp, norm_weight, norm_bias, residual, n, float(eps), product)


def poly_mlp_(x: torch.Tensor, in_weight: torch.Tensor, norm_weight: Optional[torch.Tensor],
              norm_bias: Optional[torch.Tensor], eps: float, out_weight: torch.Tensor) -> Optional[torch.Tensor]:
    """PolyMLP's residual branch added into ``x`` (the caller's own residual stream), in one kernel where it serves
    (module docstring), returning ``x``; None elsewhere (nothing written; the caller runs its own path):

        x += W_out · (LayerNorm_c(a ⊙ b) * norm_weight (+ norm_bias)),   [a, b] = W_in · x
    """
    n, k = in_weight.shape[:2]
    if not (mlp_switch.on and norm_weight is not None and n % 4 == 0 and out_weight.shape[:2] == (k, n // 2)
            and out_weight.shape[2:] == (1, 1) and out_weight.dtype == x.dtype and n // 2 <= MAX_IN
            and tile_width(k) and _norm_param(norm_weight, n // 2, x.dtype) and _norm_param(norm_bias, n // 2, x.dtype)
            and not (torch.is_grad_enabled() and out_weight.requires_grad) and _served(x, in_weight, None, bf16=True)):
        return None
    wp_in, wp_out = _packed(in_weight), _packed(out_weight)
    norm_weight, norm_bias = _as_f32(norm_weight), _as_f32(norm_bias)
    if profiling():
        return torch.ops.polynext.poly_mlp_(x, wp_in, norm_weight, norm_bias, wp_out, n, float(eps))
    return _poly_mlp_(x, wp_in, norm_weight, norm_bias, wp_out, n, float(eps))
