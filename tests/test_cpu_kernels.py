"""ops.cpu_kernels: the hand-written CPU kernels compute what PyTorch's operators compute, in every code path
they have (AVX-512 with and without BF16 instructions, portable loops), and the models take them where they apply:
the channel LayerNorm (ops.channel_norm: F.layer_norm, + the residual, of the product of two halves; at inference,
and in fp32 and bf16-autocast training with its backward), the polynomial attention's weights (ops.poly_attention:
bf16 inference; fp32 and bf16 training, forward and backward) and PolyConv's flip product (ops.flip_product)."""
import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import polynext  # noqa: F401  (registers the models)
from polynext.ops import channel_norm as cn
from polynext.ops import cpu_kernels as ck
from polynext.ops import flip_product as fp
from polynext.ops.fused import fusion

from conftest import subprocess_env

pa = importlib.import_module('polynext.ops.poly_attention')   # (polynext.ops.poly_attention is also a function)

HAS_CC = ck.compiler() is not None
needs_cc = pytest.mark.skipif(not HAS_CC, reason='no C compiler on this machine')
AVX512 = 'avx512f' in open('/proc/cpuinfo').read() if os.path.exists('/proc/cpuinfo') else False
AVX512_BF16 = AVX512 and 'avx512_bf16' in open('/proc/cpuinfo').read()
#: AVX2 with FMA (x86-64-v3): the kernels with an AVX2 form (PolyConv's depthwise core) serve this CPU
AVX2 = os.path.exists('/proc/cpuinfo') and {'avx2', 'fma'} <= set(open('/proc/cpuinfo').read().split())


def _case(rows, c, dtype, bias, residual, seed=0, product=False):
    """x: rows x C (with ``product`` rows x 2C, the two halves multiplied), weight, bias, residual."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, 2 * c if product else c, generator=gen) * 3 + 1.5).to(dtype)
    w = (torch.randn(c, generator=gen) * 0.5 + 1).to(dtype)
    b = torch.randn(c, generator=gen).to(dtype) if bias else None
    r = torch.randn(rows, c, generator=gen).to(dtype) if residual else None
    return x, w, b, r


def _reference(x, w, b, r, eps=1e-5, product=False):
    """float32 arithmetic on the same (possibly bf16) values: what the kernel computes before its one rounding."""
    x = x.float()
    if product:
        x = x[:, :x.shape[1] // 2] * x[:, x.shape[1] // 2:]
    y = F.layer_norm(x, (x.shape[-1],), w.float(), None if b is None else b.float(), eps)
    return y if r is None else y + r.float()


def _check(y, x, w, b, r, product=False):
    ref = _reference(x, w, b, r, product=product)
    if x.dtype == torch.float32:
        assert (y - ref).abs().max() <= 2e-6 * max(1.0, ref.abs().max().item())
    else:   # one rounding of the float32 result to bf16 (8 significant bits): half an ulp, and float32's own error
        assert y.dtype == torch.bfloat16
        assert ((y.float() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-5).all()


@needs_cc
def test_the_kernel_is_built_and_loaded_here():
    info = ck.kernel_info()
    assert info['available'] and os.path.isfile(info['path'])
    assert info['code'] == ('avx512' if AVX512 else 'avx2' if AVX2 else 'portable')
    from polynext.bench import environment   # every benchmark's JSON says which code ran
    assert environment(torch.device('cpu'))['cpu_kernels'] == info['code'] + ', OpenMP'
    # it shares torch's OpenMP runtime: loading it maps no other one (a fresh process: other packages, such as
    # scikit-learn, bring their own under another name)
    code = ('import torch, polynext.ops.cpu_kernels as ck\n'
            'maps = lambda: {l.split()[-1] for l in open("/proc/self/maps") if "gomp" in l or "iomp" in l}\n'
            'before = maps(); assert ck.kernel_available(); print(sorted(maps() - before), len(before))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=subprocess_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == '[]'


@needs_cc
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('c', [1, 15, 16, 17, 33, 72, 100, 768])
def test_kernel_equals_layer_norm(dtype, c, monkeypatch):
    """Every channel count (AVX-512: full 16-lane vectors, the 32-wide unrolled part, masked tails), with and
    without bias and residual, out of place and in place, and of the product of two halves (PolyMLP)."""
    monkeypatch.setattr(cn, 'MIN_NUMEL', 0)
    for bias in (False, True):
        for residual in (False, True):
            x, w, b, r = _case(257, c, dtype, bias, residual)
            with torch.inference_mode():
                assert cn.applies(x, w, b, r)
                y = cn.channel_layer_norm(x, (c,), w, b, 1e-5, residual=r)
                _check(y, x, w, b, r)
                x2 = x.clone()
                y2 = cn.channel_layer_norm(x2, (c,), w, b, 1e-5, residual=r, inplace=True)
                assert y2.data_ptr() == x2.data_ptr() and torch.equal(y2, y)
                x, w, b, r = _case(257, c, dtype, bias, residual, product=True)
                y = cn.channel_layer_norm(x, (c,), w, b, 1e-5, residual=r, product=True)
                assert y.shape == (257, c)
                _check(y, x, w, b, r, product=True)
                with ck.kernels(False):   # PyTorch's form: the product rounded to bf16 first
                    y_torch = cn.channel_layer_norm(x, (c,), w, b, 1e-5, residual=r, product=True)
                _check(y_torch.to(x.dtype) if dtype == torch.float32 else y, x, w, b, r, product=True)


@needs_cc
@pytest.mark.parametrize('march', ['x86-64-v2', 'skylake-avx512'])
def test_every_code_path_of_the_kernel(march, tmp_path):
    """The portable loops (compiled for a CPU without AVX-512) and the AVX-512 path without BF16 instructions
    (its rounding by integer arithmetic, NaN kept quiet) give the values of the kernel this machine runs."""
    if march == 'skylake-avx512' and not AVX512:
        pytest.skip('this CPU has no AVX-512')
    if not AVX512 and march != 'x86-64-v2' or os.uname().machine != 'x86_64':
        pytest.skip('x86-64 variants')
    lib = ck.load(ck.build(ck.compiler(), False, march=march, folder=tmp_path), False)
    assert lib.polynext_cpu_kernels_code().decode() == ('portable' if march == 'x86-64-v2' else 'avx512')
    for dtype in (torch.float32, torch.bfloat16):
        for c, product in ((7, False), (16, True), (72, False), (129, True)):
            x, w, b, r = _case(65, c, dtype, True, True, seed=c, product=product)
            y = torch.empty(65, c, dtype=dtype)
            cn._run(x, w, b, r, y, 1e-5, lib=lib, product=product)
            _check(y, x, w, b, r, product=product)
            y_here = torch.empty_like(y)
            cn._run(x, w, b, r, y_here, 1e-5, product=product)
            if dtype == torch.float32:
                assert (y - y_here).abs().max() <= 2e-6 * y_here.abs().max()
            else:   # the same float32 values up to summation order, rounded once: at most one bf16 ulp apart
                assert ((y.float() - y_here.float()).abs() <= 2 ** -7 * y_here.float().abs() + 1e-6).all()
    # NaN in a row: that row is NaN (a quiet NaN in bf16), the others untouched
    x, w, b, r = _case(4, 20, torch.bfloat16, False, False)
    x[1, 3] = float('nan')
    y = torch.empty_like(x)
    cn._run(x, w, b, r, y, 1e-5, lib=lib)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2, 3]]).any()


@needs_cc
def test_the_library_is_built_once_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv('POLYNEXT_CACHE_DIR', str(tmp_path))
    path = ck.build(ck.compiler(), False)
    assert path.parent == tmp_path / 'kernels' and path.is_file()
    mtime = path.stat().st_mtime_ns
    assert ck.build(ck.compiler(), False) == path and path.stat().st_mtime_ns == mtime   # reused, not rebuilt
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]   # no temporary file left
    # a compiler that fails: an error naming it, and nothing left behind
    bad = tmp_path / 'badcc'
    bad.write_text('#!/bin/sh\necho "cc: fatal error: broken" >&2\nexit 1\n')
    bad.chmod(0o755)
    with pytest.raises(RuntimeError, match='badcc failed: cc: fatal error: broken'):
        ck.build(str(bad), False, folder=tmp_path / 'other')
    assert list((tmp_path / 'other').iterdir()) == []


def test_without_a_compiler_it_is_pytorchs_layer_norm(monkeypatch):
    monkeypatch.setattr(ck, 'compiler', lambda: None)
    monkeypatch.setattr(cn, 'MIN_NUMEL', 0)
    ck.library.cache_clear()
    try:
        x, w, b, r = _case(64, 24, torch.float32, True, True)
        with pytest.warns(UserWarning, match='no C compiler'), torch.inference_mode():
            y = cn.channel_layer_norm(x, (24,), w, b, 1e-5, residual=r)
        assert torch.equal(y, F.layer_norm(x, (24,), w, b, 1e-5) + r)
        assert not ck.kernel_available()
        q, k, v = (torch.randn(1, 2, 300, 8) for _ in range(3))
        with torch.inference_mode():   # the attention's torch operators
            assert (pa.poly_attention(q, k, v) - pa.poly_attention_reference(q, k, v)).abs().max() < 1e-5
    finally:
        ck.library.cache_clear()


def _count_runs(monkeypatch):
    calls = []
    real = cn._run

    def spy(x, weight, bias, residual, out, eps, lib=None, product=False, stats=None):
        calls.append((tuple(x.shape), residual is not None, out.data_ptr() == x.data_ptr(), product))
        return real(x, weight, bias, residual, out, eps, lib, product, stats)
    monkeypatch.setattr(cn, '_run', spy)
    return calls


@needs_cc
@pytest.mark.parametrize('name', ['cpolynext_t', 'apolynext_t'])
def test_models_take_the_kernel_on_the_cpu(name, monkeypatch):
    """Every channel LayerNorm of a CPU inference runs the kernel (PolyConv's closing norm with its residual,
    in place), logits within 2e-5 of PyTorch's norms in fp32 and within bf16's rounding in bf16; so does every
    one of an fp32 training step (out of place: autograd keeps the input); ``fusion(False)`` and
    ``kernels(False)`` do not take it. (Without the 1x1 kernel's norm epilogue, which runs the same row functions
    inside ``ops.narrow_pointwise``: ``tests/test_narrow_pointwise.py``.)"""
    monkeypatch.setattr(ck.pointwise_norm, 'on', False)
    monkeypatch.setattr(ck.fused_mlp, 'on', False)
    monkeypatch.setattr(cn, 'MIN_NUMEL', 0)
    monkeypatch.setattr(cn, 'TRAIN_PLAIN_MIN_NUMEL', 0)
    calls = _count_runs(monkeypatch)
    torch.manual_seed(0)
    model = timm.create_model(name, init_channels=16, num_classes=10, cells=(1, 1, 1, 1)).eval()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        with ck.kernels(False):
            ref = model(x)
        assert calls == []
        out = model(x)
        n = len(calls)
        n_norms = sum(isinstance(m, polynext.models.polynext.LayerNorm2d) for m in model.modules())
        assert n == n_norms
        assert any(res and inplace for _, res, inplace, _ in calls)   # both have PolyConv stages
        assert sum(product for *_, product in calls) == sum(isinstance(m, polynext.models.polynext.PolyMLP)
                                                            for m in model.modules())
        assert (out - ref).abs().max() < 2e-5
        with fusion(False):
            model(x)
        assert len(calls) == n
        model_bf16 = timm.create_model(name, init_channels=16, num_classes=10, cells=(1, 1, 1, 1)).eval()
        model_bf16.load_state_dict(model.state_dict())
        model_bf16 = model_bf16.to(torch.bfloat16)
        out16 = model_bf16(x.bfloat16())
        assert len(calls) == 2 * n
        with ck.kernels(False):
            ref16 = model_bf16(x.bfloat16())
        rel = ((out16.float() - ref16.float()).norm() / ref16.float().norm()).item()
        assert rel < 0.05
    model.train()
    model(x).sum().backward()
    assert len(calls) == 3 * n and not any(inplace for _, _, inplace, _ in calls[2 * n:])
    # a model built with drop path (as the training recipes build it) takes every kernel at inference too
    dropped = timm.create_model(name, init_channels=16, num_classes=10, cells=(1, 1, 1, 1), drop_path_rate=0.2)
    dropped.load_state_dict(model.state_dict())
    with torch.inference_mode():
        assert (dropped.eval()(x) - ref).abs().max() < 2e-5
    assert len(calls) == 4 * n


@needs_cc
def test_the_profiler_sees_the_kernels_in_their_classes(monkeypatch):
    from polynext.perf import profile_model
    monkeypatch.setattr(cn, 'MIN_NUMEL', 0)
    torch.manual_seed(0)
    model = timm.create_model('apolynext_t', init_channels=8, num_classes=5, cells=(1, 1, 1, 1))
    prof = profile_model(model, mode='infer', batch_size=2, img_size=64, runs=1, warmup=1, dtype='bf16')
    ops = {(cls, op) for cls, op, _ in prof.ops}
    # bf16 attention: the fused kernel where it is built (AVX-512 BF16), else the weights kernel of the tiled path
    attention = 'polynext::poly_attention_fused' if torch.bfloat16 in ck.library().attention_fused else \
        'polynext::poly_rows_'
    # PolyConv's depthwise core: one kernel where it is built (AVX-512), a depthwise convolution with its MACs
    core = {('depthwise conv', 'polynext::polyconv_dw')} if ck.library().polyconv_dw else set()
    assert {('norms', 'polynext::channel_norm_'), ('norms', 'polynext::channel_norm'), ('attention', attention)} | \
        core <= ops
    assert {cls for cls, op in ops if op.startswith('polynext::')} == {'norms', 'attention'} | {c for c, _ in core}
    if core:   # stage 0: 2 x 8 channels at 16x16, a 3x3 coarse kernel: three 3x3 convolutions' MACs a call
        stage0 = prof.ops[('depthwise conv', 'polynext::polyconv_dw', '2x8x16x16')]
        assert stage0.macs == stage0.calls * 2 * 8 * 16 * 16 * 27 > 0
    assert prof.classes['norms'].bytes > 0
    torch.manual_seed(0)
    model = timm.create_model('apolynext_t', init_channels=8, num_classes=5, cells=(1, 1, 1, 1))
    monkeypatch.setattr(cn, 'TRAIN_PLAIN_MIN_NUMEL', 0)
    prof = profile_model(model, mode='train', batch_size=2, img_size=64, runs=1, warmup=1)   # fp32 training
    ops = {(cls, op) for cls, op, _ in prof.ops}
    assert {('norms', 'polynext::channel_norm_stats'), ('norms', '_ChannelNormFunctionBackward')} <= ops
    assert not any(op in ('aten::layer_norm', 'aten::native_layer_norm') for _, op, _ in prof.ops)


#: the kernels built for another x86-64 variant, once per test process (a build takes about 10 s): march → (folder,
#: library); the folders go when the process ends
_VARIANTS = {}


def _library_for(march):
    """This process's library (``march`` None), or the kernels built for another x86-64 variant (the portable loops:
    x86-64-v2; AVX2 with FMA: x86-64-v3; AVX-512 without BF16 instructions: skylake-avx512), single-threaded."""
    if march is None:
        return ck.library()
    if os.uname().machine != 'x86_64' or (march == 'skylake-avx512' and not AVX512) or (march == 'x86-64-v3'
                                                                                       and not AVX2):
        pytest.skip('an x86-64 variant this CPU cannot run')
    if march not in _VARIANTS:
        folder = tempfile.TemporaryDirectory(prefix=f'polynext-kernels-{march}-')
        _VARIANTS[march] = folder, ck.load(ck.build(ck.compiler(), False, march=march, folder=Path(folder.name)), False)
    return _VARIANTS[march][1]


def _poly_rows_reference(s, power, eps=1e-12):
    p = (s.double() + 1) ** power
    return p / p.sum(-1, keepdim=True).clamp_min(eps)


@needs_cc
@pytest.mark.parametrize('march', [None, 'x86-64-v2', 'skylake-avx512'])
def test_attention_rows_kernel_in_every_code_path(march, tmp_path):
    """(S + 1)^p / row sum, p = 2 and 4, rows of every length (full vectors, the unrolled part, masked tails
    whose lanes must not count), in place, against float64; a NaN score makes its row NaN only."""
    lib = _library_for(march)
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        fn = lib.polynext_poly_rows_f32 if dtype == torch.float32 else lib.polynext_poly_rows_bf16
        for n in (1, 15, 17, 49, 196):
            for power in (2, 4):
                s = (torch.randn(37, n, generator=gen) * 0.7).to(dtype)
                ref = _poly_rows_reference(s, power)
                a, rowsum = s.clone(), torch.empty(37)
                assert fn(a.data_ptr(), a.data_ptr(), rowsum.data_ptr(), 37, n, power, 1e-12, 2, 1) == 0
                assert torch.allclose(rowsum.double(), ((s.double() + 1) ** power).sum(-1), rtol=1e-5)
                if dtype == torch.float32:
                    assert (a.double() - ref).abs().max() < 1e-6
                else:   # float32 arithmetic, one rounding
                    assert ((a.double() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-12).all()
        assert fn(a.data_ptr(), a.data_ptr(), None, 37, n, 3, 1e-12, 2, 1) == 1   # an odd power: refused
        s = torch.rand(3, 20, generator=gen).to(dtype)
        s[1, 5] = float('nan')
        fn(s.data_ptr(), s.data_ptr(), None, 3, 20, 4, 1e-12, 2, 1)
        assert torch.isnan(s[1]).all() and not torch.isnan(s[[0, 2]]).any()


@needs_cc
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_poly_attention_takes_the_kernel_at_inference_only(dtype, monkeypatch):
    """The tiled path (the fused kernels off, as on a CPU without AVX-512 BF16) takes the weights kernel at bf16
    inference only."""
    monkeypatch.setattr(ck.fused_attention, 'on', False)
    calls = []
    real = ck._poly_rows
    monkeypatch.setattr(ck, '_poly_rows', lambda s, p, e: calls.append(s.shape) or real(s, p, e))
    gen = torch.Generator().manual_seed(0)
    q, k, v = ((torch.randn(2, 3, 196, 32, generator=gen) * 0.3).to(dtype) for _ in range(3))
    ref = pa.poly_attention_reference(q.double(), k.double(), v.double())
    with torch.inference_mode():
        out = pa.poly_attention(q, k, v, chunk_bytes=2 * 3 * 100 * 196 * 4)   # two chunks of query rows
        # bf16 only: in fp32 PyTorch's path (normalised after A @ V) is as fast; the heads flattened
        assert calls == ([(6, 100, 196), (6, 96, 196)] if dtype == torch.bfloat16 else [])
        n = len(calls)
        with fusion(False):
            torch_ops = pa.poly_attention(q, k, v)
        assert len(calls) == n
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert (out.double() - ref).abs().max() < tol and (torch_ops.double() - ref).abs().max() < tol
    q.requires_grad_()
    pa.poly_attention(q, k, v).sum().backward()   # training: the autograd function and its own kernels
    assert len(calls) == n


def _fused_reference(q, k, v, power, eps=1e-12):
    p = (q.double() @ k.double().transpose(-1, -2) + 1) ** power
    r = p.sum(-1, keepdim=True).clamp_min(eps)
    return (p @ v.double()) / r, r


def _special_rows(fn, dtype, gen):
    """A fused attention kernel ``fn`` on two heads of 20 queries and 40 keys (head dimension 32, power 4) in
    ``dtype``: a row whose every score is exactly -1 (every weight 0: its sum clamped to eps, output 0) and a NaN
    query (its own row NaN only); head dimension 24 refused. Returns the heads and the output."""
    q, k, v = torch.randn(2, 20, 32, generator=gen), torch.randn(2, 40, 32, generator=gen), torch.randn(2, 40, 32)
    q[0, 4] = 0.0
    q[0, 4, 0] = 1.0
    k[0, :, 0] = -1.0             # row 4 of head 0: every score exactly -1, every weight 0
    q[1, 11, 3] = float('nan')
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    o, r = torch.empty_like(q), torch.empty(2, 20, 1)
    assert fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), r.data_ptr(), 2, 20, 40, 32, 4, 1e-12, 2) == 0
    assert (o[0, 4] == 0).all() and r[0, 4].item() == pytest.approx(1e-12)
    assert torch.isnan(o[1, 11]).all() and not torch.isnan(o[1, :11]).any() and not torch.isnan(o[0]).any()
    assert fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), None, 2, 20, 40, 24, 4, 1e-12, 2) == 1
    return q, k, v, o


@needs_cc
@pytest.mark.parametrize('march', [None, 'x86-64-v2', 'skylake-avx512'])
def test_fused_attention_kernel_in_every_code_path(march, tmp_path):
    """polynext_poly_attention_f32 against float64: head dimensions 16 and 32, powers 2 and 4, key counts that
    fill whole 32-key blocks, end on a 16-key block or on a masked tail whose lanes must weigh nothing, query counts
    that leave a partial 8-row block and a partial 64-query item, fewer queries than keys; a row whose scores are all
    exactly -1 (its sum clamped to eps: output 0) and a NaN query (its row NaN only). The portable build refuses
    it (returns 1, writes nothing): PyTorch's path serves it there."""
    lib = _library_for(march)
    gen = torch.Generator().manual_seed(0)
    fused = bool(lib.polynext_poly_attention_fused())
    assert (torch.float32 in lib.attention_fused) == fused   # (read once at load)
    assert fused == (AVX512 if march is None else march != 'x86-64-v2')
    for heads, n, m, d in [(3, 196, 196, 32), (2, 49, 49, 32), (2, 70, 37, 16), (1, 1, 1, 32), (2, 5, 300, 32),
                           (1, 130, 48, 16), (1, 9, 17, 32)]:
        for power in (2, 4):
            q, k = (torch.randn(heads, x, d, generator=gen) * 0.25 for x in (n, m))
            v = torch.randn(heads, m, d, generator=gen)
            o, r = torch.full_like(q, 7.0), torch.full((heads, n, 1), 7.0)
            status = lib.polynext_poly_attention_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(),
                                                     r.data_ptr(), heads, n, m, d, power, 1e-12, 2)
            if not fused:
                assert status == 1 and (o == 7).all() and (r == 7).all()
                continue
            assert status == 0
            ref, ref_r = _fused_reference(q, k, v, power)
            assert (o.double() - ref).abs().max() <= 2e-6 * ref.abs().max(), (heads, n, m, d, power)
            assert torch.allclose(r.double(), ref_r, rtol=1e-5)
    if not fused:
        return
    q, k, v, o = _special_rows(lib.polynext_poly_attention_f32, torch.float32, gen)
    assert lib.polynext_poly_attention_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), None,
                                           2, 20, 40, 32, 3, 1e-12, 2) == 1   # power 3: refused


@needs_cc
@pytest.mark.parametrize('march', [None, 'x86-64-v2', 'skylake-avx512'])
def test_fused_attention_backward_kernel_in_every_code_path(march, tmp_path):
    """polynext_poly_attention_backward_f32 from the forward kernel's output and row sums: dQ, dK and dV against
    float64 autograd of the paper's expression, at the forward test's shapes (masked key tails, partial row blocks,
    fewer queries than keys, several heads a thread); the portable build refuses it (returns 1, writes nothing)."""
    lib = _library_for(march)
    gen = torch.Generator().manual_seed(1)
    fused = bool(lib.polynext_poly_attention_fused())
    for heads, n, m, d in [(3, 196, 196, 32), (2, 49, 49, 32), (2, 70, 37, 16), (1, 1, 1, 32), (2, 5, 300, 32),
                           (1, 9, 17, 32), (5, 16, 16, 16)]:
        for power in (2, 4):
            q, k = (torch.randn(heads, x, d, generator=gen) * 0.25 for x in (n, m))
            v, g = torch.randn(heads, m, d, generator=gen), torch.randn(heads, n, d, generator=gen)
            o, r = torch.empty_like(q), torch.empty(heads, n, 1)
            grads = [torch.full_like(t, 7.0) for t in (q, k, v)]
            status = lib.polynext_poly_attention_backward_f32(
                q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), g.data_ptr(), r.data_ptr(),
                *(t.data_ptr() for t in grads), heads, n, m, d, power, 2)
            if not fused:
                assert status == 1 and all((t == 7).all() for t in grads)
                continue
            assert lib.polynext_poly_attention_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(),
                                                   r.data_ptr(), heads, n, m, d, power, 1e-12, 2) == 0
            assert lib.polynext_poly_attention_backward_f32(
                q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), g.data_ptr(), r.data_ptr(),
                *(t.data_ptr() for t in grads), heads, n, m, d, power, 2) == 0
            leaves = [t.double().requires_grad_() for t in (q, k, v)]
            want = torch.autograd.grad(_fused_reference(*leaves, power)[0], leaves, g.double())
            for got, ref in zip(grads, want):   # (one key: dQ is 0 in real arithmetic, float32's cancellation not)
                assert (got.double() - ref).abs().max() <= 5e-6 * max(1.0, ref.abs().max()), (heads, n, m, d, power)
    if fused:
        z = torch.zeros(1, 4, 24)
        assert lib.polynext_poly_attention_backward_f32(*(z.data_ptr() for _ in range(9)), 1, 4, 4, 24, 4, 2) == 1


@needs_cc
@pytest.mark.parametrize('march', [None, 'x86-64-v2', 'skylake-avx512'])
def test_fused_bf16_attention_kernels_in_every_code_path(march, tmp_path):
    """polynext_poly_attention_bf16 and its backward (AVX-512 BF16 pair dot products) against float64 on the same
    bf16 values, at the float32 tests' shapes (masked key tails, odd key counts whose last pair is half padding,
    partial row blocks and row pairs, fewer queries than keys, D 16 and 32, p 2 and 4): O within bf16's rounding of
    the largest output (PyTorch's bf16 path: the same), the row sums (float32) within 1e-5, the gradients within
    bf16's rounding; a row whose scores are all exactly -1 gives 0, a NaN query its own row NaN only. Builds
    without AVX-512 BF16 (x86-64-v2, skylake-avx512) refuse both calls and write nothing."""
    lib = _library_for(march)
    gen = torch.Generator().manual_seed(2)
    built = bool(lib.polynext_poly_attention_fused_bf16())
    assert (torch.bfloat16 in lib.attention_fused) == built
    assert built == (AVX512_BF16 if march is None else False)
    for heads, n, m, d in [(3, 196, 196, 32), (2, 49, 49, 32), (2, 70, 37, 16), (1, 1, 1, 32), (2, 5, 300, 32),
                           (1, 130, 48, 16), (1, 9, 17, 32), (5, 16, 16, 16)]:
        for power in (2, 4):
            q, k = (torch.randn(heads, x, d, generator=gen).mul(0.25).bfloat16() for x in (n, m))
            v, g = (torch.randn(heads, x, d, generator=gen).bfloat16() for x in (m, n))
            o, r = torch.full_like(q, 7.0), torch.full((heads, n, 1), 7.0)
            grads = [torch.full_like(t, 7.0) for t in (q, k, v)]
            status = lib.polynext_poly_attention_bf16(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(),
                                                      r.data_ptr(), heads, n, m, d, power, 1e-12, 2)
            status_bwd = lib.polynext_poly_attention_backward_bf16(
                q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), g.data_ptr(), r.data_ptr(),
                *(t.data_ptr() for t in grads), heads, n, m, d, power, 2)
            if not built:
                assert status == status_bwd == 1 and (o == 7).all() and (r == 7).all()
                assert all((t == 7).all() for t in grads)
                continue
            assert status == status_bwd == 0
            ref, ref_r = _fused_reference(q, k, v, power)
            assert (o.double() - ref).abs().max() <= 8e-3 * ref.abs().max(), (heads, n, m, d, power)
            assert torch.allclose(r.double(), ref_r, rtol=1e-5)
            leaves = [t.double().requires_grad_() for t in (q, k, v)]
            want = torch.autograd.grad(_fused_reference(*leaves, power)[0], leaves, g.double())
            for got, w in zip(grads, want):   # (one key: dQ, dK are 0 in real arithmetic; O rounded to bf16 is not V)
                bound = 1.2e-2 * w.abs().max() if m > 1 else 2e-2
                assert (got.double() - w).abs().max() <= bound, (heads, n, m, d, power)
    if not built:
        return
    _special_rows(lib.polynext_poly_attention_bf16, torch.bfloat16, gen)
    z = torch.zeros(1, 4, 32, dtype=torch.bfloat16)
    assert lib.polynext_poly_attention_backward_bf16(*(z.data_ptr() for _ in range(9)), 1, 4, 4, 32, 3, 2) == 1


@needs_cc
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_poly_attention_takes_the_fused_kernel(dtype, monkeypatch):
    """In float32 (AVX-512) and bfloat16 (AVX-512 BF16), at inference and in training forward and backward, the
    attention is the fused kernels where they are built, the values and gradients those of float64 to the dtype's
    rounding; fusions off, kernels off and the fused attention off keep PyTorch's path, mixed dtypes and odd powers
    are refused."""
    calls = []
    real, real_bwd = ck._poly_attention_fused, ck._poly_attention_backward_fused
    monkeypatch.setattr(ck, '_poly_attention_fused', lambda q, *a: calls.append(tuple(q.shape)) or real(q, *a))
    monkeypatch.setattr(ck, '_poly_attention_backward_fused',
                        lambda q, *a: calls.append(('backward',) + tuple(q.shape)) or real_bwd(q, *a))
    gen = torch.Generator().manual_seed(0)
    q, k, v = ((torch.randn(2, 3, 49, 32, generator=gen) * 0.3).to(dtype) for _ in range(3))
    expected = [(6, 49, 32)] if dtype in ck.library().attention_fused else []
    assert (dtype in ck.library().attention_fused) == (AVX512_BF16 if dtype == torch.bfloat16 else AVX512)
    ref = pa.poly_attention_reference(q.double(), k.double(), v.double())
    with torch.inference_mode():
        out = pa.poly_attention(q, k, v)
        assert calls == expected
        with fusion(False):
            pa.poly_attention(q, k, v)
        with ck.kernels(False):
            pa.poly_attention(q, k, v)
        with ck.fused_attention(False):
            pa.poly_attention(q, k, v)
        assert calls == expected
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    assert not ck.fused_attention_available(q, v, 4, k=k.to(other)) and not ck.fused_attention_available(q, v, 3, k=k)
    tol, gtol = (1e-6, 1e-5) if dtype == torch.float32 else (8e-3, 1.2e-2)
    assert (out.double() - ref).abs().max() < tol * ref.abs().max()
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    g = torch.randn(2, 3, 49, 32, generator=gen).to(dtype)
    grads = torch.autograd.grad(pa.poly_attention(qg, kg, vg), (qg, kg, vg), g)
    assert calls == expected * 2 + [('backward',) + c for c in expected]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(pa.poly_attention_reference(q64, k64, v64), (q64, k64, v64), g.double())
    for a, b in zip(grads, want):
        assert (a.double() - b).abs().max() <= gtol * b.abs().max()
    q3, k3, v3 = (t.reshape(6, 49, 32) for t in (q, k, v))
    with pytest.raises(TypeError, match='the heads need one dtype and the row sums float32'):   # refused before C
        ck.poly_attention_fused(q3, k3.to(other), v3, 4, 1e-12)
    r = torch.ones(6, 49, 1, dtype=torch.float64)
    with pytest.raises(TypeError, match=r'float64\); cast them first'):
        ck.poly_attention_backward_fused(q3, k3, v3, q3, q3, r, 4)


def _norm_grads(x, w, b, r, g, product):
    """float64 autograd of the norm (of the product of the halves), plus the residual: the output and the
    gradients of x, w, b."""
    x, w = x.double().requires_grad_(), w.double().requires_grad_()
    b = None if b is None else b.double().requires_grad_()
    c = w.shape[0]
    z = x[:, :c] * x[:, c:] if product else x
    y = F.layer_norm(z, (c,), w, b, 1e-5)
    if r is not None:
        y = y + r.double()
    y.backward(g.double())
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


def _close(a, ref, tol=2e-5):
    return (a.double() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


@needs_cc
@pytest.mark.parametrize('march', [None, 'x86-64-v2', 'skylake-avx512'])
def test_backward_kernel_in_every_code_path(march, tmp_path):
    """The training forward's saved statistics (each row's mean and 1/std) and the backward (dx, and the weight's
    and bias's gradients summed over the rows from per-thread partial sums; the product's two halves; the
    residual's gradient is the output's) against float64 autograd of F.layer_norm, at every channel count the
    vector loops treat differently, in this machine's code, the portable loops and AVX-512 without BF16."""
    lib = _library_for(march)
    for c, product, bias, residual in ((1, False, False, False), (7, False, True, True), (16, True, False, False),
                                       (33, False, True, False), (72, True, True, False), (129, False, False, True),
                                       (768, True, False, False)):
        x, w, b, r = _case(301, c, torch.float32, bias, residual, seed=c, product=product)
        g = torch.randn(301, c, generator=torch.Generator().manual_seed(c + 1))
        y = torch.empty(301, c)
        stats = torch.empty(301, 2)
        cn._run(x, w, b, r, y, 1e-5, lib=lib, product=product, stats=stats)
        z = (x[:, :c] * x[:, c:] if product else x).double()
        assert torch.allclose(stats[:, 0].double(), z.mean(1), rtol=1e-5, atol=1e-6)
        assert torch.allclose(stats[:, 1].double(), (z.var(1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5)
        dx, dw, db = cn._channel_norm_backward(g, x, w, stats, bias, product, lib=lib)
        y_ref, dx_ref, dw_ref, db_ref = _norm_grads(x, w, b, r, g, product)
        assert dx.shape == x.shape and dw.shape == (c,)
        assert _close(y, y_ref) and _close(dx, dx_ref) and _close(dw, dw_ref)
        assert (db.numel() == 0) if not bias else _close(db, db_ref)
        # bfloat16 rows and gradients with float32 parameters (bf16 autocast training): float32 arithmetic on the
        # bf16 values, each result rounded once; the parameters' gradients summed in float32
        x16, g16 = x.bfloat16(), g.bfloat16()
        r16 = None if r is None else r.bfloat16()
        y16 = torch.empty(301, c, dtype=torch.bfloat16)
        cn._run(x16, w, b, r16, y16, 1e-5, lib=lib, product=product, stats=stats)
        dx16, dw16, db16 = cn._channel_norm_backward(g16, x16, w, stats, bias, product, lib=lib)
        y_ref, dx_ref, dw_ref, db_ref = _norm_grads(x16, w, b, r16, g16, product)
        assert dx16.dtype == torch.bfloat16 and dw16.dtype == torch.float32
        assert _close(y16, y_ref, 2 ** -7) and _close(dx16, dx_ref, 2 ** -7) and _close(dw16, dw_ref)
        assert (db16.numel() == 0) if not bias else _close(db16, db_ref)
    assert lib.polynext_channel_norm_backward_f32(None, None, None, None, None, None, None, 1, 5000, 1, 0) == 1


@needs_cc
@pytest.mark.parametrize('product', [False, True])
def test_training_takes_the_kernels_with_autograd(product, monkeypatch):
    """``channel_layer_norm`` with inputs that need gradients (fp32, eager, CPU) is the kernels' autograd
    function: the gradients of x, the weight (a gated weight too: a tensor computed from a parameter), the bias
    and the residual equal float64 autograd's; fp64, bf16, ``kernels(False)``, ``torch.func`` transforms and
    tensors that need no gradient take PyTorch's path."""
    monkeypatch.setattr(cn, 'MIN_NUMEL', 0)
    monkeypatch.setattr(cn, 'TRAIN_PLAIN_MIN_NUMEL', 0)
    calls = _count_runs(monkeypatch)
    c = 40
    x, w, b, r = _case(6 * 7 * 5, c, torch.float32, True, not product, product=product)
    x = x.view(6, 7, 5, -1)
    r = None if r is None else r.view(6, 7, 5, c)
    g = torch.randn(6, 7, 5, c, generator=torch.Generator().manual_seed(3))
    gate = torch.tensor(0.7, requires_grad=True)
    xs, ws, bs = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    rs = None if r is None else r.clone().requires_grad_()
    y = cn.channel_layer_norm(xs, (c,), ws * gate, bs, 1e-5, residual=rs, product=product)
    assert type(y.grad_fn).__name__ == '_ChannelNormFunctionBackward' and len(calls) == 1
    y.backward(g)
    y_ref, dx_ref, dw_ref, db_ref = _norm_grads(x.view(-1, x.shape[-1]), w * 0.7, b, None if r is None
                                                else r.view(-1, c), g.view(-1, c), product)
    assert _close(y.view(-1, c), y_ref) and _close(xs.grad.view(-1, x.shape[-1]), dx_ref)
    assert _close(ws.grad, dw_ref * 0.7) and _close(bs.grad, db_ref)
    assert _close(gate.grad, (dw_ref * w.double()).sum())
    if rs is not None:
        assert torch.equal(rs.grad, g)
    for dtype in (torch.float64, torch.bfloat16):   # PyTorch's operators
        t = x.to(dtype).requires_grad_()
        cn.channel_layer_norm(t, (c,), w.to(dtype), b.to(dtype), 1e-5, product=product).sum().backward()
    with ck.kernels(False):
        cn.channel_layer_norm(x.clone().requires_grad_(), (c,), w, b, 1e-5, product=product).sum().backward()
    from torch.func import grad, vmap
    batched = vmap(lambda t: cn.channel_layer_norm(t, (c,), w, b, 1e-5, product=product))(x)
    assert grad(lambda t: cn.channel_layer_norm(t, (c,), w, b, 1e-5, product=product).square().sum())(x).shape \
        == x.shape
    assert _close(batched.reshape(-1, c), _norm_grads(x.view(-1, x.shape[-1]), w, b, None, g.view(-1, c), product)[0])
    assert len(calls) == 1


@needs_cc
def test_model_gradients_with_the_kernels(monkeypatch):
    """A whole fp32 training step of apolynext_t (PolyConv and PolyAttn stages, every norm and PolyConv product
    through the kernels): the loss and every parameter's gradient equal those with PyTorch's operators (float32
    rounding)."""
    monkeypatch.setattr(cn, 'MIN_NUMEL', 0)
    monkeypatch.setattr(cn, 'TRAIN_PLAIN_MIN_NUMEL', 0)
    monkeypatch.setattr(fp, 'MIN_NUMEL', 0)
    calls = []
    real = fp._flip_mul
    monkeypatch.setattr(fp, '_flip_mul', lambda a, b: calls.append(a.shape) or real(a, b))
    torch.manual_seed(0)
    model = timm.create_model('apolynext_t', init_channels=16, num_classes=10, cells=(1, 1, 1, 1))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    results = {}
    for on in (False, True):
        model.zero_grad()
        with ck.kernels(on):
            loss = model(x).square().mean()
            loss.backward()
        results[on] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
    n_conv = sum(isinstance(m, polynext.models.polynext.PolyConv) for m in model.modules())
    assert len(calls) == n_conv > 0
    assert abs(results[True][0] - results[False][0]) <= 1e-5 * abs(results[False][0])
    for n, g_ref in results[False][1].items():
        assert (results[True][1][n] - g_ref).abs().max() <= 1e-4 * max(g_ref.abs().max().item(), 1e-6), n


@needs_cc
@pytest.mark.parametrize('march', [None, 'x86-64-v2', 'skylake-avx512'])
def test_attention_training_kernels_in_every_code_path(march, tmp_path):
    """The training forward's (S + 1)^p with the row sums, unnormalised (float32) or normalised (bfloat16), the
    backward's recomputation (A over S, divided by the row sums where given, and (S + 1)^(p-1) in float32) and
    dL/dS = (dL/dA + d) (S + 1)^(p-1): bit for bit PyTorch's float32 operators on the same values (the same
    products in the same order), one rounding in bfloat16; rows of every length."""
    lib = _library_for(march)
    gen = torch.Generator().manual_seed(0)
    for dtype, suffix in ((torch.float32, 'f32'), (torch.bfloat16, 'bf16')):
        prep, ds_fn = getattr(lib, f'polynext_poly_prep_{suffix}'), getattr(lib, f'polynext_poly_ds_{suffix}')
        rows_fn = getattr(lib, f'polynext_poly_rows_{suffix}')
        for n in (1, 15, 17, 49, 196):
            for power in (2, 4):
                s = (torch.randn(37, n, generator=gen) * 0.7).to(dtype)
                p = s.float() + 1
                a_ref = (p * p) * (p * p) if power == 4 else p * p
                p3_ref = p * (p * p) if power == 4 else p
                r = torch.rand(37, 1, generator=gen) + 0.5
                for rowsum in (None, r):
                    a, p3 = s.clone(), torch.empty(37, n)
                    assert prep(a.data_ptr(), p3.data_ptr(), None if rowsum is None else rowsum.data_ptr(), 37, n,
                                power, 2) == 0
                    want = a_ref if rowsum is None else a_ref / rowsum
                    assert torch.equal(p3, p3_ref) and torch.equal(a, want.to(dtype))
                # unnormalised powers and their row sums (the training forward in float32)
                a, sums = s.clone(), torch.empty(37)
                assert rows_fn(a.data_ptr(), a.data_ptr(), sums.data_ptr(), 37, n, power, 1e-12, 2, 0) == 0
                assert torch.equal(a, a_ref.to(dtype))
                assert torch.allclose(sums, a_ref.sum(-1), rtol=1e-6)
                da = (torch.randn(37, n, generator=gen)).to(dtype)
                d = torch.randn(37, generator=gen)
                want = ((da.float() + d[:, None]) * p3_ref).to(dtype)
                assert ds_fn(da.data_ptr(), p3_ref.contiguous().data_ptr(), d.data_ptr(), 37, n, 2) == 0
                assert torch.equal(da, want)
        assert prep(a.data_ptr(), p3.data_ptr(), None, 37, n, 3, 2) == 1   # an odd power: refused


@needs_cc
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_poly_attention_training_takes_the_kernels(dtype, monkeypatch):
    """A training forward and backward of the attention (query rows in two chunks) runs the kernels once per
    chunk each (the power with the row sums; the recomputation; dL/dS) with the fused kernels off (as on a CPU without
    them; test_poly_attention_takes_the_fused_kernel for those), with O and the gradients of Q, K and V as
    accurate against float64 as PyTorch's operators (float32: within 1e-6 relative; bf16: its rounding);
    ``kernels(False)`` does not take them."""
    monkeypatch.setattr(ck.fused_attention, 'on', False)   # the tiled path, as on CPUs without the fused kernels
    calls = []
    for name in ('_poly_power_', '_poly_prep_', '_poly_ds_'):
        real = getattr(ck, name)
        monkeypatch.setattr(ck, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    gen = torch.Generator().manual_seed(0)
    q0, k0, v0, g = ((torch.randn(2, 3, 196, 32, generator=gen) * 0.3) for _ in range(4))

    def run(dt, on):
        q, k, v = (t.to(dt).clone().requires_grad_() for t in (q0, k0, v0))
        with ck.kernels(on):
            if dt == torch.float64:
                out = pa.poly_attention_reference(q, k, v)
            else:
                out = pa.poly_attention(q, k, v, chunk_bytes=2 * 3 * 100 * 196 * 4)
            out.backward(g.to(dt))
        return [t.double() for t in (out, q.grad, k.grad, v.grad)]

    ref = run(torch.float64, False)
    ours = run(dtype, True)
    assert calls == ['_poly_power_'] * 2 + ['_poly_prep_', '_poly_ds_'] * 2
    theirs = run(dtype, False)
    assert len(calls) == 6
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for a, b, r in zip(ours, theirs, ref):
        scale = r.abs().max()
        assert (a - r).abs().max() <= tol * scale and (b - r).abs().max() <= tol * scale


@needs_cc
@pytest.mark.parametrize('march', [None, 'x86-64-v2', 'skylake-avx512'])
def test_flip_product_kernels_in_every_code_path(march, tmp_path):
    """y = a ⊙ flip_c(b) and its backward (dL/da = g ⊙ flip_c(b), dL/db = flip_c(g ⊙ a)) on channels-last rows of
    every length: bit for bit PyTorch's expression, float32 and bfloat16 (one product, one rounding)."""
    lib = _library_for(march)
    gen = torch.Generator().manual_seed(0)
    for dtype, suffix in ((torch.float32, 'f32'), (torch.bfloat16, 'bf16')):
        for c in (1, 7, 16, 33, 48, 216):
            a, b, g = ((torch.randn(2, c, 5, 3, generator=gen) * 3).to(dtype).contiguous(
                memory_format=torch.channels_last) for _ in range(3))
            y, da, db = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
            assert getattr(lib, f'polynext_flip_mul_{suffix}')(a.data_ptr(), b.data_ptr(), y.data_ptr(), 30, c, 2) == 0
            assert getattr(lib, f'polynext_flip_mul_backward_{suffix}')(
                g.data_ptr(), a.data_ptr(), b.data_ptr(), da.data_ptr(), db.data_ptr(), 30, c, 2) == 0
            assert torch.equal(y, a * b.flip(1))
            assert torch.equal(da, g * b.flip(1)) and torch.equal(db, (g * a).flip(1))


@needs_cc
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_polyconv_takes_the_flip_product(dtype, monkeypatch):
    """PolyConv's product in training (and at inference that does not fuse) is the kernels' autograd function,
    with values and gradients bit-identical to ``a * b.flip(1)``; the ablations' interactions, NCHW tensors,
    float64 and ``kernels(False)`` take the expression."""
    monkeypatch.setattr(fp, 'MIN_NUMEL', 0)
    calls = []
    real = fp._flip_mul
    monkeypatch.setattr(fp, '_flip_mul', lambda a, b: calls.append(a.dtype) or real(a, b))
    gen = torch.Generator().manual_seed(0)
    a0, b0, g = ((torch.randn(2, 12, 6, 6, generator=gen)).to(dtype).contiguous(memory_format=torch.channels_last)
                 for _ in range(3))
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    y = fp.flip_product(a, b)
    assert type(y.grad_fn).__name__ == '_FlipProductFunctionBackward' and calls == [dtype]
    y.backward(g)
    a2, b2 = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    (a2 * b2.flip(1)).backward(g)
    assert torch.equal(y, a0 * b0.flip(1)) and torch.equal(a.grad, a2.grad) and torch.equal(b.grad, b2.grad)
    with ck.kernels(False):
        fp.flip_product(a, b)
    fp.flip_product(a0.contiguous(), b0.contiguous())                       # NCHW
    fp.flip_product(a0.double(), b0.double())
    assert len(calls) == 1
    torch.manual_seed(0)
    model = timm.create_model('cpolynext_t', init_channels=16, num_classes=10, cells=(1, 1, 1, 1))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        model(x).sum().backward()
    n_conv = sum(isinstance(m, polynext.models.polynext.PolyConv) for m in model.modules())
    assert len(calls) == 1 + n_conv and set(calls[1:]) == {dtype}
    ablated = timm.create_model('cpolynext_t', init_channels=16, num_classes=10, cells=(1, 1, 1, 1),
                                product_op='add')
    ablated(x).sum().backward()
    assert len(calls) == 1 + n_conv


def _dw_weight_grad_fp64(x, g, k, d):
    """The depthwise weight gradient by autograd in float64: (C, 1, k, k)."""
    w = torch.zeros(x.shape[1], 1, k, k, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x.double(), w, padding=d * (k - 1) // 2, dilation=d, groups=x.shape[1])
    return torch.autograd.grad(y, w, g.double())[0]


@needs_cc
@pytest.mark.parametrize('march', [None, 'x86-64-v2', 'skylake-avx512'])
def test_depthwise_weight_grad_kernel_in_every_code_path(march, tmp_path):
    """polynext_dw_wgrad against float64 autograd: 3x3, 5x5 (the registers' paths) and 7x7 (tap by tap), dilation
    1 to 3, maps where taps only meet padding (2x2, 3x20), channel counts with a partial block of 16, float32 and
    bfloat16 (exact in float32: the sums are float32 either way); an even kernel refused."""
    lib = _library_for(march)
    gen = torch.Generator().manual_seed(0)
    for k, d, (h, w), c in [(3, 1, (7, 7), 16), (3, 2, (16, 16), 72), (5, 2, (14, 14), 24), (5, 1, (14, 14), 40),
                            (5, 2, (2, 2), 16), (5, 2, (3, 20), 7), (7, 2, (9, 11), 6), (3, 3, (20, 19), 33),
                            (1, 1, (5, 5), 3)]:
        for dtype, suffix in ((torch.float32, 'f32'), (torch.bfloat16, 'bf16')):
            x, g = ((torch.randn(3, c, h, w, generator=gen)).to(dtype).contiguous(memory_format=torch.channels_last)
                    for _ in range(2))
            part = torch.zeros(2, k, k, c)
            assert getattr(lib, f'polynext_dw_wgrad_{suffix}')(x.data_ptr(), g.data_ptr(), part.data_ptr(),
                                                                3, h, w, c, k, d, 2) == 0
            got = part.sum(0).permute(2, 0, 1).unsqueeze(1).double()
            want = _dw_weight_grad_fp64(x, g, k, d)
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (k, d, h, w, c, dtype)
    assert lib.polynext_dw_wgrad_f32(x.data_ptr(), g.data_ptr(), part.data_ptr(), 3, h, w, c, 4, 1, 2) == 1


@needs_cc
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_depthwise_backward_takes_the_weight_grad_kernel(dtype, monkeypatch):
    """depthwise_conv2d's backward takes the kernel for channels-last maps in float32 and under bf16 autocast (the
    dilated coarse branch of PolyConv, PolyAttn's 5x5 Q / K), with the weight gradient of float64 autograd; NCHW
    maps and ``kernels(False)`` take the phase split and the column cut."""
    from polynext.ops import depthwise as dw
    calls = []
    real = dw._kernel_weight_grad

    def counted(x, g, k, d):   # records each call the kernel served
        r = real(x, g, k, d)
        if r is not None:
            calls.append((k, d, x.dtype))
        return r
    monkeypatch.setattr(dw, '_kernel_weight_grad', counted)
    gen = torch.Generator().manual_seed(0)
    for k, d, hw in [(5, 2, 14), (3, 2, 16), (5, 1, 7), (5, 2, 4)]:
        conv = torch.nn.Conv2d(24, 24, k, padding=d * (k - 1) // 2, dilation=d, groups=24, bias=False)
        x = torch.randn(2, 24, hw, hw, generator=gen).contiguous(memory_format=torch.channels_last)
        g = torch.randn(2, 24, hw, hw, generator=gen)
        x_used = x.to(dtype)   # what the function saves: the autocast dtype
        want = _dw_weight_grad_fp64(x_used, g.to(dtype), k, d).float()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = dw.depthwise_conv2d(x, conv)
        gw, = torch.autograd.grad(y, conv.weight, g.to(y.dtype))
        assert calls[-1] == (k, d, dtype) and gw.dtype == torch.float32
        assert (gw - want).abs().max() <= 1e-5 * want.abs().max()
        n = len(calls)
        with ck.kernels(False):
            gw_off, = torch.autograd.grad(dw.depthwise_conv2d(x.to(dtype), conv.to(dtype)), conv.weight, g.to(dtype))
        conv.float()
        torch.autograd.grad(dw.depthwise_conv2d(x.contiguous(), conv), conv.weight, g)   # NCHW
        assert len(calls) == n
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (gw_off.float() - want).abs().max() <= tol * want.abs().max()


@needs_cc
def test_large_undilated_3x3_depthwise_takes_the_weight_grad_kernel(monkeypatch):
    """PolyConv's undilated 3x3 convolutions take the function, for the weight-gradient kernel, from 64 channels at
    56x56 an image (channels-last, the kernels on): same output bits as the plain convolution, gradients of float64
    autograd; smaller maps, NCHW maps and ``kernels(False)`` keep PyTorch's own backward."""
    from polynext.ops import depthwise as dw
    calls = []
    real = dw._kernel_weight_grad
    monkeypatch.setattr(dw, '_kernel_weight_grad', lambda *a: calls.append(a[2:]) or real(*a))
    gen = torch.Generator().manual_seed(0)

    def run(channels, hw, channels_last=True):
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        x = torch.randn(1, channels, *hw, generator=gen)
        x = (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
        g = torch.randn(1, channels, *hw, generator=gen)
        y = dw.depthwise_conv2d(x, conv)
        assert torch.equal(y, conv(x))
        gx, gw = torch.autograd.grad(y, (x, conv.weight), g)
        x64, w64 = x.detach().double().requires_grad_(), conv.weight.detach().double().requires_grad_()
        gx64, gw64 = torch.autograd.grad(F.conv2d(x64, w64, padding=1, groups=channels), (x64, w64), g.double())
        assert (gx - gx64).abs().max() <= 1e-5 * gx64.abs().max()
        assert (gw - gw64).abs().max() <= 1e-5 * gw64.abs().max()
        return type(y.grad_fn).__name__

    assert run(64, (56, 56)) == 'DepthwiseConv2dFunctionBackward' and calls == [(3, 1)]
    assert run(72, (40, 70)) == 'DepthwiseConv2dFunctionBackward' and calls == [(3, 1)] * 2
    assert run(48, (56, 56)) == 'ConvolutionBackward0'
    assert run(96, (28, 28)) == 'ConvolutionBackward0'
    assert run(64, (56, 56), channels_last=False) == 'ConvolutionBackward0'
    with ck.kernels(False):
        assert run(64, (56, 56)) == 'ConvolutionBackward0'
    assert len(calls) == 2


def test_small_plain_norms_train_with_pytorch():
    """In training a plain norm below TRAIN_PLAIN_MIN_NUMEL keeps PyTorch's path (as fast there); the product's
    and the residual's forms take the kernels from MIN_NUMEL."""
    x = torch.randn(32, 14, 14, 192, requires_grad=True)
    w = torch.ones(192, requires_grad=True)
    assert x.numel() < cn.TRAIN_PLAIN_MIN_NUMEL and not cn.trains(x, w, None, None)
    assert cn.trains(x, w, None, torch.randn(32, 14, 14, 192)) == (HAS_CC and ck.kernel_available())
    assert cn.trains(x, torch.ones(96), None, None, product=True) == (HAS_CC and ck.kernel_available())


@needs_cc
def test_the_kernels_benchmark_in_train_mode(tmp_path, capsys):
    """``benchmarks/cpu_kernels.py --mode train`` at a tiny size: per-layer forward + backward rows with their float64
    gradient differences and whether the kernel ran, a whole-step A/B, and the JSON."""
    import importlib.util
    import json
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        'cpu_kernels_bench', Path(__file__).resolve().parents[1] / 'benchmarks' / 'cpu_kernels.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / 'train.json'
    assert bench.main(['cpolynext_t', '--mode', 'train', '--batch-size', '2', '--img-size', '64', '--runs', '1',
                       '--json', str(out)]) == 0
    data = json.loads(out.read_text())
    assert data['mode'] == 'train' and data['models'][0]['mode'] == 'train' and data['models'][0]['speedup'] > 0
    norms = [r for r in data['layers'] if r['op'] == 'norm']
    flips = [r for r in data['layers'] if r['op'] == 'flip_product']
    assert len(norms) == 12 and len(flips) == 4 and all(r['mode'] == 'train' for r in data['layers'])
    assert all(r['polynext_max_abs_diff_fp64'] < 1e-3 and r['aten_max_abs_diff_fp64'] < 1e-3 for r in norms)
    assert all(r['polynext_weight_grad_rel_err'] < 1e-5 for r in norms)
    assert all(r['bit_identical'] for r in flips)
    assert not any(r['kernel'] for r in data['layers'])   # 2 images of 64 px: every layer under the kernels' size
    assert 'training step, fp32' in capsys.readouterr().out


@needs_cc
def test_bf16_autocast_training_takes_the_norm_kernels(monkeypatch):
    """Under CPU bf16 autocast (``layer_norm`` in the input's dtype, the parameters float32) every norm of a training
    step runs the kernels, bfloat16 in and out: values and gradients within bf16's rounding of float64, and the
    weight's gradient within 1e-5 of float64's, where PyTorch's own bf16 backward is off by percents."""
    monkeypatch.setattr(cn, 'MIN_NUMEL', 0)
    calls = _count_runs(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.randn(20000, 48, generator=gen) * 2 + 0.5).bfloat16()
    w0 = torch.randn(48, generator=gen) * 0.5 + 1
    g = torch.randn(20000, 48, generator=gen).bfloat16()
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = cn.channel_layer_norm(x, (48,), w, None, 1e-5)
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__ == '_ChannelNormFunctionBackward'
    y.backward(g)
    y_ref, dx_ref, dw_ref, _ = _norm_grads(x0, w0, None, None, g, False)
    assert _close(y, y_ref, 2 ** -7) and _close(x.grad, dx_ref, 2 ** -7) and _close(w.grad, dw_ref, 1e-5)
    with ck.kernels(False), torch.autocast('cpu', dtype=torch.bfloat16):   # PyTorch's bf16 weight gradient
        x2, w2 = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        F.layer_norm(x2, (48,), w2, None, 1e-5).backward(g)
    assert not _close(w2.grad, dw_ref, 1e-3)
    # a whole bf16 autocast training step of cpolynext_t: every LayerNorm through the kernels (the cells' merge
    # norms see the float32 stream: the float32 kernels)
    monkeypatch.setattr(cn, 'TRAIN_PLAIN_MIN_NUMEL', 0)
    calls.clear()
    torch.manual_seed(0)
    model = timm.create_model('cpolynext_t', init_channels=16, num_classes=10, cells=(1, 1, 1, 1))
    xb = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = model(xb).float().square().mean()
    loss.backward()
    n_norms = sum(isinstance(m, polynext.models.polynext.LayerNorm2d) for m in model.modules())
    assert len(calls) == n_norms and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_kernel_status_is_one_clear_error():
    """Every kernel entry point's status: 0 nothing to say, 1 a call it does not serve (what, and the check to make
    first), 2 out of memory (what, and how to run without the kernels)."""
    ck.check_status('op', 0, 'x', 'y', 'z')
    with pytest.raises(RuntimeError, match=r'^polynext::op: a 4x4 kernel is not served here \(check op_applies first\)$'):
        ck.check_status('op', 1, "a thread's plane", 'a 4x4 kernel', 'op_applies')
    with pytest.raises(MemoryError, match="out of memory for a thread's plane; free memory, or run with "
                                          'POLYNEXT_CPU_KERNELS=0'):
        ck.check_status('op', 2, "a thread's plane", 'a 4x4 kernel', 'op_applies')
