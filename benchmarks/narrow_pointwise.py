"""Narrow 1x1 convolutions at CPU inference: the kernel of ``ops.narrow_pointwise`` against oneDNN's.

    y = W x   (+ y: the residual addition after PolyMLP's output projection)

For every distinct 1x1 convolution the kernel serves in the models at the given batch and input size (outputs a
multiple of 72 or 48), in one process, interleaved (order reversed every other round, medians):

  onednn    ``F.conv2d`` (with a residual: ``ops.fused.conv_add_``, oneDNN's sum post-op)
  kernel    ``ops.narrow_pointwise.narrow_pointwise``

each with its rate (GMAC/s) and the kernel's largest difference from float64 (relative to the largest output). Then
every call of the kernel with the channel LayerNorm as its epilogue (``ops.narrow_pointwise.pointwise_norm``:
PolyConv's ``pw_out`` with its norm and residual, PolyMLP's ``fc_in`` with its product and norm), against

  separate  the kernel, then ``ops.channel_norm``'s kernel (the path with ``ops.cpu_kernels.pointwise_norm(False)``)
  fused     ``pointwise_norm``

Then PolyMLP's whole residual branch in one kernel (``ops.narrow_pointwise.poly_mlp_``) against the epilogue kernel
(``fc_in``, product, norm) and the residual kernel (``fc_out`` added into the stream; in bf16 oneDNN's convolution
with its sum post-op), per served shape, and whether the two give the same bits.

With ``--whole-model``, then each model's inference step (``polynext bench``'s) with the kernels on and off
(``ops.cpu_kernels.narrow_pointwise``: every 1x1 convolution on oneDNN), with the norm epilogue on and off and with
the whole-MLP kernel on and off (``pointwise_norm``, ``fused_mlp``; the others on), interleaved, and the largest
logit differences.

The kernel needs AVX-512 or AVX2 and runs float32 (elsewhere oneDNN serves every call and there is nothing to time). With
``--dtype bf16`` a bf16 model: the fused kernels' bf16 forms (AVX-512 BF16) against oneDNN's bf16 convolution and the
norm kernel, and the whole-model A/Bs; the plain kernel is float32 only. Prints tables and writes JSON. Speed ratios
depend on the CPU: the JSON names it.

    python benchmarks/narrow_pointwise.py --whole-model --json benchmarks/results/narrow_pointwise_zen4.json
    python benchmarks/narrow_pointwise.py --whole-model --runs 9 --json benchmarks/results/pointwise_fused_zen4.json
    python benchmarks/narrow_pointwise.py --whole-model --dtype bf16 --runs 9 --json benchmarks/results/pointwise_fused_bf16_zen4.json
    python benchmarks/narrow_pointwise.py cpolynext_s --runs 21
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F


def _shapes(model: torch.nn.Module, x: torch.Tensor) -> tuple:
    """The kernel's calls in forwards of ``x``, each shape once: [(x shape, weight shape, with residual)] of the plain
    kernel with both epilogues off (every 1x1 convolution it serves), [(x shape, weight shape, 'residual' or
    'product')] of the norm epilogue with the whole-MLP kernel off, [(x shape, input weight shape, output weight
    shape)] of the whole-MLP kernel."""
    from polynext.models import polynext as family
    from polynext.ops import pointwise
    from polynext.ops.cpu_kernels import fused_mlp, pointwise_norm
    found, normed, mlps = {}, {}, {}
    real, real_norm, real_mlp = pointwise.narrow_pointwise, family.pointwise_norm, family.poly_mlp_

    def spy(x, weight, out=None):
        found.setdefault((tuple(x.shape), tuple(weight.shape), out is not None), None)
        return real(x, weight, out=out)

    def spy_norm(x, weight, norm_weight, norm_bias, eps, residual=None, product=False, inplace=False):
        y = real_norm(x, weight, norm_weight, norm_bias, eps, residual=residual, product=product, inplace=inplace)
        if y is not None:
            normed.setdefault((tuple(x.shape), tuple(weight.shape), 'product' if product else 'residual'), None)
        return y

    def spy_mlp(x, in_weight, norm_weight, norm_bias, eps, out_weight):
        shape = tuple(x.shape)
        y = real_mlp(x, in_weight, norm_weight, norm_bias, eps, out_weight)
        if y is not None:
            mlps.setdefault((shape, tuple(in_weight.shape), tuple(out_weight.shape)), None)
        return y
    pointwise.narrow_pointwise, family.pointwise_norm, family.poly_mlp_ = spy, spy_norm, spy_mlp
    try:
        with torch.inference_mode():
            with pointwise_norm(False), fused_mlp(False):
                model(x)
            normed.clear()
            with fused_mlp(False):
                model(x)
            model(x)
    finally:
        pointwise.narrow_pointwise, family.pointwise_norm, family.poly_mlp_ = real, real_norm, real_mlp
    return list(found), list(normed), list(mlps)


def _separate(dtype: torch.dtype):
    """The path without the fused kernels: (conv, conv added into a tensor): in float32 the plain 1x1 kernel, in
    bfloat16 oneDNN's convolution (and its sum post-op, ``ops.fused.conv_add_``), which the plain kernel does not
    serve."""
    from polynext.ops.fused import conv_add_
    from polynext.ops.narrow_pointwise import narrow_pointwise
    if dtype == torch.float32:
        return narrow_pointwise, lambda out, x, w: narrow_pointwise(x, w, out=out)

    def add(out, x, w):
        conv = torch.nn.Conv2d(w.shape[1], w.shape[0], 1, bias=False, dtype=w.dtype)
        return conv_add_(out, x, conv, weight=w)
    return F.conv2d, add


def _mlp_rows(args, shapes: dict, gen: torch.Generator) -> list:
    """PolyMLP's residual branch in one kernel against the norm epilogue kernel and the residual 1x1 kernel."""
    from polynext.bench import time_interleaved
    from polynext.ops.narrow_pointwise import pointwise_norm, poly_mlp_
    _, conv_add = _separate(args.torch_dtype)
    print(f'PolyMLP residual branch, ms (median of {args.runs}):', flush=True)
    rows, seen = [], set()
    for name, calls in shapes.items():
        for xs, wis, wos in calls:
            if (xs, wis, wos) in seen:
                continue
            seen.add((xs, wis, wos))
            dt = args.torch_dtype
            xin = torch.randn(xs, generator=gen).to(dt).contiguous(memory_format=torch.channels_last)
            w_in = (torch.randn(wis, generator=gen) / wis[1] ** 0.5).to(dt)
            w_out = (torch.randn(wos, generator=gen) / wos[1] ** 0.5).to(dt)
            nw = (torch.rand(wis[0] // 2, generator=gen) + 0.5).to(dt)
            xa, xb = xin.clone(), xin.clone()
            steps = {'separate': lambda: conv_add(xa, pointwise_norm(xa, w_in, nw, None, 1e-5, product=True), w_out),
                     'fused': lambda: poly_mlp_(xb, w_in, nw, None, 1e-5, w_out)}
            with torch.inference_mode():
                for fn in steps.values():
                    fn()                                   # warm-up, and the same values from there on
                equal = torch.equal(xa, xb)
                diff = (xa.float() - xb.float()).abs().max().item()
                ms = {key: statistics.median(t) * 1e3 for key, t in time_interleaved(steps, args.runs).items()}
            macs = xin.numel() * (wis[0] + wos[1])
            row = dict(model=name, x=list(xs), in_weight=list(wis), out_weight=list(wos),
                       **{f'{key}_ms': round(t, 3) for key, t in ms.items()},
                       **{f'{key}_gmac_s': round(macs / t / 1e6, 1) for key, t in ms.items()},
                       speedup=round(ms['separate'] / ms['fused'], 3), bit_identical=equal, max_abs_diff=diff)
            rows.append(row)
            print(f"{name:12s} {str(list(xs)):18s} -> {wis[0]:4d} -> {wos[0]:4d}  separate {ms['separate']:7.2f} "
                  f"({row['separate_gmac_s']:5.1f} GMAC/s)  fused {ms['fused']:7.2f} ({row['fused_gmac_s']:5.1f})  "
                  f"x{row['speedup']:.2f}  {'bit-identical' if equal else f'max |Δ| {diff:.1e}'}", flush=True)
    return rows


def _norm_rows(args, shapes: dict, gen: torch.Generator) -> list:
    """The kernel with the norm epilogue against the kernel and the norm kernel, per served shape."""
    from polynext.bench import time_interleaved
    from polynext.ops.channel_norm import channel_layer_norm
    from polynext.ops.narrow_pointwise import pointwise_norm
    conv, _ = _separate(args.torch_dtype)
    dt = args.torch_dtype
    print(f'1x1 convolution with the norm epilogue, ms (median of {args.runs}):', flush=True)
    rows, seen = [], set()
    for name, calls in shapes.items():
        for xs, ws, kind in calls:
            if (xs, ws, kind) in seen:
                continue
            seen.add((xs, ws, kind))
            n = ws[0]
            c = n // 2 if kind == 'product' else n
            xin = torch.randn(xs, generator=gen).to(dt).contiguous(memory_format=torch.channels_last)
            w = (torch.randn(ws, generator=gen) / xs[1] ** 0.5).to(dt)
            nw = (torch.rand(c, generator=gen) + 0.5).to(dt)
            res = torch.randn((xs[0], n) + xs[2:], generator=gen).to(dt).contiguous(memory_format=torch.channels_last)
            if kind == 'product':
                steps = {'separate': lambda: channel_layer_norm(conv(xin, w).permute(0, 2, 3, 1), (c,), nw,
                                                                None, 1e-5, product=True),
                         'fused': lambda: pointwise_norm(xin, w, nw, None, 1e-5, product=True)}
            else:
                steps = {'separate': lambda: channel_layer_norm(conv(xin, w).permute(0, 2, 3, 1), (n,), nw,
                                                                None, 1e-5, residual=res.permute(0, 2, 3, 1),
                                                                inplace=True),
                         'fused': lambda: pointwise_norm(xin, w, nw, None, 1e-5, residual=res)}
            with torch.inference_mode():
                diff = (steps['fused']().permute(0, 2, 3, 1).float() - steps['separate']().float()).abs().max().item()
                ms = {key: statistics.median(t) * 1e3 for key, t in time_interleaved(steps, args.runs).items()}
            macs = xin.numel() * n
            row = dict(model=name, x=list(xs), weight=list(ws), epilogue=kind,
                       **{f'{key}_ms': round(t, 3) for key, t in ms.items()},
                       **{f'{key}_gmac_s': round(macs / t / 1e6, 1) for key, t in ms.items()},
                       speedup=round(ms['separate'] / ms['fused'], 3), max_abs_diff=diff)
            rows.append(row)
            print(f"{name:12s} {str(list(xs)):18s} -> {n:4d} + norm {'(product)' if kind == 'product' else '+ residual'}"
                  f"  separate {ms['separate']:7.2f}  fused {ms['fused']:7.2f}  x{row['speedup']:.2f}  "
                  f'max |Δ| {diff:.1e}', flush=True)
    return rows


def _whole_model(args) -> list:
    """Each model's ``polynext bench`` inference step with the kernel on and off, interleaved."""
    from polynext.bench import BenchSettings, switch_ab
    from polynext.ops import cpu_kernels

    print(f'whole model, inference, img/s (median of {args.runs}):', flush=True)
    rows = []
    for name in args.models:
        settings = BenchSettings(mode='infer', dtype=args.dtype, batch_size=args.batch_size, img_size=args.img_size)
        row = switch_ab(name, settings, cpu_kernels.narrow_pointwise, args.runs, labels=('onednn', 'kernel'))
        row['norm_epilogue'] = switch_ab(name, settings, cpu_kernels.pointwise_norm, args.runs,
                                         labels=('separate', 'fused'))
        row['whole_mlp'] = switch_ab(name, settings, cpu_kernels.fused_mlp, args.runs, labels=('separate', 'fused'))
        rows.append(row)
        print(f"{name:12s} oneDNN {row['onednn_img_s']:7.2f}  kernels {row['kernel_img_s']:7.2f}  x{row['speedup']:.3f}  "
              f"max |Δ logit| {row['max_abs_logit_diff']:.1e}", flush=True)
        for key, label in (('norm_epilogue', 'norm epilogue'), ('whole_mlp', 'whole-MLP kernel')):
            ab = row[key]
            print(f"{'':12s} {label} off {ab['separate_img_s']:7.2f}  on {ab['fused_img_s']:7.2f}  "
                  f"x{ab['speedup']:.3f}  max |Δ logit| {ab['max_abs_logit_diff']:.1e}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='*', default=['cpolynext_t', 'apolynext_t', 'cpolynext_s', 'apolynext_s'])
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--runs', type=int, default=9)
    parser.add_argument('--dtype', choices=('fp32', 'bf16'), default='fp32',
                        help='bf16: a bf16 model, where only the fused kernels serve (the plain kernel is fp32 only)')
    parser.add_argument('--whole-model', action='store_true',
                        help="then each model's inference step with the kernel on and off")
    parser.add_argument('--json', default=None, metavar='PATH')
    args = parser.parse_args(argv)
    import timm
    from polynext.bench import check_script_args
    check_script_args(parser, args, 'narrow_pointwise', argv)
    from polynext.ops import cpu_kernels
    if not (cpu_kernels.kernel_available() and cpu_kernels.library().pointwise):
        parser.error('the narrow 1x1 kernel is not built here (it needs AVX-512 or AVX2, a C compiler and the kernels on); '
                     "oneDNN serves every call, so there is nothing to compare: run it on such a CPU")
    if args.dtype == 'bf16' and not cpu_kernels.library().pointwise_bf16:
        parser.error('the bf16 fused 1x1 kernels are not built here (they need AVX-512 BF16); run --dtype bf16 on '
                     'such a CPU, or drop it')
    args.torch_dtype = torch.bfloat16 if args.dtype == 'bf16' else torch.float32
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    shapes, norm_shapes, mlp_shapes = {}, {}, {}
    for name in args.models:
        shapes[name], norm_shapes[name], mlp_shapes[name] = _shapes(timm.create_model(name).eval(), x)
        if not shapes[name]:
            parser.error(f'{name} has no 1x1 convolution the kernel serves (PolyNeXt layers with a multiple of 72 or '
                         '48 outputs)')

    from polynext.bench import allocator_status, environment, time_interleaved, write_report
    from polynext.ops.fused import conv_add_
    from polynext.ops.narrow_pointwise import narrow_pointwise
    env = environment(torch.device('cpu'))
    print(f"{env['device_name']}, {torch.get_num_threads()} threads, allocator {allocator_status()}, {args.dtype}, "
          f'batch {args.batch_size}, {args.img_size} px, 1x1 convolution ms (median of {args.runs})', flush=True)
    rows = []
    gen = torch.Generator().manual_seed(0)
    seen = set()
    if args.dtype == 'bf16':
        print('bf16: the plain 1x1 kernel is float32 only (oneDNN serves those layers); the fused kernels below',
              flush=True)
    for name in args.models if args.dtype == 'fp32' else ():
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
    norm_rows = _norm_rows(args, norm_shapes, gen)
    mlp_rows = _mlp_rows(args, mlp_shapes, gen)
    models = _whole_model(args) if args.whole_model else None
    out = dict(command=['python', 'benchmarks/narrow_pointwise.py'] + list(argv if argv is not None else sys.argv[1:]),
               environment=env, allocator=allocator_status(), batch_size=args.batch_size, img_size=args.img_size,
               dtype=args.dtype, rows=rows, norm_rows=norm_rows, mlp_rows=mlp_rows, whole_model=models)
    write_report(args.json, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
