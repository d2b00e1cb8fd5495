"""ops.polyconv_dw: PolyConv's three depthwise convolutions and its flip product in one CPU kernel at inference,
y = DW_out(DW_coarse(u) ⊙ flip_c(DW_fine(u))): against float64 in every code path it has (AVX-512, AVX2; builds
without either refuse and write nothing), and the models (PolyNeXt, the folded model) take it exactly where it applies."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import polynext  # noqa: F401  (registers the models)
from polynext.models.folded import fold_for_inference
from polynext.models.polynext import PolyConv
from polynext.ops import cpu_kernels as ck
from polynext.ops import polyconv_dw as pd
from polynext.ops.fused import fusion

from test_cpu_kernels import AVX2, AVX512, _library_for, needs_cc


def _reference(u, wc, wf, wo, d):
    """float64 on the same values."""
    u, wc, wf, wo = (t.double() for t in (u, wc, wf, wo))
    c, k = u.shape[1], wc.shape[-1]
    a = F.conv2d(u, wc, padding=d * (k - 1) // 2, dilation=d, groups=c)
    b = F.conv2d(u, wf, padding=1, groups=c).flip(1)
    return F.conv2d(a * b, wo, padding=1, groups=c)


def _taps(w):
    return w.reshape(w.shape[0], -1).t().float().contiguous()


#: (N, C, H, W, k, d): PolyNeXt's shapes (stage 0's 3x3 dilation 2, later 5x5 dilation 2; widths multiples of 7, the
#: 7-pixel register rows), channel counts with a partial block of 16 (72, 216: the mirrored block straddles two), a
#: block of fewer than 16 channels alone (5), widths that are not (11, 13: 8-pixel rows, padded), maps smaller than
#: the coarse kernel's reach (3x4, 7x7 with 5x5 dilation 2), 7x7 undilated, and fewer images than twice the threads
#: (their channel blocks split into groups: one image, and three, where a thread's second group is smaller than its
#: first and third)
SHAPES = [(2, 48, 14, 14, 3, 2), (2, 72, 14, 14, 3, 2), (3, 216, 7, 7, 5, 2), (2, 20, 9, 11, 5, 2),
          (1, 5, 3, 4, 3, 1), (2, 33, 16, 16, 7, 1), (1, 40, 10, 13, 5, 2), (3, 40, 9, 9, 3, 2)]


@needs_cc
@pytest.mark.parametrize('march', [None, 'x86-64-v2', 'x86-64-v3', 'skylake-avx512'])
def test_polyconv_dw_kernel_in_every_code_path(march, tmp_path):
    """float32 within 1e-6 of float64 (relative to the largest output), bfloat16 one rounding of the float32 result
    on the same bf16 inputs; the threads' split of one image's channel blocks gives the same values as one thread.
    Builds without AVX-512 or AVX2 (x86-64-v2) say so and refuse every call, writing nothing; an even coarse kernel is
    refused everywhere."""
    lib = _library_for(march)
    built = AVX512 or AVX2 if march is None else march != 'x86-64-v2'
    assert lib.polynext_polyconv_dw_built() == built
    gen = torch.Generator().manual_seed(0)
    for n, c, h, w, k, d in SHAPES:
        u = torch.randn(n, c, h, w, generator=gen)
        wc, wf, wo = (torch.randn(c, 1, s, s, generator=gen) for s in (k, 3, 3))
        for dtype, suffix in ((torch.float32, 'f32'), (torch.bfloat16, 'bf16')):
            x = u.to(dtype).contiguous(memory_format=torch.channels_last)
            ref = _reference(x, wc, wf, wo, d)
            taps = [_taps(t) for t in (wc, wf, wo)]   # held: the kernel reads them through raw pointers
            outs = []
            for threads in (1, 2):
                y = torch.full_like(x, 7.0)
                status = getattr(lib, f'polynext_polyconv_dw_{suffix}')(
                    x.data_ptr(), *(t.data_ptr() for t in taps), y.data_ptr(), n, h, w, c, k, d, threads)
                if not built:
                    assert status == 1 and (y == 7).all()
                    continue
                assert status == 0
                outs.append(y)
                scale = ref.abs().max()
                if dtype == torch.float32:
                    assert (y.double() - ref).abs().max() <= 1e-6 * scale, (n, c, h, w, k, d)
                else:   # rounded once: half a bf16 ulp of the value, and float32's own error
                    assert ((y.double() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-5 * scale).all(), (n, c, h, w, k, d)
            if built:
                assert torch.equal(outs[0], outs[1])
    x = torch.randn(1, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    y = torch.full_like(x, 7.0)
    w4 = torch.randn(4, 16)
    assert lib.polynext_polyconv_dw_f32(x.data_ptr(), w4.data_ptr(), w4.data_ptr(), w4.data_ptr(), y.data_ptr(),
                                        1, 6, 6, 16, 2, 1, 1) == 1 and (y == 7).all()


def _polyconv(c, k=5, seed=0):
    torch.manual_seed(seed)
    return PolyConv(c, c, coarse_kernel=k).eval()


@needs_cc
@pytest.mark.skipif(not (AVX512 or AVX2), reason='the kernel needs AVX-512 or AVX2')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_models_take_the_kernel_at_inference_only(dtype, monkeypatch):
    """cpolynext_t at CPU inference runs every PolyConv's core as one kernel call, logits within 2e-5 of PyTorch's
    path in float32 (bf16 within its own rounding of it); with autograd recording, NCHW activations, float64, the
    ablations' interactions, float32 under bf16 autocast, ``fused_polyconv(False)``, ``kernels(False)`` and
    ``fusion(False)`` it is PyTorch's path."""
    calls = []
    real = pd._polyconv_dw
    monkeypatch.setattr(pd, '_polyconv_dw', lambda u, *a: calls.append(u.dtype) or real(u, *a))
    torch.manual_seed(0)
    model = timm.create_model('cpolynext_t', init_channels=16, num_classes=10, cells=(1, 1, 1, 1)).eval()
    model = model.to(dtype).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(dtype).contiguous(memory_format=torch.channels_last)
    n_conv = sum(isinstance(m, PolyConv) for m in model.modules())
    with torch.no_grad():
        y = model(x).float()
        assert calls == [dtype] * n_conv
        with ck.fused_polyconv(False):
            ref = model(x).float()
        with ck.kernels(False):
            model(x)
        with fusion(False):
            model(x)
    tol = 2e-5 if dtype == torch.float32 else 5e-2
    assert (y - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())
    model(x).sum().backward()                                                 # training: autograd records
    assert len(calls) == n_conv
    conv = _polyconv(24).to(dtype)
    u = torch.randn(2, 24, 9, 9).to(dtype)
    with torch.no_grad():
        assert not pd.polyconv_dw_applies(u, conv.coarse, conv.fine, conv.dw_out)                  # NCHW
        u = u.contiguous(memory_format=torch.channels_last)
        assert pd.polyconv_dw_applies(u, conv.coarse, conv.fine, conv.dw_out)
        assert not pd.polyconv_dw_applies(u.double(), conv.coarse, conv.fine, conv.dw_out)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert pd.polyconv_dw_applies(u, conv.coarse, conv.fine, conv.dw_out) == (dtype == torch.bfloat16)
        shifted = nn.Conv2d(24, 24, 3, padding=2, dilation=1, groups=24, bias=False).to(dtype)   # not "same"
        assert not pd.polyconv_dw_applies(u, conv.coarse, shifted, conv.dw_out)
        wide = _polyconv(pd.MAX_CHANNELS + 1).to(dtype)                                          # past its tables
        w = torch.randn(1, pd.MAX_CHANNELS + 1, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
        assert not pd.polyconv_dw_applies(w, wide.coarse, wide.fine, wide.dw_out)
    ablated = timm.create_model('cpolynext_t', init_channels=16, num_classes=10, cells=(1, 1, 1, 1),
                                product_op='add').eval().to(dtype).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ablated(x)
    assert len(calls) == n_conv


@needs_cc
@pytest.mark.skipif(not (AVX512 or AVX2), reason='the kernel needs AVX-512 or AVX2')
def test_folded_model_takes_the_kernel_with_the_flip_as_data():
    """fold_for_inference(flip='channels') keeps the channel reversal as data: its PolyConvs take the kernel, with
    the logits of the unfolded model; flip='weights' feeds the fine branch from its own 1x1 convolution and keeps
    PyTorch's path."""
    torch.manual_seed(0)
    model = timm.create_model('cpolynext_t', init_channels=16, num_classes=10, cells=(1, 1, 1, 1)).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        for flip in ('channels', 'weights'):
            folded = fold_for_inference(model, flip=flip).to(memory_format=torch.channels_last)
            calls = []
            real = pd._polyconv_dw
            pd._polyconv_dw = lambda u, *a: calls.append(1) or real(u, *a)
            try:
                y = folded(x)
            finally:
                pd._polyconv_dw = real
            assert (len(calls) > 0) == (flip == 'channels')
            assert (y - ref).abs().max() <= 2e-5 * max(1.0, ref.abs().max().item())


@needs_cc
@pytest.mark.skipif(not (AVX512 or AVX2), reason='the kernel needs AVX-512 or AVX2')
def test_refused_calls_say_why():
    """A call the kernel does not serve is an error naming the check to make, not a silently wrong tensor."""
    u = torch.randn(1, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    w4 = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match='2x2 coarse kernel .* polyconv_dw_applies'):
        pd._polyconv_dw(u, w4, w4, w4, 1)


def _benchmark():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        'polyconv_dw_bench', Path(__file__).resolve().parents[1] / 'benchmarks' / 'polyconv_dw.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@needs_cc
@pytest.mark.skipif(not (AVX512 or AVX2), reason='the kernel needs AVX-512 or AVX2')
def test_the_benchmark_at_a_tiny_size(tmp_path, capsys):
    """``benchmarks/polyconv_dw.py --whole-model`` at 2 images of 64 px: cpolynext_t's four PolyConv shapes (stage
    0's 3x3 dilated coarse kernel, then 5x5), both paths timed, the kernel within float32 rounding of float64, the
    whole-model A/B with equal logits, and the JSON."""
    import json
    out = tmp_path / 'dw.json'
    assert _benchmark().main(['cpolynext_t', '--batch-size', '2', '--img-size', '64', '--runs', '1', '--whole-model',
                              '--json', str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data['rows']
    assert [r['shape'] for r in rows] == [[2, 48, 16, 16], [2, 96, 8, 8], [2, 144, 4, 4], [2, 216, 2, 2]]
    assert [r['coarse'] for r in rows] == ['3x3 dilation 2'] + ['5x5 dilation 2'] * 3
    assert all(r['kernel_ms'] > 0 and r['pytorch_ms'] > 0 and r['max_rel_diff_fp64'] < 1e-6 for r in rows)
    (model,) = data['whole_model']
    assert model['model'] == 'cpolynext_t' and model['speedup'] > 0 and model['max_abs_logit_diff'] < 2e-5
    assert 'PolyConv core ms' in capsys.readouterr().out


def test_the_benchmark_refuses_where_the_kernel_is_not_built(monkeypatch, capsys):
    """Without the kernel there is nothing to compare: one line that says so, before anything runs."""
    monkeypatch.setattr(ck.kernels, 'on', False)
    with pytest.raises(SystemExit):
        _benchmark().main(['cpolynext_t', '--runs', '1'])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'not built here (it needs AVX-512 or AVX2' in err
