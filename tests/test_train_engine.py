"""The task-independent engine: samplers, seeded augmentation, RNG capture, run folder, non-finite and
out-of-memory handling, config coercion, tolerant image loading."""
import json
import random
from typing import Optional, Tuple

import numpy as np
import pytest
import torch

from polynext.engine import (
    BatchLayout, NonFiniteError, OutOfMemory, ResumableDistributedSampler, RunFolder, ShardSampler,
    capture_rng_state, check_step, config_diff, oom_advice, parse_set_args, restore_rng_state, sample_seed,
    seeded_rng,
)
from polynext.engine.config import coerce_value
from polynext.errors import ConfigError, DataError
from polynext.train.data import Samples


def test_resumable_sampler_skips_exactly_the_seen_samples():
    data = list(range(10))
    full = ResumableDistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=5)
    full.set_epoch(3)
    keys = list(full)
    assert len(keys) == 5 and all(e == 3 for _, e in keys)
    part = ResumableDistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=5)
    part.set_epoch(3)
    part.set_start(2)
    assert list(part) == keys[2:] and len(part) == 3
    other = ResumableDistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=5)
    other.set_epoch(3)
    assert sorted(i for i, _ in keys + list(other)) == list(range(10))   # the two shards cover the data
    with pytest.raises(ValueError):
        part.set_start(6)


def test_shard_sampler_has_no_padding():
    shards = [list(ShardSampler(13, 2, r)) for r in range(2)]
    assert shards == [list(range(0, 13, 2)), list(range(1, 13, 2))]
    assert sum(len(s) for s in shards) == 13


def test_seeded_rng_depends_only_on_the_key_and_restores_the_global_state():
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    before = (torch.rand(1).item(), random.random(), np.random.rand())
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    with seeded_rng(sample_seed(0, 2, 7)):
        a = (torch.rand(3), random.random(), np.random.rand())
    after = (torch.rand(1).item(), random.random(), np.random.rand())
    assert after == before          # the global generators continue as if nothing had happened
    with seeded_rng(sample_seed(0, 2, 7)):
        b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert sample_seed(0, 2, 7) != sample_seed(0, 3, 7) != sample_seed(1, 2, 7)


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    np.random.randn()          # leaves a cached gaussian in NumPy's state
    state = capture_rng_state()
    torch.save({'rng': [state]}, tmp_path / 's.pt')
    expected = (torch.rand(4), random.random(), np.random.randn(3))
    loaded = torch.load(tmp_path / 's.pt', weights_only=True)['rng'][0]
    restore_rng_state(loaded)
    got = (torch.rand(4), random.random(), np.random.randn(3))
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1] and np.array_equal(expected[2], got[2])


def test_run_folder_metrics_curve_and_checkpoints(tmp_path):
    run = RunFolder(tmp_path / 'run', quiet=True)
    history = [dict(epoch=1, train_loss=2.0, val_top1=10.0), dict(epoch=2, train_loss=1.0, val_top1=50.0, extra=3)]
    run.write_metrics(history)
    assert json.loads((run.path / 'metrics.json').read_text()) == history
    assert (run.path / 'metrics.csv').read_text().splitlines() == [
        'epoch,train_loss,val_top1,extra', '1,2.0,10.0,', '2,1.0,50.0,3']
    run.write_metrics(history + [dict(epoch=3, train_loss=float('nan'))])
    assert json.loads((run.path / 'metrics.json').read_text())[-1] == dict(epoch=3, train_loss=None)
    assert (run.path / 'metrics.csv').read_text().splitlines()[-1] == '3,,,'
    png = run.plot_curves(history, [('loss', 'loss', [('train_loss', 'train')])])
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    w = {'a': torch.ones(2)}
    run.save_checkpoint('last', {'format': 'x', 'model': w, 'epoch': 1}, w, metadata={'epoch': 1},
                        extra_weights={'ema': {'a': torch.zeros(2)}})
    run.copy_checkpoint('last', 'best', extra=('ema',))
    for name in ('last.state.pt', 'last.safetensors', 'last_ema.safetensors', 'best.state.pt', 'best.safetensors',
                 'best_ema.safetensors'):
        assert (run.path / name).is_file(), name
    assert not list(run.path.glob('.*.tmp'))      # no temp files left behind
    with pytest.raises(NonFiniteError, match="tensor 'a' holds NaN"):
        run.save_checkpoint('last', {}, {'a': torch.tensor([1.0, float('nan')])})
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(run.path / 'last.safetensors'))['a'], torch.ones(2))   # old file kept
    run.log('hello')
    assert (run.path / 'log.txt').read_text().rstrip().endswith(' hello')


def test_check_step_names_the_step_and_the_way_back():
    check_step(1.0, torch.tensor(3.0), epoch=1, step=0, global_step=0)
    with pytest.raises(NonFiniteError) as e:
        check_step(float('nan'), torch.tensor(1.0), epoch=4, step=17, global_step=99, resume_hint='Resume with X.')
    assert str(e.value) == ('non-finite loss nan at optimizer step 100 (epoch 5, batch 18); the step was skipped and '
                            'no checkpoint holds these values. Resume with X.')
    with pytest.raises(NonFiniteError, match='non-finite gradient norm inf'):
        check_step(2.0, torch.tensor(float('inf')), epoch=1, step=0, global_step=0)


def test_oom_advice_keeps_the_effective_batch():
    layout = BatchLayout(device_batch=128, world_size=2, accumulation=4)
    with pytest.raises(OutOfMemory) as e:
        with oom_advice(layout):
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    assert str(e.value) == ('out of memory during training with effective batch 1024 = 128 per device × 2 device(s) × '
                            '4 accumulation step(s). Use --device-batch-size 64 (accumulation becomes 8, the effective '
                            'batch stays 1024).')
    with pytest.raises(OutOfMemory, match='even with 1 image per device'):
        with oom_advice(BatchLayout(1)):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes")
    with pytest.raises(KeyError):            # other errors pass through untouched
        with oom_advice(layout):
            raise KeyError('x')


def test_config_coercion():
    assert coerce_value('x', '1e-3', float) == 1e-3
    assert coerce_value('x', '3', int) == 3
    assert coerce_value('x', 'null', Optional[int]) is None
    assert coerce_value('x', '0.5,1', Tuple[float, float]) == (0.5, 1.0)
    assert coerce_value('x', 'yes', bool) is True
    with pytest.raises(ConfigError, match="bad value for 'x': 'abc' is not a number"):
        coerce_value('x', 'abc', float)
    assert parse_set_args(['a-b=1', 'c= x ']) == {'a_b': '1', 'c': 'x'}
    assert config_diff({'a': (1, 2), 'b': 1}, {'a': [1, 2], 'b': 2}) == [('b', 1, 2)]


class _Flaky(torch.utils.data.Dataset):
    """Items 2 and 3 cannot be read."""
    samples = [(f'img{i}.png', 0) for i in range(6)]

    def __len__(self):
        return 6

    def __getitem__(self, i):
        if i in (2, 3):
            raise OSError('image file is truncated')
        return torch.full((1,), float(i)), i % 2


def test_unreadable_images_are_replaced_and_reported():
    s = Samples(_Flaky(), transform=None)
    assert s[1] == (torch.tensor([1.0]), 1, -1)
    img, target, skipped = s[2]
    assert (float(img), target, skipped) == (4.0, 0, 2)        # item 4 takes the slot of item 2
    assert s.path_of(2) == 'img2.png'

    class AllBad(_Flaky):
        def __getitem__(self, i):
            raise OSError('broken')
    with pytest.raises(DataError, match='10 images in a row cannot be read, starting at img0.png'):
        Samples(AllBad(), None)[0]
