"""PolyNeXt: activation-free polynomial vision backbones.

Paper: "Activation-Free Backbones for Image Recognition: Polynomial Alternatives within
MetaFormer-Style Vision Models" (ICML 2026, arXiv 2605.20839).
Reference code: https://github.com/jjwang8/PolyNeXt (commit be990cb).

There are no pointwise activations and no softmax anywhere. Nonlinearity comes from
Hadamard products:

  * PolyMLP   W_o · Norm((W_a x) ⊙ (W_b x))
  * PolyConv  W_o · DW3x3(DWcoarse(u) ⊙ flip_c(DW3x3(u))),  u = W_i x
  * PolyAttn  (sigmoid(l_h) Q Kᵀ + 1)^4, l1-normalised rows; Q, K share one projection

Stability comes from Sigmoid-Scale residuals (x + sigmoid(l) f(x)) and multi-input skip
cells that read the outputs of the two previous cells. Module, init and key layout follow
the reference exactly (``load_reference_state_dict`` converts the authors' key names);
the forward is re-written for speed (channels-last, fused norms, in-place gated residuals
at inference, a memory-lean attention kernel).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention2d, DropPath, Mlp, SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.metaformer import SepConv
from torch.utils.checkpoint import checkpoint

from ..checkpoint import load_state_dict_strict, model_name, unwrap_state_dict
from ..errors import CheckpointError
from ..ops.attention_convs import attention_convs, attention_convs_applies, heads_conv, scaled_taps
from ..ops.channel_norm import channel_layer_norm, channel_norm_nchw, product_norm_nchw
from ..ops.constants import scaled_weight
from ..ops.depthwise import StridedDepthwiseConv2d, depthwise_conv2d
from ..ops.flip_product import flip_product
from ..ops.narrow_pointwise import pointwise_norm, poly_mlp_
from ..ops.polyconv_dw import depthwise_taps, polyconv_dw, polyconv_dw_applies
from ..ops.fused import can_fuse, conv_mul
from ..ops.pointwise import PointwiseConv2d, pointwise_add_, pointwise_conv2d, split_pointwise
from ..ops.poly_attention import poly_attention
from ..ops.window_attention import neighborhood_attention

__all__ = [
    'PolyNeXt', 'PolyNeXtCell', 'PolyNeXtStage', 'PolyConvBlock', 'PolyAttnBlock', 'Ablation',
    'PolyMLP', 'PolyConv', 'PolyAttn', 'HadamardProduct',
    'SigmoidScale', 'FreeScale', 'LayerScaleGates', 'ChannelScale',
    'LayerNorm2d', 'ChannelBatchNorm', 'RunningRowSumNorm', 'calibrate_running_stats',
    'GatedHead', 'HeadDropout', 'ABLATIONS', 'PUBLISHED_ARCHS',
    'checkpoint_filter_fn', 'reference_key_map', 'is_reference_layout', 'infer_reference_arch',
    'convert_reference_state_dict', 'load_reference_state_dict', 'CIFAR_MEAN', 'CIFAR_STD',
]

CIFAR_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR_STD = (0.24703233, 0.24348505, 0.26158768)


def poly_init_(weight: torch.Tensor) -> torch.Tensor:
    """The reference's "POLY init": N(0, 2 / fan_in) (Kaiming normal, ReLU gain)."""
    return nn.init.kaiming_normal_(weight, nonlinearity='relu')


def _size2(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


# --------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """Channel LayerNorm on NCHW tensors, weight only (no bias):

        y[:, c] = (x[:, c] - mean_c x) / sqrt(var_c x + eps) · w[c]

    Computed with ``F.layer_norm`` on the NHWC view, which is free for channels-last
    tensors, and on the CPU by ``ops.channel_norm``'s kernels (inference, and float32 training with
    a backward kernel; same values to rounding).
    (The reference uses the one-pass variance E[x²]−E[x]²; the difference is rounding only,
    ≤ 4.4e-6 on the golden logits.)
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, bias: bool = False):
        super().__init__(num_channels, eps=eps, elementwise_affine=True, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_norm_nchw(x, self.weight, self.bias, self.eps)


class ChannelBatchNorm(nn.Module):
    """Fully polynomial norm of the "bn" variants: batch-and-channel statistics per position.

        mean[h,w] = E_{n,c} x,  var[h,w] = E_{n,c} x² − mean²   (biased)
        y = (x − mean) · rsqrt(var + eps) · γ_hw[h,w] · γ_c[c]

    Training uses batch statistics and updates running buffers with momentum 0.1; eval uses
    the running buffers, so inference is additions and multiplications only (FHE-friendly).
    Unlike the reference, γ_hw and the running buffers are created here, at construction,
    for a fixed ``spatial_size``; another input size is an error, not a silent reset.
    """

    def __init__(self, num_channels: int, spatial_size: Tuple[int, int], eps: float = 1e-5,
                 momentum: float = 0.1):
        super().__init__()
        h, w = _size2(spatial_size)
        self.num_channels = num_channels
        self.spatial_size = (h, w)
        self.eps = eps
        self.momentum = momentum
        self.gamma_c = nn.Parameter(torch.ones(num_channels))
        self.gamma_hw = nn.Parameter(torch.ones(1, 1, h, w))
        self.register_buffer('running_mean', torch.zeros(1, 1, h, w))
        self.register_buffer('running_var', torch.ones(1, 1, h, w))
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.spatial_size:
            raise ValueError(
                f'ChannelBatchNorm was built for {self.spatial_size[0]}x{self.spatial_size[1]} feature maps '
                f'but got {x.shape[-2]}x{x.shape[-1]}: the bn variants have per-position weights and '
                f'statistics, so build the model with the img_size you feed it.')
        if self.training:
            mean = x.mean(dim=(0, 1), keepdim=True)
            var = ((x * x).mean(dim=(0, 1), keepdim=True) - mean * mean).clamp(min=0.0)
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * var)
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.gamma_hw * self.gamma_c.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f'{self.num_channels}, spatial_size={self.spatial_size}, eps={self.eps}, momentum={self.momentum}'


class RunningRowSumNorm(nn.Module):
    """Fully polynomial replacement of the attention l1 row normalisation ("bn" variants).

        d[h,t] = E_batch Σ_k A[b,h,t,k]            (training: batch mean of the row sums)
        running_d ← 0.9 running_d + 0.1 d           (eval: use running_d)
        out = A / (d + eps) · γ[h,t]

    No abs, no bias; γ and running_d have shape (1, heads, tokens, 1).
    """

    def __init__(self, num_heads: int, num_tokens: int, eps: float = 1e-6, momentum: float = 0.1):
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.gamma = nn.Parameter(torch.ones(1, num_heads, num_tokens, 1))
        self.register_buffer('running_denom', torch.ones(1, num_heads, num_tokens, 1))
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long))

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        if self.training:
            denom = attn.sum(dim=-1, keepdim=True).mean(dim=0, keepdim=True)
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum
                self.running_denom.mul_(1 - m).add_(m * denom)
        else:
            denom = self.running_denom
        return attn / (denom + self.eps) * self.gamma


def calibrate_running_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every running statistic of ``model`` (``ChannelBatchNorm``, ``RunningRowSumNorm``, any BatchNorm)
    to that of the batch ``x``: one train-mode pass with momentum 1, the momenta restored, eval mode.

    For bn-variant models without trained weights (tests, analyses, benchmarks), whose initial statistics
    (mean 0, variance 1, row sums 1) normalise nothing. Returns ``model``.
    """
    norms = [m for m in model.modules() if hasattr(m, 'num_batches_tracked') and hasattr(m, 'momentum')]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(x)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model.eval()


def make_norm(kind: str, num_channels: int, spatial_size: Optional[Tuple[int, int]] = None,
              device=None, dtype=None) -> nn.Module:
    """'ln' → LayerNorm2d (published models); 'bn' → ChannelBatchNorm (fully polynomial)."""
    if kind == 'ln':
        norm = LayerNorm2d(num_channels)
    elif kind == 'bn':
        norm = ChannelBatchNorm(num_channels, spatial_size)
    else:
        raise ValueError(f"norm must be 'ln' or 'bn', got {kind!r}")
    return norm.to(device=device, dtype=dtype) if device is not None or dtype is not None else norm


# --------------------------------------------------------------------------------------
# Residual gates
# --------------------------------------------------------------------------------------

def gated_residual(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate · branch, evaluated as ``branch * gate + x`` like the reference.

    Without autograd the product is written into ``branch`` (a fresh tensor owned by the
    caller), so no new activation is allocated; with autograd one fused ``addcmul``.
    """
    if torch.is_grad_enabled() and (x.requires_grad or branch.requires_grad or gate.requires_grad):
        return torch.addcmul(x, branch, gate)
    return branch.mul_(gate).add_(x)


def _gated_conv(conv: nn.Conv2d, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """gate · conv(x) as conv(x) with its weight (and bias) scaled by the gate (a scalar or one value per
    output channel).

    Exact in real arithmetic (rounding differs at the last bit), and cheaper than the product: the
    gate touches the weight, not the activation, so a training step loses the forward's product and
    the backward's two passes over the branch (its gradient times the gate, the gate's gradient as a
    sum of products); the gate's gradient comes out of the weight's, a dot product the size of the
    weight. A residual block then adds the stream in place, as the reference's ``x + g · f(x)``."""
    g = gate.reshape(-1, 1, 1, 1)
    bias = None if conv.bias is None else conv.bias * gate.reshape(-1)
    if isinstance(conv, PointwiseConv2d):
        return pointwise_conv2d(x, conv.weight * g, bias)
    return F.conv2d(x, conv.weight * g, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class ResidualScale(nn.Module):
    """A bank of residual branch scales; ``gates()`` returns them, ``forward`` applies one."""

    def gates(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, branch: torch.Tensor, index: int = 0) -> torch.Tensor:
        return gated_residual(x, branch, self.gates()[index])


class SigmoidScale(ResidualScale):
    """Sigmoid-Scale residual gate(s): y = x + sigmoid(l) · f(x).

    ``init_values`` are the initial gates (probabilities) or, with ``values_are_logits``,
    the initial logits l. The probability → logit conversion is done in float32 exactly as
    the reference does it (log(−v / (v − 1))).
    """

    def __init__(self, init_values: Union[float, Sequence[float]] = 0.5, values_are_logits: bool = False):
        super().__init__()
        v = torch.tensor([init_values] if isinstance(init_values, (int, float)) else list(init_values),
                         dtype=torch.float32)
        self.logits = nn.Parameter(v if values_are_logits else (-v / (v - 1)).log())

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


class FreeScale(ResidualScale):
    """Ablation "Sigmoid-Scale → free scalar": y = x + s · f(x), s starting at the same value."""

    def __init__(self, init_values: Sequence[float], values_are_logits: bool = False):
        super().__init__()
        v = torch.tensor(list(init_values), dtype=torch.float32)
        self.scales = nn.Parameter(torch.sigmoid(v) if values_are_logits else v)

    def gates(self) -> torch.Tensor:
        return self.scales


class LayerScaleGates(ResidualScale):
    """Ablation "Sigmoid-Scale → LayerScale": a per-channel scale per residual, init ``init_value``."""

    def __init__(self, num_gates: int, dim: int, init_value: float = 1e-6):
        super().__init__()
        self.scales = nn.Parameter(torch.full((num_gates, dim, 1, 1), float(init_value)))

    def gates(self) -> torch.Tensor:
        return self.scales


class ChannelScale(nn.Module):
    """Per-channel learnable input scale of the multi-input skip (shape 1×C×1×1, init 1)."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, num_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


# --------------------------------------------------------------------------------------
# Token mixers and channel MLP
# --------------------------------------------------------------------------------------

class _HalvesProduct(torch.autograd.Function):
    """y = m[:, :h] ⊙ m[:, h:] for m with 2h channels.

    Written by hand because autograd's backward of ``chunk`` concatenates the two half
    gradients (one extra pass over the 2h-channel tensor, ~8 % of a CPolyNeXt-T training
    step on CPU); here both halves are written straight into one buffer. On channels-last
    tensors the writes go through the NHWC view: a channel half of an NCHW-indexed
    channels-last tensor makes TensorIterator pick a slow order for ``out=`` (3x slower at
    stage-0 shapes on an AMD EPYC).
    """

    @staticmethod
    def forward(ctx, m: torch.Tensor) -> torch.Tensor:
        a, b = m.chunk(2, dim=1)
        ctx.save_for_backward(m)
        return a * b

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (m,) = ctx.saved_tensors
        grad_m = torch.empty_like(m)
        dim = 1
        if m.dim() == 4 and m.is_contiguous(memory_format=torch.channels_last):
            m, grad, out, dim = m.permute(0, 2, 3, 1), grad.permute(0, 2, 3, 1), grad_m.permute(0, 2, 3, 1), -1
        else:
            out = grad_m
        a, b = m.chunk(2, dim=dim)
        ga, gb = out.chunk(2, dim=dim)
        torch.mul(grad, b, out=ga)
        torch.mul(grad, a, out=gb)
        return grad_m


class HadamardProduct(nn.Module):
    """The multiplicative interaction a ⊙ b, with the paper's ablation switches.

    op='add' replaces the product by a sum; gelu='one_branch' computes GELU(a) ⊙ b and
    gelu='after' computes GELU(a ⊙ b). The defaults are the published model.
    """

    def __init__(self, op: str = 'mul', gelu: str = 'none'):
        super().__init__()
        if op not in ('mul', 'add') or gelu not in ('none', 'one_branch', 'after'):
            raise ValueError(f'HadamardProduct: bad op={op!r} or gelu={gelu!r}')
        self.op = op
        self.gelu = gelu

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.gelu == 'one_branch':
            a = F.gelu(a)
        y = a * b if self.op == 'mul' else a + b
        return F.gelu(y) if self.gelu == 'after' else y

    @property
    def is_product(self) -> bool:
        """True for the published interaction, the plain product a ⊙ b."""
        return self.op == 'mul' and self.gelu == 'none'

    def halves(self, m: torch.Tensor) -> torch.Tensor:
        """The interaction of the two channel halves of ``m``."""
        if (self.is_product and torch.is_grad_enabled() and m.requires_grad
                and not torch.compiler.is_compiling()):   # (inductor fuses the plain form's backward itself)
            return _HalvesProduct.apply(m)
        return self(*m.chunk(2, dim=1))

    def extra_repr(self) -> str:
        return f'op={self.op}, gelu={self.gelu}'


class PolyMLP(nn.Module):
    """PolyMLP(x) = W_o · Norm((W_a x) ⊙ (W_b x)).

    W_a and W_b are the two halves of one 1x1 conv (``fc_in``, C → 2·hidden); the norm sits
    between the product and the output projection, as in the reference.
    """

    def __init__(self, dim: int, hidden_dim: int, norm_layer: Optional[Callable[[int], nn.Module]] = LayerNorm2d,
                 product: Optional[HadamardProduct] = None):
        super().__init__()
        self.fc_in = PointwiseConv2d(dim, 2 * hidden_dim, bias=False)
        self.fc_out = PointwiseConv2d(hidden_dim, dim, bias=False)
        poly_init_(self.fc_out.weight)
        poly_init_(self.fc_in.weight)
        self.norm = norm_layer(hidden_dim) if norm_layer is not None else nn.Identity()
        self.product = product or HadamardProduct()

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Norm((W_a x) ⊙ (W_b x)): everything before ``fc_out``."""
        fused = self.product.is_product and isinstance(self.norm, LayerNorm2d) and self.fc_in.bias is None
        if fused:   # CPU inference: fc_in, the product and the norm in one kernel, fc_in's output never written
            y = pointwise_norm(x, self.fc_in.weight, self.norm.weight, self.norm.bias, self.norm.eps, product=True)
            if y is not None:
                return y
        m = self.fc_in(x)
        if fused:
            n = self.norm
            y = product_norm_nchw(m, n.weight, n.bias, n.eps)   # CPU inference: the product is not written
            if y is not None:
                return y
        return self.norm(self.product.halves(m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.hidden(x))


class PolyConv(nn.Module):
    """PolyConv(x) = W_o · DW3x3( DWcoarse(u) ⊙ flip_c(DW3x3(u)) ),  u = W_i x.

    The coarse branch is a dilated depthwise conv (3x3 dilation 2 in stage 0, 5x5 dilation 2
    later); the fine branch is a 3x3 depthwise conv whose output channel order is reversed
    before the product (channel c meets channel C_inner−1−c).
    """

    def __init__(self, dim: int, inner_dim: int, coarse_kernel: int = 5, coarse_dilation: int = 2,
                 product: Optional[HadamardProduct] = None):
        super().__init__()
        d = inner_dim
        self.pw_in = PointwiseConv2d(dim, d, bias=False)
        self.coarse = nn.Conv2d(d, d, coarse_kernel, padding=coarse_dilation * (coarse_kernel - 1) // 2,
                                dilation=coarse_dilation, groups=d, bias=False)
        self.fine = nn.Conv2d(d, d, 3, padding=1, groups=d, bias=False)
        self.dw_out = nn.Conv2d(d, d, 3, padding=1, groups=d, bias=False)
        self.pw_out = PointwiseConv2d(d, dim, bias=False)
        # the reference's construction and init order, so that a seed gives the same weights
        for conv in (self.dw_out, self.pw_out, self.pw_in, self.coarse, self.fine):
            poly_init_(conv.weight)
        self.product = product or HadamardProduct()

    def core(self, u: torch.Tensor) -> torch.Tensor:
        """The depthwise core between the pointwise convolutions: DW3x3(DWcoarse(u) ⊙ flip_c(DW3x3(u)))."""
        if self.product.is_product and polyconv_dw_applies(u, self.coarse, self.fine, self.dw_out):
            return polyconv_dw(u, self.coarse, self.fine, self.dw_out)   # CPU inference: one kernel, one pass
        fine = depthwise_conv2d(u, self.fine)
        if not self.product.is_product:                     # the ablations' interactions
            y = self.product(depthwise_conv2d(u, self.coarse), fine.flip(1))
        elif can_fuse(u, fine):                             # CPU inference: the product is the coarse conv's post-op
            y = conv_mul(u, fine.flip(1), self.coarse)
        else:                                               # the reversal read in the product's pass (CPU kernel)
            y = flip_product(depthwise_conv2d(u, self.coarse), fine)
        return depthwise_conv2d(y, self.dw_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw_out(self.core(self.pw_in(x)))


class PolyAttn(nn.Module):
    """PolyAttn: polynomial-kernel attention with shared Q/K projection and local convs.

        [qk, v] = W_qkv x                      (one 1x1 conv, C → 2A; Q and K share ``qk``)
        Q = DW5x5_q(qk), K = DW5x5_k(qk), V = DW3x3(v)          (per head: head_dim channels)
        A = (sigmoid(l_h) · Q Kᵀ + 1)^4;  O = (A / ‖A‖₁,row) V
        out = W_o · DW3x3(O)

    A = head_dim · num_heads (the reference uses num_heads = ceil(C/64), head_dim 32).
    ``kernel='softmax'`` is the ablation "polynomial kernel → softmax" (same Q/K sharing and
    convs, scaled dot-product softmax). With ``norm='bn'`` the row normalisation becomes
    ``RunningRowSumNorm`` and a ``ChannelBatchNorm`` sits before ``proj`` (fully polynomial).
    """

    def __init__(self, dim: int, head_dim: int = 32, num_heads: Optional[int] = None, kernel: str = 'poly',
                 norm: str = 'ln', spatial_size: Optional[Tuple[int, int]] = None, power: int = 4,
                 chunk_bytes: Optional[int] = None):
        super().__init__()
        if kernel not in ('poly', 'softmax'):
            raise ValueError(f"PolyAttn kernel must be 'poly' or 'softmax', got {kernel!r}")
        self.num_heads = num_heads or math.ceil(dim / 64)
        self.head_dim = head_dim
        self.attn_dim = a = self.num_heads * head_dim
        self.kernel = kernel
        self.power = power
        self.chunk_bytes = chunk_bytes
        self.qkv = PointwiseConv2d(dim, 2 * a, bias=False)
        self.proj = PointwiseConv2d(a, dim, bias=False)
        s0 = head_dim ** -0.5
        self.scale = nn.Parameter(torch.tensor([-s0 / (s0 - 1)] * self.num_heads).log().view(1, -1, 1, 1))
        self.q_conv = nn.Conv2d(a, a, 5, padding=2, groups=a, bias=False)
        self.k_conv = nn.Conv2d(a, a, 5, padding=2, groups=a, bias=False)
        self.v_conv = nn.Conv2d(a, a, 3, padding=1, groups=a, bias=False)
        self.final_conv = nn.Conv2d(a, a, 3, padding=1, groups=a, bias=False)
        self.fully_polynomial = norm == 'bn'
        self.window: Optional[int] = None   # sliding-window attention (``polynext.models.set_attention_window``)
        if self.fully_polynomial:
            h, w = _size2(spatial_size)
            self.norm = RunningRowSumNorm(self.num_heads, h * w)
            self.norm2 = ChannelBatchNorm(a, (h, w))

    def extra_repr(self) -> str:
        return f'heads={self.num_heads}, head_dim={self.head_dim}, kernel={self.kernel}, power={self.power}'

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        # (B, A, H, W) → (B, heads, N, head_dim); channel = head · head_dim + d
        b = t.shape[0]
        return t.reshape(b, self.num_heads, self.head_dim, -1).transpose(-1, -2)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                proj_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``residual`` (CPU inference, a tensor the caller owns): return ``residual + proj(...)``, added
        into ``residual`` by ``proj`` itself (``ops.pointwise.pointwise_add_``), ``proj_weight`` replacing its weight."""
        if residual is None:
            return self.proj(self.attend(x))
        return pointwise_add_(residual, self.attend(x), self.proj, weight=proj_weight)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before ``proj``: the attention output after ``final_conv`` (and ``norm2``)."""
        b, _, h, w = x.shape
        if (not self.window and self.kernel == 'poly' and not self.fully_polynomial and attention_convs_applies(
                x, self.attn_dim, self.head_dim, (self.q_conv, self.k_conv, self.v_conv, self.final_conv))):
            # CPU inference: the convolutions read and write the heads, the head scale in Q's weights
            q, k, v = attention_convs(self.qkv(x), scaled_taps(self.q_conv.weight, self.scale.sigmoid()),
                                      depthwise_taps(self.k_conv.weight), depthwise_taps(self.v_conv.weight),
                                      self.num_heads)
            o = poly_attention(q, k, v, self.power, self.chunk_bytes)
            return heads_conv(o, depthwise_taps(self.final_conv.weight), h, w)
        qk, v = split_pointwise(x, self.qkv, self.attn_dim)   # each part contiguous (ops.pointwise)
        # the 5x5 Q / K convolutions' training backward cut into oneDNN's fast 3- and 1-wide kernels (ops/depthwise.py)
        q, k = self._heads(depthwise_conv2d(qk, self.q_conv)), self._heads(depthwise_conv2d(qk, self.k_conv))
        v = self._heads(self.v_conv(v))
        if self.window and not self.fully_polynomial:   # each query sees the window x window keys around it
            q = q if self.kernel == 'softmax' else q * self.scale.sigmoid().to(q.dtype)
            o = neighborhood_attention(q, k, v, (h, w), self.window, self.kernel, power=self.power)
        elif self.kernel == 'softmax':
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.fully_polynomial:
            attn = ((q @ k.transpose(-1, -2)) * self.scale.sigmoid() + 1) ** self.power
            o = self.norm(attn) @ v
        else:
            o = poly_attention(q * self.scale.sigmoid().to(q.dtype), k, v, self.power, self.chunk_bytes)
        o = o.transpose(1, 2).reshape(b, h, w, self.attn_dim).permute(0, 3, 1, 2)
        o = self.final_conv(o)
        if self.fully_polynomial:
            o = self.norm2(o)
        return o


# --------------------------------------------------------------------------------------
# Blocks, cells, stages
# --------------------------------------------------------------------------------------

def _switch(default: Any, choices: Optional[Tuple[Any, ...]] = None, rows: Optional[Dict[str, Any]] = None):
    """An ablation switch: its default (the published model), its allowed values and the paper's ablation rows
    that set it (``{row: value}``, or ``{row: {switch: value, ...}}`` for a row that sets several)."""
    return field(default=default, metadata=dict(choices=choices, rows=rows or {}))


@dataclass(frozen=True)
class Ablation:
    """The paper's ablation switches (Tables "activation" and "stabilisation"). Defaults = published.

    Each switch is declared once, here: adding one is one field (the model reads it where it builds the
    part it changes). ``PolyNeXt(..., ablation=Ablation(mlp='gelu'))`` or, equally, the switch as a keyword
    argument of ``PolyNeXt`` / ``timm.create_model`` / ``polynext.create_model``; ``ABLATIONS`` (paper row →
    switches) is built from the ``rows`` below."""
    mlp: str = _switch('poly', ('poly', 'gelu'), {'mlp_gelu': 'gelu'})                    # PolyMLP → MLP + GELU
    conv_mixer: str = _switch('poly', ('poly', 'sepconv'), {'sepconv_gelu': 'sepconv'})   # PolyConv → SepConv + GELU
    product_gelu: str = _switch('none', ('none', 'one_branch', 'after'),                 # GELU on one multiplied
                                {'gelu_one_branch': 'one_branch', 'gelu_after_product': 'after'})   # branch / after
    product_op: str = _switch('mul', ('mul', 'add'), {'hadamard_to_add': 'add'})         # Hadamard → addition
    attn: str = _switch('poly', ('poly', 'poly_softmax', 'standard'),                    # PolyAttn → softmax MHSA;
                        {'std_attention': 'standard', 'poly_kernel_to_softmax': 'poly_softmax'})   # kernel → softmax
    residual_scale: str = _switch('sigmoid', ('sigmoid', 'free', 'layerscale'), {         # Sigmoid-Scale → ...
        'free_scalar': 'free',
        'layerscale_1e-6': dict(residual_scale='layerscale', layerscale_init=1e-6),
        'layerscale_1': dict(residual_scale='layerscale', layerscale_init=1.0)})
    layerscale_init: float = _switch(1e-6)
    multi_input_skip: bool = _switch(True, rows={'no_multi_input_skip': False})
    cell_norm: bool = _switch(True, rows={'no_cell_norm': False})
    stacks: Optional[int] = _switch(None, rows={'wide_2_stacks': 2, 'wide_1_stack': 1})  # blocks per cell (wider
    #                                                                                        cells, matched params)

    def validate(self) -> 'Ablation':
        for f in fields(self):
            choices = f.metadata['choices']
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f'{f.name}={getattr(self, f.name)!r} is not one of {choices}')
        if self.stacks is not None and self.stacks < 1:
            raise ValueError(f'stacks must be >= 1, got {self.stacks}')
        return self

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def rows(cls) -> Dict[str, Dict[str, Any]]:
        """The paper's ablation rows, in order: row name → the switches it sets."""
        out: Dict[str, Dict[str, Any]] = {}
        for f in fields(cls):
            for row, value in f.metadata['rows'].items():
                out[row] = dict(value) if isinstance(value, dict) else {f.name: value}
        return out

    @classmethod
    def from_kwargs(cls, base: Optional['Ablation'], switches: Dict[str, Any]) -> 'Ablation':
        """``base`` (default: the published model) with ``switches`` applied; one clear error for an unknown one."""
        names = cls.names()
        for key in switches:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ''
                raise TypeError(f"PolyNeXt: unknown argument '{key}'.{hint}")
        return dataclasses.replace(base or cls(), **switches).validate()

    @property
    def is_published(self) -> bool:
        return self == Ablation()


class _MixerMLPBlock(nn.Module):
    """One stack of a cell: a gated token-mixer residual, then a gated PolyMLP residual."""

    def __init__(self, mixer: nn.Module, mixer_norm: nn.Module, mlp: nn.Module, drop_path: float = 0.):
        super().__init__()
        self.mixer = mixer
        self.mixer_norm = mixer_norm
        self.mlp = mlp
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, g_mix: torch.Tensor, g_mlp: torch.Tensor, owned: bool = False
                ) -> torch.Tensor:
        """``owned``: ``x`` is the caller's own residual stream and may be overwritten (the cell's is)."""
        x = self.mix_residual(x, g_mix, owned)
        return self.mlp_residual(x, g_mlp)

    def _fusable(self, x: torch.Tensor) -> bool:
        return (not self.training or isinstance(self.drop_path, nn.Identity)) and can_fuse(x)

    def mix_residual(self, x: torch.Tensor, gate: torch.Tensor, owned: bool = False) -> torch.Tensor:
        return gated_residual(x, self.drop_path(self.mix(x)), gate)

    def mlp_residual(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x + gate · PolyMLP(x), the gate scaling ``fc_out``'s weight (``_gated_conv``). At CPU inference
        the addition is ``fc_out``'s post-op, written into ``x`` (always a tensor of this block here), or the whole
        branch one kernel (``ops.narrow_pointwise.poly_mlp_``) where it serves."""
        if not isinstance(self.mlp, PolyMLP):
            return gated_residual(x, self.drop_path(self.mlp(x)), gate)
        mlp, fc_out = self.mlp, self.mlp.fc_out
        if self._fusable(x):
            w_out = scaled_weight(fc_out.weight, gate)   # (kept while unchanged: ops.constants)
            if (mlp.product.is_product and isinstance(mlp.norm, LayerNorm2d) and mlp.fc_in.bias is None
                    and fc_out.bias is None
                    and poly_mlp_(x, mlp.fc_in.weight, mlp.norm.weight, mlp.norm.bias, mlp.norm.eps, w_out) is not None):
                return x
            return pointwise_add_(x, mlp.hidden(x), fc_out, weight=w_out)
        return self.drop_path(_gated_conv(fc_out, self.mlp.hidden(x), gate)).add_(x)


class PolyConvBlock(_MixerMLPBlock):
    """x ← x + g_mix · DropPath(Norm(PolyConv(x)));   x ← x + g_mlp · DropPath(PolyMLP(x)).

    The norm closes the PolyConv branch (the block input is the raw stream)."""

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixer_norm(self.mixer(x))

    def mix_residual(self, x: torch.Tensor, gate: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """x + gate · Norm(PolyConv(x)), the gate scaling the LayerNorm's weight (and bias): exact in real
        arithmetic, and it saves the product's passes over the activation (``_gated_conv``)."""
        norm = self.mixer_norm
        if isinstance(norm, LayerNorm2d):
            g = gate.reshape(-1)
            weight, bias = norm.weight * g, None if norm.bias is None else norm.bias * g
            no_drop = not self.training or isinstance(self.drop_path, nn.Identity)
            if isinstance(self.mixer, PolyConv) and self.mixer.pw_out.bias is None and no_drop:
                # CPU inference: pw_out, the norm and the addition in one kernel, pw_out's output never written
                pc = self.mixer
                u = pc.core(pc.pw_in(x))
                y = pointwise_norm(u, pc.pw_out.weight, weight, bias, norm.eps, residual=x, inplace=owned)
                if y is not None:
                    return y
                z = pc.pw_out(u).permute(0, 2, 3, 1)
            else:
                z = self.mixer(x).permute(0, 2, 3, 1)
            if no_drop:
                # drop path is the identity: on the CPU the norm and the addition are one pass of ops.channel_norm
                # (at inference written into the branch's own output); elsewhere F.layer_norm and the addition
                return channel_layer_norm(z, norm.normalized_shape, weight, bias, norm.eps,
                                          residual=x.permute(0, 2, 3, 1), inplace=True).permute(0, 3, 1, 2)
            z = channel_layer_norm(z, norm.normalized_shape, weight, bias, norm.eps)
            # added on the NHWC tensor itself: an in-place op on the NCHW view would cost autograd a copy
            return self.drop_path(z).add_(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().mix_residual(x, gate, owned)


class PolyAttnBlock(_MixerMLPBlock):
    """x ← x + g_mix · DropPath(PolyAttn(Norm(x)));   x ← x + g_mlp · DropPath(PolyMLP(x)).

    The norm opens the attention branch (pre-norm)."""

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixer(self.mixer_norm(x))

    def mix_residual(self, x: torch.Tensor, gate: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """x + gate · PolyAttn(Norm(x)); at CPU inference on an owned stream, ``proj`` adds into ``x``."""
        if not isinstance(self.mixer, PolyAttn):
            return super().mix_residual(x, gate, owned)
        if owned and self._fusable(x):
            return self.mixer(self.mixer_norm(x), residual=x,
                              proj_weight=scaled_weight(self.mixer.proj.weight, gate))
        return self.drop_path(_gated_conv(self.mixer.proj, self.mixer.attend(self.mixer_norm(x)), gate)).add_(x)


class PolyNeXtCell(nn.Module):
    """Multi-input skip cell.

        x = Norm(a ⊙ s_{i−2} + b ⊙ s_{i−1})          (a, b: per-channel scales, init 1)
        x ← block_j(x, g[m_j], g[n_j])  for j = 0 … blocks−1;   return x

    The residual stream starts at the normalised merge: there is no identity path from the
    cell inputs to its output. ``g`` = the cell's gate bank; with ``paired_gates`` block j
    uses (g[j], g[j+1]), so the MLP of block j and the mixer of block j+1 share a gate;
    otherwise block j uses (g[2j], g[2j+1]).
    """

    def __init__(
            self,
            dim: int,
            num_blocks: int,
            mixer: str,
            conv_inner: int,
            mlp_hidden: int,
            coarse_kernel: int,
            gate_init: Sequence[float],
            gate_init_is_logit: bool,
            paired_gates: bool,
            norm: str = 'ln',
            spatial_size: Optional[Tuple[int, int]] = None,
            drop_path: float = 0.,
            head_dim: int = 32,
            attn_chunk_bytes: Optional[int] = None,
            ablation: Ablation = Ablation(),
    ):
        super().__init__()
        norm_layer = partial(make_norm, norm, spatial_size=spatial_size)
        self.multi_input_skip = ablation.multi_input_skip
        self.scale0 = ChannelScale(dim) if self.multi_input_skip else None
        self.scale1 = ChannelScale(dim)
        self.merge_norm = norm_layer(dim) if ablation.cell_norm else nn.Identity()

        product = HadamardProduct(ablation.product_op, ablation.product_gelu)
        blocks = []
        for _ in range(num_blocks):
            # construction order = the reference's (mixer, then MLP), so a seed gives its weights
            if mixer == 'conv':
                if ablation.conv_mixer == 'poly':
                    token_mixer = PolyConv(dim, conv_inner, coarse_kernel=coarse_kernel, coarse_dilation=2,
                                           product=product)
                else:  # ablation: MetaFormer SepConv (pw → GELU → dw7x7 → pw), reused from timm
                    token_mixer = SepConv(dim, expansion_ratio=conv_inner / dim, act1_layer=nn.GELU)
                mixer_norm = norm_layer(dim)
            else:
                mixer_norm = norm_layer(dim)
                if ablation.attn == 'standard':  # ablation: plain softmax MHSA (timm), head_dim 32
                    heads = max(1, dim // 32)
                    while dim % heads:
                        heads -= 1
                    token_mixer = Attention2d(dim, num_heads=heads, bias=False)
                else:
                    token_mixer = PolyAttn(dim, head_dim=head_dim,
                                           kernel='softmax' if ablation.attn == 'poly_softmax' else 'poly',
                                           norm=norm, spatial_size=spatial_size, chunk_bytes=attn_chunk_bytes)
            if ablation.mlp == 'poly':
                mlp = PolyMLP(dim, mlp_hidden, norm_layer=norm_layer, product=product)
            else:  # ablation: a standard MLP (1x1 convs) with GELU, norm before fc2 like PolyMLP
                mlp = Mlp(dim, 2 * mlp_hidden, act_layer=nn.GELU, norm_layer=norm_layer, bias=False, use_conv=True)
            if mixer == 'conv':
                blocks.append(PolyConvBlock(token_mixer, mixer_norm, mlp, drop_path=drop_path))
            else:
                blocks.append(PolyAttnBlock(token_mixer, mixer_norm, mlp, drop_path=drop_path))
        self.blocks = nn.ModuleList(blocks)

        self.gate_index = [(j, j + 1) if paired_gates else (2 * j, 2 * j + 1) for j in range(num_blocks)]
        needed = max(i for pair in self.gate_index for i in pair) + 1
        if needed > len(gate_init):
            raise ValueError(f'{num_blocks} blocks need {needed} gate values, got {len(gate_init)}')
        if ablation.residual_scale == 'sigmoid':
            self.gates = SigmoidScale(gate_init, values_are_logits=gate_init_is_logit)
        elif ablation.residual_scale == 'free':
            self.gates = FreeScale(gate_init, values_are_logits=gate_init_is_logit)
        else:
            self.gate_index = [(2 * j, 2 * j + 1) for j in range(num_blocks)]
            self.gates = LayerScaleGates(2 * num_blocks, dim, ablation.layerscale_init)
        self.grad_clip: Optional[float] = None  # see PolyNeXt.set_cell_grad_clip

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        if self.multi_input_skip:
            x = torch.addcmul(self.scale0(s0), s1, self.scale1.scale)  # a ⊙ s0 + b ⊙ s1
        else:
            x = self.scale1(s1)
        x = self.merge_norm(x)
        g = self.gates.gates()
        for block, (i_mix, i_mlp) in zip(self.blocks, self.gate_index):
            x = block(x, g[i_mix], g[i_mlp], owned=True)   # x is this cell's own stream
        if self.grad_clip is not None and x.requires_grad:
            x.register_hook(partial(_clip_grad, max_norm=self.grad_clip))
        return x


def _clip_grad(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Rescale a gradient tensor whose L2 norm exceeds max_norm by max_norm / (‖g‖ + 1e-6)."""
    norm = grad.norm()
    return grad * torch.where(norm > max_norm, max_norm / (norm + 1e-6), torch.ones_like(norm))


def make_downsample(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """Stage-boundary reduction: 'sep3x3' = dw3x3/2 then 1x1; 'full3x3' = dense 3x3/2."""
    if kind == 'sep3x3':
        layer = nn.Sequential(StridedDepthwiseConv2d(in_dim, in_dim, 3, stride=2, padding=1, groups=in_dim,
                                                     bias=False),
                              PointwiseConv2d(in_dim, out_dim, bias=False))
        poly_init_(layer[0].weight)
        poly_init_(layer[1].weight)
    elif kind == 'full3x3':
        layer = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, bias=False)
        poly_init_(layer.weight)
    else:
        raise ValueError(f"downsample must be 'sep3x3' or 'full3x3', got {kind!r}")
    return layer


class PolyNeXtStage(nn.Module):
    """One resolution stage: reduce both streams (s_{i−2} and s_{i−1}) separately, then run
    the cells; each cell reads the outputs of the two cells before it."""

    def __init__(self, downsample_s0: Optional[nn.Module], downsample_s1: Optional[nn.Module],
                 cells: List[PolyNeXtCell]):
        super().__init__()
        self.downsample_s0 = downsample_s0 if downsample_s0 is not None else nn.Identity()
        self.downsample_s1 = downsample_s1 if downsample_s1 is not None else nn.Identity()
        self.cells = nn.ModuleList(cells)
        self.grad_checkpointing = False

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        s0, s1 = self.downsample_s0(s0), self.downsample_s1(s1)
        for cell in self.cells:
            if self.grad_checkpointing and torch.is_grad_enabled():
                s0, s1 = s1, checkpoint(cell, s0, s1, use_reentrant=False)
            else:
                s0, s1 = s1, cell(s0, s1)
        return s0, s1


# --------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------

class HeadDropout(nn.Module):
    """Element-wise dropout whose rate ``p`` is a buffer (saved in checkpoints, changeable
    between epochs for the reference's dropout ramp). Train: y = x · [u < 1−p] / (1−p)."""

    def __init__(self, p: float = 0.):
        super().__init__()
        self.register_buffer('p', torch.tensor(float(p), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = (1.0 - self.p).clamp(1e-6, 1.0)
        mask = (torch.rand_like(x, dtype=torch.float32) < keep).to(x.dtype)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f'p={float(self.p):.4g}'


class GatedHead(nn.Module):
    """Gated classifier head:  z = Norm(x);  [l, r] = W_p z;  h = l + l ⊙ r;
    logits = FC(Dropout(GAP(h)))  (W_p: 1x1 conv C → 4C; h has 2C channels)."""

    def __init__(self, dim: int, num_classes: int, norm_layer: Callable[[int], nn.Module], pool_type: str = 'avg',
                 drop_rate: float = 0.):
        super().__init__()
        self.norm = norm_layer(dim)
        self.proj = PointwiseConv2d(dim, 4 * dim, bias=False)
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=True)
        self.drop = HeadDropout(drop_rate)
        self.hidden_size = 2 * dim
        self.fc = nn.Linear(2 * dim, num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, pool_type: Optional[str] = None) -> None:
        if pool_type is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=True)
        dev = self.proj.weight.device
        self.fc = nn.Linear(self.hidden_size, num_classes, device=dev) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        left, right = self.proj(self.norm(x)).chunk(2, dim=1)
        x = self.drop(self.global_pool(left + left * right))
        return x if pre_logits else self.fc(x)


# --------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------

class PolyNeXt(nn.Module):
    """PolyNeXt backbone + gated classifier head (CPolyNeXt, APolyNeXt, bn and low-res variants).

    Stage ``s`` has ``cells[s]`` multi-input skip cells of width ``int(width_mults[s] · init_channels)``,
    each running ``blocks[s]`` (mixer + PolyMLP) blocks. Stages listed in ``attn_stages`` use
    PolyAttn, the others PolyConv.
    """

    def __init__(
            self,
            init_channels: int = 48,
            cells: Sequence[int] = (2, 2, 6, 2),
            blocks: Sequence[int] = (3, 3, 3, 3),
            width_mults: Sequence[float] = (1, 2, 4, 6),
            conv_expansion: Sequence[float] = (1, 1, 0.75, 0.75),
            mlp_expansion: Sequence[float] = (2, 2, 1.75, 1.75),
            coarse_kernels: Sequence[int] = (3, 5, 5, 5),
            attn_stages: Sequence[int] = (),
            gate_init: Sequence[float] = (0.5, 0.5, 0.25, 0.125, 0.0625, 0.03125),
            gate_init_is_logit: bool = False,
            paired_gates: bool = True,
            downsample: Tuple[str, str] = ('sep3x3', 'sep3x3'),
            stem: str = 'patch4',
            norm: str = 'ln',
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            head_dim: int = 32,
            channels_last: bool = True,
            attn_chunk_mb: Optional[float] = None,
            ablation: Optional[Ablation] = None,
            **switches: Any,
    ):
        """``attn_chunk_mb``: score memory per PolyAttn chunk (default: ``poly_attention``'s); ``ablation`` /
        ``switches``: the paper's ablation switches (``Ablation``), as an object or as keyword arguments."""
        super().__init__()
        num_stages = len(cells)
        for name, seq in dict(blocks=blocks, width_mults=width_mults, conv_expansion=conv_expansion,
                              mlp_expansion=mlp_expansion, coarse_kernels=coarse_kernels).items():
            if len(seq) != num_stages:
                raise ValueError(f'{name} has {len(seq)} entries but there are {num_stages} stages')
        if stem not in ('patch4', 'conv3'):
            raise ValueError(f"stem must be 'patch4' (7x7 stride 4) or 'conv3' (3x3 stride 1), got {stem!r}")
        self.ablation = ablation = Ablation.from_kwargs(ablation, switches)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.norm_kind = norm
        self.channels_last = channels_last
        self.drop_rate = drop_rate
        if img_size is None:
            img_size = 224 if stem == 'patch4' else 32
        self.img_size = _size2(img_size)

        self.stem = (nn.Conv2d(in_chans, init_channels, 7, stride=4, padding=3, bias=False) if stem == 'patch4'
                     else nn.Conv2d(in_chans, init_channels, 3, stride=1, padding=1, bias=False))
        size = conv_output_size(self.img_size, self.stem)     # feature-map size of the stage being built
        reduction = self.stem.stride[0]

        total_cells = sum(cells)
        dpr = torch.linspace(0, drop_path_rate, total_cells).tolist()  # float32 linspace, like the reference
        attn_chunk_bytes = int(attn_chunk_mb * 2 ** 20) if attn_chunk_mb else None
        self.feature_info = []
        stages = []
        prev_dim = init_channels
        cell_idx = 0
        for s in range(num_stages):
            dim = int(width_mults[s] * init_channels)
            num_blocks = blocks[s]
            width_factor = 1.0
            if ablation.stacks is not None:  # wider, shallower cells at matched parameters
                width_factor = num_blocks / ablation.stacks
                num_blocks = ablation.stacks
            conv_inner = int(dim * conv_expansion[s] * width_factor)
            mlp_width = int(dim * mlp_expansion[s] * width_factor)
            if mlp_width % 2:
                raise ValueError(
                    f'stage {s}: PolyMLP width int({dim} * {mlp_expansion[s]}) = {mlp_width} is odd and cannot be '
                    f'split into two halves; choose an init_channels that makes it even')
            ds0 = ds1 = None
            if s > 0:
                ds0 = make_downsample(downsample[0], prev_dim, dim) if ablation.multi_input_skip else None
                ds1 = make_downsample(downsample[1], prev_dim, dim)
                size = conv_output_size(size, ds1)
                reduction *= conv_stride(ds1)
            stage_cells = []
            for _ in range(cells[s]):
                stage_cells.append(PolyNeXtCell(
                    dim=dim, num_blocks=num_blocks, mixer='attn' if s in attn_stages else 'conv',
                    conv_inner=conv_inner, mlp_hidden=mlp_width // 2, coarse_kernel=coarse_kernels[s],
                    gate_init=gate_init, gate_init_is_logit=gate_init_is_logit, paired_gates=paired_gates,
                    norm=norm, spatial_size=size, drop_path=dpr[cell_idx], head_dim=head_dim,
                    attn_chunk_bytes=attn_chunk_bytes, ablation=ablation))
                cell_idx += 1
            stages.append(PolyNeXtStage(ds0, ds1, stage_cells))
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f'stages.{s}'))
            prev_dim = dim
        self.stages = nn.Sequential(*stages)
        self.num_features = prev_dim
        self.head = GatedHead(prev_dim, num_classes, partial(make_norm, norm, spatial_size=size),
                              global_pool, drop_rate)
        self.head_hidden_size = self.head.hidden_size

    # ---- timm API ------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Gates, per-channel scales, attention scale logits and norm weights (the reference
        decays everything; the training recipes decide whether to honour this set)."""
        names = set()
        for name, p in self.named_parameters():
            leaf = name.rsplit('.', 1)[-1]
            if p.ndim <= 1 or leaf in ('logits', 'scales', 'scale', 'gamma', 'gamma_c', 'gamma_hw'):
                names.add(name)
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=[
                (r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.cells\.(\d+)', None),
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^head\.(norm|proj)', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def set_head_dropout(self, p: float) -> None:
        """Change the head dropout rate (the reference ramps it over the epochs)."""
        self.head.drop.p.fill_(float(p))

    def set_cell_grad_clip(self, max_norm: Optional[float]) -> None:
        """Rescale the gradient flowing into every cell output to norm ≤ ``max_norm``
        (the reference's APolyNeXt segmentation backbone uses 5.0). ``None`` turns it off."""
        for stage in self.stages:
            for cell in stage.cells:
                cell.grad_clip = max_norm

    def _check_input(self, x: torch.Tensor) -> None:
        if self.norm_kind == 'bn' and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f'This fully polynomial (bn) model was built for {self.img_size[0]}x{self.img_size[1]} inputs but got '
                f'{x.shape[-2]}x{x.shape[-1]}. Its norms have per-position weights; create it with '
                f'img_size={x.shape[-2]} (and train or load weights for that size).')

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.stem(x)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (the last cell of each stage) at strides 4/8/16/32 (low-res: 1/2/4)."""
        if output_fmt != 'NCHW':
            raise ValueError("PolyNeXt intermediates are only available as 'NCHW'")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        s0 = s1 = self._stem(x)
        stages = self.stages if not stop_early else self.stages[:max_index + 1]
        for i, stage in enumerate(stages):
            s0, s1 = stage(s0, s1)
            if i in take_indices:
                intermediates.append(s1)
        if intermediates_only:
            return intermediates
        return s1, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_head:
            self.head = nn.Identity()
            self.num_classes = 0
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self._stem(x)
        for stage in self.stages:
            s0, s1 = stage(s0, s1)
        return s1

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if isinstance(self.head, nn.Identity):
            return x
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _convs(module: nn.Module) -> List[nn.Conv2d]:
    return [module] if isinstance(module, nn.Conv2d) else [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def conv_output_size(size: Tuple[int, int], module: nn.Module) -> Tuple[int, int]:
    """Spatial size after the convolutions of ``module``, in order: n ← ⌊(n + 2p − d(k − 1) − 1) / s⌋ + 1."""
    h, w = size
    for conv in _convs(module):
        h, w = ((n + 2 * p - d * (k - 1) - 1) // st + 1
                for n, k, st, p, d in zip((h, w), conv.kernel_size, conv.stride, conv.padding, conv.dilation))
    return h, w


def conv_stride(module: nn.Module) -> int:
    """The total (row) stride of the convolutions of ``module``."""
    return math.prod(conv.stride[0] for conv in _convs(module))


# --------------------------------------------------------------------------------------
# The authors' checkpoints: their key layout, architecture inference, strict conversion
# --------------------------------------------------------------------------------------

_ATTN_NAMES = {'scale': 'scale', 'qkv': 'qkv', 'proj': 'proj', 'q_conv': 'q_conv', 'k_conv': 'k_conv',
               'v_conv': 'v_conv', 'final_conv': 'final_conv', 'norm': 'norm', 'norm2': 'norm2'}
_CONV_BLOCK = {'mixer.pw_in': 0, 'mixer.coarse': 1, 'mixer.fine': 2, 'mixer.dw_out': '3.0', 'mixer.pw_out': '3.1',
               'mixer_norm': '3.2', 'mlp.fc_in': 4, 'mlp.norm': '5.0', 'mlp.fc_out': '5.1'}
_ATTN_BLOCK = {'mixer_norm': '0.0', 'mixer': '0.1', 'mlp.fc_in': 1, 'mlp.norm': '2.0', 'mlp.fc_out': '2.1'}
_CELL = {'gates.logits': 'skip_weight', 'scale0.scale': 'preprocess0.scale', 'scale1.scale': 'preprocess1.scale'}
_HEAD = {'head.norm': 'norm', 'head.proj': 'proj', 'head.drop': 'head.2', 'head.fc': 'head.3'}


def _reference_key(key: str, cell_offsets: List[int], attn_stages: Set[int]) -> str:
    """Map one of our state-dict keys to the authors' key name."""
    if key == 'stem.weight':
        return key
    for ours, ref in _HEAD.items():
        if key.startswith(ours + '.'):
            return ref + key[len(ours):]
    m = re.match(r'stages\.(\d+)\.downsample_s([01])\.(.+)$', key)
    if m:
        s, which, rest = int(m[1]), int(m[2]), m[3]
        return f'reductions.{2 * (s - 1) + which}.{rest}'
    m = re.match(r'stages\.(\d+)\.cells\.(\d+)\.(.+)$', key)
    if not m:
        raise KeyError(key)
    s, c, rest = int(m[1]), int(m[2]), m[3]
    prefix = f'cells.{cell_offsets[s] + c}.'
    if rest in _CELL:
        return prefix + _CELL[rest]
    if rest.startswith('merge_norm.'):
        return prefix + 'postprocess.' + rest[len('merge_norm.'):]
    m = re.match(r'blocks\.(\d+)\.(.+)$', rest)
    if not m:
        raise KeyError(key)
    j, rest = int(m[1]), m[2]
    if s in attn_stages:
        table, width = _ATTN_BLOCK, 3
    else:
        table, width = _CONV_BLOCK, 6
    for ours, slot in sorted(table.items(), key=lambda kv: -len(kv[0])):
        if rest.startswith(ours + '.'):
            tail = rest[len(ours) + 1:]
            slot = str(slot)
            first, _, sub = slot.partition('.')
            ref_slot = str(width * j + int(first)) + ('.' + sub if sub else '')
            if ours == 'mixer':
                head_name, _, leaf = tail.partition('.')
                tail = _ATTN_NAMES[head_name] + ('.' + leaf if leaf else '')
            return f'{prefix}ops.{ref_slot}.{tail}'
    raise KeyError(key)


def reference_key_map(model: PolyNeXt) -> Dict[str, str]:
    """Our state-dict key → the authors' reference key, for a published architecture."""
    if not model.ablation.is_published:
        raise ValueError('reference checkpoints exist only for the published architectures (no ablation switches)')
    offsets, total = [], 0
    for stage in model.stages:
        offsets.append(total)
        total += len(stage.cells)
    attn_stages = {s for s, stage in enumerate(model.stages) if isinstance(stage.cells[0].blocks[0], PolyAttnBlock)}
    return {k: _reference_key(k, offsets, attn_stages) for k in model.state_dict().keys()}


def is_reference_layout(state_dict: Mapping[str, Any]) -> bool:
    """True for a state dict in the authors' key names (``cells.*``, no ``stages.*``)."""
    return any(k.startswith('cells.') for k in state_dict) and not any(k.startswith('stages.') for k in state_dict)


def infer_reference_arch(state_dict: Mapping[str, torch.Tensor]) -> Optional[Dict[str, Any]]:
    """Guess (name, init_channels, num_classes) of an authors'-format PolyNeXt checkpoint."""
    if 'stem.weight' not in state_dict:
        return None
    stem = state_dict['stem.weight']
    c0 = stem.shape[0]
    n_cells = 1 + max((int(k.split('.')[1]) for k in state_dict if k.startswith('cells.')), default=-1)
    attn = any('.q_conv.' in k for k in state_dict)
    bn = any(k.endswith('gamma_hw') for k in state_dict)
    lowres = stem.shape[-1] == 3
    num_classes = state_dict['head.3.weight'].shape[0] if 'head.3.weight' in state_dict else None
    for name, arch in PUBLISHED_ARCHS.items():
        if (sum(arch['cells']) == n_cells and bool(arch.get('attn_stages')) == attn
                and (arch.get('norm', 'ln') == 'bn') == bn and (arch.get('stem', 'patch4') == 'conv3') == lowres):
            return dict(name=name, init_channels=c0, num_classes=num_classes)
    return None


def _arch_hint(state_dict: Mapping[str, torch.Tensor]) -> str:
    guess = infer_reference_arch(state_dict)
    if not guess:
        return ''
    return (f" The checkpoint looks like {guess['name']} (init_channels={guess['init_channels']}, "
            f"num_classes={guess['num_classes']}).")


def convert_reference_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                                 skip_shape_check: tuple = ()) -> Dict[str, torch.Tensor]:
    """Rename an authors'-layout state dict to ``model``'s keys, strictly.

    Every model key must be present with the right shape, and every checkpoint key must be
    used; the first problem raises a ``CheckpointError`` that names the key. Keys starting
    with a prefix in ``skip_shape_check`` are renamed without a shape check (timm's pretrained
    path drops a classifier of another class count itself).
    """
    mapping = reference_key_map(model)
    expected = model.state_dict()
    name = model_name(model)
    out = OrderedDict()
    for ours, ref in mapping.items():
        if ref not in state_dict:
            raise CheckpointError(
                f"checkpoint does not match {name}: key '{ref}' is missing (expected shape "
                f"{list(expected[ours].shape)} for '{ours}'). The file is truncated or was saved from another "
                f"model.{_arch_hint(state_dict)}")
        t = state_dict[ref]
        if tuple(t.shape) != tuple(expected[ours].shape) and not (skip_shape_check and ours.startswith(skip_shape_check)):
            raise CheckpointError(
                f"checkpoint does not match {name}: '{ref}' has shape {list(t.shape)} but the model expects "
                f"{list(expected[ours].shape)} (parameter '{ours}'). Check the model name, init_channels, "
                f"num_classes and img_size.{_arch_hint(state_dict)}")
        out[ours] = t
    used = set(mapping.values())
    extra = [k for k in state_dict if k not in used]
    if extra:
        raise CheckpointError(
            f"checkpoint does not match {name}: unexpected key '{extra[0]}' ({len(extra)} unused in all)."
            f"{_arch_hint(state_dict)}")
    return out


def load_reference_state_dict(model: torch.nn.Module, state_dict: Any) -> torch.nn.Module:
    """Load a state dict in the authors' key names (as in their released ``.pt`` files).

    Accepts the usual wrappers (``state_dict`` / ``model`` / EMA entries, ``module.``).
    Strict: every key is used and every shape is checked. Returns ``model``.
    """
    sd = unwrap_state_dict(state_dict)
    if not is_reference_layout(sd):
        raise CheckpointError(
            f"this is not an authors'-format PolyNeXt checkpoint (no 'cells.*' keys; first key "
            f"'{next(iter(sd))}'). For polynext files use polynext.load_weights().")
    load_state_dict_strict(model, convert_reference_state_dict(model, sd))
    return model


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: PolyNeXt) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn`` (and ``polynext.load_weights``' filter): unwrap a checkpoint and convert
    the authors' key names.

    Used by ``create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``.
    Files already in polynext's layout pass through unchanged.
    """
    state_dict = unwrap_state_dict(state_dict)
    if is_reference_layout(state_dict):
        return convert_reference_state_dict(model, state_dict, skip_shape_check=('head.fc.',))
    return state_dict


# --------------------------------------------------------------------------------------
# Published configurations (one place) and registry
# --------------------------------------------------------------------------------------

_T_GATES = (0.5, 0.5, 0.25, 0.125, 0.0625, 0.03125)   # probabilities (paired) — and logits for LowRes
_SB_GATES = tuple(float(-i / 2) for i in range(8))     # logits 0, −0.5, …, −3.5
_L_GATES = tuple(float(-i / 2 - 0.5) for i in range(8))

_COMMON = dict(width_mults=(1, 2, 4, 6), conv_expansion=(1, 1, 0.75, 0.75), mlp_expansion=(2, 2, 1.75, 1.75),
               coarse_kernels=(3, 5, 5, 5))
_SIZES = dict(
    t=dict(init_channels=48, cells=(2, 2, 6, 2), blocks=(3, 3, 3, 3), gate_init=_T_GATES, gate_init_is_logit=False,
           paired_gates=True, downsample=('sep3x3', 'sep3x3')),
    s=dict(init_channels=72, cells=(3, 3, 8, 3), blocks=(3, 4, 4, 4), gate_init=_SB_GATES, gate_init_is_logit=True,
           paired_gates=False, downsample=('sep3x3', 'full3x3')),
    b=dict(init_channels=84, cells=(3, 5, 10, 3), blocks=(4, 4, 4, 4), gate_init=_SB_GATES, gate_init_is_logit=True,
           paired_gates=False, downsample=('sep3x3', 'full3x3')),
    l=dict(init_channels=96, cells=(3, 6, 12, 3), blocks=(4, 4, 4, 4), gate_init=_L_GATES, gate_init_is_logit=True,
           paired_gates=False, downsample=('sep3x3', 'full3x3')),
)
PUBLISHED_ARCHS: Dict[str, Dict[str, Any]] = {}
for _size, _args in _SIZES.items():
    PUBLISHED_ARCHS[f'cpolynext_{_size}'] = dict(_COMMON, **_args)
    PUBLISHED_ARCHS[f'apolynext_{_size}'] = dict(_COMMON, **_args, attn_stages=(2, 3))
for _name in ('cpolynext_t', 'apolynext_t', 'cpolynext_s'):
    PUBLISHED_ARCHS[f'{_name}_bn'] = dict(PUBLISHED_ARCHS[_name], norm='bn')
PUBLISHED_ARCHS['cpolynext_lr'] = dict(
    init_channels=72, cells=(2, 3, 3), blocks=(3, 3, 3), width_mults=(1, 2, 4), conv_expansion=(1, 1, 1),
    mlp_expansion=(2, 2, 2), coarse_kernels=(3, 5, 5), gate_init=_T_GATES, gate_init_is_logit=True,  # LowRes quirk
    paired_gates=False, downsample=('sep3x3', 'sep3x3'), stem='conv3')

#: the authors' config names
REFERENCE_NAMES = {
    'cpolynext_t': 'CPolyNeXt_T', 'cpolynext_s': 'CPolyNeXt_S', 'cpolynext_b': 'CPolyNeXt_B', 'cpolynext_l': 'CPolyNeXt_L',
    'apolynext_t': 'APolyNeXt_T', 'apolynext_s': 'APolyNeXt_S', 'apolynext_b': 'APolyNeXt_B', 'apolynext_l': 'APolyNeXt_L',
    'cpolynext_t_bn': 'CPolyNeXt_T_bn', 'apolynext_t_bn': 'APolyNeXt_T_bn', 'cpolynext_s_bn': 'CPolyNeXt_S_bn',
    'cpolynext_lr': 'LowRes',
}

#: The paper's ablation rows as constructor options (one switch each on the same models), from ``Ablation``.
ABLATIONS: Dict[str, Dict[str, Any]] = Ablation.rows()

# timm-level keyword arguments that build_model_with_cfg consumes itself
_TIMM_KWARGS = {'features_only', 'out_indices', 'feature_cls', 'feature_cfg', 'flatten_sequential', 'output_stride',
                'pretrained_strict', 'pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir', 'kwargs_filter',
                'pretrained_model_args'}   # timm >= 1.0.25: the saved arguments of a local-dir / hf-hub model


def _check_kwargs(variant: str, kwargs: Dict[str, Any]) -> None:
    valid = set(inspect.signature(PolyNeXt.__init__).parameters) - {'self', 'switches'} | set(Ablation.names())
    for key in kwargs:
        if key not in valid and key not in _TIMM_KWARGS:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ''
            raise TypeError(f"{variant}: unknown argument '{key}'.{hint} Valid arguments: {', '.join(sorted(valid))}")


def _create_polynext(variant: str, pretrained: bool = False, **kwargs) -> PolyNeXt:
    _check_kwargs(variant, kwargs)
    model_args = dict(PUBLISHED_ARCHS[variant], **kwargs)
    num_stages = len(model_args['cells'])
    model = build_model_with_cfg(
        PolyNeXt, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=tuple(range(num_stages))),
        **model_args,
    )
    if model_args.get('norm') == 'bn' and model_args.get('img_size') is not None:
        # a bn model runs at the one size it is built for: its data config (and a Hub export's) says so
        h, w = _size2(model_args['img_size'])
        cfg = dict(model.pretrained_cfg, input_size=(model.pretrained_cfg['input_size'][0], h, w), fixed_input_size=True)
        head_norm = getattr(getattr(model, 'head', None), 'norm', None)
        if isinstance(head_norm, ChannelBatchNorm):
            cfg['pool_size'] = head_norm.spatial_size
        model.pretrained_cfg = model.default_cfg = cfg
    return model


def _cfg(**kwargs) -> Dict[str, Any]:
    cfg = dict(
        url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=224 / 232,
        interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv='stem', classifier='head.fc', hf_hub_id='JJWCactus/PolyNeXt',
        paper_ids='arXiv:2605.20839', paper_name='Activation-Free Backbones for Image Recognition',
        origin_url='https://github.com/jjwang8/PolyNeXt')
    cfg.update(kwargs)
    return cfg


def _lowres_cfg(filename: str, num_classes: int, size: int) -> Dict[str, Any]:
    return _cfg(hf_hub_filename=filename, num_classes=num_classes, input_size=(3, size, size),
                pool_size=(size // 4, size // 4), crop_pct=1.0, mean=CIFAR_MEAN, std=CIFAR_STD)


default_cfgs = generate_default_cfgs({
    **{f'{name}.in1k': _cfg(hf_hub_filename=f'{name}.pt') for name in PUBLISHED_ARCHS if name != 'cpolynext_lr'},
    'cpolynext_lr.cifar10': _lowres_cfg('cpolynext_lr_cifar10.pt', 10, 32),
    'cpolynext_lr.svhn': _lowres_cfg('cpolynext_lr_svhn.pt', 10, 32),
    'cpolynext_lr.tiny_imagenet': _lowres_cfg('cpolynext_lr_tiny_imagenet.pt', 200, 64),
})


@register_model
def cpolynext_t(pretrained: bool = False, **kwargs) -> PolyNeXt:
    """CPolyNeXt-T: 6.43M params, 1.199 GMACs @224."""
    return _create_polynext('cpolynext_t', pretrained, **kwargs)


@register_model
def cpolynext_s(pretrained: bool = False, **kwargs) -> PolyNeXt:
    """CPolyNeXt-S: 25.65M params, 4.780 GMACs @224."""
    return _create_polynext('cpolynext_s', pretrained, **kwargs)


@register_model
def cpolynext_b(pretrained: bool = False, **kwargs) -> PolyNeXt:
    """CPolyNeXt-B: 39.75M params, 8.496 GMACs @224."""
    return _create_polynext('cpolynext_b', pretrained, **kwargs)


@register_model
def cpolynext_l(pretrained: bool = False, **kwargs) -> PolyNeXt:
    """CPolyNeXt-L: 57.36M params, 12.619 GMACs @224."""
    return _create_polynext('cpolynext_l', pretrained, **kwargs)


@register_model
def apolynext_t(pretrained: bool = False, **kwargs) -> PolyNeXt:
    """APolyNeXt-T: 6.53M params, 1.342 GMACs @224."""
    return _create_polynext('apolynext_t', pretrained, **kwargs)


@register_model
def apolynext_s(pretrained: bool = False, **kwargs) -> PolyNeXt:
    """APolyNeXt-S: 26.29M params, 5.290 GMACs @224."""
    return _create_polynext('apolynext_s', pretrained, **kwargs)


@register_model
def apolynext_b(pretrained: bool = False, **kwargs) -> PolyNeXt:
    """APolyNeXt-B: 40.90M params, 9.312 GMACs @224."""
    return _create_polynext('apolynext_b', pretrained, **kwargs)


@register_model
def apolynext_l(pretrained: bool = False, **kwargs) -> PolyNeXt:
    """APolyNeXt-L: 57.40M params, 13.350 GMACs @224."""
    return _create_polynext('apolynext_l', pretrained, **kwargs)


@register_model
def cpolynext_t_bn(pretrained: bool = False, **kwargs) -> PolyNeXt:
    """Fully polynomial CPolyNeXt-T (ChannelBatchNorm): 6.50M params @224."""
    return _create_polynext('cpolynext_t_bn', pretrained, **kwargs)


@register_model
def apolynext_t_bn(pretrained: bool = False, **kwargs) -> PolyNeXt:
    """Fully polynomial APolyNeXt-T (ChannelBatchNorm + RunningRowSumNorm): 6.61M params @224."""
    return _create_polynext('apolynext_t_bn', pretrained, **kwargs)


@register_model
def cpolynext_s_bn(pretrained: bool = False, **kwargs) -> PolyNeXt:
    """Fully polynomial CPolyNeXt-S (ChannelBatchNorm): 25.76M params @224."""
    return _create_polynext('cpolynext_s_bn', pretrained, **kwargs)


@register_model
def cpolynext_lr(pretrained: bool = False, **kwargs) -> PolyNeXt:
    """CPolyNeXt-LR: the 3-stage low-resolution model (CIFAR-10/SVHN 32px, Tiny-ImageNet 64px)."""
    return _create_polynext('cpolynext_lr', pretrained, **kwargs)
