"""Sliding-window (neighbourhood) attention on a 2-D token grid, softmax or polynomial kernel.

Each query at grid position (i, j) attends to the ``kh × kw`` keys of the window centred on it,
shifted inwards at the borders so that it always holds ``kh · kw`` keys (the definition of
Neighborhood Attention, Hassani et al., CVPR 2023, which MetaFormer cites with Longformer for
the "sliding window" of CAFormer at detection resolution):

    start(i) = clamp(i − ⌊kh/2⌋, 0, H − kh),   keys of (i, j) = rows start(i) … start(i)+kh−1 × cols …
    softmax:  O = softmax(scale · Q Kᵀ restricted to the window) V
    poly:     A = (Q Kᵀ + 1)^p on the window (0 elsewhere),  O = (A / ‖A‖₁,row) V

Why this is written by hand: PyTorch has no neighbourhood attention, and NATTEN (the authors'
kernel library) needs its own CUDA build, has no CPU path in current releases and knows only
softmax. This version runs everywhere with dense matmuls: the grid is cut into ``tile × tile``
query tiles; every tile attends to one key region of (tile + k − 1)² positions that holds all its
queries' windows, through a boolean mask. Memory stays linear in the number of tokens (the
regions overlap by k − 1), and a window as large as the grid gives global attention exactly.
The MACs that a neighbourhood kernel performs (``neighborhood_macs``) are what ``polynext det
cost`` counts; the tiles compute (tile + k − 1)² / k² as many scores and mask the rest.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['neighborhood_attention', 'neighborhood_attention_reference', 'neighborhood_mask', 'neighborhood_macs',
           'window_starts']


def window_starts(n: int, k: int, device=None) -> torch.Tensor:
    """First key index of the window of every query position 0 … n−1 (length-k windows on n)."""
    return (torch.arange(n, device=device) - k // 2).clamp(0, n - k)


def neighborhood_mask(size: Tuple[int, int], window: int, device=None) -> torch.Tensor:
    """(N, N) boolean mask of the windows (reference and tests; N = H·W, row = query)."""
    h, w = size
    kh, kw = min(window, h), min(window, w)
    sr, sc = window_starts(h, kh, device), window_starts(w, kw, device)
    r = torch.arange(h, device=device)
    c = torch.arange(w, device=device)
    rows = (r[None, :] >= sr[:, None]) & (r[None, :] < sr[:, None] + kh)   # (query row, key row)
    cols = (c[None, :] >= sc[:, None]) & (c[None, :] < sc[:, None] + kw)
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(h * w, h * w)


def neighborhood_macs(batch_heads: int, size: Tuple[int, int], window: int, head_dim: int) -> int:
    """MACs of Q Kᵀ and A V over the windows: 2 · (B · heads) · N · kh · kw · head_dim."""
    h, w = size
    return 2 * batch_heads * h * w * min(window, h) * min(window, w) * head_dim


def _poly_normalised(scores: torch.Tensor, mask: Optional[torch.Tensor], power: int) -> torch.Tensor:
    a = (scores.to(torch.promote_types(scores.dtype, torch.float32)) + 1.0) ** power
    if mask is not None:
        a = a * mask
    return a / a.sum(-1, keepdim=True).clamp_min(1e-12)


def neighborhood_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Tuple[int, int],
                                     window: int, kernel: str = 'softmax', scale: Optional[float] = None,
                                     power: int = 4) -> torch.Tensor:
    """The plain N×N masked expression, for tests. q, k, v: (B, heads, N, d)."""
    mask = neighborhood_mask(size, window, q.device)
    s = q @ k.transpose(-1, -2)
    if kernel == 'softmax':
        s = s * (q.shape[-1] ** -0.5 if scale is None else scale)
        return s.masked_fill(~mask, float('-inf')).softmax(-1) @ v
    a = _poly_normalised(s, mask, power)
    return (a @ v.to(a.dtype)).to(v.dtype)


def _tile_index(n: int, k: int, tile: int, device) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """For one axis: key-region indices (tiles, R), query-to-region mask (tiles, tile, R), R."""
    region = min(n, tile + k - 1)
    tiles = -(-n // tile)
    t0 = torch.arange(tiles, device=device) * tile
    region_start = (t0 - k // 2).clamp(0, n - region)                       # (tiles,)
    keys = region_start[:, None] + torch.arange(region, device=device)      # (tiles, R)
    queries = t0[:, None] + torch.arange(tile, device=device)               # (tiles, tile), may pass n
    starts = window_starts(n, k, device)[queries.clamp(max=n - 1)]          # padded queries: last row's window
    mask = (keys[:, None, :] >= starts[:, :, None]) & (keys[:, None, :] < starts[:, :, None] + k)
    return keys, mask, region


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Tuple[int, int], window: int,
                           kernel: str = 'softmax', scale: Optional[float] = None, power: int = 4,
                           tile: Optional[int] = None) -> torch.Tensor:
    """Sliding-window attention; q, k, v: (B, heads, N = H·W, d), row-major tokens; returns (B, heads, N, d).

    ``kernel='softmax'``: scaled dot-product softmax (``scale`` default d^-½), through
    ``F.scaled_dot_product_attention`` with a boolean mask. ``kernel='poly'``: PolyAttn's
    (Q Kᵀ + 1)^power kernel, l1-normalised over the window (``q`` carries the per-head scale).
    ``tile``: query tile side (default ``window``). With a gradient to compute, only q, k, v are kept
    for backward and the tiles are recomputed there (``torch.utils.checkpoint``), as the global
    polynomial kernel does: the tiles' scores never stay alive between forward and backward."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        from torch.utils.checkpoint import checkpoint
        return checkpoint(_neighborhood_attention, q, k, v, size, window, kernel, scale, power, tile,
                          use_reentrant=False)
    return _neighborhood_attention(q, k, v, size, window, kernel, scale, power, tile)


def _neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Tuple[int, int], window: int,
                            kernel: str, scale: Optional[float], power: int, tile: Optional[int]) -> torch.Tensor:
    if kernel not in ('softmax', 'poly'):
        raise ValueError(f"kernel must be 'softmax' or 'poly', got {kernel!r}")
    h, w = size
    b, heads, n, d = q.shape
    if n != h * w:
        raise ValueError(f'{n} tokens do not form a {h}x{w} grid')
    if window < 1:
        raise ValueError(f'window must be >= 1, got {window}')
    kh, kw = min(window, h), min(window, w)
    t = tile or window
    th, tw = min(t, h), min(t, w)
    rows, mrow, rh = _tile_index(h, kh, th, q.device)
    cols, mcol, rw = _tile_index(w, kw, tw, q.device)
    nth, ntw = rows.shape[0], cols.shape[0]

    def regions(x: torch.Tensor) -> torch.Tensor:       # (B, h, N, d) → (B, h, nth, ntw, rh·rw, d)
        x = x.reshape(b, heads, h, w, x.shape[-1])[:, :, rows]              # (B, h, nth, rh, W, d)
        x = x[:, :, :, :, cols]                                             # (B, h, nth, rh, ntw, rw, d)
        return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, heads, nth, ntw, rh * rw, x.shape[-1])

    qt = F.pad(q.reshape(b, heads, h, w, d), (0, 0, 0, ntw * tw - w, 0, nth * th - h))
    qt = qt.reshape(b, heads, nth, th, ntw, tw, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, heads, nth, ntw, th * tw, d)
    kr, vr = regions(k), regions(v)
    # (nth, ntw, th·tw, rh·rw): query (y, x) of tile (a, c) may see key (u, z) of its region
    mask = (mrow[:, None, :, None, :, None] & mcol[None, :, None, :, None, :]).reshape(nth, ntw, th * tw, rh * rw)
    if kernel == 'softmax':
        o = F.scaled_dot_product_attention(qt, kr, vr, attn_mask=mask, scale=scale)
    else:
        a = _poly_normalised(qt @ kr.transpose(-1, -2), mask, power)
        o = (a.to(vr.dtype) @ vr) if vr.dtype in (torch.float16, torch.bfloat16) else (a @ vr.to(a.dtype)).to(vr.dtype)
    o = o.reshape(b, heads, nth, ntw, th, tw, v.shape[-1]).permute(0, 1, 2, 4, 3, 5, 6)
    o = o.reshape(b, heads, nth * th, ntw * tw, v.shape[-1])[:, :, :h, :w]
    return o.reshape(b, heads, n, v.shape[-1])
