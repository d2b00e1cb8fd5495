"""Encrypted inference (issue 13): the HE compiler, the simulator, the SEAL backend, the analysis."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import polynext  # noqa: F401
from polynext.errors import ConfigError
from polynext.fhe.analyze import analyze, calibration_ranges, plan_program
from polynext.fhe.graph import NotPolynomialError, build_graph, evaluate
from polynext.fhe.params import HE_STANDARD_128, CKKSParams, choose_params
from polynext.fhe.program import (
    CompileOptions, LevelBudgetError, Layout, Packing, compile_graph, pack_images, unpack_logits,
)
from polynext.fhe.simulate import ckks_noise, simulate
from polynext.models.folded import fold_for_inference
from polynext.models.polynext import calibrate_running_stats

ONE_BLOCK = dict(norm='bn', init_channels=4, img_size=8, cells=(1,), blocks=(1,), width_mults=(1,),
                 conv_expansion=(1,), mlp_expansion=(2,), coarse_kernels=(3,))


def _calibrated(name, n_in=3, seed=0, **kw):
    """A float64 bn model with perturbed constants and running statistics from random images."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=5, **kw).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    size = model.img_size
    return calibrate_running_stats(model, torch.randn(16, n_in, *size, generator=gen, dtype=torch.float64))


def _simulate(model, x, slots=8192, **opts):
    folded = fold_for_inference(model)
    graph = build_graph(folded)
    prog = compile_graph(graph, CompileOptions(slots=slots, max_depth=200, **opts))
    res = simulate(prog, pack_images(prog, x))
    return unpack_logits(prog, res.outputs, len(x)), graph, prog


# every block type: PolyConv + PolyMLP + head (one block), the multi-input skip and a sep3x3 reduction
# (two stages, 12 px: pools over 12x12 and 6x6, not powers of two), a dense 3x3 reduction, a stride-4 stem
# (the client's space-to-depth) with multiplexed channels after each reduction
CASES = {
    'one_block': ('cpolynext_lr', ONE_BLOCK),
    'skip_and_sep_reduction': ('cpolynext_lr', dict(norm='bn', init_channels=4, img_size=12, cells=(2, 2),
                                                    blocks=(1, 1), width_mults=(1, 2), conv_expansion=(1, 1),
                                                    mlp_expansion=(2, 2), coarse_kernels=(3, 5))),
    'dense_reduction': ('cpolynext_lr', dict(norm='bn', init_channels=4, img_size=8, cells=(1, 1), blocks=(1, 1),
                                             width_mults=(1, 2), conv_expansion=(1, 1), mlp_expansion=(2, 2),
                                             coarse_kernels=(3, 5), downsample=('sep3x3', 'full3x3'))),
    'patch4_stem': ('cpolynext_t_bn', dict(init_channels=4, img_size=32, cells=(1, 1, 1, 1), blocks=(1, 1, 1, 1))),
}


@pytest.mark.parametrize('case', list(CASES))
def test_simulator_equals_pytorch(case):
    name, kw = CASES[case]
    model = _calibrated(name, **kw)
    x = torch.randn(3, 3, *model.img_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ref = model(x).numpy()
    logits, graph, prog = _simulate(model, x.numpy())
    assert np.abs(evaluate(graph, x.numpy()) - ref).max() < 1e-9 * max(1.0, np.abs(ref).max())
    assert np.abs(logits - ref).max() < 1e-9 * max(1.0, np.abs(ref).max())
    # the level accounting of the program is the graph's: nothing but rotations happen between levels
    assert prog.levels == _graph_depth(graph)


def _graph_depth(graph):
    d = {}
    for n in graph.nodes:
        base = max((d[i] for i in n.inputs), default=0)
        d[n.id] = base + (n.kind in ('linear', 'mul'))
    return d[graph.output]


def test_level_accounting_one_block_by_hand():
    """stem∘merge∘norm 1, PolyConv 3 (dw∘pw | product | pw∘dw∘norm), PolyMLP 3 (fc_in | product |
    fc_out∘norm), head 3 (proj∘norm | product | pool + fc): 10 levels, 3 ct×ct products."""
    model = _calibrated('cpolynext_lr', **ONE_BLOCK)
    graph = build_graph(fold_for_inference(model))
    prog = compile_graph(graph, CompileOptions(slots=8192, max_depth=200))
    level = {}
    for op, layer in zip(prog.ops, prog.op_layer):
        if op[1] >= 0:
            level[prog.layer_names[layer]] = max(level.get(prog.layer_names[layer], 0), prog.depth[op[1]])
    p = 'stages.0.cells.0'
    expect = {f'{p}.merge': 1, f'{p}.blocks.0.mixer.coarse': 2, f'{p}.blocks.0.mixer.fine': 2,
              f'{p}.blocks.0.mixer.product': 3, f'{p}.blocks.0.mixer.out': 4, f'{p}.blocks.0.mixer.residual': 4,
              f'{p}.blocks.0.mlp.fc_in_a': 5, f'{p}.blocks.0.mlp.product': 6, f'{p}.blocks.0.mlp.fc_out': 7,
              'head.proj_left': 8, 'head.product': 9, 'head.pool': 9, 'head.fc': 10}
    assert {k: level[k] for k in expect} == expect
    assert prog.levels == 10 and graph.ct_products() == 3
    counts = prog.counts()
    # ciphertext products: the 4-channel stream fills a ciphertext's image blocks (32 images of 4x64 slots),
    # so the head's 8-channel halves take two ciphertexts each: 1 + 1 + 2
    assert prog.packing.images == 32 and counts['mul'] == 4
    # too few levels: one clear error naming where the budget runs out
    with pytest.raises(LevelBudgetError, match='no bootstrapping'):
        compile_graph(graph, CompileOptions(slots=8192, max_depth=6))


def test_bootstrap_placement_and_range_scales():
    model = _calibrated('cpolynext_lr', **CASES['skip_and_sep_reduction'][1])
    x = np.random.default_rng(2).standard_normal((2, 3, 12, 12))
    graph = build_graph(fold_for_inference(model))
    ranges = calibration_ranges(graph, x)
    prog = compile_graph(graph, CompileOptions(slots=8192, max_depth=12, bootstrap_depth=4, ranges=ranges))
    assert prog.levels <= 12 and prog.counts()['boot'] >= 2
    res = simulate(prog, pack_images(prog, x), track_ranges=True)
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).numpy()
    assert np.abs(unpack_logits(prog, res.outputs, 2) - ref).max() < 1e-9 * max(1, np.abs(ref).max())
    for node in prog.boot_nodes:           # what is bootstrapped lies in [-1, 1] after its range scale
        assert ranges[node] * prog.kappa[node] <= 0.25 + 1e-12


def test_packing_layout_multiplexed():
    pk = Packing(slots=1024, h0=4, w0=4, images=2)       # 512 slots per image: 32 channel blocks of 16
    lay = Layout(c=8, h=2, w=2, gap=2, pk=pk)            # after one reduction: 4 channels per block
    assert lay.cpc == 128 and lay.n_cts == 1
    assert list(lay.base(np.arange(5))) == [0, 1, 4, 5, 16]
    assert list(lay.positions()) == [0, 2, 8, 10]


def test_demo_model_simulated_with_ckks_noise():
    from polynext.fhe.demo import digits_arrays, load_demo_model
    model, meta = load_demo_model()
    xtr, _, xva, yva = digits_arrays(8, meta['eval']['mean'], meta['eval']['std'])
    x = xva[:32]
    with torch.no_grad():
        ref = model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    graph = build_graph(fold_for_inference(model.double()))
    plan = plan_program(graph, calibration_ranges(graph, xtr[:64]))
    prog, params = plan.program, plan.params
    assert (params.ring_dim, params.levels, params.security) == (32768, 17, '128-bit')
    assert prog.packing.images == 32 and len(prog.rotation_steps()) <= 16
    clean = unpack_logits(prog, simulate(prog, pack_images(prog, x)).outputs, 32)
    assert np.abs(clean - ref).max() < 1e-4
    noisy = simulate(prog, pack_images(prog, x), noise=ckks_noise(params.ring_dim, params.scale_bits), seed=0)
    logits = unpack_logits(prog, noisy.outputs, 32)
    assert np.abs(logits - ref).max() < 1e-3
    assert (logits.argmax(1) == ref.argmax(1)).all()
    assert (ref.argmax(1) == yva[:32]).mean() >= 0.9


def test_ln_model_refused_naming_its_first_layernorm():
    model = timm.create_model('cpolynext_lr', init_channels=4, num_classes=3, cells=(1,), blocks=(1,),
                              width_mults=(1,), conv_expansion=(1,), mlp_expansion=(2,), coarse_kernels=(3,)).eval()
    with pytest.raises(NotPolynomialError, match=r'first non-polynomial op is stages\.0\.cells\.0\.norm '
                                                 r'\(ChannelLayerNorm'):
        build_graph(fold_for_inference(model))


def test_analyze_cli_refuses_ln_model_in_one_line():
    out = subprocess.run([sys.executable, '-m', 'polynext', 'fhe', 'analyze', 'cpolynext_t', '--img-size', '32',
                          '--no-bench'], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and 'ChannelLayerNorm' in lines[0] and 'stages.0.cells.0.norm' in lines[0]


def test_out_of_range_values_reported():
    model = _calibrated('cpolynext_lr', **ONE_BLOCK)
    x = np.random.default_rng(3).standard_normal((4, 3, 8, 8))
    rep = analyze(fold_for_inference(model), x, bench=False)
    assert rep['out_of_range'] == [] and rep['levels'] == 10
    with torch.no_grad():
        model.head.fc.weight.mul_(1e12)     # logits ~2^40: beyond any headroom (scale ≥ 30 bits, first prime 60)
    rep = analyze(fold_for_inference(model), x, bench=False)
    assert 'head.fc' in rep['out_of_range']
    row = next(r for r in rep['layers'] if r['layer'] == 'head.fc')
    assert row['headroom_bits'] < 0 and not row['in_range']


def test_params_checked_against_the_128_bit_table():
    p = choose_params(17)
    assert (p.ring_dim, p.levels) == (32768, 17) and p.total_bits <= HE_STANDARD_128[32768]
    assert p.security == '128-bit'
    assert choose_params(5).ring_dim == 16384
    with pytest.raises(ConfigError, match='below 128-bit security'):
        CKKSParams(4096, 10, 40).check()
    toy = CKKSParams(4096, 10, 40, insecure=True).check()
    assert toy.security == 'INSECURE' and 'INSECURE' in toy.describe()
    with pytest.raises(ConfigError, match='bootstrapping'):
        choose_params(60)


def test_structural_compile_counts_equal_numeric():
    model = _calibrated('cpolynext_lr', **ONE_BLOCK)
    graph = build_graph(fold_for_inference(model))
    a = compile_graph(graph, CompileOptions(slots=8192, max_depth=50))
    b = compile_graph(graph, CompileOptions(slots=8192, max_depth=50, numeric=False))
    assert a.counts() == b.counts() and a.levels == b.levels and a.rotation_steps() == b.rotation_steps()


def test_seal_one_block_tiny_ring_insecure():
    pytest.importorskip('seal')
    from polynext.fhe.seal_backend import SealBackend
    model = _calibrated('cpolynext_lr', **ONE_BLOCK)
    x = np.random.default_rng(4).standard_normal((4, 3, 8, 8))
    graph = build_graph(fold_for_inference(model))
    params = CKKSParams(4096, 10, 40, insecure=True)
    prog = compile_graph(graph, CompileOptions(slots=params.slots, max_depth=params.levels))
    be = SealBackend(params, prog.rotation_steps())
    cts = [[be.encrypt(row) for row in arr] for arr in pack_images(prog, x)]
    outs = be.run(prog, cts)
    logits = unpack_logits(prog, [np.stack([be.decrypt(c) for c in lst]) for lst in outs], len(x))
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).numpy()
    assert np.abs(logits - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert (logits.argmax(1) == ref.argmax(1)).all()


def test_demo_cli_insecure_ring_flagged(tmp_path):
    pytest.importorskip('seal')
    out = tmp_path / 'demo.json'
    r = subprocess.run([sys.executable, '-m', 'polynext', 'fhe', 'demo', '--images', '2', '--insecure-ring', '2048',
                        '--no-progress', '--json', str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 'INSECURE' in r.stdout and 'argmax agreement with plaintext: 100.0 %' in r.stdout
    res = json.loads(out.read_text())
    assert res['security'] == 'INSECURE' and res['argmax_agreement'] == 1.0 and res['levels'] == 17


def test_analyze_cli_on_the_demo_checkpoint(tmp_path):
    from polynext.fhe.demo import DEMO_WEIGHTS
    js, png = tmp_path / 'a.json', tmp_path / 'a.png'
    r = subprocess.run([sys.executable, '-m', 'polynext', 'fhe', 'analyze', str(DEMO_WEIGHTS), '--no-bench',
                        '--json', str(js), '--plot', str(png)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads(js.read_text())
    assert rep['levels'] == 17 and rep['ct_ct_products'] == 5 and rep['params']['ring_dim'] == 32768
    assert rep['bootstraps_per_ciphertext_set'] == 0 and rep['out_of_range'] == []
    assert png.stat().st_size > 1000 and 'levels: 17' in r.stdout


def test_fhe_levels_picks_the_deepest_model_that_fits():
    from polynext.fhe.depth import deepest_fitting
    from polynext.train.recipes import FHE_DIGITS_ARCH
    arch = dict(FHE_DIGITS_ARCH, img_size=8)
    # one block per cell: 1 (stem∘merge) + 6 per block + 1 per further merge + 3 (head) = 10, 17, 24, ...
    assert [deepest_fitting('cpolynext_lr', arch, n, 8, 10)[1]['cells'] for n in (10, 16, 17, 24)] == \
        [[1], [1], [2], [3]]
    kw, fit = deepest_fitting('cpolynext_lr', arch, 23, 8, 10)
    assert kw['cells'] == (2,) and kw['norm'] == 'bn' and fit['levels'] == 17
    with pytest.raises(ConfigError, match='even one cell of one block per stage needs 10 levels'):
        deepest_fitting('cpolynext_lr', arch, 9, 8, 10)


def test_analysis_of_the_deep_model_with_bootstrapping():
    """The moonshot model: 45 levels in all (13 ct×ct products); with OpenFHE's bootstrapping parameters
    (depth 29, 18 per bootstrap) the compiler places 2 bootstraps, at the merges of the last stage."""
    from polynext.fhe.analyze import OPENFHE_KEY_OVER_CT
    from polynext.fhe.demo import digits_arrays, load_demo_model
    from polynext.fhe.moonshot import DEEP_WEIGHTS
    model, meta = load_demo_model(str(DEEP_WEIGHTS))
    xtr = digits_arrays(8, meta['eval']['mean'], meta['eval']['std'])[0][:8]
    rep = analyze(fold_for_inference(model.double()), xtr, bench=False, bootstrap=True)
    assert rep['ct_ct_products'] == 13 and rep['levels_consumed'] == 45 and rep['levels'] <= 29
    assert rep['bootstrap_points'] == rep['bootstraps_per_ciphertext_set'] == 2
    assert [r['layer'] for r in rep['layers'] if r['bootstrapped']] == ['stages.2.cells.0.merge',
                                                                        'stages.2.cells.1.merge']
    assert rep['layers'][-1]['levels_consumed'] == 45 and rep['out_of_range'] == []
    est = rep['estimate']
    assert est['bytes_keys'] == int(OPENFHE_KEY_OVER_CT * est['bytes_ciphertext']) * (rep['galois_keys'] + 1)
    leveled = analyze(fold_for_inference(model.double()), xtr, bench=False)
    assert not leveled['bootstrapping'] and leveled['levels'] == leveled['levels_consumed'] == 45
    # what OpenFHE really bootstraps with (first − scale ≤ 8) leaves 4 levels between bootstraps at 128-bit,
    # N=2^16: a PolyConv needs 6, so the moonshot says it does not fit
    from polynext.fhe.analyze import OPENFHE_BOOT_RUN
    from polynext.fhe.moonshot import fit_128bit
    assert OPENFHE_BOOT_RUN['first_bits'] - OPENFHE_BOOT_RUN['scale_bits'] <= 8
    graph = build_graph(fold_for_inference(model.double()))
    assert fit_128bit(graph, calibration_ranges(graph, xtr)).startswith('does not fit N=2^16')


@pytest.fixture(scope='module')
def openfhe_python():
    from polynext.fhe.openfhe_backend import find_openfhe_python
    py = find_openfhe_python()
    if py is None:
        pytest.skip('OpenFHE backend: no Python with openfhe (`polynext fhe openfhe --setup` makes one from Python 3.10)')
    return py


def test_openfhe_worker_one_block_tiny_ring_insecure(openfhe_python):
    """The same program in the OpenFHE worker (a separate Python 3.10 process), leveled, on a toy ring."""
    from polynext.fhe.openfhe_backend import run_openfhe
    model = _calibrated('cpolynext_lr', **ONE_BLOCK)
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8))
    graph = build_graph(fold_for_inference(model))
    params = CKKSParams(4096, 10, 40, insecure=True)
    prog = compile_graph(graph, CompileOptions(slots=params.slots, max_depth=params.levels))
    res = run_openfhe(prog, params, pack_images(prog, x), python=openfhe_python)
    logits = unpack_logits(prog, res['outputs'], len(x))
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).numpy()
    assert np.abs(logits - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert (logits.argmax(1) == ref.argmax(1)).all() and res['bootstraps'] == 0
