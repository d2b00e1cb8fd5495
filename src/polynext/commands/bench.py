"""Measure the cost of models side by side: params, MACs, images/s, ms per batch, peak memory.

Every model runs in this one process, interleaved: each timed round runs one batch of every
model, in reversed order on alternate rounds, and the table shows medians and the ratio of
images/s to the first model. Ratios are what holds on a busy machine; compare those.

  polynext bench convformer_s18 cpolynext_t cpolynext_s --batch-size 32
  polynext bench convformer_s18 caformer_s18 apolynext_s --mode train --channels-last --json r.json --plot r.png
  polynext bench cpolynext_t cpolynext_t --model-kwargs cpolynext_t#2:channels_last=False   # A/B in one run
  polynext bench cpolynext_t cpolynext_t_bn --fold weights channels --runtime onnxruntime   # deployment variants

Model kwargs are Python literals: KEY=VALUE applies to every model, MODEL:KEY=VALUE only to that
model (or to one entry of a repeated model, NAME#2:KEY=VALUE).

glibc's allocator is pinned (GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=
68719476736): without it, CPU timings measure page faults. The variable only acts when a process
starts, so the command re-runs itself with it set, unless --no-pin-allocator is given.
On CPU, peak memory is measured for one model at a time in a fresh process (the only honest RSS
figure when several models share a process); --no-memory skips that.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('models', nargs='+', metavar='MODEL',
                        help='timm model names (PolyNeXt, MetaFormer baselines, any timm model); the first is the '
                             'reference of the ratio column')
    parser.add_argument('--img-size', type=int, default=224, help='input height and width (default 224)')
    parser.add_argument('--batch-size', '-b', type=int, default=32, help='batch size (default 32)')
    parser.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N (default cpu)')
    parser.add_argument('--mode', choices=('infer', 'train'), default='infer',
                        help='infer: eval + inference_mode; train: forward + cross-entropy + backward + AdamW '
                             'step + zero_grad (default infer)')
    parser.add_argument('--dtype', choices=('fp32', 'bf16', 'fp16'), default='fp32',
                        help='infer: model and input cast to it; train: autocast with fp32 weights (default fp32)')
    parser.add_argument('--channels-last', action='store_true', help='model and input in channels_last')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile each model, and time it eager too in the same rounds: the table adds '
                             'the compile time (first call minus one step) and the speed-up over eager; on CPU the '
                             'memory measurement compiles once more: --no-memory skips it')
    parser.add_argument('--runs', type=int, default=7, help='timed batches per model (default 7)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed batches per model first (default 2, min 1)')
    parser.add_argument('--threads', type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per physical core)")
    parser.add_argument('--tf32', action='store_true',
                        help='CUDA fp32: allow TF32 matmuls and convolutions (default: true fp32 for both)')
    parser.add_argument('--model-kwargs', nargs='+', action='extend', default=[], metavar='[MODEL:]KEY=VALUE',
                        help='constructor arguments, e.g. init_channels=8 or cpolynext_t:drop_path_rate=0.1')
    parser.add_argument('--fold', nargs='*', default=None, choices=('weights', 'channels'), metavar='FLIP',
                        help='also time each PolyNeXt folded (polynext.fold_for_inference), next to the model: '
                             "--fold (the flip in the weights), --fold weights channels (both flips)")
    parser.add_argument('--runtime', nargs='+', default=['torch'], choices=('torch', 'onnxruntime'),
                        help='onnxruntime: also time each model exported to ONNX in ONNX Runtime, next to eager '
                             '(fp32, CPU, inference; the export is checked against eager first)')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    parser.add_argument('--no-pin-allocator', action='store_true',
                        help='do not re-run with the pinned glibc allocator (timings then include page faults)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    parser.add_argument('--json', default=None, metavar='PATH', help='write the results as JSON')
    parser.add_argument('--plot', default=None, metavar='PATH', help='write a PNG: img/s vs MACs and the ratios')


def _started_as_this_command() -> bool:
    """True when this process was started as ``polynext bench ...`` (console script or -m), not
    when ``cli.main([...])`` is called from other Python code: only then may it re-execute."""
    return sys.argv[1:2] == ['bench']


def run(args: argparse.Namespace) -> int:
    from ..bench import (BenchSettings, allocator_status, ensure_pinned_allocator, model_specs, parse_model_kwargs,
                         resolve_device)
    from ..factory import check_model_name

    from ..outputs import check_output_file

    # cheap checks first, so that a typo does not cost a re-exec and a minute of measuring
    for name in args.models:
        check_model_name(name)
    for flag, path in (('--json', args.json), ('--plot', args.plot)):
        if path:
            check_output_file(path, flag)
    resolve_device(args.device)
    common, per_target = parse_model_kwargs(args.model_kwargs)
    specs = model_specs(args.models, common, per_target)
    if args.fold is not None or args.runtime != ['torch']:
        from ..bench import expand_variants
        fold = ['weights'] if args.fold == [] else list(dict.fromkeys(args.fold or []))
        runtimes = list(dict.fromkeys(['torch'] + args.runtime))
        specs = expand_variants(specs, fold, runtimes)
    settings = BenchSettings(img_size=args.img_size, batch_size=args.batch_size, device=args.device,
                             mode=args.mode, dtype=args.dtype, channels_last=args.channels_last,
                             compile=args.compile, runs=args.runs, warmup=args.warmup,
                             memory=not args.no_memory,
                             tf32=args.tf32, threads=args.threads)
    settings.validate()
    if not args.no_pin_allocator and _started_as_this_command():
        ensure_pinned_allocator('polynext bench')
    if allocator_status() == 'default':
        print('polynext bench: warning: glibc allocator not pinned; CPU timings include page faults '
              '(drop --no-pin-allocator, or set GLIBC_TUNABLES before starting Python)', file=sys.stderr)

    from ..bench import busy_machine_warning, run_bench
    if settings.device == 'cpu' and (warning := busy_machine_warning(settings.threads)):
        print(f'polynext bench: warning: {warning}', file=sys.stderr)
    report = run_bench(specs, settings, progress=not args.no_progress,
                       log=lambda msg: print(f'polynext bench: {msg}', file=sys.stderr, flush=True))
    print(report.header())
    print(report.table())
    print(report.footnote())
    if args.json:
        report.write_json(args.json, extra=dict(command=['polynext', 'bench'] + sys.argv[2:]
                                                if _started_as_this_command() else None))
        print(f'wrote {args.json}')
    if args.plot:
        report.plot(args.plot)
        print(f'wrote {args.plot}')
    return 0
