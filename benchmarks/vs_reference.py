"""polynext against the authors' reference implementation on this CPU: inference and a training step.

The reference is NOT part of polynext: point ``--reference-dir`` at a local checkout of
https://github.com/jjwang8/PolyNeXt (the folder holding its model.py, operations.py, utils.py).
For each model the same weights run three ways, interleaved in one process (order reversed on
alternate rounds, medians, pinned glibc allocator):

  reference NCHW   the authors' code as a user runs it
  reference CL     the authors' code, model and input converted to channels-last
  polynext         ``timm.create_model(name)`` with the reference's weights loaded

Before timing, the polynext logits are compared with the reference's (max |Δ| is printed), so
the run also proves it compares equal models. Infer = eval + inference_mode; train = forward +
cross-entropy + backward + AdamW step + zero_grad (``polynext.bench.make_step``).

    python benchmarks/vs_reference.py --reference-dir /path/to/PolyNeXt
    python benchmarks/vs_reference.py --reference-dir /path/to/PolyNeXt --mode train --batch-size 32 --runs 5
    python benchmarks/vs_reference.py --reference-dir /path/to/PolyNeXt --memory --json r.json
    python benchmarks/vs_reference.py --reference-dir /path/to/PolyNeXt --mode train --compile

``--compile`` adds both under ``torch.compile`` (inductor; each its own copy of the weights): the
reference NCHW as the authors' training scripts run it (``model.compile()``) and polynext as
``polynext train --compile`` runs it; their first calls, the compiles, are reported in seconds.

``--memory`` measures peak memory instead of speed: each (implementation, model, mode) runs in a
fresh process, as ``polynext bench`` does (``polynext.bench.measure_peak_rss``): the increase of the
RSS high-water mark over building the model and its warm-up steps (weights, input, activations,
and in train mode gradients and AdamW state), with glibc's mmap threshold at 64 KiB so that RSS is
the memory in use.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# the reference's config name and layer count for each polynext model
REFERENCE = {
    'cpolynext_t': ('CPolyNeXt_T', 12), 'cpolynext_s': ('CPolyNeXt_S', 17), 'cpolynext_b': ('CPolyNeXt_B', 21),
    'cpolynext_l': ('CPolyNeXt_L', 24), 'apolynext_t': ('APolyNeXt_T', 12), 'apolynext_s': ('APolyNeXt_S', 17),
    'apolynext_b': ('APolyNeXt_B', 21), 'apolynext_l': ('APolyNeXt_L', 24),
}


IMPLEMENTATIONS = ('reference NCHW', 'reference CL', 'polynext')


def _build(reference, name: str, impl: str):
    """One implementation of ``name`` (seeded reference weights), as the timing loop builds it."""
    import timm
    import torch

    import polynext
    cfg_name, layers = REFERENCE[name]
    width = polynext.PUBLISHED_ARCHS[name]['init_channels']
    torch.manual_seed(0)
    ref = reference.NetworkPolyImageNet(width, 1000, layers, dict(getattr(reference, cfg_name)))
    ref.num_classes = 1000  # make_step reads it (timm convention)
    if impl.startswith('reference'):
        return ref
    ours = timm.create_model(name)
    polynext.load_reference_state_dict(ours, ref.state_dict())
    return ours


def _import_reference(reference_dir: Path):
    model_py = reference_dir / 'model.py'
    if not model_py.is_file():
        raise SystemExit(f'vs_reference.py: error: {model_py} not found; --reference-dir must be a checkout of '
                         f'jjwang8/PolyNeXt')
    sys.path.insert(0, str(reference_dir))
    import model as reference  # the authors' module (not shipped with polynext)
    return reference


def _probe(args) -> int:
    """Child process of --memory: one implementation, one model, one mode; prints the peak as JSON."""
    import torch

    from polynext.bench import BenchSettings, _proc_status_kib, _reset_rss_high_water, make_step
    reference = _import_reference(args.reference_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchSettings(img_size=args.img_size, batch_size=args.batch_size, mode=args.mode[0],
                             warmup=args.warmup, channels_last=args.probe == 'reference CL')
    import gc
    gc.collect()
    if not _reset_rss_high_water():
        raise SystemExit('vs_reference.py: error: --memory needs Linux procfs (/proc/self/clear_refs)')
    before = _proc_status_kib('VmRSS')
    model = _build(reference, args.models[0], args.probe)
    step = make_step(model, settings, torch.device('cpu'))
    for _ in range(args.warmup):
        step()
    print(json.dumps(dict(peak_bytes=(_proc_status_kib('VmHWM') - before) * 1024)))
    return 0


def _memory(args) -> int:
    import subprocess

    import torch

    from polynext.bench import environment, format_table, memory_probe_env
    _import_reference(args.reference_dir)  # fail early with the message
    results = []
    for mode in args.mode:
        for name in args.models:
            row = dict(model=name, mode=mode, batch_size=args.batch_size)
            for impl in IMPLEMENTATIONS:
                cmd = [sys.executable, __file__, '--reference-dir', str(args.reference_dir), '--probe', impl,
                       '--models', name, '--mode', mode, '--batch-size', str(args.batch_size),
                       '--img-size', str(args.img_size), '--warmup', str(args.warmup)]
                if args.threads:
                    cmd += ['--threads', str(args.threads)]
                proc = subprocess.run(cmd, env=memory_probe_env(), capture_output=True, text=True)
                if proc.returncode:
                    print(proc.stderr, file=sys.stderr)
                    raise SystemExit(f'vs_reference.py: error: the memory probe for {impl} {name} {mode} failed')
                row[f'{impl} MiB'] = json.loads(proc.stdout.strip().splitlines()[-1])['peak_bytes'] / 2**20
            row['polynext / reference NCHW'] = row['polynext MiB'] / row['reference NCHW MiB']
            row['polynext / reference CL'] = row['polynext MiB'] / row['reference CL MiB']
            results.append(row)
            print(f"{name} {mode}: peak MiB reference NCHW {row['reference NCHW MiB']:,.0f}, reference CL "
                  f"{row['reference CL MiB']:,.0f}, polynext {row['polynext MiB']:,.0f}", flush=True)
    columns = ['model', 'mode', 'ref NCHW MiB', 'ref CL MiB', 'polynext MiB', 'x ref NCHW', 'x ref CL']
    rows = [[r['model'], r['mode'], f"{r['reference NCHW MiB']:,.0f}", f"{r['reference CL MiB']:,.0f}",
             f"{r['polynext MiB']:,.0f}", f"{r['polynext / reference NCHW']:.2f}",
             f"{r['polynext / reference CL']:.2f}"] for r in results]
    print()
    print(format_table(columns, rows))
    env = dict(environment(torch.device('cpu')), allocator='glibc mmap_threshold=64 KiB (RSS = memory in use)',
               method='VmHWM - VmRSS before building, fresh process per implementation/model/mode')
    from polynext.checkpoint import atomic_write_json
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, dict(environment=env, batch_size=args.batch_size, img_size=args.img_size,
                                      results=results))
    print(f'\nwrote {args.json}')
    return 0


def main() -> int:
    from polynext.bench import ensure_pinned_allocator
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--reference-dir', type=Path, required=True, help="checkout of jjwang8/PolyNeXt")
    parser.add_argument('--models', nargs='+', default=['cpolynext_t', 'apolynext_t', 'cpolynext_s', 'apolynext_s'],
                        choices=sorted(REFERENCE))
    parser.add_argument('--mode', nargs='+', default=['infer', 'train'], choices=['infer', 'train'])
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--runs', type=int, default=7)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    parser.add_argument('--json', type=Path, default=Path(__file__).parent / 'results' / 'vs_reference.json')
    parser.add_argument('--memory', action='store_true', help='peak memory (fresh process each) instead of speed')
    parser.add_argument('--compile', action='store_true',
                        help='also time the reference and polynext under torch.compile (their first calls, the '
                             'compiles, are reported)')
    parser.add_argument('--probe', choices=list(IMPLEMENTATIONS), help=argparse.SUPPRESS)  # the memory child
    args = parser.parse_args()
    if args.memory and args.compile:
        parser.error('--compile times compiled steps; --memory measures eager peak memory: drop one of them')
    if args.probe:
        return _probe(args)
    if args.memory:
        return _memory(args)
    ensure_pinned_allocator(prog='vs_reference.py')

    import timm
    import torch

    import polynext
    from polynext.bench import BenchSettings, allocator_status, environment, format_table, make_step, time_interleaved

    reference = _import_reference(args.reference_dir)

    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for mode in args.mode:
        settings = dict(img_size=args.img_size, batch_size=args.batch_size, mode=mode, runs=args.runs,
                        warmup=args.warmup)
        nchw, cl = BenchSettings(**settings), BenchSettings(**settings, channels_last=True)
        for name in args.models:
            cfg_name, layers = REFERENCE[name]
            width = polynext.PUBLISHED_ARCHS[name]['init_channels']
            torch.manual_seed(0)
            ref_nchw = reference.NetworkPolyImageNet(width, 1000, layers, dict(getattr(reference, cfg_name)))
            ref_cl = reference.NetworkPolyImageNet(width, 1000, layers, dict(getattr(reference, cfg_name)))
            ref_cl.load_state_dict(ref_nchw.state_dict())
            ref_nchw.num_classes = ref_cl.num_classes = 1000  # make_step reads it (timm convention)
            ours = timm.create_model(name)
            polynext.load_reference_state_dict(ours, ref_nchw.state_dict())
            x = torch.randn(2, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(1))
            with torch.inference_mode():
                diff = (ours.eval()(x) - ref_nchw.eval()(x)).abs().max().item()
            steps = {'reference NCHW': make_step(ref_nchw, nchw, torch.device('cpu')),
                     'reference CL': make_step(ref_cl, cl, torch.device('cpu')),
                     'polynext': make_step(ours, nchw, torch.device('cpu'))}
            if args.compile:
                compiled = BenchSettings(**settings, compile=True)   # fresh copies, the same seeded weights
                steps['reference NCHW compiled'] = make_step(_build(reference, name, 'reference NCHW'), compiled,
                                                             torch.device('cpu'))
                steps['polynext compiled'] = make_step(_build(reference, name, 'polynext'), compiled,
                                                       torch.device('cpu'))
            first_call = {}
            for _ in range(args.warmup):
                for k, step in steps.items():
                    t0 = time.perf_counter()
                    step()
                    first_call.setdefault(k, time.perf_counter() - t0)
            times = time_interleaved(steps, args.runs)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = dict(model=name, mode=mode, batch_size=args.batch_size, max_abs_logit_diff=diff,
                       **{f'{k} ms': 1000 * v for k, v in med.items()},
                       **{f'{k} img/s': args.batch_size / v for k, v in med.items()},
                       speedup_vs_reference_nchw=med['reference NCHW'] / med['polynext'],
                       speedup_vs_reference_cl=med['reference CL'] / med['polynext'])
            if args.compile:
                ours_c_s = med['polynext compiled']
                row.update(compiled_speedup_vs_reference_compiled=med['reference NCHW compiled'] / ours_c_s,
                           compiled_speedup_vs_reference_nchw=med['reference NCHW'] / ours_c_s,
                           reference_compile_s=first_call['reference NCHW compiled'],
                           compile_s=first_call['polynext compiled'])
            results.append(row)
            print(f"{name} {mode}: polynext {row['speedup_vs_reference_nchw']:.2f}x reference NCHW, "
                  f"{row['speedup_vs_reference_cl']:.2f}x reference CL (logits max |Δ| {diff:.1e})"
                  + (f"; compiled {row['compiled_speedup_vs_reference_compiled']:.2f}x reference compiled "
                     f"(compile: polynext {row['compile_s']:.0f} s, reference {row['reference_compile_s']:.0f} s)"
                     if args.compile else ''), flush=True)
            del steps, ref_nchw, ref_cl, ours
    columns = ['model', 'mode', 'ref NCHW img/s', 'ref CL img/s', 'polynext img/s', 'x ref NCHW', 'x ref CL',
               'max |Δ logit|']
    rows = [[r['model'], r['mode'], f"{r['reference NCHW img/s']:.1f}", f"{r['reference CL img/s']:.1f}",
             f"{r['polynext img/s']:.1f}", f"{r['speedup_vs_reference_nchw']:.2f}", f"{r['speedup_vs_reference_cl']:.2f}",
             f"{r['max_abs_logit_diff']:.1e}"] for r in results]
    if args.compile:
        columns += ['ref compiled img/s', 'polynext compiled img/s', 'compiled x ref compiled', 'compile s ref / ours']
        for row, r in zip(rows, results):
            row += [f"{r['reference NCHW compiled img/s']:.1f}", f"{r['polynext compiled img/s']:.1f}",
                    f"{r['compiled_speedup_vs_reference_compiled']:.2f}",
                    f"{r['reference_compile_s']:.0f} / {r['compile_s']:.0f}"]
    print()
    print(format_table(columns, rows))
    env = dict(environment(torch.device('cpu')), allocator=allocator_status(), threads=torch.get_num_threads())
    from polynext.checkpoint import atomic_write_json
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, dict(environment=env, batch_size=args.batch_size, img_size=args.img_size,
                                      runs=args.runs, compile=args.compile, results=results))
    print(f'\nwrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
