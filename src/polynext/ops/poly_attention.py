"""Polynomial attention kernel of PolyAttn, memory-lean, with a recomputing backward.

    A = (Q Kᵀ + 1)^p            (Q already multiplied by the per-head scale sigmoid(l_h))
    O = (A / ‖A‖₁,row) V        (A ≥ 0 for even p, so ‖A‖₁,row is the row sum)

Why this is written by hand: no maintained library implements this kernel. PyTorch's
``scaled_dot_product_attention`` and FlashAttention only do softmax. A plain autograd
expression (as in the authors' code) keeps four to five N×N tensors per layer for the
backward pass; at segmentation resolution (4096 tokens) that is 0.8–1.3 GiB per layer.

This implementation
  * normalises after ``A @ V`` (one pass over A fewer, exact in real arithmetic),
  * raises to the 4th power by squaring twice in place,
  * works through cache-sized tiles (:func:`_tiles`): in float32 as many whole heads as have 4 MiB of scores
    together, so that each tile's N×N buffers are read back from the last-level cache, not memory; larger heads,
    and bfloat16, in blocks of query rows across all heads, so that at most ``chunk_bytes`` of scores exist at
    once. On a 2-core AMD EPYC (Zen 4), fp32, batch 32, at the 196-token shapes of APolyNeXt-T / S: forward +
    backward x1.07-1.08, the inference forward x1.11-1.39 (x1.67 at APolyNeXt-S's 1,024 tokens of a 512 px
    image), bit-identical (``benchmarks/poly_attention.py --baseline``),
  * saves only Q, K, V, O and the row sums for backward and recomputes the scores chunk by chunk
    there (keeping P = Q Kᵀ + 1 of the forward saved one matrix product, 2-12 % of this kernel's time,
    for 7.9 % more peak training memory in APolyNeXt-T and 9.1 % in APolyNeXt-S: measured, see the
    README, and not kept),
  * multiplies in backward on the N×d side where it can (Aᵀ (g/r) instead of (A/r)ᵀ g, the power
    into dL/dO): two passes over the N×N scores fewer,
  * makes Q, K, V contiguous once, in training and at inference (the heads of a channels-last activation are
    strided views, which every matrix product would copy again), and returns their gradients in those views'
    own layout (:func:`_in_layout`), so that the activation's gradient reaches the depthwise and 1x1
    convolutions' backward channels-last, not as a contiguous NCHW copy they convert again: PolyAttn's forward +
    backward x1.01-1.05 at APolyNeXt-T / S's shapes in fp32 and bf16 (two throwaway interleaved runs,
    x0.99-1.07 over both).

On a 2-core AMD EPYC (Zen 3), APolyNeXt-T's stage-3 shape (batch 32, 3 heads, 196 tokens, head
dimension 32), forward + backward: 1.72x the paper's expression under autograd, and the last two
points 1.08x over this kernel without them (``benchmarks/poly_attention.py``).

In float32 on a CPU with AVX-512 (eager work, the kernels on: ``ops.cpu_kernels``, 6.) the whole forward, at
inference and in training, is one hand-written kernel instead: eight query rows at a time, their scores against 32
keys at a time in registers, raised to the power and summed as they leave them, kept for the eight rows in L1 / L2
and multiplied with V there, so no N×N tensor is written. On a 2-core AMD EPYC (Zen 4), batch 32, against the
tiles below: the inference forward x1.41-1.85 at APolyNeXt-T / S's shapes, forward + backward x1.12-1.17
(``benchmarks/poly_attention.py [--mode infer] --baseline``); within 6e-7 of float64 there (tested within 2e-6 of
the largest output). The training backward there is a second kernel (``ops.cpu_kernels``, 7.): a thread owns whole
heads, recomputes eight rows' scores and forms the five products from A and (S + 1)^(p-1) kept in L1 / L2; forward +
backward x1.67-2.10 against the tiles below, about three quarters of the matrix-product peak at 196 tokens. In
bfloat16 on a CPU with AVX-512 BF16 (CPU autocast, bf16 inference) the same two kernels are built on the pair dot
product ``vdpbf16ps`` (``ops.cpu_kernels``, 8.): operands bf16, sums float32, as PyTorch's bf16 path; on the Zen 4,
batch 32, against the tiles (``benchmarks/poly_attention.py --dtype bf16``, its ``unfused`` column): the inference
forward x1.61-1.91 (x1.85-2.00 at 512 px), forward + backward x1.22-1.39; within 5e-3 of float64 (bf16's spacing
is 3.9e-3). The tiled path below serves everything else (float64, other head
dimensions, CPUs without these instructions, ``ops.cpu_kernels.fused_attention(False)``).

All matrix products run in the inputs' dtype (bf16/fp16 under autocast, like the reference);
the power, the row sums and the normalisation run in float32. Where the tiles serve bfloat16 on a CPU (no AVX-512
BF16, or the fused kernels off), at inference the power, the
row sums and the normalisation are one pass of a hand-written kernel (``ops.cpu_kernels``; PyTorch's operators
take seven passes over the N×N scores, the conversions to float32 and back included), which writes the
normalised weights over the scores; the matrix products stay PyTorch's. In eager CPU training (float32 and
bfloat16) the autograd function takes three more kernels: the forward's power and row sums in one pass (PyTorch:
four, with the conversions in bfloat16 six), the backward's recomputation of A and (S+1)^(p-1) in one (PyTorch:
four) and dL/dS = (dL/dA + d)(S+1)^(p-1) in one (PyTorch: two, four in bfloat16); the same float32 products in the
same order, so in float32 the values are PyTorch's up to the row sums' order of addition.

On CUDA the same function runs through PyTorch's ``flex_attention`` (a fused Triton kernel with
O(N·block) memory in forward and backward), see :func:`poly_attention_flex`.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

__all__ = ["poly_attention", "poly_attention_reference", "poly_attention_flex", "flex_available"]

DEFAULT_CHUNK_BYTES = 64 * 2**20
#: float32 scores of one tile (:func:`_tiles`)
CACHE_TILE_BYTES = 4 * 2**20
_EPS = 1e-12  # F.normalize's default clamp of the row norm


def _tiles(q: torch.Tensor, num_keys: int, chunk_bytes: int) -> Iterator[Tuple[slice, slice]]:
    """The tiles (heads, query rows) of the (batch·heads) × N queries of ``q`` (B, heads, N, d) that the kernel
    works through, each with at most ``chunk_bytes`` of float32 scores.

    In float32 and float64, where one head's scores fit in :data:`CACHE_TILE_BYTES`, a tile is as many whole
    heads as fit there, so that its N×N buffers (the scores, and in backward (S+1)^(p-1) and dL/dA) are still in
    the last-level cache when the next operator reads them. Otherwise (larger heads; bfloat16, where the scores
    are half the bytes and oneDNN's bf16 matrix products cost more a call) a tile is a block of query rows
    across all heads (one head at a time in blocks of rows was slower at 4,096 tokens in a throwaway timing)."""
    batch_heads, num_queries = q.shape[0] * q.shape[1], q.shape[2]
    per_head = num_queries * num_keys * 4
    cache = min(chunk_bytes, CACHE_TILE_BYTES) if q.dtype in (torch.float32, torch.float64) else 0
    if per_head <= cache:
        step = cache // per_head
        for start in range(0, batch_heads, step):
            yield slice(start, min(batch_heads, start + step)), slice(0, num_queries)
        return
    rows = max(1, min(num_queries, chunk_bytes // (batch_heads * num_keys * 4)))
    for start in range(0, num_queries, rows):
        yield slice(0, batch_heads), slice(start, min(num_queries, start + rows))


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) as (B·heads, N, d); a copy only where the heads are strided views."""
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _plus_one(s: torch.Tensor) -> torch.Tensor:
    """S + 1 in float32 (float64 for float64 scores), in place where S is already in it."""
    if s.dtype in (torch.float32, torch.float64):
        return s.add_(1.0)
    return s.float().add_(1.0)


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """P = Q Kᵀ + 1 in float32 (float64 for float64 inputs), as a fresh tensor."""
    return _plus_one(torch.matmul(q, k.transpose(-1, -2)))


def _power_(p: torch.Tensor, power: int) -> torch.Tensor:
    if power == 4:
        return p.square_().square_()
    if power == 2:
        return p.square_()
    return p.pow_(power)


def _kernel(s: torch.Tensor, power: int, inference: bool, low_precision: bool = True) -> bool:
    """Whether ``ops.cpu_kernels``' attention kernels serve these scores (eager CPU work, the kernels on, power 2
    or 4, contiguous scores):

    * ``inference``: the weights in one pass, in bfloat16 only. (In float32 PyTorch's path normalises after
      ``A @ V``, on the N×d side, and ran as fast as the kernel at APolyNeXt's 14x14 shapes, x0.89-0.99 in a
      throwaway timing; in bfloat16, where PyTorch also converts the scores to float32 and back, the kernel was
      x1.34-1.78 faster at every size from 1,024 scores up, so it has no minimum size.)
    * training (the autograd function): the forward's power and row sums, the backward's recomputation and
      dL/dS, in float32 scores with float32 values or bfloat16 scores with ``low_precision`` (bf16) values,
      each one pass where PyTorch makes four to seven.

    Absolute imports in this module: ``benchmarks/poly_attention.py`` loads older versions of it from a file."""
    from polynext.ops.cpu_kernels import kernel_available
    from polynext.ops.fused import eager_cpu
    if power not in (2, 4) or not s.is_contiguous():
        return False
    if inference:
        dtype_ok = s.dtype == torch.bfloat16
    else:
        dtype_ok = (s.dtype, low_precision) in ((torch.float32, False), (torch.bfloat16, True))
    return dtype_ok and eager_cpu(s, inference=inference) and kernel_available()


def _forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, power: int, chunk_bytes: int, inference: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Returns O (dtype of v) and the clamped row sums r (float32, shape B×h×N×1; None at ``inference``, where
    the scores may go through the kernel of ``ops.cpu_kernels``), tile by tile (:func:`_tiles`)."""
    from polynext.ops.cpu_kernels import fused_attention_available, poly_attention_fused, poly_power_, poly_rows_
    from polynext.ops.fused import eager_cpu
    n = q.shape[2]
    q3, k3, v3 = _flat(q), _flat(k), _flat(v)
    if eager_cpu(q3, k3, v3, inference=inference) and fused_attention_available(q, v, power, k=k):   # (not compiling)
        # the whole attention in one kernel, the scores never leave the caches (ops.cpu_kernels, 6.; bf16: 8.)
        o3, r3 = poly_attention_fused(q3, k3, v3, power, _EPS)
        return o3.view(q.shape[:-1] + (v.shape[-1],)), None if inference else r3.view(q.shape[:-1] + (1,))
    out = v.new_empty(q.shape[:-1] + (v.shape[-1],))
    o3 = out.view(-1, n, v.shape[-1])
    rowsum = None if inference else torch.empty(q.shape[:-1] + (1,), dtype=_acc_dtype(q), device=q.device)
    r3 = None if inference else rowsum.view(-1, n, 1)
    low_precision = v.dtype in (torch.float16, torch.bfloat16)
    for heads, rows in _tiles(q, k.shape[2], chunk_bytes):
        s = torch.matmul(q3[heads, rows], k3[heads].transpose(-1, -2))
        vt = v3[heads]
        if inference and _kernel(s, power, inference=True):   # the power and the normalisation in one pass, over the scores
            a = poly_rows_(s, power, _EPS)
            o3[heads, rows] = torch.matmul(a.to(v.dtype), vt)
            continue
        if not inference and _kernel(s, power, inference=False, low_precision=low_precision):
            # training: the power and the row sums in one pass over the scores (normalised there in bf16)
            r3[heads, rows] = poly_power_(s, power, _EPS, normalise=low_precision)
            if low_precision:
                o3[heads, rows] = torch.matmul(s, vt)
            else:
                o3[heads, rows] = torch.matmul(s, vt).div_(r3[heads, rows])
            continue
        a = _power_(_plus_one(s), power)
        r = a.sum(-1, keepdim=True).clamp_min_(_EPS)
        if r3 is not None:
            r3[heads, rows] = r
        if low_precision:
            # normalise first so the product stays in range in fp16/bf16
            o3[heads, rows] = torch.matmul(a.div_(r).to(v.dtype), vt)
        else:
            o3[heads, rows] = torch.matmul(a, vt).div_(r)
    return out, rowsum


def _dense_layout(t: torch.Tensor) -> Optional[Tuple[int, ...]]:
    """``t``'s strides where it is a strided view that covers its memory densely (the heads of a channels-last
    activation: (B, heads, N, d) with strides (C·N, d, C, 1)); None where it is contiguous or not dense. (PyTorch's
    own test for this, ``torch._prims_common.is_non_overlapping_and_dense``, is private.)"""
    if t.is_contiguous():
        return None
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return None
        expected *= size
    return t.stride()


def _in_layout(layouts, *grads: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Each gradient in its input's layout (:func:`_dense_layout`; as it is where that is None). The gradient of a
    channels-last activation's heads then flows back through the heads' view as a channels-last tensor: written
    contiguous, the view's backward copies it into a contiguous NCHW tensor, and the depthwise Q / K / V convolutions'
    backward and the qkv 1x1 convolution's then convert it back (one copy here instead of both)."""
    return tuple(g if layout is None else torch.empty_strided(g.shape, layout, dtype=g.dtype, device=g.device).copy_(g)
                 for layout, g in zip(layouts, grads))


class _PolyAttentionFunction(torch.autograd.Function):
    """The kernel with a backward that needs no N×N tensor from the forward: the scores are
    recomputed chunk by chunk."""

    @staticmethod
    def forward(ctx, q, k, v, power: int, chunk_bytes: int):
        # the inputs' own layouts, for their gradients (see _in_layout)
        ctx.layouts = tuple(_dense_layout(t) for t in (q, k, v))
        # one batch stride per operand: the heads of a channels-last activation are strided
        # views, which every matmul would otherwise copy again (forward and backward)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        with torch.autocast(device_type=q.device.type, enabled=False):
            out, rowsum = _forward(q, k, v, power, chunk_bytes)
        ctx.save_for_backward(q, k, v, out, rowsum)
        ctx.power = power
        ctx.chunk_bytes = chunk_bytes
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from polynext.ops.cpu_kernels import (fused_attention_available, poly_attention_backward_fused, poly_ds_,
                                              poly_prep_)
        from polynext.ops.fused import eager_cpu
        q, k, v, out, rowsum = ctx.saved_tensors
        power, chunk_bytes = ctx.power, ctx.chunk_bytes
        dt = v.dtype
        low_precision = dt in (torch.float16, torch.bfloat16)
        with torch.autocast(device_type=q.device.type, enabled=False):
            n = q.shape[2]
            q3, k3, v3, o3, g3 = _flat(q), _flat(k), _flat(v), _flat(out), _flat(grad_out)
            r3 = rowsum.view(-1, n, 1)
            if eager_cpu(q3, k3, v3, o3, g3) and fused_attention_available(q, v, power, k=k):
                # the five products from the recomputed scores in one kernel (ops.cpu_kernels, 7.; bf16: 8.)
                dq, dk, dv = poly_attention_backward_fused(q3, k3, v3, o3, g3, r3, power)
                return (*_in_layout(ctx.layouts, dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)), None,
                        None)
            acc = _acc_dtype(q)
            dq = torch.empty_like(q3)
            dk = torch.zeros(k3.shape, dtype=acc, device=k.device)
            dv = torch.zeros(v3.shape, dtype=acc, device=v.device)
            for heads, rows in _tiles(q, k.shape[2], chunk_bytes):
                qc = q3[heads, rows]
                r = r3[heads, rows]
                s = torch.matmul(qc, k3[heads].transpose(-1, -2))
                kernel = _kernel(s, power, inference=False, low_precision=low_precision)
                if kernel:                              # one pass: A (÷ r in bf16) over S, and P^(p-1)
                    p_pow = poly_prep_(s, power, r if low_precision else None)
                    a = s
                else:
                    p = _plus_one(s)                    # P = S + 1
                    if power == 4:                      # two N×N buffers
                        a = p * p                       # P^2
                        p_pow = p.mul_(a)               # P^3
                        a.square_()                     # A = P^4
                    else:
                        p_pow = p.pow(power - 1)
                        a = p_pow * p
                    del p
                del s
                g = g3[heads, rows].to(acc)
                o = o3[heads, rows].to(acc)
                dy = g / r                              # dL/d(AV)
                dr = (g * o).sum(-1, keepdim=True).div_(r).neg_()
                if low_precision:                       # normalised first, to stay in range
                    a = a if kernel else a.div_(r).to(dt)
                    dv[heads] += torch.matmul(a.transpose(-1, -2), g.to(dt)).to(acc)
                else:                                   # (A/r)ᵀ g = Aᵀ (g/r): no pass over A
                    dv[heads] += torch.matmul(a.transpose(-1, -2), dy)
                del a
                # dL/dS = p P^(p-1) dL/dA, dL/dA = dy Vᵀ + dr; the factor p on the N×d side
                da = torch.matmul(dy.mul_(power).to(dt), v3[heads].transpose(-1, -2))
                if kernel:                              # one pass, over dL/dA
                    ds = poly_ds_(da, p_pow, dr.mul_(power))
                else:
                    ds = da.to(acc).add_(dr.mul_(power)).mul_(p_pow).to(dt)
                del p_pow
                dq[heads, rows] = torch.matmul(ds, k3[heads])
                dk[heads] += torch.matmul(ds.transpose(-1, -2), qc).to(acc)
        return (*_in_layout(ctx.layouts, dq.view(q.shape), dk.to(k.dtype).view(k.shape), dv.to(v.dtype).view(v.shape)),
                None, None)


def _is_exporting() -> bool:
    is_exporting = getattr(torch.compiler, 'is_exporting', None)   # torch >= 2.5
    return bool(is_exporting and is_exporting())


def _export_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, power: int) -> torch.Tensor:
    """The same function as one graph, for ``torch.export`` / ONNX: the chunk loop of ``_forward``
    depends on the token count, which is symbolic in a program with dynamic height and width."""
    a = _power_(q @ k.transpose(-1, -2) + 1, power)
    return (a @ v) / a.sum(-1, keepdim=True).clamp_min(_EPS)


#: |S + 1| is clamped to this before the log: at a score of exactly −1 (fp32 sums of bf16 products can land on
#: it exactly; a segmentation step computes ~10⁸ scores a layer) log|·| has the derivative 0/0 and the row's
#: gradient would be NaN. Clamped, the weight is e^(p·log 1e-30) ≈ 0 as before and the gradient is 0, the
#: value of d(S+1)^p/dS there.
_SCORE_FLOOR = 1e-30


def _log_poly_score(power: int):
    def score_mod(score, b, h, q_idx, kv_idx):
        return power * torch.log(torch.abs(score + 1).clamp_min(_SCORE_FLOOR))
    return score_mod


_COMPILED_FLEX = None

#: how many specialisations (shapes, dtypes, grad modes) the compiled flex kernel may collect. Dynamo's
#: default is 8 per function, and past it Dynamo does not fail: it silently runs flex_attention's unfused
#: path, which materialises every N×N score matrix (UperNet + APolyNeXt-S at 512x2048, batch 2: 2·9·4096²
#: scores, 0.6-1.2 GB a layer). Batch sizes and grad modes multiply the count: the training batch, the last
#: smaller one, evaluation and its last batch, at two attention stages, are already 8 with static shapes.
FLEX_RECOMPILE_LIMIT = 64


def flex_available() -> bool:
    """True when this PyTorch has ``flex_attention`` (torch >= 2.5)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _compiled_flex():
    """flex_attention under ``torch.compile``, made once per process. ``dynamic=None`` (automatic dynamic
    shapes): the first shape gets a static kernel; once a second token count is seen, one kernel with a
    symbolic token count serves every later one (variable image sizes in detection and segmentation would
    otherwise compile a kernel per size)."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=None)
    return _COMPILED_FLEX


def poly_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, power: int = 4,
                        compiled: Optional[bool] = None) -> torch.Tensor:
    """The polynomial attention through ``flex_attention`` with a score modification.

    For even ``power``, (S+1)^p / Σ_row (S+1)^p = softmax(p·log|S+1|): flex_attention's softmax
    (max-subtracted, so in range) then *is* the l1 row normalisation, and its fused kernel never
    holds the N×N scores (forward and backward). Exact in real arithmetic, except that |S+1| is
    clamped at 1e-30 (a zero weight and gradient at a score of exactly −1, as in the reference).

    ``compiled`` (default: on CUDA, unless a surrounding ``torch.compile`` traces this call) runs the
    compiled kernel, with Dynamo's recompile limit raised to :data:`FLEX_RECOMPILE_LIMIT` for this call
    so that a new shape compiles instead of falling back to the unfused path. Otherwise flex_attention's
    eager reference runs (forward only on CPU: PyTorch has no CPU backward for it).
    """
    from torch.nn.attention.flex_attention import flex_attention
    if power % 2:
        raise ValueError(f"poly_attention_flex needs an even power (got {power})")
    if compiled is None:
        compiled = q.device.type == 'cuda' and not torch.compiler.is_compiling()
    if not compiled:
        return flex_attention(q, k, v, score_mod=_log_poly_score(power), scale=1.0)
    config = torch._dynamo.config
    name = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'   # (torch < 2.7)
    with config.patch(**{name: max(FLEX_RECOMPILE_LIMIT, getattr(config, name))}):
        return _compiled_flex()(q, k, v, score_mod=_log_poly_score(power), scale=1.0)


def poly_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        power: int = 4,
        chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """O = l1_normalize_rows((Q Kᵀ + 1)^power) V for (B, heads, N, d) tensors.

    ``q`` must already carry the per-head scale. ``power`` must be even (the row sum is
    then the l1 norm). On CUDA: :func:`poly_attention_flex` (fused, forward and backward).
    Elsewhere: the recomputing autograd function when a gradient is needed, and the same
    chunked in-place kernel without autograd bookkeeping otherwise. In float32 on a CPU with
    AVX-512, and in bfloat16 with AVX-512 BF16, both are the fused kernels of ``ops.cpu_kernels``
    (eight query rows of weights a thread at a time), which need less than any ``chunk_bytes``;
    it caps the other paths.
    """
    if power % 2:
        raise ValueError(f"poly_attention needs an even power (got {power}); odd powers make A signed")
    if _is_exporting():
        return _export_forward(q, k, v, power)
    if q.device.type == 'cuda' and flex_available():   # the fused kernel: chosen automatically on CUDA
        return poly_attention_flex(q, k.to(q.dtype), v.to(q.dtype), power).to(v.dtype)
    chunk_bytes = chunk_bytes or DEFAULT_CHUNK_BYTES
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _PolyAttentionFunction.apply(q, k, v, power, chunk_bytes)
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _forward(q, k, v, power, chunk_bytes, inference=True)[0]


def poly_attention_reference(q, k, v, power: int = 4) -> torch.Tensor:
    """The plain autograd expression (as written in the paper), for tests."""
    attn = (q @ k.transpose(-1, -2) + 1) ** power
    attn = torch.nn.functional.normalize(attn, p=1, dim=-1)
    return attn @ v
