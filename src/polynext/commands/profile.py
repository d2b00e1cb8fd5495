"""Where the time goes: one inference step and one training step of a model, by op class.

Each class's time (median over --runs profiled steps) and its achieved rate against what this
machine does at best for that kind of work, measured first in the same process
(``polynext.perf.measure_peaks``): 1x1 convs and the stem in GMAC/s against the fastest
channels-last 1x1 conv, depthwise convs against a depthwise 3x3, attention against a matrix
product, and the memory-bound classes (elementwise, norms, copies, optimizer) in GB/s against a
large copy. The header gives the model's MACs x img/s and the bound: the img/s the model would reach
if every MAC ran at the 1x1-conv peak. Below each table, the --top heaviest operators of the step
(operator, first operand's shape, class, calls, time, rate against the class's peak): where a
class is slow, which layer makes it so.

On a GPU (``--device cuda``) each class gets the time of the CUDA kernels its operators launched (on the
GPU an operator's CPU time is its launch), the peaks are measured on the GPU, and the header adds how
busy the GPU was: kernel time against the profiled step.

  polynext profile cpolynext_s apolynext_s
  polynext profile cpolynext_t --modes infer --dtype bf16 --fold --json prof.json
  polynext profile cpolynext_t --modes train --top 25
  polynext profile cpolynext_s apolynext_s --device cuda --dtype bf16 --batch-size 128

The glibc allocator is pinned as in ``polynext bench`` (the command re-runs itself with it set).
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('models', nargs='+', metavar='MODEL', help='timm model names')
    parser.add_argument('--modes', nargs='+', choices=('infer', 'train'), default=['infer', 'train'],
                        help='steps to profile (default: infer train)')
    parser.add_argument('--img-size', type=int, default=224, help='input height and width (default 224)')
    parser.add_argument('--batch-size', '-b', type=int, default=32, help='batch size (default 32)')
    parser.add_argument('--dtype', choices=('fp32', 'bf16'), default='fp32',
                        help='infer: model and input in it; train: autocast (default fp32)')
    parser.add_argument('--device', default='cpu', help='cpu (default), cuda or cuda:N')
    parser.add_argument('--channels-last', action='store_true',
                        help='model and input in channels_last (PolyNeXt models convert their input anyway)')
    parser.add_argument('--fold', action='store_true', help='infer: PolyNeXt folded with polynext.fold_for_inference')
    parser.add_argument('--runs', type=int, default=5, help='profiled steps per model and mode (default 5)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps first (default 2)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    parser.add_argument('--top', type=int, default=10, metavar='N',
                        help='list the N heaviest operators under each table (default 10; 0: none; the JSON '
                             'holds 40)')
    parser.add_argument('--json', default=None, metavar='PATH', help='write the profiles and the peaks as JSON')
    parser.add_argument('--no-pin-allocator', action='store_true',
                        help='do not re-run with the pinned glibc allocator')
    parser.add_argument('--no-prefault-heap', action='store_true',
                        help='do not touch the heap before each step (the header counts the page faults of a '
                             'profiled step; without the touch they are charged to the operators)')


def run(args: argparse.Namespace) -> int:
    from ..bench import allocator_status, ensure_pinned_allocator, environment
    from ..errors import ConfigError
    from ..factory import check_model_name
    for name in args.models:
        check_model_name(name)
    for key in ('img_size', 'batch_size', 'runs', 'warmup'):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.top < 0:
        raise ConfigError(f'--top must be 0 (no operator list) or more, got {args.top}')
    if args.json:   # checked before a minute of measuring, as bench does
        from ..outputs import check_output_file
        check_output_file(args.json, '--json')
    if args.fold and 'train' in args.modes:
        args.modes = [m for m in args.modes if m != 'train']
        print('polynext profile: --fold profiles inference only (a folded model has no training path)',
              file=sys.stderr)
    if not args.no_pin_allocator and sys.argv[1:2] == ['profile']:
        ensure_pinned_allocator('polynext profile')

    import timm
    import torch
    import json
    from pathlib import Path
    from ..checkpoint import atomic_write
    from ..bench import BenchSettings, prepare_device
    from ..perf import conv1x1_bound, format_profile, format_top_ops, measure_peaks, profile_model
    from ..profile import count_macs
    # the device checked (present, bf16 support) before a minute of measuring
    settings = BenchSettings(device=args.device, dtype=args.dtype, threads=args.threads)
    settings.validate()
    device = prepare_device(settings)
    peaks = measure_peaks(args.dtype, batch_size=args.batch_size, device=str(device))
    env = environment(device)
    where = (f"{env['device_name']}, {torch.get_num_threads()} threads" if device.type == 'cpu'
             else f"{device} ({env['device_name']})")
    print(f"{where}, {args.dtype}, allocator {allocator_status()}; peaks: "
          + ', '.join(f'{p.name} {p.rate:,.1f} {p.unit}' for p in peaks.values()))
    out = dict(command=['polynext', 'profile'] + sys.argv[2:], environment=env,
               peaks={k: vars(p) for k, p in peaks.items()}, models={})
    for name in args.models:
        macs = None
        for mode in args.modes:
            torch.manual_seed(0)
            model = timm.create_model(name)
            if macs is None:
                macs = float(count_macs(model, input_size=args.img_size))
            prof = profile_model(model, mode=mode, batch_size=args.batch_size, img_size=args.img_size,
                                 dtype=args.dtype, runs=args.runs, warmup=args.warmup,
                                 channels_last=args.channels_last, peaks=peaks, macs_per_image=macs, fold=args.fold,
                                 prefault=not args.no_prefault_heap, device=str(device))
            d = prof.to_dict()
            print()
            print(format_profile(name, prof))
            if mode == 'infer':
                bound = conv1x1_bound(macs, peaks)
                print(f'bound (every MAC at the 1x1 peak): {bound:,.1f} img/s; this step reaches '
                      f"{100 * d['img_per_s'] / bound:.0f} % of it")
                d['conv1x1_bound_img_per_s'] = bound
            if args.top:
                print(format_top_ops(prof, args.top))
            out['models'].setdefault(name, {})[mode] = d
            if args.json:   # rewritten after every profile: a run cut short keeps what it measured
                text = json.dumps(out, indent=2)
                atomic_write(args.json, lambda tmp: Path(tmp).write_text(text + '\n'))
        del model
    if args.json:
        print(f'wrote {args.json}')
    return 0
