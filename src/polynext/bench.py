"""Cost of models, measured the same way for every model: params, MACs, throughput, peak memory.

``run_bench(specs, settings)`` builds every model (any timm name; PolyNeXt and the MetaFormer
baselines included), counts parameters and MACs, measures the peak memory of one model at a
time and then times all models *interleaved in one process*: every round runs one batch of
each model, the order reversed on alternate rounds, so that a machine that slows down or
speeds up during the run moves every model alike and the ratios hold. Numbers are medians.

The protocol follows ``spec/cpu_performance.md``:

* glibc's allocator must be pinned (``GLIBC_TUNABLES``, see :data:`PINNED_TUNABLES`), otherwise
  every large activation is mmap'ed and returned to the kernel on free, and the benchmark times
  page faults. The variable is only read when a process starts, so command-line entry points
  call :func:`ensure_pinned_allocator`, which re-executes the process with it set.
* ``infer`` = ``eval()`` + ``torch.inference_mode()``; ``train`` = forward + cross-entropy on
  random labels + backward + ``AdamW.step()`` + ``zero_grad``.
* MACs = ``FlopCounterMode`` FLOPs / 2 at batch 1 (:func:`polynext.profile.count_macs`, attention
  matmuls included).
* Peak memory is the memory one model needs for its step at this batch: weights, input and
  everything the step allocates (activations; in train mode also gradients and AdamW state).
  See :func:`measure_peak_rss` for why on CPU this runs in a fresh process per model.
* ``compile``: every model under ``torch.compile``, and a copy of it eager in the same rounds, so
  that the speed-up is measured within one run; the compile time is the first call minus a step.

The same functions serve ``polynext bench`` and the scripts in ``benchmarks/``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import pickle
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .engine.distributed import resolve_device
from .engine.memory import is_oom_error
from .errors import ConfigError

__all__ = [
    'PINNED_TUNABLES', 'BenchSettings', 'ModelSpec', 'ModelResult', 'BenchReport', 'run_bench',
    'allocator_status', 'pinned_allocator_env', 'ensure_pinned_allocator', 'check_script_args', 'resolve_device', 'prepare_device',
    'make_step', 'write_report',
    'time_interleaved', 'measure_peak_rss', 'parse_model_kwargs', 'model_specs', 'is_oom_error',
    'busy_machine_warning', 'format_table', 'build_model', 'environment', 'memory_probe_env', 'expand_variants',
    'RUNTIMES',
]

#: glibc malloc settings that keep freed memory in the heap (no mmap for large blocks, no trimming).
PINNED_TUNABLES = {'glibc.malloc.mmap_max': '0', 'glibc.malloc.trim_threshold': '68719476736'}
#: set in the environment of a re-executed process, so that it never re-executes again
_REEXEC_GUARD = 'POLYNEXT_ALLOCATOR_REEXEC'

MODES = ('infer', 'train')
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


# --------------------------------------------------------------------------------------
# The pinned allocator
# --------------------------------------------------------------------------------------

def _parse_tunables(value: str) -> Dict[str, str]:
    out = {}
    for item in filter(None, value.split(':')):
        key, _, val = item.partition('=')
        out[key] = val
    return out


def _is_glibc() -> bool:
    return sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'


def allocator_status(env: Optional[Dict[str, str]] = None) -> str:
    """'pinned' (our tunables in effect), 'user' (GLIBC_TUNABLES sets malloc mmap/trim itself),
    'default' (glibc's dynamic behaviour) or 'not glibc'."""
    env = os.environ if env is None else env
    if not _is_glibc():
        return 'not glibc'
    tunables = _parse_tunables(env.get('GLIBC_TUNABLES', ''))
    if all(tunables.get(k) == v for k, v in PINNED_TUNABLES.items()):
        return 'pinned'
    if any(k in tunables for k in PINNED_TUNABLES):
        return 'user'
    return 'default'


def pinned_allocator_env(env: Optional[Dict[str, str]] = None) -> Optional[Dict[str, str]]:
    """The environment to re-execute with, or ``None`` when no re-execution is needed.

    Nothing is done when the allocator is already pinned, when the user set either malloc
    tunable themselves (their choice wins), when this process is already the re-executed one,
    or off glibc. Other tunables in ``GLIBC_TUNABLES`` are kept.
    """
    env = dict(os.environ if env is None else env)
    if env.get(_REEXEC_GUARD) or allocator_status(env) != 'default':
        return None
    current = env.get('GLIBC_TUNABLES', '')
    ours = ':'.join(f'{k}={v}' for k, v in PINNED_TUNABLES.items())
    env['GLIBC_TUNABLES'] = f'{current}:{ours}' if current else ours
    env[_REEXEC_GUARD] = '1'
    return env


def write_report(path: Optional[str], obj: Any) -> None:
    """A benchmark script's JSON: written atomically where ``path`` is given, and the line that says so."""
    if path:
        from .checkpoint import atomic_write_json
        atomic_write_json(path, obj)
        print(f'wrote {path}')


def check_script_args(parser, args, script: str, argv: Optional[Sequence[str]]) -> None:
    """What every benchmark script checks before it runs anything, each failure one ``parser.error`` line: ``--json``
    is not a folder, ``--runs`` is at least 1, every name in ``args.models`` is a model; then, run from the command
    line (``argv`` None), the process re-executed with the pinned allocator (:func:`ensure_pinned_allocator`)."""
    from .factory import check_model_name
    if getattr(args, 'json', None) and Path(args.json).is_dir():
        parser.error(f'--json {args.json} is a folder; give a file path such as {args.json}/{script}.json')
    if getattr(args, 'runs', 1) < 1:
        parser.error(f'--runs must be at least 1, got {args.runs}')
    for name in getattr(args, 'models', ()):
        try:
            check_model_name(name)
        except ConfigError as err:
            parser.error(str(err))
    if argv is None:
        ensure_pinned_allocator(f'{script}.py', announce=lambda m: print(m.split(' (')[0], file=sys.stderr))


def ensure_pinned_allocator(prog: str = 'polynext', announce: Callable[[str], None] = None) -> None:
    """Re-execute this process with glibc's allocator pinned, if it is not pinned yet.

    Call it first thing in a command-line entry point (never from library code: it replaces the
    running process). ``sys.orig_argv`` is the interpreter's own command line, so ``python -m
    polynext bench``, the ``polynext`` console script and ``python script.py`` all re-run as typed.
    """
    env = pinned_allocator_env()
    if env is None:
        return
    announce = announce or (lambda msg: print(msg, file=sys.stderr, flush=True))
    announce(f"{prog}: re-running with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (pinned glibc allocator, "
             f"as benchmarks need; --no-pin-allocator skips this)")
    sys.stdout.flush()
    sys.stderr.flush()
    args = list(getattr(sys, 'orig_argv', [sys.executable] + sys.argv))[1:]
    os.execve(sys.executable, [sys.executable] + args, env)


# --------------------------------------------------------------------------------------
# Settings, model specs and model kwargs
# --------------------------------------------------------------------------------------

@dataclass
class BenchSettings:
    """What to measure. ``runs`` timed batches per model after ``warmup`` untimed ones."""
    img_size: int = 224
    batch_size: int = 32
    device: str = 'cpu'
    mode: str = 'infer'
    dtype: str = 'fp32'
    channels_last: bool = False
    compile: bool = False
    runs: int = 7
    warmup: int = 2
    memory: bool = True
    tf32: bool = False
    threads: Optional[int] = None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        for name, low in (('img_size', 1), ('batch_size', 1), ('runs', 1), ('warmup', 1)):
            if getattr(self, name) < low:
                raise ConfigError(f'{name} must be at least {low}, got {getattr(self, name)} '
                                  f'(one warm-up call is needed to measure memory and to compile)')
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f'threads must be at least 1, got {self.threads}')


@dataclass
class ModelSpec:
    """One entry of a comparison: a label (unique), a timm model name and its constructor kwargs.

    ``fold``: time ``polynext.fold_for_inference(model, flip=fold)`` instead (``'weights'`` or
    ``'channels'``). ``runtime='onnxruntime'``: time the model exported to ONNX (``onnx_path``, set
    when the benchmark exports it) in ONNX Runtime."""
    label: str
    name: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    fold: Optional[str] = None
    runtime: str = 'torch'
    onnx_path: Optional[str] = None


RUNTIMES = ('torch', 'onnxruntime')


def expand_variants(specs: Sequence[ModelSpec], fold: Sequence[str] = (), runtimes: Sequence[str] = ('torch',)
                    ) -> List[ModelSpec]:
    """Each spec followed by its variants: the folded model for each ``fold`` flip (PolyNeXt models
    only), and every one of those in each runtime. Labels: ``name [fold]``, ``name [fold, channels
    flip]``, ``name [onnxruntime]``, ``name [fold, onnxruntime]``."""
    from .models import PUBLISHED_ARCHS
    for r in runtimes:
        if r not in RUNTIMES:
            raise ConfigError(f"unknown runtime '{r}'; use {' or '.join(RUNTIMES)}")
    out: List[ModelSpec] = []
    for spec in specs:
        folds: List[Optional[str]] = [None]
        if spec.name.split('.')[0] in PUBLISHED_ARCHS:
            folds += list(fold)
        elif fold:
            raise ConfigError(f'--fold applies to PolyNeXt models; {spec.name} has nothing to fold (drop it or --fold)')
        for runtime in runtimes:
            for f in folds:
                tags = ([] if f is None else ['fold' if f == 'weights' else 'fold, channels flip'])
                tags += [] if runtime == 'torch' else [runtime]
                label = spec.label + (f" [{', '.join(tags)}]" if tags else '')
                out.append(ModelSpec(label, spec.name, dict(spec.kwargs), fold=f, runtime=runtime))
    return out


def _literal(text: str) -> Any:
    import ast
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as mlp=gelu is a string


def parse_model_kwargs(items: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]:
    """``['init_channels=8', 'cpolynext_t:channels_last=False']`` → (kwargs for every model,
    {target: kwargs for that target}). Values are Python literals (8, 0.1, False, (1, 2)) or bare
    strings. A target is a model name (every entry of that model) or an entry label (``name#2``)."""
    common: Dict[str, Any] = {}
    per_target: Dict[str, Dict[str, Any]] = {}
    for item in items:
        key, eq, value = item.partition('=')
        if not eq or not key:
            hint = ('; list the models before --model-kwargs' if item and '=' not in item and ':' not in item
                    else '')
            raise ConfigError(f"model kwarg '{item}' is not KEY=VALUE or MODEL:KEY=VALUE "
                              f"(for example init_channels=8 or cpolynext_t:channels_last=False){hint}")
        target, colon, key = key.rpartition(':')
        if colon and not target:
            raise ConfigError(f"model kwarg '{item}' has an empty model name before ':'")
        if not key.isidentifier():
            raise ConfigError(f"model kwarg '{item}': '{key}' is not an argument name")
        (per_target.setdefault(target, {}) if colon else common)[key] = _literal(value)
    return common, per_target


def model_specs(names: Sequence[str], common: Optional[Dict[str, Any]] = None,
                per_target: Optional[Dict[str, Dict[str, Any]]] = None) -> List[ModelSpec]:
    """Specs for ``names`` in order. A repeated name gets the label ``name#2``, ``name#3`` ...
    (a repeat is an A/A check of the noise, or an A/B with per-label kwargs)."""
    common, per_target = common or {}, per_target or {}
    labels = []
    seen: Dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f'{name}#{seen[name]}')
    unknown = set(per_target) - set(names) - set(labels)
    if unknown:
        raise ConfigError(f"--model-kwargs names {', '.join(sorted(unknown))}, which is not among the models "
                          f"benchmarked ({', '.join(labels)})")
    return [ModelSpec(label, name, {**common, **per_target.get(name, {}), **per_target.get(label, {})})
            for label, name in zip(labels, names)]


# --------------------------------------------------------------------------------------
# Device, errors
# --------------------------------------------------------------------------------------

def _oom_error(label: str, settings: BenchSettings, detail: str) -> ConfigError:
    smaller = max(1, settings.batch_size // 2)
    first = detail.strip().splitlines()[0] if detail.strip() else 'out of memory'
    hint = (f'Try --batch-size {smaller}.' if settings.batch_size > 1 else
            'It does not fit even at batch 1; try a smaller --img-size.')
    return ConfigError(f'batch {settings.batch_size} at {settings.img_size} px does not fit in {settings.device} '
                       f'memory for {label} ({settings.mode}): {first[:160]}. {hint}')


@contextlib.contextmanager
def _oom_as_config_error(label: str, settings: BenchSettings) -> Iterator[None]:
    try:
        yield
    except ConfigError:
        raise
    except (MemoryError, RuntimeError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if is_oom_error(e):
            raise _oom_error(label, settings, str(e) or type(e).__name__) from None
        raise


# --------------------------------------------------------------------------------------
# Building a model and its step
# --------------------------------------------------------------------------------------

def build_model(spec: ModelSpec) -> nn.Module:
    """The model on CPU in fp32, randomly initialised (nothing is downloaded); folded if the spec says
    so; an ONNX Runtime session over ``spec.onnx_path`` for the onnxruntime runtime."""
    if spec.runtime == 'onnxruntime' and spec.onnx_path:
        from .deploy.runtime import OnnxRuntimeModel
        return OnnxRuntimeModel(spec.onnx_path, threads=torch.get_num_threads())
    from .factory import create_model
    model = create_model(spec.name, **spec.kwargs)
    if spec.fold:
        from .models.folded import fold_for_inference
        model = fold_for_inference(model, flip=spec.fold)
    return model


def _export_for_runtime(model: nn.Module, spec: ModelSpec, settings: BenchSettings, folder: str) -> str:
    """Export ``model`` to ONNX for the onnxruntime runtime; returns the path."""
    from .deploy.export import export_metadata, export_onnx, input_spec
    path = str(Path(folder) / (re.sub(r'[^A-Za-z0-9_.-]+', '_', spec.label) + '.onnx'))
    ispec = input_spec(model, settings.img_size, name=spec.label)
    # no parity check here: a benchmark's models have random weights, and a bn variant's untrained running
    # statistics give non-finite logits (`polynext export` checks every export of real weights)
    export_onnx(model, path, spec=ispec, metadata=export_metadata(model, spec.name, spec.kwargs, folded=spec.fold),
                check=False)
    return path


def _num_logits(model: nn.Module) -> int:
    return int(getattr(model, 'num_classes', 0) or 0)


def make_step(model: nn.Module, settings: BenchSettings, device: torch.device,
              label: str = 'model') -> Callable[[], None]:
    """Move ``model`` to ``device`` (memory format, dtype, compile) and return one benchmark step.

    infer: the model and the input in ``dtype`` (how a model is deployed), ``inference_mode``.
    train: fp32 weights with autocast for bf16/fp16 (how a model is trained; fp16 with a
    GradScaler), forward + cross-entropy + backward + AdamW step + zero_grad.
    """
    dtype = DTYPES[settings.dtype]
    fmt = torch.channels_last if settings.channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(settings.batch_size, 3, settings.img_size, settings.img_size, generator=gen)
    x = x.to(device).contiguous(memory_format=fmt)
    model = model.to(device=device, memory_format=fmt)
    if settings.mode == 'infer':
        model.eval()
        if dtype != torch.float32:
            model = model.to(dtype)
            x = x.to(dtype)
        fn = torch.compile(model) if settings.compile else model

        def infer_step() -> None:
            with torch.inference_mode():
                fn(x)
        return infer_step

    num_classes = _num_logits(model)
    if num_classes < 1:
        raise ConfigError(f'{label}: train mode needs a classifier (num_classes >= 1)')
    model.train()
    y = torch.randint(0, num_classes, (settings.batch_size,), generator=gen).to(device)
    # the learning rate only keeps values sane over many steps; it does not change the work
    from .engine.backend import optimizer_kwargs
    # the optimizer polynext's trainers build: the fused AdamW kernel on CPU and CUDA
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05, **optimizer_kwargs(device))
    fn = torch.compile(model) if settings.compile else model
    use_amp = dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def train_step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            out = fn(x)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ConfigError(f'{label}: train mode needs (batch, classes) logits from the model')
        loss = F.cross_entropy(out.float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
    return train_step


def _sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == 'cuda':
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_interleaved(steps: Dict[str, Callable[[], None]], runs: int, sync: Callable[[], None] = lambda: None,
                     inner: int = 1, progress: Optional[Callable[[], None]] = None) -> Dict[str, List[float]]:
    """Seconds per sample for each step: ``runs`` rounds, each timing ``inner`` consecutive calls of
    every step; the order of the steps is reversed on every other round."""
    order = list(steps)
    times: Dict[str, List[float]] = {k: [] for k in order}
    for r in range(runs):
        for key in (order if r % 2 == 0 else order[::-1]):
            step = steps[key]
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                step()
            sync()
            times[key].append(time.perf_counter() - t0)
            if progress is not None:
                progress()
    return times


def switch_ab(name: str, settings: 'BenchSettings', switch: Callable[[bool], Any], runs: int,
              labels: Tuple[str, str] = ('off', 'on')) -> Dict[str, Any]:
    """One model's CPU bench step (``make_step``) with ``switch`` (an ``ops.fused.Switch``, e.g. one of the kernel
    switches of ``ops.cpu_kernels``) off and on, interleaved: ``{labels[i]}_img_s`` for each, the speed-up of on
    over off and, at inference, the largest logit difference between the two on two images."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name)
    run = make_step(model, settings, torch.device('cpu'))

    def switched(on: bool):
        def step():
            with switch(on):
                run()
        return step
    steps = {labels[0]: switched(False), labels[1]: switched(True)}
    for fn in steps.values():
        fn()
    rate = {k: settings.batch_size / statistics.median(t) for k, t in time_interleaved(steps, runs).items()}
    row = dict(model=name, **{f'{k}_img_s': round(v, 2) for k, v in rate.items()},
               speedup=round(rate[labels[1]] / rate[labels[0]], 3))
    if settings.mode == 'infer':
        x = torch.randn(2, 3, settings.img_size, settings.img_size).to(next(model.parameters()).dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            on = model(x)
            with switch(False):
                off = model(x)
        row['max_abs_logit_diff'] = (on.float() - off.float()).abs().max().item()
    return row


def switch_ab_rows(models: Sequence[str], settings: 'BenchSettings', switch: Callable[[bool], Any], runs: int,
                   labels: Tuple[str, str] = ('off', 'on'), names: Optional[Tuple[str, str]] = None) -> List[Dict]:
    """:func:`switch_ab` for each model, printing a line each as it finishes (``names``: the two settings as printed,
    by default the labels)."""
    names = names or labels
    rows = []
    for name in models:
        row = switch_ab(name, settings, switch, runs, labels=labels)
        rows.append(row)
        diff = f"  max |Δ logit| {row['max_abs_logit_diff']:.1e}" if 'max_abs_logit_diff' in row else ''
        print(f"{name:12s} {names[0]} {row[labels[0] + '_img_s']:7.2f}  {names[1]} {row[labels[1] + '_img_s']:7.2f}  "
              f"x{row['speedup']:.3f}{diff}", flush=True)
    return rows


# --------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------

def _proc_status_kib(field_name: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            m = re.search(rf'^{field_name}:\s+(\d+) kB', f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_rss_high_water() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _memory_probe(request: Dict[str, Any]) -> Dict[str, Any]:
    """Runs in a fresh process: build one model, run its warm-up steps, report the RSS increase."""
    settings: BenchSettings = request['settings']
    spec: ModelSpec = request['spec']
    if settings.threads:
        torch.set_num_threads(settings.threads)
    import gc
    gc.collect()
    if _reset_rss_high_water() and _proc_status_kib('VmRSS') is not None:
        before = _proc_status_kib('VmRSS') * 1024
        read_peak = lambda: _proc_status_kib('VmHWM') * 1024  # noqa: E731
        method = 'VmHWM - VmRSS before building, fresh process per model'
        if allocator_status() != 'not glibc':
            method += ', glibc mmap_threshold=64 KiB (RSS = memory in use)'
    else:  # no procfs: ru_maxrss (KiB on Linux, bytes on macOS); exact only if the peak is new
        import resource
        unit = 1 if sys.platform == 'darwin' else 1024
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
        read_peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit  # noqa: E731
        method = 'ru_maxrss increase, fresh process per model'
    try:
        model = build_model(spec)
        step = make_step(model, settings, torch.device('cpu'), spec.label)
        for _ in range(settings.warmup):
            step()
    except Exception as e:  # reported to the parent, which turns it into one clear message
        from .errors import PolyNeXtError
        if isinstance(e, PolyNeXtError):
            return dict(error='config', message=str(e))
        return dict(error='oom' if is_oom_error(e) else 'error', message=f'{type(e).__name__}: {e}')
    return dict(peak_bytes=max(0, read_peak() - before), method=method)


_PROBE_MARK = '@@polynext-memory-probe@@'


def _memory_probe_main() -> int:
    request = pickle.load(sys.stdin.buffer)
    import polynext  # noqa: F401  (registers the models)
    for mod in request.get('modules', ()):
        __import__(mod)
    result = _memory_probe(request)
    sys.stdout.write(_PROBE_MARK + json.dumps(result) + '\n')
    sys.stdout.flush()
    return 0


#: the child's malloc setting: every block of 64 KiB or more is its own mapping, returned to the OS on free
_PROBE_TUNABLES = {'glibc.malloc.mmap_threshold': '65536'}


def memory_probe_env(env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of the memory child: the parent's, but with glibc's mmap threshold fixed at
    64 KiB instead of the pinned setting. The pinned allocator keeps freed memory in one heap, where
    fragmentation makes the RSS peak depend on the order of unrelated allocations (the same model
    measured 550-810 MiB from run to run); with every large block mapped on its own and unmapped
    on free, RSS is the memory in use and the peak repeats to 0.1%. Timing never runs here."""
    env = dict(os.environ if env is None else env)
    env.pop(_REEXEC_GUARD, None)
    if _is_glibc():
        tunables = {k: v for k, v in _parse_tunables(env.get('GLIBC_TUNABLES', '')).items()
                    if k not in PINNED_TUNABLES}
        tunables.update(_PROBE_TUNABLES)
        env['GLIBC_TUNABLES'] = ':'.join(f'{k}={v}' for k, v in tunables.items())
    return env


def measure_peak_rss(spec: ModelSpec, settings: BenchSettings, timeout: Optional[float] = None) -> Dict[str, Any]:
    """Peak RSS increase of one model's warm-up steps, measured in a fresh Python process.

    Why a fresh process per model: the process high-water mark (``ru_maxrss``) never goes down,
    and with the pinned allocator freed memory stays in the heap, so in a process that already ran
    another model the next model reuses those pages and its RSS barely moves. Only a process that
    has run nothing else shows what one model needs. The child (allocator: :func:`memory_probe_env`)
    resets ``VmHWM`` after its imports, builds the model and runs ``warmup`` steps; the result is
    ``VmHWM`` minus the RSS before building: weights, input, activations and in train mode
    gradients and AdamW state.
    """
    env = memory_probe_env()
    # the module that registered the model (for names registered outside timm and polynext)
    try:
        import timm
        module = sys.modules.get(timm.models.model_entrypoint(timm.models.get_arch_name(spec.name)).__module__)
        modules = [module.__name__] if module is not None and module.__name__ != '__main__' else []
    except Exception:
        modules = []
    request = dict(spec=spec, settings=settings, modules=modules)
    # this polynext is found even when it is not installed (appended: an installed copy is not shadowed)
    src_dir = str(Path(__file__).resolve().parent.parent)
    code = (f'import sys; sys.path.append({src_dir!r}); from polynext.bench import _memory_probe_main; '
            f'sys.exit(_memory_probe_main())')
    proc = subprocess.run([sys.executable, '-c', code], input=pickle.dumps(request), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    out = proc.stdout.decode(errors='replace')
    for line in out.splitlines():
        if line.startswith(_PROBE_MARK):
            return json.loads(line[len(_PROBE_MARK):])
    err = proc.stderr.decode(errors='replace').strip()
    if proc.returncode < 0 and -proc.returncode == 9:  # SIGKILL: the kernel's OOM killer
        return dict(error='oom', message='killed by the operating system (out of memory)')
    last = err.splitlines()[-1] if err else f'exit status {proc.returncode}'
    return dict(error='oom' if 'MemoryError' in err else 'error', message=last)


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------

@dataclass
class ModelResult:
    label: str
    model: str
    kwargs: Dict[str, Any]
    params: int
    macs: float
    times_s: List[float]
    peak_mem_bytes: Optional[int]
    first_call_s: float
    batch_size: int
    ratio: float = 1.0
    #: with ``compile``: the same model's eager step, timed in the same interleaved rounds
    eager_times_s: Optional[List[float]] = None

    @property
    def ms_per_batch(self) -> float:
        return 1000 * statistics.median(self.times_s)

    @property
    def img_per_s(self) -> float:
        return self.batch_size / statistics.median(self.times_s)

    @property
    def compile_s(self) -> float:
        """The compile: the first call minus one (median) compiled step."""
        return self.first_call_s - statistics.median(self.times_s)

    @property
    def compile_speedup(self) -> Optional[float]:
        """Compiled img/s over the eager img/s of the same model in the same run."""
        return statistics.median(self.eager_times_s) / statistics.median(self.times_s) if self.eager_times_s else None

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d['kwargs'] = {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
                       for k, v in self.kwargs.items()}
        d.update(gmacs=self.macs / 1e9, img_per_s=self.img_per_s, ms_per_batch=self.ms_per_batch,
                 ms_min=1000 * min(self.times_s), ms_max=1000 * max(self.times_s),
                 gmacs_per_s=self.macs / 1e9 * self.img_per_s,
                 peak_mem_mib=None if self.peak_mem_bytes is None else self.peak_mem_bytes / 2 ** 20)
        if self.eager_times_s:
            d.update(eager_img_per_s=self.batch_size / statistics.median(self.eager_times_s),
                     compile_s=self.compile_s, compile_speedup=self.compile_speedup)
        return d


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            m = re.search(r'^model name\s*:\s*(.+)$', f.read(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> Dict[str, Any]:
    import timm

    from . import __version__
    env = dict(polynext=__version__, torch=torch.__version__, timm=timm.__version__,
               python=platform.python_version(), threads=torch.get_num_threads(),
               allocator=allocator_status(), glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''),
               load_average=list(os.getloadavg()) if hasattr(os, 'getloadavg') else None)
    if device.type == 'cuda':
        env.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        from .ops.cpu_kernels import kernel_info
        kernels = kernel_info()   # which hand-written kernels CPU inference ran: they change its speed
        env.update(device_name=_cpu_name(), cpu_count=os.cpu_count(),
                   cpu_kernels=(f"{kernels['code']}{', OpenMP' if kernels['openmp'] else ', one thread'}"
                                if kernels['available'] else 'not built: PyTorch operators'))
    return env


def _fmt_mib(nbytes: Optional[int]) -> str:
    return '-' if nbytes is None else f'{nbytes / 2 ** 20:,.0f}'


@dataclass
class BenchReport:
    settings: BenchSettings
    environment: Dict[str, Any]
    results: List[ModelResult]
    memory_method: str = ''

    def header(self) -> str:
        s, e = self.settings, self.environment
        alloc = {'pinned': 'glibc allocator pinned', 'user': f"GLIBC_TUNABLES={e['glibc_tunables']} (user's)",
                 'default': 'glibc allocator NOT pinned (numbers include page-fault time)',
                 'not glibc': 'allocator: not glibc'}[e['allocator']]
        threads = (f", {e['threads']} thread{'s' if e['threads'] != 1 else ''}" if s.device == 'cpu' else '')
        return (f"{s.device} ({e['device_name']}){threads}, {alloc}; {s.mode}, {s.dtype}, batch {s.batch_size}, "
                f"{s.img_size} px, channels-last {'on' if s.channels_last else 'off'}, "
                f"{'torch.compile' if s.compile else 'eager'}; median of {s.runs} timed runs after "
                f"{s.warmup} warm-up, models interleaved")

    def rows(self) -> List[List[str]]:
        return [[r.label, f'{r.params / 1e6:.2f}', f'{r.macs / 1e9:.3f}', f'{r.img_per_s:,.1f}',
                 f'{r.ms_per_batch:,.1f}', _fmt_mib(r.peak_mem_bytes), f'{r.ratio:.2f}'] for r in self.results]

    COLUMNS = ['model', 'params (M)', 'GMACs', 'img/s', 'ms/batch', 'peak MiB', 'ratio']

    def table(self) -> str:
        columns, rows = list(self.COLUMNS), self.rows()
        if any(r.eager_times_s for r in self.results):   # --compile: the compile and its speed-up
            columns += ['compile s', 'x eager']
            for row, r in zip(rows, self.results):
                row += [f'{r.compile_s:,.1f}', f'{r.compile_speedup:.2f}'] if r.eager_times_s else ['-', '-']
        return format_table(columns, rows)

    def footnote(self) -> str:
        first = self.results[0].label if self.results else '-'
        mem = {'cuda': 'CUDA max allocated during warm-up minus allocated before the model was moved to the GPU',
               'cpu': 'peak RSS increase, one fresh process per model'}['cuda' if self.settings.device != 'cpu'
                                                                        else 'cpu']
        what = f'weights + input + step: {mem}' if self.settings.memory else 'not measured'
        compiled = ('; compile s = first call minus one step, x eager = img/s over the same model eager in the '
                    'same rounds') if any(r.eager_times_s for r in self.results) else ''
        return (f'ratio = img/s relative to {first}; MACs per image (FlopCounterMode / 2, attention included); '
                f'peak memory = {what}{compiled}')

    def to_dict(self) -> Dict[str, Any]:
        return dict(settings=asdict(self.settings), environment=self.environment, memory_method=self.memory_method,
                    results=[r.to_dict() for r in self.results])

    def write_json(self, path: str, extra: Optional[Dict[str, Any]] = None) -> Path:
        from .checkpoint import atomic_write
        data = self.to_dict()
        if extra:
            data.update(extra)
        text = json.dumps(data, indent=2)
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text + '\n'))

    def plot(self, path: str) -> Path:
        """Throughput against MACs (left) and the ratio to the first model (right), as PNG."""
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt

        from .checkpoint import atomic_write
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
        for r in self.results:
            ax1.scatter(r.macs / 1e9, r.img_per_s, s=30)
            ax1.annotate(r.label, (r.macs / 1e9, r.img_per_s), textcoords='offset points', xytext=(4, 4),
                         fontsize=8)
        ax1.set_xlabel('GMACs per image')
        ax1.set_ylabel('images / s')
        ax1.grid(alpha=0.3)
        labels = [r.label for r in self.results]
        ratios = [r.ratio for r in self.results]
        bars = ax2.barh(range(len(labels)), ratios, color=['tab:gray'] + ['tab:blue'] * (len(labels) - 1))
        ax2.set_yticks(range(len(labels)), labels, fontsize=8)
        ax2.invert_yaxis()
        ax2.axvline(1.0, color='k', lw=0.8)
        ax2.bar_label(bars, fmt='%.2f', fontsize=8, padding=2)
        ax2.set_xlabel(f'throughput relative to {labels[0] if labels else "-"}')
        s = self.settings
        fig.suptitle(f'{s.device} {s.mode} {s.dtype}, batch {s.batch_size}, {s.img_size} px, '
                     f'channels-last {"on" if s.channels_last else "off"}{", compiled" if s.compile else ""}',
                     fontsize=10)
        fig.tight_layout()
        try:
            return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format='png'))
        finally:
            plt.close(fig)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned numbers."""
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    fmt = lambda cells: '  '.join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return '\n'.join([fmt(columns), '  '.join('-' * w for w in widths)] + [fmt(r) for r in rows])


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------

def busy_machine_warning(threads: Optional[int] = None) -> Optional[str]:
    """A warning when other processes keep the CPU busy (1-minute load average above the cores
    this benchmark leaves free): torch's threads then wait on each other and timings inflate."""
    if not hasattr(os, 'getloadavg'):
        return None
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    threads = threads or torch.get_num_threads()
    if load <= max(0.5, cores - threads + 0.5):
        return None
    fewer = ', or use fewer --threads' if threads > 1 else ''
    return (f'the machine is busy (load average {load:.1f} on {cores} cores) and this benchmark uses {threads} '
            f'thread(s): absolute numbers will be slow and noisy; compare ratios{fewer}')


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, file=sys.stderr)


def _check_dtype(settings: BenchSettings, device: torch.device) -> None:
    if device.type == 'cuda' and settings.dtype == 'bf16' and not torch.cuda.is_bf16_supported():
        raise ConfigError(f'{torch.cuda.get_device_name(device)} does not support bf16; use --dtype fp16 or fp32')


def prepare_device(settings: BenchSettings) -> torch.device:
    """The device of ``settings``, checked (present, supports the dtype) and set up as every timing here runs
    it: ``settings.threads`` CPU threads; on CUDA cuDNN's algorithm search on and TF32 only if asked for."""
    device = resolve_device(settings.device)
    _check_dtype(settings, device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        # fp32 means fp32 unless TF32 is asked for (torch's own default allows it for convolutions only)
        torch.backends.cuda.matmul.allow_tf32 = settings.tf32
        torch.backends.cudnn.allow_tf32 = settings.tf32
    return device


def _count_macs(model: nn.Module, spec: ModelSpec, img_size: int) -> float:
    from .profile import count_macs
    try:
        return float(count_macs(model, input_size=img_size))
    except (ValueError, RuntimeError) as e:
        if is_oom_error(e):
            raise
        msg = str(e).splitlines()[0][:240]
        hint = '' if 'img_size' in msg else f' (a model built for a fixed size needs --model-kwargs img_size={img_size})'
        raise ConfigError(f'{spec.label} does not run at {img_size} px: {msg}{hint}') from None


def run_bench(specs: Sequence[ModelSpec], settings: BenchSettings, progress: bool = True,
              log: Callable[[str], None] = lambda msg: None) -> BenchReport:
    """Measure every model in ``specs`` under ``settings``; see the module docstring."""
    from .factory import check_model_name
    settings.validate()
    if not specs:
        raise ConfigError('no models to benchmark')
    variants = [s for s in specs if s.fold or s.runtime != 'torch']
    if variants and settings.mode != 'infer':
        raise ConfigError(f'{variants[0].label}: folded models and ONNX Runtime are for inference; use --mode infer')
    if any(s.runtime == 'onnxruntime' for s in specs):
        if settings.dtype != 'fp32' or settings.compile or settings.device != 'cpu':
            raise ConfigError('--runtime onnxruntime times fp32 on the CPU: drop --dtype / --compile / --device')
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f'model labels must be unique, got {labels}')
    for spec in specs:
        check_model_name(spec.name)
    device = prepare_device(settings)

    # 1. build every model on the CPU and count it: bad kwargs or sizes fail here, before any timing;
    #    models for ONNX Runtime are exported into a temporary folder
    models: Dict[str, nn.Module] = {}
    info: Dict[str, Dict[str, Any]] = {}
    onnx_dir = tempfile.TemporaryDirectory(prefix='polynext-bench-') if any(
        s.runtime == 'onnxruntime' for s in specs) else contextlib.nullcontext()
    with onnx_dir as folder:
        for spec in specs:
            with _oom_as_config_error(spec.label, settings):
                model = build_model(spec)
                info[spec.label] = dict(params=sum(p.numel() for p in model.parameters()),
                                        macs=_count_macs(model, spec, settings.img_size))
                if spec.runtime == 'onnxruntime':
                    log(f'exporting {spec.label} to ONNX')
                    spec.onnx_path = _export_for_runtime(model, spec, settings, folder)
                    model = build_model(spec)
            models[spec.label] = model
        return _run_bench_built(specs, settings, models, info, device, progress)


def _run_bench_built(specs: Sequence[ModelSpec], settings: BenchSettings, models: Dict[str, nn.Module],
                     info: Dict[str, Dict[str, Any]], device: torch.device, progress: bool) -> BenchReport:
    """Steps 2-4 of :func:`run_bench` for models already built."""
    labels = [s.label for s in specs]
    sync = _sync_fn(device)

    # 2. CPU peak memory: one fresh process per model, one model at a time (see measure_peak_rss)
    peaks: Dict[str, Optional[int]] = {s.label: None for s in specs}
    memory_method = ''
    if settings.memory and device.type == 'cpu':
        bar = _progress_bar(len(specs), progress, 'memory (fresh process per model)')
        try:
            for spec in specs:
                probe = measure_peak_rss(spec, settings)
                bar.update()
                if probe.get('error') == 'oom':
                    raise _oom_error(spec.label, settings, probe['message'])
                if probe.get('error') == 'config':
                    raise ConfigError(probe['message'])
                if 'error' in probe:
                    raise ConfigError(f"{spec.label}: the memory probe failed: {probe['message']}")
                peaks[spec.label] = probe['peak_bytes']
                memory_method = probe['method']
        finally:
            bar.close()

    # 3. move each model to the device and warm it up, one after the other (CUDA: peak memory here)
    steps: Dict[str, Callable[[], None]] = {}
    eager_steps: Dict[str, Callable[[], None]] = {}
    timed_steps = len(specs) + (sum(s.runtime == 'torch' for s in specs) if settings.compile else 0)
    bar = _progress_bar(len(specs) * settings.warmup + timed_steps * settings.runs, progress, 'warm-up')
    for spec in specs:
        with _oom_as_config_error(spec.label, settings):
            if device.type == 'cuda':
                sync()
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            model = models.pop(spec.label)
            # --compile also times the same model eager, in the same rounds: the speed-up is measured, not
            # taken across runs (its copy is made before the compiled one moves to the device)
            twin = copy.deepcopy(model) if settings.compile and spec.runtime == 'torch' else None
            step = make_step(model, settings, device, spec.label)
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            info[spec.label]['first_call_s'] = time.perf_counter() - t0
            bar.update()
            for _ in range(settings.warmup - 1):
                step()
                bar.update()
            sync()
            if device.type == 'cuda' and settings.memory:
                peaks[spec.label] = torch.cuda.max_memory_allocated(device) - base
                memory_method = 'torch.cuda.max_memory_allocated during warm-up minus allocated before'
            if twin is not None:
                eager = make_step(twin, dataclasses.replace(settings, compile=False), device, spec.label)
                for _ in range(settings.warmup):
                    eager()
                eager_steps[spec.label] = eager
        steps[spec.label] = step

    # 4. the timed rounds, all models interleaved
    bar.set_description('timing (interleaved)')
    timed = dict(steps)
    timed.update({(label, 'eager'): step for label, step in eager_steps.items()})
    with _oom_as_config_error(', '.join(labels), settings):
        times = time_interleaved(timed, settings.runs, sync, progress=bar.update)
    bar.close()

    results = [ModelResult(label=s.label, model=s.name, kwargs=dict(s.kwargs), times_s=times[s.label],
                           peak_mem_bytes=peaks[s.label], batch_size=settings.batch_size,
                           eager_times_s=times.get((s.label, 'eager')), **info[s.label])
               for s in specs]
    for r in results:
        r.ratio = r.img_per_s / results[0].img_per_s
    return BenchReport(settings=settings, environment=environment(device), results=results,
                       memory_method=memory_method)
