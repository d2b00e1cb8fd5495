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
input channels, a CPU with AVX-512, the kernels on (``ops.cpu_kernels.kernels`` and
``ops.cpu_kernels.narrow_pointwise`` for this one alone). Elsewhere PyTorch's convolution. The sums run over the
input channels in order in float32, as oneDNN's did here (logits equal bit for bit in the benchmark's whole-model
runs; the tests allow float32 rounding). Registered as ``polynext::pointwise`` / ``polynext::pointwise_add_`` for the
profiler (1x1 convolutions there).
"""
from __future__ import annotations

from typing import Optional

import torch

from .cpu_kernels import kernel_available, library, narrow_pointwise as narrow_switch, profiling
from .fused import eager_cpu_inference

__all__ = ['narrow_pointwise', 'narrow_pointwise_applies', 'tile_width', 'TILES', 'MAX_IN']

#: the kernel's register tiles: 72 outputs x 5 pixels, or 48 x 8
TILES = (72, 48)


def tile_width(out_channels: int) -> int:
    """The tile width the kernel takes for this many outputs (72 where they are a multiple of 72, else 48), or 0
    where neither divides them (oneDNN's path)."""
    return next((t for t in TILES if out_channels % t == 0), 0)


#: the kernel's limit on input channels (its partial-tile buffer on the stack)
MAX_IN = 1024


def narrow_pointwise_applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`narrow_pointwise` serves ``F.conv2d(x, weight, bias)`` (module docstring)."""
    if not (narrow_switch.on and bias is None and x.dim() == 4 and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.dim() == 4 and weight.shape[2:] == (1, 1)
            and tile_width(weight.shape[0]) and weight.shape[1] == x.shape[1] <= MAX_IN
            and weight.device == x.device and not (torch.is_grad_enabled() and weight.requires_grad)
            and x.is_contiguous(memory_format=torch.channels_last) and not torch.is_autocast_enabled('cpu')
            and eager_cpu_inference(x)):
        return False
    return kernel_available() and library().pointwise


def _packed(weight: torch.Tensor) -> torch.Tensor:
    """(N, K, 1, 1) → the kernel's layout: per chunk of CW outputs, (K, CW) row-major."""
    n, k = weight.shape[:2]
    cw = tile_width(n)
    return weight.reshape(n // cw, cw, k).transpose(1, 2).contiguous().reshape(-1)


def _call(x: torch.Tensor, wp: torch.Tensor, y: torch.Tensor, accumulate: bool) -> None:
    n = y.shape[1]
    status = library().polynext_pointwise_f32(x.data_ptr(), wp.data_ptr(), y.data_ptr(), x.numel() // x.shape[1],
                                              x.shape[1], n, tile_width(n), int(accumulate), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f'polynext::pointwise: {x.shape[1]} → {n} channels is not served here '
                           '(check narrow_pointwise_applies first)')


def _pointwise(x: torch.Tensor, wp: torch.Tensor, out_channels: int) -> torch.Tensor:
    y = torch.empty((x.shape[0], out_channels) + tuple(x.shape[2:]), dtype=x.dtype,
                    memory_format=torch.channels_last)
    _call(x, wp, y, False)
    return y


def _pointwise_add_(x: torch.Tensor, wp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _call(x, wp, y, True)
    return y


_LIB = torch.library.Library('polynext', 'FRAGMENT')
_LIB.define('pointwise(Tensor x, Tensor packed_weight, int out_channels) -> Tensor')
_LIB.define('pointwise_add_(Tensor x, Tensor packed_weight, Tensor(a!) out) -> Tensor(a!)')
_LIB.impl('pointwise', _pointwise, 'CPU')
_LIB.impl('pointwise_add_', _pointwise_add_, 'CPU')


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
