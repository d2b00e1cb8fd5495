"""End-to-end: `polynext train` on generated ImageFolder data (2 epochs), DDP with 2 CPU processes,
SIGKILL + resume equivalence, `polynext validate` (ours, authors' format, EMA entries), and one clear
message for every bad input."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import polynext
from polynext.cli import main
from conftest import run_metrics, subprocess_env

CLASSES = 4


def make_image_folder(root: Path, train_per_class: int = 8, val_per_class: int = 3, size: int = 16,
                      extra_val: int = 1, seed: int = 0) -> Path:
    """Colour-coded classes (class c is bright in channel c % 3, striped for c >= 3), PNG files.

    ``extra_val`` more val images in class 0, so the val set (4 × 3 + 1 = 13) cannot split evenly."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', train_per_class), ('val', val_per_class)):
        for c in range(CLASSES):
            d = root / split / f'class_{c}'
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n + (extra_val if split == 'val' and c == 0 else 0)):
                img = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
                img[..., c % 3] += 150
                if c >= 3:
                    img[::2] = 255 - img[::2]
                Image.fromarray(img).save(d / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('imgs'))


def tiny_args(data, out, *extra):
    """A small CPolyNeXt-LR (C0 = 8) at 16 px, batch 8, 1 thread, no workers."""
    return ['train', '--recipe', 'cpolynext_lr_digits', '--data', str(data), '--output', str(out),
            '--set', 'model_kwargs={init_channels: 8}', '--batch-size', '8', '--device-batch-size', '8',
            '--workers', '0', '--set', 'threads=1', '--no-progress', *extra]


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(args, capsys, expected: str):
    code, out, err = run_cli(args, capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    return lines[0]


def _tensors(path):
    from safetensors.torch import load_file
    return load_file(str(path))


# ---------------------------------------------------------------------------------------------
# 2 epochs on generated images, reference augmentation, EMA, one corrupt image
# ---------------------------------------------------------------------------------------------

def test_two_epochs_on_an_image_folder(tmp_path, capsys, monkeypatch):
    data = make_image_folder(tmp_path / 'data')
    (data / 'train' / 'class_1' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    out = tmp_path / 'run'
    from polynext.engine.step import TrainStep
    after_step = []                      # (epoch, the raw weights after each optimizer step)
    step_fn = TrainStep.optimizer_step

    def recording_step(self, loss, *, epoch, batch):
        norm = step_fn(self, loss, epoch=epoch, batch=batch)
        after_step.append((epoch, {k: v.detach().clone() for k, v in self.module.state_dict().items()}))
        return norm
    monkeypatch.setattr(TrainStep, 'optimizer_step', recording_step)
    code, stdout, err = run_cli(tiny_args(
        data, out, '--epochs', '2', '--set', 'ema=true', '--set', 'ema_start_epoch=1', '--set', 'ema_decay=0.5',
        '--set', 'mixup_alpha=0.8',
        '--set', 'cutmix_alpha=1.0', '--set', 'randaugment=rand-m9-mstd0.5-inc1', '--set', 'random_erasing=0.25',
        '--set', 'train_interpolation=random', '--set', 'max_corrupt=2', '--set', 'schedule_granularity=epoch',
        '--set', 'head_dropout=0.2', '--set', 'head_dropout_ramp=2'), capsys)
    assert code == 0, err
    assert 'epoch 1/2  train loss' in stdout and 'val top-1' in stdout
    for name in ('config.yaml', 'metrics.csv', 'metrics.json', 'learning_curve.png', 'log.txt', 'last.safetensors',
                 'last.state.pt', 'last_ema.safetensors', 'best.safetensors', 'best.state.pt'):
        assert (out / name).is_file(), name
    rows = run_metrics(out)
    assert [r['epoch'] for r in rows] == [1, 2]
    assert [r['val_images'] for r in rows] == [13, 13]
    assert 'val_ema_top1' not in rows[0] and 'val_ema_top1' in rows[1]              # EMA from the 2nd epoch
    assert [r['head_dropout'] for r in rows] == [0.0, pytest.approx(0.1)]              # min(0.2, 0.2 · e / 2)
    lr0 = 1e-2
    assert rows[0]['lr'] == lr0 and rows[1]['lr'] == pytest.approx(1e-5 + (lr0 - 1e-5) * 0.5)   # cosine per epoch
    csv_lines = (out / 'metrics.csv').read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith('epoch,lr,head_dropout,train_loss')
    # the corrupt file is skipped, counted and named in the log
    assert 'unreadable train image skipped: ' + str(data / 'train' / 'class_1' / 'broken.png') in \
        (out / 'log.txt').read_text()
    state = torch.load(out / 'last.state.pt', weights_only=True)
    # 33 files (one unreadable) / 8 per batch, mixing drops the partial batch: 4 steps per epoch
    assert (state['epoch'], state['batch_in_epoch'], state['global_step'], state['ema_updates']) == (2, 0, 8, 4)
    assert state['classes'] == [f'class_{c}' for c in range(CLASSES)]
    assert len(state['corrupt']['train']) == 1
    # the EMA is the math: from the first step of epoch 2 a copy, then ema ← 0.5 · ema + 0.5 · w after each step
    assert [e for e, _ in after_step] == [0] * 4 + [1] * 4
    expected = None
    for _, w in after_step[4:]:
        expected = dict(w) if expected is None else {k: 0.5 * expected[k] + 0.5 * v if v.is_floating_point() else v
                                                     for k, v in w.items()}
    ema_file = _tensors(out / 'last_ema.safetensors')
    assert ema_file.keys() == expected.keys() == state['ema_state'].keys()
    for k, v in expected.items():
        torch.testing.assert_close(ema_file[k], v, atol=1e-6, rtol=1e-5, msg=k)
        assert torch.equal(state['ema_state'][k], ema_file[k]), k
    assert not torch.equal(ema_file['head.fc.weight'], after_step[-1][1]['head.fc.weight'])   # not the raw weights
    # its val top-1 is what `polynext validate` measures on those EMA weights
    code, vout, err = run_cli(['validate', '--checkpoint', str(out / 'last_ema.safetensors'), '--data', str(data),
                               '--json', '--no-progress', '--workers', '0', '--output', str(tmp_path / 'v_ema')], capsys)
    assert code == 0, err
    assert json.loads(vout)['top1'] == pytest.approx(rows[1]['val_ema_top1'], abs=1e-4)
    # the saved config reproduces the run's config exactly
    from polynext.train.recipes import PRESETS
    name, cfg = PRESETS.resolve(config_file=str(out / 'config.yaml'))
    assert name == 'cpolynext_lr_digits' and cfg.model_kwargs == {'init_channels': 8} and cfg.ema_start_epoch == 1
    # best weights load strictly with their metadata; best = the epoch with the best (raw or EMA) top-1
    model = polynext.create_model('cpolynext_lr', checkpoint=str(out / 'best.safetensors'), init_channels=8)
    assert model.num_classes == CLASSES
    best = max(max(r['val_top1'], r.get('val_ema_top1', -1)) for r in rows)
    assert rows[-1]['best_top1'] == best
    # running the finished command again does not train again
    code, stdout, _ = run_cli(tiny_args(data, out, '--epochs', '2', '--set', 'ema=true', '--set', 'ema_start_epoch=1',
                                        '--set', 'ema_decay=0.5', '--set', 'mixup_alpha=0.8', '--set', 'cutmix_alpha=1.0', '--set',
                                        'randaugment=rand-m9-mstd0.5-inc1', '--set', 'random_erasing=0.25', '--set',
                                        'train_interpolation=random', '--set', 'max_corrupt=2', '--set',
                                        'schedule_granularity=epoch', '--set', 'head_dropout=0.2', '--set',
                                        'head_dropout_ramp=2'), capsys)
    assert code == 0 and 'is a finished run' in stdout


# ---------------------------------------------------------------------------------------------
# DDP: 2 CPU processes (gloo) under torchrun
# ---------------------------------------------------------------------------------------------

def test_ddp_two_cpu_processes(folder, tmp_path):
    """2 ranks × 4 images: after every optimizer step both replicas hold the same weights (the gradients were
    all-reduced), and they equal a single process that trains on the same global batch of 8 (the sampler
    interleaves the ranks, so the 8 images are the same). lr 1e-4: AdamW's first steps are ±lr for every
    weight, which turns rounding in a near-zero gradient into a difference of up to ~1e-3·lr; at the
    recipe's 1e-2 that grows to 1e-3 within 4 steps, at 1e-4 it stays ≤ 2.4e-7."""
    out = tmp_path / 'ddp'
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    args = tiny_args(folder, out, '--epochs', '2', '--device-batch-size', '4', '--lr', '1e-4', '--set', 'ema=true',
                     '--set', 'ema_start_epoch=0')
    hooks = Path(__file__).with_name('cli_with_hooks.py')
    (tmp_path / 'w_ddp').mkdir()
    proc = subprocess.run(torchrun + [str(hooks)] + args, env=dict(subprocess_env(), POLYNEXT_TEST_WEIGHTS=str(tmp_path / 'w_ddp')),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / 'w_one').mkdir()
    single = tiny_args(folder, tmp_path / 'one', '--epochs', '2', '--device-batch-size', '8', '--lr', '1e-4',
                       '--set', 'ema=true', '--set', 'ema_start_epoch=0')
    proc = subprocess.run([sys.executable, str(hooks)] + single, env=dict(subprocess_env(), POLYNEXT_TEST_WEIGHTS=str(tmp_path / 'w_one')),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for k in range(1, 9):
        r0, r1, one = (torch.load(tmp_path / d / f'rank{r}_step{k}.pt', weights_only=True)
                       for d, r in (('w_ddp', 0), ('w_ddp', 1), ('w_one', 0)))
        assert all(torch.equal(r0[n], r1[n]) for n in r0), f'the replicas differ after step {k}'
        for n in r0:    # the same update up to the order of the gradient sums
            torch.testing.assert_close(r0[n], one[n], atol=1e-6, rtol=1e-5, msg=f'{n} after step {k}')
    assert not (tmp_path / 'w_ddp' / 'rank0_step9.pt').exists()
    moved = torch.load(tmp_path / 'w_ddp' / 'rank0_step8.pt', weights_only=True)['head.fc.weight']
    assert not torch.equal(moved, torch.load(tmp_path / 'w_ddp' / 'rank0_step1.pt', weights_only=True)['head.fc.weight'])
    log = (out / 'log.txt').read_text()
    assert 'batch 8 = 4 per device × 2 device(s) × 1 accumulation' in log
    rows = run_metrics(out)
    assert [r['val_images'] for r in rows] == [13, 13]      # sharded without padding, reduced over both ranks
    state = torch.load(out / 'last.state.pt', weights_only=True)
    assert state['world_size'] == 2 and len(state['rng']) == 2
    # 32 images / 2 ranks / 4 per device = 4 steps per epoch (no accumulation)
    assert state['global_step'] == 8
    assert not torch.equal(state['rng'][0]['torch'], state['rng'][1]['torch'])   # per-rank random streams
    w = _tensors(out / 'last.safetensors')                 # rank 0's weights after the 8th step
    assert all(torch.equal(w[k], v) for k, v in torch.load(tmp_path / 'w_ddp' / 'rank0_step8.pt').items())
    assert proc.stdout.count('epoch 1/2') == 1            # only rank 0 prints
    # validate with 2 ranks: sharded, reduced, the same numbers as the run's last epoch
    proc = subprocess.run(torchrun + ['-m', 'polynext', 'validate', '--checkpoint', str(out / 'last.state.pt'),
                                      '--no-ema', '--data', str(folder), '--workers', '0', '--no-progress', '--json',
                                      '--output', str(tmp_path / 'v')],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout[proc.stdout.index('{'):])
    assert res['images'] == 13 and res['top1'] == pytest.approx(rows[-1]['val_top1'], abs=1e-4)
    per_class = json.loads((tmp_path / 'v' / 'validate.json').read_text())['per_class']
    assert [r['images'] for r in per_class] == [4, 3, 3, 3]


# ---------------------------------------------------------------------------------------------
# SIGKILL mid-epoch after the EMA has started, then resume: only the remaining steps, the same end
# ---------------------------------------------------------------------------------------------

HOOKS = Path(__file__).with_name('cli_with_hooks.py')


def _resume_args(folder, out):
    # 32 images, batch 12 = 4 per device × accumulation 3: 8 micro-batches and 3 optimizer steps per epoch (3, 3
    # and a partial 2); a checkpoint after every optimizer step; mixing + RandAugment + erasing + drop path +
    # head-dropout ramp + EMA from the 2nd epoch: every random stream and every piece of state is exercised
    return [sys.executable, str(HOOKS)] + tiny_args(
        folder, out, '--epochs', '3', '--batch-size', '12', '--device-batch-size', '4', '--checkpoint-every', '1',
        '--set', 'mixup_alpha=0.8', '--set', 'cutmix_alpha=1.0', '--set', 'randaugment=rand-m9-mstd0.5-inc1',
        '--set', 'random_erasing=0.25', '--set', 'drop_path=0.1', '--set', 'head_dropout=0.3',
        '--set', 'head_dropout_ramp=2', '--set', 'ema=true', '--set', 'ema_start_epoch=1', '--set', 'ema_decay=0.5')


def test_sigkill_mid_epoch_after_ema_resumes_exactly_the_remaining_steps(folder, tmp_path):
    from cli_with_hooks import read_micro_batches, read_steps
    ref, run = tmp_path / 'ref', tmp_path / 'killed'
    proc = subprocess.run(_resume_args(folder, ref), env=dict(subprocess_env(), POLYNEXT_TEST_STEPS=str(tmp_path / 'ref_steps')),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    every = read_steps(tmp_path / 'ref_steps')            # (epoch, micro-batch index, global step after it)
    assert every == [(e, b, 3 * e + i + 1) for e in range(3) for i, b in enumerate((2, 5, 7))]
    assert read_micro_batches(tmp_path / 'ref_steps') == 3 * 8

    # killed (SIGKILL, by itself) right after the first mid-epoch checkpoint written once the EMA has made two updates
    proc = subprocess.run(_resume_args(folder, run), capture_output=True, text=True, timeout=300,
                          env=dict(subprocess_env(), POLYNEXT_TEST_KILL='mid_epoch_after_ema',
                                   POLYNEXT_TEST_STEPS=str(tmp_path / 'killed_steps')))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = torch.load(run / 'last.state.pt', weights_only=True)
    assert killed['ema_updates'] > 0 and killed['batch_in_epoch'] > 0      # after the EMA started, mid-epoch
    # exactly: epoch 2 (0-based 1), after its second step (micro-batches 0-5), two EMA updates, optimizer step 5
    assert (killed['epoch'], killed['batch_in_epoch'], killed['global_step'], killed['ema_updates']) == (1, 6, 5, 2)
    assert read_steps(tmp_path / 'killed_steps') == every[:5]
    ema_at_kill = _tensors(run / 'last_ema.safetensors')
    assert all(torch.equal(ema_at_kill[k], v) for k, v in killed['ema_state'].items())
    # the EMA is no copy of the model there: a resume that dropped it and restarted from the model would show
    assert not all(torch.equal(killed['ema_state'][k], v) for k, v in killed['model'].items() if v.is_floating_point())

    # the same command resumes: it runs exactly the 4 remaining optimizer steps and 10 remaining micro-batches
    proc = subprocess.run(_resume_args(folder, run), env=dict(subprocess_env(), POLYNEXT_TEST_STEPS=str(tmp_path / 'resumed')),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_steps(tmp_path / 'resumed') == every[5:]
    assert read_micro_batches(tmp_path / 'resumed') == 3 * 8 - (8 + 6)
    assert 'resumed from epoch 2, batch 6 (optimizer step 5)' in (run / 'log.txt').read_text()
    # and ends bit-identical to the uninterrupted run: metrics, raw, EMA and best weights
    assert run_metrics(run) == run_metrics(ref)
    for name in ('last.safetensors', 'last_ema.safetensors', 'best.safetensors'):
        a, b = _tensors(run / name), _tensors(ref / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    final, ref_final = (torch.load(r / 'last.state.pt', weights_only=True) for r in (run, ref))
    assert final['ema_updates'] == ref_final['ema_updates'] == 2 * 3
    assert final['global_step'] == ref_final['global_step'] == 9


# ---------------------------------------------------------------------------------------------
# polynext validate
# ---------------------------------------------------------------------------------------------

def _expected_eval(model, folder):
    """Top-1 / per-class correct counts computed by hand with the low-res reference transform."""
    from torchvision.datasets import ImageFolder
    from polynext.train.data import build_eval_transform
    from polynext.train.recipes import CIFAR_MEAN, CIFAR_STD
    tf = build_eval_transform(32, None, 'bicubic', CIFAR_MEAN, CIFAR_STD)
    ds = ImageFolder(str(folder / 'val'))
    x = torch.stack([tf(ds.loader(p)) for p, _ in ds.samples])
    y = torch.tensor([t for _, t in ds.samples])
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    per_class = [int(((pred == y) & (y == c)).sum()) for c in range(CLASSES)]
    return 100.0 * float((pred == y).float().mean()), per_class


def _model(seed):
    torch.manual_seed(seed)
    return polynext.create_model('cpolynext_lr', num_classes=CLASSES, init_channels=8)


def test_validate_ours_authors_and_ema_checkpoints(folder, tmp_path, capsys):
    from polynext.checkpoint import save_safetensors
    from polynext.models.polynext import reference_key_map
    a, b = _model(1), _model(2)
    top1_a, per_class_a = _expected_eval(a, folder)
    top1_b, _ = _expected_eval(b, folder)
    assert top1_a != top1_b
    # authors' format: reference key names, wrapped as their train script saves it
    ref_keys = reference_key_map(a)
    torch.save({'state_dict': {ref_keys[k]: v for k, v in a.state_dict().items()}}, tmp_path / 'authors.pt')
    save_safetensors(a.state_dict(), tmp_path / 'ours.safetensors',
                     metadata=dict(architecture='cpolynext_lr', model_kwargs={'init_channels': 8},
                                   classes=[f'class_{c}' for c in range(CLASSES)]))
    torch.save({'state_dict': b.state_dict(), 'state_dict_ema': a.state_dict()}, tmp_path / 'with_ema.pth')
    common = ['--data', str(folder), '--json', '--no-progress', '--workers', '0', '--batch-size', '5']
    for ckpt, extra, expected in (
            ('authors.pt', ['--model', 'cpolynext_lr', '--model-kwargs', '{init_channels: 8}'], top1_a),
            ('ours.safetensors', [], top1_a),                        # model and kwargs from the metadata
            ('with_ema.pth', ['--model', 'cpolynext_lr', '--model-kwargs', '{init_channels: 8}'], top1_a),
            ('with_ema.pth', ['--model', 'cpolynext_lr', '--model-kwargs', '{init_channels: 8}', '--no-ema'], top1_b)):
        out = tmp_path / f'v_{ckpt}_{len(extra)}'
        code, stdout, err = run_cli(['validate', '--checkpoint', str(tmp_path / ckpt), '--output', str(out)]
                                    + extra + common, capsys)
        assert code == 0, err
        res = json.loads(stdout)
        assert res['images'] == 13 and res['top1'] == pytest.approx(expected, abs=1e-4), ckpt
        assert res['top5'] == 100.0          # 4 classes: the top-4 always hold the label
        assert res['transform'] == 'resize 32 → no crop, bicubic'
    rows = (tmp_path / 'v_ours.safetensors_0' / 'per_class.csv').read_text().splitlines()
    assert rows[0] == 'index,cls,images,top1_correct,top1,top5_correct,top5'
    assert [int(r.split(',')[3]) for r in rows[1:]] == per_class_a
    assert [int(r.split(',')[2]) for r in rows[1:]] == [4, 3, 3, 3]


def test_validate_bf16_reports_its_agreement_with_fp32(folder, tmp_path, capsys):
    from torchvision.datasets import ImageFolder
    from polynext.checkpoint import save_safetensors
    from polynext.train.data import build_eval_transform
    from polynext.train.recipes import CIFAR_MEAN, CIFAR_STD
    model = _model(3).eval()
    save_safetensors(model.state_dict(), tmp_path / 'ours.safetensors',
                     metadata=dict(architecture='cpolynext_lr', model_kwargs={'init_channels': 8},
                                   classes=[f'class_{c}' for c in range(CLASSES)]))
    tf = build_eval_transform(32, None, 'bicubic', CIFAR_MEAN, CIFAR_STD)
    ds = ImageFolder(str(folder / 'val'))
    x = torch.stack([tf(ds.loader(p)) for p, _ in ds.samples]).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([t for _, t in ds.samples])
    model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model(x).float()
    code, stdout, err = run_cli(['validate', '--checkpoint', str(tmp_path / 'ours.safetensors'), '--data', str(folder),
                                 '--dtype', 'bf16', '--json', '--no-progress', '--workers', '0', '--batch-size', '13',
                                 '--output', str(tmp_path / 'v')], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    assert res['dtype'] == 'bf16' and res['images'] == 13
    assert res['top1'] == pytest.approx(100.0 * float((low.argmax(1) == y).float().mean()), abs=1e-4)
    agree = 100.0 * float((low.argmax(1) == ref.argmax(1)).float().mean())
    assert res['vs_fp32']['argmax_agreement'] == pytest.approx(agree, abs=1e-4)
    diff = float((low - ref).abs().max())
    assert 0 < diff and res['vs_fp32']['max_abs_logit_diff'] == pytest.approx(diff, rel=1e-6)


def test_validate_a_training_run_checkpoint_and_the_timm_transform(folder, tmp_path, capsys):
    out = tmp_path / 'run'
    code, _, err = run_cli(tiny_args(folder, out, '--epochs', '1'), capsys)
    assert code == 0, err
    last = run_metrics(out)[-1]
    # the trainers' optimizer is the fused AdamW kernel on the CPU too (engine.backend.optimizer_kwargs)
    state = torch.load(out / 'last.state.pt', weights_only=False)
    assert state['optimizer']['param_groups'][0]['fused'] is True
    for ckpt in ('best.safetensors', 'last.state.pt'):
        code, stdout, err = run_cli(['validate', '--checkpoint', str(out / ckpt), '--data', str(folder), '--json',
                                     '--no-progress', '--workers', '0', '--output', str(tmp_path / ckpt)], capsys)
        assert code == 0, err
        assert json.loads(stdout)['top1'] == pytest.approx(last['val_top1'], abs=1e-4)   # the run's own transform
    code, stdout, err = run_cli(['validate', '--checkpoint', str(out / 'best.safetensors'), '--data', str(folder),
                                 '--transform', 'timm', '--no-progress', '--workers', '0',
                                 '--output', str(tmp_path / 'timm')], capsys)
    assert code == 0, err
    assert 'timm pretrained_cfg: 32 px, crop_pct 1' in stdout and 'top1' in stdout


# ---------------------------------------------------------------------------------------------
# one clear message for what goes wrong during a run (bad inputs: tests/test_bad_inputs.py)
# ---------------------------------------------------------------------------------------------

def test_too_many_corrupt_images_stop_the_run(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', train_per_class=2, val_per_class=1, extra_val=0)
    for i in range(2):
        (data / 'train' / 'class_0' / f'bad{i}.png').write_bytes(b'garbage')
    msg = one_line_error(tiny_args(data, tmp_path / 'run', '--epochs', '1', '--device-batch-size', '2',
                                   '--batch-size', '2', '--set', 'max_corrupt=1'), capsys,
                         '2 of 10 train images cannot be read (limit 1, max_corrupt=1)')
    assert 'bad0.png' in msg and '--set max_corrupt=' in msg


def test_out_of_memory_suggests_accumulation(folder, tmp_path, capsys, monkeypatch):
    from polynext.models.polynext import PolyNeXt

    def oom(self, x):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')
    monkeypatch.setattr(PolyNeXt, 'forward', oom)
    one_line_error(tiny_args(folder, tmp_path / 'r', '--epochs', '1'), capsys,
                   'out of memory during training with effective batch 8 = 8 per device × 1 device(s) × 1 '
                   'accumulation step(s). Use --device-batch-size 4 (accumulation becomes 2, the effective batch '
                   'stays 8).')


def test_non_finite_loss_stops_before_the_weights_change(folder, tmp_path, capsys, monkeypatch):
    import polynext.train.trainer as trainer_mod
    from cli_with_hooks import record_steps
    from polynext.engine.step import TrainStep
    record_steps(monkeypatch)                      # restores TrainStep's methods after the test
    after = []
    step_fn = TrainStep.optimizer_step

    def keep_weights(self, loss, *, epoch, batch):
        norm = step_fn(self, loss, epoch=epoch, batch=batch)
        after.append({k: v.detach().clone() for k, v in self.module.state_dict().items()})
        return norm
    TrainStep.optimizer_step = keep_weights
    real = trainer_mod.build_loss
    calls = {'n': 0}

    def nan_after_two(cfg, num_classes):
        mix, crit = real(cfg, num_classes)

        def crit2(logits, target):
            calls['n'] += 1
            loss = crit(logits, target)
            return loss * float('nan') if calls['n'] >= 3 else loss
        return mix, crit2
    monkeypatch.setattr(trainer_mod, 'build_loss', nan_after_two)
    out = tmp_path / 'r'
    msg = one_line_error(tiny_args(folder, out, '--epochs', '1', '--checkpoint-every', '1'), capsys,
                         'non-finite loss nan at optimizer step 3 (epoch 1, batch 3); the step was skipped')
    assert f'`polynext train --resume {out} --set lr=0.001 --set clip_grad=1`' in msg
    state = torch.load(out / 'last.state.pt', weights_only=True)
    assert state['global_step'] == 2 and state['batch_in_epoch'] == 2
    assert len(after) == 2            # the third step never happened: the saved weights are those of step 2
    assert all(torch.equal(state['model'][k], v) for k, v in after[1].items())


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_mixed_precision_logic_on_cpu(folder, tmp_path, capsys, amp):
    """The autocast + GradScaler path (CUDA in practice) run on the CPU: fp16 keeps a loss scale in the state."""
    out = tmp_path / amp
    code, stdout, err = run_cli(tiny_args(folder, out, '--epochs', '1', '--set', f'amp={amp}', '--set', 'cpu_amp=true'),
                                capsys)
    assert code == 0, err
    assert f'cpu {amp}' in stdout
    state = torch.load(out / 'last.state.pt', weights_only=True)
    if amp == 'fp16':   # from GradScaler's initial 2^16, the fp16 gradients of all 4 steps overflow: each step is
        # skipped and halves the scale (the scaler's business, not a non-finite error): 2^12, no good step yet
        assert state['scaler']['scale'] == 2.0 ** 12 and state['scaler']['_growth_tracker'] == 0
        assert state['global_step'] == 4
    else:
        assert state['scaler'] is None
    assert all(torch.isfinite(v).all() for v in _tensors(out / 'last.safetensors').values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_cuda_training_with_autocast(folder, tmp_path, capsys, amp):
    out = tmp_path / amp
    code, stdout, err = run_cli(tiny_args(folder, out, '--epochs', '1', '--set', f'amp={amp}', '--device', 'cuda'),
                                capsys)
    assert code == 0, err
    assert f'cuda {amp}' in stdout


def test_tiny_imagenet_as_released_and_torchvision_sets_without_download(tmp_path, capsys):
    """Tiny-ImageNet's released layout (val/images + val_annotations.txt) loads as is; a missing CIFAR-10
    folder without --download is one clear message."""
    from polynext.train.data import build_data
    from polynext.train.recipes import PRESETS
    import dataclasses
    root = tmp_path / 'tiny-imagenet-200'
    wnids = ['n01443537', 'n01629819']
    rng = np.random.default_rng(0)
    for w in wnids:
        (root / 'train' / w / 'images').mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
                root / 'train' / w / 'images' / f'{w}_{i}.JPEG')
    (root / 'val' / 'images').mkdir(parents=True)
    lines = []
    for i, w in enumerate([wnids[1], wnids[0], wnids[1]]):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / 'val' / 'images' / f'val_{i}.JPEG')
        lines.append(f'val_{i}.JPEG\t{w}\t0\t0\t63\t63')
    (root / 'val' / 'val_annotations.txt').write_text('\n'.join(lines) + '\n')
    cfg = dataclasses.replace(PRESETS.get('cpolynext_lr_tiny_imagenet').config, data=str(tmp_path))
    bundle = build_data(cfg)
    assert bundle.classes == wnids and len(bundle.train) == 4 and len(bundle.val) == 3
    assert [bundle.val[i][1] for i in range(3)] == [1, 0, 1]
    assert tuple(bundle.val[0][0].shape) == (3, 64, 64)
    img, target, skipped = bundle.train[(0, 0)]
    assert tuple(img.shape) == (3, 64, 64) and skipped == -1
    (tmp_path / 'cifar').mkdir()
    one_line_error(['train', '--recipe', 'cpolynext_lr_cifar10', '--data', str(tmp_path / 'cifar')], capsys,
                   'CIFAR10 not found in')


def count_cell_checkpoints(monkeypatch) -> list:
    """Count the PolyNeXt cells run under activation checkpointing (``torch.utils.checkpoint`` as the stages call it)."""
    import polynext.models.polynext as pn
    calls, real = [], pn.checkpoint
    monkeypatch.setattr(pn, 'checkpoint', lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def check_grad_checkpointing_changes_nothing(train_args, tmp_path, monkeypatch) -> None:
    """A task's tiny run (``train_args(out, *extra)``: CLI arguments) without and with ``--set
    grad_checkpointing=true``: only the second runs cells checkpointed, and both end with the same weights bit
    for bit (the recomputation replays the random streams)."""
    from safetensors.torch import load_file
    plain, ckpt = tmp_path / 'plain', tmp_path / 'ckpt'
    calls = count_cell_checkpoints(monkeypatch)
    assert main(train_args(plain)) == 0
    assert not calls
    assert main(train_args(ckpt, '--set', 'grad_checkpointing=true')) == 0
    assert calls
    a, b = load_file(str(plain / 'last.safetensors')), load_file(str(ckpt / 'last.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grad_checkpointing_trains_to_the_same_weights_and_may_change_on_resume(folder, tmp_path, capsys,
                                                                                  monkeypatch):
    """``--set grad_checkpointing=true`` recomputes each cell in backward (timm's switch): the same weights after an
    epoch with drop path on, and a run may turn it on when resumed (a resume-safe key: where and how the run runs,
    not what it computes)."""
    extra = ('--epochs', '1', '--set', 'drop_path=0.2')
    check_grad_checkpointing_changes_nothing(lambda out, *more: tiny_args(folder, out, *extra, *more), tmp_path,
                                             monkeypatch)
    plain = tmp_path / 'plain'
    code, out, err = run_cli(tiny_args(folder, plain, *extra, '--resume', str(plain), '--set', 'grad_checkpointing=true'),
                             capsys)
    assert code == 0, err
