"""Deployment (issue 12): ONNX / torch.export exports checked against eager, the op-set report,
ONNX Runtime evaluation and benchmarking, the Hugging Face Hub format, SLURM launches, bad inputs.

ONNX export is slow (torch's dynamo exporter), so every exported file is made once per test session
and shared by the xdist workers (a file lock in the session's shared temp folder), from small
models: one cell and one block per stage, C0 = 8.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from filelock import FileLock

import polynext
from polynext.checkpoint import save_safetensors
from polynext.cli import main
from polynext.models.polynext import calibrate_running_stats

SRC = Path(__file__).resolve().parents[1] / 'src'
TINY = dict(init_channels=8, cells=[1, 1, 1, 1], blocks=[1, 1, 1, 1])
TINY_LR = dict(init_channels=8, cells=[1, 1, 1], blocks=[1, 1, 1], img_size=16)


# ---------------------------------------------------------------------------------------------
# Shared artifacts: calibrated tiny checkpoints and their exports, made once per session
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='session')
def shared(tmp_path_factory, worker_id):
    root = tmp_path_factory.getbasetemp()
    if worker_id != 'master':
        root = root.parent
    d = root / 'deploy_artifacts'
    d.mkdir(exist_ok=True)
    return d


def _once(path: Path, make):
    with FileLock(str(path) + '.lock'):
        if not path.exists():
            make(path)
    return path


def _calibrated(name, kwargs, seed=0):
    """A tiny model with running statistics from one train-mode pass over 16 images (bn variants)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    x = torch.randn(16, 3, *model.img_size, generator=torch.Generator().manual_seed(seed))
    return calibrate_running_stats(model, x)


def _checkpoint(shared, name, kwargs, classes):
    def make(path):
        model = _calibrated(name, kwargs)
        save_safetensors(model.state_dict(), path, metadata=dict(architecture=name, model_kwargs=kwargs,
                                                                  classes=classes))
    return _once(shared / f'{name}.safetensors', make)


def _export(shared, filename, args):
    """`polynext export ARGS` once per session; returns (path, printed output, the --json result)."""
    def make(path):
        import contextlib
        import io
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(['export', *args, str(path), '--json', str(path) + '.json'])
        assert code == 0, out.getvalue()
        Path(str(path) + '.txt').write_text(out.getvalue())
    path = _once(shared / filename, make)
    return path, Path(str(path) + '.txt').read_text(), json.loads(Path(str(path) + '.json').read_text())


BN_KW = dict(TINY, img_size=32, num_classes=5)
CLASSES5 = [f'c{i}' for i in range(5)]


@pytest.fixture(scope='session')
def t_bn_folded(shared):
    ckpt = _checkpoint(shared, 'cpolynext_t_bn', BN_KW, CLASSES5)
    return _export(shared, 't_bn_fold.onnx', [str(ckpt), '--fold', '--polynomial-only'])


@pytest.fixture(scope='session')
def at_bn(shared):
    ckpt = _checkpoint(shared, 'apolynext_t_bn', BN_KW, CLASSES5)
    return ckpt, _export(shared, 'at_bn.onnx', [str(ckpt), '--report'])


@pytest.fixture(scope='session')
def at_bn_folded(shared):
    ckpt = _checkpoint(shared, 'apolynext_t_bn', BN_KW, CLASSES5)
    return _export(shared, 'at_bn_fold.onnx', [str(ckpt), '--fold', '--polynomial-only'])


@pytest.fixture(scope='session')
def lr_onnx(shared):
    """The low-resolution model (LN, dynamic size) with the digits' classes."""
    ckpt = _checkpoint(shared, 'cpolynext_lr', dict(TINY_LR, num_classes=10), [str(i) for i in range(10)])
    return ckpt, _export(shared, 'lr.onnx', [str(ckpt), '--report'])


# ---------------------------------------------------------------------------------------------
# ONNX: parity, metadata, op-set report
# ---------------------------------------------------------------------------------------------

def _onnx_model(path):
    import onnx
    return onnx.load(str(path))


def test_folded_bn_model_exports_to_a_polynomial_graph(t_bn_folded):
    path, printed, res = t_bn_folded
    report = res['report']
    assert report['polynomial'] and not report['non_polynomial']
    # only convolutions, the classifier Gemm, products, sums, reshapes and the global pool remain
    assert set(report['histogram']) <= {'Conv', 'Gemm', 'MatMul', 'Mul', 'Add', 'Sub', 'Split', 'Reshape', 'Gather',
                                        'ReduceMean', 'Transpose', 'Squeeze', 'Unsqueeze', 'Flatten'}
    assert {'Conv', 'Mul', 'Gemm', 'ReduceMean'} <= set(report['histogram'])
    assert report['classes']['ReduceMean'] == 'linear (global pool)'
    # one product per PolyConv and per PolyMLP (4 cells x 1 block) and the head's: depth 9
    # (cpolynext_t_bn at full size: 12 cells x 3 blocks x 2 + 1 = 73, as docs/notes measured)
    assert report['product_depth'] == 9
    assert res['folded'] == 'weights' and not res['input']['dynamic_size']
    assert 'batch dynamic, size fixed (a bn variant' in printed
    assert len(res['checks']) == 2 and res['max_abs_diff'] <= 1e-4
    assert printed.count('ONNX Runtime vs eager, input') == 2 and 'polynomial: every operator' in printed
    meta = polynext.deploy.read_onnx_metadata(path)
    assert meta['architecture'] == 'cpolynext_t_bn' and meta['model_args']['init_channels'] == 8
    assert meta['classes'] == CLASSES5 and meta['num_classes'] == 5 and meta['folded'] == 'weights'
    assert float(meta['parity_max_abs_diff']) == pytest.approx(res['max_abs_diff'], rel=1e-3)
    graph = _onnx_model(path).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ['batch', 3, 32, 32] and graph.input[0].name == 'image' and graph.output[0].name == 'logits'


def test_apolynext_bn_is_polynomial_but_for_a_constant_division_which_folds(at_bn, at_bn_folded):
    _, (_, printed, res) = at_bn
    report = res['report']
    assert report['polynomial']
    assert report['classes']['Div'] == 'linear (division by a constant)' and report['histogram']['Div'] == 2
    assert report['classes']['Pow'] == 'polynomial (integer power)'          # (S + 1)^4
    assert any('divide by a constant' in n and 'fold_for_inference' in n for n in report['notes'])
    folded = at_bn_folded[2]['report']
    assert folded['polynomial'] and 'Div' not in folded['histogram'] and 'Pow' not in folded['histogram']
    assert 'MatMul' in folded['histogram']                                   # Q Kᵀ and A V
    # the same depth either way: (S+1)^4 is two squarings folded or not
    assert folded['product_depth'] == report['product_depth']


def test_ln_model_is_not_polynomial_and_polynomial_only_names_its_layernorm(tmp_path, capsys):
    code = main(['export', 'cpolynext_t', str(tmp_path / 'ln.onnx'), '--polynomial-only', '--img-size', '64',
                 '--model-kwargs', json.dumps(dict(TINY, num_classes=5))])
    err = capsys.readouterr().err
    assert code == 2 and err.count('\n') == 1
    assert "node 'node_layer_norm' (LayerNormalization in stages.0.cells.0.merge_norm)" in err
    assert 'not polynomial' in err and '--fold' in err and 'nothing was written' in err
    assert list(tmp_path.iterdir()) == []


def test_ln_export_has_dynamic_batch_and_size_and_runs_at_other_sizes(lr_onnx):
    _, (path, printed, res) = lr_onnx
    assert res['input']['dynamic_size'] and res['input']['min_size'] == 5        # total stride 4
    assert [c['shape'] for c in res['checks']] == [[2, 3, 16, 16], [1, 3, 16, 16], [3, 3, 24, 32]]
    assert res['max_abs_diff'] <= 1e-4
    report = res['report']
    assert not report['polynomial'] and report['histogram']['LayerNormalization'] == len(report['non_polynomial'])
    dims = [d.dim_param or d.dim_value for d in _onnx_model(path).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ['batch', 3, 'height', 'width']
    # a size the check did not use: ONNX Runtime equals the eager model rebuilt from the checkpoint
    from polynext.deploy import OnnxRuntimeModel
    ort_model = OnnxRuntimeModel(path)
    eager = polynext.create_model('cpolynext_lr', checkpoint=lr_onnx[0], **dict(TINY_LR, num_classes=10)).eval()
    x = torch.randn(5, 3, 40, 20)
    with torch.no_grad():
        torch.testing.assert_close(ort_model(x), eager(x), atol=1e-4, rtol=0)


def test_validate_with_onnxruntime_gives_the_eager_numbers(lr_onnx, tmp_path, capsys):
    ckpt, (path, _, _) = lr_onnx
    common = ['--dataset', 'digits', '--workers', '0', '--no-progress', '--json']
    assert main(['validate', '--checkpoint', str(path), '--runtime', 'onnxruntime', '--output',
                 str(tmp_path / 'ort'), *common]) == 0
    ort = json.loads(capsys.readouterr().out)
    assert main(['validate', '--checkpoint', str(ckpt), '--output', str(tmp_path / 'pt'), *common]) == 0
    eager = json.loads(capsys.readouterr().out)
    assert ort['runtime'] == 'onnxruntime' and eager['runtime'] == 'torch'
    assert ort['images'] == eager['images'] == 360
    assert (ort['top1'], ort['top5']) == (eager['top1'], eager['top5'])
    assert ort['loss'] == pytest.approx(eager['loss'], abs=1e-5) and ort['transform'] == eager['transform']


def test_torch_export_program_round_trip(shared):
    ckpt = _checkpoint(shared, 'apolynext_t_bn', BN_KW, CLASSES5)
    path, printed, res = _export(shared, 'at_bn.pt2', [str(ckpt), '--fold'])
    # (eager CPU inference runs oneDNN post-op convolutions, ops.fused; the program the plain ops: rounding only)
    assert res['format'] == 'torch-export' and res['max_abs_diff'] < 1e-5
    extra = {'polynext.json': ''}
    program = torch.export.load(str(path), extra_files=extra)
    meta = json.loads(extra['polynext.json'])
    assert meta['architecture'] == 'apolynext_t_bn' and meta['folded'] == 'weights'
    eager = polynext.fold_for_inference(polynext.create_model('apolynext_t_bn', checkpoint=ckpt, **BN_KW))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), eager(x), atol=1e-5, rtol=1e-5)   # rounding (ops.fused)


def test_randformer_exports_at_its_fixed_size_and_says_so(tmp_path, capsys):
    out = tmp_path / 'rf.onnx'
    kwargs = dict(depths=[1, 1, 1, 1], dims=[8, 16, 32, 64], num_classes=5, img_size=64)
    assert main(['export', 'randformer_s12', str(out), '--model-kwargs', json.dumps(kwargs)]) == 0
    printed = capsys.readouterr().out
    assert "size fixed (RandFormer: its random mixing matrices are built for 64x64" in printed
    assert printed.count('ONNX Runtime vs eager') == 2
    dims = [d.dim_param or d.dim_value for d in _onnx_model(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ['batch', 3, 64, 64]


def test_bench_variant_labels():
    from polynext.bench import ModelSpec, expand_variants
    specs = expand_variants([ModelSpec('cpolynext_t', 'cpolynext_t'), ModelSpec('convformer_s18', 'convformer_s18')],
                            [], ['torch', 'onnxruntime'])
    assert [s.label for s in specs] == ['cpolynext_t', 'cpolynext_t [onnxruntime]', 'convformer_s18',
                                        'convformer_s18 [onnxruntime]']
    specs = expand_variants([ModelSpec('cpolynext_t', 'cpolynext_t')], ['weights', 'channels'], ['torch', 'onnxruntime'])
    assert [(s.label, s.fold, s.runtime) for s in specs] == [
        ('cpolynext_t', None, 'torch'), ('cpolynext_t [fold]', 'weights', 'torch'),
        ('cpolynext_t [fold, channels flip]', 'channels', 'torch'), ('cpolynext_t [onnxruntime]', None, 'onnxruntime'),
        ('cpolynext_t [fold, onnxruntime]', 'weights', 'onnxruntime'),
        ('cpolynext_t [fold, channels flip, onnxruntime]', 'channels', 'onnxruntime')]


def _bench(tmp_path, capsys, *args):
    out = tmp_path / 'b.json'
    code = main(['bench', 'cpolynext_lr', *args, '--img-size', '16', '--batch-size', '2', '--runs', '1',
                 '--warmup', '1', '--no-memory', '--no-progress', '--json', str(out), '--model-kwargs',
                 *[f'{k}={v}' for k, v in TINY_LR.items() if k != 'img_size']])
    assert code == 0, capsys.readouterr().err
    return json.loads(out.read_text())['results']


def test_bench_times_the_folded_model_next_to_the_model(tmp_path, capsys):
    rows = _bench(tmp_path, capsys, '--fold', 'weights', 'channels')
    assert [r['label'] for r in rows] == ['cpolynext_lr', 'cpolynext_lr [fold]', 'cpolynext_lr [fold, channels flip]']
    # the flip in the weights adds one 1x1 conv per PolyConv: more parameters and MACs
    assert rows[1]['params'] > rows[0]['params']
    assert rows[1]['macs'] > rows[0]['macs'] == rows[2]['macs']
    assert all(r['img_per_s'] > 0 for r in rows)
    assert main(['bench', 'cpolynext_lr', '--fold', '--mode', 'train', '--no-memory', '--no-progress']) == 2
    assert 'use --mode infer' in capsys.readouterr().err        # variants are inference only


def test_bench_times_onnxruntime_next_to_eager(tmp_path, capsys):
    rows = _bench(tmp_path, capsys, '--runtime', 'onnxruntime')
    assert [r['label'] for r in rows] == ['cpolynext_lr', 'cpolynext_lr [onnxruntime]']
    assert rows[0]['params'] == rows[1]['params'] and rows[0]['macs'] == rows[1]['macs']
    assert all(r['img_per_s'] > 0 for r in rows)


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub format
# ---------------------------------------------------------------------------------------------

def _first_code_line(readme: str) -> str:
    block = readme.split('```python\n', 1)[1]
    return block.splitlines()[0]


def test_save_pretrained_round_trips_through_timm_local_dir(shared, tmp_path):
    ckpt = _checkpoint(shared, 'cpolynext_t_bn', BN_KW, CLASSES5)
    model = polynext.create_model('cpolynext_t_bn', checkpoint=ckpt, **BN_KW).eval()
    folder = polynext.save_pretrained(model, tmp_path / 'hub', classes=CLASSES5)
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    cfg = json.loads((folder / 'config.json').read_text())
    assert cfg['architecture'] == 'cpolynext_t_bn' and cfg['num_classes'] == 5
    assert cfg['model_args']['init_channels'] == 8 and cfg['model_args']['img_size'] == [32, 32]
    assert cfg['model_args']['cells'] == [1, 1, 1, 1] and cfg['label_names'] == CLASSES5
    assert cfg['pretrained_cfg']['mean'] and cfg['pretrained_cfg']['input_size'] == [3, 32, 32]
    assert cfg['polynext']['loader'] == 'timm'
    assert _first_code_line((folder / 'README.md').read_text()) == 'import polynext'
    x = torch.randn(3, 3, 32, 32)
    for loaded in (timm.create_model(f'local-dir:{folder}', pretrained=True),
                   polynext.create_model(f'local-dir:{folder}')):
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), model(x))
    # the folder's weights also work as timm's pretrained_cfg overlay file (num_classes: the file's head)
    overlay = timm.create_model('cpolynext_t_bn', pretrained=True, **BN_KW,
                                pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors'), num_classes=5))
    with torch.no_grad():
        assert torch.equal(overlay.eval()(x), model(x))
    assert polynext.deploy.check_hub_folder(folder)['architecture'] == 'cpolynext_t_bn'


def test_hub_export_command_and_timm_baseline_options(tmp_path, capsys):
    """timm's own MetaFormers built with a paper option that timm's constructor cannot take: the
    folder records it and polynext.create_model rebuilds the same model from it."""
    model = polynext.create_model('poolformerv2_s12', act='relu', num_classes=3).eval()
    folder = polynext.save_pretrained(model, tmp_path / 'pf')
    cfg = json.loads((folder / 'config.json').read_text())
    assert cfg['polynext'] == dict(version=polynext.__version__, loader='polynext', options=dict(act='relu'))
    assert 'mlp_act' not in cfg.get('model_args', {})
    assert 'polynext.create_model("local-dir:' in (folder / 'README.md').read_text()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(polynext.create_model(f'local-dir:{folder}').eval()(x), model(x))
    # the command: a model name with its arguments, checked by rebuilding
    out = tmp_path / 'cmd'
    assert main(['export', 'cpolynext_t', str(out), '--format', 'hub', '--model-kwargs',
                 json.dumps(dict(TINY, num_classes=4))]) == 0
    printed = capsys.readouterr().out
    assert 'rebuilt with timm from the folder: equal logits' in printed and 'polynext push' in printed
    assert json.loads((out / 'config.json').read_text())['model_args']['num_classes'] == 4


def test_authors_released_files_still_load_through_pretrained_cfg_overlay(tmp_path):
    """The pretrained_cfg entries of the authors' files: pretrained=True with a local file, in the
    authors' key names, converted on load (bn and low-resolution models)."""
    from safetensors.torch import load_file
    from conftest import GOLDEN, GOLDEN_MODELS
    for folder in ('CPolyNeXt_T_bn', 'LowRes'):
        name, kw = GOLDEN_MODELS[folder]
        path = tmp_path / f'{folder}.pt'
        torch.save({'state_dict': load_file(str(GOLDEN / folder / 'state_dict.safetensors'))}, path)
        tag = {'cpolynext_t_bn': 'cpolynext_t_bn.in1k', 'cpolynext_lr': 'cpolynext_lr.cifar10'}[name]
        model = timm.create_model(tag, pretrained=True, init_channels=16, **kw,
                                  pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
        x = load_file(str(GOLDEN / folder / 'input.safetensors'))['x']
        y = load_file(str(GOLDEN / folder / 'output.safetensors'))['logits']
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), y, atol=2e-5, rtol=1e-4)


def test_push_offline_is_one_clear_message(shared, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    ckpt = _checkpoint(shared, 'cpolynext_t_bn', BN_KW, CLASSES5)
    folder = polynext.save_pretrained(polynext.create_model('cpolynext_t_bn', checkpoint=ckpt, **BN_KW),
                                      tmp_path / 'hub')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    assert main(['push', str(folder), 'someone/cpolynext-t-bn']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'HF_HUB_OFFLINE is set' in err and 'hf auth login' in err


# ---------------------------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------------------------

def test_slurm_variables_become_torchrun_variables():
    from polynext.engine.distributed import first_slurm_host, slurm_environment
    env = dict(SLURM_PROCID='5', SLURM_NTASKS='8', SLURM_LOCALID='1', SLURM_JOB_NODELIST='gpu[07-08,11]',
               SLURM_JOB_ID='4242', SLURM_NTASKS_PER_NODE='4(x2)')
    assert slurm_environment(env) == dict(RANK='5', WORLD_SIZE='8', LOCAL_RANK='1', LOCAL_WORLD_SIZE='4',
                                          MASTER_ADDR='gpu07', MASTER_PORT=str(29500 + 4242))
    assert slurm_environment(dict(env, RANK='0', WORLD_SIZE='8')) == {}           # torchrun's win
    assert slurm_environment(dict(env, SLURM_NTASKS='1')) == {}                   # one task: no DDP
    kept = slurm_environment(dict(env, MASTER_ADDR='head', MASTER_PORT='1234'))
    assert 'MASTER_ADDR' not in kept and 'MASTER_PORT' not in kept
    assert [first_slurm_host(s) for s in ('node[03-05,9],gpu1', 'rack[1-2]-n[7-8]', 'a1,b[3-4]', 'solo')] == [
        'node03', 'rack1-n7', 'a1', 'solo']


def test_under_srun_only_rank_0_reports_an_error(tmp_path, monkeypatch, capsys):
    """An error before the process group is up (RANK not yet derived from SLURM_PROCID): one line, from rank 0."""
    for k in ('RANK', 'WORLD_SIZE'):
        monkeypatch.delenv(k, raising=False)
    argv = ['export', 'cpolynext_t', str(tmp_path / 'm.tfl'), '--format', 'tflite']
    monkeypatch.setenv('SLURM_PROCID', '1')
    assert main(argv) == 2 and capsys.readouterr().err == ''
    monkeypatch.setenv('SLURM_PROCID', '0')
    assert main(argv) == 2 and "unknown format 'tflite'" in capsys.readouterr().err


def test_srun_style_launch_trains_with_ddp_on_two_cpu_processes(tmp_path):
    """Two processes started as srun starts them (SLURM variables only, no torchrun), gloo on CPU."""
    from test_train_run import make_image_folder, tiny_args
    data = make_image_folder(tmp_path / 'imgs')
    out = tmp_path / 'run'
    base = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'MASTER_'))}
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE'):
        base.pop(k, None)
    base.update(PYTHONPATH=str(SRC) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1',
                SLURM_NTASKS='2', SLURM_JOB_NODELIST='localhost', SLURM_JOB_ID=str(20000 + os.getpid() % 9000))
    args = tiny_args(data, out, '--epochs', '1', '--device-batch-size', '4')
    procs = [subprocess.Popen([sys.executable, '-m', 'polynext', *args], env=dict(base, SLURM_PROCID=str(r),
                              SLURM_LOCALID=str(r)), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    log = (out / 'log.txt').read_text()
    assert 'batch 8 = 4 per device × 2 device(s) × 1 accumulation' in log
    rows = json.loads((out / 'metrics.json').read_text())
    assert rows[-1]['val_images'] == 13                     # sharded over both ranks, reduced
    assert 'epoch 1/1' in outputs[0][0] and 'epoch 1/1' not in outputs[1][0]    # rank 0 prints


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the problem and the fix, and nothing written
# ---------------------------------------------------------------------------------------------

def _not_polynext_onnx(path):
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node('Identity', ['x'], ['y'])], 'g',
                              [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 3, 8, 8])])
    onnx.save(helper.make_model(graph, producer_name='someone-else'), str(path))


def _hub_folder(tmp_path, break_it):
    folder = tmp_path / 'hub'
    polynext.save_pretrained(timm.create_model('cpolynext_t', **TINY, num_classes=4), folder)
    break_it(folder)
    return folder


def _bad_config(folder):
    cfg = json.loads((folder / 'config.json').read_text())
    cfg['num_classes'] = 7
    cfg['model_args']['num_classes'] = 7
    (folder / 'config.json').write_text(json.dumps(cfg))


BAD = {
    'unknown format': (lambda t: ['export', 'cpolynext_t', str(t / 'out' / 'm.tfl'), '--format', 'tflite'],
                       None, ["unknown format 'tflite'", '--format onnx, torch-export or hub']),
    'format from suffix': (lambda t: ['export', 'cpolynext_t', str(t / 'out' / 'm.bin')], None,
                           ["cannot tell the format", '.onnx or .pt2']),
    'bn model at another size': (lambda t: ['export', 'cpolynext_t_bn', str(t / 'out' / 'm.onnx'), '--img-size',
                                            '256', '--model-kwargs', json.dumps(dict(TINY, img_size=32))],
                                 None, ['was built for 32x32 inputs', 'cannot be exported at 256x256',
                                        'drop --img-size']),
    'fold a MetaFormer': (lambda t: ['export', 'identityformer_s12', str(t / 'out' / 'm.onnx'), '--fold'], None,
                          ['fold_for_inference folds PolyNeXt models']),
    'report of a program': (lambda t: ['export', 'cpolynext_t', str(t / 'out' / 'm.pt2'), '--report'], None,
                            ['--report / --polynomial-only read an ONNX graph', 'use --format onnx']),
    'ONNX file not from polynext': (lambda t: ['validate', '--runtime', 'onnxruntime', '--checkpoint',
                                               str(t / 'other.onnx'), '--dataset', 'digits', '--output',
                                               str(t / 'out')],
                                    _not_polynext_onnx, ['is not a polynext ONNX export', 'no polynext metadata',
                                                         'polynext export MODEL']),
    'hub folder without config.json': (lambda t: ['push', str(t / 'hub'), 'me/model'],
                                       lambda t: _hub_folder(t, lambda f: (f / 'config.json').unlink()),
                                       ['has no config.json', 'polynext export MODEL']),
    'hub folder with a mismatching config.json': (lambda t: ['push', str(t / 'hub'), 'me/model'],
                                                  lambda t: _hub_folder(t, _bad_config),
                                                  ['config.json and model.safetensors do not match', 'head.fc.weight',
                                                   'write the folder again']),
    'existing hub folder': (lambda t: ['export', 'cpolynext_t', str(t / 'hub'), '--format', 'hub'],
                            lambda t: _hub_folder(t, lambda f: None), ['exists and is not empty', '--overwrite']),
}


@pytest.mark.parametrize('case', list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    argv, prepare, words = BAD[case]
    if prepare is not None:
        prepare(tmp_path if case != 'ONNX file not from polynext' else tmp_path / 'other.onnx')
    before = sorted(str(p.relative_to(tmp_path)) + str(p.stat().st_mtime_ns) for p in tmp_path.rglob('*'))
    code = main(argv(tmp_path))
    err = capsys.readouterr().err
    assert code == 2
    assert err.count('\n') == 1 and err.startswith('polynext '), err
    for w in words:
        assert w in err, (w, err)
    after = sorted(str(p.relative_to(tmp_path)) + str(p.stat().st_mtime_ns) for p in tmp_path.rglob('*'))
    assert after == before
