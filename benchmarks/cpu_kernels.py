"""polynext's hand-written CPU kernels (``polynext.ops.cpu_kernels``) against PyTorch's operators.

1. Per layer: every distinct channel LayerNorm of the models' inference at the given size and batch (found
   by running the model once), alone, with PolyConv's residual, or of PolyMLP's product of two halves, the
   input in the model's dtype, timed in one process, interleaved (order reversed every other round, medians):

     aten       PyTorch's operators: the product, ``F.layer_norm`` on the NHWC view, the addition
     inductor   the same under ``torch.compile`` (inductor's generated C++ kernel, which fuses them itself;
                ``--no-inductor`` skips it)
     polynext   ``channel_layer_norm`` (the C kernel, one pass)

   with the bytes the one pass moves (each input read once, the result written once) per second, and each
   one's largest difference from float64.
   With ``--mode train``: the same layers forward and backward (the gradients of the input, the weight and the
   residual, from one fixed output gradient; ``--dtype bf16``: bf16 rows under CPU autocast with float32
   parameters, as a bf16 training step runs them), ``aten`` as autograd runs PyTorch's operators against
   polynext's kernels and their backward, with each one's weight-gradient error against float64; no
   ``inductor`` column. Then every distinct PolyConv flip product a ⊙ flip_c(b) (``ops.flip_product``) forward
   and backward against ``a * b.flip(1)``, and whether the two give the same bits.
2. Per model: inference of the whole model (``polynext bench``'s step: the model and the input in the dtype,
   channels-last, ``inference_mode``) with the kernels on and off (``cpu_kernels.kernels``: the channel
   LayerNorms, with PolyMLP's product and PolyConv's residual, and the attention's power and normalisation),
   interleaved, and the largest logit difference between the two. With ``--mode train``: ``polynext bench``'s
   training step (forward, loss, backward, AdamW; bf16 under autocast) with the kernels on and off (in training
   the norms' forward and backward, the attention's power, row sums, recomputation and dL/dS, and PolyConv's
   flip product, in float32 and bfloat16).

Prints two tables and writes JSON; the speed ratios depend on the CPU, which the JSON names.

    python benchmarks/cpu_kernels.py --json benchmarks/results/cpu_kernels_fp32.json
    python benchmarks/cpu_kernels.py --dtype bf16 --json benchmarks/results/cpu_kernels_bf16.json
    python benchmarks/cpu_kernels.py cpolynext_t --batch-size 2 --img-size 64 --runs 3   # a quick look
    python benchmarks/cpu_kernels.py cpolynext_t apolynext_t --mode train --json benchmarks/results/cpu_kernels_train.json

Run it with the pinned allocator (the script re-runs itself with it, as ``polynext bench`` does).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}


def norm_shapes(model, x):
    """The distinct (NHWC shape, has bias, has residual, of a product) of the channel LayerNorms in one inference of
    ``model`` (``x``: the NHWC input, with ``product`` 2C channels whose halves are multiplied)."""
    import polynext.models.polynext as family
    import polynext.ops.channel_norm as cn
    from polynext.ops.cpu_kernels import fused_mlp, kernels, pointwise_norm
    seen = {}
    real = cn.channel_layer_norm

    def record(z, shape, weight, bias, eps, residual=None, inplace=False, product=False):
        seen.setdefault((tuple(z.shape), bias is not None, residual is not None, product), None)
        return real(z, shape, weight, bias, eps, residual=residual, inplace=inplace, product=product)
    cn.channel_layer_norm = family.channel_layer_norm = record
    try:   # with the kernels on, so that PolyMLP takes the product path (MIN_NUMEL at 0: every layer), but not as
        # the 1x1 kernel's epilogue (ops.narrow_pointwise), which would hide the norms this script times
        minimum, cn.MIN_NUMEL = cn.MIN_NUMEL, 0
        with torch.inference_mode(), pointwise_norm(False), fused_mlp(False):
            model(x)
    finally:
        cn.channel_layer_norm = family.channel_layer_norm = real
        cn.MIN_NUMEL = minimum
    return list(seen)


def _train_steps(z, w, r, gen):
    """The per-layer steps of ``--mode train``: each forward and its backward (autograd, from one fixed output
    gradient, for the input, the weight and the residual), their largest gradient difference from float64, the
    weight gradient's largest difference from float64 relative to its largest value, and the bytes the backward
    moves at least (the gradient and the input read, the input's gradient written)."""
    from polynext.ops.channel_norm import channel_layer_norm
    leaves = [t.detach().requires_grad_() for t in (z, w) + ((r,) if r is not None else ())]
    grad = torch.randn(z.shape[:-1] + (w.shape[0],), generator=gen).to(z.dtype)   # (the float64 reference: the same values)

    def aten(x, weight, residual=None):
        c = weight.shape[0]
        if x.shape[-1] != c:
            lo, hi = x.chunk(2, dim=-1)
            x = lo * hi
        y = F.layer_norm(x, (c,), weight, None, 1e-6)
        return y if residual is None else y + residual

    def ours(x, weight, residual=None):
        c = weight.shape[0]
        return channel_layer_norm(x, (c,), weight, None, 1e-6, residual=residual, product=x.shape[-1] != c)

    def step(fn, tensors):   # bf16 rows as in bf16 autocast training: the parameters float32
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=tensors[0].dtype == torch.bfloat16):
            out = fn(*tensors)
        return torch.autograd.grad(out, tensors, grad.to(out.dtype))

    ref = step(aten, [t.detach().double().requires_grad_() for t in leaves])
    steps = {'aten': lambda: step(aten, leaves), 'polynext': lambda: step(ours, leaves)}
    grads = {k: fn() for k, fn in steps.items()}
    errs = {k: max((g.double() - gr).abs().max().item() for g, gr in zip(gs, ref)) for k, gs in grads.items()}
    weight_errs = {k: ((gs[1].double() - ref[1]).abs().max() / ref[1].abs().max()).item() for k, gs in grads.items()}
    return steps, errs, weight_errs, (grad.numel() + 2 * z.numel()) * z.element_size()


def _flip_rows(name, model, args, dtype, gen, done):
    """Per-layer rows for PolyConv's flip product a ⊙ flip_c(b) (``ops.flip_product``) at the model's shapes, forward
    and backward against ``a * b.flip(1)`` under autograd, with the bytes the two passes move at least (three
    tensors forward, five backward) and whether the two give the same bits."""
    import polynext.models.polynext as family
    from polynext.bench import time_interleaved
    from polynext.ops import flip_product as fp
    from polynext.ops.fused import fusion
    shapes, real = {}, family.flip_product
    family.flip_product = lambda a, b: shapes.setdefault(tuple(a.shape), None) or real(a, b)
    try:   # without the oneDNN fusions PolyConv takes its training form, which calls flip_product
        with torch.inference_mode(), fusion(False):
            model(torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen))
    finally:
        family.flip_product = real
    rows = []
    for shape in shapes:
        if ('flip', shape) in done:
            continue
        done.add(('flip', shape))
        a, b, g = (torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
                   for _ in range(3))
        a.requires_grad_(), b.requires_grad_()

        def run(fn):
            y = fn(a, b)
            return (y,) + torch.autograd.grad(y, (a, b), g)
        steps = {'aten': lambda: run(lambda x, z: x * z.flip(1)), 'polynext': lambda: run(fp.flip_product)}
        same = all(torch.equal(p, q) for p, q in zip(steps['aten'](), steps['polynext']()))
        times = time_interleaved(steps, args.runs)
        nbytes = 8 * a.numel() * a.element_size()
        row = dict(op='flip_product', model=name, shape=list(shape), dtype=args.dtype, mode=args.mode,
                   kernel=fp._applies(a, b), bit_identical=same)
        for k in steps:
            ms = _median_ms(times[k])
            row[f'{k}_ms'] = round(ms, 4)
            row[f'{k}_gb_per_s'] = round(nbytes / ms / 1e6, 2)
        row['speedup_vs_aten'] = round(row['aten_ms'] / row['polynext_ms'], 3)
        print(f"{name:12s} {str(list(shape)):20s} flip  aten {row['aten_ms']:7.3f} ms {row['aten_gb_per_s']:5.1f} GB/s  "
              f"polynext {row['polynext_ms']:7.3f} ms {row['polynext_gb_per_s']:5.1f} GB/s  x{row['speedup_vs_aten']:.2f}"
              f"  bit-identical {same}" + ('' if row['kernel'] else '  (PyTorch in both columns: below the kernel size)'),
              flush=True)
        rows.append(row)
    return rows


def _median_ms(times):
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    import timm
    import polynext  # noqa: F401  (registers the models)
    from polynext.bench import BenchSettings, environment, make_step, time_interleaved, write_report
    import polynext.ops.channel_norm as cn
    from polynext.ops.channel_norm import channel_layer_norm
    from polynext.ops.cpu_kernels import kernel_info, kernels

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='*', default=['cpolynext_s', 'apolynext_s'])
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--dtype', choices=tuple(DTYPES), default='fp32')
    parser.add_argument('--mode', choices=('infer', 'train'), default='infer',
                        help='inference (default), or a training step: forward and backward')
    parser.add_argument('--runs', type=int, default=9, help='interleaved rounds (default 9)')
    parser.add_argument('--no-inductor', action='store_true', help='skip the torch.compile column (slow to build)')
    parser.add_argument('--json', default=None, metavar='PATH')
    args = parser.parse_args(argv)
    if args.json and Path(args.json).is_dir():
        parser.error(f'--json {args.json} is a folder; give a file path such as {args.json}/cpu_kernels.json')
    for key in ('batch_size', 'img_size', 'runs'):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if argv is None:
        from polynext.bench import ensure_pinned_allocator
        ensure_pinned_allocator('cpu_kernels.py', announce=lambda m: print(m.split(' (')[0], file=sys.stderr))
    info = kernel_info()
    if not info['available']:
        print('cpu_kernels.py: the kernel is not available here (no C compiler?), nothing to compare',
              file=sys.stderr)
        return 1
    dtype = DTYPES[args.dtype]
    train = args.mode == 'train'
    print(f"{environment(torch.device('cpu'))['device_name']}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"{args.mode}; kernel: {info['code']}, OpenMP {info['openmp']}", flush=True)
    if train:   # no inductor column (its training graphs take minutes to build)
        args.no_inductor = True

    # 1. per layer
    layers, done = [], set()
    gen = torch.Generator().manual_seed(0)
    def torch_form(z, w, b, r):   # compiled below: inductor fuses the product, the norm and the addition itself
        if z.shape[-1] != w.shape[0]:
            lo, hi = z.chunk(2, dim=-1)
            z = lo * hi
        y = F.layer_norm(z, (z.shape[-1],), w, b, 1e-6)
        return y if r is None else y + r
    compiled = None if args.no_inductor else torch.compile(torch_form, dynamic=False)
    if compiled is not None:   # one graph per layer shape: more than Dynamo's default of 8 before it runs eager
        import torch._dynamo.config as dynamo_config
        limit = 'recompile_limit' if hasattr(dynamo_config, 'recompile_limit') else 'cache_size_limit'
        setattr(dynamo_config, limit, 256)
    for name in args.models:
        model = timm.create_model(name).eval()
        x0 = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen)
        for shape, has_bias, has_res, product in norm_shapes(model, x0):
            if (shape, has_bias, has_res, product) in done:
                continue
            done.add((shape, has_bias, has_res, product))
            c = shape[-1] // 2 if product else shape[-1]
            z = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype)
            pdtype = torch.float32 if train else dtype   # training: float32 parameters (bf16: under autocast)
            w = (torch.randn(c, generator=gen) * 0.5 + 1).to(pdtype)
            b = torch.randn(c, generator=gen).to(pdtype) if has_bias else None
            r = torch.randn(shape[:-1] + (c,), generator=gen).to(dtype) if has_res else None

            def plain(t):   # what PyTorch normalises: the tensor, or the product of its halves
                if not product:
                    return t
                lo, hi = t.chunk(2, dim=-1)
                return lo * hi

            def aten():
                y = F.layer_norm(plain(z), (c,), w, b, 1e-6)
                return y if r is None else y.add_(r)

            def ours():
                return channel_layer_norm(z, (c,), w, b, 1e-6, residual=r, product=product)
            steps = {'aten': aten, 'polynext': ours}
            if compiled is not None:
                steps['inductor'] = lambda: compiled(z, w, b, r)
            nbytes = (z.numel() + 2 * r.numel() if r is not None else z.numel() + z.numel() // (2 if product else 1)) \
                * z.element_size()   # read once, written once (the residual read too): the least a pass moves
            weight_errs = {}
            if train:   # (the polynext column runs the kernels where cn.trains says so: small plain fp32 norms not)
                steps, errs, weight_errs, extra = _train_steps(z, w, r, gen)
                nbytes += extra
                kernel = cn.trains(z.detach().requires_grad_(), w, b, r, product)
                times = time_interleaved(steps, args.runs)
            else:
                with torch.inference_mode():
                    ref = F.layer_norm(plain(z.double()), (c,), w.double(), None if b is None else b.double(), 1e-6)
                    ref = ref if r is None else ref + r.double()
                    errs = {k: (fn().double() - ref).abs().max().item() for k, fn in steps.items()}
                    times = time_interleaved(steps, args.runs)
                    kernel = cn.applies(z, w, b, r, product)
            row = dict(op='norm', model=name, shape=list(shape), bias=has_bias, residual=has_res, product=product,
                       dtype=args.dtype, mode=args.mode, kernel=kernel)
            row.update({f'{k}_weight_grad_rel_err': v for k, v in weight_errs.items()})
            for k in steps:
                ms = _median_ms(times[k])
                row[f'{k}_ms'] = round(ms, 4)
                row[f'{k}_gb_per_s'] = round(nbytes / ms / 1e6, 2)
                row[f'{k}_max_abs_diff_fp64'] = errs[k]
            row['speedup_vs_aten'] = round(row['aten_ms'] / row['polynext_ms'], 3)
            layers.append(row)
            cols = '  '.join(f"{k} {row[f'{k}_ms']:7.3f} ms {row[f'{k}_gb_per_s']:5.1f} GB/s" for k in steps)
            kind = '+res' if has_res else 'a*b ' if product else '    '
            print(f"{name:12s} {str(list(shape)):20s} {kind}  {cols}  "
                  f"x{row['speedup_vs_aten']:.2f}  fp64 diff ours {errs['polynext']:.1e} aten {errs['aten']:.1e}"
                  + (f"  weight grad rel. err. ours {weight_errs['polynext']:.1e} aten {weight_errs['aten']:.1e}"
                     if weight_errs else '')
                  + ('' if kernel else '  (PyTorch in both columns: below the kernel size)'),
                  flush=True)

    if train:   # PolyConv's flip product: training is where it runs (at inference the oneDNN fusion does the product)
        for name in args.models:
            layers += _flip_rows(name, timm.create_model(name).eval(), args, dtype, gen, done)

    # 2. per model
    models = []
    settings = BenchSettings(batch_size=args.batch_size, img_size=args.img_size, dtype=args.dtype, mode=args.mode,
                             channels_last=True, memory=False)
    for name in args.models:
        torch.manual_seed(0)
        step = make_step(timm.create_model(name), settings, torch.device('cpu'))
        outputs = {}

        def run(enabled: bool):
            with kernels(enabled):
                step()

        for enabled in (False, True, False, True):   # warm-up
            run(enabled)
        times = time_interleaved({'torch': lambda: run(False), 'polynext': lambda: run(True)}, args.runs)
        if train:
            t, p = (statistics.median(times[k]) for k in ('torch', 'polynext'))
            row = dict(model=name, dtype=args.dtype, mode='train', torch_img_per_s=round(args.batch_size / t, 2),
                       polynext_img_per_s=round(args.batch_size / p, 2), speedup=round(t / p, 3))
            models.append(row)
            print(f"{name:12s} training step, {args.dtype}: PyTorch's operators {row['torch_img_per_s']:6.1f} img/s, "
                  f"with the kernels {row['polynext_img_per_s']:6.1f} img/s, x{row['speedup']:.3f}", flush=True)
            continue
        torch.manual_seed(0)   # the logits of both paths: the same weights, a batch of the timed size
        net = timm.create_model(name).eval().to(memory_format=torch.channels_last).to(dtype)
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size,
                        generator=torch.Generator().manual_seed(1)).to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for enabled in (False, True):
                with kernels(enabled):
                    outputs[enabled] = net(x).float()
        diff = (outputs[True] - outputs[False]).abs().max().item()
        t, p = (statistics.median(times[k]) for k in ('torch', 'polynext'))
        row = dict(model=name, dtype=args.dtype, torch_img_per_s=round(args.batch_size / t, 2),
                   polynext_img_per_s=round(args.batch_size / p, 2), speedup=round(t / p, 3),
                   max_abs_logit_diff=diff, max_abs_logit=outputs[False].abs().max().item(),
                   argmax_agreement=(outputs[True].argmax(1) == outputs[False].argmax(1)).float().mean().item())
        models.append(row)
        print(f"{name:12s} whole model, {args.dtype}: PyTorch's operators {row['torch_img_per_s']:6.1f} img/s, "
              f"with the kernels {row['polynext_img_per_s']:6.1f} img/s, x{row['speedup']:.3f}; "
              f"max |Δ logit| {diff:.1e} (largest logit {row['max_abs_logit']:.2f}), argmax agreement "
              f"{100 * row['argmax_agreement']:.0f} %", flush=True)

    out = dict(command=['python', 'benchmarks/cpu_kernels.py'] + list(argv if argv is not None else sys.argv[1:]),
               environment=environment(torch.device('cpu')), kernel=info, batch_size=args.batch_size,
               img_size=args.img_size, dtype=args.dtype, mode=args.mode, runs=args.runs, layers=layers, models=models)
    write_report(args.json, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
