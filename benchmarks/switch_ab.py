"""One of polynext's on/off switches, whole model: each model's inference step with it off and on.

    python benchmarks/switch_ab.py constants.keep cpolynext_t cpolynext_s --dtype bf16 --runs 9

A switch is an ``ops.fused.Switch`` of a module of ``polynext.ops``, named ``module.attribute``: the kernels of
``ops.cpu_kernels`` (``cpu_kernels.kernels``, ``cpu_kernels.heads_convs``, ...), ``constants.keep`` (derived weights
kept), ``fused.fusion`` (every fused path). Each model's ``polynext bench`` step (inference, channels-last, in
``--dtype``) runs with the switch off and on, interleaved in one process (order reversed every other round,
medians), with the largest logit difference between the two. Prints a table and writes JSON; speed ratios depend on
the CPU: the JSON names it.
"""
from __future__ import annotations

import argparse
import importlib
import sys


#: the modules of polynext.ops that define switches (others import them under other names)
_MODULES = ('cpu_kernels', 'constants', 'fused')


def switches() -> dict:
    """'module.attribute' → each Switch those modules define."""
    from polynext.ops.fused import Switch
    found = {}
    for name in _MODULES:
        module = importlib.import_module(f'polynext.ops.{name}')
        found.update({f'{name}.{attr}': value for attr, value in vars(module).items() if isinstance(value, Switch)})
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('switch', help="the switch, as 'module.attribute' of polynext.ops (e.g. constants.keep)")
    parser.add_argument('models', nargs='*', default=['cpolynext_t', 'apolynext_t', 'cpolynext_s', 'apolynext_s'])
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--runs', type=int, default=9)
    parser.add_argument('--dtype', choices=('fp32', 'bf16'), default='fp32')
    parser.add_argument('--json', default=None, metavar='PATH')
    args = parser.parse_args(argv)
    from polynext.bench import check_script_args
    check_script_args(parser, args, 'switch_ab', argv)
    known = switches()
    if args.switch not in known:
        parser.error(f"{args.switch} is not a switch of polynext.ops; use one of {', '.join(known)}")
    import torch
    from polynext.bench import BenchSettings, allocator_status, environment, switch_ab_rows, write_report
    env = environment(torch.device('cpu'))
    print(f"{env['device_name']}, {torch.get_num_threads()} threads, allocator {allocator_status()}, {args.dtype}, "
          f'batch {args.batch_size}, {args.img_size} px; {args.switch} off and on, img/s (median of {args.runs}):',
          flush=True)
    settings = BenchSettings(mode='infer', dtype=args.dtype, batch_size=args.batch_size, img_size=args.img_size,
                             channels_last=True)
    rows = switch_ab_rows(args.models, settings, known[args.switch], args.runs)
    out = dict(command=['python', 'benchmarks/switch_ab.py'] + list(argv if argv is not None else sys.argv[1:]),
               environment=env, allocator=allocator_status(), switch=args.switch, batch_size=args.batch_size,
               img_size=args.img_size, dtype=args.dtype, rows=rows)
    write_report(args.json, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
