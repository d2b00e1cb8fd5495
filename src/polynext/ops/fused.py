"""Convolutions fused with the elementwise work that follows them, for CPU inference in eager mode.

PolyNeXt's elementwise work (Hadamard products, gates, residual additions) is a large part of its
time on a CPU (spec ``cpu_performance.md``: 25-44 %), and each of those operations is one more
pass over a tensor that does not fit in the caches. oneDNN, which runs PyTorch's CPU
convolutions, can apply such an operation to a convolution's output while it is still in
registers ("post-ops"); PyTorch exposes this as ``torch.ops.mkldnn._convolution_pointwise``
(the operator that inductor emits for the same fusions). Two fusions are used:

* ``conv_add_(residual, x, conv)``: ``residual += conv(x)`` in place (oneDNN's sum post-op): the
  residual addition after PolyMLP's ``fc_out`` and PolyAttn's ``proj`` costs no pass at all;
* ``conv_mul(x, other, conv)``: ``conv(x) ⊙ other`` (binary post-op): PolyConv's product of its
  coarse and fine branches is written by the coarse depthwise convolution.

They apply only where the result is the same tensor operation: eager CPU inference (no autograd
recording, not under ``torch.compile`` / ``torch.export`` / tracing / a dispatch mode such as
the FLOP counter), plain tensors, float32 (bfloat16 where oneDNN supports it on this CPU). Elsewhere
the functions compute the same thing with ``F.conv2d`` and an elementwise operation, so the
callers need no second code path. The results are bit-identical to the unfused ones in the tests
(the convolution is the same oneDNN kernel; the post-op is the same float operation).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['fusion_available', 'can_fuse', 'eager_cpu', 'eager_cpu_inference', 'conv_add_', 'conv_mul', 'fusion', 'Switch']

class Switch:
    """An on/off setting with a ``with``-block override: ``with switch(False): ...`` (A/B timing and tests)."""

    def __init__(self, on: bool = True):
        self.on = on

    @contextlib.contextmanager
    def __call__(self, enabled: bool):
        before, self.on = self.on, enabled
        try:
            yield
        finally:
            self.on = before


#: the fused paths on or off: ``with fusion(False): ...`` (for A/B timing and tests)
fusion = Switch()


@functools.lru_cache(maxsize=None)
def fusion_available(dtype: torch.dtype = torch.float32) -> bool:
    """True when this PyTorch build and CPU run oneDNN post-op convolutions in ``dtype``."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_convolution_pointwise')):
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def _in_dispatch_mode() -> bool:
    """A dispatch mode (the FLOP counter, fake tensors) or a ``torch.func`` transform (``vmap``, ``grad``: their
    tensors are wrappers whose memory a foreign kernel cannot read)."""
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode
    functorch = getattr(torch._C, '_are_functorch_transforms_active', lambda: False)
    return is_in_torch_dispatch_mode() or functorch()


def eager_cpu(*tensors: torch.Tensor, inference: bool = False) -> bool:
    """Whether these tensors are eager CPU work, where polynext's hand-written paths may replace the plain
    operations: fusions on, not under ``torch.compile`` / ``torch.export`` / tracing / a dispatch mode / a
    ``torch.func`` transform, plain CPU tensors of one dtype; with ``inference``, also no autograd recording."""
    exporting = getattr(torch.compiler, 'is_exporting', None)
    if (not fusion.on or torch.compiler.is_compiling() or (exporting is not None and exporting())
            or torch.jit.is_tracing() or torch.jit.is_scripting()):
        return False
    first = tensors[0]
    grad = inference and torch.is_grad_enabled()
    for t in tensors:
        if type(t) is not torch.Tensor or t.device.type != 'cpu' or t.dtype != first.dtype:
            return False
        if grad and t.requires_grad:
            return False
    return not _in_dispatch_mode()


def eager_cpu_inference(*tensors: torch.Tensor) -> bool:
    """Whether these tensors are eager CPU inference, where polynext's hand-fused paths may replace the plain
    operations (this module's oneDNN post-ops, the kernels of ``ops.cpu_kernels``): :func:`eager_cpu` and no
    autograd recording."""
    return eager_cpu(*tensors, inference=True)


def can_fuse(*tensors: torch.Tensor) -> bool:
    """Whether the oneDNN fused path applies to these activations (see the module docstring)."""
    if not eager_cpu_inference(*tensors) or not torch.backends.mkldnn.enabled:   # (compiling: checked first)
        return False
    for t in tensors:
        if t.dim() != 4 or not t.is_contiguous(memory_format=torch.channels_last):
            return False
    return fusion_available(tensors[0].dtype)


def _geometry(conv: nn.Conv2d):
    if conv.padding_mode != 'zeros' or isinstance(conv.padding, str):
        return None
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def _weight_ok(weight: torch.Tensor, x: torch.Tensor) -> bool:
    return weight.dtype == x.dtype and weight.device == x.device and not (torch.is_grad_enabled() and weight.requires_grad)


def conv_add_(residual: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d,
              weight: torch.Tensor = None) -> torch.Tensor:
    """``residual += conv(x)`` (``weight`` replaces ``conv.weight`` when given); returns ``residual``.

    ``residual`` is written in place; the caller must own it."""
    w = conv.weight if weight is None else weight
    geo = _geometry(conv)
    if geo is not None and can_fuse(residual, x) and _weight_ok(w, x):
        padding, stride, dilation, groups = geo
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            residual, x, w, conv.bias, padding, stride, dilation, groups, 'add', None, None, [], None)
    y = F.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups) if weight is not None \
        else conv(x)
    return residual.add_(y)


def conv_mul(x: torch.Tensor, other: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x) ⊙ other`` as a new tensor (``other`` has the convolution's output shape)."""
    geo = _geometry(conv)
    if geo is not None and can_fuse(x, other) and _weight_ok(conv.weight, x):
        padding, stride, dilation, groups = geo
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, conv.weight, conv.bias, padding, stride, dilation, groups, 'mul', None, None, [], None)
    return conv(x) * other
