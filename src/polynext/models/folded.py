"""Folded PolyNeXt: the inference graph with every inference-time constant folded away.

``fold_for_inference(model)`` takes a :class:`~polynext.models.polynext.PolyNeXt` (any
published configuration, LN or bn, any width / size / class count) and returns an eval-only
:class:`FoldedPolyNeXt` whose logits equal the model's in real arithmetic (in fp32 within
rounding: ≤ 1e-5 on the logits of every registered model, checked by the tests; in float64
to ~1e-12). What is folded, and where (all exact identities, computed in float64, cast back):

* **Sigmoid-Scale gates** ``x + σ(l)·f(x)``: into the last linear op of the branch ``f``
  (PolyMLP ``fc_out``, PolyAttn ``proj``; in a PolyConv branch, which ends with its norm, into
  the LayerNorm weight or, for bn, into ``pw_out`` and the norm's bias). The free-scalar and
  LayerScale ablations fold the same way. The residual becomes a plain ``x + f(x)``.
* **Per-channel input scales** ``a ⊙ s0 + b ⊙ s1`` of a cell: the scale of ``s0`` of the first
  cell of a stage into the stage's ``downsample_s0`` (whose output nothing else reads); in the
  first cell of stage 0, where ``s0`` and ``s1`` are both the stem output, into one weight
  ``a + b``; for the bn variants the merge norm's channel weight γ_c multiplies both. The other
  scales stay in :class:`CellMerge` (their inputs are also read by another cell, unscaled or
  with another scale).
* **LayerNorm weights** followed by a 1x1 conv (PolyMLP norm → ``fc_out``, PolyAttn pre-norm →
  ``qkv``, head norm → ``proj``): into that conv's input columns. A LayerNorm that is followed
  by the residual stream (the cell's merge norm, the PolyConv branch's closing norm) keeps its
  weight. The normalisation itself is not foldable: it divides by a data-dependent standard
  deviation, so the LN models keep :class:`ChannelLayerNorm` and are not polynomial.
* **bn variants' norms** (``ChannelBatchNorm`` in eval: running statistics, γ_hw, γ_c): a
  per-position affine map ``(x − μ[h,w]) ⊙ π[h,w]`` (:class:`PositionAffine`) with
  π = γ_hw / sqrt(running_var + eps) and μ = running_mean; the per-channel γ_c is folded into the
  neighbouring 1x1 conv (or the merge weights), and where that conv comes before the norm, μ is
  multiplied by γ_c (and the gate) per channel.
* **The attention scale** σ(l_h) per head: into the ``q_conv`` kernels of that head.
* **The attention row normalisation of the bn variants** (``RunningRowSumNorm``: division by a
  constant row sum): a constant per (head, query) factor γ / (running_denom + eps) applied to
  ``A V`` (:class:`FoldedPolyAttn`); no division remains.
* **The PolyConv channel flip** ``flip_c(DW3x3(u))``: into a row permutation of the weights.
  The fine branch gets its own 1x1 conv whose rows are ``pw_in``'s in reverse order, and its
  depthwise kernels reversed likewise, so no channel permutation is executed. That costs a
  second 1x1 conv per PolyConv; ``flip='channels'`` keeps the flip as a copy of the data
  instead, the faster choice on CPUs (``benchmarks/results/fold_speed.json``).
* **The head's** ``l + l ⊙ r``: ``l ⊙ (r + 1)``, the ``+ 1`` a bias of ``proj``'s second half.
* Dropout, DropPath and the head-dropout buffer are gone (eval only).

The folded module tree (the only module types that remain)::

    FoldedPolyNeXt
      stem                Conv2d (7x7 stride 4, or 3x3 stride 1 for cpolynext_lr), no bias
      stages[s]           FoldedStage
        downsample_s0/_s1 Identity (stage 0) | Sequential(Conv2d dw3x3/2, Conv2d 1x1) | Conv2d 3x3/2
        cells[i]          FoldedCell:  x = norm(merge(s0, s1));  x = block(x) for each block
          merge           CellMerge:   x = w0 ⊙ s0 + w1 ⊙ s1 (w: per channel; a missing w0 is 1,
                                       a single-input merge is w1 ⊙ s1)
          norm            ChannelLayerNorm (LN, with weight) | PositionAffine (bn) | Identity
          blocks[j]       FoldedBlock:  x = x + mixer(x);  x = x + mlp(x)
            mixer         FoldedPolyConv | FoldedPolyAttn
            mlp           FoldedPolyMLP
      head                FoldedHead

    FoldedPolyConv   u = pw_in(x), ū = pw_in_flip(x)            (two Conv2d 1x1; rows of ū reversed)
                     y = coarse(u) ⊙ fine(ū)                    (two depthwise Conv2d: dilated 3x3/5x5, 3x3)
                     out = norm(pw_out(dw_out(y)))              (Conv2d dw3x3, Conv2d 1x1;
                                                                 norm: ChannelLayerNorm with weight | PositionAffine)
                     (flip='channels': pw_in_flip is None, y = coarse(u) ⊙ reverse_c(fine(u)))
    FoldedPolyMLP    h = fc_in(x);  p = h[:, :H] ⊙ h[:, H:]     (Conv2d 1x1 C → 2H, product of the halves)
                     out = fc_out(norm(p))                      (norm: ChannelLayerNorm without weight |
                                                                 PositionAffine with (1,1,h,w) mean)
    FoldedPolyAttn   z = norm(x);  [qk, v] = qkv(z)             (norm as in the MLP; Conv2d 1x1 C → 2A)
                     q = q_conv(qk), k = k_conv(qk), v = v_conv(v)   (depthwise 5x5, 5x5, 3x3; q carries σ(l_h))
                     per head: S = q kᵀ + 1;  A = (S ⊙ S) ⊙ (S ⊙ S)
                       LN: O = (A V) / rowsum(A)                (the l1 normalisation: a division by data)
                       bn: O = (A V) ⊙ row_scale[h, t]          (a constant, shape (1, heads, tokens, 1))
                     out = proj(norm2(final_conv(O)))           (depthwise 3x3; norm2: PositionAffine (bn) |
                                                                 Identity (LN); Conv2d 1x1)
    FoldedHead       h = proj(norm(x))                          (norm as in the MLP; Conv2d 1x1 C → 4C with
                                                                 bias 0 on the first half, 1 on the second)
                     logits = fc(global_pool(h[:, :2C] ⊙ h[:, 2C:]))   (SelectAdaptivePool2d 'avg', Linear)

    ChannelLayerNorm (x − mean_c x) / sqrt(var_c x + eps) [⊙ weight[c]]   (over channels, per position)
    PositionAffine   (x − mean) ⊙ scale; scale (1, 1, h, w), mean (1, 1, h, w) or (1, C, h, w)
    CellMerge        Σ_i w_i ⊙ s_i with per-channel w_i of shape (1, C, 1, 1)

So a folded bn model (``*_bn``) is convolutions (all without bias except the head's ``proj``),
per-position affine maps, per-channel scales, additions, Hadamard products, matrix products (in
APolyNeXt's attention) and the global average pool: a polynomial in the input. Every tensor
of the folded model is a constant (``requires_grad`` off); its forward is eval-only.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..ops.attention_convs import attention_convs, attention_convs_applies, heads_conv
from ..ops.channel_norm import channel_norm_nchw, product_norm_nchw
from ..ops.fused import can_fuse, conv_mul
from ..ops.narrow_pointwise import pointwise_norm, poly_mlp_
from ..ops.pointwise import pointwise_add_, split_pointwise
from ..ops.polyconv_dw import depthwise_taps, polyconv_dw, polyconv_dw_applies
from .polynext import (
    ChannelBatchNorm, GatedHead, LayerNorm2d, PolyAttn, PolyAttnBlock, PolyConv, PolyConvBlock, PolyMLP, PolyNeXt,
    PolyNeXtCell, PolyNeXtStage, RunningRowSumNorm, SigmoidScale,
)

__all__ = [
    'fold_for_inference', 'FoldedPolyNeXt', 'FoldedStage', 'FoldedCell', 'FoldedBlock', 'FoldedPolyConv',
    'FoldedPolyMLP', 'FoldedPolyAttn', 'FoldedHead', 'CellMerge', 'ChannelLayerNorm', 'PositionAffine',
    'FOLDED_MODULE_TYPES', 'FLIPS',
]


# --------------------------------------------------------------------------------------
# The folded modules
# --------------------------------------------------------------------------------------

def _const(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=False)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map, per position, with an optional weight:

        y[:, c] = (x[:, c] − mean_c x) / sqrt(var_c x + eps) [· weight[c]]

    ``weight`` is None where it was folded into the following 1x1 conv. (The forward then passes
    a constant vector of ones: PyTorch's CPU ``layer_norm`` kernel without a weight is about
    twice as slow as with one; ONNX's LayerNormalization takes a scale input anyway.)
    """

    def __init__(self, num_channels: int, eps: float, weight: Optional[torch.Tensor] = None, device=None,
                 dtype=None):
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = None if weight is None else _const(weight)
        if weight is None:
            self.register_buffer('_ones', torch.ones(num_channels, device=device, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, inplace: bool = False) -> torch.Tensor:
        """The norm (+ ``residual``; ``inplace``: may be written into x), by ``ops.channel_norm``."""
        return channel_norm_nchw(x, self.scale, None, self.eps, residual=residual, inplace=inplace)

    def of_product(self, m: torch.Tensor) -> Optional[torch.Tensor]:
        """The norm of m[:, :C] ⊙ m[:, C:] in one pass at CPU inference, else None (ops.channel_norm)."""
        return product_norm_nchw(m, self.scale, None, self.eps)

    @property
    def scale(self) -> torch.Tensor:
        return self._ones if self.weight is None else self.weight

    def extra_repr(self) -> str:
        return f'{self.num_channels}, eps={self.eps}, weight={self.weight is not None}'


class PositionAffine(nn.Module):
    """y = (x − mean) ⊙ scale: the eval-mode ``ChannelBatchNorm`` of the bn variants, folded.

    ``scale`` has shape (1, 1, h, w): γ_hw / sqrt(running_var + eps), one factor per position,
    shared by the channels. ``mean`` is the running mean, (1, 1, h, w), or (1, C, h, w) where a
    per-channel factor f (γ_c, times the gate) was folded into the conv before the norm
    (mean[c, h, w] = f[c] · running_mean[h, w]). The mean is subtracted before scaling, as in the
    unfolded norm, so that no precision is lost where the variance is small.
    """

    def __init__(self, scale: torch.Tensor, mean: torch.Tensor):
        super().__init__()
        self.scale = _const(scale)
        self.mean = _const(mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.scale

    def extra_repr(self) -> str:
        return f'scale={tuple(self.scale.shape)}, mean={tuple(self.mean.shape)}'


class CellMerge(nn.Module):
    """The multi-input skip of a cell: x = w0 ⊙ s0 + w1 ⊙ s1, per-channel weights (1, C, 1, 1).

    ``weight0 = None`` with two inputs: s0 enters unscaled (its scale was folded into the conv
    that produced it). ``num_inputs = 1``: x = w1 ⊙ s1 and s0 is not read (the first cell of
    stage 0, where s0 is s1, or a model without the multi-input skip).
    """

    def __init__(self, num_inputs: int, weight0: Optional[torch.Tensor], weight1: torch.Tensor):
        super().__init__()
        if num_inputs not in (1, 2):
            raise ValueError(f'CellMerge takes 1 or 2 inputs, got {num_inputs}')
        self.num_inputs = num_inputs
        self.weight0 = None if weight0 is None or num_inputs == 1 else _const(weight0)
        self.weight1 = _const(weight1)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        if self.num_inputs == 1:
            return s1 * self.weight1
        if self.weight0 is None:
            return s0 + s1 * self.weight1
        return s0 * self.weight0 + s1 * self.weight1

    def extra_repr(self) -> str:
        w0 = 'none' if self.num_inputs == 1 else ('1' if self.weight0 is None else 'per-channel')
        return f'inputs={self.num_inputs}, w0={w0}, w1=per-channel'


class FoldedPolyConv(nn.Module):
    """out = norm(pw_out(dw_out(coarse(pw_in(x)) ⊙ fine(pw_in_flip(x))))).

    ``pw_in_flip`` holds ``pw_in``'s rows in reverse channel order and ``fine`` the fine kernels in
    reverse order, which is the reference's ``flip_c(DW3x3(u))`` without moving any data.

    With ``pw_in_flip = None`` (``fold_for_inference(..., flip='channels')``) the flip stays a
    channel reversal of the data instead: ``coarse(u) ⊙ reverse_c(fine(u))`` with ``u = pw_in(x)``
    and ``fine`` unchanged. That is one copy of the fine branch instead of a second 1x1 conv,
    which is faster on CPUs, but a permutation that an encrypted (packed-slot) evaluation pays for.
    """

    def __init__(self, pw_in: nn.Conv2d, pw_in_flip: Optional[nn.Conv2d], coarse: nn.Conv2d, fine: nn.Conv2d,
                 dw_out: nn.Conv2d, pw_out: nn.Conv2d, norm: nn.Module):
        super().__init__()
        self.pw_in = pw_in
        self.pw_in_flip = pw_in_flip
        self.coarse = coarse
        self.fine = fine
        self.dw_out = dw_out
        self.pw_out = pw_out
        self.norm = norm

    def core(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before ``pw_out``."""
        # (on CPU inference the product is the coarse convolution's post-op: ops.fused.conv_mul; with the flip
        # a channel reversal, the three depthwise convolutions and the product are one kernel: ops.polyconv_dw)
        if self.pw_in_flip is None:
            u = self.pw_in(x)
            if polyconv_dw_applies(u, self.coarse, self.fine, self.dw_out):
                return polyconv_dw(u, self.coarse, self.fine, self.dw_out)
            y = conv_mul(u, self.fine(u).flip(1), self.coarse)
        else:
            y = conv_mul(self.pw_in(x), self.fine(self.pw_in_flip(x)), self.coarse)
        return self.dw_out(y)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the norm."""
        return self.pw_out(self.core(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.branch(x))

    def residual(self, x: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """x + self(x), as a new tensor (after a LayerNorm, added by the norm's pass: ops.channel_norm; at CPU
        inference ``pw_out``, the norm and the addition in one kernel where it serves: ops.narrow_pointwise, written
        into x with ``owned``)."""
        if isinstance(self.norm, ChannelLayerNorm):
            z = self.core(x)
            y = None if self.pw_out.bias is not None else pointwise_norm(
                z, self.pw_out.weight, self.norm.scale, None, self.norm.eps, residual=x, inplace=owned)
            return self.norm(self.pw_out(z), residual=x, inplace=True) if y is None else y
        return self(x).add_(x)


class FoldedPolyMLP(nn.Module):
    """out = fc_out(norm(h[:, :H] ⊙ h[:, H:])),  h = fc_in(x)."""

    def __init__(self, fc_in: nn.Conv2d, norm: nn.Module, fc_out: nn.Conv2d):
        super().__init__()
        self.fc_in = fc_in
        self.norm = norm
        self.fc_out = fc_out

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm, ChannelLayerNorm) and self.fc_in.bias is None:
            # CPU inference: fc_in, the product and the norm in one kernel (ops.narrow_pointwise)
            y = pointwise_norm(x, self.fc_in.weight, self.norm.scale, None, self.norm.eps, product=True)
            if y is not None:
                return y
        m = self.fc_in(x)
        if isinstance(self.norm, ChannelLayerNorm):
            y = self.norm.of_product(m)   # CPU inference: the product is not written (ops.channel_norm)
            if y is not None:
                return y
        a, b = m.chunk(2, dim=1)
        return self.norm(a * b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.hidden(x))

    def residual(self, x: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """x + self(x); with ``owned`` (x may be overwritten) ``fc_out`` adds into x (ops.pointwise.pointwise_add_), or
        the whole branch is one kernel where it serves (ops.narrow_pointwise.poly_mlp_)."""
        if owned and can_fuse(x):
            norm = self.norm
            if (isinstance(norm, ChannelLayerNorm) and self.fc_in.bias is None and self.fc_out.bias is None
                    and poly_mlp_(x, self.fc_in.weight, norm.scale, None, norm.eps, self.fc_out.weight) is not None):
                return x
            return pointwise_add_(x, self.hidden(x), self.fc_out)
        return self(x).add_(x)


class FoldedPolyAttn(nn.Module):
    """Polynomial attention with its pre-norm, the head scale folded into ``q_conv``.

        z = norm(x);  [qk, v] = qkv(z);  q, k, v = q_conv(qk), k_conv(qk), v_conv(v)
        S = q kᵀ + 1;  A = S⁴ (two squarings; ``power`` is 4 in every PolyNeXt)
        O = (A V) / rowsum(A)          (``row_scale is None``: the LN models' l1 row normalisation)
        O = (A V) ⊙ row_scale          (bn: the constant γ / (running row sum + eps), (1, heads, N, 1))
        out = proj(norm2(final_conv(O)))
    """

    def __init__(self, norm: nn.Module, qkv: nn.Conv2d, q_conv: nn.Conv2d, k_conv: nn.Conv2d, v_conv: nn.Conv2d,
                 final_conv: nn.Conv2d, norm2: nn.Module, proj: nn.Conv2d, num_heads: int, head_dim: int,
                 row_scale: Optional[torch.Tensor], power: int = 4, chunk_bytes: Optional[int] = None):
        super().__init__()
        self.norm = norm
        self.qkv = qkv
        self.q_conv = q_conv
        self.k_conv = k_conv
        self.v_conv = v_conv
        self.final_conv = final_conv
        self.norm2 = norm2
        self.proj = proj
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.row_scale = None if row_scale is None else _const(row_scale)
        self.power = power
        self.chunk_bytes = chunk_bytes

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        # (B, A, H, W) → (B, heads, N, head_dim); channel = head · head_dim + d
        return t.reshape(t.shape[0], self.num_heads, self.head_dim, -1).transpose(-1, -2)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``residual``: return ``residual + proj(...)``, added into ``residual`` by ``proj`` (pointwise_add_)."""
        if residual is None:
            return self.proj(self.attend(x))
        return pointwise_add_(residual, self.attend(x), self.proj)

    def residual(self, x: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """x + self(x); with ``owned`` (x may be overwritten) ``proj`` adds into x (ops.pointwise.pointwise_add_)."""
        if owned and can_fuse(x):
            return self(x, residual=x)
        return self(x).add_(x)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before ``proj``."""
        b, _, h, w = x.shape
        z = self.norm(x)
        convs = (self.q_conv, self.k_conv, self.v_conv, self.final_conv)
        if attention_convs_applies(z, self.attn_dim, self.head_dim, convs):
            # CPU inference: the convolutions read and write the heads (ops.attention_convs)
            q, k, v = attention_convs(self.qkv(z), *(depthwise_taps(m.weight) for m in convs[:3]), self.num_heads)
        else:
            qk, v = split_pointwise(z, self.qkv, self.attn_dim)
            q, k, v = self._heads(self.q_conv(qk)), self._heads(self.k_conv(qk)), self._heads(self.v_conv(v))
            convs = None
        if self.row_scale is None:
            from ..ops.poly_attention import poly_attention   # l1-normalised rows (chunked kernel)
            o = poly_attention(q, k, v, self.power, self.chunk_bytes)
        else:
            s = q @ k.transpose(-1, -2) + 1
            if self.power == 4:
                s = s * s
                a = s * s
            else:
                a = s ** self.power
            o = (a @ v) * self.row_scale
        if convs is not None:
            return self.norm2(heads_conv(o, depthwise_taps(self.final_conv.weight), h, w))
        o = o.transpose(1, 2).reshape(b, h, w, self.attn_dim).permute(0, 3, 1, 2)
        return self.norm2(self.final_conv(o))

    def extra_repr(self) -> str:
        norm = 'l1 rows (data-dependent)' if self.row_scale is None else 'constant row_scale'
        return f'heads={self.num_heads}, head_dim={self.head_dim}, power={self.power}, normalisation={norm}'


class FoldedBlock(nn.Module):
    """x = x + mixer(x);  x = x + mlp(x)  (the gates live inside the branches).

    ``owned=True`` (the cell's call): x is the cell's own stream and may be overwritten, so on CPU
    inference a branch that ends with a 1x1 conv adds into it as the conv's post-op."""

    def __init__(self, mixer: nn.Module, mlp: nn.Module):
        super().__init__()
        self.mixer = mixer
        self.mlp = mlp

    def forward(self, x: torch.Tensor, owned: bool = False) -> torch.Tensor:
        x = self.mixer.residual(x, owned)   # x + mixer(x)
        return self.mlp.residual(x, True)   # x + mlp(x); x is now this block's own tensor


class FoldedCell(nn.Module):
    """x = norm(merge(s0, s1)), then the blocks."""

    def __init__(self, merge: CellMerge, norm: nn.Module, blocks: nn.ModuleList):
        super().__init__()
        self.merge = merge
        self.norm = norm
        self.blocks = blocks

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.merge(s0, s1))
        for block in self.blocks:
            x = block(x, owned=True)
        return x


class FoldedStage(nn.Module):
    """Reduce both streams, then each cell reads the outputs of the two cells before it."""

    def __init__(self, downsample_s0: nn.Module, downsample_s1: nn.Module, cells: nn.ModuleList):
        super().__init__()
        self.downsample_s0 = downsample_s0
        self.downsample_s1 = downsample_s1
        self.cells = cells

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        s0, s1 = self.downsample_s0(s0), self.downsample_s1(s1)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return s0, s1


class FoldedHead(nn.Module):
    """h = proj(norm(x));  logits = fc(global_pool(h[:, :2C] ⊙ h[:, 2C:]))  (proj's bias: 0 | 1)."""

    def __init__(self, norm: nn.Module, proj: nn.Conv2d, global_pool: nn.Module, fc: nn.Module):
        super().__init__()
        self.norm = norm
        self.proj = proj
        self.global_pool = global_pool
        self.fc = fc

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        left, right = self.proj(self.norm(x)).chunk(2, dim=1)
        x = self.global_pool(left * right)
        return x if pre_logits else self.fc(x)


class FoldedPolyNeXt(nn.Module):
    """The folded, eval-only PolyNeXt (see the module docstring). Made by :func:`fold_for_inference`.

    Keeps timm's inference API: ``forward``, ``forward_features``, ``forward_head(pre_logits=)``,
    ``num_classes``, ``num_features``, ``pretrained_cfg``. ``source_args`` are the arguments of the
    model it was folded from.
    """

    def __init__(self, stem: nn.Conv2d, stages: nn.Sequential, head: FoldedHead, *, num_classes: int,
                 num_features: int, norm_kind: str, img_size: Tuple[int, int], channels_last: bool,
                 architecture: Optional[str] = None):
        super().__init__()
        self.stem = stem
        self.stages = stages
        self.head = head
        self.num_classes = num_classes
        self.num_features = num_features
        self.norm_kind = norm_kind
        self.img_size = img_size
        self.channels_last = channels_last
        self.architecture = architecture
        self.pretrained_cfg: Dict = {}

    @property
    def fully_polynomial(self) -> bool:
        """True for the bn variants: no normalisation by data remains."""
        return self.norm_kind == 'bn'

    def train(self, mode: bool = True) -> 'FoldedPolyNeXt':
        if mode:
            raise RuntimeError('a folded PolyNeXt is for inference only (its norms and gates are constants); '
                               'train the unfolded model and fold it again')
        return super().train(False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_kind == 'bn' and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f'This folded bn model was built for {self.img_size[0]}x{self.img_size[1]} inputs but got '
                f'{x.shape[-2]}x{x.shape[-1]}: its per-position affine maps have that size.')
        x = self.stem(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        s0 = s1 = x
        for stage in self.stages:
            s0, s1 = stage(s0, s1)
        return s1

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


#: Every module type a folded model is made of (besides the containers nn.Sequential / nn.ModuleList).
FOLDED_MODULE_TYPES = (
    FoldedPolyNeXt, FoldedStage, FoldedCell, FoldedBlock, FoldedPolyConv, FoldedPolyMLP, FoldedPolyAttn, FoldedHead,
    CellMerge, ChannelLayerNorm, PositionAffine, nn.Conv2d, nn.Linear, nn.Identity,
)


# --------------------------------------------------------------------------------------
# Folding arithmetic (float64, cast back to the model's dtype)
# --------------------------------------------------------------------------------------

def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _conv(like: nn.Conv2d, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> nn.Conv2d:
    """A Conv2d with ``like``'s geometry, dtype and device and the given (float64) weight / bias."""
    ref = like.weight
    conv = nn.Conv2d(like.in_channels, like.out_channels, like.kernel_size, stride=like.stride, padding=like.padding,
                     dilation=like.dilation, groups=like.groups, bias=bias is not None,
                     padding_mode=like.padding_mode, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight.to(ref.dtype))
        if bias is not None:
            conv.bias.copy_(bias.to(ref.dtype))
    return conv


def _bias(conv: nn.Conv2d) -> Optional[torch.Tensor]:
    return None if conv.bias is None else _f64(conv.bias)


def _copy_conv(conv: nn.Conv2d) -> nn.Conv2d:
    return _conv(conv, _f64(conv.weight), _bias(conv))


def _scale_rows(conv: nn.Conv2d, scale: torch.Tensor) -> nn.Conv2d:
    """conv followed by a per-output-channel scale: W[o] ← s[o]·W[o], b[o] ← s[o]·b[o]."""
    s = scale.reshape(-1)
    b = _bias(conv)
    return _conv(conv, _f64(conv.weight) * s.view(-1, 1, 1, 1), None if b is None else b * s)


def _scale_columns(conv: nn.Conv2d, scale: torch.Tensor) -> nn.Conv2d:
    """A per-input-channel scale followed by a dense conv: W[:, i] ← W[:, i]·s[i]."""
    if conv.groups != 1:
        raise ValueError('input-channel scales fold into dense convolutions only')
    return _conv(conv, _f64(conv.weight) * scale.reshape(1, -1, 1, 1), _bias(conv))


def _bn_parts(norm: ChannelBatchNorm) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ChannelBatchNorm in eval = (x − μ) ⊙ π ⊙ γ_c: returns π, μ (1,1,h,w) and γ_c (C,)."""
    pi = torch.rsqrt(_f64(norm.running_var) + norm.eps) * _f64(norm.gamma_hw)
    return pi, _f64(norm.running_mean), _f64(norm.gamma_c)


def _to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=like.dtype)


def _norm_before_conv(norm: nn.Module, num_channels: int) -> Tuple[nn.Module, Optional[torch.Tensor]]:
    """A norm followed by a 1x1 conv: the folded norm and the per-channel factor for the conv's columns."""
    if isinstance(norm, LayerNorm2d):
        if norm.bias is not None:
            raise ConfigError('fold_for_inference: a LayerNorm with a bias is not part of PolyNeXt')
        return (ChannelLayerNorm(num_channels, norm.eps, device=norm.weight.device, dtype=norm.weight.dtype),
                _f64(norm.weight))
    if isinstance(norm, ChannelBatchNorm):
        pi, mu, gamma_c = _bn_parts(norm)
        ref = norm.gamma_c
        return PositionAffine(_to(pi, ref), _to(mu, ref)), gamma_c
    if isinstance(norm, nn.Identity):
        return nn.Identity(), None
    raise ConfigError(f'fold_for_inference: cannot fold a {type(norm).__name__}')


def _gate_vector(gates: torch.Tensor, index: int, dim: int) -> torch.Tensor:
    """The gate of residual ``index`` as a per-channel float64 vector (scalar gates broadcast)."""
    g = _f64(gates[index]).reshape(-1)
    return g.expand(dim).clone() if g.numel() == 1 else g


def _fold_head(head: GatedHead) -> FoldedHead:
    norm, cols = _norm_before_conv(head.norm, head.proj.in_channels)
    proj = head.proj if cols is None else _scale_columns(head.proj, cols)
    out = proj.out_channels
    bias = torch.zeros(out, dtype=torch.float64, device=proj.weight.device)
    bias[out // 2:] = 1.0                                           # l + l ⊙ r = l ⊙ (r + 1)
    if proj.bias is not None:
        bias += _f64(proj.bias)
    proj = _conv(proj, _f64(proj.weight), bias)
    fc = copy.deepcopy(head.fc)
    return FoldedHead(norm, proj, copy.deepcopy(head.global_pool), fc)


def _reverse_rows(conv: nn.Conv2d) -> nn.Conv2d:
    """The conv whose output channels come in reverse order (a row permutation)."""
    b = _bias(conv)
    return _conv(conv, _f64(conv.weight).flip(0), None if b is None else b.flip(0))


def _fold_poly_conv(mixer: PolyConv, mixer_norm: nn.Module, gate: torch.Tensor, flip: str) -> FoldedPolyConv:
    pw_in = _copy_conv(mixer.pw_in)
    if flip == 'weights':          # reverse_c(fine(u)) = fine'(reverse_c(u)) = fine'(pw_in'(x))
        pw_in_flip, fine = _reverse_rows(mixer.pw_in), _reverse_rows(mixer.fine)
    else:
        pw_in_flip, fine = None, _copy_conv(mixer.fine)
    pw_out = mixer.pw_out
    if isinstance(mixer_norm, LayerNorm2d):          # the gate into the closing LayerNorm's weight
        norm = ChannelLayerNorm(pw_out.out_channels, mixer_norm.eps, _to(_f64(mixer_norm.weight) * gate,
                                                                         mixer_norm.weight))
        pw_out = _copy_conv(pw_out)
    elif isinstance(mixer_norm, ChannelBatchNorm):   # g·γ_c ⊙ (z − μ) ⊙ π = (g·γ_c ⊙ z − g·γ_c ⊗ μ) ⊙ π
        pi, mu, gamma_c = _bn_parts(mixer_norm)
        c = gamma_c * gate
        pw_out = _scale_rows(pw_out, c)
        ref = mixer_norm.gamma_c
        norm = PositionAffine(_to(pi, ref), _to(mu * c.view(1, -1, 1, 1), ref))
    else:
        raise ConfigError(f'fold_for_inference: cannot fold a PolyConv closed by a {type(mixer_norm).__name__}')
    return FoldedPolyConv(pw_in, pw_in_flip, _copy_conv(mixer.coarse), fine, _copy_conv(mixer.dw_out), pw_out, norm)


def _fold_poly_mlp(mlp: PolyMLP, gate: torch.Tensor) -> FoldedPolyMLP:
    norm, cols = _norm_before_conv(mlp.norm, mlp.fc_out.in_channels)
    fc_out = mlp.fc_out if cols is None else _scale_columns(mlp.fc_out, cols)
    return FoldedPolyMLP(_copy_conv(mlp.fc_in), norm, _scale_rows(fc_out, gate))


def _fold_poly_attn(mixer: PolyAttn, mixer_norm: nn.Module, gate: torch.Tensor) -> FoldedPolyAttn:
    norm, cols = _norm_before_conv(mixer_norm, mixer.qkv.in_channels)
    qkv = _copy_conv(mixer.qkv) if cols is None else _scale_columns(mixer.qkv, cols)
    head_scale = torch.sigmoid(_f64(mixer.scale)).reshape(-1)                # σ(l_h), one per head
    q_conv = _scale_rows(mixer.q_conv, head_scale.repeat_interleave(mixer.head_dim))
    proj = mixer.proj
    row_scale = None
    norm2: nn.Module = nn.Identity()
    if mixer.fully_polynomial:
        rs: RunningRowSumNorm = mixer.norm
        row_scale = _to(_f64(rs.gamma) / (_f64(rs.running_denom) + rs.eps), rs.gamma)
        norm2, cols2 = _norm_before_conv(mixer.norm2, proj.in_channels)
        proj = _scale_columns(proj, cols2)
    return FoldedPolyAttn(norm, qkv, q_conv, _copy_conv(mixer.k_conv), _copy_conv(mixer.v_conv),
                          _copy_conv(mixer.final_conv), norm2, _scale_rows(proj, gate), mixer.num_heads,
                          mixer.head_dim, row_scale, mixer.power, mixer.chunk_bytes)


def _fold_cell(cell: PolyNeXtCell, dim: int, flip: str
               ) -> Tuple[FoldedCell, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The folded cell, and its merge weights w0, w1 (float64, before any folding into producers)."""
    gates = (torch.sigmoid(_f64(cell.gates.logits)) if isinstance(cell.gates, SigmoidScale)
             else _f64(cell.gates.gates()))
    blocks = []
    for block, (i_mix, i_mlp) in zip(cell.blocks, cell.gate_index):
        g_mix, g_mlp = _gate_vector(gates, i_mix, dim), _gate_vector(gates, i_mlp, dim)
        if isinstance(block, PolyConvBlock) and isinstance(block.mixer, PolyConv):
            mixer = _fold_poly_conv(block.mixer, block.mixer_norm, g_mix, flip)
        elif isinstance(block, PolyAttnBlock) and isinstance(block.mixer, PolyAttn):
            mixer = _fold_poly_attn(block.mixer, block.mixer_norm, g_mix)
        else:
            raise ConfigError(f'fold_for_inference: cannot fold a {type(block.mixer).__name__} token mixer')
        if not isinstance(block.mlp, PolyMLP):
            raise ConfigError(f'fold_for_inference: cannot fold a {type(block.mlp).__name__} channel MLP')
        blocks.append(FoldedBlock(mixer, _fold_poly_mlp(block.mlp, g_mlp)))

    w0 = _f64(cell.scale0.scale).reshape(-1) if cell.multi_input_skip else None
    w1 = _f64(cell.scale1.scale).reshape(-1)
    merge_norm = cell.merge_norm
    if isinstance(merge_norm, ChannelBatchNorm):     # γ_c ⊙ (w0 s0 + w1 s1 − μ) ⊙ π
        pi, mu, gamma_c = _bn_parts(merge_norm)
        w0 = None if w0 is None else w0 * gamma_c
        w1 = w1 * gamma_c
        ref = merge_norm.gamma_c
        norm: nn.Module = PositionAffine(_to(pi, ref), _to(mu * gamma_c.view(1, -1, 1, 1), ref))
    elif isinstance(merge_norm, LayerNorm2d):
        norm = ChannelLayerNorm(dim, merge_norm.eps, merge_norm.weight)
    elif isinstance(merge_norm, nn.Identity):
        norm = nn.Identity()
    else:
        raise ConfigError(f'fold_for_inference: cannot fold a {type(merge_norm).__name__} cell norm')
    return FoldedCell(CellMerge(2, None, torch.ones(1)), norm, nn.ModuleList(blocks)), w0, w1


def _merge(num_inputs: int, w0: Optional[torch.Tensor], w1: torch.Tensor, like: torch.Tensor) -> CellMerge:
    view = lambda w: None if w is None else _to(w.view(1, -1, 1, 1), like)  # noqa: E731
    return CellMerge(num_inputs, view(w0), view(w1))


def _fold_downsample(ds: nn.Module, row_scale: Optional[torch.Tensor]) -> nn.Module:
    """A stage reduction, with ``row_scale`` (the first cell's s0 weight) folded into its last conv."""
    if isinstance(ds, nn.Identity):
        if row_scale is not None:
            raise AssertionError('no conv to fold the scale into')
        return nn.Identity()
    if isinstance(ds, nn.Conv2d):
        return _copy_conv(ds) if row_scale is None else _scale_rows(ds, row_scale)
    if isinstance(ds, nn.Sequential) and all(isinstance(m, nn.Conv2d) for m in ds):
        convs = [_copy_conv(m) for m in ds[:-1]]
        last = _copy_conv(ds[-1]) if row_scale is None else _scale_rows(ds[-1], row_scale)
        return nn.Sequential(*convs, last)
    raise ConfigError(f'fold_for_inference: cannot fold a {type(ds).__name__} reduction')


def _fold_stage(stage: PolyNeXtStage, first_stage: bool, flip: str) -> FoldedStage:
    cells = []
    ds0_scale = None
    for i, cell in enumerate(stage.cells):
        dim = cell.scale1.scale.shape[1]
        folded, w0, w1 = _fold_cell(cell, dim, flip)
        like = cell.scale1.scale
        if w0 is None:                                   # no multi-input skip: x = w1 ⊙ s1
            merge = _merge(1, None, w1, like)
        elif i == 0 and first_stage:                     # s0 and s1 are both the stem output
            merge = _merge(1, None, w0 + w1, like)
        elif i == 0 and not isinstance(stage.downsample_s0, nn.Identity):
            ds0_scale = w0                               # only this cell reads downsample_s0's output
            merge = _merge(2, None, w1, like)
        else:
            merge = _merge(2, w0, w1, like)
        folded.merge = merge
        cells.append(folded)
    return FoldedStage(_fold_downsample(stage.downsample_s0, ds0_scale), _fold_downsample(stage.downsample_s1, None),
                       nn.ModuleList(cells))


FLIPS = ('weights', 'channels')


def fold_for_inference(model: nn.Module, flip: str = 'weights') -> FoldedPolyNeXt:
    """An eval-only copy of a PolyNeXt with every inference-time constant folded (module docstring).

    ``flip='weights'`` (default): PolyConv's channel flip becomes a row permutation of the weights
    (a second 1x1 conv per PolyConv; no data is permuted: the graph for compilers and encrypted
    evaluation). ``flip='channels'``: the flip stays a channel reversal of the data, which is
    faster on CPUs (see :class:`FoldedPolyConv`).

    The model itself is not changed. Its logits and the folded model's agree within rounding
    (exact in real arithmetic). The bn variants fold into a polynomial of the input; the LN
    models keep their (weight-free where possible) LayerNorms. Ablation switches that replace the
    polynomial blocks (``mlp``, ``conv_mixer``, ``product_*``, ``attn``) are refused; the others
    (``residual_scale``, ``multi_input_skip``, ``cell_norm``, ``stacks``) fold.
    """
    if flip not in FLIPS:
        raise ConfigError(f"fold_for_inference: flip must be one of {', '.join(FLIPS)}, got {flip!r}")
    if not isinstance(model, PolyNeXt):
        raise ConfigError(f'fold_for_inference folds PolyNeXt models; got a {type(model).__name__} '
                          f'(the MetaFormer baselines have no inference-time constants to fold)')
    a = model.ablation
    bad = [f'{k}={getattr(a, k)!r}' for k, default in (('mlp', 'poly'), ('conv_mixer', 'poly'), ('product_gelu', 'none'),
                                                       ('product_op', 'mul'), ('attn', 'poly'))
           if getattr(a, k) != default]
    if bad:
        raise ConfigError(f"fold_for_inference: the ablation {', '.join(bad)} replaces PolyNeXt's polynomial blocks "
                          f"and is not folded; fold the published architecture (or residual_scale / "
                          f"multi_input_skip / cell_norm / stacks variants)")
    if isinstance(model.head, nn.Identity) or not isinstance(model.head, GatedHead):
        raise ConfigError('fold_for_inference: the model has no classifier head (features_only / pruned); '
                          'fold the full classifier')
    with torch.no_grad():
        stages = nn.Sequential(*[_fold_stage(stage, s == 0, flip) for s, stage in enumerate(model.stages)])
        folded = FoldedPolyNeXt(
            _copy_conv(model.stem), stages, _fold_head(model.head), num_classes=model.num_classes,
            num_features=model.num_features, norm_kind=model.norm_kind, img_size=model.img_size,
            channels_last=model.channels_last,
            architecture=(getattr(model, 'pretrained_cfg', None) or {}).get('architecture'))
    folded.pretrained_cfg = copy.deepcopy(getattr(model, 'pretrained_cfg', None) or {})
    folded.feature_info = copy.deepcopy(model.feature_info)
    folded.requires_grad_(False)
    return folded.eval()
