"""1x1 convolutions with the measured-faster weight-gradient kernel: the same function and gradients
as nn.Conv2d in every backend, the choice made once per shape, and plain nn.Conv2d wherever the path
does not apply."""
import json

import pytest
import timm
import torch
import torch.nn as nn

import polynext  # noqa: F401  (registers the models)
from polynext.ops import pointwise
from polynext.ops.pointwise import PointwiseConv2d, pointwise_conv2d, weight_grad_backend, weight_grad_choices

from conftest import mini_kwargs


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch, tmp_path):
    """Each test starts as a new process on a machine that has measured nothing."""
    monkeypatch.setattr(pointwise, '_CHOICE', {})
    monkeypatch.setattr(pointwise, '_DISK', None)
    monkeypatch.setenv('POLYNEXT_CACHE_DIR', str(tmp_path / 'cache'))


def _pair(in_ch, out_ch, bias, dtype):
    torch.manual_seed(0)
    ours = PointwiseConv2d(in_ch, out_ch, bias=bias).to(dtype)
    ref = nn.Conv2d(in_ch, out_ch, 1, bias=bias).to(dtype)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize('backend', ['auto', 'mm', 'onednn'])
@pytest.mark.parametrize('bias', [False, True])
def test_values_and_gradients_equal_conv2d_fp64(backend, bias):
    ours, ref = _pair(6, 10, bias, torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 5, 7, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn(3, 10, 5, 7, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with weight_grad_backend(backend):
        y = ours(x)
        grads = torch.autograd.grad(y, (x,) + tuple(ours.parameters()), g)
    routed = backend != 'onednn'
    assert ('PointwiseConv' in type(y.grad_fn).__name__) == routed
    y_ref = ref(x)
    grads_ref = torch.autograd.grad(y_ref, (x,) + tuple(ref.parameters()), g)
    assert torch.equal(y, y_ref)   # the forward is the same convolution
    for a, b in zip(grads, grads_ref):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-12


@pytest.mark.parametrize('backend', ['mm', 'onednn'])
def test_float32_weight_gradient_of_each_kernel(backend):
    ours, ref = _pair(32, 48, False, torch.float32)
    x = torch.randn(4, 32, 9, 9).contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 48, 9, 9).contiguous(memory_format=torch.channels_last)
    with weight_grad_backend(backend):
        (gw,) = torch.autograd.grad(ours(x), ours.weight, g)
    (gw_ref,) = torch.autograd.grad(ref(x), ref.weight, g)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-4)


def test_choice_is_timed_once_per_shape_and_kept_for_the_machine(monkeypatch, tmp_path):
    calls = []
    real = pointwise.time_kernels
    monkeypatch.setattr(pointwise, 'time_kernels', lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(pointwise, '_CHOICE', {})
    monkeypatch.setattr(pointwise, '_DISK', None)
    cache = tmp_path / 'cache'
    conv = PointwiseConv2d(8, 12, bias=False)

    def steps(*batches):
        for batch in batches:
            x = torch.randn(batch, 8, 6, 6).contiguous(memory_format=torch.channels_last)
            conv(x).sum().backward()

    steps(2, 2, 3)
    assert len(calls) == 2   # batch 2 (timed once, then reused) and batch 3
    choices = weight_grad_choices()
    assert set(choices.values()) <= {'mm', 'onednn'}
    assert f'72x8->12 float32 t{torch.get_num_threads()}' in choices
    kept = json.loads((cache / 'pointwise_kernels.json').read_text())['choices']
    assert len(kept) == 2 and all(k.endswith(('72x8->12 float32', '108x8->12 float32')) for k in kept)
    # a new process on this machine: the choices come from the file, nothing is timed again
    monkeypatch.setattr(pointwise, '_CHOICE', {})
    monkeypatch.setattr(pointwise, '_DISK', None)
    steps(2, 3)
    assert len(calls) == 2 and weight_grad_choices() == choices


def test_unwritable_cache_warns_and_still_trains(monkeypatch, tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    monkeypatch.setattr(pointwise, '_CHOICE', {})
    monkeypatch.setattr(pointwise, '_DISK', None)
    monkeypatch.setenv('POLYNEXT_CACHE_DIR', str(blocker / 'sub'))   # a folder under a file
    conv = PointwiseConv2d(4, 4, bias=False)
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    with pytest.warns(UserWarning, match='POLYNEXT_CACHE_DIR'):
        conv(x).sum().backward()
    assert conv.weight.grad is not None and len(weight_grad_choices()) == 1


def test_plain_conv_where_the_path_does_not_apply():
    conv = PointwiseConv2d(4, 4, bias=False)
    x = torch.randn(2, 4, 5, 5)
    assert type(conv(x).grad_fn).__name__ == 'ConvolutionBackward0'           # NCHW input
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert conv(x_cl).grad_fn is None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert type(conv(x_cl).grad_fn).__name__ == 'ConvolutionBackward0'   # autocast
    assert type(pointwise_conv2d(x_cl, conv.weight.detach()).grad_fn).__name__ != '_PointwiseConvFunctionBackward'


def test_bad_backend_name():
    with pytest.raises(ValueError, match="not one of"):
        with weight_grad_backend('mkl'):
            pass


@pytest.mark.parametrize('name', ['cpolynext_t', 'apolynext_t'])
def test_polynext_training_uses_it_and_gradients_match_plain_conv(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **mini_kwargs(name)).double().train()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    pointwise_layers = [m for m in model.modules() if isinstance(m, PointwiseConv2d)]
    assert pointwise_layers and all(m.kernel_size == (1, 1) for m in pointwise_layers)
    with weight_grad_backend('mm'):
        loss = model(x).square().sum()
        names = set()
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and type(node).__name__ not in names:
                names.add(type(node).__name__)
                stack.extend(n for n, _ in node.next_functions)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    assert any('PointwiseConv' in n for n in names)
    with weight_grad_backend('onednn'):
        grads_ref = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    for a, b in zip(grads, grads_ref):
        assert (a - b).abs().max() <= 1e-9 * max(1.0, b.abs().max().item())


def test_ranks_of_a_multi_process_run_read_but_do_not_time(monkeypatch, tmp_path):
    monkeypatch.setattr(pointwise, '_CHOICE', {})
    monkeypatch.setattr(pointwise, '_DISK', None)
    monkeypatch.setattr(pointwise, '_multi_process', lambda: True)
    tmp_path = tmp_path / 'cache'
    tmp_path.mkdir()
    monkeypatch.setattr(pointwise, 'time_kernels', lambda *a, **k: pytest.fail('timed inside a rank'))
    conv = PointwiseConv2d(4, 6, bias=False)
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    y = conv(x)   # a shape the machine has not measured: PyTorch's own convolution and backward
    assert type(y.grad_fn).__name__ == 'ConvolutionBackward0'
    y.sum().backward()
    assert weight_grad_choices() == {} and not (tmp_path / 'pointwise_kernels.json').exists()
    # measured by a single-process run as 'mm': the ranks take it from the file
    key = pointwise._key(x, conv.weight)
    (tmp_path / 'pointwise_kernels.json').write_text(json.dumps({'choices': {pointwise._disk_key(key): 'mm'}}))
    monkeypatch.setattr(pointwise, '_DISK', None)
    assert 'PointwiseConv' in type(conv(x).grad_fn).__name__


def test_shapes_that_prefer_onednn_stay_plain_conv(monkeypatch):
    conv = PointwiseConv2d(4, 6, bias=False)
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(pointwise, '_CHOICE', {pointwise._key(x, conv.weight): 'onednn'})
    assert type(conv(x).grad_fn).__name__ == 'ConvolutionBackward0'


def test_mm_is_chosen_only_by_the_margin():
    assert pointwise.MM_MARGIN == 1.05
    assert pointwise.choose({'onednn': 1.00, 'mm': 0.96}) == 'onednn'   # 4 % faster: a tie, PyTorch's kernel
    assert pointwise.choose({'onednn': 1.00, 'mm': 0.94}) == 'mm'
    assert pointwise.choose({'onednn': 0.90, 'mm': 1.00}) == 'onednn'


@pytest.mark.parametrize('input_grad', [True, False])
def test_time_kernels_times_the_whole_backward_of_each_path(input_grad):
    """oneDNN: one convolution_backward for both gradients; mm: the input-gradient call (when the input
    needs one) and the product. Recorded at the aten level, one timing round (plus the warm-up call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name == 'convolution_backward':
                self.ops.append(('conv_bwd', tuple(args[-1])))
            elif name == 'mm':
                self.ops.append(('mm',))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 12, 5, 5).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(12, 8, 1, 1)
    monkey_evict = pointwise._evict_caches
    pointwise._evict_caches = lambda: None   # keeps the record to the two paths' ops
    try:
        with Record() as rec:
            best = pointwise.time_kernels(grad, x, weight, repeats=1, input_grad=input_grad)
    finally:
        pointwise._evict_caches = monkey_evict
    onednn = [('conv_bwd', (input_grad, True, False))]
    mm = ([('conv_bwd', (True, False, False))] if input_grad else []) + [('mm',)]
    assert rec.ops == (onednn + mm) * 2 and set(best) == {'onednn', 'mm'}


def test_choices_of_an_earlier_rule_are_measured_again(monkeypatch, tmp_path):
    conv = PointwiseConv2d(8, 12, bias=False)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    key = pointwise._key(x, conv.weight)
    old_key = pointwise._disk_key(key).replace(f' | {pointwise._RULE}', '')
    cache = tmp_path / 'cache'
    cache.mkdir()
    (cache / 'pointwise_kernels.json').write_text(json.dumps({'choices': {old_key: 'mm'}}))
    calls = []
    monkeypatch.setattr(pointwise, 'time_kernels', lambda *a, **k: calls.append(1) or {'onednn': 1.0, 'mm': 2.0})
    conv(x).sum().backward()
    assert calls == [1] and pointwise._known(key) == 'onednn'
    kept = json.loads((cache / 'pointwise_kernels.json').read_text())['choices']
    assert kept[old_key] == 'mm' and kept[pointwise._disk_key(key)] == 'onednn'


@pytest.mark.parametrize('bias', [False, True])
def test_split_pointwise_equals_the_split_of_one_conv(bias):
    """Two convolutions by the weight's row blocks: the values of one convolution's split (bit for bit here in
    float32), each part its own channels-last tensor, and the same gradients in float64."""
    torch.manual_seed(0)
    conv = PointwiseConv2d(24, 40, bias=bias)
    x = torch.randn(2, 24, 7, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = conv(x).split([16, 24], dim=1)
        got = pointwise.split_pointwise(x, conv, 16)
    assert [tuple(t.shape) for t in got] == [(2, 16, 7, 9), (2, 24, 7, 9)]
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in got)
    assert all(not w.is_contiguous(memory_format=torch.channels_last) for w in want)   # the slices it replaces
    assert all(torch.equal(a, b) for a, b in zip(got, want))

    conv = conv.double()
    x = x.double().requires_grad_()
    g = [torch.randn(2, 16, 7, 9, dtype=torch.float64), torch.randn(2, 24, 7, 9, dtype=torch.float64)]
    params = [x] + list(conv.parameters())
    want = torch.autograd.grad(sum((t * gi).sum() for t, gi in zip(conv(x).split([16, 24], dim=1), g)), params)
    got = torch.autograd.grad(sum((t * gi).sum() for t, gi in zip(pointwise.split_pointwise(x, conv, 16), g)), params)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()


@pytest.mark.parametrize('folded', [False, True])
def test_polyattn_depthwise_convs_read_contiguous_parts(folded):
    """PolyAttn's Q, K and V depthwise convolutions get contiguous channels-last inputs (not slices, which PyTorch
    copies first), in the model and in its folded form, and the logits are those of one convolution's split (PyTorch's
    path: with ops.attention_convs' kernel, where it serves, the convolutions read the one projection in place)."""
    from polynext.ops.cpu_kernels import heads_convs
    import importlib
    from polynext.models.folded import fold_for_inference
    bench = importlib.util.spec_from_file_location(
        'qkv_split_bench', __import__('pathlib').Path(__file__).resolve().parents[1] / 'benchmarks' / 'qkv_split.py')
    qkv = importlib.util.module_from_spec(bench)
    bench.loader.exec_module(qkv)
    torch.manual_seed(0)
    model = timm.create_model('apolynext_t', **mini_kwargs('apolynext_t')).eval()
    model = fold_for_inference(model) if folded else model
    model = model.to(memory_format=torch.channels_last)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last)))
        for name, m in model.named_modules() if name.endswith(('q_conv', 'k_conv', 'v_conv'))]
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), heads_convs(False):
        out = model(x)
        for h in hooks:
            h.remove()
        with qkv.split_parts(False):
            ref = model(x)
    assert seen and all(seen)
    assert torch.equal(out, ref)


def test_qkv_split_benchmark_at_a_tiny_size(tmp_path, capsys):
    """``benchmarks/qkv_split.py`` at 2 images of 64 px: both forms timed, equal logits, the JSON; a model without
    PolyAttn is refused in one line before anything runs."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        'qkv_split_bench', Path(__file__).resolve().parents[1] / 'benchmarks' / 'qkv_split.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / 'qkv.json'
    assert bench.main(['apolynext_t', '--batch-size', '2', '--img-size', '64', '--runs', '1',
                       '--json', str(out)]) == 0
    (row,) = json.loads(out.read_text())['rows']
    assert row['model'] == 'apolynext_t' and row['one_conv_img_s'] > 0 and row['split_img_s'] > 0
    assert row['max_abs_logit_diff'] == 0.0
    assert 'two convs' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(['cpolynext_t', '--runs', '1', '--json', str(tmp_path / 'no.json')])
    assert 'has no PolyAttn' in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / 'no.json').exists()
