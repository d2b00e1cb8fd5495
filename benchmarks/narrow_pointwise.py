"""Narrow 1x1 convolutions at CPU inference: the kernel of ``ops.narrow_pointwise`` against oneDNN's.

    y = W x   (+ y: the residual addition after PolyMLP's output projection)

For every distinct 1x1 convolution the kernel serves in the models at the given batch and input size (outputs a
multiple of 72 or 48), in one process, interleaved (order reversed every other round, medians):

  onednn    ``F.conv2d`` (with a residual: ``ops.fused.conv_add_``, oneDNN's sum post-op)
  kernel    ``ops.narrow_pointwise.narrow_pointwise``

each with its rate (GMAC/s) and the kernel's largest difference from float64 (relative to the largest output). With
``--whole-model``, then each model's inference step (``polynext bench``'s) with the kernel on and off
(``ops.cpu_kernels.narrow_pointwise``), interleaved, and the largest logit difference.

The kernel needs AVX-512 and runs float32 (elsewhere oneDNN serves every call and there is nothing to time). Prints
tables and writes JSON. Speed ratios depend on the CPU: the JSON names it.

    python benchmarks/narrow_pointwise.py --whole-model --json benchmarks/results/narrow_pointwise_zen4.json
    python benchmarks/narrow_pointwise.py cpolynext_s --runs 21
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F


def _shapes(model: torch.nn.Module, x: torch.Tensor) -> list:
    """[(x shape, weight shape, with residual)] of the kernel's calls in a forward of ``x``, each once."""
    from polynext.ops import pointwise
    found = {}
    real = pointwise.narrow_pointwise

    def spy(x, weight, out=None):
        found.setdefault((tuple(x.shape), tuple(weight.shape), out is not None), None)
        return real(x, weight, out=out)
    pointwise.narrow_pointwise = spy
    try:
        with torch.inference_mode():
            model(x)
    finally:
        pointwise.narrow_pointwise = real
    return list(found)


def _whole_model(args) -> list:
    """Each model's ``polynext bench`` inference step with the kernel on and off, interleaved."""
    from polynext.bench import BenchSettings, switch_ab
    from polynext.ops import cpu_kernels

    print(f'whole model, inference, img/s (median of {args.runs}):', flush=True)
    rows = []
    for name in args.models:
        settings = BenchSettings(mode='infer', dtype='fp32', batch_size=args.batch_size, img_size=args.img_size)
        row = switch_ab(name, settings, cpu_kernels.narrow_pointwise, args.runs, labels=('onednn', 'kernel'))
        rows.append(row)
        print(f"{name:12s} oneDNN {row['onednn_img_s']:7.2f}  kernel {row['kernel_img_s']:7.2f}  x{row['speedup']:.3f}  "
              f"max |Δ logit| {row['max_abs_logit_diff']:.1e}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='*', default=['cpolynext_t', 'apolynext_t', 'cpolynext_s', 'apolynext_s'])
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--runs', type=int, default=9)
    parser.add_argument('--whole-model', action='store_true',
                        help="then each model's inference step with the kernel on and off")
    parser.add_argument('--json', default=None, metavar='PATH')
    args = parser.parse_args(argv)
    import timm
    from polynext.bench import check_script_args
    check_script_args(parser, args, 'narrow_pointwise', argv)
    from polynext.ops import cpu_kernels
    if not (cpu_kernels.kernel_available() and cpu_kernels.library().pointwise):
        parser.error('the narrow 1x1 kernel is not built here (it needs AVX-512, a C compiler and the kernels on); '
                     "oneDNN serves every call, so there is nothing to compare: run it on such a CPU")
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    shapes = {}
    for name in args.models:
        shapes[name] = _shapes(timm.create_model(name).eval(), x)
        if not shapes[name]:
            parser.error(f'{name} has no 1x1 convolution the kernel serves (PolyNeXt layers with a multiple of 72 or '
                         '48 outputs)')

    from polynext.bench import allocator_status, environment, time_interleaved, write_report
    from polynext.ops.fused import conv_add_
    from polynext.ops.narrow_pointwise import narrow_pointwise
    env = environment(torch.device('cpu'))
    print(f"{env['device_name']}, {torch.get_num_threads()} threads, allocator {allocator_status()}, fp32, "
          f'batch {args.batch_size}, {args.img_size} px, 1x1 convolution ms (median of {args.runs})', flush=True)
    rows = []
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for name in args.models:
        for xs, ws, residual in shapes[name]:
            if (xs, ws, residual) in seen:
                continue
            seen.add((xs, ws, residual))
            xin = torch.randn(xs, generator=gen).contiguous(memory_format=torch.channels_last)
            conv = torch.nn.Conv2d(ws[1], ws[0], 1, bias=False)
            w = conv.weight.detach()
            out = torch.randn((xs[0], ws[0]) + xs[2:], generator=gen).contiguous(memory_format=torch.channels_last)
            if residual:
                steps = {'onednn': lambda: conv_add_(out, xin, conv, weight=w),
                         'kernel': lambda: narrow_pointwise(xin, w, out=out)}
            else:
                steps = {'onednn': lambda: F.conv2d(xin, w), 'kernel': lambda: narrow_pointwise(xin, w)}
            with torch.inference_mode():
                small, base = xin[:2], out[:2].clone()
                want = F.conv2d(small.double(), w.double()) + (base.double() if residual else 0)
                got = narrow_pointwise(small, w, out=base.clone() if residual else None).double()
                err = ((got - want).abs().max() / want.abs().max()).item()
                for fn in steps.values():
                    fn()                                   # warm-up
                ms = {key: statistics.median(t) * 1e3 for key, t in time_interleaved(steps, args.runs).items()}
            macs = xin.numel() * ws[0]
            row = dict(model=name, x=list(xs), weight=list(ws), residual=residual,
                       **{f'{key}_ms': round(t, 3) for key, t in ms.items()},
                       **{f'{key}_gmac_s': round(macs / t / 1e6, 1) for key, t in ms.items()},
                       speedup=round(ms['onednn'] / ms['kernel'], 3), max_rel_diff_fp64=err)
            rows.append(row)
            print(f"{name:12s} {str(list(xs)):18s} -> {ws[0]:4d}{' + residual' if residual else '           '} "
                  f"oneDNN {ms['onednn']:7.2f} ({row['onednn_gmac_s']:5.1f} GMAC/s)  kernel {ms['kernel']:7.2f} "
                  f"({row['kernel_gmac_s']:5.1f})  x{row['speedup']:.2f}  rel diff fp64 {err:.1e}", flush=True)
    models = _whole_model(args) if args.whole_model else None
    out = dict(command=['python', 'benchmarks/narrow_pointwise.py'] + list(argv if argv is not None else sys.argv[1:]),
               environment=env, allocator=allocator_status(), batch_size=args.batch_size, img_size=args.img_size,
               dtype='fp32', rows=rows, whole_model=models)
    write_report(args.json, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
