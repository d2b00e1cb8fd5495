"""Detection runs on generated COCO-layout data: train → eval → resume to identical weights, DDP with 2 CPU
processes, results files re-scored, and bad inputs (one line naming the problem and the fix, nothing written)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip('pycocotools')

from polynext.cli import main  # noqa: E402
from polynext.det.synthetic import write_coco_folder  # noqa: E402

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


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_train_eval_and_resume_to_identical_weights(coco, tmp_path, monkeypatch):
    full = tmp_path / 'full'
    assert main(tiny(coco, full)) == 0
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

    # interrupted after epoch 1 (its checkpoint written), then the same command resumes it
    from polynext.det import trainer as det_trainer
    part = tmp_path / 'part'
    original = det_trainer.DetTrainer._evaluate

    def stop_after_first_epoch(self, epoch, t):
        original(self, epoch, t)
        raise KeyboardInterrupt
    monkeypatch.setattr(det_trainer.DetTrainer, '_evaluate', stop_after_first_epoch)
    assert main(tiny(coco, part, '--eval-every', '1')) == 130
    monkeypatch.setattr(det_trainer.DetTrainer, '_evaluate', original)
    assert torch.load(part / 'last.state.pt', weights_only=True)['global_step'] == 2
    assert main(tiny(coco, part, '--eval-every', '1')) == 0
    a, b = _weights(full / 'last.safetensors'), _weights(part / 'last.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_cpu_processes(coco, tmp_path):
    """torchrun with 2 CPU processes (gloo): evaluation sharded over the ranks equals a 1-process evaluation."""
    src = Path(__file__).resolve().parents[1] / 'src'
    env = dict(os.environ, PYTHONPATH=str(src) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    env.pop('RANK', None)
    env.pop('WORLD_SIZE', None)
    run = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'polynext']
    proc = subprocess.run(cmd + tiny(coco, run, '--set', 'demo_images=0', '--epochs', '1'), env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'batch 4 = 2 per device × 2 device(s) × 1 accumulation' in (run / 'log.txt').read_text()
    state = torch.load(run / 'last.state.pt', weights_only=True)
    assert state['world_size'] == 2 and len(state['rng']) == 2 and state['global_step'] == 2
    last = [r for r in json.loads((run / 'metrics.json').read_text()) if 'bbox_AP' in r][-1]
    out = tmp_path / 'eval.json'
    assert main(['det', 'eval', '--checkpoint', str(run), '--workers', '0', '--no-progress', '--json', str(out)]) == 0
    single = json.loads(out.read_text())['metrics']
    assert single['bbox']['AP'] == pytest.approx(last['bbox_AP']) and single['segm']['AP'] == pytest.approx(
        last['segm_AP'])


def _edit(coco, tmp_path, edit):
    """A copy of the generated COCO folder with its training annotations edited."""
    root = tmp_path / 'bad'
    (root / 'annotations').mkdir(parents=True)
    for split in ('train', 'val'):
        (root / f'{split}2017').symlink_to(coco / f'{split}2017')
        data = json.loads((coco / 'annotations' / f'instances_{split}2017.json').read_text())
        if split == 'train' and edit is not None:
            edit(data)
        (root / 'annotations' / f'instances_{split}2017.json').write_text(json.dumps(data))
    return root


def _no_annotations(d):
    d['annotations'] = [a for a in d['annotations'] if a['iscrowd']]


def _unknown_category(d):
    d['annotations'][0]['category_id'] = 99


def _unknown_image(d):
    d['annotations'][0]['image_id'] = 12345


def _missing_file(root):
    (root / 'annotations' / 'instances_train2017.json').unlink()


@pytest.mark.parametrize('case,expected', [
    ('missing annotation file', 'missing annotation file'),
    ('images without annotations', 'no image has a usable'),
    ('category-id mismatch', "category_id 99, which 'categories' does not list"),
    ('annotation of an unlisted image', "refers to image id 12345, which 'images'"),
    ('backbone without 4 stages', 'needs strides [4, 8, 16, 32]'),
    ('checkpoint that does not fit', 'convformer_s18'),
    ('eval on other categories', 'categories'),
])
def test_bad_inputs(case, expected, coco, tmp_path, capsys):
    edits = {'images without annotations': _no_annotations, 'category-id mismatch': _unknown_category,
             'annotation of an unlisted image': _unknown_image}
    data = _edit(coco, tmp_path, edits.get(case))
    if case == 'missing annotation file':
        _missing_file(data)
    out = tmp_path / 'run'
    extra = []
    if case == 'backbone without 4 stages':
        extra = ['--backbone', 'cpolynext_lr', '--set', 'backbone_kwargs={init_channels: 8}']
    if case == 'checkpoint that does not fit':
        from safetensors.torch import save_file
        import polynext
        save_file(polynext.create_model('cpolynext_t', init_channels=8).state_dict(), str(tmp_path / 'c.safetensors'))
        extra = ['--backbone', 'convformer_s18', '--set', 'backbone_kwargs={}', '--initial-checkpoint',
                 str(tmp_path / 'c.safetensors')]
    if case == 'eval on other categories':   # a checkpoint's description, as det train writes it (no weights needed)
        from polynext.checkpoint import save_safetensors
        from polynext.det.recipes import DET_PRESETS
        from polynext.engine.config import config_to_dict
        ckpt = tmp_path / 'trained.safetensors'
        cfg = DET_PRESETS.get('maskrcnn_shapes_demo').config
        save_safetensors({'x': torch.zeros(1)}, ckpt, metadata=dict(
            polynext_det_config=json.dumps(config_to_dict(cfg)), category_ids=json.dumps([1, 3, 7])))
        d = json.loads((coco / 'annotations' / 'instances_val2017.json').read_text())
        for c in d['categories']:
            c['id'] += 100
        for a in d['annotations']:
            a['category_id'] += 100
        (data / 'annotations' / 'instances_val2017.json').write_text(json.dumps(d))
        capsys.readouterr()
        code = main(['det', 'eval', '--checkpoint', str(ckpt), '--data', str(data), '--output', str(out)])
    else:
        code = main(tiny(data, out, *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not out.exists()                                           # nothing written
