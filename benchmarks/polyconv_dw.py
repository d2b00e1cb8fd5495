"""PolyConv's depthwise core at CPU inference: the one-pass kernel of ``ops.polyconv_dw`` against PyTorch's path.

    core(u) = DW_out( DW_coarse(u) ⊙ flip_c(DW_fine(u)) )

For every distinct PolyConv shape of the models at the given batch and input size, in one process, interleaved
(order reversed every other round, medians), on the channels-last activation the model passes:

  pytorch   ``PolyConv.core`` with the kernel off (``ops.cpu_kernels.fused_polyconv``): oneDNN's fine convolution,
            the reversed copy, the coarse convolution with the product as its post-op, the output convolution
  kernel    ``PolyConv.core`` with it on: one pass over u and y

each with its rate (the three convolutions' MACs a second), and the kernel's largest difference from float64 on
the same values (relative to the largest output). With ``--whole-model``, then each model's inference step
(``polynext bench``'s) with the kernel on and off, interleaved, and the largest logit difference.

The kernel needs AVX-512 or AVX2 (elsewhere PyTorch's path serves every call and there is nothing to time). Prints tables
and writes JSON. Speed ratios depend on the CPU: the JSON names it.

    python benchmarks/polyconv_dw.py --json benchmarks/results/polyconv_dw.json
    python benchmarks/polyconv_dw.py cpolynext_t apolynext_t cpolynext_s apolynext_s --whole-model --runs 11
    python benchmarks/polyconv_dw.py cpolynext_s --dtype bf16 --whole-model
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F


def _shapes(model: torch.nn.Module, x: torch.Tensor):
    """[(PolyConv module, u's shape)] for each distinct (u shape, coarse kernel) of a forward of ``x``."""
    from polynext.models.polynext import PolyConv
    found, hooks = {}, []
    for m in model.modules():
        if isinstance(m, PolyConv):
            def hook(mod, args, out, m=m):
                found.setdefault((tuple(out.shape), m.coarse.kernel_size[0], m.coarse.dilation[0]), m)
            hooks.append(m.pw_in.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return [(m, shape) for (shape, _, _), m in found.items()]


def _fp64_core(u, conv):
    c, k, d = u.shape[1], conv.coarse.kernel_size[0], conv.coarse.dilation[0]
    w = [m.weight.double() for m in (conv.coarse, conv.fine, conv.dw_out)]
    u = u.double()
    a = F.conv2d(u, w[0], padding=d * (k - 1) // 2, dilation=d, groups=c)
    return F.conv2d(a * F.conv2d(u, w[1], padding=1, groups=c).flip(1), w[2], padding=1, groups=c)


def _whole_model(args) -> list:
    """Each model's ``polynext bench`` inference step with the kernel on and off, interleaved."""
    from polynext.bench import BenchSettings, switch_ab_rows
    from polynext.ops import cpu_kernels

    print(f'whole model, inference, img/s (median of {args.runs}):', flush=True)
    settings = BenchSettings(mode='infer', dtype=args.dtype, batch_size=args.batch_size, img_size=args.img_size,
                             channels_last=True)
    return switch_ab_rows(args.models, settings, cpu_kernels.fused_polyconv, args.runs, labels=('pytorch', 'kernel'),
                          names=("PyTorch's path", 'kernel'))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='*', default=['cpolynext_t', 'apolynext_t', 'cpolynext_s', 'apolynext_s'])
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--runs', type=int, default=9)
    parser.add_argument('--dtype', choices=('fp32', 'bf16'), default='fp32')
    parser.add_argument('--whole-model', action='store_true',
                        help="then each model's inference step with the kernel on and off")
    parser.add_argument('--json', default=None, metavar='PATH')
    args = parser.parse_args(argv)
    import timm
    from polynext.bench import check_script_args
    check_script_args(parser, args, 'polyconv_dw', argv)
    from polynext.ops import cpu_kernels
    if not (cpu_kernels.kernel_available() and cpu_kernels.library().polyconv_dw):
        parser.error('the PolyConv core kernel is not built here (it needs AVX-512 or AVX2, a C compiler and the kernels on); '
                     "PyTorch's path serves every call, so there is nothing to compare: run it on such a CPU")
    dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16}[args.dtype]
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    shapes = {}
    for name in args.models:
        model = timm.create_model(name).eval()
        shapes[name] = _shapes(model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last))
        if not shapes[name]:
            parser.error(f'{name} has no PolyConv; pass a PolyNeXt model such as cpolynext_t')

    from polynext.bench import allocator_status, environment, time_interleaved, write_report
    env = environment(torch.device('cpu'))
    print(f"{env['device_name']}, {torch.get_num_threads()} threads, allocator {allocator_status()}, {args.dtype}, "
          f'batch {args.batch_size}, {args.img_size} px, PolyConv core ms (median of {args.runs})', flush=True)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name in args.models:
        for conv, shape in shapes[name]:
            conv = conv.to(dtype)
            u = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
            def core(on: bool):
                def step():
                    with torch.inference_mode(), cpu_kernels.fused_polyconv(on):
                        conv.core(u)
                return step
            steps = {'pytorch': core(False), 'kernel': core(True)}
            small = u[:2]
            with torch.inference_mode():
                want = _fp64_core(small, conv)
                err = ((conv.core(small).double() - want).abs().max() / want.abs().max()).item()
            for fn in steps.values():
                fn()                                   # warm-up
            ms = {key: statistics.median(t) * 1e3 for key, t in time_interleaved(steps, args.runs).items()}
            k, d = conv.coarse.kernel_size[0], conv.coarse.dilation[0]
            macs = u.numel() * (k * k + 18)
            row = dict(model=name, shape=list(shape), coarse=f'{k}x{k} dilation {d}',
                       **{f'{key}_ms': round(t, 3) for key, t in ms.items()},
                       **{f'{key}_gmac_s': round(macs / t / 1e6, 1) for key, t in ms.items()},
                       speedup=round(ms['pytorch'] / ms['kernel'], 3), max_rel_diff_fp64=err)
            rows.append(row)
            print(f"{name:12s} {str(list(shape)):18s} {row['coarse']:15s} PyTorch {ms['pytorch']:7.2f} "
                  f"({row['pytorch_gmac_s']:5.1f} GMAC/s)  kernel {ms['kernel']:7.2f} ({row['kernel_gmac_s']:5.1f})  "
                  f"x{row['speedup']:.2f}  rel diff fp64 {err:.1e}", flush=True)
    models = _whole_model(args) if args.whole_model else None
    out = dict(command=['python', 'benchmarks/polyconv_dw.py'] + list(argv if argv is not None else sys.argv[1:]),
               environment=env, allocator=allocator_status(), batch_size=args.batch_size, img_size=args.img_size,
               dtype=args.dtype, rows=rows, whole_model=models)
    write_report(args.json, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
