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
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# the reference's config name and layer count for each polynext model
REFERENCE = {
    'cpolynext_t': ('CPolyNeXt_T', 12), 'cpolynext_s': ('CPolyNeXt_S', 17), 'cpolynext_b': ('CPolyNeXt_B', 21),
    'cpolynext_l': ('CPolyNeXt_L', 24), 'apolynext_t': ('APolyNeXt_T', 12), 'apolynext_s': ('APolyNeXt_S', 17),
    'apolynext_b': ('APolyNeXt_B', 21), 'apolynext_l': ('APolyNeXt_L', 24),
}


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
    args = parser.parse_args()
    ensure_pinned_allocator(prog='vs_reference.py')

    import timm
    import torch

    import polynext
    from polynext.bench import BenchSettings, allocator_status, environment, format_table, make_step, time_interleaved

    model_py = args.reference_dir / 'model.py'
    if not model_py.is_file():
        print(f'vs_reference.py: error: {model_py} not found; --reference-dir must be a checkout of '
              f'jjwang8/PolyNeXt', file=sys.stderr)
        return 2
    sys.path.insert(0, str(args.reference_dir))
    import model as reference  # the authors' module (not shipped with polynext)

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
            for _ in range(args.warmup):
                for step in steps.values():
                    step()
            times = time_interleaved(steps, args.runs)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = dict(model=name, mode=mode, batch_size=args.batch_size, max_abs_logit_diff=diff,
                       **{f'{k} ms': 1000 * v for k, v in med.items()},
                       **{f'{k} img/s': args.batch_size / v for k, v in med.items()},
                       speedup_vs_reference_nchw=med['reference NCHW'] / med['polynext'],
                       speedup_vs_reference_cl=med['reference CL'] / med['polynext'])
            results.append(row)
            print(f"{name} {mode}: polynext {row['speedup_vs_reference_nchw']:.2f}x reference NCHW, "
                  f"{row['speedup_vs_reference_cl']:.2f}x reference CL (logits max |Δ| {diff:.1e})", flush=True)
            del steps, ref_nchw, ref_cl, ours
    columns = ['model', 'mode', 'ref NCHW img/s', 'ref CL img/s', 'polynext img/s', 'x ref NCHW', 'x ref CL',
               'max |Δ logit|']
    rows = [[r['model'], r['mode'], f"{r['reference NCHW img/s']:.1f}", f"{r['reference CL img/s']:.1f}",
             f"{r['polynext img/s']:.1f}", f"{r['speedup_vs_reference_nchw']:.2f}", f"{r['speedup_vs_reference_cl']:.2f}",
             f"{r['max_abs_logit_diff']:.1e}"] for r in results]
    print()
    print(format_table(columns, rows))
    env = dict(environment(torch.device('cpu')), allocator=allocator_status(), threads=torch.get_num_threads())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(environment=env, batch_size=args.batch_size, img_size=args.img_size,
                                         runs=args.runs, results=results), indent=2))
    print(f'\nwrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
