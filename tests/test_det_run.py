"""Detection runs on generated COCO-layout data: train → eval → SIGKILL mid-epoch and resume to identical weights, DDP
with 2 CPU processes, results files re-scored. Its bad inputs (one line naming the problem and the fix, nothing
written) are cases of tests/test_bad_inputs.py, with every other command's."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip('pycocotools')

from polynext.cli import main  # noqa: E402
from polynext.det.synthetic import write_coco_folder  # noqa: E402
from conftest import run_metrics, subprocess_env  # noqa: E402

#: a tiny Mask R-CNN on 48-px images: 2 epochs × 2 iterations of batch 4
TINY = ['--set', 'backbone_kwargs={init_channels: 8}', '--set', 'fpn_channels=16', '--set', 'box_fc=32',
        '--set', 'mask_channels=8', '--set', 'rpn_batch=32', '--set', 'roi_batch=32',
        '--set', 'train_scales=[48]', '--set', 'test_scale=48', '--set', 'warmup_iters=2', '--set', 'lr_steps=[1]',
        '--set', 'log_every=1', '--set', 'threads=1', '--epochs', '2', '--batch-size', '4',
        '--device-batch-size', '2', '--workers', '0', '--no-progress', '--set', 'demo_images=1']


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    return write_coco_folder(tmp_path_factory.mktemp('coco'), num_train=8, num_val=4, size=48)


def tiny(data, out, *extra):
    return ['det', 'train', '--recipe', 'maskrcnn_shapes_demo', '--data', str(data), '--output', str(out),
            *TINY, *extra]


HOOKS = Path(__file__).with_name('cli_with_hooks.py')   # the CLI with test hooks (SIGKILL at a checkpoint)


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_train_eval_and_resume_to_identical_weights(coco, tmp_path, monkeypatch):
    from cli_with_hooks import record_steps
    full = tmp_path / 'full'
    seen = record_steps(monkeypatch)
    assert main(tiny(coco, full)) == 0
    # 8 images, 2 per micro-batch, 2 micro-batches per iteration: (epoch, micro-batch, iteration after the step)
    every = list(seen['steps'])
    assert every == [(0, 1, 1), (0, 3, 2), (1, 1, 3), (1, 3, 4)] and len(seen['micro']) == 8
    files = sorted(p.name for p in full.iterdir())
    for name in ('best.safetensors', 'last.state.pt', 'metrics.json', 'metrics.csv', 'learning_curve.png', 'log.txt',
                 'config.yaml', 'results_bbox.json', 'results_segm.json', 'predictions.png'):
        assert name in files
    rows = json.loads((full / 'metrics.json').read_text())
    last = [r for r in rows if 'bbox_AP' in r][-1]
    assert last['iter'] == 4 and 'segm_AP' in last and 'train_loss_mask' in rows[0]

    # eval loads what train wrote and reproduces its numbers; the results files re-score the same
    out = tmp_path / 'eval'
    assert main(['det', 'eval', '--checkpoint', str(full), '--workers', '0', '--no-progress', '--output', str(out)]) == 0
    metrics = json.loads((out / 'metrics.json').read_text())['metrics']
    assert metrics['bbox']['AP'] == pytest.approx(last['bbox_AP']) and metrics['segm']['AP'] == pytest.approx(
        last['segm_AP'])
    assert main(['det', 'eval', '--results', str(out / 'results_bbox.json'), str(out / 'results_segm.json'),
                 '--data', str(coco), '--json', str(tmp_path / 'm.json')]) == 0
    assert json.loads((tmp_path / 'm.json').read_text())['metrics'] == metrics

    # SIGKILL (by the process itself) right after the checkpoint of iteration 3, in the middle of epoch 2; the same
    # command resumes it, runs only iteration 4 and ends with the uninterrupted run's weights and metrics
    part = tmp_path / 'part'
    proc = subprocess.run([sys.executable, str(HOOKS), *tiny(coco, part, '--checkpoint-every', '1')],
                          env=dict(subprocess_env(), POLYNEXT_TEST_KILL='iteration=3'), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = torch.load(part / 'last.state.pt', weights_only=True)
    assert (killed['global_step'], killed['iteration'], killed['iters_per_epoch'], killed['epochs_done']) == (3, 3, 2, 1)
    seen['steps'].clear()
    seen['micro'].clear()
    assert main(tiny(coco, part, '--checkpoint-every', '1')) == 0
    assert seen['steps'] == every[3:] and len(seen['micro']) == 2
    assert 'resumed at iteration 3 (epoch 2 of 2)' in (part / 'log.txt').read_text()
    for name in ('last.safetensors', 'best.safetensors'):
        a, b = _weights(full / name), _weights(part / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert run_metrics(part) == run_metrics(full)


def test_ddp_two_cpu_processes(coco, tmp_path):
    """torchrun with 2 CPU processes (gloo): the replicas hold the same weights after every step (the gradients were
    all-reduced); evaluation sharded over the ranks equals a 1-process evaluation. (No single-process run
    reproduces it bit for bit: each rank samples its own RPN / RoI training boxes from its own random stream.)"""
    from cli_with_hooks import assert_replicas_agree
    env = dict(subprocess_env(), POLYNEXT_TEST_WEIGHTS=str(tmp_path / 'w'))
    (tmp_path / 'w').mkdir()
    run = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(HOOKS)]
    proc = subprocess.run(cmd + tiny(coco, run, '--set', 'demo_images=0', '--epochs', '1'), env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_replicas_agree(tmp_path / 'w', 2)
    assert 'batch 4 = 2 per device × 2 device(s) × 1 accumulation' in (run / 'log.txt').read_text()
    state = torch.load(run / 'last.state.pt', weights_only=True)
    assert state['world_size'] == 2 and len(state['rng']) == 2 and state['global_step'] == 2
    last = [r for r in json.loads((run / 'metrics.json').read_text()) if 'bbox_AP' in r][-1]
    out = tmp_path / 'eval.json'
    assert main(['det', 'eval', '--checkpoint', str(run), '--workers', '0', '--no-progress', '--json', str(out)]) == 0
    single = json.loads(out.read_text())['metrics']
    assert single['bbox']['AP'] == pytest.approx(last['bbox_AP']) and single['segm']['AP'] == pytest.approx(
        last['segm_AP'])


def test_grad_checkpointing_trains_to_the_same_weights(coco, tmp_path, monkeypatch):
    """``--set grad_checkpointing=true``: the backbone's cells run checkpointed, the same weights bit for bit."""
    from test_train_run import check_grad_checkpointing_changes_nothing
    check_grad_checkpointing_changes_nothing(lambda out, *more: tiny(coco, out, *more), tmp_path, monkeypatch)
