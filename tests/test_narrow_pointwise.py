"""ops.narrow_pointwise: 1x1 convolutions with a multiple of 72 or 48 outputs at CPU inference by a C kernel,
y = W x (+ y): against float64 in every code path it has (AVX-512, AVX2; builds without either refuse and write nothing),
partial pixel tiles and residuals, and the models take it exactly where it applies."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import polynext  # noqa: F401  (registers the models)
from polynext.models.folded import fold_for_inference
from polynext.models.polynext import PolyMLP
from polynext.ops import cpu_kernels as ck
from polynext.ops import narrow_pointwise as npw
from polynext.ops import pointwise
from polynext.ops.fused import fusion

from conftest import load_benchmark
from test_cpu_kernels import AVX2, AVX512, AVX512_BF16, _library_for, needs_cc

#: (N, K, M, H, W, residual): output widths in one and in several tiles (72, 144, 432 in 72-wide tiles of 5 pixels;
#: 48, 96, 240 in 48-wide tiles of 8), pixel counts that fill whole tiles and that leave a partial last tile
#: (126 = 25 x 5 + 1, 9, 35 = 4 x 8 + 3, 1), fewer pixels than one tile, input widths from 1 to the kernel's limit
SHAPES = [(2, 72, 72, 7, 9, True), (1, 5, 72, 3, 3, False), (3, 33, 48, 5, 5, False), (1, 144, 144, 4, 7, True),
          (2, 16, 96, 3, 5, True), (1, 1024, 48, 2, 3, False), (1, 1, 144, 1, 1, True), (2, 48, 96, 4, 4, False),
          (5, 72, 144, 1, 7, False), (2, 288, 432, 3, 5, True), (1, 100, 240, 3, 3, False)]


def _packed(w, lib=None):
    """(M, K, 1, 1) → the kernel's chunks of 72 or 48 outputs, each (K, chunk) row-major (an AVX2 build's: each
    chunk's columns of 24); for ``lib``, a library built for another x86-64 variant, its own packing."""
    return npw._packed(w) if lib is None else npw._pack(w, lib.polynext_pointwise_cols())


@needs_cc
@pytest.mark.parametrize('march', [None, 'x86-64-v2', 'x86-64-v3', 'skylake-avx512'])
def test_narrow_pointwise_kernel_in_every_code_path(march, tmp_path):
    """float32 within 1e-6 of float64 (relative to the largest output), with and without the residual, one and two
    threads equal; builds without AVX-512 or AVX2 (x86-64-v2) say so and refuse every call, writing nothing; a width that
    is not a multiple of the tile, a tile other than 72 or 48, and more than 1024 inputs are refused everywhere."""
    lib = _library_for(march)
    built = AVX512 or AVX2 if march is None else march != 'x86-64-v2'
    assert lib.polynext_pointwise_built() == built
    gen = torch.Generator().manual_seed(0)
    for n, k, m, h, w, residual in SHAPES:
        x = torch.randn(n, k, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(m, k, 1, 1, generator=gen)
        base = torch.randn(n, m, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
        ref = F.conv2d(x.double(), weight.double()) + (base.double() if residual else 0)
        wp = _packed(weight, lib)   # held: the kernel reads it through a raw pointer
        outs = []
        for threads in (1, 2):
            y = base.clone() if residual else torch.full_like(base, 7.0)
            before = y.clone()
            status = lib.polynext_pointwise_f32(x.data_ptr(), wp.data_ptr(), y.data_ptr(), n * h * w, k, m,
                                                npw.tile_width(m), int(residual), threads)
            if not built:
                assert status == 1 and torch.equal(y, before)
                continue
            assert status == 0
            assert (y.double() - ref).abs().max() <= 1e-6 * ref.abs().max(), (n, k, m, h, w, residual)
            outs.append(y)
        if built:
            assert torch.equal(outs[0], outs[1])
    x = torch.randn(1, 8, 2, 2).contiguous(memory_format=torch.channels_last)
    for m, cw, k in ((60, 72, 8), (72, 64, 8), (48, 48, 1025), (50, 48, 8)):
        wp = torch.randn(m * k)
        y = torch.full((1, m, 2, 2), 7.0).contiguous(memory_format=torch.channels_last)
        assert lib.polynext_pointwise_f32(x.data_ptr(), wp.data_ptr(), y.data_ptr(), 4, k, m, cw, 0, 1) == 1
        assert (y == 7).all()


#: (N, K, M, H, W, epilogue) for pointwise_norm: 'residual' (into a new tensor), 'inplace' (the residual is the
#: output), 'product' (M / 2 outputs) and a plain norm; partial last tiles, 48- and 72-wide tiles, the 2048-output limit
NORM_SHAPES = [(2, 72, 72, 7, 9, 'residual'), (1, 5, 144, 3, 3, 'product'), (3, 33, 48, 5, 5, 'inplace'),
               (2, 96, 96, 4, 4, 'plain'), (1, 288, 504, 3, 5, 'product'), (2, 16, 2016, 1, 3, 'product'),
               (1, 8, 2016, 2, 2, 'inplace')]


def _norm_case(gen, n, k, m, h, w, mode, dtype):
    """A NORM_SHAPES case in ``dtype`` (x, the weight, the norm's float32 weight and bias, the residual) and its float64
    reference on the same values."""
    c = m // 2 if mode == 'product' else m
    x = torch.randn(n, k, h, w, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(m, k, 1, 1, generator=gen) / k ** 0.5).to(dtype)
    nw, nb = torch.rand(c, generator=gen) + 0.5, (torch.randn(c, generator=gen) if mode != 'plain' else None)
    res = torch.randn(n, c, h, w, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    conv = F.conv2d(x.double(), weight.double())
    if mode == 'product':
        conv = conv[:, :c] * conv[:, c:]
    ref = F.layer_norm(conv.permute(0, 2, 3, 1), (c,), nw.double(), None if nb is None else nb.double(), 1e-5)
    return x, weight, nw, nb, res, ref.permute(0, 3, 1, 2) + (res.double() if mode in ('residual', 'inplace') else 0)


def _run_norm_kernel(fn, x, wp, nw, nb, res, mode, m, threads):
    """One call of a pointwise-norm kernel ``fn`` on a NORM_SHAPES case: (status, the output, it before the call)."""
    n, k, h, w = x.shape
    y = res.clone() if mode == 'inplace' else torch.full_like(res, 7.0)
    r = y if mode == 'inplace' else res if mode == 'residual' else None
    before = y.clone()
    status = fn(x.data_ptr(), wp.data_ptr(), y.data_ptr(), nw.data_ptr(), None if nb is None else nb.data_ptr(),
                None if r is None else r.data_ptr(), n * h * w, k, m, npw.tile_width(m), 1e-5, int(mode == 'product'),
                threads)
    return status, y, before


@needs_cc
@pytest.mark.parametrize('march', [None, 'x86-64-v2', 'x86-64-v3', 'skylake-avx512'])
def test_pointwise_norm_kernel_in_every_code_path(march, tmp_path):
    """The 1x1 convolution with the channel LayerNorm as its epilogue: equal bit for bit to the 1x1 kernel followed by
    the norm kernel (the same row functions), within 2e-5 of float64; one and two threads equal; builds without
    AVX-512 or AVX2 refuse and write nothing; more than 2048 outputs are refused everywhere."""
    lib = _library_for(march)
    built = AVX512 or AVX2 if march is None else march != 'x86-64-v2'
    gen = torch.Generator().manual_seed(0)
    for n, k, m, h, w, mode in NORM_SHAPES:
        c = m // 2 if mode == 'product' else m
        x, weight, nw, nb, res, ref = _norm_case(gen, n, k, m, h, w, mode, torch.float32)
        wp = _packed(weight, lib)   # held: the kernel reads them through raw pointers
        outs = []
        for threads in (1, 2):
            status, y, before = _run_norm_kernel(lib.polynext_pointwise_norm_f32, x, wp, nw, nb, res, mode, m, threads)
            if not built:
                assert status == 1 and torch.equal(y, before)
                continue
            assert status == 0
            assert (y.double() - ref).abs().max() <= 2e-5, (n, k, m, h, w, mode)
            outs.append(y)
        if not built:
            continue
        assert torch.equal(outs[0], outs[1])
        conv32 = torch.empty(n, m, h, w).contiguous(memory_format=torch.channels_last)
        assert lib.polynext_pointwise_f32(x.data_ptr(), wp.data_ptr(), conv32.data_ptr(), n * h * w, k, m,
                                          npw.tile_width(m), 0, 1) == 0
        two = res.clone()
        r = None if mode in ('product', 'plain') else res
        assert lib.polynext_channel_norm_f32(conv32.data_ptr(), nw.data_ptr(), None if nb is None else nb.data_ptr(),
                                             None if r is None else r.data_ptr(), two.data_ptr(), None, n * h * w, c,
                                             1e-5, 1, int(mode == 'product')) == 0
        assert torch.equal(outs[0], two), (n, k, m, h, w, mode)
    x = torch.randn(1, 8, 2, 2).contiguous(memory_format=torch.channels_last)
    wp, nw = torch.randn(2112 * 8), torch.ones(2112)
    y = torch.full((1, 2112, 2, 2), 7.0).contiguous(memory_format=torch.channels_last)
    for product in (0, 1):
        assert lib.polynext_pointwise_norm_f32(x.data_ptr(), wp.data_ptr(), y.data_ptr(), nw.data_ptr(), None, None,
                                               4, 8, 2112, 48, 1e-5, product, 1) == 1
    assert (y == 7).all()


@needs_cc
@pytest.mark.skipif(not (AVX512 or AVX2), reason='the kernel needs AVX-512 or AVX2')
@pytest.mark.parametrize('name', ['cpolynext_t', 'apolynext_t'])
def test_models_take_the_kernel_at_inference_only(name, monkeypatch):
    """At CPU inference in float32 every 1x1 convolution with a multiple of 72 or 48 outputs (and no bias) runs on the kernel, the
    MLP's residual addition inside it, PolyConv's closing norm and PolyMLP's product and norm as its epilogue
    (``pointwise_norm``), PolyMLP's whole residual branch as one kernel (``poly_mlp_``; logits equal to the
    separate kernels' bit for bit), logits within 2e-5 of oneDNN's and of the kernel without the epilogue; so do the folded
    model's bias-free residual projections; with autograd recording, bf16, float32 under bf16 autocast,
    ``narrow_pointwise(False)``, ``kernels(False)`` and ``fusion(False)`` it is oneDNN's path (NCHW activations: the
    op-level test below); a bf16 model takes only the fused kernels."""
    calls = []
    real, real_norm = npw._call, npw._pointwise_norm
    monkeypatch.setattr(npw, '_call', lambda x, wp, y, acc: calls.append((y.shape[1], acc)) or real(x, wp, y, acc))
    monkeypatch.setattr(npw, '_pointwise_norm', lambda x, wp, nw, nb, r, n, eps, product, out=None:
                        calls.append((n, 'norm')) or real_norm(x, wp, nw, nb, r, n, eps, product, out))
    real_mlp = npw._poly_mlp_
    monkeypatch.setattr(npw, '_poly_mlp_', lambda x, wi, nw, nb, wo, n, eps: calls.append((n, 'mlp'))
                        or real_mlp(x, wi, nw, nb, wo, n, eps))
    torch.manual_seed(0)
    model = timm.create_model(name, init_channels=48, num_classes=10, cells=(1, 1, 1, 1)).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 64, 64)
    narrow = [m for m in model.modules() if isinstance(m, pointwise.PointwiseConv2d) and npw.tile_width(m.out_channels)
              and m.bias is None]
    assert narrow
    with torch.no_grad():
        y = model(x)
        served = len(calls)
        assert served >= len(narrow) - sum(isinstance(m, PolyMLP) for m in model.modules())
        assert all(npw.tile_width(m) for m, _ in calls) and {False, 'norm', 'mlp'} <= {kind for _, kind in calls}
        with ck.fused_mlp(False):
            unfused_mlp = model(x)
        assert {kind for _, kind in calls[served:]} == {False, True, 'norm'}
        with ck.pointwise_norm(False), ck.fused_mlp(False):
            separate = model(x)
        del calls[served:]
        with ck.narrow_pointwise(False):
            ref = model(x)
        assert len(calls) == served
    assert (y - ref).abs().max() < 2e-5 and (y - separate).abs().max() < 2e-5 and torch.equal(y, unfused_mlp)
    calls.clear()
    with torch.no_grad():
        assert (fold_for_inference(model)(x) - ref).abs().max() < 2e-5
    assert all(npw.tile_width(m) for m, _ in calls) and {'norm', 'mlp'} <= {kind for _, kind in calls}
    served = len(calls)
    for off in (ck.narrow_pointwise(False), ck.kernels(False), fusion(False)):
        with torch.no_grad(), off:
            model(x)
    model(x).sum().backward()                                    # training: autograd needs oneDNN's convolution
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):        # float32 under bf16 autocast: not served
            model(x)
    assert len(calls) == served
    with torch.no_grad():   # bf16: the plain kernel does not serve it, the fused ones do where built (test below)
        copy.deepcopy(model).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert {kind for _, kind in calls[served:]} <= {'norm', 'mlp'}


def test_applies_checks_before_the_kernel(monkeypatch):
    """The checks of ``narrow_pointwise_applies`` (each one turns it off alone) and the one-line refusal of a call
    that skipped them; ``out`` of the wrong shape or layout is refused before anything is written."""
    x = torch.randn(2, 72, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(72, 72, 1, 1)
    if not (ck.kernel_available() and ck.library().pointwise):
        assert not npw.narrow_pointwise_applies(x, w)
        return
    assert npw.narrow_pointwise_applies(x, w)
    assert not npw.narrow_pointwise_applies(x, w, torch.zeros(72))                    # a bias
    assert not npw.narrow_pointwise_applies(x, torch.randn(64, 72, 1, 1))             # 64 outputs
    assert not npw.narrow_pointwise_applies(x.contiguous(), w)                        # NCHW
    assert not npw.narrow_pointwise_applies(x.double(), w.double())                   # float64
    assert not npw.narrow_pointwise_applies(x, w.requires_grad_())                    # autograd recording
    w = w.detach()
    x_wide = torch.randn(1, 1040, 2, 2).contiguous(memory_format=torch.channels_last)
    assert not npw.narrow_pointwise_applies(x_wide, torch.randn(72, 1040, 1, 1))     # more inputs than MAX_IN
    with ck.narrow_pointwise(False):
        assert not npw.narrow_pointwise_applies(x, w)
    out = torch.zeros(2, 72, 6, 6)                                                     # NCHW out
    with pytest.raises(ValueError, match='out must be a channels-last float32 tensor of shape'):
        npw.narrow_pointwise(x, w, out=out)
    assert (out == 0).all()
    with pytest.raises(RuntimeError, match='72 → 60 channels is not served here .*narrow_pointwise_applies'):
        npw._call(x, torch.randn(60 * 72), torch.empty(2, 60, 6, 6), False)


#: (N, K, 2H, H, W): PolyMLP's widths (K channels, 2H after the input projection) in 72- and 48-wide tiles of both
#: projections, mixed (a block of 40 pixels: 8 tiles of 5 and 5 of 8), pixel counts with a partial last block
MLP_SHAPES = [(2, 72, 144, 7, 9), (1, 48, 96, 5, 5), (2, 96, 144, 9, 9), (1, 144, 96, 3, 3), (3, 288, 504, 2, 3),
              (1, 72, 2016, 1, 1), (2, 96, 144, 3, 3)]


@needs_cc
@pytest.mark.parametrize('march', [None, 'x86-64-v2', 'x86-64-v3', 'skylake-avx512'])
def test_poly_mlp_kernel_in_every_code_path(march, tmp_path):
    """PolyMLP's residual branch in one kernel, y += W_out (norm(a * b) * nw + nb), [a, b] = W_in x, in place (y is x)
    and into another tensor: equal bit for bit to the epilogue kernel then the residual 1x1 kernel, within 2e-5 of
    float64; one and two threads equal; builds without AVX-512 or AVX2 refuse and write nothing; widths no tile takes are
    refused everywhere."""
    lib = _library_for(march)
    built = AVX512 or AVX2 if march is None else march != 'x86-64-v2'
    gen = torch.Generator().manual_seed(0)
    for n, k, m, h, w in MLP_SHAPES:
        x = torch.randn(n, k, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
        w_in = torch.randn(m, k, 1, 1, generator=gen) / k ** 0.5
        w_out = torch.randn(k, m // 2, 1, 1, generator=gen) / m ** 0.5
        nw, nb = torch.rand(m // 2, generator=gen) + 0.5, torch.randn(m // 2, generator=gen)
        a = F.conv2d(x.double(), w_in.double())
        hid = F.layer_norm((a[:, :m // 2] * a[:, m // 2:]).permute(0, 2, 3, 1), (m // 2,), nw.double(), nb.double(),
                           1e-5).permute(0, 3, 1, 2)
        base = torch.randn(n, k, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
        wi, wo = _packed(w_in, lib), _packed(w_out, lib)   # held: the kernel reads them through raw pointers
        for inplace in (True, False):
            ref = (x if inplace else base).double() + F.conv2d(hid, w_out.double())
            outs = []
            for threads in (1, 2):
                xs = x.clone()
                y = xs if inplace else base.clone()
                before = y.clone()
                status = lib.polynext_poly_mlp_f32(xs.data_ptr(), wi.data_ptr(), nw.data_ptr(), nb.data_ptr(),
                                                   wo.data_ptr(), y.data_ptr(), n * h * w, k, m, npw.tile_width(m),
                                                   npw.tile_width(k), 1e-5, threads)
                if not built:
                    assert status == 1 and torch.equal(y, before)
                    continue
                assert status == 0
                assert (y.double() - ref).abs().max() <= 2e-5, (n, k, m, h, w, inplace)
                outs.append(y)
            if not built:
                continue
            assert torch.equal(outs[0], outs[1])
            hid32 = torch.empty(n, m // 2, h, w).contiguous(memory_format=torch.channels_last)
            assert lib.polynext_pointwise_norm_f32(x.data_ptr(), wi.data_ptr(), hid32.data_ptr(), nw.data_ptr(),
                                                   nb.data_ptr(), None, n * h * w, k, m, npw.tile_width(m), 1e-5, 1,
                                                   1) == 0
            two = x.clone() if inplace else base.clone()
            assert lib.polynext_pointwise_f32(hid32.data_ptr(), wo.data_ptr(), two.data_ptr(), n * h * w, m // 2, k,
                                              npw.tile_width(k), 1, 1) == 0
            assert torch.equal(outs[0], two), (n, k, m, h, w, inplace)
    x = torch.randn(1, 60, 2, 2).contiguous(memory_format=torch.channels_last)
    wi, wo, nw = torch.randn(144 * 60), torch.randn(60 * 72), torch.ones(72)
    y = x.clone()
    for k, m, cw_in, cw_out in ((60, 144, 72, 72), (72, 150, 72, 72), (72, 144, 72, 64)):   # K 60, 2H 150, a 64 tile
        assert lib.polynext_poly_mlp_f32(x.data_ptr(), wi.data_ptr(), nw.data_ptr(), None, wo.data_ptr(),
                                         y.data_ptr(), 4, k, m, cw_in, cw_out, 1e-5, 1) == 1
    assert torch.equal(y, x)


def _bf16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


@needs_cc
@pytest.mark.parametrize('march', [None, 'x86-64-v2', 'skylake-avx512'])
def test_bf16_fused_kernels_in_every_code_path(march, tmp_path):
    """The norm epilogue and the whole-PolyMLP kernel for bfloat16 (the pair dot product): against float64 on the same
    bf16 values, rounded where the kernels round (the output; PolyMLP's hidden tensor), within 2^-7 of the largest
    value; one and two threads equal; builds without AVX-512 BF16 (skylake-avx512, x86-64-v2) refuse and write
    nothing; an odd number of inputs is refused."""
    lib = _library_for(march)
    built = AVX512_BF16 if march is None else False
    assert lib.polynext_pointwise_bf16_built() == built
    gen = torch.Generator().manual_seed(0)
    for n, k, m, h, w, mode in NORM_SHAPES:
        x, weight, nw, nb, res, ref = _norm_case(gen, n, k + k % 2, m, h, w, mode, torch.bfloat16)
        wp = _packed(weight, lib)
        outs = []
        for threads in (1, 2):
            status, y, before = _run_norm_kernel(lib.polynext_pointwise_norm_bf16, x, wp, nw, nb, res, mode, m, threads)
            if not built:
                assert status == 1 and torch.equal(y, before)
                continue
            assert status == 0
            assert (y.double() - ref).abs().max() <= 2 ** -7 * ref.abs().max(), (n, k, m, h, w, mode)
            outs.append(y)
        if built:
            assert torch.equal(outs[0], outs[1])
    for n, k, m, h, w in MLP_SHAPES:
        x = torch.randn(n, k, h, w, generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w_in = (torch.randn(m, k, 1, 1, generator=gen) / k ** 0.5).to(torch.bfloat16)
        w_out = (torch.randn(k, m // 2, 1, 1, generator=gen) / m ** 0.5).to(torch.bfloat16)
        nw, nb = torch.rand(m // 2, generator=gen) + 0.5, torch.randn(m // 2, generator=gen)
        a = F.conv2d(x.double(), w_in.double())
        hid = F.layer_norm((a[:, :m // 2] * a[:, m // 2:]).permute(0, 2, 3, 1), (m // 2,), nw.double(), nb.double(),
                           1e-5).permute(0, 3, 1, 2)
        ref = x.double() + F.conv2d(_bf16_round(hid), w_out.double())
        wi, wo = _packed(w_in, lib), _packed(w_out, lib)
        outs = []
        for threads in (1, 2):
            y = x.clone()
            status = lib.polynext_poly_mlp_bf16(y.data_ptr(), wi.data_ptr(), nw.data_ptr(), nb.data_ptr(),
                                                wo.data_ptr(), y.data_ptr(), n * h * w, k, m, npw.tile_width(m),
                                                npw.tile_width(k), 1e-5, threads)
            if not built:
                assert status == 1 and torch.equal(y, x)
                continue
            assert status == 0
            assert (y.double() - ref).abs().max() <= 2 ** -7 * ref.abs().max(), (n, k, m, h, w)
            outs.append(y)
        if built:
            assert torch.equal(outs[0], outs[1])
    x = torch.randn(1, 71, 2, 2).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)   # 71 inputs: odd
    wp, nw = torch.randn(72 * 71).to(torch.bfloat16), torch.ones(72)
    y = torch.full((1, 72, 2, 2), 7.0).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert lib.polynext_pointwise_norm_bf16(x.data_ptr(), wp.data_ptr(), y.data_ptr(), nw.data_ptr(), None, None,
                                            4, 71, 72, 72, 1e-5, 0, 1) == 1
    assert (y == 7).all()


@needs_cc
@pytest.mark.skipif(not AVX512_BF16, reason='the bf16 kernels need AVX-512 BF16')
def test_bf16_models_take_the_fused_kernels():
    """A bf16 model at CPU inference runs PolyConv's pw_out with its norm and every PolyMLP on the bf16 kernels (the
    plain 1x1 convolutions stay oneDNN's), logits within bf16's rounding of the separate path (relative L2 error
    below 0.05, as the bf16 norm kernel's test)."""
    torch.manual_seed(0)
    model = timm.create_model('cpolynext_t', init_channels=48, num_classes=10, cells=(1, 1, 1, 1)).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    model = model.to(torch.bfloat16)
    x = torch.randn(2, 3, 64, 64).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    kinds = []
    real_norm, real_mlp = npw._pointwise_norm, npw._poly_mlp_
    npw._pointwise_norm = lambda x, *a: kinds.append(('norm', x.dtype)) or real_norm(x, *a)
    npw._poly_mlp_ = lambda x, *a: kinds.append(('mlp', x.dtype)) or real_mlp(x, *a)
    try:
        with torch.inference_mode():
            y = model(x).float()
            assert {('norm', torch.bfloat16), ('mlp', torch.bfloat16)} <= set(kinds)
            n = len(kinds)
            with ck.pointwise_norm(False), ck.fused_mlp(False):
                ref = model(x).float()
            assert len(kinds) == n
    finally:
        npw._pointwise_norm, npw._poly_mlp_ = real_norm, real_mlp
    assert ((y - ref).norm() / ref.norm()).item() < 0.05


def test_poly_mlp_checks_before_the_kernel():
    """``poly_mlp_`` runs the kernel only where it serves the call, else returns None and writes nothing: each check
    turns it off alone."""
    x = torch.randn(2, 72, 6, 6).contiguous(memory_format=torch.channels_last)
    w_in, w_out, nw = torch.randn(144, 72, 1, 1), torch.randn(72, 72, 1, 1), torch.ones(72)
    before = x.clone()
    if not (ck.kernel_available() and ck.library().pointwise):
        assert npw.poly_mlp_(x, w_in, nw, None, 1e-5, w_out) is None and torch.equal(x, before)
        return
    refused = [
        dict(in_weight=w_in, norm_weight=None, out_weight=w_out),                          # no norm weight
        dict(in_weight=w_in, norm_weight=nw.double(), out_weight=w_out),                   # a float64 norm weight
        dict(in_weight=w_in, norm_weight=torch.ones(144), out_weight=w_out),               # the wrong width
        dict(in_weight=w_in, norm_weight=nw, out_weight=w_out.clone().requires_grad_()),   # autograd recording
        dict(in_weight=w_in, norm_weight=nw, out_weight=w_out.double()),                   # a float64 projection
        dict(in_weight=w_in, norm_weight=nw, out_weight=torch.randn(72, 70, 1, 1)),        # 70 hidden inputs
        dict(in_weight=torch.randn(120, 72, 1, 1), norm_weight=torch.ones(60),
             out_weight=torch.randn(72, 60, 1, 1)),                                       # 120: no tile
        dict(in_weight=w_in, norm_weight=nw, out_weight=torch.randn(72, 72, 3, 3)),        # not 1x1
    ]
    for kwargs in refused:
        assert npw.poly_mlp_(x, eps=1e-5, norm_bias=None, **kwargs) is None, kwargs
    x60 = torch.randn(2, 60, 6, 6).contiguous(memory_format=torch.channels_last)            # 60 channels: no tile out
    assert npw.poly_mlp_(x60, torch.randn(144, 60, 1, 1), nw, None, 1e-5, torch.randn(60, 72, 1, 1)) is None
    with torch.no_grad():
        assert npw.poly_mlp_(x.contiguous(), w_in, nw, None, 1e-5, w_out) is None        # NCHW
    with ck.fused_mlp(False):
        assert npw.poly_mlp_(x, w_in, nw, None, 1e-5, w_out) is None
    assert torch.equal(x, before)
    assert npw.poly_mlp_(x, w_in, nw, None, 1e-5, w_out) is x and not torch.equal(x, before)
    with pytest.raises(RuntimeError, match='72 → 150 → 72 channels is not served here .*check poly_mlp_ first'):
        npw._poly_mlp_(x, torch.randn(150 * 72), torch.ones(75), None, torch.randn(75 * 72), 150, 1e-5)


@needs_cc
@pytest.mark.skipif(not (AVX512 or AVX2), reason='the kernel needs AVX-512 or AVX2')
def test_pointwise_norm_keeps_drop_path_in_training_mode():
    """A model in training mode with drop path, without autograd (``torch.no_grad()``): PolyConv's branch is dropped
    per sample before its residual addition, so the fused norm-and-residual epilogue must not serve it; the output
    equals the one without the epilogue under the same seed."""
    torch.manual_seed(0)
    model = timm.create_model('cpolynext_t', init_channels=48, num_classes=10, cells=(1, 1, 1, 1),
                              drop_path_rate=0.5).train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        y = model(x)
        with ck.pointwise_norm(False):
            torch.manual_seed(1)
            ref = model(x)
    assert (y - ref).abs().max() < 2e-5


def test_pointwise_norm_checks_before_the_kernel():
    """``pointwise_norm`` runs the kernel only where it serves the call, else returns None (the model's own path):
    each check turns it off alone."""
    x = torch.randn(2, 72, 6, 6).contiguous(memory_format=torch.channels_last)
    w, nw = torch.randn(144, 72, 1, 1), torch.ones(72)
    res = torch.randn(2, 144, 6, 6).contiguous(memory_format=torch.channels_last)
    if not (ck.kernel_available() and ck.library().pointwise):
        assert npw.pointwise_norm(x, w, nw, None, 1e-5, product=True) is None
        return
    assert npw.pointwise_norm(x, w, nw, None, 1e-5, product=True).shape == (2, 72, 6, 6)
    assert npw.pointwise_norm(x, w, torch.ones(144), None, 1e-5, residual=res).shape == (2, 144, 6, 6)
    refused = [
        dict(weight=w, norm_weight=None, product=True),                                    # no norm weight
        dict(weight=w, norm_weight=nw.double(), product=True),                             # a float64 norm weight
        dict(weight=w, norm_weight=torch.ones(144), product=True),                         # the wrong width
        dict(weight=w, norm_weight=nw, norm_bias=torch.ones(70), product=True),            # a bias of the wrong width
        dict(weight=w, norm_weight=nw.clone().requires_grad_(), product=True),             # autograd recording
        dict(weight=w, norm_weight=nw, product=True, residual=res),                        # a residual with the product
        dict(weight=w, norm_weight=torch.ones(144), residual=res.contiguous()),           # an NCHW residual
        dict(weight=w, norm_weight=torch.ones(144), residual=res[:1]),                    # of the wrong shape
        dict(weight=torch.randn(120, 72, 1, 1), norm_weight=torch.ones(60), product=True),  # 120 outputs: no tile
        dict(weight=torch.randn(2112, 72, 1, 1), norm_weight=torch.ones(2112)),            # more than MAX_NORM_OUT
    ]
    for kwargs in refused:
        kwargs.setdefault('norm_bias', None)
        assert npw.pointwise_norm(x, eps=1e-5, **kwargs) is None, kwargs
    with torch.no_grad():
        assert npw.pointwise_norm(x.contiguous(), w, nw, None, 1e-5, product=True) is None    # NCHW input
    with ck.pointwise_norm(False):
        assert npw.pointwise_norm(x, w, nw, None, 1e-5, product=True) is None
    with pytest.raises(RuntimeError, match='72 → 120 channels is not served here .*check pointwise_norm first'):
        npw._pointwise_norm(x, torch.randn(120 * 72), torch.ones(60), None, None, 120, 1e-5, True)


@needs_cc
@pytest.mark.skipif(not (AVX512 or AVX2), reason='the kernel needs AVX-512 or AVX2')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_pointwise_norm_in_place_writes_only_an_owned_residual(dtype):
    """``inplace=True`` writes the values of the new-tensor form into the residual itself (each pixel's residual
    read before its output is written), under the profiler's operator too; the blocks do so only with a stream they
    own: ``PolyConvBlock.mix_residual(owned=False)`` leaves its input as it was."""
    if dtype == torch.bfloat16 and not ck.library().pointwise_bf16:
        pytest.skip('the bf16 kernels need AVX-512 BF16')
    torch.manual_seed(0)
    u = torch.randn(2, 72, 7, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    w, nw, nb = torch.randn(144, 72, 1, 1).to(dtype), torch.rand(144).to(dtype), torch.randn(144).to(dtype)
    res = torch.randn(2, 144, 7, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = npw.pointwise_norm(u, w, nw, nb, 1e-6, residual=res)
        for profiled in (False, True):
            own = res.clone()
            with torch.autograd.profiler.profile(enabled=profiled):
                got = npw.pointwise_norm(u, w, nw, nb, 1e-6, residual=own, inplace=True)
            assert got is own and torch.equal(got, want)
    with pytest.raises(ValueError, match='inplace writes into the residual'):
        npw.pointwise_norm(u, w, nw, nb, 1e-6, inplace=True)
    from polynext.models.polynext import PolyConv, PolyConvBlock, LayerNorm2d
    block = PolyConvBlock(PolyConv(72, 72), LayerNorm2d(72), nn.Identity()).eval().to(dtype)
    block.mixer_norm.weight.data.uniform_(0.5, 1.5)   # (any weight: the in-place and new-tensor forms must agree)
    x = torch.randn(2, 72, 14, 14).to(dtype).contiguous(memory_format=torch.channels_last)
    before = x.clone()
    gate = torch.full((1,), 0.5, dtype=dtype)
    with torch.inference_mode():
        y = block.mix_residual(x, gate, owned=False)
        assert torch.equal(x, before) and y.data_ptr() != x.data_ptr()
        z = block.mix_residual(x, gate, owned=True)
    assert z.data_ptr() == x.data_ptr() and torch.equal(z, y)


@needs_cc
@pytest.mark.skipif(not (AVX512 or AVX2), reason='the kernel needs AVX-512 or AVX2')
def test_the_benchmark_at_a_tiny_size(tmp_path, capsys):
    """``benchmarks/narrow_pointwise.py --whole-model`` at 2 images of 64 px: cpolynext_t's served shapes, both
    paths timed, the kernel within float32 rounding of float64, the whole-model A/B, the JSON; a model with no served
    shape is refused in one line."""
    import json
    bench = load_benchmark('narrow_pointwise')
    out = tmp_path / 'np.json'
    assert bench.main(['cpolynext_t', '--batch-size', '2', '--img-size', '64', '--runs', '1', '--whole-model',
                       '--json', str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data['rows']
    assert {(r['weight'][0], r['residual']) for r in rows} >= {(48, False), (96, False), (48, True)}
    assert all(r['kernel_ms'] > 0 and r['onednn_ms'] > 0 and r['max_rel_diff_fp64'] < 1e-6 for r in rows)
    norm_rows = data['norm_rows']
    assert {(r['weight'][0], r['epilogue']) for r in norm_rows} >= {(48, 'residual'), (96, 'product')}
    assert all(r['fused_ms'] > 0 and r['separate_ms'] > 0 and r['max_abs_diff'] < 1e-5 for r in norm_rows)
    mlp_rows = data['mlp_rows']
    assert {(tuple(r['in_weight'][:2]), tuple(r['out_weight'][:2])) for r in mlp_rows} >= {((96, 48), (48, 48))}
    assert all(r['fused_ms'] > 0 and r['separate_ms'] > 0 and r['bit_identical'] for r in mlp_rows)
    (model,) = data['whole_model']
    assert model['model'] == 'cpolynext_t' and model['speedup'] > 0 and model['max_abs_logit_diff'] < 2e-5
    assert model['norm_epilogue']['speedup'] > 0 and model['norm_epilogue']['max_abs_logit_diff'] < 2e-5
    assert model['whole_mlp']['speedup'] > 0 and model['whole_mlp']['max_abs_logit_diff'] == 0
    assert '1x1 convolution ms' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(['convformer_s18', '--img-size', '64', '--batch-size', '1', '--runs', '1'])
    assert 'no 1x1 convolution the kernel serves' in capsys.readouterr().err.strip().splitlines()[-1]


@needs_cc
@pytest.mark.skipif(not (AVX512 or AVX2), reason='the kernel needs AVX-512 or AVX2')
def test_the_profiler_counts_the_kernel_as_1x1_convolutions():
    """``polynext profile``: the kernel's operators in the 1x1 class with their MACs (pixels x inputs x outputs)."""
    from polynext.perf import profile_model
    torch.manual_seed(0)
    model = timm.create_model('cpolynext_t', init_channels=48, num_classes=5, cells=(1, 1, 1, 1))
    prof = profile_model(model, mode='infer', batch_size=2, img_size=64, runs=1, warmup=1)
    ours = {(cls, op, shape): row for (cls, op, shape), row in prof.ops.items()
            if op.startswith(('polynext::point', 'polynext::poly_mlp'))}
    # (PolyConv's pw_out with its norm writes into the cell's own stream: the in-place operator)
    assert {op for _, op, _ in ours} == {'polynext::pointwise', 'polynext::pointwise_norm_', 'polynext::poly_mlp_'}
    assert {cls for cls, _, _ in ours} == {'1x1 conv'}
    # stage 0, 2 x 48 channels at 16x16: each PolyMLP in one kernel, its 48 → 96 input and 48 → 48 output projections
    # (PolyMLP's hidden width is 48), and PolyConv's 48 → 48 output projection with its norm as the epilogue, one
    # of each per block
    mlp = ours[('1x1 conv', 'polynext::poly_mlp_', '2x48x16x16')]
    assert mlp.calls > 0 and mlp.macs == mlp.calls * 2 * 48 * 16 * 16 * (96 + 48)
    normed = ours[('1x1 conv', 'polynext::pointwise_norm_', '2x48x16x16')]
    assert normed.calls == mlp.calls and normed.macs == mlp.calls * 2 * 48 * 16 * 16 * 48


@needs_cc
@pytest.mark.skipif(not AVX512_BF16, reason='the bf16 kernels need AVX-512 BF16')
def test_the_benchmark_in_bf16_at_a_tiny_size(tmp_path, capsys):
    """``benchmarks/narrow_pointwise.py --dtype bf16``: no plain-kernel rows (fp32 only), the fused kernels' rows
    against oneDNN's bf16 path within bf16's rounding, the whole-model A/B of a bf16 model, the JSON."""
    import json
    bench = load_benchmark('narrow_pointwise')
    out = tmp_path / 'np.json'
    assert bench.main(['cpolynext_t', '--dtype', 'bf16', '--batch-size', '2', '--img-size', '64', '--runs', '1',
                       '--whole-model', '--json', str(out)]) == 0
    data = json.loads(out.read_text())
    assert data['dtype'] == 'bf16' and data['rows'] == []
    assert data['norm_rows'] and all(r['fused_ms'] > 0 and r['max_abs_diff'] < 0.1 for r in data['norm_rows'])
    assert data['mlp_rows'] and all(r['fused_ms'] > 0 and r['max_abs_diff'] < 0.1 for r in data['mlp_rows'])
    (model,) = data['whole_model']
    # (a sanity bound: an untrained model's logits reach several units, a bf16 step there is 1/32; the tight bf16
    # checks are the kernel test against float64 and the model test's relative error)
    assert model['speedup'] > 0 and model['max_abs_logit_diff'] < 1.0
    assert 'the plain 1x1 kernel is float32 only' in capsys.readouterr().out


def test_the_benchmark_refuses_where_the_kernel_is_not_built(monkeypatch, capsys):
    """Without the kernel there is nothing to compare: one line that says so, before anything runs; so for
    ``--dtype bf16`` without the bf16 kernels."""
    bench = load_benchmark('narrow_pointwise')
    if ck.kernel_available() and ck.library().pointwise:   # bf16 where only the fp32 kernels are built (pretended)
        monkeypatch.setattr(ck.library(), 'pointwise_bf16', False)
        with pytest.raises(SystemExit):
            bench.main(['cpolynext_t', '--dtype', 'bf16', '--runs', '1'])
        assert 'bf16 fused 1x1 kernels are not built here (they need AVX-512 BF16)' in \
            capsys.readouterr().err.strip().splitlines()[-1]
    monkeypatch.setattr(ck.kernels, 'on', False)
    with pytest.raises(SystemExit):
        bench.main(['cpolynext_t', '--runs', '1'])
    assert 'narrow 1x1 kernel is not built here (it needs AVX-512 or AVX2' in capsys.readouterr().err.strip().splitlines()[-1]
