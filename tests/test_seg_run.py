"""End-to-end segmentation: a fake ADE20K folder through `polynext seg train` (accumulation, mid-run
checkpoints, evaluation, best / last, predictions.png), `polynext seg eval` giving the training's numbers,
an interrupted run resumed to the same weights, clear one-line errors for bad inputs, and the cost of
UperNet + CPolyNeXt-S at 512x2048 against the paper."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polynext.cli import main
from polynext.seg.data import ADE20KSource
from polynext.seg.synthetic import write_ade20k_folder
from conftest import run_metrics, subprocess_env


@pytest.fixture(scope='module')
def ade(tmp_path_factory):
    return write_ade20k_folder(tmp_path_factory.mktemp('ade') / 'ADEChallengeData2016', num_train=8, num_val=3,
                               size=48)


def tiny(data, out, *extra):
    """CPolyNeXt-T (C0 = 8) + a 16-channel UperNet, 32 px crops, batch 4 = 2 per step × 2 accumulation."""
    return ['seg', 'train', '--recipe', 'upernet_cpolynext_s', '--data', str(data), '--output', str(out),
            '--backbone', 'cpolynext_t', '--iters', '4', '--batch-size', '4', '--device-batch-size', '2',
            '--workers', '0', '--threads', '1', '--eval-every', '2', '--checkpoint-every', '1', '--no-progress',
            '--set', 'backbone_kwargs={init_channels: 8}', '--set', 'head_channels=16', '--set', 'aux_channels=8',
            '--set', 'img_scale=[64,32]', '--set', 'crop_size=32', '--set', 'eval_scale=[64,32]',
            '--set', 'eval_crop=32', '--set', 'eval_stride=21', '--set', 'demo_images=2', '--set', 'warmup_iters=1',
            *extra]


def test_fake_ade20k_layout_and_labels(ade):
    src = ADE20KSource(ade, 'train')
    assert len(src) == 8 and len(src.classes) == 150
    img, label = src.read(0)
    assert img.shape == (3, 48, 48) and img.dtype == torch.uint8
    assert label[0].eq(255).all() and set(label.unique().tolist()) <= {0, 1, 2, 3, 255}   # "other" → ignored
    assert len(ADE20KSource(ade.parent, 'val')) == 3                                      # the parent folder works too


HOOKS = Path(__file__).with_name('cli_with_hooks.py')   # the CLI with test hooks (SIGKILL at a checkpoint)


def test_train_eval_and_resume(ade, tmp_path, capsys, monkeypatch):
    from cli_with_hooks import record_steps
    run = tmp_path / 'run'
    seen = record_steps(monkeypatch)
    assert main(tiny(ade, run)) == 0
    # 8 images, 2 per micro-batch: 4 micro-batches per pass over the data; 4 iterations of 2 micro-batches
    every = list(seen['steps'])                          # (pass, micro-batch index in it, iteration after the step)
    assert every == [(0, 1, 1), (0, 3, 2), (1, 1, 3), (1, 3, 4)] and len(seen['micro']) == 8
    for name in ('config.yaml', 'metrics.csv', 'metrics.json', 'learning_curve.png', 'log.txt', 'last.safetensors',
                 'last.state.pt', 'best.safetensors', 'best.state.pt', 'predictions.png'):
        assert (run / name).is_file(), name
    rows = json.loads((run / 'metrics.json').read_text())
    evals = [r for r in rows if 'mIoU' in r]
    assert [r['iter'] for r in evals] == [2, 4]
    assert [r['best_mIoU'] for r in evals] == [evals[0]['mIoU'], max(evals[0]['mIoU'], evals[1]['mIoU'])]
    # poly decay, power 1, to 0 at the last iteration (the 1-iteration warm-up is over by iteration 2)
    assert [r['lr'] for r in rows] == [pytest.approx(1e-4 * (1 - 2 / 4)), 0.0]
    state = torch.load(run / 'last.state.pt', weights_only=True)
    assert state['iteration'] == 4 and state['spec']['backbone'] == 'cpolynext_t'
    weights = load_file(run / 'last.safetensors')
    assert set(weights) == set(state['model'])

    # `seg eval` on the last weights reproduces the last evaluation (same protocol, same images)
    out_json = tmp_path / 'eval.json'
    capsys.readouterr()
    assert main(['seg', 'eval', '--checkpoint', str(run / 'last.safetensors'), '--data', str(ade), '--workers', '0',
                 '--no-progress', '--json', str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result['mIoU'] == pytest.approx(evals[-1]['mIoU'], abs=1e-9)
    assert result['mode'] == 'slide' and result['crop'] == 32 and len(result['per_class']) == 150
    assert 'mIoU' in capsys.readouterr().out

    # a run killed with SIGKILL right after its iteration-3 checkpoint, resumed by the same command, ends with the
    # uninterrupted run's weights and metrics (wall-clock fields aside)
    run2 = tmp_path / 'run2'
    proc = subprocess.run([sys.executable, str(HOOKS), *tiny(ade, run2)], env=dict(subprocess_env(), POLYNEXT_TEST_KILL='iteration=3'),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = torch.load(run2 / 'last.state.pt', weights_only=True)
    # iteration 3 = micro-batch 6 = in the middle of the second pass over the data (index 2 of 4)
    cfg = killed['config']
    accumulation, per_pass = cfg['batch_size'] // cfg['device_batch_size'], 8 // cfg['device_batch_size']
    assert killed['iteration'] == killed['global_step'] == 3 and (3 * accumulation) % per_pass == 2
    seen['steps'].clear()
    seen['micro'].clear()
    assert main(tiny(ade, run2)) == 0                                         # the same command resumes
    assert seen['steps'] == every[3:] and len(seen['micro']) == 2            # and runs only the last iteration
    for name in ('last.safetensors', 'best.safetensors'):
        a, b = load_file(run / name), load_file(run2 / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert run_metrics(run2) == run_metrics(run) and [r['iter'] for r in run_metrics(run)] == [2, 4]
    assert 'resumed at iteration 3' in (run2 / 'log.txt').read_text()
    # a finished run is not retrained
    capsys.readouterr()
    assert main(tiny(ade, run2)) == 0
    assert 'finished run' in capsys.readouterr().out


def _error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_an_unreadable_training_image_past_max_corrupt_stops_the_run(tmp_path, capsys):
    """(Bad inputs before a run starts: tests/test_bad_inputs.py.)"""
    # an unreadable training image: named, and past max_corrupt the run stops
    bad = write_ade20k_folder(tmp_path / 'bad', num_train=4, num_val=1, size=32)
    (bad / 'images' / 'training' / 'ADE_train_00000002.jpg').write_bytes(b'not a jpeg')
    msg = _error(tiny(bad, tmp_path / 'y', '--set', 'max_corrupt=0'), capsys)
    assert 'cannot be read (limit 0, max_corrupt=0)' in msg and 'ADE_train_00000002.jpg' in msg


def test_demo_recipe_is_configured_for_a_cpu():
    from polynext.seg.recipes import DEFAULT_SEG_RECIPE, SEG_PRESETS
    name, cfg = SEG_PRESETS.resolve()
    assert name == DEFAULT_SEG_RECIPE and cfg.dataset == 'shapes' and cfg.backbone == 'cpolynext_t'
    name, cfg = SEG_PRESETS.resolve(flags=dict(data='/somewhere'))
    assert cfg.dataset == 'ade20k'                     # --data on the demo means an ADE20K folder
    assert SEG_PRESETS.get(DEFAULT_SEG_RECIPE).config.custom_keys == SEG_PRESETS.get('upernet_cpolynext_s').config.custom_keys


@pytest.mark.slow
def test_cost_of_upernet_cpolynext_s_matches_the_paper():
    """54M params / 942 GMACs at 512x2048 (PolyNeXt paper; MACs = FLOPs / 2 of one forward, decode path)."""
    from polynext.seg import segmentor_costs
    row, = segmentor_costs(recipes=['upernet_cpolynext_s'])
    assert row['params'] == 53_921_868                 # backbone 24,044,320 + UPerHead 29,174,934 + FCN 702,614
    assert (row['backbone_params'], row['head_params'], row['aux_params']) == (24_044_320, 29_174_934, 702_614)
    assert round(row['params'] / 1e6) == 54
    assert round(row['macs'] / 1e9) == 942 and row['macs'] == pytest.approx(941.50e9, rel=1e-4)
    # the head's BatchNorms, 2 ops per output element (mmcv / fvcore): PPM 512 x (1 + 4 + 9 + 36) and its bottleneck
    # at stride 32 (16 x 64), laterals and FPN convs at strides 4 / 8 / 16, the fusion conv at stride 4
    bn = 2 * (512 * 50 + 512 * 16 * 64 + 2 * 512 * (128 * 512 + 64 * 256 + 32 * 128) + 512 * 128 * 512)
    assert row['bn_ops'] == bn and round(row['macs_with_bn'] / 1e9) == 942


def test_ddp_two_cpu_processes(ade, tmp_path, capsys):
    """torchrun with 2 CPU processes (gloo): the replicas hold the same weights after every step (the gradients were
    all-reduced); sharded evaluation reduced across ranks equals a 1-process eval. (Unlike classification, no
    single-process run reproduces it bit for bit: the head's BatchNorms normalise over each device's 2 images.)"""
    from cli_with_hooks import assert_replicas_agree
    env = dict(subprocess_env(), POLYNEXT_TEST_WEIGHTS=str(tmp_path / 'w'))
    (tmp_path / 'w').mkdir()
    run = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(HOOKS)]
    proc = subprocess.run(cmd + tiny(ade, run, '--set', 'demo_images=0'), env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_replicas_agree(tmp_path / 'w', 4)
    log = (run / 'log.txt').read_text()
    assert 'batch 4 = 2 per device × 2 device(s) × 1 accumulation' in log
    state = torch.load(run / 'last.state.pt', weights_only=True)
    assert state['world_size'] == 2 and len(state['rng']) == 2 and state['iteration'] == 4
    last = [r for r in json.loads((run / 'metrics.json').read_text()) if 'mIoU' in r][-1]
    out_json = tmp_path / 'eval.json'
    assert main(['seg', 'eval', '--checkpoint', str(run), '--data', str(ade), '--workers', '0', '--no-progress',
                 '--json', str(out_json)]) == 0
    single = json.loads(out_json.read_text())
    assert single['mIoU'] == pytest.approx(last['mIoU'], abs=1e-9) and single['aAcc'] == pytest.approx(last['aAcc'])
    assert proc.stdout.count('iter 4 ') == 1                               # only rank 0 prints


def test_grad_checkpointing_trains_to_the_same_weights(ade, tmp_path, monkeypatch):
    """``--set grad_checkpointing=true``: the backbone's cells run checkpointed, the same weights bit for bit."""
    from test_train_run import check_grad_checkpointing_changes_nothing
    check_grad_checkpointing_changes_nothing(lambda out, *more: tiny(ade, out, *more), tmp_path, monkeypatch)
