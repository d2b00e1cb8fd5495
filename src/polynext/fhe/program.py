"""Phase 2 of the HE compiler: the packed-slot program (backend-neutral) and the lowering that makes it.

**Packing.** A ciphertext has ``slots`` slots, split into ``images`` equal image blocks (several
images per ciphertext). An image block holds ``nblk`` channel blocks of ``H0·W0`` slots, where
H0 x W0 is the grid of the first feature map (after the client's space-to-depth of a strided stem).
A tensor of C channels on an H x W grid with ``gap`` g = H0 / H (g doubles at each stride-2
reduction) is *multiplexed*: g² channels share a channel block, channel c sitting at sub-position
(sy, sx) of each g x g cell, so that no slot is wasted after a reduction:

    slot(c, y, x) = image·img_block + blk(c)·H0·W0 + sy(c)·W0 + sx(c) + g·(y·W0 + x)

with ``cpc = nblk·g²`` channels per ciphertext (more channels take more ciphertexts).

**Linear maps** (every fused ``linear`` node of :mod:`polynext.fhe.graph`) are lowered with the
diagonal method: y = Σ_r w_r ⊙ rot(x, r), one plaintext vector w_r per rotation offset r between an
input and an output ciphertext. For a tap (dy, dx) and channels (o, i) the offset is
``base(i) − base(o) + g_in·(dy·W0 + dx)`` whatever the position; the vector holds the weight
times the per-position factors and zero where the tap falls outside the image (the masks are the
zero padding). Offsets are coordinates on three axes (channel block, row, column); a baby-step /
giant-step plan splits each axis into baby steps (rotations of the input, shared by every output
and every giant step) and giant steps (rotations of partial sums, applied by Horner's rule), chosen
to minimise the rotation count. Every rotation is a unit step along one axis, so the keys are
only ±(unit of each axis): a handful of Galois keys for the whole network.

**Levels.** Each plaintext multiply and each ciphertext product consumes one level (``rescale``
after the sums of products); additions and rotations consume none. Operands are brought to one
level with ``drop`` (a modulus switch) before they are combined. Where the level budget would run
out, whole values are bootstrapped at segment boundaries (block, merge, reduction, head inputs).

**The program** is a list of instructions over SSA registers, each holding one ciphertext:

    ('in', dst, k)          input ciphertext k (packed and encrypted by the client)
    ('rot', dst, src, r)    rotate left by r slots (slot s ← s + r)
    ('mulp', dst, src, c)   multiply by plaintext vector c (no rescale)
    ('addp', dst, src, c)   add plaintext vector c
    ('mul', dst, a, b)      ciphertext × ciphertext (relinearised; no rescale)
    ('add', dst, a, b)      a + b
    ('rs', dst, src)        rescale (one level)
    ('drop', dst, src, d)   modulus switch down to depth d (no rescale)
    ('boot', dst, src)      bootstrap
    ('out', -1, src, k)     output ciphertext k

Plaintext vectors are stored per image block (``img_block`` values) and tiled over the images of
a ciphertext. In a *structural* compile (``numeric=False``: the analysis of large models) only the
shapes are made, not the vectors.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from itertools import product as iproduct
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from .graph import Graph, KernelMap, Node, space_to_depth

__all__ = ['Packing', 'Layout', 'Program', 'CompileOptions', 'compile_graph', 'pack_images', 'unpack_logits',
           'LevelBudgetError', 'choose_packing']


class LevelBudgetError(ConfigError):
    """The program needs more levels than the parameters allow (and no bootstrapping is allowed)."""


# --------------------------------------------------------------------------------------
# Packing and layouts
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Packing:
    slots: int
    h0: int
    w0: int
    images: int                         # images per ciphertext

    @property
    def hw0(self) -> int:
        return self.h0 * self.w0

    @property
    def img_block(self) -> int:
        return self.slots // self.images

    @property
    def nblk(self) -> int:
        return self.img_block // self.hw0


@dataclass(frozen=True)
class Layout:
    """Where a logical (C, H, W) tensor lives (see the module docstring)."""
    c: int
    h: int
    w: int
    gap: int
    pk: Packing

    @property
    def cpc(self) -> int:
        return self.pk.nblk * self.gap * self.gap

    @property
    def n_cts(self) -> int:
        return -(-self.c // self.cpc)

    def channel(self, c: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ciphertext, block, sub-row, sub-column) of channels ``c``."""
        c = np.asarray(c)
        local = c % self.cpc
        blk, sub = np.divmod(local, self.gap * self.gap)
        sy, sx = np.divmod(sub, self.gap)
        return c // self.cpc, blk, sy, sx

    def base(self, c: np.ndarray) -> np.ndarray:
        _, blk, sy, sx = self.channel(c)
        return blk * self.pk.hw0 + sy * self.pk.w0 + sx

    def positions(self) -> np.ndarray:
        """Slot offsets of the logical positions (H·W,) within a channel's block."""
        y, x = np.meshgrid(np.arange(self.h), np.arange(self.w), indexing='ij')
        return (self.gap * (y * self.pk.w0 + x)).reshape(-1)

    def slot_index(self) -> Tuple[np.ndarray, np.ndarray]:
        """For every (c, y, x): its ciphertext and its slot within an image block."""
        ct = self.channel(np.arange(self.c))[0]
        slots = self.base(np.arange(self.c))[:, None] + self.positions()[None, :]
        return np.repeat(ct, self.h * self.w).reshape(self.c, self.h * self.w), slots


def choose_packing(graph: Graph, slots: int, images: Optional[int] = None) -> Packing:
    """As many images per ciphertext as leave room for the stage-0 residual stream (at least one); wider
    tensors (the MLP or head halves) take more ciphertexts."""
    c, h0, w0 = graph.input_shape
    widths = [n.shape[0] for n in graph.nodes if n.shape[1:] == (h0, w0) and n.kind in ('linear', 'add')]
    widest = max(set(widths), key=widths.count) if widths else c
    if h0 * w0 > slots:
        raise ConfigError(f'fhe: a {h0}x{w0} feature map needs {h0 * w0} slots but a ciphertext has {slots}; '
                          f'use a larger ring or a smaller image')
    if images is None:
        images = 1
        while slots // (2 * images) >= widest * h0 * w0:
            images *= 2
    if images < 1 or slots % images or (slots // images) < h0 * w0:
        raise ConfigError(f'fhe: {images} images per ciphertext do not fit {slots} slots of {h0}x{w0} maps')
    return Packing(slots, h0, w0, images)


# --------------------------------------------------------------------------------------
# The program
# --------------------------------------------------------------------------------------

@dataclass
class Program:
    """A packed-slot CKKS program (see the module docstring)."""
    packing: Packing
    ops: List[tuple] = field(default_factory=list)
    op_layer: List[int] = field(default_factory=list)       # graph node id of each op
    depth: List[int] = field(default_factory=list)          # per register: levels consumed (after rescales)
    consts: List[Optional[np.ndarray]] = field(default_factory=list)
    input_layout: Optional[Layout] = None
    output_layout: Optional[Layout] = None
    n_inputs: int = 0
    n_outputs: int = 0
    space_to_depth: int = 1
    image_shape: Tuple[int, int, int] = (3, 0, 0)
    num_classes: int = 0
    bootstrap_depth: Optional[int] = None    # depth of a freshly bootstrapped ciphertext (None: leveled)
    max_depth: int = 0                       # the level budget it was compiled for
    numeric: bool = True
    layer_names: Dict[int, str] = field(default_factory=dict)
    kappa: Dict[int, float] = field(default_factory=dict)   # range scale of each graph node's ciphertexts
    bulk: List[Tuple[int, str, int, int]] = field(default_factory=list)  # structural: (layer, op, count, depth)
    boot_nodes: List[int] = field(default_factory=list)     # graph nodes whose value was bootstrapped

    @property
    def n_registers(self) -> int:
        return len(self.depth)

    @property
    def levels(self) -> int:
        """Levels the program consumes (the deepest register)."""
        return max(self.depth) if self.depth else 0

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = defaultdict(int)
        for op in self.ops:
            out[op[0]] += 1
        for _, code, n, _ in self.bulk:
            out[code] += n
        return dict(out)

    def rotation_steps(self) -> List[int]:
        """Distinct rotation offsets (each needs a Galois key), as signed steps in (−slots/2, slots/2]."""
        half = self.packing.slots // 2
        steps = set()
        for op in self.ops:
            if op[0] == 'rot':
                r = op[3] % self.packing.slots
                steps.add(r - self.packing.slots if r > half else r)
        return sorted(steps)

    def last_use(self) -> List[int]:
        """Index of the last op that reads each register (-1: never read)."""
        last = [-1] * self.n_registers
        for k, op in enumerate(self.ops):
            for r in _reads(op):
                last[r] = k
        return last

    def per_layer(self) -> Dict[int, Dict[str, int]]:
        out: Dict[int, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for op, layer in zip(self.ops, self.op_layer):
            out[layer][op[0]] += 1
        for layer, code, n, _ in self.bulk:
            out[layer][code] += n
        return {k: dict(v) for k, v in out.items()}


def _reads(op: tuple) -> Tuple[int, ...]:
    code = op[0]
    if code in ('rot', 'mulp', 'addp', 'rs', 'drop', 'boot'):
        return (op[2],)
    if code in ('mul', 'add'):
        return (op[2], op[3])
    if code == 'out':
        return (op[2],)
    return ()


class _Emitter:
    def __init__(self, prog: Program):
        self.p = prog
        self.layer = -1
        self.pending: Dict[int, bool] = {}       # register → product not yet rescaled

    def _new(self, depth: int, pending: bool = False) -> int:
        self.p.depth.append(depth)
        r = len(self.p.depth) - 1
        self.pending[r] = pending
        return r

    def _emit(self, op: tuple) -> None:
        self.p.ops.append(op)
        self.p.op_layer.append(self.layer)

    def inp(self, k: int) -> int:
        r = self._new(0)
        self._emit(('in', r, k))
        return r

    def rot(self, src: int, k: int) -> int:
        if k % self.p.packing.slots == 0:
            return src
        r = self._new(self.p.depth[src], self.pending[src])
        self._emit(('rot', r, src, int(k)))
        return r

    def const(self, vec: Optional[np.ndarray]) -> int:
        self.p.consts.append(vec)
        return len(self.p.consts) - 1

    def mulp(self, src: int, vec: Optional[np.ndarray]) -> int:
        assert not self.pending[src]
        r = self._new(self.p.depth[src], True)
        self._emit(('mulp', r, src, self.const(vec)))
        return r

    def addp(self, src: int, vec: Optional[np.ndarray]) -> int:
        r = self._new(self.p.depth[src], self.pending[src])
        self._emit(('addp', r, src, self.const(vec)))
        return r

    def mul(self, a: int, b: int) -> int:
        a, b = self.align([a, b])
        r = self._new(self.p.depth[a], True)
        self._emit(('mul', r, a, b))
        return r

    def add(self, a: int, b: int) -> int:
        if self.pending[a] or self.pending[b]:
            assert self.pending[a] == self.pending[b] and self.p.depth[a] == self.p.depth[b]
        else:
            a, b = self.align([a, b])
        r = self._new(self.p.depth[a], self.pending[a])
        self._emit(('add', r, a, b))
        return r

    def rescale(self, src: int) -> int:
        assert self.pending[src]
        r = self._new(self.p.depth[src] + 1)
        self._emit(('rs', r, src))
        return r

    def drop(self, src: int, depth: int) -> int:
        if self.p.depth[src] == depth:
            return src
        assert self.p.depth[src] < depth and not self.pending[src]
        r = self._new(depth)
        self._emit(('drop', r, src, depth))
        return r

    def boot(self, src: int) -> int:
        r = self._new(self.p.bootstrap_depth)
        self._emit(('boot', r, src))
        return r

    def align(self, regs: Sequence[int]) -> List[int]:
        d = max(self.p.depth[r] for r in regs)
        return [self.drop(r, d) for r in regs]

    def sum(self, regs: List[int]) -> int:
        acc = regs[0]
        for r in regs[1:]:
            acc = self.add(acc, r)
        return acc


# --------------------------------------------------------------------------------------
# Linear maps → diagonals → baby-step / giant-step rotations
# --------------------------------------------------------------------------------------

@dataclass
class _Diagonals:
    """The diagonals of one term (one input value) of one linear node, per (output ct, input ct)."""
    keys: np.ndarray            # (K, 5) int: ct_out, ct_in, blk, row, col
    vecs: Optional[np.ndarray]  # (K, img_block) or None (structural)
    bias: Optional[np.ndarray]  # (n_out_cts, img_block) or None


def _diagonals(m: KernelMap, lin: Layout, lout: Layout, numeric: bool) -> _Diagonals:
    pk = lin.pk
    if lout.gap != lin.gap * m.stride:
        raise AssertionError('layout gaps do not follow the stride')
    h_in, w_in = m.in_hw
    h_out, w_out = m.out_hw
    ys, xs = np.arange(h_out), np.arange(w_out)
    ct_o, blk_o, sy_o, sx_o = lout.channel(np.arange(m.c_out))
    ct_i, blk_i, sy_i, sx_i = lin.channel(np.arange(m.c_in))
    base_o = lout.base(np.arange(m.c_out))
    pos_o = lout.positions()
    all_keys, all_vals, all_rows, all_cols = [], [], [], []
    for ky, kx, dy, dx in m.taps():
        vy = (m.stride * ys + dy >= 0) & (m.stride * ys + dy < h_in)
        vx = (m.stride * xs + dx >= 0) & (m.stride * xs + dx < w_in)
        if not vy.any() or not vx.any():
            continue                                    # the tap never lands inside the input
        wt = m.weight[:, :, ky, kx]
        o, i = np.nonzero(wt)
        if o.size == 0:
            continue
        keys = np.stack([ct_o[o], ct_i[i], blk_i[i] - blk_o[o], sy_i[i] - sy_o[o] + lin.gap * dy,
                         sx_i[i] - sx_o[o] + lin.gap * dx], axis=1)
        all_keys.append(keys)
        if numeric:
            p = (vy[:, None] & vx[None, :]).astype(np.float64)
            if m.pi_out is not None:
                p = p * m.pi_out
            if m.pi_in is not None:
                yy = np.clip(m.stride * ys + dy, 0, h_in - 1)
                xx = np.clip(m.stride * xs + dx, 0, w_in - 1)
                p = p * m.pi_in[np.ix_(yy, xx)]
            all_vals.append(wt[o, i][:, None] * p.reshape(1, -1))
            all_cols.append(base_o[o][:, None] + pos_o[None, :])
    if not all_keys:
        return _Diagonals(np.zeros((0, 5), np.int64), None, None)
    keys = np.concatenate(all_keys)
    # one int64 per key (mixed radix) for a fast 1-D unique
    off = np.array([0, 0, 1 << 12, 1 << 15, 1 << 15], np.int64)
    radix = np.array([1 << 13, 1 << 13, 1 << 13, 1 << 16, 1 << 16], np.int64)
    code = np.zeros(len(keys), np.int64)
    for a in range(5):
        code = code * radix[a] + (keys[:, a] + off[a])
    ucode, first, inv = np.unique(code, return_index=True, return_inverse=True)
    uniq = keys[first]
    inv = inv.reshape(-1)
    vecs = bias = None
    if numeric:
        vals = np.concatenate(all_vals)
        cols = np.concatenate(all_cols)
        vecs = np.zeros((len(uniq), pk.img_block))
        np.add.at(vecs, (np.repeat(inv, vals.shape[1]), cols.reshape(-1)), vals.reshape(-1))
        if m.bias is not None:
            bias = np.zeros((lout.n_cts, pk.img_block))
            cts, slots = lout.slot_index()
            np.add.at(bias, (cts.reshape(-1), slots.reshape(-1)), m.bias.reshape(-1))
    return _Diagonals(uniq.astype(np.int64), vecs, bias)


_AXES = ('blk', 'row', 'col')


def _axis_strides(pk: Packing) -> Tuple[int, int, int]:
    return pk.hw0, pk.w0, 1


def _split(coords: np.ndarray, modes) -> Tuple[np.ndarray, np.ndarray]:
    """Baby and giant parts of coordinates (in step units) under per-axis modes."""
    baby = np.zeros_like(coords)
    giant = np.zeros_like(coords)
    for a, mode in enumerate(modes):
        c = coords[:, a]
        if mode == 'B':
            baby[:, a] = c
        elif mode == 'G':
            giant[:, a] = c
        else:
            b = np.mod(c, mode)
            baby[:, a] = b
            giant[:, a] = c - b
    return baby, giant


def _box(points: np.ndarray, modes, which: str) -> int:
    """Points of the smallest box (incl. the origin) around ``points``, in walking units."""
    if len(points) == 0:
        return 1
    size = 1
    for a, mode in enumerate(modes):
        lo, hi = min(0, points[:, a].min()), max(0, points[:, a].max())
        unit = mode if (which == 'giant' and mode not in ('B', 'G')) else 1
        size *= (hi - lo) // unit + 1
    return size


def _plan(groups_in: Dict, groups_out: Dict, coords: np.ndarray) -> Tuple:
    """The per-axis modes ('B' baby, 'G' giant, int n: split) that minimise the rotation count."""
    options = []
    for a in range(3):
        c = coords[:, a]
        span = int(c.max() - c.min()) + 1 if len(c) else 1
        opts = ['B', 'G']
        if span > 3:
            ns = {int(round(math.sqrt(span))), int(math.ceil(math.sqrt(span)))}
            opts += sorted(n for n in ns if 1 < n < span)
        options.append(opts if span > 1 else ['B'])
    best = None
    for modes in iproduct(*options):
        baby, giant = _split(coords, modes)
        cost = sum(_box(baby[idx], modes, 'baby') - 1 for idx in groups_in.values())
        cost += sum(_box(giant[idx], modes, 'giant') - 1 for idx in groups_out.values())
        if best is None or cost < best[0]:
            best = (cost, modes)
    return best[1]


# --------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------

@dataclass
class CompileOptions:
    slots: int
    max_depth: int                          # levels available to the program
    images: Optional[int] = None            # images per ciphertext (None: as many as fit)
    bootstrap_depth: Optional[int] = None   # depth of a bootstrapped ciphertext; None: leveled (no bootstrapping)
    numeric: bool = True                    # make the plaintext vectors (False: shapes and counts only)
    ranges: Optional[Dict[int, float]] = None   # max |value| per graph node (bootstrap range scaling)
    range_target: float = 0.25              # bootstrapped values are scaled to at most this magnitude


class _Value:
    def __init__(self, regs: List[int], layout: Layout, kappa: float = 1.0):
        self.regs = regs
        self.layout = layout
        self.kappa = kappa


def _kappas(graph: Graph, opts: CompileOptions) -> Dict[int, float]:
    """Range scale of each node's ciphertexts: 1 when leveled; with bootstrapping, every linear value
    (one scale per residual stream) is scaled so that its calibrated range is ``range_target``."""
    kap: Dict[int, float] = {}
    if opts.bootstrap_depth is None or not opts.ranges:
        return {n.id: 1.0 for n in graph.nodes}
    stream_max: Dict[str, float] = defaultdict(float)
    for n in graph.nodes:
        if n.stream is not None:
            stream_max[n.stream] = max(stream_max[n.stream], opts.ranges.get(n.id, 0.0))
    for n in graph.nodes:
        if n.kind == 'input':
            kap[n.id] = 1.0
        elif n.stream is not None:
            kap[n.id] = opts.range_target / max(stream_max[n.stream], 1e-12)
        elif n.kind == 'linear':
            kap[n.id] = 1.0 if n.id == graph.nodes[graph.output].inputs[0] else \
                opts.range_target / max(opts.ranges.get(n.id, 1.0), 1e-12)
        elif n.kind == 'mul':
            kap[n.id] = kap[n.inputs[0]] * kap[n.inputs[1]]
        else:
            kap[n.id] = kap[n.inputs[0]]
    return kap


def compile_graph(graph: Graph, opts: CompileOptions) -> Program:
    """The packed-slot program of ``graph`` (see the module docstring)."""
    pk = choose_packing(graph, opts.slots, opts.images)
    prog = Program(pk, numeric=opts.numeric, space_to_depth=graph.space_to_depth, image_shape=graph.image_shape,
                   num_classes=graph.num_classes, bootstrap_depth=opts.bootstrap_depth, max_depth=opts.max_depth)
    prog.layer_names = {n.id: n.name for n in graph.nodes}
    em = _Emitter(prog)
    kap = _kappas(graph, opts)
    prog.kappa = kap
    vals: Dict[int, _Value] = {}
    nodes = graph.nodes
    consumers = graph.consumers()
    # ---- segment bookkeeping for bootstrap placement
    seg_nodes: Dict[int, List[Node]] = defaultdict(list)
    for n in nodes:
        seg_nodes[n.segment].append(n)
    done_segments = set()
    lowered_groups = set()

    for n in nodes:
        if n.segment not in done_segments:
            done_segments.add(n.segment)
            _place_bootstraps(seg_nodes[n.segment], vals, em, opts, graph)
        em.layer = n.id
        if n.kind == 'input':
            lay = Layout(*n.shape, gap=1, pk=pk)
            prog.input_layout = lay
            prog.n_inputs = lay.n_cts
            vals[n.id] = _Value([em.inp(k) for k in range(lay.n_cts)], lay, kap[n.id])
        elif n.kind == 'linear':
            if n.id in vals:
                continue
            group = [m for m in nodes if m.group is not None and m.group == n.group] if n.group else [n]
            for m in group:
                lowered_groups.add(m.id)
            outs = _lower_linear(group, vals, em, kap, opts.numeric)
            for m, v in zip(group, outs):
                vals[m.id] = v
        elif n.kind == 'mul':
            a, b = vals[n.inputs[0]], vals[n.inputs[1]]
            regs = [em.rescale(em.mul(ra, rb)) for ra, rb in zip(a.regs, b.regs)]
            vals[n.id] = _Value(regs, a.layout, a.kappa * b.kappa)
        elif n.kind == 'add':
            a, b = vals[n.inputs[0]], vals[n.inputs[1]]
            if not math.isclose(a.kappa, b.kappa, rel_tol=1e-9):
                raise AssertionError(f'{n.name}: operands with different range scales')
            vals[n.id] = _Value([em.add(ra, rb) for ra, rb in zip(a.regs, b.regs)], a.layout, a.kappa)
        elif n.kind == 'pool':
            a = vals[n.inputs[0]]
            lay = a.layout
            regs = []
            for r in a.regs:
                r = _window_sum(em, r, lay.w, lay.gap)
                r = _window_sum(em, r, lay.h, lay.gap * pk.w0)
                regs.append(r)
            vals[n.id] = _Value(regs, Layout(lay.c, 1, 1, lay.gap, pk), a.kappa)
        elif n.kind == 'output':
            v = vals[n.inputs[0]]
            prog.output_layout = v.layout
            prog.n_outputs = len(v.regs)
            for k, r in enumerate(v.regs):
                em._emit(('out', -1, r, k))
        else:
            raise AssertionError(n.kind)
    if prog.levels > opts.max_depth:
        raise LevelBudgetError(f'the program needs {prog.levels} levels but the parameters give {opts.max_depth}')
    return prog


def _window_sum(em: _Emitter, reg: int, n: int, unit: int) -> int:
    """Slot s ← Σ_{i<n} x[s + i·unit] (doubling, with the binary digits of n)."""
    if n == 1:
        return reg
    result = None
    offset = 0
    p = reg
    k = 1
    while k <= n:
        if n & k:
            term = em.rot(p, offset * unit)
            result = term if result is None else em.add(result, term)
            offset += k
        if 2 * k <= n:
            p = em.add(p, em.rot(p, k * unit))
        k *= 2
    return result


def _segment_depths(seg: List[Node], start: Dict[int, int]) -> int:
    """Deepest level reached inside a segment when its external inputs have the given depths."""
    depth: Dict[int, float] = dict(start)
    deepest = -math.inf
    for n in seg:
        ins = [depth.get(i, -math.inf) for i in n.inputs]
        d = max(ins, default=0)
        if n.kind in ('linear', 'mul'):
            d += 1
        depth[n.id] = d
        deepest = max(deepest, d)
    return deepest


def _place_bootstraps(seg: List[Node], vals: Dict[int, _Value], em: _Emitter, opts: CompileOptions,
                      graph: Graph) -> None:
    """Bootstrap the segment's inputs (deepest contribution first) until the segment fits the budget."""
    inside = {n.id for n in seg}
    ext = sorted({i for n in seg for i in n.inputs if i not in inside and i in vals})
    prog = em.p

    def depth_of(i):
        return max(prog.depth[r] for r in vals[i].regs)

    while True:
        start = {i: depth_of(i) for i in ext}
        deepest = _segment_depths(seg, start)
        if deepest <= opts.max_depth:
            return
        if opts.bootstrap_depth is None:
            need = deepest
            raise LevelBudgetError(
                f'{seg[0].name}: the program needs more than {opts.max_depth} levels (at least {need} here) and the '
                f'parameters allow no bootstrapping; use a larger level budget, a shallower model, or bootstrapping')
        contrib = {i: _segment_depths(seg, {j: (start[j] if j == i else -math.inf) for j in ext}) for i in ext}
        cand = [i for i in ext if contrib[i] > opts.max_depth and depth_of(i) > opts.bootstrap_depth]
        if not cand:
            raise LevelBudgetError(
                f'{seg[0].name}: needs {deepest - min(start.values())} levels in one go, more than the '
                f'{opts.max_depth - opts.bootstrap_depth} a bootstrap leaves')
        i = max(cand, key=lambda j: contrib[j])
        em.layer = i
        v = vals[i]
        vals[i] = _Value([em.boot(r) for r in v.regs], v.layout, v.kappa)
        prog.boot_nodes.append(i)


def _lower_linear(group: List[Node], vals: Dict[int, _Value], em: _Emitter, kap: Dict[int, float],
                  numeric: bool) -> List[_Value]:
    """Lower the linear nodes of one group (same inputs) together: shared baby steps."""
    pk = em.p.packing
    strides = _axis_strides(pk)
    # inputs (term index = position in ``inputs``), aligned to one depth
    inputs: List[int] = []
    for n in group:
        for i, _ in n.terms:
            if i not in inputs:
                inputs.append(i)
    all_regs = [r for i in inputs for r in vals[i].regs]
    d = max(em.p.depth[r] for r in all_regs)
    in_regs = {i: [em.drop(r, d) for r in vals[i].regs] for i in inputs}

    out_layouts, diag_sets = [], []
    for n in group:
        lin0 = vals[n.terms[0][0]].layout
        m0 = n.terms[0][1]
        lout = Layout(m0.c_out, m0.out_hw[0], m0.out_hw[1], lin0.gap * m0.stride, pk)
        out_layouts.append(lout)
        per_term = []
        for i, m in n.terms:
            v = vals[i]
            kin, kout = v.kappa, kap[n.id]
            if kin != 1.0 or kout != 1.0:
                m = replace(m, weight=m.weight * (kout / kin), bias=None if m.bias is None else m.bias * kout)
            per_term.append((inputs.index(i), _diagonals(m, v.layout, lout, numeric)))
        diag_sets.append(per_term)

    # global coordinate steps (gcd per axis) and the plan
    # one row per diagonal: (node idx, term input idx, ct_out, ct_in, blk, row, col, vec index)
    parts = []
    vec_store = []
    for ni, per_term in enumerate(diag_sets):
        for ti, dg in per_term:
            k = len(dg.keys)
            if not k:
                continue
            idx = np.arange(len(vec_store), len(vec_store) + k, dtype=np.int64)[:, None]
            parts.append(np.hstack([np.full((k, 1), ni), np.full((k, 1), ti), dg.keys, idx]).astype(np.int64))
            vec_store.extend([None] * k if dg.vecs is None else list(dg.vecs))
    if not parts:
        raise AssertionError('a linear node without diagonals')
    arr = np.concatenate(parts)
    coords = arr[:, 4:7].copy()
    steps = []
    for a in range(3):
        nz = np.abs(coords[:, a][coords[:, a] != 0])
        g = int(np.gcd.reduce(nz)) if nz.size else 1
        steps.append(g)
        coords[:, a] //= g
    groups_in = _groups(arr[:, 1], arr[:, 3])
    groups_out = _groups(arr[:, 0], arr[:, 2])
    modes = _plan(groups_in, groups_out, coords)
    baby, giant = _split(coords, modes)
    units = [steps[a] * strides[a] for a in range(3)]
    giant_units = [units[a] * (m if m not in ('B', 'G') else 1) for a, m in enumerate(modes)]

    # baby steps: walk the box around each input ciphertext's baby points with unit rotations
    babies: Dict[Tuple[int, int], Dict[Tuple[int, int, int], int]] = {}
    for (ti, j), idx in groups_in.items():
        pts = baby[idx]
        lo = np.minimum(pts.min(axis=0), 0)
        hi = np.maximum(pts.max(axis=0), 0)
        box = sorted(iproduct(*[range(int(lo[a]), int(hi[a]) + 1) for a in range(3)]),
                     key=lambda p: (sum(abs(v) for v in p), p))
        reg = in_regs[inputs[ti]][j]
        got = {(0, 0, 0): reg}
        needed = {tuple(int(v) for v in p) for p in pts}
        # only walk to points that lead to needed ones: prune the box to the needed points' "cones"
        keep = set()
        for p in needed:
            q = list(p)
            keep.add(tuple(q))
            while any(q):
                a = next(k for k in range(3) if q[k] != 0)
                q[a] -= int(np.sign(q[a]))
                keep.add(tuple(q))
        for p in box:
            if p == (0, 0, 0) or p not in keep:
                continue
            a = next(k for k in range(3) if p[k] != 0)
            s = int(np.sign(p[a]))
            prev = list(p)
            prev[a] -= s
            got[p] = em.rot(got[tuple(prev)], s * units[a])
        babies[(ti, j)] = got

    # giant steps: per output ciphertext, sums of plaintext products per giant point, then Horner
    outs: List[_Value] = []
    for ni, n in enumerate(group):
        em.layer = n.id
        lout = out_layouts[ni]
        regs = []
        for jo in range(lout.n_cts):
            idx = groups_out.get((ni, jo))
            if idx is None:
                raise AssertionError(f'{n.name}: output ciphertext {jo} receives nothing')
            by_giant: Dict[Tuple[int, int, int], List[int]] = defaultdict(list)
            for k in idx:
                by_giant[tuple(int(v) for v in giant[k])].append(k)
            inner: Dict[Tuple[int, int, int], int] = {}
            for g, ks in sorted(by_giant.items()):
                gshift = sum(g[a] * units[a] for a in range(3))
                prods = []
                for k in (ks if numeric else ks[:1]):
                    ti, j = int(arr[k, 1]), int(arr[k, 3])
                    b = tuple(int(v) for v in baby[k])
                    vec = vec_store[arr[k, 7]]
                    if vec is not None:
                        vec = np.roll(vec, gshift)          # pre-rotate by −g: w'[s] = w[s − g]
                    prods.append(em.mulp(babies[(ti, j)][b], vec))
                if not numeric and len(ks) > 1:             # counted, not emitted (analysis of large models)
                    em.p.bulk.append((em.layer, 'mulp', len(ks) - 1, d))
                    em.p.bulk.append((em.layer, 'add', len(ks) - 1, d))
                inner[g] = em.rescale(em.sum(prods))
            reg = _horner(em, inner, modes, units, giant_units)
            bias = None
            for ti, dg in diag_sets[ni]:
                if dg.bias is not None:
                    bias = dg.bias[jo] if bias is None else bias + dg.bias[jo]
            if not numeric:
                has_bias = any(m.bias is not None for _, m in n.terms)
                if has_bias:
                    reg = em.addp(reg, None)
            elif bias is not None and np.any(bias):
                reg = em.addp(reg, bias)
            regs.append(reg)
        outs.append(_Value(regs, lout, kap[n.id]))
    return outs


def _groups(a: np.ndarray, b: np.ndarray) -> Dict[Tuple[int, int], np.ndarray]:
    """Row indices of each (a, b) pair."""
    code = a.astype(np.int64) * (1 << 20) + b
    order = np.argsort(code, kind='stable')
    uniq, starts = np.unique(code[order], return_index=True)
    out = {}
    bounds = list(starts) + [len(order)]
    for u, lo, hi in zip(uniq, bounds[:-1], bounds[1:]):
        out[(int(u >> 20), int(u & ((1 << 20) - 1)))] = order[lo:hi]
    return out


def _horner(em: _Emitter, inner: Dict[Tuple[int, int, int], int], modes, units, giant_units) -> int:
    """Σ_g rot(inner[g], Σ_a g_a·unit_a) with unit rotations per giant axis (Horner's rule, both signs)."""
    axes = [a for a in range(3) if any(g[a] != 0 for g in inner)]
    return _horner_axes(em, inner, axes, modes, units, giant_units)


def _horner_axes(em, inner, axes, modes, units, giant_units) -> int:
    if not axes:
        assert len(inner) == 1
        return next(iter(inner.values()))
    a, rest = axes[0], axes[1:]
    step = modes[a] if modes[a] not in ('B', 'G') else 1
    by: Dict[int, Dict] = defaultdict(dict)
    for g, r in inner.items():
        by[g[a] // step][g[:a] + (0,) + g[a + 1:]] = r
    sub = {v: _horner_axes(em, d, rest, modes, units, giant_units) for v, d in by.items()}
    u = giant_units[a]
    total = sub.get(0)
    for sign in (1, -1):
        vs = sorted((v for v in sub if v * sign > 0), key=abs)
        if not vs:
            continue
        acc = None
        for v in range(max(abs(x) for x in vs), 0, -1):
            cur = sub.get(v * sign)
            if acc is None:
                acc = cur
            else:
                acc = em.rot(acc, sign * u)
                if cur is not None:
                    acc = em.add(acc, cur)
        acc = em.rot(acc, sign * u)
        total = acc if total is None else em.add(total, acc)
    return total


# --------------------------------------------------------------------------------------
# Client side: packing images, reading logits
# --------------------------------------------------------------------------------------

def pack_images(prog: Program, images: np.ndarray) -> List[np.ndarray]:
    """Normalised images (B, C, H, W) → per input ciphertext an array (n_sets, slots), ``images`` per set."""
    x = space_to_depth(np.asarray(images, np.float64), prog.space_to_depth)
    lay = prog.input_layout
    pk = prog.packing
    b = x.shape[0]
    n_sets = -(-b // pk.images)
    cts, slots = lay.slot_index()
    out = [np.zeros((n_sets, pk.slots)) for _ in range(lay.n_cts)]
    flat = x.reshape(b, lay.c, -1)
    for k in range(b):
        s, img = divmod(k, pk.images)
        off = img * pk.img_block
        for j in range(lay.n_cts):
            sel = cts[:, 0] == j
            out[j][s, off + slots[sel].reshape(-1)] = flat[k][sel].reshape(-1)
    return out


def unpack_logits(prog: Program, outputs: List[np.ndarray], count: int) -> np.ndarray:
    """Decrypted output ciphertexts (each (n_sets, slots)) → logits (count, num_classes)."""
    lay = prog.output_layout
    pk = prog.packing
    cts, slots = lay.slot_index()
    logits = np.zeros((count, lay.c))
    for k in range(count):
        s, img = divmod(k, pk.images)
        for c in range(lay.c):
            logits[k, c] = outputs[cts[c, 0]][s, img * pk.img_block + slots[c, 0]]
    return logits
