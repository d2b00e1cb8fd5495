"""1x1 convolutions whose training backward takes the faster weight-gradient kernel of this machine.

A 1x1 convolution's weight gradient is one matrix product over the pixels,

    dL/dW = Σ_pixels  g ⊗ x      i.e.  (out × pixels) · (pixels × in)   on the NHWC views,

and PyTorch hands it to oneDNN's 1x1 backward-weights kernel. On some shapes that kernel runs at about
half the rate of the same product as ``torch.mm`` on the same tensors; on others it is the faster one
(the weight gradient alone, on a 2-core AMD EPYC (Zen 3), batch 32: 288 → 504 channels at 7x7 5.0 ms
in oneDNN against 3.5 ms as ``torch.mm``, 144 → 192 at 14x14 4.0 against 3.0; 48 → 48 at 56x56 3.9
against 4.9; on a Zen 4 oneDNN's AVX-512 kernels are within ±10 % of ``torch.mm`` or faster). Which kernel wins depends on the CPU (MKL's
sgemm runs AVX2 code on AMD where oneDNN has AVX-512 kernels), so no fixed rule is right everywhere:
as cuDNN's benchmark mode does, the first backward of each shape times both on the tensors at hand and
the faster one serves that shape from then on.

What is timed is the layer's whole backward as each path runs it: oneDNN computes both gradients in one
call, the ``torch.mm`` path needs a second convolution call for the input gradient. Timing the weight
gradients alone picked ``torch.mm`` on a Zen 4 (AVX-512) for shapes where it was 2-9 % faster alone and
the whole backward was not, and the training step lost 13-39 ms to it (``benchmarks/weight_grad.py``).
``torch.mm`` must also win by ``MM_MARGIN`` (5 %): a near tie stays on PyTorch's own kernel, so the
choice does not follow timing noise.

Unlike cuDNN's benchmark mode the choice is kept on disk, one file per machine
(``$POLYNEXT_CACHE_DIR``, else ``$XDG_CACHE_HOME/polynext`` or ``~/.cache/polynext``:
``pointwise_kernels.json``, keyed by CPU model, instruction set, torch version and thread count):
every later process on the machine takes the same kernels, so two runs with one seed, and a killed run
and its resume, stay bit-identical (the two kernels round differently). Where the folder cannot be
written the choice holds for the process only. The ranks of a multi-process (torchrun) run only read
the file: a shape it does not hold runs PyTorch's own kernel there (``_routed``).

Why this is written by hand: neither PyTorch nor oneDNN chooses between the two kernels.

The input gradient and the forward are PyTorch's own (oneDNN) convolution, unchanged; the forward is
bit-identical to ``nn.Conv2d``. The chosen path applies to eager CPU training in float32 / float64
on channels-last activations (where the NHWC view costs nothing); anywhere else (inference, CUDA,
autocast, ``torch.compile`` / ``torch.export`` / tracing, a dispatch mode such as the FLOP counter,
NCHW inputs) ``PointwiseConv2d`` is exactly ``nn.Conv2d``. The gradient is first-order only
(a double backward, e.g. a gradient penalty, needs :func:`weight_grad_backend` ``('onednn')``).
"""
from __future__ import annotations

import contextlib
import functools
import json
import platform
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .fused import conv_add_
from .narrow_pointwise import narrow_pointwise, narrow_pointwise_applies

__all__ = ['PointwiseConv2d', 'pointwise_conv2d', 'pointwise_add_', 'split_pointwise', 'weight_grad_backend', 'weight_grad_choices', 'time_kernels',
           'choose', 'cache_path', 'MM_MARGIN']

BACKENDS = ('auto', 'onednn', 'mm')
_BACKEND = 'auto'
_CHOICE: Dict[Tuple[int, int, int, torch.dtype, int], str] = {}
_CACHE_FILE = 'pointwise_kernels.json'
_DISK: Optional[Dict[str, str]] = None   # the machine's file, read once per process
_TIMING_REPEATS = 3
MM_MARGIN = 1.05   # torch.mm must be this much faster than oneDNN to be chosen (module docstring)
_RULE = 'whole backward, mm by 5 %'   # in the machine file's keys: choices made by an earlier rule are re-measured
_EVICT_BYTES = 64 * 2**20
_EVICT: Optional[torch.Tensor] = None


@contextlib.contextmanager
def weight_grad_backend(name: str) -> Iterator[None]:
    """Inside the block every 1x1 weight gradient uses ``name``: 'auto' (the measured faster kernel,
    the default), 'onednn' (PyTorch's own convolution backward: plain ``nn.Conv2d``) or 'mm'."""
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"weight_grad_backend: {name!r} is not one of {BACKENDS}")
    before, _BACKEND = _BACKEND, name
    try:
        yield
    finally:
        _BACKEND = before


def weight_grad_choices() -> Dict[str, str]:
    """The kernel chosen so far for each shape, as ``'pixels x in -> out dtype threads': kernel``."""
    return {f'{n}x{ci}->{co} {str(dt).replace("torch.", "")} t{th}': k for (n, ci, co, dt, th), k in _CHOICE.items()}


def _conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool,
                   weight_grad: bool) -> tuple:
    """PyTorch's (oneDNN's) backward of the 1x1 convolution: the gradients asked for, in one call."""
    return torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                               [input_grad, weight_grad, False])


def _onednn_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _conv_backward(grad, x, weight, False, True)[1]


def _mm_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out_ch, in_ch = weight.shape[:2]
    g = grad.permute(0, 2, 3, 1).reshape(-1, out_ch)   # views: both are channels-last
    xs = x.permute(0, 2, 3, 1).reshape(-1, in_ch)
    # the weight's own strides (a 1x1 weight is laid out the same in both formats): DDP's gradient buckets
    # are views with the parameter's strides
    return torch.mm(g.t(), xs).as_strided(weight.shape, weight.stride())


_KERNELS = {'onednn': _onednn_weight_grad, 'mm': _mm_weight_grad}


def _onednn_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool) -> None:
    """The backward of a plain ``F.conv2d``: both gradients from one oneDNN call."""
    _conv_backward(grad, x, weight, input_grad, True)


def _mm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool) -> None:
    """The backward of ``_PointwiseConvFunction`` on the 'mm' kernel."""
    if input_grad:
        _conv_backward(grad, x, weight, True, False)
    _mm_weight_grad(grad, x, weight)


_BACKWARDS = {'onednn': _onednn_backward, 'mm': _mm_backward}


def _evict_caches() -> None:
    """Writes a buffer larger than a server CPU's last-level cache: in a training step a weight
    gradient reads activations that left the caches long ago, and a kernel timed on warm data is
    not the one that wins in the step (measured: 96 → 96 channels at 28x28 picks the wrong kernel
    warm)."""
    global _EVICT
    if _EVICT is None:
        _EVICT = torch.empty(_EVICT_BYTES // 4)
    _EVICT.fill_(1.0)


def time_kernels(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 repeats: int = _TIMING_REPEATS, input_grad: bool = True) -> Dict[str, float]:
    """Best seconds of the layer's backward on each path ('onednn': both gradients in one call; 'mm': the
    input gradient's call, if ``input_grad``, and ``torch.mm``), interleaved and from cold caches (a first
    untimed call each builds oneDNN's primitives). The first backward of a shape chooses by it."""
    best = {}
    for backward in _BACKWARDS.values():
        backward(grad, x, weight, input_grad)
    for _ in range(repeats):
        for name, backward in _BACKWARDS.items():
            _evict_caches()
            start = time.perf_counter()
            backward(grad, x, weight, input_grad)
            best[name] = min(best.get(name, float('inf')), time.perf_counter() - start)
    return best


def choose(best: Dict[str, float]) -> str:
    """The kernel for a shape from :func:`time_kernels`' times: 'mm' only if it wins by ``MM_MARGIN``."""
    return 'mm' if best['mm'] * MM_MARGIN < best['onednn'] else 'onednn'


def cache_path() -> Path:
    """The file that keeps this machine's kernel choices (see the module docstring)."""
    from .cache import cache_dir
    return cache_dir() / _CACHE_FILE


@functools.lru_cache(maxsize=None)   # read once: a forward looks shapes up on every call
def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
    except OSError:
        pass
    return f'{model} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__}'


def _disk_key(key: Tuple[int, int, int, torch.dtype, int]) -> str:
    pixels, in_ch, out_ch, dtype, threads = key
    return (f'{_machine()} | {threads} threads | {_RULE} | '
            f'{pixels}x{in_ch}->{out_ch} {str(dtype).replace("torch.", "")}')


def _read_disk() -> Dict[str, str]:
    try:
        data = json.loads(cache_path().read_text())
        return {k: v for k, v in data.get('choices', {}).items() if v in _KERNELS}
    except (OSError, ValueError, AttributeError):
        return {}


def _remember(key: Tuple[int, int, int, torch.dtype, int], name: str) -> None:
    """Adds one choice to the machine's file (read again first: other processes may have added some)."""
    from ..checkpoint import atomic_write_json
    choices = _read_disk()
    choices[_disk_key(key)] = name
    try:
        atomic_write_json(cache_path(), {'about': 'polynext: the faster 1x1 weight-gradient kernel per shape '
                                                  '(polynext.ops.pointwise); delete to re-measure',
                                         'choices': dict(sorted(choices.items()))})
    except OSError as err:
        warnings.warn(f'polynext: cannot keep the 1x1 kernel choices in {cache_path()} ({err}); '
                      'set POLYNEXT_CACHE_DIR to a writable folder to keep runs bit-identical across processes')


def _known(key: Tuple[int, int, int, torch.dtype, int]) -> Optional[str]:
    """The kernel already chosen for ``key`` in this process or on this machine, else None."""
    global _DISK
    name = _CHOICE.get(key)
    if name is None:
        if _DISK is None:
            _DISK = _read_disk()
        name = _DISK.get(_disk_key(key))
        if name is not None:
            _CHOICE[key] = name
    return name


def _measure(key: Tuple[int, int, int, torch.dtype, int], grad: torch.Tensor, x: torch.Tensor,
             weight: torch.Tensor, input_grad: bool) -> str:
    """Chooses the kernel for a shape neither this process nor the machine's file held: the file is read
    again first (another process may have measured it meanwhile), else both kernels are timed."""
    global _DISK
    _DISK = _read_disk()
    name = _DISK.get(_disk_key(key))
    if name is None:
        name = choose(time_kernels(grad, x, weight, input_grad=input_grad))
        _remember(key, name)
        _DISK[_disk_key(key)] = name
    _CHOICE[key] = name
    return name


def _multi_process() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _key(x: torch.Tensor, weight: torch.Tensor) -> Tuple[int, int, int, torch.dtype, int]:
    return x.numel() // x.shape[1], x.shape[1], weight.shape[0], x.dtype, torch.get_num_threads()


def _weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool) -> torch.Tensor:
    name = _BACKEND
    if name == 'auto':
        key = _key(x, weight)
        name = _known(key) or _measure(key, grad, x, weight, input_grad)
    return _KERNELS[name](grad, x, weight)


def _routed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this convolution's backward goes through ``_PointwiseConvFunction``: where 'mm' is (or
    may be) the faster kernel. Shapes known to prefer oneDNN stay plain ``F.conv2d`` (one backward
    call for both gradients). In a multi-process (torchrun) run a shape the machine's file does not
    hold stays plain too: the ranks do not time kernels inside their backward (two-process gloo runs
    aborted at times here with it, ``terminate called without an active exception``; not traced
    further), so such runs take the choices a single-process run has measured."""
    if _BACKEND == 'mm':
        return True
    name = _known(_key(x, weight))
    return name == 'mm' or (name is None and not _multi_process())


class _PointwiseConvFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _conv_backward(grad, x, weight, True, False)[0]
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(grad, x, weight, ctx.needs_input_grad[0])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if _BACKEND == 'onednn' or not (torch.is_grad_enabled() and weight.requires_grad):
        return False
    exporting = getattr(torch.compiler, 'is_exporting', None)
    if (torch.compiler.is_compiling() or (exporting is not None and exporting()) or torch.jit.is_tracing()
            or torch.jit.is_scripting()):
        return False
    if type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, nn.Parameter):
        return False
    if x.device.type != 'cpu' or x.dim() != 4 or x.dtype not in (torch.float32, torch.float64):
        return False
    if weight.dtype != x.dtype or torch.is_autocast_enabled('cpu'):
        return False
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode
    return not is_in_torch_dispatch_mode()


def pointwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 weight (stride 1, no padding, one group), with the
    weight gradient of the faster kernel in CPU training (see the module docstring); at CPU inference
    ``ops.narrow_pointwise``'s kernel where it serves the shape (outputs a multiple of 72 or 48)."""
    if _applies(x, weight) and _routed(x, weight):
        return _PointwiseConvFunction.apply(x, weight, bias)
    if narrow_pointwise_applies(x, weight, bias):
        return narrow_pointwise(x, weight)
    return F.conv2d(x, weight, bias)


def pointwise_add_(residual: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d,
                   weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual += conv(x)`` for a 1x1 ``conv`` (``weight`` replacing its weight), written into ``residual`` (the
    caller's own tensor): ``ops.narrow_pointwise``'s kernel where it serves the shape, else ``ops.fused.conv_add_``
    (oneDNN's sum post-op, or the convolution and an addition)."""
    w = conv.weight if weight is None else weight
    if (narrow_pointwise_applies(x, w, conv.bias) and residual.dtype == torch.float32
            and residual.is_contiguous(memory_format=torch.channels_last)):
        return narrow_pointwise(x, w, out=residual)
    return conv_add_(residual, x, conv, weight=weight)


def split_pointwise(x: torch.Tensor, conv: nn.Conv2d, split: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``conv(x).split([split, rest], dim=1)`` for a 1x1 ``conv``, as two convolutions by its first ``split`` weight
    rows and the rest: the same values (the same sums per output channel; in float32 equal bit for bit in the tests
    and in the APolyNeXt logits below, though oneDNN could block a narrower product's sums differently), each part
    its own contiguous tensor.

    PolyAttn splits its Q/K/V projection's output into ``qk`` and ``v``; as slices of one channels-last tensor they
    are strided views, and PyTorch's depthwise convolution copies such an input into a contiguous one first: three
    copies per attention layer (Q's and K's of ``qk``, V's of ``v``). Two 1x1 convolutions write the parts contiguous
    from the start. Measured on a 2-core AMD EPYC (Zen 4), batch 32, APolyNeXt-T / -S, logits bit-identical
    (``benchmarks/qkv_split.py``): inference x1.014 / x1.010 in fp32 and x1.005 / x1.009 in bf16, bf16 channels-last
    x1.022 / x1.011; training (T, fp32) x1.003: within this VM's run-to-run noise (a first scratch A/B gave
    x1.06 / x1.05 in fp32, a channels-last one x0.97-0.98), so the gain is three copies fewer, not a measured speed.
    """
    w, b = conv.weight, conv.bias
    return (pointwise_conv2d(x, w[:split], None if b is None else b[:split]),
            pointwise_conv2d(x, w[split:], None if b is None else b[split:]))


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)``: same parameters, state dict and forward; in CPU
    training its weight gradient comes from :func:`pointwise_conv2d`."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_channels, out_channels, 1, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_conv2d(x, self.weight, self.bias)
