"""`polynext bench`, the measurement library and the benchmark scripts, on tiny configs.

Nothing here asserts a speed: timings are only checked for consistency (median, img/s, ratio).
"""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import polynext.bench as bench
from polynext.bench import (PINNED_TUNABLES, BenchSettings, ModelSpec, allocator_status, is_oom_error,
                            make_step, model_specs, parse_model_kwargs, pinned_allocator_env,
                            run_bench, time_interleaved)
from polynext.cli import main as cli_main
from polynext.errors import ConfigError
from polynext.profile import count_macs

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parent.parent
PINNED = ':'.join(f'{k}={v}' for k, v in PINNED_TUNABLES.items())
glibc_only = pytest.mark.skipif(not bench._is_glibc(), reason='the allocator re-exec is glibc-specific')
TINY = dict(img_size=64, batch_size=2, runs=1, warmup=1, memory=False, threads=1)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the tests share 2 cores with other test workers (no speed is asserted)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _env_without_tunables():
    env = dict(os.environ)
    env.pop('GLIBC_TUNABLES', None)
    env.pop(bench._REEXEC_GUARD, None)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT / 'src'), env.get('PYTHONPATH')]))
    return env


# --------------------------------------------------------------------------------------
# the command on tiny configs
# --------------------------------------------------------------------------------------

def test_cli_infer_table_json_plot(tmp_path, capsys):
    out, png = tmp_path / 'r.json', tmp_path / 'r.png'
    rc = cli_main(['bench', 'cpolynext_t', 'apolynext_t', '--model-kwargs', 'init_channels=8', '--img-size', '64',
                   '-b', '2', '--runs', '2', '--warmup', '1', '--threads', '1', '--no-memory', '--no-progress',
                   '--json', str(out), '--plot', str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith('cpu (') and 'infer, fp32, batch 2, 64 px' in lines[0] and '1 thread,' in lines[0]
    assert lines[1].split() == ['model', 'params', '(M)', 'GMACs', 'img/s', 'ms/batch', 'peak', 'MiB', 'ratio']
    assert lines[3].split()[0] == 'cpolynext_t' and lines[3].split()[-1] == '1.00'
    assert lines[4].split()[0] == 'apolynext_t'
    assert 'ratio = img/s relative to cpolynext_t' in text

    data = json.loads(out.read_text())
    assert data['settings']['img_size'] == 64 and data['settings']['mode'] == 'infer'
    assert data['environment']['threads'] == 1 and data['environment']['torch'] == torch.__version__
    assert data['environment']['allocator'] in ('pinned', 'user', 'default', 'not glibc')
    first, second = data['results']
    for r, name in ((first, 'cpolynext_t'), (second, 'apolynext_t')):
        model = timm.create_model(name, init_channels=8)
        assert r['model'] == name and r['kwargs'] == {'init_channels': 8}
        assert r['params'] == sum(p.numel() for p in model.parameters())
        assert r['macs'] == count_macs(model, 64)
        assert len(r['times_s']) == 2 and r['batch_size'] == 2
        assert r['ms_per_batch'] == pytest.approx(1000 * statistics.median(r['times_s']))
        assert r['img_per_s'] == pytest.approx(2 / statistics.median(r['times_s']))
        assert r['gmacs_per_s'] == pytest.approx(r['macs'] / 1e9 * r['img_per_s'])
        assert r['peak_mem_bytes'] is None and isinstance(r['first_call_s'], float)  # values: see the fake-clock test
    assert first['ratio'] == 1.0
    assert second['ratio'] == pytest.approx(second['img_per_s'] / first['img_per_s'])
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_train_mode_runs_and_reports():
    settings = BenchSettings(mode='train', **TINY)
    specs = model_specs(['cpolynext_t', 'convformer_s18'], {}, {'cpolynext_t': dict(init_channels=8)})
    report = run_bench(specs, settings, progress=False)
    assert [r.label for r in report.results] == ['cpolynext_t', 'convformer_s18']
    assert report.results[1].params == 26_774_448
    assert 'train, fp32' in report.header()
    assert all(len(r.times_s) == 1 and r.img_per_s == pytest.approx(2 / r.times_s[0]) for r in report.results)


class _Clock:
    """A fake ``time`` module for bench: every perf_counter() call advances by ``tick`` seconds."""

    def __init__(self, tick):
        self.now, self.tick = 0.0, tick

    def perf_counter(self):
        self.now += self.tick
        return self.now


def test_timings_are_the_clock_differences(monkeypatch):
    """Every figure of the timing table comes from the clock: with a clock that advances 0.25 s
    per reading, the first call, every timed round and the derived figures are known exactly."""
    monkeypatch.setattr(bench, 'time', _Clock(0.25))
    settings = BenchSettings(mode='infer', img_size=32, batch_size=2, runs=3, warmup=2, memory=False, threads=1)
    specs = model_specs(['cpolynext_t', 'apolynext_t'], dict(init_channels=8), {})
    report = run_bench(specs, settings, progress=False)
    for r in report.results:
        assert r.first_call_s == 0.25 and r.times_s == [0.25, 0.25, 0.25]
        assert r.ms_per_batch == 250.0 and r.img_per_s == 8.0 and r.ratio == 1.0
        d = r.to_dict()
        assert d['ms_min'] == d['ms_max'] == 250.0 and d['gmacs_per_s'] == pytest.approx(r.macs / 1e9 * 8.0)


def test_compile_also_times_the_same_model_eager(monkeypatch):
    """``compile``: each model also runs eager in the same rounds (a copy with the same weights, not
    compiled), and the report gives the compile time and the speed-up. torch.compile is replaced by
    a wrapper that counts its calls, and the clock advances 0.25 s per reading."""
    compiled_calls = []

    def fake_compile(model, **kwargs):
        def fn(x):
            compiled_calls.append(x.shape)
            return model(x)
        return fn
    monkeypatch.setattr(torch, 'compile', fake_compile)
    monkeypatch.setattr(bench, 'time', _Clock(0.25))
    settings = BenchSettings(mode='infer', img_size=32, batch_size=2, runs=3, warmup=2, memory=False, threads=1,
                             compile=True)
    report = run_bench(model_specs(['cpolynext_t'], dict(init_channels=8), {}), settings, progress=False)
    r = report.results[0]
    assert len(compiled_calls) == 2 + 3                     # warm-up + timed rounds; the eager copy is not compiled
    assert r.times_s == r.eager_times_s == [0.25] * 3
    assert r.compile_speedup == 1.0 and r.compile_s == 0.0  # first call 0.25 s minus a 0.25 s step
    d = r.to_dict()
    assert d['eager_img_per_s'] == 8.0 and d['compile_speedup'] == 1.0
    header, _, row = report.table().splitlines()
    assert header.split()[-4:] == ['compile', 's', 'x', 'eager'] and row.split()[-2:] == ['0.0', '1.00']
    assert 'x eager' in report.footnote()
    plain = run_bench(model_specs(['cpolynext_t'], dict(init_channels=8), {}),
                      BenchSettings(mode='infer', img_size=32, batch_size=2, runs=1, warmup=1, memory=False,
                                    threads=1), progress=False)
    assert plain.results[0].eager_times_s is None and 'x eager' not in plain.table()


def test_train_step_is_forward_backward_adamw_zero_grad():
    model = timm.create_model('cpolynext_t', init_channels=8, num_classes=5)
    before = [p.detach().clone() for p in model.parameters()]
    step = make_step(model, BenchSettings(mode='train', img_size=32, batch_size=2), torch.device('cpu'))
    step()
    assert model.training
    assert all(p.grad is None for p in model.parameters())            # zero_grad(set_to_none=True)
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed == len(before)                                       # AdamW moved every parameter
    step()  # a second step works (optimizer state reused)


def test_infer_step_bf16_channels_last():
    model = timm.create_model('cpolynext_t', init_channels=8)
    step = make_step(model, BenchSettings(dtype='bf16', channels_last=True, img_size=32, batch_size=2),
                     torch.device('cpu'))
    step()
    assert not model.training
    assert model.stem.weight.dtype == torch.bfloat16
    assert model.stem.weight.is_contiguous(memory_format=torch.channels_last)


def test_macs_known_values_polynext_and_timm():
    """cpolynext_t at 224 = 1,198,988,208 MACs (spec §8); at 64 px every conv's output shrinks by
    (64/224)^2 exactly (56→16, 28→8, 14→4, 7→2) and only the 576→1000 classifier stays:
    (1,198,988,208 − 576,000)·16/196 + 576,000 = 98,405,568. convformer_s18 = 3.941 G (spec),
    resnet18 = 1.814 G (well known)."""
    settings = BenchSettings(img_size=224, batch_size=1, runs=1, warmup=1, memory=False, threads=1)
    report = run_bench(model_specs(['cpolynext_t', 'convformer_s18', 'resnet18']), settings, progress=False)
    macs = {r.label: r.macs for r in report.results}
    assert macs['cpolynext_t'] == 1_198_988_208
    assert macs['convformer_s18'] / 1e9 == pytest.approx(3.941, abs=5e-4)
    assert macs['resnet18'] / 1e9 == pytest.approx(1.814, abs=5e-4)
    params = {r.label: r.params for r in report.results}
    assert params['cpolynext_t'] == 6_431_752 and params['resnet18'] == 11_689_512

    small = run_bench(model_specs(['cpolynext_t']), BenchSettings(**TINY), progress=False)
    assert small.results[0].macs == (1_198_988_208 - 576 * 1000) * 16 // 196 + 576 * 1000 == 98_405_568


def test_caformer_macs_include_attention():
    """The fused SDPA is invisible to FlopCounterMode; bench counts with it off (spec: 4.11 G vs 3.88 G)."""
    report = run_bench(model_specs(['caformer_s18']), BenchSettings(img_size=224, batch_size=1, runs=1, warmup=1,
                                                                    memory=False, threads=1), progress=False)
    assert report.results[0].macs / 1e9 == pytest.approx(4.107, abs=1e-3)


# --------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------

def test_memory_probe_in_process():
    """The function the fresh child process runs (the child itself is covered end to end below),
    called here in a fresh interpreter too: in a long-lived test worker the RSS high-water mark and the
    freed pages left by earlier tests can hide an allocation (it once read 0 bytes under xdist).
    A classifier of 96 × 200,000 float32 weights (76.8 MB) is one block above glibc's largest mmap
    threshold, so it is fresh memory: the probe must see it, and little else (the rest of the model and
    a 32 px batch of 2 are a few MB)."""
    script = (
        'import json\n'
        'from polynext.bench import BenchSettings, ModelSpec, _memory_probe\n'
        f'tiny = BenchSettings(**{TINY!r})\n'
        "ok = _memory_probe(dict(spec=ModelSpec('m', 'cpolynext_t', dict(init_channels=8, num_classes=200_000)),\n"
        '                        settings=tiny))\n'
        "bad = _memory_probe(dict(spec=ModelSpec('m', 'cpolynext_t', dict(init_chanels=8)), settings=tiny))\n"
        'print(json.dumps(dict(ok=ok, bad=bad)))\n')
    proc = subprocess.run([sys.executable, '-c', script], env=_env_without_tunables(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ok, bad = result['ok'], result['bad']
    head = 96 * 200_000 * 4
    assert head <= ok['peak_bytes'] <= head + 48 * 2 ** 20, ok
    assert 'fresh process' in ok['method']
    assert bad['error'] == 'config' and "Did you mean 'init_channels'" in bad['message']


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_tiny_bench_measures_memory():
    settings = BenchSettings(device='cuda', img_size=64, batch_size=2, runs=2, warmup=1, dtype='bf16')
    report = run_bench(model_specs(['cpolynext_t', 'convformer_s18'], dict(init_channels=8), {}), settings,
                       progress=False)
    for r in report.results:  # at least the bf16 weights, which arrive on the device during warm-up
        assert 2 * r.params <= r.peak_mem_bytes <= 2 * r.params + 2 ** 30
    assert 'max_memory_allocated' in report.memory_method
    assert report.environment['device_name'] == torch.cuda.get_device_name()


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------

def test_fixed_size_model_hint():
    with pytest.raises(ConfigError, match='img_size=64'):
        run_bench(model_specs(['cpolynext_t_bn'], dict(init_channels=8), {}), BenchSettings(**TINY), progress=False)


@pytest.mark.parametrize('exc', [
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes. "
                 "Error code 12 (Cannot allocate memory)"),
    RuntimeError('[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried '
                 'to allocate 68719476736 bytes.'),
    MemoryError(),
    torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB'),
])
def test_batch_that_does_not_fit_suggests_half(monkeypatch, capsys, exc):
    assert is_oom_error(exc)

    def failing_step(model, settings, device, label='model'):
        def step():
            raise exc
        return step
    monkeypatch.setattr(bench, 'make_step', failing_step)
    rc = cli_main(['bench', 'cpolynext_t', '-b', '48', '--img-size', '32', '--model-kwargs', 'init_channels=8',
                   '--no-memory', '--no-progress', '--threads', '1'])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith('polynext bench: error: ')
    assert 'batch 48 at 32 px does not fit in cpu memory for cpolynext_t' in err and 'Try --batch-size 24.' in err


def test_other_runtime_errors_are_not_called_oom():
    assert not is_oom_error(RuntimeError('mat1 and mat2 shapes cannot be multiplied'))
    assert not is_oom_error(ValueError('not enough memory'))


def test_memory_probe_oom_suggests_half(monkeypatch):
    monkeypatch.setattr(bench, 'measure_peak_rss', lambda spec, settings: dict(
        error='oom', message='killed by the operating system (out of memory)'))
    with pytest.raises(ConfigError, match=r'batch 2 at 64 px does not fit .* Try --batch-size 1\.'):
        run_bench(model_specs(['cpolynext_t'], dict(init_channels=8), {}), BenchSettings(**dict(TINY, memory=True)),
                  progress=False)


# --------------------------------------------------------------------------------------
# model kwargs, interleaving
# --------------------------------------------------------------------------------------

def test_parse_model_kwargs_and_specs():
    common, per = parse_model_kwargs(['init_channels=8', 'mlp=gelu', 'img_size=(64, 64)',
                                      'cpolynext_t:drop_path_rate=0.1', 'cpolynext_t#2:channels_last=False'])
    assert common == dict(init_channels=8, mlp='gelu', img_size=(64, 64))
    assert per == {'cpolynext_t': dict(drop_path_rate=0.1), 'cpolynext_t#2': dict(channels_last=False)}
    specs = model_specs(['cpolynext_t', 'convformer_s18', 'cpolynext_t'], common, per)
    assert [s.label for s in specs] == ['cpolynext_t', 'convformer_s18', 'cpolynext_t#2']
    assert specs[0].kwargs == dict(common, drop_path_rate=0.1)
    assert specs[1].kwargs == common
    assert specs[2].kwargs == dict(common, drop_path_rate=0.1, channels_last=False)
    for bad in (['=3'], [':x=3'], ['cpolynext_t:1x=3']):
        with pytest.raises(ConfigError):
            parse_model_kwargs(bad)


def test_interleaved_order_reverses_every_other_round():
    calls = []
    steps = {k: (lambda k=k: calls.append(k)) for k in 'abc'}
    times = time_interleaved(steps, runs=3, inner=2)
    assert calls == list('aabbcc' 'ccbbaa' 'aabbcc')
    assert {k: len(v) for k, v in times.items()} == dict(a=3, b=3, c=3)


# --------------------------------------------------------------------------------------
# the pinned allocator
# --------------------------------------------------------------------------------------

@glibc_only
def test_pinned_allocator_env_logic():
    env = pinned_allocator_env({'PATH': '/bin'})
    assert env['GLIBC_TUNABLES'] == 'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736'
    assert env['PATH'] == '/bin' and env[bench._REEXEC_GUARD] == '1'
    assert allocator_status(env) == 'pinned'
    merged = pinned_allocator_env({'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=0'})
    assert merged['GLIBC_TUNABLES'] == 'glibc.malloc.tcache_count=0:' + PINNED
    assert allocator_status({'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=0'}) == 'default'
    assert pinned_allocator_env({'GLIBC_TUNABLES': PINNED}) is None                        # already pinned
    assert pinned_allocator_env({'GLIBC_TUNABLES': 'glibc.malloc.mmap_max=4'}) is None     # the user's own choice
    assert allocator_status({'GLIBC_TUNABLES': 'glibc.malloc.mmap_max=4'}) == 'user'
    assert pinned_allocator_env({bench._REEXEC_GUARD: '1'}) is None                       # never loop


@glibc_only
def test_memory_probe_env_unpins_and_fixes_the_mmap_threshold():
    env = bench.memory_probe_env({'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=0:' + PINNED,
                                  bench._REEXEC_GUARD: '1', 'PATH': '/bin'})
    assert env['GLIBC_TUNABLES'] == 'glibc.malloc.tcache_count=0:glibc.malloc.mmap_threshold=65536'
    assert bench._REEXEC_GUARD not in env and env['PATH'] == '/bin'


class _Execed(Exception):
    pass


@glibc_only
def test_bench_command_reexecs_itself(monkeypatch, capsys):
    seen = {}

    def fake_execve(path, args, env):
        seen.update(path=path, args=args, env=env)
        raise _Execed
    monkeypatch.setattr(os, 'execve', fake_execve)
    monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
    monkeypatch.delenv(bench._REEXEC_GUARD, raising=False)
    argv = ['bench', 'cpolynext_t', '--img-size', '32']
    monkeypatch.setattr(sys, 'argv', ['/venv/bin/polynext'] + argv)
    monkeypatch.setattr(sys, 'orig_argv', ['python3', '/venv/bin/polynext'] + argv)
    with pytest.raises(_Execed):
        cli_main(argv)
    assert seen['path'] == sys.executable
    assert seen['args'] == [sys.executable, '/venv/bin/polynext'] + argv
    assert seen['env']['GLIBC_TUNABLES'] == PINNED
    assert 're-running with GLIBC_TUNABLES=' in capsys.readouterr().err

    # --no-pin-allocator, or a call from other Python code (sys.argv is not `... bench`), never re-execs
    seen.clear()
    monkeypatch.setattr(bench, 'run_bench', lambda *a, **k: (_ for _ in ()).throw(_Execed('ran')))
    with pytest.raises(_Execed, match='ran'):
        cli_main(argv + ['--no-pin-allocator'])
    monkeypatch.setattr(sys, 'argv', ['pytest', '-q'])
    with pytest.raises(_Execed, match='ran'):
        cli_main(argv)
    assert not seen
    assert 'glibc allocator not pinned' in capsys.readouterr().err


@pytest.mark.slow
@glibc_only
def test_reexec_end_to_end_train_with_memory(tmp_path):
    """A real `python -m polynext bench` without GLIBC_TUNABLES: it re-runs itself pinned; the peak
    memory of a train step (a fresh process per model) holds weights, gradients and both AdamW
    moments: at least 16 bytes per parameter."""
    out = tmp_path / 'r.json'
    proc = subprocess.run([sys.executable, '-m', 'polynext', 'bench', 'cpolynext_t', '--model-kwargs',
                           'init_channels=16', '--img-size', '32', '-b', '1', '--runs', '1', '--warmup', '1',
                           '--mode', 'train', '--threads', '1', '--no-progress', '--json', str(out)],
                          env=_env_without_tunables(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert 're-running with GLIBC_TUNABLES=' + PINNED in proc.stderr
    data = json.loads(out.read_text())
    assert data['environment']['allocator'] == 'pinned' and data['environment']['glibc_tunables'] == PINNED
    r = data['results'][0]
    assert r['peak_mem_bytes'] >= 16 * r['params'] and 'fresh process' in data['memory_method']
    assert 'mmap_threshold=64 KiB' in data['memory_method']
    assert data['command'][:3] == ['polynext', 'bench', 'cpolynext_t']
    assert 'train, fp32' in proc.stdout and 'peak memory = weights + input + step' in proc.stdout


# --------------------------------------------------------------------------------------
# benchmark scripts
# --------------------------------------------------------------------------------------

def test_weight_grad_script_toy(tmp_path):
    """benchmarks/weight_grad.py at toy sizes: both steps timed on one model, and the 1x1 backward inside them;
    every 1x1 shape of the model is listed with both kernels' times and the kernel chosen for it, which is the
    one kept in the machine's file."""
    from polynext.ops import pointwise
    out = tmp_path / 'wg.json'
    assert load_benchmark('weight_grad').main(['cpolynext_t', '--batch-size', '2', '--img-size', '32', '--runs', '1',
                                             '--json', str(out)]) == 0
    (row,) = json.loads(out.read_text())['rows']
    assert row['model'] == 'cpolynext_t' and set(row['seconds']) == {'onednn', 'auto'}
    shapes = row['shapes']
    # cpolynext_t's first 1x1 layer (PolyConv's pw_in in stage 0, 48 -> 48 channels, 8x8 at 32 px) is among them
    assert {'input': [2, 48, 8, 8], 'out_channels': 48} in [{k: r[k] for k in ('input', 'out_channels')} for r in shapes]
    assert sum(row['kernels'].values()) == len(shapes) == len({(tuple(r['input']), r['out_channels']) for r in shapes})
    assert all(r['onednn_ms'] > 0 and r['mm_ms'] > 0 for r in shapes)
    # every 1x1 layer of the model counted once: the layers of all shapes add up to the model's PointwiseConv2d
    from polynext.ops.pointwise import PointwiseConv2d
    model = timm.create_model('cpolynext_t')
    assert sum(r['layers'] for r in shapes) == sum(isinstance(m, PointwiseConv2d) for m in model.modules())
    # the in-step profile of the 1x1 backward finds every one of those layers under both kernels
    assert row['in_step_layers'] == {'onednn': sum(r['layers'] for r in shapes), 'auto': sum(r['layers'] for r in shapes)}
    assert all(len(v) == 1 and v[0] > 0 for v in row['in_step_1x1_backward_rounds_ms'].values())
    kept = json.loads(pointwise.cache_path().read_text())['choices']
    for r in shapes:
        n, c, h, w = r['input']
        assert [v for k, v in kept.items() if k.endswith(f" | {n * h * w}x{c}->{r['out_channels']} float32")] \
            == [r['chosen']]


@pytest.mark.parametrize('script, argv, message', [
    ('weight_grad', ['cpolynext_x'], "unknown model 'cpolynext_x'"),
    ('weight_grad', ['convformer_s18'], 'convformer_s18 is not a PolyNeXt model'),
    ('weight_grad', ['--runs', '0'], '--runs must be at least 1, got 0'),
    ('weight_grad', ['--json', '{tmp}'], 'is a folder; give a file path'),
    ('poly_attention', ['apolynext_x'], "unknown model 'apolynext_x'"),
    ('poly_attention', ['cpolynext_t', '--img-size', '32'], 'cpolynext_t runs no polynomial attention kernel'),
    ('poly_attention', ['--baseline', '{tmp}/missing.py'], 'is not a file; write one with git show'),
    ('poly_attention', ['--runs', '0'], '--runs must be at least 1, got 0'),
    ('poly_attention', ['--json', '{tmp}'], 'is a folder; give a file path'),
    ('narrow_pointwise', ['cpolynext_x'], "unknown model 'cpolynext_x'"),
    ('narrow_pointwise', ['--dtype', 'fp16'], "invalid choice: 'fp16'"),
    ('narrow_pointwise', ['--runs', '0'], '--runs must be at least 1, got 0'),
    ('narrow_pointwise', ['--json', '{tmp}'], 'is a folder; give a file path'),
    ('attention_convs', ['apolynext_x'], "unknown model 'apolynext_x'"),
    ('attention_convs', ['--runs', '0'], '--runs must be at least 1, got 0'),
    ('attention_convs', ['--json', '{tmp}'], 'is a folder; give a file path'),
    ('switch_ab', ['constants.nope'], 'constants.nope is not a switch of polynext.ops; use one of'),
    ('switch_ab', ['constants.keep', 'cpolynext_x'], "unknown model 'cpolynext_x'"),
    ('switch_ab', ['constants.keep', '--runs', '0'], '--runs must be at least 1, got 0'),
    ('switch_ab', ['constants.keep', '--json', '{tmp}'], 'is a folder; give a file path'),
    ('kernel_source_ab', ['cpolynext_x'], "unknown model 'cpolynext_x'"),
    ('kernel_source_ab', ['--runs', '0'], '--runs must be at least 1, got 0'),
    ('kernel_source_ab', ['--json', '{tmp}'], 'is a folder; give a file path'),
    ('kernel_source_ab', ['--off', 'nope'], '--off nope: not a switch of ops.cpu_kernels; use one of'),
    ('kernel_source_ab', ['--rev', 'no-such-rev'], '--rev no-such-rev: git cannot show'),
])
def test_benchmark_script_bad_input_is_one_line(script, argv, message, tmp_path, capsys):
    argv = [a.replace('{tmp}', str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark(script).main(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if 'error:' in line]
    assert len(errors) == 1 and message in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_poly_attention_whole_model_refused_where_the_fused_kernel_is_not_built(tmp_path, capsys, monkeypatch):
    """``--whole-model`` times the fused attention on and off: on a CPU that does not build it for ``--dtype``
    (bf16 without AVX-512 BF16, here pretended) one line says so, before anything runs or is written."""
    from polynext.ops import cpu_kernels
    if cpu_kernels.library() is None:
        pytest.skip('no C compiler: the kernels are not built')
    monkeypatch.setattr(cpu_kernels.library(), 'attention_fused', frozenset([torch.float32]))
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark('poly_attention').main(['--whole-model', '--dtype', 'bf16', '--json', str(tmp_path / 'x.json')])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if 'error:' in line]
    assert len(errors) == 1 and 'not built here for bf16 (it needs AVX-512 BF16' in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_depthwise_backward_script_toy(tmp_path):
    """benchmarks/depthwise_backward.py at toy sizes under bf16 autocast: every depthwise layer polynext treats
    specially in an APolyNeXt (dilated coarse, undilated 5x5 Q / K, stride-2 boundaries) timed against autograd,
    gradients equal in fp64."""
    out = tmp_path / 'dw.json'
    script = load_benchmark('depthwise_backward')
    assert script.main(['apolynext_t', '--batch-size', '2', '--img-size', '64', '--init-channels', '8',
                        '--runs', '1', '--dtype', 'bf16', '--json', str(out)]) == 0
    rows = json.loads(out.read_text())['rows']
    kinds = {(r['kernel'], r['dilation'], r['stride']) for r in rows}
    assert {(3, 2, 1), (5, 2, 1), (5, 1, 1), (3, 1, 2)} <= kinds
    assert all(r['max_abs_diff_fp64'] < 1e-10 and r['dtype'] == 'bf16' and r['no_kernel_ms'] > 0 for r in rows)


def test_poly_attention_script_toy(tmp_path):
    """benchmarks/poly_attention.py at toy sizes: apolynext_t's two attention shapes (stages 3 and 4), the
    kernel equal to the paper's expression in fp64, a baseline file timed alongside."""
    out = tmp_path / 'pa.json'
    script = load_benchmark('poly_attention')
    baseline = ROOT / 'src' / 'polynext' / 'ops' / 'poly_attention.py'
    assert script.main(['apolynext_t', '--batch-size', '2', '--img-size', '64', '--runs', '1',
                        '--baseline', str(baseline), '--json', str(out)]) == 0
    rows = json.loads(out.read_text())['rows']
    assert [r['shape'] for r in rows] == [[2, 3, 16, 32], [2, 5, 4, 32]]
    assert all(r['max_rel_diff_fp64'] < 1e-12 and r['baseline_ms'] > 0 for r in rows)
    assert all(r['identical_to_baseline'] for r in rows)   # the same file as baseline: the same bits
    assert script.main(['apolynext_t', '--batch-size', '2', '--img-size', '64', '--runs', '1', '--dtype', 'bf16',
                        '--json', str(out)]) == 0
    assert json.loads(out.read_text())['dtype'] == 'bf16'
    assert script.main(['apolynext_t', '--batch-size', '2', '--img-size', '64', '--runs', '1', '--mode', 'infer',
                        '--baseline', str(baseline), '--json', str(out)]) == 0
    data = json.loads(out.read_text())
    assert data['mode'] == 'infer' and all(r['max_rel_diff_fp64'] < 1e-12 and r['identical_to_baseline']
                                           for r in data['rows'])
    assert all(r['max_rel_diff_dtype'] < 1e-5 for r in data['rows']) and data['whole_model'] is None
    from polynext.ops import cpu_kernels
    whole = ['apolynext_t', '--batch-size', '2', '--img-size', '64', '--runs', '1', '--mode', 'infer', '--whole-model',
             '--json', str(out)]
    if not (cpu_kernels.kernel_available() and torch.float32 in cpu_kernels.library().attention_fused):
        # no fused float32 attention on this CPU (AVX-512 only): --whole-model is refused in one line, nothing written
        out.unlink()
        with pytest.raises(SystemExit) as exit_:
            script.main(whole)
        assert exit_.value.code == 2 and not out.exists()
        return
    # the whole model with the fused float32 attention on and off: the same logits to float32 rounding
    assert script.main(whole) == 0
    (row,) = json.loads(out.read_text())['whole_model']
    assert row['model'] == 'apolynext_t' and row['fused_img_s'] > 0 and row['pytorch_img_s'] > 0
    assert row['max_abs_logit_diff'] < 1e-5
    if cpu_kernels.kernel_available() and torch.bfloat16 in cpu_kernels.library().attention_fused:
        # bf16 (AVX-512 BF16): the unfused column per shape, and the whole model on and off to bf16's rounding
        assert script.main(['apolynext_t', '--batch-size', '2', '--img-size', '64', '--runs', '1', '--mode', 'infer',
                            '--dtype', 'bf16', '--whole-model', '--json', str(out)]) == 0
        data = json.loads(out.read_text())
        assert all(r['unfused_ms'] > 0 and r['speedup_vs_unfused'] > 0 and r['max_rel_diff_dtype'] < 1e-2
                   for r in data['rows'])
        (row,) = data['whole_model']
        assert row['fused_img_s'] > 0 and 0 < row['max_abs_logit_diff'] < 0.1


def test_table11_quick_script(tmp_path):
    out = tmp_path / 't11.json'
    env = dict(_env_without_tunables(), GLIBC_TUNABLES=PINNED)
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'table11_activations.py'), '--quick',
                           '--threads', '1', '--json', str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert 'StarReLU' in proc.stdout and 're-running' not in proc.stderr
    data = json.loads(out.read_text())
    rows = {r['row']: r for r in data['rows']}
    assert list(rows) == ['GELU (PyTorch)', 'GELU (PyTorch, tanh)', 'GELU (Equation 9)', 'StarReLU',
                          'PolyMLP product a*b']
    assert rows['GELU (Equation 9)']['fwd_ratio'] == 1.0 and rows['GELU (Equation 9)']['fwd_bwd_ratio'] == 1.0
    assert rows['StarReLU']['paper_a100_fwd_runs_per_s'] == 35_257
    assert rows['StarReLU']['paper_fwd_ratio'] == pytest.approx(35_257 / 20_273)
    assert rows['PolyMLP product a*b']['paper_a100_fwd_runs_per_s'] is None
    assert data['settings']['shape'] == [1, 65536]


def test_table11_equation9_is_gelu_tanh():
    t11 = load_benchmark('table11_activations')
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    torch.testing.assert_close(t11.gelu_equation9(x), torch.nn.functional.gelu(x, approximate='tanh'))


def test_table12_quick_script(tmp_path, capsys):
    t12 = load_benchmark('table12_throughput')
    out = tmp_path / 't12.json'
    assert t12.main(['--quick', '--threads', '1', '--json', str(out)]) == 0
    text = capsys.readouterr().out
    assert 'GELU in ConvFormer/CAFormer (paper protocol)' in text and 'paper A100 img/s' in text
    data = json.loads(out.read_text())
    rows = {r['label']: r for r in data['rows']}
    assert list(rows) == ['convformer_s18', 'caformer_s18', 'cpolynext_t', 'apolynext_t']
    # GELU replaces the 2 learnable scalars of each of the 36 StarReLUs: 26,774,448 - 72
    assert rows['convformer_s18']['params'] == 26_774_376
    assert rows['convformer_s18']['paper_a100_img_per_s'] == 2213 and rows['convformer_s18']['paper_ratio'] == 1.0
    assert rows['caformer_s18']['paper_ratio'] == pytest.approx(2093 / 2213)
    assert rows['cpolynext_t']['paper_a100_img_per_s'] is None and rows['cpolynext_t']['paper_gmacs'] == 1.2
    assert rows['cpolynext_t']['macs'] == 98_405_568
    assert data['settings']['batch_size'] == 2 and data['settings']['img_size'] == 64


def test_compile_check_calibrates_bn_variants(monkeypatch):
    """``benchmarks/compile_check.py`` compares compiled and eager outputs; an untrained bn variant's eval
    logits are NaN in both (its running statistics normalise nothing), so the script first sets them from
    the input batch. With torch.compile replaced by the identity the comparison is exact, and it fails
    (NaN) when the calibration is left out."""
    import polynext.models.polynext as family
    compile_check = load_benchmark('compile_check')
    monkeypatch.setattr(torch, 'compile', lambda model, **kwargs: model)
    row = compile_check.check('cpolynext_t_bn', 'eager', 32, 2)
    assert row['ok'] and row['infer_max_abs_diff'] == 0.0 and row['train_max_rel_grad_diff'] == 0.0
    monkeypatch.setattr(family, 'calibrate_running_stats', lambda model, x: model)
    row = compile_check.check('cpolynext_t_bn', 'eager', 32, 2)
    assert not row['ok'] and row['infer_max_abs_diff'] != row['infer_max_abs_diff']   # NaN


@pytest.mark.parametrize('argv, message', [
    (['--json', '{tmp}'], 'is a folder; give a file path such as {tmp}/demo.json'),
    (['--runs', '0'], '--runs must be at least 1, got 0'),
    (['--models', 'cpolynext_q'], 'cpolynext_q'),
])
def test_check_script_args_refuses_in_one_line(argv, message, tmp_path, capsys):
    """``bench.check_script_args``, the benchmark scripts' shared checks: each bad input one line naming it, before
    anything runs (a pinned allocator re-exec only for command-line runs, so none here)."""
    import argparse
    parser = argparse.ArgumentParser(prog='demo.py')
    parser.add_argument('--json')
    parser.add_argument('--runs', type=int, default=1)
    parser.add_argument('--models', nargs='*', default=['cpolynext_t'])
    args = parser.parse_args([a.format(tmp=tmp_path) for a in argv])
    with pytest.raises(SystemExit):
        bench.check_script_args(parser, args, 'demo', argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert message.format(tmp=tmp_path) in err[-1]
    bench.check_script_args(parser, parser.parse_args([]), 'demo', [])   # good input: nothing raised
