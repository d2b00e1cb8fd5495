"""Reliability of the shared training engine, for every task: faults injected into checkpoint writes (a kill between
the temporary write and the rename, a full disk, a read-only run folder, an unreadable last.state.pt), the way out of
a diverged run (the command the error names, run as named, for classification and segmentation; the
``--on-nonfinite`` policies), Ctrl-C, and what ``polynext convert`` keeps.

In every fault case the previous checkpoint stays loadable, no temporary file survives the next start, and the
message names the fix (the tests run the command it names)."""
import errno
import json
import math
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import polynext
import polynext.train.trainer as trainer_mod
from polynext.cli import main
from polynext.engine import BatchLayout, Meters, NonFiniteError, Precision, TrainStep
from polynext.engine.nonfinite import NonFinitePolicy

from conftest import read_only_mount
from test_train_run import make_image_folder, tiny_args


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('imgs'), train_per_class=4, val_per_class=2, extra_val=0)


def cli(args, capsys):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(args, capsys, code=2) -> str:
    got, out, err = cli(args, capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert got == code and len(lines) == 1 and 'Traceback' not in err, (got, out, err)
    return lines[0]


def named_command(message: str):
    """The arguments of the first `polynext ...` command quoted in a message (without 'polynext')."""
    cmd = re.search(r'`(polynext [^`]+)`', message).group(1)
    return shlex.split(cmd)[1:] + ['--no-progress']


def temporary_files(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith('.tmp'))


def state_of(path: Path):
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------------------------
# faults in checkpoint writes
# ---------------------------------------------------------------------------------------------

class Killed(BaseException):
    """What SIGKILL does to a process, for the code after it: nothing more runs (no except, no clean-up)."""


def test_kill_between_the_temporary_write_and_the_rename(data, tmp_path, capsys, monkeypatch):
    run = tmp_path / 'run'
    real_replace, real_unlink = os.replace, os.unlink

    def replace(src, dst, *a, **kw):
        if Path(dst).name == 'last.state.pt' and state_of(src)['epoch'] == 2:
            raise Killed()                                # killed with the new state written but not renamed
        return real_replace(src, dst, *a, **kw)

    def unlink(path, *a, **kw):                           # a killed process removes nothing
        if Path(path).name.startswith('.last.state.pt.'):
            return None
        return real_unlink(path, *a, **kw)
    monkeypatch.setattr(os, 'replace', replace)
    monkeypatch.setattr(os, 'unlink', unlink)
    with pytest.raises(Killed):
        main([str(a) for a in tiny_args(data, run, '--epochs', '2')])
    monkeypatch.undo()
    leftover = temporary_files(run)
    assert len(leftover) == 1 and leftover[0].startswith('.last.state.pt.')
    assert state_of(run / 'last.state.pt')['epoch'] == 1                        # the previous checkpoint, intact

    code, out, err = cli(tiny_args(data, run, '--epochs', '2'), capsys)     # the next start
    assert code == 0, err
    assert f'removed 1 temporary file(s) left by an interrupted write: {leftover[0]}' in out
    assert temporary_files(run) == [] and state_of(run / 'last.state.pt')['epoch'] == 2
    assert 'removed 1 temporary file(s)' in (run / 'log.txt').read_text()


@pytest.mark.parametrize('fault, damage', [('disk full', 'truncated'), ('read-only', 'corrupt')])
def test_failed_checkpoint_write_then_an_unreadable_last_state(fault, damage, data, tmp_path, capsys, monkeypatch):
    """A full disk (ENOSPC from the writer) or a run folder that became read-only, at the epoch-2 checkpoint: one
    line with the fix, the epoch-1 checkpoint intact and no temporary file. Then last.state.pt is damaged: the
    command of the message resumes from best.state.pt and says so."""
    run = tmp_path / 'run'
    real_save = torch.save
    if fault == 'disk full':
        def save(obj, f, *a, **kw):
            if isinstance(obj, dict) and obj.get('epoch') == 2 and 'optimizer' in obj:
                with open(f, 'wb') as fh:
                    fh.write(b'PK\x03\x04 half a checkpoint')
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(obj, f, *a, **kw)
        monkeypatch.setattr(torch, 'save', save)
        cause = 'no space left on the device'
    else:
        def save(obj, f, *a, **kw):
            if isinstance(obj, dict) and obj.get('epoch') == 2 and 'optimizer' in obj:
                read_only_mount(monkeypatch, run)        # the folder turns read-only while the run goes on
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(f))
            return real_save(obj, f, *a, **kw)
        monkeypatch.setattr(torch, 'save', save)
        cause = 'the file system is read-only'
    line = error_line(tiny_args(data, run, '--epochs', '2'), capsys)
    monkeypatch.undo()
    assert f'cannot write {run / "last.state.pt"}: {cause}; the previous checkpoint {run / "last.state.pt"} is ' \
           f'intact.' in line
    assert f'resume with `polynext train --resume {run}`' in line
    assert f'`polynext train --resume {run} --output NEW_DIR`' in line
    assert temporary_files(run) == []
    assert state_of(run / 'last.state.pt')['epoch'] == 1 and state_of(run / 'best.state.pt')['epoch'] == 1

    blob = (run / 'last.state.pt').read_bytes()
    (run / 'last.state.pt').write_bytes(blob[:len(blob) // 3] if damage == 'truncated' else b'\x00garbage' * 64)
    code, out, err = cli(named_command(line), capsys)
    assert code == 0, err
    assert (f'note: {run / "last.state.pt"} cannot be read (truncated or corrupt); resuming from the last good state '
            f'{run / "best.state.pt"} (optimizer step 2) instead') in out
    assert 'resumed from the start of epoch 2' in out and state_of(run / 'last.state.pt')['epoch'] == 2
    assert temporary_files(run) == []


def test_a_read_only_run_folder_is_refused_before_anything_runs(data, tmp_path, capsys, monkeypatch):
    run = tmp_path / 'run'
    code, _, err = cli(tiny_args(data, run, '--epochs', '1'), capsys)
    assert code == 0, err
    read_only_mount(monkeypatch, run)
    line = error_line(['train', '--resume', run], capsys)
    assert line == (f'polynext train: error: cannot write in {run} (the file system is read-only); pass --output a '
                    f'writable folder')
    monkeypatch.undo()


# ---------------------------------------------------------------------------------------------
# a diverged run
# ---------------------------------------------------------------------------------------------

def _diverge_above(monkeypatch, lr: float, after: int = 3):
    """From the ``after``-th loss on, the loss is NaN while the run's lr is above ``lr`` (a run that diverges at
    its lr and trains at a lower one)."""
    real = trainer_mod.build_loss
    calls = {'n': 0}

    def build_loss(cfg, num_classes):
        mix, criterion = real(cfg, num_classes)

        def loss(logits, target):
            calls['n'] += 1
            value = criterion(logits, target)
            return value * float('nan') if cfg.lr > lr and calls['n'] >= after else value
        return mix, loss
    monkeypatch.setattr(trainer_mod, 'build_loss', build_loss)


def test_a_diverged_run_resumes_with_the_command_its_message_names(data, tmp_path, capsys, monkeypatch):
    run = tmp_path / 'run'
    _diverge_above(monkeypatch, 0.004)
    line = error_line(tiny_args(data, run, '--epochs', '2'), capsys)
    assert line == (f'polynext train: error: non-finite loss nan at optimizer step 3 (epoch 2, batch 1); the step was '
                    f'skipped and no checkpoint holds these values. Resume from the last good checkpoint (optimizer '
                    f'step 2) with a lower learning rate: `polynext train --resume {run} --set lr=0.001 --set '
                    f'clip_grad=1`, or run with --on-nonfinite rollback to do this automatically.')
    code, out, err = cli(named_command(line), capsys)
    assert code == 0, err
    state = state_of(run / 'last.state.pt')
    assert state['epoch'] == 2 and state['config']['lr'] == 0.001 and state['config']['clip_grad'] == 1.0
    assert state['changes'] == [dict(step=2, reason='--resume', changes=dict(lr=[0.01, 0.001], clip_grad=[5.0, 1.0]))]
    change = 'changed at optimizer step 2 (--resume): lr 0.01 → 0.001, clip_grad 5.0 → 1.0'
    assert change in out and change in (run / 'log.txt').read_text()
    config = (run / 'config.yaml').read_text()
    assert f'# {change}' in config and '\nlr: 0.001\n' in config and '\nclip_grad: 1.0\n' in config
    rows = [r for r in json.loads((run / 'metrics.json').read_text())]
    # the cosine schedule (per step, 4 steps) goes on with the new base lr; at step 4: min + (0.001 - min)(1 + cos π)/2
    assert rows[-1]['lr'] == pytest.approx(1e-5)
    assert state['optimizer']['param_groups'][0]['initial_lr'] == pytest.approx(0.001)


@pytest.mark.parametrize('limit', [3, 1])
def test_rollback_lowers_the_lr_up_to_its_limit(limit, data, tmp_path, capsys, monkeypatch):
    run = tmp_path / 'run'
    _diverge_above(monkeypatch, 0.003)         # lr 0.01 → 0.005 (diverges again) → 0.0025 (trains)
    args = tiny_args(data, run, '--epochs', '2', '--on-nonfinite', 'rollback', '--set', f'nonfinite_limit={limit}')
    if limit == 1:
        line = error_line(args, capsys)
        assert line.endswith('1 rollback(s) with a lower lr did not help (nonfinite_limit=1).')
        assert f'`polynext train --resume {run} --set lr=0.0005 --set clip_grad=1`' in line
        return
    code, out, err = cli(args, capsys)
    assert code == 0, err
    state = state_of(run / 'last.state.pt')
    assert state['epoch'] == 2 and state['config']['lr'] == pytest.approx(0.0025)
    assert [c['reason'] for c in state['changes']] == ['rollback 2 of 3 after a non-finite value']
    assert state['changes'][0]['changes'] == dict(lr=[0.01, 0.0025])
    log = (run / 'log.txt').read_text()
    assert 'rollback 1 of 3 after a non-finite value: back to the last good checkpoint' in log
    assert 'rollback 2 of 3 after a non-finite value: back to the last good checkpoint' in log and 'lr 0.0025' in log


def test_skip_leaves_out_non_finite_steps_up_to_its_limit():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    logged = []
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), Precision(torch.device('cpu')),
                     BatchLayout(8), Meters(), device=torch.device('cpu'), nonfinite=NonFinitePolicy('skip', limit=2),
                     log=logged.append, resume_hint=lambda: 'Resume with X.')
    before = model.weight.detach().clone()
    for k in range(2):
        nn.functional.mse_loss(model(x), y).mul(float('nan')).backward()
        assert math.isnan(step.optimizer_step(float('nan'), epoch=0, batch=k))
    assert torch.equal(model.weight, before) and step.global_step == 2 and model.weight.grad is None
    assert logged[0] == ('warning: non-finite loss nan at optimizer step 1 (epoch 1, batch 1); step skipped (1 in a '
                         'row, the run stops after 2: nonfinite_limit)')
    nn.functional.mse_loss(model(x), y).backward()
    step.optimizer_step(1.0, epoch=0, batch=2)                     # a finite step resets the count
    assert not torch.equal(model.weight, before) and step.nonfinite_in_a_row == 0
    for k in range(2):
        nn.functional.mse_loss(model(x), y).mul(float('inf')).backward()
        step.optimizer_step(float('inf'), epoch=0, batch=3 + k)
    nn.functional.mse_loss(model(x), y).mul(float('nan')).backward()
    with pytest.raises(NonFiniteError, match=r'3 optimizer steps in a row \(more than nonfinite_limit=2\); the run '
                                             r'stopped and no checkpoint holds these values\. Resume with X\.'):
        step.optimizer_step(float('nan'), epoch=0, batch=5)


def test_a_diverged_segmentation_run_resumes_with_the_command_its_message_names(tmp_path, capsys, monkeypatch):
    from polynext.seg import trainer as seg_trainer
    from polynext.seg.synthetic import write_ade20k_folder
    from test_seg_run import tiny
    ade = write_ade20k_folder(tmp_path / 'ADEChallengeData2016', num_train=4, num_val=1, size=48)
    run = tmp_path / 'run'
    real_loss, real_build = seg_trainer.seg_loss, seg_trainer.SegTrainer._build_optimizer
    lr = {}

    def build_optimizer(self, model):
        lr['now'] = self.cfg.lr
        return real_build(self, model)

    def seg_loss(*args, **kw):
        loss, parts = real_loss(*args, **kw)
        lr['calls'] = lr.get('calls', 0) + 1
        return (loss * float('nan') if lr['now'] > 5e-5 and lr['calls'] > 4 else loss), parts
    monkeypatch.setattr(seg_trainer.SegTrainer, '_build_optimizer', build_optimizer)
    monkeypatch.setattr(seg_trainer, 'seg_loss', seg_loss)
    line = error_line(tiny(ade, run), capsys)
    assert ('polynext seg: error: non-finite loss nan at optimizer step 3 (epoch 3, batch 2); the step was skipped '
            'and no checkpoint holds these values. Resume from the last good checkpoint (optimizer step 2) with a '
            f'lower learning rate: `polynext seg train --resume {run} --set lr=1e-05 --set clip_grad=1`') in line
    code, out, err = cli(named_command(line), capsys)
    assert code == 0, err
    state = state_of(run / 'last.state.pt')
    assert state['iteration'] == 4 and state['config']['lr'] == 1e-5 and state['config']['clip_grad'] == 1.0
    assert state['changes'] == [dict(step=2, reason='--resume', changes=dict(lr=[1e-4, 1e-5], clip_grad=[None, 1.0]))]
    assert 'changed at optimizer step 2 (--resume): lr 0.0001 → 1e-05, clip_grad None → 1.0' in \
        (run / 'log.txt').read_text()


def test_a_diverged_detection_run_resumes_with_the_command_its_message_names(tmp_path, capsys, monkeypatch):
    pytest.importorskip('pycocotools')
    from polynext.det.synthetic import write_coco_folder
    from polynext.engine.step import TrainStep as Step
    from test_det_run import tiny
    coco = write_coco_folder(tmp_path / 'coco', num_train=4, num_val=2, size=48)
    run = tmp_path / 'run'
    real_backward, calls = Step.backward, {'n': 0}

    def backward(self, loss):         # the third step on diverges while the base lr is above 0.0005
        calls['n'] += 1
        lr = self.optimizer.param_groups[0]['initial_lr']
        return real_backward(self, loss * float('nan') if lr > 0.0005 and calls['n'] >= 3 else loss)
    monkeypatch.setattr(Step, 'backward', backward)
    args = tiny(coco, run, '--batch-size', '2', '--set', 'demo_images=0', '--set', 'warmup_iters=1')
    line = error_line(args, capsys)
    assert line.startswith('polynext det: error: non-finite gradient norm nan (loss ') and (
        'at optimizer step 3 (epoch 2, batch 1); the step was skipped and no checkpoint holds these values. Resume '
        'from the last good checkpoint (optimizer step 2) with a lower learning rate: `polynext det train --resume '
        f'{run} --set lr=0.0002 --set clip_grad=1`, or run with --on-nonfinite rollback') in line, line
    code, out, err = cli(named_command(line), capsys)
    assert code == 0, err
    state = state_of(run / 'last.state.pt')
    assert state['epochs_done'] == 2 and state['config']['lr'] == 0.0002 and state['config']['clip_grad'] == 1.0
    assert state['changes'] == [dict(step=2, reason='--resume', changes=dict(lr=[0.002, 0.0002],
                                                                             clip_grad=[None, 1.0]))]
    assert 'changed at optimizer step 2 (--resume): lr 0.002 → 0.0002, clip_grad None → 1.0' in \
        (run / 'log.txt').read_text()


# ---------------------------------------------------------------------------------------------
# Ctrl-C, polynext convert, file permissions
# ---------------------------------------------------------------------------------------------

def test_ctrl_c_names_the_command_that_resumes(data, tmp_path, capsys, monkeypatch):
    run = tmp_path / 'run'
    real = trainer_mod.Trainer.train_one_epoch

    def interrupted_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch)
    monkeypatch.setattr(trainer_mod.Trainer, 'train_one_epoch', interrupted_in_epoch_2)
    line = error_line(tiny_args(data, run, '--epochs', '2'), capsys, code=130)
    assert line == (f'polynext train: interrupted; the last checkpoint is {run / "last.state.pt"}: resume with '
                    f'`polynext train --resume {run}` (or run the same command again)')


def test_convert_keeps_a_polynext_checkpoint_metadata(data, tmp_path, capsys):
    """A polynext checkpoint keeps its classes, eval transform, recipe and epoch through `convert`: `validate`
    measures the same on both files (without them it would evaluate at the reference's 232 → 224)."""
    from polynext.checkpoint import read_safetensors_metadata, save_safetensors
    torch.manual_seed(0)
    model = polynext.create_model('cpolynext_lr', num_classes=4, init_channels=8)
    meta = dict(format='polynext', architecture='cpolynext_lr', num_classes=4, model_kwargs=dict(init_channels=8),
                classes=[f'class_{c}' for c in range(4)], recipe='cpolynext_lr_digits', epoch=7, weights='raw',
                eval=dict(resize=16, crop=None, interpolation='bilinear', mean=[0.5] * 3, std=[0.25] * 3))
    src = save_safetensors(model.state_dict(), tmp_path / 'run.safetensors', metadata=meta)
    out = tmp_path / 'converted.safetensors'
    code, stdout, err = cli(['convert', src, out], capsys)
    assert code == 0, err
    assert 'kept classes, eval, recipe, epoch' in stdout
    kept = read_safetensors_metadata(out)
    assert {k: kept[k] for k in meta} == dict(meta) and kept['source'] == 'run.safetensors'
    results = []
    for path in (src, out):
        code, stdout, err = cli(['validate', '--checkpoint', path, '--data', data, '--workers', '0', '--no-progress',
                                 '--json', '--output', tmp_path / path.stem], capsys)
        assert code == 0, err
        results.append(json.loads(stdout))
    assert results[0]['transform'] == results[1]['transform'] == 'resize 16 → no crop, bilinear'
    assert results[0]['top1'] == results[1]['top1'] and results[0]['loss'] == results[1]['loss']
    # the output is never the input, even through another spelling of the path
    assert error_line(['convert', src, tmp_path / '.' / 'run.safetensors'], capsys).endswith(
        'is the input file; pass another output path (convert never overwrites its input)')


def test_written_files_have_the_usual_permissions(tmp_path):
    from polynext.checkpoint import atomic_save, save_safetensors
    umask = os.umask(0o022)
    try:
        a = save_safetensors({'w': torch.zeros(2)}, tmp_path / 'w.safetensors')
        b = atomic_save({'w': torch.zeros(2)}, tmp_path / 'w.pt')
    finally:
        os.umask(umask)
    assert oct(a.stat().st_mode & 0o777) == oct(b.stat().st_mode & 0o777) == '0o644'


def test_a_robustness_folder_loses_the_temporary_file_of_a_killed_write(tmp_path):
    from polynext.robustness.runner import ResultStore
    ResultStore(tmp_path).put_many({'a': dict(top1=1.0)})
    (tmp_path / '.state.json.k2x9q1ab.tmp').write_text('{"format"')          # killed between write and rename
    (tmp_path / 'notes.tmp').write_text('a file of the user')
    store = ResultStore(tmp_path)
    assert store.get('a') == dict(top1=1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['notes.tmp', 'state.json']
