"""Phase 1 of the HE compiler: a folded PolyNeXt as a graph of fused linear maps and Hadamard products.

Every op of a folded bn model (``polynext.fold_for_inference``) is linear except the Hadamard
products. This module turns the folded module tree into a small dataflow graph whose nodes are:

* ``input``   the client's image (after the model's mean / std normalisation, which the client does);
* ``linear``  y = Σ_k M_k(x_k) + bias, each M_k a :class:`KernelMap` (a convolution with per-position
              factors before and after it): consecutive linear ops are composed into one map
              wherever one side of the composition is pointwise, so that each ``linear`` node costs one
              multiplicative level under CKKS;
* ``mul``     a ⊙ b (one ciphertext × ciphertext product);
* ``add``     a + b (the residuals);
* ``pool``    the global average pool's sum over positions (the 1 / HW is folded into the classifier);
* ``output``  the logits.

What is fused (each a single ``linear`` node, i.e. one level):

* stem → first cell's merge → its PositionAffine (and again into the second cell's merge, which
  reads the stem output as s0);
* a stage reduction (dw3x3/2 → 1x1, or a dense 3x3/2) → the merges that read it;
* PolyConv: ``coarse ∘ pw_in`` and ``fine ∘ pw_in_flip`` (the channel flip is already a row
  permutation of the weights), and ``norm ∘ pw_out ∘ dw_out`` (the gate is already in ``pw_out``);
* PolyMLP: the two halves of ``fc_in``; ``fc_out ∘ norm``;
* head: the two halves of ``proj ∘ norm`` (with the +1 bias); ``fc ∘ 1/HW`` after the pool.

So a block is 6 levels (3 for PolyConv, 3 for PolyMLP), a cell merge 1 (0 for the first cell of
the first stage), a reduction 1, the head 3. PolyAttn is not compiled (yet): a model with attention
stages is refused with one message. LN models are refused, naming their first LayerNorm.

``evaluate(graph, x)`` runs the graph in float64 NumPy/PyTorch on logical (C, H, W) tensors: the
reference that the packed program (:mod:`polynext.fhe.program`) must reproduce, and the source of
the value ranges of the analysis.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ['KernelMap', 'Node', 'Graph', 'Lazy', 'build_graph', 'evaluate', 'NotPolynomialError']


class NotPolynomialError(ConfigError):
    """The model has an op that is not a polynomial (LayerNorm, data-dependent division, ...)."""


def _arr(t) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float64)


@dataclass
class KernelMap:
    """An affine map between logical (C, H, W) tensors: ``y = π_out ⊙ conv(π_in ⊙ x) + bias``.

    ``weight`` (C_out, C_in, kh, kw); tap (ky, kx) reads input row ``stride·y + dy0 + ky·dilation``
    (and likewise for columns), zero outside the input. ``pi_in`` (H_in, W_in) and ``pi_out``
    (H_out, W_out) are per-position factors shared by all channels (the folded bn norms), ``bias``
    (C_out, H_out, W_out). Two maps compose exactly (``after``) when one of them is pointwise.
    """
    weight: np.ndarray
    in_hw: Tuple[int, int]
    out_hw: Tuple[int, int]
    stride: int = 1
    dilation: int = 1
    dy0: int = 0
    pi_in: Optional[np.ndarray] = None
    pi_out: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None

    @property
    def c_out(self) -> int:
        return self.weight.shape[0]

    @property
    def c_in(self) -> int:
        return self.weight.shape[1]

    @property
    def pointwise(self) -> bool:
        return self.weight.shape[2:] == (1, 1) and self.stride == 1 and self.dy0 == 0

    def taps(self) -> List[Tuple[int, int, int, int]]:
        """(ky, kx, dy, dx) of every tap."""
        kh, kw = self.weight.shape[2:]
        return [(ky, kx, self.dy0 + ky * self.dilation, self.dy0 + kx * self.dilation)
                for ky in range(kh) for kx in range(kw)]

    # ---- constructors -------------------------------------------------------------
    @staticmethod
    def from_conv(conv: nn.Conv2d, in_hw: Tuple[int, int]) -> 'KernelMap':
        if conv.padding_mode != 'zeros' or isinstance(conv.padding, str):
            raise ConfigError(f'fhe: unsupported convolution padding {conv.padding!r}/{conv.padding_mode}')
        w = _arr(conv.weight)
        if conv.groups != 1:                      # depthwise: expand to a dense (diagonal) kernel
            if conv.groups != conv.in_channels or conv.out_channels != conv.in_channels:
                raise ConfigError('fhe: only depthwise or dense convolutions are supported')
            c = conv.out_channels
            dense = np.zeros((c, c) + w.shape[2:])
            dense[np.arange(c), np.arange(c)] = w[:, 0]
            w = dense
        (sh, sw), (dh, dw), (ph, pw) = conv.stride, conv.dilation, conv.padding
        if sh != sw or dh != dw or ph != pw or w.shape[2] != w.shape[3]:
            raise ConfigError('fhe: only square kernels with equal strides, dilations and paddings are supported')
        k = w.shape[2]
        out_hw = tuple((n + 2 * ph - dh * (k - 1) - 1) // sh + 1 for n in in_hw)
        bias = None
        if conv.bias is not None:
            bias = np.broadcast_to(_arr(conv.bias)[:, None, None], (w.shape[0],) + out_hw).copy()
        return KernelMap(w, tuple(in_hw), out_hw, sh, dh, -ph, bias=bias)

    @staticmethod
    def channel_scale(scale: np.ndarray, hw: Tuple[int, int]) -> 'KernelMap':
        s = np.asarray(scale, np.float64).reshape(-1)
        return KernelMap(np.diag(s)[:, :, None, None], tuple(hw), tuple(hw))

    @staticmethod
    def identity(c: int, hw: Tuple[int, int]) -> 'KernelMap':
        return KernelMap.channel_scale(np.ones(c), hw)

    @staticmethod
    def dense(matrix: np.ndarray, hw: Tuple[int, int], bias: Optional[np.ndarray] = None) -> 'KernelMap':
        """A 1x1 conv y[o] = Σ_i M[o, i] x[i] (+ bias[o])."""
        m = np.asarray(matrix, np.float64)
        b = None if bias is None else np.broadcast_to(np.asarray(bias, np.float64)[:, None, None],
                                                     (m.shape[0],) + tuple(hw)).copy()
        return KernelMap(m[:, :, None, None], tuple(hw), tuple(hw), bias=b)

    def rows(self, index) -> 'KernelMap':
        """Only the output channels ``index`` (a slice or index array)."""
        return replace(self, weight=self.weight[index], bias=None if self.bias is None else self.bias[index])

    def scaled(self, factor: float) -> 'KernelMap':
        return replace(self, weight=self.weight * factor, bias=None if self.bias is None else self.bias * factor)

    def with_position_affine(self, scale: np.ndarray, mean: np.ndarray) -> 'KernelMap':
        """(self(x) − mean) ⊙ scale: a PositionAffine after this map."""
        s = np.asarray(scale, np.float64).reshape(self.out_hw)
        pi_out = s if self.pi_out is None else self.pi_out * s
        m = np.broadcast_to(np.asarray(mean, np.float64).reshape(-1, *self.out_hw), (self.c_out,) + self.out_hw)
        b = (0.0 if self.bias is None else self.bias) - m
        return replace(self, pi_out=pi_out, bias=b * s)

    # ---- algebra ------------------------------------------------------------------
    def after(self, inner: 'KernelMap') -> 'KernelMap':
        """self ∘ inner, exact when one of the two is pointwise."""
        if inner.out_hw != self.in_hw or inner.c_out != self.c_in:
            raise ValueError(f'cannot compose: {inner.c_out}x{inner.out_hw} into {self.c_in}x{self.in_hw}')
        bias = self.apply(inner.bias[None])[0] if inner.bias is not None else self.bias
        if inner.pointwise:
            w = np.einsum('omyx,mi->oiyx', self.weight, inner.weight[:, :, 0, 0])
            pi_in = _mul(_mul(self.pi_in, inner.pi_out), inner.pi_in)
            return KernelMap(w, inner.in_hw, self.out_hw, self.stride, self.dilation, self.dy0, pi_in, self.pi_out, bias)
        if self.pointwise:
            w = np.einsum('om,miyx->oiyx', self.weight[:, :, 0, 0], inner.weight)
            pi_out = _mul(_mul(inner.pi_out, self.pi_in), self.pi_out)
            return KernelMap(w, inner.in_hw, self.out_hw, inner.stride, inner.dilation, inner.dy0, inner.pi_in,
                             pi_out, bias)
        raise ValueError('cannot compose two spatial maps exactly')

    def composable(self, inner: 'KernelMap') -> bool:
        return self.pointwise or inner.pointwise

    def apply(self, x: np.ndarray, with_bias: bool = True) -> np.ndarray:
        """y for a batch x (B, C_in, H_in, W_in), float64."""
        t = torch.as_tensor(np.asarray(x, np.float64))
        if self.pi_in is not None:
            t = t * torch.as_tensor(self.pi_in)
        kh = self.weight.shape[2]
        h_in, w_in = self.in_hw
        h_out, w_out = self.out_hw
        top = -self.dy0
        need_h = self.stride * (h_out - 1) + self.dy0 + (kh - 1) * self.dilation
        need_w = self.stride * (w_out - 1) + self.dy0 + (kh - 1) * self.dilation
        t = F.pad(t, (top, max(0, need_w - (w_in - 1)), top, max(0, need_h - (h_in - 1))))
        y = F.conv2d(t, torch.as_tensor(self.weight), stride=self.stride, dilation=self.dilation)
        y = y[:, :, :h_out, :w_out]
        if self.pi_out is not None:
            y = y * torch.as_tensor(self.pi_out)
        if with_bias and self.bias is not None:
            y = y + torch.as_tensor(self.bias)
        return y.numpy()


def _mul(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> Optional[np.ndarray]:
    if a is None:
        return b
    if b is None:
        return a
    return a * b


@dataclass
class Node:
    """A graph node. ``terms``: (input node id, KernelMap) for ``linear``; ``inputs`` otherwise."""
    id: int
    kind: str
    shape: Tuple[int, int, int]
    name: str
    inputs: List[int] = field(default_factory=list)
    terms: List[Tuple[int, KernelMap]] = field(default_factory=list)
    group: Optional[int] = None          # linear nodes of one group share their inputs' rotations
    segment: Optional[int] = None        # bootstrap placement unit (a block, a merge, the head, ...)
    stream: Optional[str] = None         # residual-stream values: one range scale per stream (bootstrapping)

    @property
    def hw(self) -> Tuple[int, int]:
        return self.shape[1:]


@dataclass
class Segment:
    id: int
    name: str
    kind: str            # 'stem' | 'reduce' | 'merge' | 'block' | 'head'


@dataclass
class Graph:
    nodes: List[Node]
    segments: List[Segment]
    input_shape: Tuple[int, int, int]      # logical input (after space-to-depth)
    image_shape: Tuple[int, int, int]      # the image the client has (C, H, W)
    space_to_depth: int                    # the client packs s×s sub-pixels as channels
    num_classes: int
    output: int = -1
    layer_names: List[str] = field(default_factory=list)

    def node(self, i: int) -> Node:
        return self.nodes[i]

    def consumers(self) -> Dict[int, List[int]]:
        out: Dict[int, List[int]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n.id)
        return out

    def ct_products(self) -> int:
        return sum(n.kind == 'mul' for n in self.nodes)

    def product_depth(self) -> Dict[int, int]:
        """Number of ct×ct products on the longest path to each node (the polynomial degree is 2^that)."""
        d: Dict[int, int] = {}
        for n in self.nodes:
            base = max((d[i] for i in n.inputs), default=0)
            d[n.id] = base + (1 if n.kind == 'mul' else 0)
        return d


@dataclass
class Lazy:
    """A linear value not yet materialised: Σ_k M_k(node_k). Consumers compose into it where exact."""
    terms: List[Tuple[int, KernelMap]]
    shape: Tuple[int, int, int]


Value = Union[int, Lazy]


class _Builder:
    def __init__(self):
        self.nodes: List[Node] = []
        self.segments: List[Segment] = []
        self.segment: Optional[int] = None
        self._groups = 0

    def begin(self, name: str, kind: str) -> None:
        self.segments.append(Segment(len(self.segments), name, kind))
        self.segment = self.segments[-1].id

    def add(self, kind: str, shape, name: str, inputs=(), terms=(), group=None) -> int:
        node = Node(len(self.nodes), kind, tuple(shape), name, list(inputs), list(terms), group, self.segment)
        self.nodes.append(node)
        return node.id

    def shape(self, v: Value) -> Tuple[int, int, int]:
        return v.shape if isinstance(v, Lazy) else self.nodes[v].shape

    def materialize(self, v: Value, name: str) -> int:
        if isinstance(v, int):
            return v
        if len(v.terms) == 1 and _is_identity(v.terms[0][1]):
            return v.terms[0][0]
        return self.add('linear', v.shape, name, [t[0] for t in v.terms], v.terms)

    def apply(self, m: KernelMap, v: Value, name: str) -> Lazy:
        """m(v), composed into v's terms where exact, else on the materialised v."""
        if isinstance(v, Lazy) and all(m.composable(t[1]) for t in v.terms):
            return Lazy([(i, m.after(k)) for i, k in v.terms], (m.c_out,) + m.out_hw)
        return Lazy([(self.materialize(v, name), m)], (m.c_out,) + m.out_hw)

    def linear(self, maps: Sequence[Tuple[KernelMap, Value]], name: str, group: Optional[int] = None) -> int:
        """Σ m_i(v_i) as one node."""
        terms: List[Tuple[int, KernelMap]] = []
        for m, v in maps:
            terms.extend(self.apply(m, v, name).terms)
        terms = _merge_terms(terms)
        shape = (terms[0][1].c_out,) + terms[0][1].out_hw
        return self.add('linear', shape, name, [t[0] for t in terms], terms, group)

    def new_group(self) -> int:
        self._groups += 1
        return self._groups


def _is_identity(m: KernelMap) -> bool:
    return (m.pointwise and m.pi_in is None and m.pi_out is None and m.bias is None
            and m.c_in == m.c_out and np.array_equal(m.weight[:, :, 0, 0], np.eye(m.c_in)))


def _merge_terms(terms: List[Tuple[int, KernelMap]]) -> List[Tuple[int, KernelMap]]:
    """Terms on the same input with identical geometry are added (one transform instead of two)."""
    out: List[Tuple[int, KernelMap]] = []
    for i, m in terms:
        for j, (i2, m2) in enumerate(out):
            if (i2 == i and m2.weight.shape == m.weight.shape and (m2.stride, m2.dilation, m2.dy0) ==
                    (m.stride, m.dilation, m.dy0) and _same(m2.pi_in, m.pi_in) and _same(m2.pi_out, m.pi_out)):
                b = m2.bias if m.bias is None else (m.bias if m2.bias is None else m2.bias + m.bias)
                out[j] = (i, replace(m2, weight=m2.weight + m.weight, bias=b))
                break
        else:
            out.append((i, m))
    return out


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and np.array_equal(a, b)


# --------------------------------------------------------------------------------------
# Folded model → graph
# --------------------------------------------------------------------------------------

def _first_non_polynomial(model: nn.Module) -> Optional[str]:
    from ..models.folded import ChannelLayerNorm, FoldedPolyAttn
    for name, m in model.named_modules():
        if isinstance(m, ChannelLayerNorm):
            return f'{name} (ChannelLayerNorm: divides by a data-dependent standard deviation)'
        if isinstance(m, FoldedPolyAttn) and m.row_scale is None:
            return f'{name} (PolyAttn with l1 row normalisation: divides by data)'
    return None


def _norm_map(norm: nn.Module, c: int, hw, name: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(scale, mean) of a PositionAffine, None for Identity."""
    from ..models.folded import PositionAffine
    if isinstance(norm, nn.Identity):
        return None
    if isinstance(norm, PositionAffine):
        return _arr(norm.scale).reshape(hw), _arr(norm.mean)
    raise NotPolynomialError(f'{name}: {type(norm).__name__} is not polynomial')


def _affine(m: KernelMap, norm) -> KernelMap:
    return m if norm is None else m.with_position_affine(*norm)


def _space_to_depth_stem(stem: nn.Conv2d, img_hw, s: int) -> Tuple[KernelMap, Tuple[int, int]]:
    """The stride-s stem as a stride-1 conv on the client's s×s space-to-depth packing of the image."""
    w = _arr(stem.weight)
    c_out, c_in, k, _ = w.shape
    p = stem.padding[0]
    lo = (0 - p) // s
    hi = (k - 1 - p) // s
    kk = hi - lo + 1
    dense = np.zeros((c_out, c_in * s * s, kk, kk))
    for ky in range(k):
        dy, a = divmod(ky - p, s)
        for kx in range(k):
            dx, b = divmod(kx - p, s)
            dense[:, np.arange(c_in) * s * s + a * s + b, dy - lo, dx - lo] += w[:, :, ky, kx]
    hw = (img_hw[0] // s, img_hw[1] // s)
    out_hw = tuple((n + 2 * p - (k - 1) - 1) // s + 1 for n in img_hw)
    if out_hw != hw:
        raise ConfigError(f'fhe: the stem output {out_hw} is not the space-to-depth grid {hw}')
    return KernelMap(dense, hw, hw, 1, 1, lo), hw


def space_to_depth(x: np.ndarray, s: int) -> np.ndarray:
    """(B, C, H, W) → (B, C·s·s, H/s, W/s), channel c·s² + a·s + b = x[c, s·Y + a, s·X + b]."""
    if s == 1:
        return x
    b, c, h, w = x.shape
    return x.reshape(b, c, h // s, s, w // s, s).transpose(0, 1, 3, 5, 2, 4).reshape(b, c * s * s, h // s, w // s)


def build_graph(folded: nn.Module) -> Graph:
    """The graph of a folded fully polynomial PolyNeXt (see the module docstring)."""
    from ..models.folded import FoldedPolyConv, FoldedPolyMLP, FoldedPolyNeXt
    if not isinstance(folded, FoldedPolyNeXt):
        raise ConfigError(f'fhe: expected a folded PolyNeXt (polynext.fold_for_inference), got {type(folded).__name__}')
    bad = _first_non_polynomial(folded)
    if bad is not None:
        raise NotPolynomialError(f'the model is not polynomial: its first non-polynomial op is {bad}; '
                                 f'use a fully polynomial bn variant (e.g. cpolynext_t_bn)')
    b = _Builder()
    img_hw = tuple(folded.img_size)
    c_img = folded.stem.in_channels
    s = folded.stem.stride[0]
    b.begin('stem', 'stem')
    if s > 1:
        stem_map, hw = _space_to_depth_stem(folded.stem, img_hw, s)
    else:
        stem_map = KernelMap.from_conv(folded.stem, img_hw)
        hw = stem_map.out_hw
    inp = b.add('input', (stem_map.c_in,) + stem_map.in_hw, 'input')
    stem_out: Value = Lazy([(inp, stem_map)], (stem_map.c_out,) + hw)
    s0: Value = stem_out
    s1: Value = stem_out
    for si, stage in enumerate(folded.stages):
        for which, ds in (('s0', stage.downsample_s0), ('s1', stage.downsample_s1)):
            if isinstance(ds, nn.Identity):
                continue
            prev = s0 if which == 's0' else s1
            convs = [ds] if isinstance(ds, nn.Conv2d) else list(ds)
            cur_hw = b.shape(prev)[1:]
            v = prev
            b.begin(f'stages.{si}.downsample_{which}', 'reduce')
            for conv in convs:
                m = KernelMap.from_conv(conv, cur_hw)
                v = b.apply(m, v, f'stages.{si}.downsample_{which}')
                cur_hw = m.out_hw
            if which == 's0':
                s0 = v
            else:
                s1 = v
        for ci, cell in enumerate(stage.cells):
            name = f'stages.{si}.cells.{ci}'
            c, h, w = b.shape(s1)
            norm = _norm_map(cell.norm, c, (h, w), f'{name}.norm')
            b.begin(f'{name}.merge', 'merge')
            merge = cell.merge
            maps = [(_affine(KernelMap.channel_scale(_arr(merge.weight1).reshape(-1), (h, w)), norm), s1)]
            if merge.num_inputs == 2:
                w0 = np.ones(c) if merge.weight0 is None else _arr(merge.weight0).reshape(-1)
                if norm is not None:
                    m0 = KernelMap.channel_scale(w0, (h, w))
                    m0 = replace(m0, pi_out=norm[0].reshape(h, w) * 1.0)   # scale only: the mean is in term 1
                else:
                    m0 = KernelMap.channel_scale(w0, (h, w))
                maps.append((m0, s0))
            x = b.linear(maps, f'{name}.merge')
            b.nodes[x].stream = name
            for bi, block in enumerate(cell.blocks):
                bname = f'{name}.blocks.{bi}'
                b.begin(bname, 'block')
                x = _poly_conv(b, block.mixer, x, f'{bname}.mixer')
                x = _poly_mlp(b, block.mlp, x, f'{bname}.mlp')
            s0, s1 = s1, x
    b.begin('head', 'head')
    out = _head(b, folded.head, s1)
    b.add('output', b.nodes[out].shape, 'logits', [out])
    names = []
    for n in b.nodes:
        if n.name not in names:
            names.append(n.name)
    return Graph(b.nodes, b.segments, b.nodes[inp].shape, (c_img,) + img_hw, s, folded.num_classes,
                 len(b.nodes) - 1, names)


def _poly_conv(b: _Builder, mixer, x: int, name: str) -> int:
    from ..models.folded import FoldedPolyConv
    if not isinstance(mixer, FoldedPolyConv):
        raise ConfigError(f'{name}: {type(mixer).__name__} is not compiled to HE yet (PolyAttn comes later); '
                          f'use a CPolyNeXt (convolutional) model')
    if mixer.pw_in_flip is None:
        raise ConfigError(f"{name}: fold with flip='weights' for HE (the channel flip as a weight permutation)")
    hw = b.nodes[x].hw
    pw_in = KernelMap.from_conv(mixer.pw_in, hw)
    pw_flip = KernelMap.from_conv(mixer.pw_in_flip, hw)
    coarse = KernelMap.from_conv(mixer.coarse, hw)
    fine = KernelMap.from_conv(mixer.fine, hw)
    g = b.new_group()
    a = b.linear([(coarse.after(pw_in), x)], f'{name}.coarse', g)
    c = b.linear([(fine.after(pw_flip), x)], f'{name}.fine', g)
    y = b.add('mul', b.nodes[a].shape, f'{name}.product', [a, c])
    dw_out = KernelMap.from_conv(mixer.dw_out, hw)
    pw_out = KernelMap.from_conv(mixer.pw_out, hw)
    norm = _norm_map(mixer.norm, pw_out.c_out, hw, f'{name}.norm')
    t = b.linear([(_affine(pw_out.after(dw_out), norm), y)], f'{name}.out')
    return _residual(b, x, t, f'{name}.residual')


def _poly_mlp(b: _Builder, mlp, x: int, name: str) -> int:
    from ..models.folded import FoldedPolyMLP
    if not isinstance(mlp, FoldedPolyMLP):
        raise ConfigError(f'{name}: cannot compile a {type(mlp).__name__}')
    hw = b.nodes[x].hw
    fc_in = KernelMap.from_conv(mlp.fc_in, hw)
    half = fc_in.c_out // 2
    g = b.new_group()
    ha = b.linear([(fc_in.rows(slice(0, half)), x)], f'{name}.fc_in_a', g)
    hb = b.linear([(fc_in.rows(slice(half, None)), x)], f'{name}.fc_in_b', g)
    z = b.add('mul', b.nodes[ha].shape, f'{name}.product', [ha, hb])
    norm = _norm_map(mlp.norm, half, hw, f'{name}.norm')
    pre = KernelMap.identity(half, hw) if norm is None else KernelMap.identity(half, hw).with_position_affine(*norm)
    fc_out = KernelMap.from_conv(mlp.fc_out, hw)
    t = b.linear([(fc_out.after(pre), z)], f'{name}.fc_out')
    return _residual(b, x, t, f'{name}.residual')


def _residual(b: _Builder, x: int, t: int, name: str) -> int:
    b.nodes[t].stream = b.nodes[x].stream
    out = b.add('add', b.nodes[x].shape, name, [x, t])
    b.nodes[out].stream = b.nodes[x].stream
    return out


def _head(b: _Builder, head, x: int) -> int:
    hw = b.nodes[x].hw
    norm = _norm_map(head.norm, b.nodes[x].shape[0], hw, 'head.norm')
    pre = KernelMap.identity(b.nodes[x].shape[0], hw)
    if norm is not None:
        pre = pre.with_position_affine(*norm)
    proj = KernelMap.from_conv(head.proj, hw).after(pre)
    half = proj.c_out // 2
    g = b.new_group()
    left = b.linear([(proj.rows(slice(0, half)), x)], 'head.proj_left', g)
    right = b.linear([(proj.rows(slice(half, None)), x)], 'head.proj_right', g)
    p = b.add('mul', b.nodes[left].shape, 'head.product', [left, right])
    pooled = b.add('pool', (half, 1, 1), 'head.pool', [p])
    fc = head.fc
    if not isinstance(fc, nn.Linear):
        raise ConfigError('fhe: the head has no classifier (num_classes=0)')
    weight = _arr(fc.weight) / (hw[0] * hw[1])
    bias = None if fc.bias is None else _arr(fc.bias)
    return b.linear([(KernelMap.dense(weight, (1, 1), bias), pooled)], 'head.fc')


# --------------------------------------------------------------------------------------
# Reference evaluation (logical tensors, float64)
# --------------------------------------------------------------------------------------

def evaluate(graph: Graph, images: np.ndarray, keep: bool = False) -> Union[np.ndarray, Tuple[np.ndarray, Dict[int, np.ndarray]]]:
    """Logits of the graph for normalised images (B, C, H, W); with ``keep`` also every node's value."""
    x = space_to_depth(np.asarray(images, np.float64), graph.space_to_depth)
    vals: Dict[int, np.ndarray] = {}
    for n in graph.nodes:
        if n.kind == 'input':
            vals[n.id] = x
        elif n.kind == 'linear':
            vals[n.id] = sum(m.apply(vals[i]) for i, m in n.terms)
        elif n.kind == 'mul':
            vals[n.id] = vals[n.inputs[0]] * vals[n.inputs[1]]
        elif n.kind == 'add':
            vals[n.id] = vals[n.inputs[0]] + vals[n.inputs[1]]
        elif n.kind == 'pool':
            vals[n.id] = vals[n.inputs[0]].sum(axis=(2, 3), keepdims=True)
        elif n.kind == 'output':
            vals[n.id] = vals[n.inputs[0]]
        else:
            raise AssertionError(n.kind)
    logits = vals[graph.output][:, :, 0, 0]
    return (logits, vals) if keep else logits
