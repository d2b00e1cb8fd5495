"""The speed paths compute the same function: fused CPU inference, the dilated depthwise backward,
torch.compile(fullgraph=True), and the profiler's op-class accounting."""
import importlib
import importlib.util

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import polynext
from polynext.ops.depthwise import depthwise_conv2d
from polynext.ops.fused import fusion, fusion_available

from conftest import mini_kwargs, subprocess_env


def _depthwise_vs_autograd_fp64(k: int, d: int, hw, channels_last: bool, seed: int):
    """depthwise_conv2d against the plain convolution in fp64: same output bits, gradients within 1e-11, the
    weight gradient in the weight's layout (a channels-last model's: DDP's buckets follow the parameter).
    Returns the output's autograd node name and the input."""
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(6, 6, k, padding=d * (k - 1) // 2, dilation=d, groups=6, bias=False).double()
    x = torch.randn(2, 6, *hw, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        conv = conv.to(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn(2, 6, *hw, generator=gen, dtype=torch.float64)
    y = depthwise_conv2d(x, conv)
    gx, gw = torch.autograd.grad(y, (x, conv.weight), g)
    y_ref = conv(x)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, conv.weight), g)
    assert torch.equal(y, y_ref)
    assert (gx - gx_ref).abs().max() < 1e-11 and (gw - gw_ref).abs().max() < 1e-11
    assert gw.stride() == conv.weight.stride()
    return type(y.grad_fn).__name__, x


# 14x14 / 16x16: the phase split (5x5, 7x7 kernels: cut into k x 3 and k x 1 column gradients; 15x15,
# 14x18 with d=2 and 20x19 with d=3: sides that are not multiples of d, zero-padded first); 4x4, 2x2, 3x20: the crop of the taps that only meet padding
# (5x5 → 3x3 on 4x4, → 1x1 on 2x2; 3 rows x 20 columns: cropped in height only); 8x8, 7x7: the
# per-tap weight gradient (channels-last) or autograd's own backward (NCHW, not routed)
@pytest.mark.parametrize('k,d,hw', [(5, 2, (14, 14)), (3, 2, (16, 16)), (5, 2, (4, 4)), (5, 2, (2, 2)),
                                    (3, 2, (2, 2)), (5, 2, (3, 20)), (5, 2, (8, 8)), (5, 2, (7, 7)),
                                    (5, 2, (15, 15)), (5, 2, (14, 18)), (7, 2, (16, 16)), (5, 3, (20, 19))])
@pytest.mark.parametrize('channels_last', [True, False])
def test_dilated_depthwise_backward_equals_autograd_fp64(k, d, hw, channels_last):
    node, _ = _depthwise_vs_autograd_fp64(k, d, hw, channels_last, seed=0)
    routed = channels_last or min(hw) <= d * (k - 1) // 2 or hw[0] * hw[1] >= 14 * 14
    assert ('DepthwiseConv2dFunction' in node) == routed


# PolyAttn's undilated 5x5 Q / K convolutions: the column cut at every size (14x14 and 7x7, the APolyNeXt maps;
# 5x9, 3x3 and 2x2: the crop of taps that only meet padding; 1x1), both layouts; undilated 3x3 ones stay plain
@pytest.mark.parametrize('k,hw', [(5, (14, 14)), (5, (7, 7)), (5, (5, 9)), (5, (3, 3)), (5, (2, 2)), (5, (1, 1)),
                                  (7, (8, 8))])
@pytest.mark.parametrize('channels_last', [True, False])
def test_undilated_wide_depthwise_backward_equals_autograd_fp64(k, hw, channels_last):
    node, x = _depthwise_vs_autograd_fp64(k, 1, hw, channels_last, seed=1)
    assert 'DepthwiseConv2dFunction' in node
    conv3 = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False).double()
    assert type(depthwise_conv2d(x, conv3).grad_fn).__name__ == 'ConvolutionBackward0'


def test_undilated_wide_depthwise_under_bf16_autocast_matches_autograd():
    """Under CPU bf16 autocast (the training path) the function computes in bf16 like autograd does, and
    returns gradients in the parameters' and input's dtypes."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 5, padding=2, groups=32, bias=False)
    x = torch.randn(4, 32, 14, 14).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(4, 32, 14, 14)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = depthwise_conv2d(x, conv)
        y_ref = conv(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    gx, gw = torch.autograd.grad(y, (x, conv.weight), g.bfloat16())
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32
    # against float64 on the same bf16 values: within bf16's rounding (2^-7 of the largest value), as autograd's bf16
    # path, whose own rounding depends on the CPU (on a Zen 3, without AVX-512 BF16, its dL/dx is 1.4 % off, this
    # one's 0.3 %: the two are not compared with each other)
    xd = x.detach().bfloat16().double().requires_grad_()
    wd = conv.weight.detach().bfloat16().double().requires_grad_()
    gxd, gwd = torch.autograd.grad(F.conv2d(xd, wd, padding=2, groups=32), (xd, wd), g.bfloat16().double())
    for ours, exact in ((gx, gxd), (gw, gwd)):
        assert (ours.double() - exact).abs().max() <= 2 ** -7 * exact.abs().max()


def test_polyattn_training_routes_its_5x5_convolutions():
    torch.manual_seed(0)
    model = timm.create_model('apolynext_t', init_channels=8, num_classes=5, cells=(1, 1, 1, 1)).train()
    y = model(torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    names, stack, seen = [], [y.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    attn = [m for m in model.modules() if isinstance(m, polynext.models.polynext.PolyAttn)]
    # every PolyAttn: Q and K; every PolyConv: the dilated coarse branch
    coarse = [m for m in model.modules() if isinstance(m, polynext.models.polynext.PolyConv)]
    assert sum('DepthwiseConv2dFunction' in n for n in names) == 2 * len(attn) + len(coarse) and attn


def test_strided_depthwise_runs_in_float32_in_cpu_autocast_training():
    from polynext.ops.depthwise import StridedDepthwiseConv2d
    torch.manual_seed(0)
    conv = StridedDepthwiseConv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
    plain = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
    assert list(conv.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 8, 10, 10).bfloat16().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = conv(x)                                  # training: float32 from the bf16 input
        with torch.no_grad():
            assert conv(x).dtype == torch.bfloat16   # inference keeps autocast's choice
    assert y.dtype == torch.float32
    y_ref = plain(x.detach().float().requires_grad_())
    assert torch.equal(y, y_ref)
    gx, gw = torch.autograd.grad(y, (x, conv.weight), torch.ones_like(y))
    gw_ref = torch.autograd.grad(y_ref, plain.weight, torch.ones_like(y_ref))[0]
    assert gx.dtype == torch.bfloat16 and torch.equal(gw, gw_ref)
    model = timm.create_model('apolynext_t', init_channels=8, num_classes=5, cells=(1, 1, 1, 1))
    assert any(isinstance(m, StridedDepthwiseConv2d) for m in model.modules())


def _pointwise_fusions(model, x):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.inference_mode():
            out = model(x)
    # oneDNN's post-ops, PolyConv's core kernel (ops.polyconv_dw, where built: the product inside it) and the narrow
    # 1x1 kernel's residual form (ops.narrow_pointwise, where built: the addition inside it)
    return out, sum(e.count for e in prof.key_averages()
                    if e.key.startswith('mkldnn::_convolution_pointwise')
                    or e.key in ('polynext::polyconv_dw', 'polynext::pointwise_add_'))


@pytest.mark.skipif(not fusion_available(), reason='this torch build has no oneDNN post-op convolutions')
@pytest.mark.parametrize('name', ['cpolynext_t', 'apolynext_t'])
def test_fused_inference_equals_unfused(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **mini_kwargs(name)).eval()
    for p in model.parameters():           # non-trivial gates and norm weights
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 64, 64)
    with fusion(False):
        plain, n_plain = _pointwise_fusions(model, x)
    fused, n_fused = _pointwise_fusions(model, x)
    folded, n_folded = _pointwise_fusions(polynext.fold_for_inference(model), x)
    assert n_plain == 0
    cells = sum(len(c.blocks) for s in model.stages for c in s.cells)
    # every block: the MLP's residual add; C blocks: the coarse⊙fine product; A blocks: the proj add
    assert n_fused >= 2 * cells - 1 and n_folded >= 2 * cells - 1
    assert (fused - plain).abs().max() < 2e-5 and (folded - plain).abs().max() < 2e-5


def test_compile_fullgraph_inference_and_training():
    """A 4-cell APolyNeXt (PolyConv and PolyAttn stages) traces as one graph in both modes."""
    torch.manual_seed(0)
    model = timm.create_model('apolynext_t', init_channels=8, num_classes=5, cells=(1, 1, 1, 1))
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    model.eval()
    with torch.inference_mode():
        ref = model(x)
        out = torch.compile(model, fullgraph=True, backend='aot_eager')(x)
    assert (out - ref).abs().max() < 1e-5
    model.train()
    F.cross_entropy(model(x), torch.arange(2)).backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    F.cross_entropy(torch.compile(model, fullgraph=True, backend='aot_eager')(x), torch.arange(2)).backward()
    worst = max(((p.grad - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
                for p, g in zip(model.parameters(), ref_grads))
    assert worst < 1e-4
    torch._dynamo.reset()


def test_profile_counts_every_mac_in_its_class():
    from polynext.perf import format_profile, profile_model
    from polynext.profile import count_macs
    torch.manual_seed(0)
    model = timm.create_model('apolynext_t', init_channels=8, num_classes=5, cells=(1, 1, 1, 1))
    prof = profile_model(model, mode='infer', batch_size=2, img_size=64, runs=1, warmup=1)
    macs = {name: c.macs for name, c in prof.classes.items()}
    expected = 2 * count_macs(model, input_size=64)
    counted = macs['1x1 conv'] + macs['depthwise conv'] + macs['other conv'] + macs['attention']
    # the classifier (a Linear, class 'other') is the only MAC not counted in a class
    head = 2 * model.get_classifier().in_features * 5
    assert counted == pytest.approx(expected - head, rel=1e-9)
    assert macs['attention'] > 0 and macs['depthwise conv'] > 0
    assert 'depthwise conv' in format_profile('m', prof) and 'GPU kernels' not in format_profile('m', prof)
    assert prof.clock == 'cpu' and prof.busy_s == pytest.approx(sum(c.seconds for c in prof.classes.values()))
    if not torch.cuda.is_available():   # a device that is not there: one line, before anything runs
        from polynext.errors import ConfigError
        with pytest.raises(ConfigError, match='--device cuda: no CUDA device is available on this machine'):
            profile_model(model, device='cuda')


class _Event:
    """A stand-in for torch.profiler's FunctionEvent: a name, children, CPU time, and the GPU kernels the
    profiler linked to it (``kernels_us``), with FunctionEvent's rules for the totals."""

    def __init__(self, name, children=(), cpu_us=0.0, kernels_us=0.0, shapes=None, concrete=None, seq=-1,
                 start=0, gpu=False):
        from types import SimpleNamespace
        from torch.autograd import DeviceType
        self.name, self.cpu_children, self.cpu_parent = name, list(children), None
        for c in self.cpu_children:
            c.cpu_parent = self
        self.device_type = DeviceType.CUDA if gpu else DeviceType.CPU
        self.kernels_us, self.input_shapes, self.concrete_inputs = kernels_us, shapes or [], concrete or []
        self.sequence_nr, self.time_range = seq, SimpleNamespace(start=start)
        self.self_cpu_time_total = cpu_us

    @property
    def cpu_time_total(self):
        return self.self_cpu_time_total + sum(c.cpu_time_total for c in self.cpu_children)

    @property
    def self_device_time_total(self):
        return self.kernels_us

    @property
    def device_time_total(self):
        return self.kernels_us + sum(c.device_time_total for c in self.cpu_children)


def test_profile_on_a_gpu_sorts_kernel_time_by_the_operator_that_launched_it():
    """On CUDA a class gets the time of the kernels its operators launched, not their CPU (launch) time;
    kernels launched by a compiled region inside the attention (the flex kernel: a Triton kernel under no aten
    operator), forward and backward, are attention; a kernel linked to no operator is 'other'. The same events
    on the CPU clock give the operators' CPU time, as before."""
    from polynext.perf import sort_events
    scope = 'polynext::scope::'
    conv = _Event('aten::conv2d', cpu_us=10, kernels_us=100, start=0,
                  shapes=[[2, 8, 4, 4], [16, 8, 1, 1], [], [], [], [], []], concrete=[None, None, None, [1, 1], [0, 0],
                                                                                      [1, 1], 1])
    attn = _Event(scope + 'attention', start=1, cpu_us=3, children=[
        _Event('Torch-Compiled Region: 0/0', cpu_us=4, children=[
            _Event('CompiledFunction', seq=7, cpu_us=5, children=[
                _Event('triton_tem_fused_flex_attention_0', cpu_us=6, kernels_us=300)])])])
    attn_bwd = _Event('autograd::engine::evaluate_function: CompiledFunctionBackward', seq=7, cpu_us=7, start=3,
                      children=[_Event('triton_tem_fused_flex_attention_backward_0', cpu_us=8, kernels_us=500)])
    norm = _Event(scope + 'norms', start=2, cpu_us=1, children=[
        _Event('aten::native_layer_norm', cpu_us=9, kernels_us=50, shapes=[[2, 4, 4, 16]])])
    kernels = [_Event(f'kernel{i}', kernels_us=us, gpu=True) for i, us in enumerate((100, 300, 500, 50, 25))]
    events = [conv, attn, attn_bwd, norm] + kernels

    gpu = sort_events(events, device=True).classes
    assert {k: round(c.seconds * 1e6, 6) for k, c in gpu.items() if c.seconds} == \
        {'1x1 conv': 100, 'attention': 800, 'norms': 50, 'other': 25}
    assert gpu['1x1 conv'].macs == 2 * 16 * 8 * 16 and gpu['1x1 conv'].calls == 1
    cpu = sort_events(events, device=False).classes
    assert {k: round(c.seconds * 1e6, 6) for k, c in cpu.items() if c.seconds} == \
        {'1x1 conv': 10, 'attention': 15, 'norms': 10, 'other': 18}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('mode', ['infer', 'train'])
def test_profile_on_cuda(mode):
    """On a GPU: every convolution MAC counted in its class, as on the CPU; the classes hold the kernels'
    time (the GPU busy for no longer than the profiled step) and the attention kernel is attention."""
    from polynext.perf import format_profile, measure_peaks, profile_model
    from polynext.profile import count_macs
    torch.manual_seed(0)
    kwargs = dict(init_channels=8, num_classes=5, cells=(1, 1, 1, 1))
    model = timm.create_model('cpolynext_t', **kwargs)
    peaks = measure_peaks('fp32', batch_size=2, runs=2, device='cuda', memory_mib=16)
    prof = profile_model(model, mode=mode, batch_size=2, img_size=64, runs=2, warmup=2, device='cuda', peaks=peaks)
    assert prof.clock == 'gpu' and 0 < prof.busy_s <= prof.profiled_step_s
    convs = sum(prof.classes[c].macs for c in ('1x1 conv', 'depthwise conv', 'other conv'))
    head = 2 * model.get_classifier().in_features * 5
    per_pass = 2 * count_macs(model, input_size=64) - head
    if mode == 'infer':
        assert convs == pytest.approx(per_pass, rel=1e-9)
    assert prof.classes['1x1 conv'].seconds > 0 and 'GPU kernels' in format_profile('m', prof)
    attn = profile_model(timm.create_model('apolynext_t', **kwargs), mode=mode, batch_size=2, img_size=64, runs=2,
                         warmup=2, device='cuda')
    assert attn.classes['attention'].seconds > 0


@pytest.mark.parametrize('kernel', ['onednn', 'mm'])
def test_profile_counts_1x1_weight_gradients_from_either_kernel(kernel):
    """In a training step every 1x1 layer does three products of its forward's size (forward, input and
    weight gradients), whichever kernel ``ops.pointwise`` takes for the weight gradient."""
    from polynext.ops.pointwise import weight_grad_backend
    from polynext.perf import profile_model
    torch.manual_seed(0)
    model = timm.create_model('cpolynext_t', init_channels=8, num_classes=5, cells=(1, 1, 1, 1))
    infer = profile_model(model, mode='infer', batch_size=2, img_size=64, runs=1, warmup=1)
    with weight_grad_backend(kernel):
        train = profile_model(model, mode='train', batch_size=2, img_size=64, runs=1, warmup=1)
    assert train.classes['1x1 conv'].macs == pytest.approx(3 * infer.classes['1x1 conv'].macs, rel=1e-9)


@pytest.mark.parametrize('name', ['cpolynext_t', 'apolynext_t'])
def test_profile_counts_the_layer_work_of_a_training_step(name):
    """A training step does three times a layer's forward work in the depthwise convolutions (forward, input
    and weight gradients; ``ops.depthwise``'s hand-written backward counted by the layer, not by the phase
    and column pieces it runs), twice in the stem (no input gradient) and 3.5 times in the attention
    (2 products forward; 5 backward: the recomputed scores and four gradients). The attention forward of a
    training step (``PolyAttn.attend``, called without the module's forward) is in its class too. And
    the per-operator table adds up to the class times."""
    from polynext.perf import OP_CLASSES, format_top_ops, profile_model
    torch.manual_seed(0)
    model = timm.create_model(name, init_channels=8, num_classes=5, cells=(1, 1, 1, 1))
    infer = profile_model(model, mode='infer', batch_size=2, img_size=64, runs=1, warmup=1)
    train = profile_model(model, mode='train', batch_size=2, img_size=64, runs=1, warmup=1)
    ratio = {c: train.classes[c].macs / infer.classes[c].macs for c in OP_CLASSES if infer.classes[c].macs}
    expected = {'1x1 conv': 3.0, 'depthwise conv': 3.0, 'other conv': 2.0}
    if name.startswith('a'):
        expected['attention'] = 3.5
    assert ratio == pytest.approx(expected, rel=1e-9)
    assert not any(op == 'matmul' and cls != 'attention' for cls, op, _ in train.ops)
    for prof in (infer, train):
        for cls in OP_CLASSES:   # one run: the operator rows are that run's, as the classes are
            assert sum(c.seconds for (k, _, _), c in prof.ops.items() if k == cls) == \
                pytest.approx(prof.classes[cls].seconds, rel=1e-9, abs=1e-12)
    assert train.page_faults is not None and train.page_faults >= 0
    top = train.top_ops(5)
    assert len(top) == 5 and [r['ms'] for r in top] == sorted((r['ms'] for r in top), reverse=True)
    assert top[0]['op'] in format_top_ops(train, 5)


def test_flex_attention_form_equals_the_reference_fp64():
    """The GPU kernel's formulation: forward through flex_attention itself (CPU, eager), and the
    score modification's gradients through the same softmax expression (PyTorch has no CPU
    backward for flex_attention)."""
    from polynext.ops.poly_attention import (_log_poly_score, flex_available, poly_attention_flex,
                                             poly_attention_reference)
    if not flex_available():
        pytest.skip('this torch has no flex_attention')
    gen = torch.Generator().manual_seed(0)
    q, k, v = (0.3 * torch.randn(2, 3, 40, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    ref = poly_attention_reference(q, k, v)
    assert (poly_attention_flex(q, k, v) - ref).abs().max() < 1e-12
    # a score of exactly -1 (query 0 against key 0): a zero weight, and a finite gradient equal to the reference's
    q[0, 0, 0], k[0, 0, 0] = 0., 0.
    q[0, 0, 0, 0], k[0, 0, 0, 0] = 1., -1.
    assert (q @ k.transpose(-1, -2))[0, 0, 0, 0] == -1
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    score_mod = _log_poly_score(4)     # the flex kernel's own score modification, here under autograd
    form = torch.softmax(score_mod(q @ k.transpose(-1, -2), None, None, None, None), dim=-1) @ v
    grads = torch.autograd.grad(form, (q, k, v), g)
    ref_grads = torch.autograd.grad(poly_attention_reference(q, k, v), (q, k, v), g)
    assert all(torch.isfinite(a).all() for a in grads)
    assert max((a - b).abs().max().item() for a, b in zip(grads, ref_grads)) < 1e-12
    q, k, v = (t.detach() for t in (q, k, v))
    assert (poly_attention_flex(q, k, v) - poly_attention_reference(q, k, v)).abs().max() < 1e-12


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.py end to end at toy sizes on the CPU: every section runs and passes."""
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / 'benchmarks' / 'gpu_check.py'
    spec = importlib.util.spec_from_file_location('gpu_check', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(['--device', 'cpu']) == 2                  # no CUDA: one message, nothing written
    assert mod.main(['--dry-run', '--device', 'cpu', '--json', str(tmp_path / 'r.json')]) == 0
    r = json.loads((tmp_path / 'r.json').read_text())
    assert r['dry_run'] and r['ok']
    assert [row['model'] for row in r['training_steps']] == list(mod.FAMILIES)
    assert {row['dtype'] for row in r['attention']} == {'float32', 'bfloat16'}
    assert r['attention'][0]['out_rel'] < 1e-5
    assert [row['model'] for row in r['throughput']] == ['cpolynext_s', 'apolynext_s']
    assert r['segmentation']['input'] == [2, 3, 64, 256] and r['segmentation']['grad_checkpointing']['ok']
    assert r['segmentation']['loss'] == pytest.approx(r['segmentation']['grad_checkpointing']['loss'], rel=0.1)
    assert r['failed_sections'] == [] and set(r['section_seconds']) == {'training_steps', 'attention', 'throughput',
                                                                       'segmentation'}


def test_gpu_session_script_dry_run_on_cpu(tmp_path):
    """tools/gpu_session.sh, the one command a GPU lease runs, end to end on the CPU (DRY=1: gpu_check at toy
    sizes, the gpu tests skip, the profile on the CPU): it imports polynext from src/, writes its seven files, and
    exits 0."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / 'out'
    env = dict(subprocess_env(), PYTHON=sys.executable, DRY='1')
    r = subprocess.run(['bash', 'tools/gpu_session.sh', str(out)], cwd=root, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ['env.txt', 'gpu_check.json', 'gpu_check.log', 'profile.json',
                                                     'profile.log', 'summary.txt', 'tests.log']
    assert str(root / 'src' / 'polynext') in (out / 'env.txt').read_text()
    result = json.loads((out / 'gpu_check.json').read_text())
    assert result['dry_run'] and result['ok']
    assert 'skipped' in (out / 'tests.log').read_text()
    summary = (out / 'summary.txt').read_text()
    assert summary.startswith('gpu_check exit 0') and 'profile exit 0' in summary
    assert json.loads((out / 'profile.json').read_text())['models']['cpolynext_t']['infer']['clock'] == 'cpu'
    usage = subprocess.run(['bash', 'tools/gpu_session.sh'], cwd=root, env=env, capture_output=True, text=True)
    assert usage.returncode != 0 and 'usage: bash tools/gpu_session.sh OUTDIR' in usage.stderr


def test_gpu_check_records_a_failure_and_runs_on(tmp_path, monkeypatch, capsys):
    """One GPU run is precious: a model or a section that raises is recorded with its error, the other
    models and sections still run, the JSON is written and the exit status is 1."""
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / 'benchmarks' / 'gpu_check.py'
    spec = importlib.util.spec_from_file_location('gpu_check_fail', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, 'FAMILIES', ('cpolynext_lr', 'cpolynext_nope', 'cpolynext_t'))
    monkeypatch.setattr(mod, 'check_attention', lambda device, dry: 1 / 0)
    monkeypatch.setattr(mod, 'throughput', lambda device, dry, runs: [])
    monkeypatch.setattr(mod, 'seg_memory', lambda device, dry: dict(ok=True))
    assert mod.main(['--dry-run', '--device', 'cpu', '--json', str(tmp_path / 'r.json')]) == 1
    r = json.loads((tmp_path / 'r.json').read_text())
    assert [(row['model'], row['ok']) for row in r['training_steps']] == [
        ('cpolynext_lr', True), ('cpolynext_nope', False), ('cpolynext_t', True)]
    assert 'cpolynext_nope' in r['training_steps'][1]['error']
    assert r['attention'] == dict(ok=False, error='ZeroDivisionError: division by zero',
                                  traceback=r['attention']['traceback'])
    assert r['failed_sections'] == ['training_steps', 'attention'] and not r['ok']
    assert 'SOME CHECKS FAILED' in capsys.readouterr().out


# The residual gates are folded into the branch's last weight (``_gated_conv``, the LayerNorm's weight):
# x + g · f(x) computed as x + f_g(x). Same values and gradients as the product, for every gate kind.
@pytest.mark.parametrize('mixer', ['conv', 'attn'])
@pytest.mark.parametrize('per_channel', [False, True])     # Sigmoid-Scale / free scalar; the LayerScale ablation
@pytest.mark.parametrize('drop_path', [0.0, 0.5])
def test_gate_folded_into_the_branch_equals_the_gated_product_fp64(mixer, per_channel, drop_path):
    from polynext.models.polynext import (LayerNorm2d, PolyAttn, PolyAttnBlock, PolyConv, PolyConvBlock,
                                          PolyMLP)
    torch.manual_seed(0)
    dim = 16
    if mixer == 'conv':
        block = PolyConvBlock(PolyConv(dim, 24, coarse_kernel=5), LayerNorm2d(dim), PolyMLP(dim, 20), drop_path)
    else:
        block = PolyAttnBlock(PolyAttn(dim, head_dim=8), LayerNorm2d(dim), PolyMLP(dim, 20), drop_path)
    block = block.double().train()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(4, dim, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    shape = (dim, 1, 1) if per_channel else ()
    g_mix = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    g_mlp = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(4, dim, 8, 8, dtype=torch.float64)
    inputs = [x, g_mix, g_mlp, *block.parameters()]

    def product_form():
        y = x + g_mix * block.drop_path(block.mix(x))
        return y + g_mlp * block.drop_path(block.mlp(y))

    results = []
    for fn in (lambda: block(x, g_mix, g_mlp), product_form):
        torch.manual_seed(1)                    # the same drop-path draws
        y = fn()
        results.append((y, torch.autograd.grad(y, inputs, gy)))
    (y, grads), (y_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    # the residual addition is a plain in-place add: no view copy in the backward (it cost a training step 7 %)
    nodes, seen = [y.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        assert 'CopySlices' not in type(node).__name__ and 'AsStrided' not in type(node).__name__
        nodes.extend(n for n, _ in node.next_functions)


def test_prefault_heap_touches_only_under_the_pinned_allocator(monkeypatch):
    """The profiler's page faults are kept out of the operators' times by touching the heap first; that is
    only possible when freed pages stay with the process (the pinned allocator), and is bounded."""
    import polynext.bench as bench
    from polynext.perf import prefault_heap
    monkeypatch.setattr(bench, 'allocator_status', lambda env=None: 'default')
    assert prefault_heap() == 0
    monkeypatch.setattr(bench, 'allocator_status', lambda env=None: 'pinned')
    assert prefault_heap(max_bytes=8 * 2**20) == 8 * 2**20


def test_compiled_flex_attention_compiles_past_dynamos_default_limit():
    """The CUDA path's compiled flex kernel must compile a new shape rather than let Dynamo fall back to
    flex_attention's unfused path (an N×N tensor per layer) once its recompile limit (8 by default) is
    spent. Run on the CPU (inductor's CPU flex kernel, forward only) with the global limit lowered to 1
    and a hit made an error: three shapes that each need their own kernel all compile, and equal the
    reference; the raised limit stays local to the call."""
    import torch._dynamo
    pa = importlib.import_module('polynext.ops.poly_attention')   # (polynext.ops.poly_attention is also a function)
    if not pa.flex_available():
        pytest.skip('this torch has no flex_attention')
    torch._dynamo.reset()
    pa._COMPILED_FLEX = None
    gen = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True), torch.no_grad():
        for shape in ((2, 2, 49, 32), (2, 2, 96, 32), (3, 2, 49, 32)):
            q, k, v = (0.2 * torch.randn(*shape, generator=gen) for _ in range(3))
            out = pa.poly_attention_flex(q, k, v, compiled=True)
            assert (out - pa.poly_attention_reference(q, k, v)).abs().max() < 1e-5
        assert torch._dynamo.config.recompile_limit == 1
    torch._dynamo.reset()
    pa._COMPILED_FLEX = None
