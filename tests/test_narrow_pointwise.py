"""ops.narrow_pointwise: 1x1 convolutions with a multiple of 72 or 48 outputs at CPU inference by a C kernel,
y = W x (+ y): against float64 in every code path it has (AVX-512; builds without it refuse and write nothing),
partial pixel tiles and residuals, and the models take it exactly where it applies."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import polynext  # noqa: F401  (registers the models)
from polynext.models.folded import fold_for_inference
from polynext.ops import cpu_kernels as ck
from polynext.ops import narrow_pointwise as npw
from polynext.ops import pointwise
from polynext.ops.fused import fusion

from test_cpu_kernels import AVX512, _library_for, needs_cc

#: (N, K, M, H, W, residual): output widths in one and in several tiles (72, 144, 432 in 72-wide tiles of 5 pixels;
#: 48, 96, 240 in 48-wide tiles of 8), pixel counts that fill whole tiles and that leave a partial last tile
#: (126 = 25 x 5 + 1, 9, 35 = 4 x 8 + 3, 1), fewer pixels than one tile, input widths from 1 to the kernel's limit
SHAPES = [(2, 72, 72, 7, 9, True), (1, 5, 72, 3, 3, False), (3, 33, 48, 5, 5, False), (1, 144, 144, 4, 7, True),
          (2, 16, 96, 3, 5, True), (1, 1024, 48, 2, 3, False), (1, 1, 144, 1, 1, True), (2, 48, 96, 4, 4, False),
          (5, 72, 144, 1, 7, False), (2, 288, 432, 3, 5, True), (1, 100, 240, 3, 3, False)]


def _packed(w):
    """(M, K, 1, 1) → the kernel's chunks of 72 or 48 outputs, each (K, chunk) row-major."""
    return npw._packed(w)


@needs_cc
@pytest.mark.parametrize('march', [None, 'x86-64-v2', 'skylake-avx512'])
def test_narrow_pointwise_kernel_in_every_code_path(march, tmp_path):
    """float32 within 1e-6 of float64 (relative to the largest output), with and without the residual, one and two
    threads equal; builds without AVX-512 (x86-64-v2) say so and refuse every call, writing nothing; a width that
    is not a multiple of the tile, a tile other than 72 or 48, and more than 1024 inputs are refused everywhere."""
    lib = _library_for(march, tmp_path)
    built = AVX512 if march is None else march != 'x86-64-v2'
    assert lib.polynext_pointwise_built() == built
    gen = torch.Generator().manual_seed(0)
    for n, k, m, h, w, residual in SHAPES:
        x = torch.randn(n, k, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(m, k, 1, 1, generator=gen)
        base = torch.randn(n, m, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
        ref = F.conv2d(x.double(), weight.double()) + (base.double() if residual else 0)
        wp = _packed(weight)   # held: the kernel reads it through a raw pointer
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


@needs_cc
@pytest.mark.skipif(not AVX512, reason='the kernel needs AVX-512')
@pytest.mark.parametrize('name', ['cpolynext_t', 'apolynext_t'])
def test_models_take_the_kernel_at_inference_only(name, monkeypatch):
    """At CPU inference in float32 every 1x1 convolution with a multiple of 72 or 48 outputs (and no bias) runs on the kernel, the
    MLP's residual addition inside it, logits within 2e-5 of oneDNN's; so do the folded model's bias-free residual
    projections; with autograd recording, bf16, float32 under bf16 autocast, ``narrow_pointwise(False)``,
    ``kernels(False)`` and ``fusion(False)`` it is oneDNN's path (NCHW activations: the op-level test below)."""
    calls = []
    real = npw._call
    monkeypatch.setattr(npw, '_call', lambda x, wp, y, acc: calls.append((y.shape[1], acc)) or real(x, wp, y, acc))
    torch.manual_seed(0)
    model = timm.create_model(name, init_channels=16, num_classes=10, cells=(1, 1, 1, 1)).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 64, 64)
    narrow = [m for m in model.modules() if isinstance(m, pointwise.PointwiseConv2d) and npw.tile_width(m.out_channels)
              and m.bias is None]
    assert narrow
    with torch.no_grad():
        y = model(x)
        served = len(calls)
        assert served >= len(narrow) and any(acc for _, acc in calls) and all(npw.tile_width(m) for m, _ in calls)
        with ck.narrow_pointwise(False):
            ref = model(x)
        assert len(calls) == served
    assert (y - ref).abs().max() < 2e-5
    calls.clear()
    with torch.no_grad():
        assert (fold_for_inference(model)(x) - ref).abs().max() < 2e-5
    assert all(npw.tile_width(m) for m, _ in calls)
    served = len(calls)
    for off in (ck.narrow_pointwise(False), ck.kernels(False), fusion(False)):
        with torch.no_grad(), off:
            model(x)
    model(x).sum().backward()                                    # training: autograd needs oneDNN's convolution
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):        # float32 under bf16 autocast: not served
            model(x)
        copy.deepcopy(model).to(torch.bfloat16)(x.to(torch.bfloat16))   # bf16: not served
    assert len(calls) == served


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


@needs_cc
@pytest.mark.skipif(not AVX512, reason='the kernel needs AVX-512')
def test_the_benchmark_at_a_tiny_size(tmp_path, capsys):
    """``benchmarks/narrow_pointwise.py --whole-model`` at 2 images of 64 px: cpolynext_t's served shapes, both
    paths timed, the kernel within float32 rounding of float64, the whole-model A/B, the JSON; a model with no served
    shape is refused in one line."""
    import importlib.util
    import json
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        'narrow_pointwise_bench', Path(__file__).resolve().parents[1] / 'benchmarks' / 'narrow_pointwise.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / 'np.json'
    assert bench.main(['cpolynext_t', '--batch-size', '2', '--img-size', '64', '--runs', '1', '--whole-model',
                       '--json', str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data['rows']
    assert {(r['weight'][0], r['residual']) for r in rows} >= {(48, False), (96, False), (48, True)}
    assert all(r['kernel_ms'] > 0 and r['onednn_ms'] > 0 and r['max_rel_diff_fp64'] < 1e-6 for r in rows)
    (model,) = data['whole_model']
    assert model['model'] == 'cpolynext_t' and model['speedup'] > 0 and model['max_abs_logit_diff'] < 2e-5
    assert '1x1 convolution ms' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(['convformer_s18', '--img-size', '64', '--batch-size', '1', '--runs', '1'])
    assert 'no 1x1 convolution the kernel serves' in capsys.readouterr().err.strip().splitlines()[-1]


@needs_cc
@pytest.mark.skipif(not AVX512, reason='the kernel needs AVX-512')
def test_the_profiler_counts_the_kernel_as_1x1_convolutions():
    """``polynext profile``: the kernel's operators in the 1x1 class with their MACs (pixels x inputs x outputs)."""
    from polynext.perf import profile_model
    torch.manual_seed(0)
    model = timm.create_model('cpolynext_t', init_channels=48, num_classes=5, cells=(1, 1, 1, 1))
    prof = profile_model(model, mode='infer', batch_size=2, img_size=64, runs=1, warmup=1)
    ours = {(cls, op, shape): row for (cls, op, shape), row in prof.ops.items() if op.startswith('polynext::point')}
    assert {op for _, op, _ in ours} == {'polynext::pointwise', 'polynext::pointwise_add_'}
    assert {cls for cls, _, _ in ours} == {'1x1 conv'}
    # stage 0, 2 x 48 channels at 16x16: the MLP's 48 → 96 input projection and its 48 → 48 residual projection
    # (PolyMLP's hidden width is 48) are among them
    stage0 = ours[('1x1 conv', 'polynext::pointwise_add_', '2x48x16x16')]
    assert stage0.macs == stage0.calls * 2 * 48 * 16 * 16 * 48 > 0


def test_the_benchmark_refuses_where_the_kernel_is_not_built(monkeypatch, capsys):
    """Without the kernel there is nothing to compare: one line that says so, before anything runs."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        'narrow_pointwise_bench', Path(__file__).resolve().parents[1] / 'benchmarks' / 'narrow_pointwise.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(ck.kernels, 'on', False)
    with pytest.raises(SystemExit):
        bench.main(['cpolynext_t', '--runs', '1'])
    assert 'narrow 1x1 kernel is not built here (it needs AVX-512' in capsys.readouterr().err.strip().splitlines()[-1]
