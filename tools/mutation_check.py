#!/usr/bin/env python3
"""Plant small, meaningful bugs in a copy of polynext, one at a time, and check the tests catch each.

A test suite that passes is only worth something if it fails when the code is wrong. Each
mutation below is one source edit that a real bug could make (the PolyConv channel flip removed,
the attention power changed, a gate initialised differently, an ablation switch ignored, ...).
For each one the tool copies the repository once into a temporary folder, writes the edit there
(the working tree is never touched), runs the tests that should notice it, and records whether
they failed ("caught") or passed ("SURVIVED"). A survivor is a hole in the suite.

    python tools/mutation_check.py                 # every mutation; exit 1 if one survives
    python tools/mutation_check.py --list          # the mutations and the tests each one runs
    python tools/mutation_check.py --only polyconv-flip-removed ln-eps
    python tools/mutation_check.py --jobs 2        # two mutations at a time (two copies)
    python tools/mutation_check.py --json mutation.json
    python tools/mutation_check.py --pytest-args='' --jobs 2   # serial pytest per mutation: -x stops at
                                                              # the first failure (faster on a busy machine)

The copy is imported through PYTHONPATH (the copy's ``src/`` comes before the installed,
editable polynext), which the tool verifies before it starts. Before the mutations, the selected
tests run once on the unmodified copy: they must pass, or a "caught" would mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
MODEL = 'src/polynext/models/polynext.py'
ATTN_OP = 'src/polynext/ops/poly_attention.py'
ROBUST = 'src/polynext/robustness/protocols.py'
STEP = 'src/polynext/engine/step.py'
EMA = 'src/polynext/engine/ema.py'
SESSION = 'src/polynext/engine/session.py'
TRAINER = 'src/polynext/train/trainer.py'
SEG_TRAINER = 'src/polynext/seg/trainer.py'
DET_TRAINER = 'src/polynext/det/trainer.py'

GOLDEN = 'tests/test_golden.py'
ABL = 'tests/test_ablation_formulas.py'
ATTN_TESTS = 'tests/test_poly_attention_op.py'
MODEL_TESTS = (GOLDEN, ABL)
KERNEL_TESTS = (ATTN_TESTS, GOLDEN)
POLYCONV_DW_TESTS = ('tests/test_polyconv_dw.py::test_polyconv_dw_kernel_in_every_code_path',
                     'tests/test_polyconv_dw.py::test_models_take_the_kernel_at_inference_only')
HEADS_TESTS = ('tests/test_attention_convs.py::test_heads_kernel_in_every_code_path',
               'tests/test_attention_convs.py::test_models_take_the_kernel_at_inference_only',
               'tests/test_attention_convs.py::test_applies_checks_before_the_kernel')
NARROW_PW_TESTS = ('tests/test_narrow_pointwise.py::test_narrow_pointwise_kernel_in_every_code_path',
                   'tests/test_narrow_pointwise.py::test_models_take_the_kernel_at_inference_only',
                   'tests/test_narrow_pointwise.py::test_applies_checks_before_the_kernel')
PW_NORM_TESTS = ('tests/test_narrow_pointwise.py::test_pointwise_norm_kernel_in_every_code_path',
                 'tests/test_narrow_pointwise.py::test_models_take_the_kernel_at_inference_only',
                 'tests/test_narrow_pointwise.py::test_pointwise_norm_keeps_drop_path_in_training_mode',
                 'tests/test_narrow_pointwise.py::test_pointwise_norm_checks_before_the_kernel')
BF16_PW_TESTS = ('tests/test_narrow_pointwise.py::test_bf16_fused_kernels_in_every_code_path',
                 'tests/test_narrow_pointwise.py::test_bf16_models_take_the_fused_kernels')
POLY_MLP_TESTS = ('tests/test_narrow_pointwise.py::test_poly_mlp_kernel_in_every_code_path',
                  'tests/test_narrow_pointwise.py::test_models_take_the_kernel_at_inference_only',
                  'tests/test_narrow_pointwise.py::test_poly_mlp_checks_before_the_kernel')
ABLATION_TESTS = (ABL,)
EMA_TESTS = ('tests/test_ema.py', 'tests/test_engine_parts.py')
TRAIN_EMA_RUN = 'tests/test_train_run.py::test_two_epochs_on_an_image_folder'
TRAIN_RESUME = 'tests/test_train_run.py::test_sigkill_mid_epoch_after_ema_resumes_exactly_the_remaining_steps'
SEG_RESUME = 'tests/test_seg_run.py::test_train_eval_and_resume'
DET_RESUME = 'tests/test_det_run.py::test_train_eval_and_resume_to_identical_weights'
DDP = 'tests/test_train_run.py::test_ddp_two_cpu_processes'
RESUME_TESTS = (TRAIN_RESUME, SEG_RESUME, DET_RESUME)


@dataclass(frozen=True)
class Mutation:
    """One planted bug: replace ``find`` (which must occur exactly once) by ``replace`` in ``path``."""
    name: str
    what: str
    path: str
    find: str
    replace: str
    tests: Tuple[str, ...] = MODEL_TESTS
    #: the CPU flags (/proc/cpuinfo) the mutated code needs to run: code built only for AVX-512 (or AVX-512 BF16) is
    #: not run on other CPUs, so there the mutation is reported "n/a", not as a survivor
    needs: Tuple[str, ...] = ()


AVX512 = ('avx512f', 'avx512bw')
AVX512_BF16 = AVX512 + ('avx512_bf16',)

MUTATIONS: Tuple[Mutation, ...] = (
    # ---- the architecture -----------------------------------------------------------------
    Mutation('polyconv-flip-removed', 'PolyConv: the fine branch is not channel-reversed before the product',
             # (where the PolyConv core kernel is built it serves inference, and this path, CPUs without AVX-512,
             # is checked against it)
             MODEL, 'y = conv_mul(u, fine.flip(1), self.coarse)', 'y = conv_mul(u, fine, self.coarse)',
             MODEL_TESTS + POLYCONV_DW_TESTS[1:]),
    Mutation('attn-power-2', 'PolyAttn: power 2 instead of 4 ((s·QKᵀ+1)^2)',
             MODEL, "spatial_size: Optional[Tuple[int, int]] = None, power: int = 4,",
             "spatial_size: Optional[Tuple[int, int]] = None, power: int = 2,"),
    Mutation('attn-kernel-square-once', 'attention kernel: the 4th power computed as a square',
             ATTN_OP, 'return p.square_().square_()', 'return p.square_()', KERNEL_TESTS),
    Mutation('attn-kernel-no-normalise', 'attention kernel: rows not l1-normalised (fp32 path)',
             ATTN_OP, 'o3[heads, rows] = torch.matmul(a, vt).div_(r)', 'o3[heads, rows] = torch.matmul(a, vt)',
             KERNEL_TESTS),
    Mutation('dw-wgrad-taps-transposed', 'depthwise weight-gradient kernel: the k x k taps summed into the '
             'transposed tap (i, j) <- (j, i)', 'src/polynext/ops/depthwise.py',
             'return part.sum(0).permute(2, 0, 1).unsqueeze(1)', 'return part.sum(0).permute(2, 1, 0).unsqueeze(1)',
             ('tests/test_cpu_kernels.py::test_depthwise_backward_takes_the_weight_grad_kernel',)),
    Mutation('attn-fused-tail-unmasked', 'fused attention kernel (C): the zero-padded keys past the last one '
             'weigh (0 + 1)^p instead of nothing', 'src/polynext/ops/csrc/cpu_kernels.c',
             'const __mmask16 m0 = block_mask(M, j), m1 = two ? block_mask(M, j + 16) : 0;',
             'const __mmask16 m0 = 0xffff, m1 = two ? 0xffff : 0;',
             ('tests/test_cpu_kernels.py::test_fused_attention_kernel_in_every_code_path',), needs=AVX512),
    Mutation('attn-fused-backward-no-rowsum-term', 'fused attention backward (C): the row sum\'s gradient '
             '(-p (g . o) / r) left out of dL/dS', 'src/polynext/ops/csrc/cpu_kernels.c',
             'dterm[r] = -(float)power * _mm512_reduce_add_ps(go) * inv;', 'dterm[r] = 0.f * _mm512_reduce_add_ps(go);',
             ('tests/test_cpu_kernels.py::test_fused_attention_backward_kernel_in_every_code_path',), needs=AVX512),
    Mutation('polyconv-dw-lanes-unreversed', 'PolyConv core kernel (C): the mirrored channels are read but not '
             'reversed within their block', 'src/polynext/ops/csrc/cpu_kernels.c',
             'for (int i = 0; i < PC_VW; ++i) rev[i] = i < n ? (int32_t)(n - 1 - i) : i;',
             'for (int i = 0; i < PC_VW; ++i) rev[i] = i;', (POLYCONV_DW_TESTS[0], GOLDEN)),
    Mutation('polyconv-dw-no-flip', 'PolyConv core kernel (C): the fine branch reads the block\'s own channels',
             'src/polynext/ops/csrc/cpu_kernels.c', 'src[b] = C - c0 - n;', 'src[b] = c0;',
             (POLYCONV_DW_TESTS[0], GOLDEN)),
    Mutation('polyconv-dw-padding-columns-kept', 'PolyConv core kernel (C): the product\'s columns past the map '
             '(the width padded to whole register rows) are not zeroed, so the output convolution reads them',
             'src/polynext/ops/csrc/cpu_kernels.c',
             'for (int64_t x = W; x < Wr; ++x) PC_STORE(pr + PC_VW * x, PC_ZERO());', '(void)Wr;',
             POLYCONV_DW_TESTS),
    Mutation('polyconv-dw-stale-rows', 'PolyConv core kernel (C): the ring rows above the map keep the previous '
             'image\'s rows', 'src/polynext/ops/csrc/cpu_kernels.c',
             'for (int64_t r = 1; r <= p; ++r) {', 'for (int64_t r = 1; r <= 0; ++r) {', POLYCONV_DW_TESTS),
    Mutation('polyconv-dw-weights-over-rings', 'PolyConv core kernel (C): a smaller group of channel blocks keeps '
             'its weights where a larger group\'s rings lie', 'src/polynext/ops/csrc/cpu_kernels.c',
             'wc, wf, wo, buf, buf + gb * per, H, W,', 'wc, wf, wo, buf, buf + (b1 - b0) * per, H, W,',
             POLYCONV_DW_TESTS),
    Mutation('polyconv-dw-rows-undilated', 'depthwise sums with a kernel row in registers (C): the dilation '
             'ignored, tap j read j columns on instead of j d', 'src/polynext/ops/csrc/cpu_kernels.c',
             'if (c - j * D >= 0 && c - j * D < R) acc[c - j * D] = PC_FMA(wv[j], xv, acc[c - j * D]);',
             'if (c - j >= 0 && c - j < R) acc[c - j] = PC_FMA(wv[j], xv, acc[c - j]);', POLYCONV_DW_TESTS),
    Mutation('heads-dw-one-weight', 'attention convolutions kernel (C): the second output (K) computed with the '
             "first one's (Q's) weights", 'src/polynext/ops/csrc/cpu_kernels.c',
             'const float *wt = out ? wb : wa;', 'const float *wt = wa;', HEADS_TESTS),
    Mutation('heads-dw-groups-ignored', 'attention convolutions kernel (C): the output layout\'s group stride ignored '
             '(every head written as if channels-last)', 'src/polynext/ops/csrc/cpu_kernels.c',
             'const int64_t yo = n * yl[0] + (c0 / yl[3]) * yl[2] + c0 % yl[3];', 'const int64_t yo = n * yl[0] + c0;',
             HEADS_TESTS),
    Mutation('heads-dw-head-scale-dropped', "PolyAttn with the attention convolutions kernel: Q's weights without the "
             'head scale sigmoid(l_h)', MODEL,
             'q, k, v = attention_convs(self.qkv(x), scaled_taps(self.q_conv.weight, self.scale.sigmoid()),',
             'q, k, v = attention_convs(self.qkv(x), depthwise_taps(self.q_conv.weight),', HEADS_TESTS),
    Mutation('heads-dw-in-training', 'ops.attention_convs: the kernel (no autograd) also serves an input that records '
             'a gradient', 'src/polynext/ops/attention_convs.py',
             'and x.is_contiguous(memory_format=torch.channels_last) and eager_cpu_inference(x)):',
             'and x.is_contiguous(memory_format=torch.channels_last)):', HEADS_TESTS),
    Mutation('pw-norm-inplace-unowned', "PolyConvBlock: the 1x1 kernel with the norm epilogue writes into a residual "
             'stream the block does not own', MODEL,
             'y = pointwise_norm(u, pc.pw_out.weight, weight, bias, norm.eps, residual=x, inplace=owned)',
             'y = pointwise_norm(u, pc.pw_out.weight, weight, bias, norm.eps, residual=x, inplace=True)',
             ('tests/test_narrow_pointwise.py::test_pointwise_norm_in_place_writes_only_an_owned_residual',)),
    Mutation('constants-version-unchecked', 'ops.constants: a kept value survives an in-place change of its '
             'parameter (only the storage is checked)', 'src/polynext/ops/constants.py',
             'return t.data_ptr(), 0 if _ours(t) else t._version', 'return t.data_ptr(), 0',
             ('tests/test_constants.py',)),
    Mutation('constants-steps-unchecked', 'ops.constants: a kept value survives an optimizer step (the fused AdamW '
             'kernel does not advance the version counters)', 'src/polynext/ops/constants.py',
             'state = (_steps[0],) + tuple(_state(t) for t in sources)', 'state = tuple(_state(t) for t in sources)',
             ('tests/test_constants.py',)),
    Mutation('constants-values-unchecked', 'ops.constants: a kept gated weight survives a change of the gate\'s value',
             'src/polynext/ops/constants.py', 'and all(torch.equal(a, b) for a, b in zip(hit[2], values))):', '):',
             ('tests/test_constants.py',)),
    Mutation('polyconv-dw-in-training', 'ops.polyconv_dw: the kernel (no autograd) also serves training',
             'src/polynext/ops/polyconv_dw.py', 'and u.is_contiguous(memory_format=torch.channels_last) and '
             'eager_cpu_inference(u)):', 'and u.is_contiguous(memory_format=torch.channels_last)):',
             POLYCONV_DW_TESTS),
    Mutation('qkv-split-sliced', "PolyAttn: the Q/K/V projection's output sliced again (strided views the depthwise "
             'convolutions copy first)', 'src/polynext/models/polynext.py',
             'qk, v = split_pointwise(x, self.qkv, self.attn_dim)', 'qk, v = self.qkv(x).split(self.attn_dim, dim=1)',
             ('tests/test_pointwise.py::test_polyattn_depthwise_convs_read_contiguous_parts',)),
    Mutation('narrow-pw-partial-tile-residual', "narrow 1x1 kernel (C): the last, partial pixel tile drops the "
             'residual it should add to', 'src/polynext/ops/csrc/cpu_kernels.c',
             'ypad[p * CW + j] = p < np && accumulate ? yc[p * N + j] : 0.f;', 'ypad[p * CW + j] = 0.f;',
             NARROW_PW_TESTS),
    Mutation('narrow-pw-half-vector-unsummed', 'narrow 1x1 kernel (C): the last 8 outputs of a 72-wide tile keep '
             'zero sums', 'src/polynext/ops/csrc/cpu_kernels.c',
             'if (TAIL == 8) t[p] = _mm256_fmadd_ps(_mm512_castps512_ps256(b), wt, t[p]);', 'if (TAIL == 8) t[p] = t[p];',
             NARROW_PW_TESTS, needs=AVX512),
    Mutation('narrow-pw-avx2-last-columns-unsummed', 'narrow 1x1 kernel, AVX2 (C): the last 24 outputs of a chunk '
             'are never computed', 'src/polynext/ops/csrc/cpu_kernels.c',
             'for (int64_t s = 0; s < CW; s += 24)\n', 'for (int64_t s = 0; s + 24 < CW; s += 24)\n',
             NARROW_PW_TESTS),
    Mutation('polyconv-dw-avx2-fine-unmultiplied', 'PolyConv core kernel, AVX2 (C): the fine sums overwrite the '
             'coarse ones instead of multiplying them', 'src/polynext/ops/csrc/cpu_kernels.c',
             'PC_STORE(pr + PC_VW * (x0 + r), PC_MUL(PC_LOAD(pr + PC_VW * (x0 + r)), a[r]));',
             'PC_STORE(pr + PC_VW * (x0 + r), a[r]);', POLYCONV_DW_TESTS),
    Mutation('polyconv-dw-avx2-bf16-truncated', 'PolyConv core and attention convolutions kernels, AVX2 (C): bf16 '
             'outputs truncated instead of rounded to nearest even', 'src/polynext/ops/csrc/cpu_kernels.c',
             '__m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);',
             '__m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_and_si256(lsb, _mm256_setzero_si256())), 16);',
             POLYCONV_DW_TESTS[:1]),
    Mutation('narrow-pw-in-training', 'ops.narrow_pointwise: the kernel (no autograd) also serves training',
             'src/polynext/ops/narrow_pointwise.py',
             'and weight.device == x.device and not (torch.is_grad_enabled() and weight.requires_grad)',
             'and weight.device == x.device', NARROW_PW_TESTS),
    Mutation('narrow-pw-residual-dropped', "pointwise_add_: the kernel's projection replaces the residual instead of "
             'adding to it', 'src/polynext/ops/pointwise.py', 'return narrow_pointwise(x, w, out=residual)',
             'return residual.copy_(narrow_pointwise(x, w))', NARROW_PW_TESTS),
    Mutation('pw-norm-partial-tile-last-row', '1x1 kernel with the norm epilogue (C): the last row of the partial '
             'last pixel tile is not normalised', 'src/polynext/ops/csrc/cpu_kernels.c',
             'for (int64_t p = 0; p < np; ++p) {\n            if (product)\n                row_prod_f32(buf',
             'for (int64_t p = 0; p + 1 < np; ++p) {\n            if (product)\n                row_prod_f32(buf',
             PW_NORM_TESTS),
    Mutation('pw-norm-residual-dropped', '1x1 kernel with the norm epilogue (C): the residual is not added',
             'src/polynext/ops/csrc/cpu_kernels.c', 'row_f32(buf + p * N, nw, nb, res ? res + (p0 + p) * N : NULL,',
             'row_f32(buf + p * N, nw, nb, NULL,', PW_NORM_TESTS),
    Mutation('pw-norm-drop-path-skipped', "PolyConvBlock: the fused norm-and-residual also serves a training-mode "
             'block with drop path (under no_grad), which then drops nothing', 'src/polynext/models/polynext.py',
             'self.mixer.pw_out.bias is None and no_drop:', 'self.mixer.pw_out.bias is None:', PW_NORM_TESTS),
    Mutation('pw-norm-residual-with-product', 'ops.narrow_pointwise.pointwise_norm: a residual is '
             'accepted with the product (whose output is half as wide)', 'src/polynext/ops/narrow_pointwise.py',
             '(residual is None or (not product and residual.dtype == x.dtype',
             '(residual is None or (residual.dtype == x.dtype', PW_NORM_TESTS),
    Mutation('poly-mlp-partial-block-residual', 'whole-PolyMLP kernel (C): the partial last pixel block adds its '
             'branch to zeros instead of to the residual stream', 'src/polynext/ops/csrc/cpu_kernels.c',
             'memcpy(ypad, yt, (size_t)(np * K) * sizeof(float));', '(void)yt;', POLY_MLP_TESTS),
    Mutation('poly-mlp-last-input-tile-skipped', "whole-PolyMLP kernel (C): a block's last tile of the input "
             'projection is left uncomputed', 'src/polynext/ops/csrc/cpu_kernels.c',
             'for (int64_t t = 0; t < PB; t += PT_in) pw_tile_row(',
             'for (int64_t t = 0; t + PT_in < PB; t += PT_in) pw_tile_row(', POLY_MLP_TESTS),
    Mutation('poly-mlp-gate-dropped', "PolyNeXt block: the whole-PolyMLP kernel gets fc_out's weight without the "
             "block's Sigmoid-Scale gate", 'src/polynext/models/polynext.py',
             'mlp.norm.weight, mlp.norm.bias, mlp.norm.eps, w_out) is not None):',
             'mlp.norm.weight, mlp.norm.bias, mlp.norm.eps, fc_out.weight) is not None):', POLY_MLP_TESTS),
    Mutation('pw-bf16-pairs-misformed', "ops.narrow_pointwise: a bf16 weight's input pairs packed as (k, k + K/2) "
             'instead of (k, k + 1)', 'src/polynext/ops/narrow_pointwise.py',
             'return weight.reshape(n // cw, cw, k // 2, 2).permute(0, 2, 1, 3).contiguous().reshape(-1)',
             'return weight.reshape(n // cw, cw, 2, k // 2).permute(0, 3, 1, 2).contiguous().reshape(-1)', BF16_PW_TESTS),
    Mutation('pw-bf16-half-vector-unsummed', 'bf16 1x1 tile (C): the last 8 outputs of a 72-wide tile keep zero sums',
             'src/polynext/ops/csrc/cpu_kernels.c',
             'if (TAIL == 8) t[p] = _mm256_dpbf16_ps(t[p], (__m256bh)_mm512_castsi512_si256(b), wt);',
             'if (TAIL == 8) t[p] = t[p];', BF16_PW_TESTS, needs=AVX512_BF16),
    Mutation('poly-mlp-bf16-residual-dropped', 'bf16 whole-PolyMLP kernel (C): the branch replaces the stream instead '
             'of adding to it', 'src/polynext/ops/csrc/cpu_kernels.c',
             '_mm512_add_ps(load_bf16(y + r * C + c, k), load_f32(s + r * C + c, k))', 'load_f32(s + r * C + c, k)',
             BF16_PW_TESTS, needs=AVX512_BF16),
    Mutation('attn-bf16-tail-unmasked', 'fused bf16 attention kernel (C): the zero-padded keys past the last one '
             'weigh (0 + 1)^p instead of nothing', 'src/polynext/ops/csrc/cpu_kernels.c',
             'const __mmask16 m0 = block_mask(M, j), m1 = two ? block_mask(M, j + 16) : (__mmask16)0;',
             'const __mmask16 m0 = 0xffff, m1 = two ? 0xffff : (__mmask16)0;',
             ('tests/test_cpu_kernels.py::test_fused_bf16_attention_kernels_in_every_code_path',), needs=AVX512_BF16),
    Mutation('attn-bf16-backward-no-rowsum-term', 'fused bf16 attention backward (C): the row sum\'s gradient '
             'left out of dL/dS', 'src/polynext/ops/csrc/cpu_kernels.c',
             'dterm[r] = -(float)power * inv * _mm512_reduce_add_ps(go);', 'dterm[r] = 0.f * _mm512_reduce_add_ps(go);',
             ('tests/test_cpu_kernels.py::test_fused_bf16_attention_kernels_in_every_code_path',), needs=AVX512_BF16),
    Mutation('attn-bf16-row-pairs-swapped', 'fused bf16 attention backward (C): the two query rows of a pair '
             'swapped in dV += Aᵀ dY and dK += dSᵀ Q', 'src/polynext/ops/csrc/cpu_kernels.c',
             '_mm512_cvtne2ps_pbh(a[2 * r + 1], a[2 * r]);', '_mm512_cvtne2ps_pbh(a[2 * r], a[2 * r + 1]);',
             ('tests/test_cpu_kernels.py::test_fused_bf16_attention_kernels_in_every_code_path',), needs=AVX512_BF16),
    Mutation('attn-transpose-lanes-swapped', 'fused attention kernels (C): the 16 x 16 transpose of K and V puts '
             'two 128-bit lanes in each other\'s place', 'src/polynext/ops/csrc/cpu_kernels.c',
             't[4 + c] = _mm512_shuffle_i32x4(u0, v0, 0xDD);', 't[4 + c] = _mm512_shuffle_i32x4(u0, v0, 0x88);',
             ('tests/test_cpu_kernels.py::test_fused_attention_kernel_in_every_code_path',), needs=AVX512),
    Mutation('attn-bf16-key-pairs-shifted', 'fused bf16 attention kernel (C): the upper half of the key-pair '
             'layout of V and K takes the wrong dimensions', 'src/polynext/ops/csrc/cpu_kernels.c',
             'const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));',
             'const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(15));',
             ('tests/test_cpu_kernels.py::test_fused_bf16_attention_kernels_in_every_code_path',), needs=AVX512_BF16),
    Mutation('attn-grad-layout-ignored', 'attention backward: the gradients of Q, K and V returned contiguous, not in '
             'their inputs\' channels-last heads layout', ATTN_OP,
             'return tuple(g if layout is None else torch.empty_strided(',
             'return tuple(g if True else torch.empty_strided(',
             ('tests/test_poly_attention_op.py::test_gradients_keep_the_channels_last_heads_layout',)),
    Mutation('attn-scale-init', 'PolyAttn: the per-head scale starts at sigmoid = 1/4 instead of 1/sqrt(32)',
             MODEL, 's0 = head_dim ** -0.5', 's0 = 0.25'),
    Mutation('gate-init-L', 'the L models start their gates at logits -i/2 - 0.25 instead of -i/2 - 0.5',
             MODEL, '_L_GATES = tuple(float(-i / 2 - 0.5) for i in range(8))',
             '_L_GATES = tuple(float(-i / 2 - 0.25) for i in range(8))'),
    Mutation('gate-init-T', 'the T models: last gate 0.0625 instead of 0.03125',
             MODEL, '_T_GATES = (0.5, 0.5, 0.25, 0.125, 0.0625, 0.03125)',
             '_T_GATES = (0.5, 0.5, 0.25, 0.125, 0.0625, 0.0625)'),
    Mutation('gated-residual-no-gate', 'inference residuals: x + f(x) instead of x + g·f(x)',
             MODEL, 'return branch.mul_(gate).add_(x)', 'return branch.add_(x)'),
    Mutation('cell-inputs-swapped', 'multi-input skip: the per-channel scales applied to the wrong inputs',
             MODEL, 'x = torch.addcmul(self.scale0(s0), s1, self.scale1.scale)',
             'x = torch.addcmul(self.scale0(s1), s0, self.scale1.scale)'),
    Mutation('head-no-residual', 'head: l ⊙ r instead of l + l ⊙ r',
             MODEL, 'x = self.drop(self.global_pool(left + left * right))',
             'x = self.drop(self.global_pool(left * right))'),
    Mutation('ln-eps', 'LayerNorm eps 1e-6 instead of 1e-5',
             MODEL, 'def __init__(self, num_channels: int, eps: float = 1e-5, bias: bool = False):',
             'def __init__(self, num_channels: int, eps: float = 1e-6, bias: bool = False):'),
    # ---- running statistics of the fully polynomial (bn) models -----------------------------
    Mutation('bn-unbiased-variance', 'ChannelBatchNorm: unbiased batch variance',
             MODEL, 'var = ((x * x).mean(dim=(0, 1), keepdim=True) - mean * mean).clamp(min=0.0)',
             'var = x.var(dim=(0, 1), keepdim=True)'),
    Mutation('bn-running-momentum', 'ChannelBatchNorm: running mean updated with momentum 0.2',
             MODEL, 'self.running_mean.mul_(1 - m).add_(m * mean)', 'self.running_mean.mul_(1 - 2 * m).add_(2 * m * mean)'),
    Mutation('bn-eval-batch-stats', 'ChannelBatchNorm: eval mode uses the batch statistics',
             MODEL, 'mean, var = self.running_mean, self.running_var',
             'mean = x.mean(dim=(0, 1), keepdim=True); var = ((x * x).mean(dim=(0, 1), keepdim=True) - mean * mean)'),
    Mutation('rowsum-batch-sum', 'RunningRowSumNorm: the batch sum instead of the batch mean of the row sums',
             MODEL, 'denom = attn.sum(dim=-1, keepdim=True).mean(dim=0, keepdim=True)',
             'denom = attn.sum(dim=-1, keepdim=True).sum(dim=0, keepdim=True)'),
    Mutation('rowsum-running-momentum', 'RunningRowSumNorm: running row sums updated with momentum 0.05',
             MODEL, 'self.running_denom.mul_(1 - m).add_(m * denom)', 'self.running_denom.mul_(1 - m / 2).add_(m / 2 * denom)'),
    # ---- ablation switches accepted but ignored (or built wrong) ---------------------------
    Mutation('ablation-add-ignored', "product_op='add' still multiplies",
             MODEL, "y = a * b if self.op == 'mul' else a + b", 'y = a * b', ABLATION_TESTS),
    Mutation('ablation-gelu-after-ignored', "product_gelu='after' leaves out the GELU",
             MODEL, "return F.gelu(y) if self.gelu == 'after' else y", 'return y', ABLATION_TESTS),
    Mutation('ablation-gelu-one-branch-ignored', "product_gelu='one_branch' leaves out the GELU",
             MODEL, "if self.gelu == 'one_branch':\n            a = F.gelu(a)", "if False:\n            a = F.gelu(a)", ABLATION_TESTS),
    Mutation('ablation-mlp-relu', "mlp='gelu' builds a ReLU MLP",
             MODEL, 'Mlp(dim, 2 * mlp_hidden, act_layer=nn.GELU,', 'Mlp(dim, 2 * mlp_hidden, act_layer=nn.ReLU,', ABLATION_TESTS),
    Mutation('ablation-sepconv-relu', "conv_mixer='sepconv' builds a ReLU SepConv",
             MODEL, 'act1_layer=nn.GELU)', 'act1_layer=nn.ReLU)', ABLATION_TESTS),
    Mutation('ablation-poly-softmax-ignored', "attn='poly_softmax' keeps the polynomial kernel",
             MODEL, "kernel='softmax' if ablation.attn == 'poly_softmax' else 'poly'", "kernel='poly'", ABLATION_TESTS),
    Mutation('ablation-free-scalar-sigmoid', "residual_scale='free' still squashes with a sigmoid",
             MODEL, '        return self.scales\n\n\nclass LayerScaleGates',
             '        return torch.sigmoid(self.scales)\n\n\nclass LayerScaleGates', ABLATION_TESTS),
    Mutation('ablation-layerscale-init-ignored', 'layerscale_init ignored (always 1e-6)',
             MODEL, 'LayerScaleGates(2 * num_blocks, dim, ablation.layerscale_init)', 'LayerScaleGates(2 * num_blocks, dim)', ABLATION_TESTS),
    Mutation('ablation-cell-norm-ignored', 'cell_norm=False keeps the norm',
             MODEL, 'self.merge_norm = norm_layer(dim) if ablation.cell_norm else nn.Identity()',
             'self.merge_norm = norm_layer(dim)', ABLATION_TESTS),
    Mutation('ablation-stacks-not-wider', 'stacks=N makes cells shallower without widening them',
             MODEL, 'width_factor = num_blocks / ablation.stacks', 'width_factor = 1.0', ABLATION_TESTS),
    # ---- the training engine: EMA, resume, DDP ------------------------------------------------
    Mutation('ema-update-skipped', 'the EMA is never updated after an optimizer step',
             STEP, 'self.ema.update(self.module, epoch)', 'pass', EMA_TESTS + (TRAIN_EMA_RUN,)),
    Mutation('ema-start-epoch-ignored', 'the EMA is updated before its start epoch',
             EMA, 'if epoch < self.start_epoch:\n            return', 'if False:\n            return',
             EMA_TESTS + (TRAIN_EMA_RUN,)),
    Mutation('ema-no-first-copy', 'the first EMA update averages with the creation copy instead of copying',
             EMA, "if self.init == 'first_update' and self.updates == 0:", 'if False:', EMA_TESTS + (TRAIN_EMA_RUN,)),
    Mutation('ema-state-dropped-on-resume', 'resume: the saved EMA weights are dropped (the EMA restarts from the model)',
             SESSION, "step.ema.restore(state.get('ema_state'), state.get('ema_updates', 0), step.module)",
             "step.ema.restore(None, state.get('ema_updates', 0), step.module)", (TRAIN_RESUME,)),
    Mutation('ema-count-dropped-on-resume', 'resume: the EMA update count is lost (the next update copies again)',
             SESSION, "step.ema.restore(state.get('ema_state'), state.get('ema_updates', 0), step.module)",
             "step.ema.restore(state.get('ema_state'), 0, step.module)", (TRAIN_RESUME,)),
    Mutation('optimizer-state-not-restored', 'resume: the optimizer state (AdamW moments) is not restored',
             SESSION, "step.optimizer.load_state_dict(state['optimizer'])", 'pass', RESUME_TESTS),
    Mutation('scheduler-not-restored', 'resume: the lr schedule is not restored',
             SESSION, 'self.scheduler.load_state_dict(saved)', 'pass', RESUME_TESTS),
    Mutation('rng-not-restored', "resume: the random streams are not restored",
             SESSION, 'restore_rng_state(rng[self.env.rank])', 'pass', RESUME_TESTS),
    Mutation('global-step-not-restored', 'resume: the optimizer-step counter restarts at 0',
             SESSION, "step.global_step = int(state['global_step'])", 'step.global_step = 0', RESUME_TESTS),
    Mutation('train-resume-restarts', "classification resume logs 'resumed from' and trains from scratch",
             TRAINER, "self.session.restore(state)\n        self.epoch = int(state['epoch'])\n"
                      "        self.batch_in_epoch = int(state['batch_in_epoch'])",
             'self.epoch, self.batch_in_epoch = 0, 0', (TRAIN_RESUME,)),
    Mutation('train-resume-replays-the-epoch', 'classification resume trains the seen batches of the epoch again',
             TRAINER, 'self.train_sampler.set_start(start * cfg.device_batch_size)', 'self.train_sampler.set_start(0)',
             (TRAIN_RESUME,)),
    Mutation('seg-resume-restarts', "segmentation resume logs 'resumed at' and trains from scratch",
             SEG_TRAINER, 'self.session.restore(resume_state)\n', 'pass\n', (SEG_RESUME,)),
    Mutation('seg-resume-replays-the-pass', 'segmentation resume restarts the pass over the data',
             SEG_TRAINER, 'self.sampler.set_start(pos * self.cfg.device_batch_size)', 'self.sampler.set_start(0)',
             (SEG_RESUME,)),
    Mutation('det-resume-restarts', "detection resume logs 'resumed at' and trains from scratch",
             DET_TRAINER, 'self.session.restore(resume_state)\n', 'pass\n', (DET_RESUME,)),
    Mutation('det-resume-replays-the-epoch', 'detection resume trains the seen batches of the epoch again',
             DET_TRAINER, 'self.sampler.set_start(start_batch * self.cfg.device_batch_size)', 'self.sampler.set_start(0)',
             (DET_RESUME,)),
    Mutation('ddp-not-wrapped', 'torchrun without DistributedDataParallel: each rank trains its own replica',
             STEP, "return nn.parallel.DistributedDataParallel(model, device_ids=", "return model or nn.parallel.DistributedDataParallel(model, device_ids=",
             (DDP,)),
    # ---- robustness scores -------------------------------------------------------------------
    Mutation('mce-divisor', 'mCE: corruption errors divided by the clean AlexNet error instead of its error on c',
             ROBUST, 'ce=100.0 * error / ref.mce_errors[c])', 'ce=100.0 * error / ref.clean_error)',
             ('tests/test_robustness.py',)),
    Mutation('mce-mean-over-15', 'mCE: averaged over all 15 corruptions even when some are missing',
             ROBUST, 'mce = sum(s.ce for s in scores.values()) / len(scores) if scores else None',
             'mce = sum(s.ce for s in scores.values()) / len(CORRUPTIONS) if scores else None',
             ('tests/test_robustness.py',)),
)


@dataclass
class Result:
    name: str
    what: str
    status: str                  # caught | SURVIVED | error | n/a (the code it mutates does not run on this CPU)
    seconds: float
    tests: List[str] = field(default_factory=list)
    detail: str = ''


def copy_repository(dest: Path) -> None:
    """The files git knows (tracked, and untracked ones that are not ignored), nothing else."""
    out = subprocess.run(['git', '-C', str(REPO), 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                         capture_output=True, check=True).stdout.decode()
    for rel in filter(None, out.split('\0')):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _env(copy: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(copy / 'src'), env.get('PYTHONPATH')]))
    env['PYTHONDONTWRITEBYTECODE'] = '1'
    return env


def check_import(copy: Path) -> None:
    code = 'import polynext, sys; sys.stdout.write(polynext.__file__)'
    got = subprocess.run([sys.executable, '-c', code], cwd=copy, env=_env(copy), capture_output=True, text=True)
    if got.returncode or not Path(got.stdout).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f'error: the copy in {copy} does not import its own polynext ({got.stdout or got.stderr})')


def run_tests(copy: Path, tests: Sequence[str], pytest_args: Sequence[str]) -> Tuple[int, str]:
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', '-p', 'no:randomly', *pytest_args,
           *tests]
    proc = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return proc.returncode, lines[-1] if lines else ''


def apply(copy: Path, m: Mutation) -> str:
    """Write the mutation into the copy; returns the original text (to restore)."""
    target = copy / m.path
    text = target.read_text()
    n = text.count(m.find)
    if n != 1:
        raise ValueError(f'{m.name}: the text to mutate occurs {n} times in {m.path} (expected once); '
                         f'update the mutation to the current source')
    target.write_text(text.replace(m.find, m.replace))
    return text


def stale(mutations: Sequence[Mutation], root: Path = REPO) -> List[str]:
    """Mutations whose text no longer occurs exactly once (the source moved on)."""
    problems = []
    for m in mutations:
        text = (root / m.path).read_text()
        if text.count(m.find) != 1:
            problems.append(f'{m.name}: {m.find!r} occurs {text.count(m.find)} times in {m.path}')
        for t in m.tests:
            path, _, func = t.partition('::')
            if not (root / path).exists():
                problems.append(f'{m.name}: no test file {path}')
            elif func and f'def {func}(' not in (root / path).read_text():
                problems.append(f'{m.name}: no test {func} in {path}')
    return problems


def cpu_flags() -> frozenset:
    """This CPU's instruction flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open('/proc/cpuinfo') as f:
            return frozenset(next((ln.split(':', 1)[1].split() for ln in f if ln.startswith('flags')), []))
    except OSError:
        return frozenset()


def missing(m: Mutation, flags: frozenset) -> List[str]:
    """The flags the mutated code needs that this CPU lacks."""
    return [f for f in m.needs if f not in flags]


def run_one(copy: Path, m: Mutation, pytest_args: Sequence[str]) -> Result:
    start = time.perf_counter()
    original = apply(copy, m)
    try:
        code, last = run_tests(copy, m.tests, pytest_args)
    finally:
        (copy / m.path).write_text(original)
    # pytest: 1 = tests failed; with xdist, -x ends the session as 'interrupted' (2) after the first failure
    failed = code == 1 or (code == 2 and re.search(r'\b\d+ failed\b', last) is not None)
    status = 'SURVIVED' if code == 0 else 'caught' if failed else 'error'
    return Result(m.name, m.what, status, time.perf_counter() - start, list(m.tests), last)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--list', action='store_true', help='list the mutations and exit')
    p.add_argument('--only', nargs='+', metavar='NAME', help='run only these mutations')
    p.add_argument('--jobs', type=int, default=1, help='mutations run at the same time (one copy each)')
    p.add_argument('--json', type=Path, help='write the results here')
    p.add_argument('--skip-baseline', action='store_true',
                   help='do not run the tests on the unmodified copy first (only when they were just run green)')
    p.add_argument('--pytest-args', default='-n 2',
                   help="pytest arguments for every run (default '-n 2': two workers, one torch thread each)")
    args = p.parse_args(argv)

    mutations = list(MUTATIONS)
    if args.only:
        known = {m.name for m in MUTATIONS}
        unknown = [n for n in args.only if n not in known]
        if unknown:
            p.error(f'unknown mutation {unknown[0]!r}; see --list')
        mutations = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in mutations:
            print(f'{m.name:34s} {m.what}\n{"":34s} {m.path}; tests: {" ".join(m.tests)}')
        return 0
    problems = stale(mutations)
    if problems:
        print('error: stale mutations (the source changed):\n  ' + '\n  '.join(problems), file=sys.stderr)
        return 2
    pytest_args = args.pytest_args.split()
    flags = cpu_flags()
    not_here = [Result(m.name, m.what, 'n/a', 0.0, list(m.tests), f'needs {", ".join(missing(m, flags))}')
                for m in mutations if missing(m, flags)]
    for r in not_here:
        print(f'n/a      {r.name:34s} {r.detail}: the code it mutates does not run on this CPU', flush=True)
    mutations = [m for m in mutations if not missing(m, flags)]
    if not mutations:
        print('error: none of the selected mutations can run on this CPU', file=sys.stderr)
        return 2
    jobs = max(1, min(args.jobs, len(mutations)))

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='polynext-mutants-') as tmp:
        copies = [Path(tmp) / f'copy{i}' for i in range(jobs)]
        for c in copies:
            copy_repository(c)
        check_import(copies[0])
        baseline_tests = sorted({t for m in mutations for t in m.tests})
        if not args.skip_baseline:
            print(f'baseline: {len(baseline_tests)} test file(s) on the unmodified copy ...', flush=True)
            code, last = run_tests(copies[0], baseline_tests, pytest_args)
            if code != 0:
                print(f'error: the tests fail without any mutation ({last}); fix them first', file=sys.stderr)
                return 2
            print(f'baseline: {last}', flush=True)

        results: List[Optional[Result]] = [None] * len(mutations)
        free = list(copies)

        def work(i: int) -> None:
            c = free.pop()
            try:
                results[i] = run_one(c, mutations[i], pytest_args)
            finally:
                free.append(c)
            r = results[i]
            print(f'{r.status:8s} {r.name:34s} {r.seconds:6.1f} s  {r.what}', flush=True)

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(work, range(len(mutations))))

    done = [r for r in results if r is not None]
    survived = [r for r in done if r.status == 'SURVIVED']
    errors = [r for r in done if r.status == 'error']
    total = time.perf_counter() - t0
    print(f'\n{len(done) - len(survived) - len(errors)} of {len(done)} mutations caught, {len(survived)} survived, '
          f'{len(errors)} errors; {total:.0f} s' + (f'; {len(not_here)} not run (their code needs another CPU)'
                                                    if not_here else ''))
    for r in survived:
        print(f'  SURVIVED {r.name}: {r.what} (tests: {" ".join(r.tests)})')
    for r in errors:
        print(f'  error    {r.name}: {r.detail}')
    if args.json:
        args.json.write_text(json.dumps(dict(seconds=total, results=[asdict(r) for r in done + not_here]), indent=1))
    return 1 if survived or errors else 0


if __name__ == '__main__':
    sys.exit(main())
