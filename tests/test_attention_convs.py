"""ops.attention_convs: PolyAttn's depthwise convolutions at CPU inference, from the channels-last projection straight
into the attention's heads and from the heads back: against float64 in every code path the kernel has (AVX-512,
AVX2; builds without either refuse and write nothing), and the models (PolyNeXt, the folded model) take it exactly where it
applies."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import polynext  # noqa: F401  (registers the models)
from polynext.models.attention_window import set_attention_window
from polynext.models.folded import fold_for_inference
from polynext.models.polynext import PolyAttn, calibrate_running_stats
from polynext.ops import attention_convs as ac
from polynext.ops import cpu_kernels as ck
from polynext.ops.fused import fusion

from test_cpu_kernels import AVX2, AVX512, _library_for, needs_cc


def _heads(t, heads):
    """(B, A, H, W) → (B, heads, H W, d)"""
    b, a, h, w = t.shape
    return t.reshape(b, heads, a // heads, h * w).transpose(-1, -2)


def _conv64(x, w):
    k = w.shape[-1]
    return F.conv2d(x.double(), w.double(), padding=(k - 1) // 2, groups=x.shape[1])


def _taps(w):
    return w.reshape(w.shape[0], -1).t().float().contiguous()


#: (N, A, H, W, heads, k): APolyNeXt's shapes (14x14 and 7x7 with 7-pixel register rows, 5x5 and 3x3), 8-pixel rows
#: with padded columns (9x11), 16x16 with head dimension 16 and a 7x7 kernel (the any-k path), a map smaller than the
#: kernel's reach (3x4 with 5x5)
SHAPES = [(2, 64, 14, 14, 2, 5), (3, 32, 7, 7, 1, 3), (2, 96, 9, 11, 3, 5), (1, 48, 16, 16, 3, 7),
          (2, 32, 3, 4, 1, 5)]


@needs_cc
@pytest.mark.parametrize('march', [None, 'x86-64-v2', 'x86-64-v3', 'skylake-avx512'])
def test_heads_kernel_in_every_code_path(march):
    """Channels-last slice → heads with two outputs (Q and K of qk, at the projection's channel offset A) and heads →
    channels-last: float32 within 1e-6 of float64 (relative to the largest output), bfloat16 one rounding of the
    float32 result on the same bf16 inputs, one thread and two alike. Builds without AVX-512 or AVX2 (x86-64-v2) say so and
    refuse every call, writing nothing; an even kernel and channel counts that are not multiples of 16 are refused
    everywhere."""
    lib = _library_for(march)
    built = AVX512 or AVX2 if march is None else march != 'x86-64-v2'
    assert lib.polynext_heads_dw_built() == built
    gen = torch.Generator().manual_seed(0)
    for n, a, h, w, heads, k in SHAPES:
        d, hw = a // heads, h * w
        qkv = torch.randn(n, 2 * a, h, w, generator=gen)
        w1, w2 = (torch.randn(a, 1, k, k, generator=gen) for _ in range(2))
        for dtype, suffix in ((torch.float32, 'f32'), (torch.bfloat16, 'bf16')):
            x = qkv.to(dtype).contiguous(memory_format=torch.channels_last)
            v = x[:, a:]                                                    # the second half: channel offset a
            refs = [_heads(_conv64(v, wt), heads) for wt in (w1, w2)]
            taps = [_taps(wt) for wt in (w1, w2)]                          # held: read through raw pointers
            src, dst = ac._layout(hw * 2 * a, 2 * a, 0, a), ac._layout(heads * hw * d, d, hw * d, d)
            o = torch.randn(n, heads, hw, d, generator=gen).to(dtype)
            o_ref = _conv64(o.transpose(-1, -2).reshape(n, a, h, w), w1)
            outs = []
            for threads in (1, 2):
                ys = [torch.full((n, heads, hw, d), 7.0, dtype=dtype) for _ in range(2)]
                y = torch.full((n, a, h, w), 7.0, dtype=dtype).contiguous(memory_format=torch.channels_last)
                fn = getattr(lib, f'polynext_heads_dw_{suffix}')
                s1 = fn(x.data_ptr() + a * x.element_size(), src, taps[0].data_ptr(), ys[0].data_ptr(),
                        taps[1].data_ptr(), ys[1].data_ptr(), dst, n, h, w, a, k, threads)
                s2 = fn(o.data_ptr(), dst, taps[0].data_ptr(), y.data_ptr(), None, None,
                        ac._layout(hw * a, a, 0, a), n, h, w, a, k, threads)
                if not built:
                    assert s1 == s2 == 1 and all((t == 7).all() for t in ys + [y])
                    continue
                assert s1 == s2 == 0
                outs.append(ys + [y])
                for got, ref in zip(ys + [y], refs + [o_ref]):
                    scale = ref.abs().max()
                    if dtype == torch.float32:
                        assert (got.double() - ref).abs().max() <= 1e-6 * scale, (n, a, h, w, k)
                    else:   # rounded once: half a bf16 ulp of the value, and float32's own error
                        assert ((got.double() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-5 * scale).all(), (n, a, h, w, k)
            if built:
                assert all(torch.equal(p, q) for p, q in zip(*outs))
    x = torch.randn(1, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    y = torch.full_like(x, 7.0)
    w4, layout = torch.randn(16, 32), ac._layout(36 * 32, 32, 0, 32)
    assert lib.polynext_heads_dw_f32(x.data_ptr(), layout, w4.data_ptr(), y.data_ptr(), None, None, layout,
                                     1, 6, 6, 32, 4, 1) == 1                                    # an even kernel
    assert lib.polynext_heads_dw_f32(x.data_ptr(), layout, w4.data_ptr(), y.data_ptr(), None, None, layout,
                                     1, 6, 6, 24, 3, 1) == 1                                    # 24 channels
    assert (y == 7).all()


def _apolynext(**kw):
    torch.manual_seed(0)
    model = timm.create_model('apolynext_t', init_channels=16, num_classes=10, cells=(1, 1, 1, 1), **kw).eval()
    for p in model.parameters():   # non-trivial head scales and gates
        p.data.add_(0.05 * torch.randn_like(p))
    return model


@needs_cc
@pytest.mark.skipif(not (AVX512 or AVX2), reason='the kernel needs AVX-512 or AVX2')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_models_take_the_kernel_at_inference_only(dtype, monkeypatch):
    """apolynext_t at CPU inference runs each PolyAttn's Q/K/V convolutions as one kernel call and its output
    convolution as another, logits within 2e-5 of PyTorch's path in float32 (bf16 within its own rounding); with
    autograd recording, sliding-window attention, ``heads_convs(False)``, ``kernels(False)`` and ``fusion(False)``
    it is PyTorch's path."""
    calls = []
    for name in ('_attention_convs', '_heads_conv'):
        real = getattr(ac, name)
        monkeypatch.setattr(ac, name, lambda t, *a, real=real, name=name: calls.append(name) or real(t, *a))
    model = _apolynext().to(dtype).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(dtype).contiguous(memory_format=torch.channels_last)
    n_attn = sum(isinstance(m, PolyAttn) for m in model.modules())
    assert n_attn > 0
    with torch.no_grad():
        y = model(x).float()
        assert calls == ['_attention_convs', '_heads_conv'] * n_attn
        with ck.heads_convs(False):
            ref = model(x).float()
        with ck.kernels(False):
            model(x)
        with fusion(False):
            model(x)
        set_attention_window(model, 3)
        model(x)
        set_attention_window(model, None)
    tol = 2e-5 if dtype == torch.float32 else 5e-2
    assert (y - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())
    model(x).sum().backward()                                                 # training: autograd records
    assert len(calls) == 2 * n_attn


@needs_cc
@pytest.mark.skipif(not (AVX512 or AVX2), reason='the kernel needs AVX-512 or AVX2')
@pytest.mark.parametrize('name', ['apolynext_t', 'apolynext_t_bn'])
def test_folded_model_takes_the_kernel(name, monkeypatch):
    """The folded model (head scale already in Q's weights) takes the kernel for both of its normalisations (the
    l1 rows and the fully polynomial model's constant row scale), with the logits of the unfolded model."""
    calls = []
    real = ac._attention_convs
    monkeypatch.setattr(ac, '_attention_convs', lambda t, *a: calls.append(1) or real(t, *a))
    torch.manual_seed(0)
    model = timm.create_model(name, init_channels=16, num_classes=10, cells=(1, 1, 1, 1),
                              **({'img_size': 64} if name.endswith('_bn') else {}))
    x = torch.randn(8, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    if name.endswith('_bn'):
        calibrate_running_stats(model, x)
    model.eval()
    with torch.no_grad():
        folded = fold_for_inference(model).to(memory_format=torch.channels_last)
        with ck.heads_convs(False):
            ref = folded(x)
        assert calls == []
        y = folded(x)
    assert len(calls) == sum(isinstance(m, PolyAttn) for m in model.modules()) > 0
    assert (y - ref).abs().max() <= 2e-5 * max(1.0, ref.abs().max().item())


@needs_cc
@pytest.mark.skipif(not (AVX512 or AVX2), reason='the kernel needs AVX-512 or AVX2')
def test_applies_checks_before_the_kernel():
    """What the kernel does not serve goes to PyTorch's path: weights or an input that record a gradient, NCHW, float64, float32
    under bf16 autocast, a head dimension that is not a multiple of 16, convolutions that are not bias-free "same"
    depthwise ones, the switch off."""
    attn = PolyAttn(128, head_dim=32).eval()                    # two heads: A = 64
    assert attn.attn_dim == 64
    convs = (attn.q_conv, attn.k_conv, attn.v_conv, attn.final_conv)
    x = torch.randn(2, 128, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert ac.attention_convs_applies(x, 64, 32, convs)
        assert not ac.attention_convs_applies(x.contiguous(), 64, 32, convs)                   # NCHW
        assert not ac.attention_convs_applies(x.double(), 64, 32, convs)
        assert not ac.attention_convs_applies(x, 64, 8, convs)                                 # head dim 8
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not ac.attention_convs_applies(x, 64, 32, convs)
        biased = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        assert not ac.attention_convs_applies(x, 64, 32, convs[:3] + (biased,))
        shifted = nn.Conv2d(64, 64, 3, padding=2, groups=64, bias=False)
        assert not ac.attention_convs_applies(x, 64, 32, convs[:3] + (shifted,))
        with ck.heads_convs(False):
            assert not ac.attention_convs_applies(x, 64, 32, convs)
    assert not ac.attention_convs_applies(x, 64, 32, convs)                                    # weights record
    for m in convs:
        m.weight.requires_grad_(False)
    assert ac.attention_convs_applies(x, 64, 32, convs)
    assert not ac.attention_convs_applies(x.requires_grad_(), 64, 32, convs)   # frozen weights, the input records
    with pytest.raises(RuntimeError, match='4x4 depthwise convolution .* attention_convs_applies'):
        ac._heads_conv(torch.randn(1, 2, 36, 32), torch.randn(16, 64), 6, 6)


@needs_cc
@pytest.mark.skipif(not (AVX512 or AVX2), reason='the kernel needs AVX-512 or AVX2')
def test_the_profiler_counts_them_as_depthwise_convolutions():
    """``polynext profile``: the two operators in the depthwise class with their MACs (Q's and K's 5x5 and V's 3x3 on
    A channels; the output's 3x3)."""
    from polynext.perf import profile_model
    torch.manual_seed(0)
    model = timm.create_model('apolynext_t', init_channels=16, num_classes=5, cells=(1, 1, 1, 1))
    prof = profile_model(model, mode='infer', batch_size=2, img_size=64, runs=1, warmup=1)
    ours = {(cls, op, shape): row for (cls, op, shape), row in prof.ops.items()
            if op in ('polynext::attention_convs', 'polynext::heads_conv')}
    assert {cls for cls, _, _ in ours} == {'depthwise conv'}
    # stage 2 (64 channels at 4x4 of a 64 px image, one head of 32): the projection has 2 x 32 channels
    qkv = ours[('depthwise conv', 'polynext::attention_convs', '2x64x4x4')]
    assert qkv.calls > 0 and qkv.macs == qkv.calls * 2 * 32 * 4 * 4 * (25 + 25 + 9)
    out = ours[('depthwise conv', 'polynext::heads_conv', '2x1x16x32')]
    assert out.calls == qkv.calls and out.macs == out.calls * 2 * 32 * 16 * 9


@needs_cc
@pytest.mark.skipif(not (AVX512 or AVX2), reason='the kernel needs AVX-512 or AVX2')
def test_the_benchmark_at_a_tiny_size(tmp_path, capsys):
    """``benchmarks/attention_convs.py --whole-model`` at 2 images of 64 px: apolynext_t's two PolyAttn shapes (stage
    2's 192 channels at 4x4, stage 3's 288 at 2x2), both paths timed with outputs within float32 rounding, the
    whole-model A/B, the JSON."""
    import json
    from conftest import load_benchmark
    out = tmp_path / 'ac.json'
    assert load_benchmark('attention_convs').main(['apolynext_t', '--batch-size', '2', '--img-size', '64', '--runs',
                                                   '1', '--whole-model', '--json', str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data['rows']
    assert [r['shape'] for r in rows] == [[2, 192, 4, 4], [2, 288, 2, 2]]
    assert [r['heads'] for r in rows] == [3, 5]
    assert all(r['kernel_ms'] > 0 and r['pytorch_ms'] > 0 and r['max_rel_diff'] < 1e-5 for r in rows)
    (model,) = data['whole_model']
    assert model['model'] == 'apolynext_t' and model['speedup'] > 0 and model['max_abs_logit_diff'] < 2e-5
    assert 'PolyAttn.attend ms' in capsys.readouterr().out


def test_the_benchmark_refuses_where_the_kernel_is_not_built(monkeypatch, capsys):
    """Without the kernel there is nothing to compare: one line that says so, before anything runs."""
    from conftest import load_benchmark
    monkeypatch.setattr(ck.kernels, 'on', False)
    with pytest.raises(SystemExit):
        load_benchmark('attention_convs').main(['apolynext_t', '--runs', '1'])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'not built here (it needs AVX-512 or AVX2' in err
