"""PolyAttn's kernel, forward + backward (or the inference forward), at a model's attention shapes: polynext
against the paper's expression.

For every distinct attention shape of the model at the given batch and input size (PolyAttn calls
``ops.poly_attention.poly_attention``), in one process, interleaved (order reversed every other round,
medians), heads passed as the strided views of a channels-last activation, as the model passes them:

  expression  ``poly_attention_reference``: l1-normalised (Q Kᵀ + 1)^4 times V under autograd, as in the
              authors' code
  baseline    (with ``--baseline FILE``) ``poly_attention`` of another version of
              ``polynext/ops/poly_attention.py``, e.g. an earlier commit's, to measure a change
  unfused     (where ``ops.cpu_kernels`` builds the fused attention kernel for ``--dtype`` on this CPU: float32 on
              AVX-512, bf16 on AVX-512 BF16) ``poly_attention`` with that kernel off
              (``ops.cpu_kernels.fused_attention``): PyTorch's products through cache tiles
  polynext    ``poly_attention`` (the fused kernel where it is built; elsewhere chunked, recomputing backward)

in fp32 or bf16 (``--dtype``; bf16 as the model runs it cast to bf16 or under autocast), forward + backward or
(``--mode infer``) the forward under ``inference_mode``, as a deployed model runs it; the float64
agreement of polynext's output and gradients with the expression's (in float64, and in the timed dtype against
the float64 expression on the same values: ``--dtype fp32`` runs the fused float32 kernel of ``ops.cpu_kernels``
where it is built), and with ``--baseline`` whether the two versions give bit-identical outputs and gradients.

With ``--whole-model``, then each model's whole step (``polynext bench``'s: inference, or with ``--mode train``
forward, loss, backward and AdamW; ``--dtype``) with the fused attention kernel on and off
(``ops.cpu_kernels.fused_attention``), interleaved, and the largest logit difference at inference.

Prints a table (two) and writes JSON. Speed ratios depend on the CPU: the JSON names it.

    python benchmarks/poly_attention.py --json benchmarks/results/poly_attention.json
    git show edb6769:src/polynext/ops/poly_attention.py > /tmp/poly_attention_edb6769.py
    python benchmarks/poly_attention.py --baseline /tmp/poly_attention_edb6769.py --runs 15
    python benchmarks/poly_attention.py apolynext_t apolynext_s --dtype bf16 --baseline FILE
    python benchmarks/poly_attention.py apolynext_s --mode infer --batch-size 2 --img-size 512 --baseline FILE
    python benchmarks/poly_attention.py apolynext_t apolynext_s --mode infer --whole-model --runs 11
    python benchmarks/poly_attention.py apolynext_t apolynext_s --dtype bf16 --whole-model --runs 11
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch


def _attention_shapes(model: torch.nn.Module, x: torch.Tensor):
    """(batch, heads, tokens, head dim) of each distinct ``poly_attention`` call in a forward of ``x``."""
    import polynext.models.polynext as family
    seen = []
    real = family.poly_attention

    def record(q, k, v, *args, **kwargs):
        if tuple(q.shape) not in seen:
            seen.append(tuple(q.shape))
        return real(q, k, v, *args, **kwargs)
    family.poly_attention = record
    try:
        with torch.no_grad():
            model(x)
    finally:
        family.poly_attention = real
    return seen


def _heads(shape, dtype, seed):
    """q, k, v as the model passes them: head views of one channels-last (B, N, 3·h·d) activation."""
    b, h, n, d = shape
    base = torch.randn(b, n, 3 * h * d, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 0.3
    return [base[..., i * h * d:(i + 1) * h * d].reshape(b, n, h, d).transpose(1, 2).detach().requires_grad_()
            for i in range(3)]


def _step(fn, q, k, v, grad):
    out = fn(q, k, v)
    return (out.detach(),) + torch.autograd.grad(out, (q, k, v), grad)


def _infer(fn, q, k, v, grad):
    with torch.inference_mode():
        return (fn(q, k, v),)


def _whole_model(args) -> list:
    """Each model's ``polynext bench`` step with the fused attention kernel on and off, interleaved."""
    from polynext.bench import BenchSettings, switch_ab
    from polynext.ops import cpu_kernels

    print(f"whole model, {'inference' if args.mode == 'infer' else 'training step'}, img/s (median of {args.runs}):",
          flush=True)
    rows = []
    for name in args.models:
        settings = BenchSettings(mode=args.mode, dtype=args.dtype, batch_size=args.batch_size, img_size=args.img_size,
                                 channels_last=True)
        row = switch_ab(name, settings, cpu_kernels.fused_attention, args.runs, labels=('pytorch', 'fused'))
        rows.append(row)
        diff = f"  max |Δ logit| {row['max_abs_logit_diff']:.1e}" if 'max_abs_logit_diff' in row else ''
        print(f"{name:12s} PyTorch's attention {row['pytorch_img_s']:7.2f}  fused {row['fused_img_s']:7.2f}  "
              f"x{row['speedup']:.3f}{diff}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='*', default=['apolynext_t'])
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--runs', type=int, default=9)
    parser.add_argument('--baseline', type=Path, default=None, metavar='FILE',
                        help='another version of polynext/ops/poly_attention.py to time alongside')
    parser.add_argument('--dtype', choices=('fp32', 'bf16'), default='fp32')
    parser.add_argument('--mode', choices=('train', 'infer'), default='train',
                        help='train: forward + backward (default); infer: the forward under inference_mode')
    parser.add_argument('--whole-model', action='store_true',
                        help="then each model's whole step with the fused attention kernel on and off")
    parser.add_argument('--json', default=None, metavar='PATH')
    args = parser.parse_args(argv)
    if args.json and Path(args.json).is_dir():
        parser.error(f'--json {args.json} is a folder; give a file path such as {args.json}/poly_attention.json')
    dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16}[args.dtype]
    if args.baseline is not None and not args.baseline.is_file():
        parser.error(f'--baseline {args.baseline} is not a file; write one with '
                     f'git show COMMIT:src/polynext/ops/poly_attention.py > FILE')
    if args.runs < 1:
        parser.error(f'--runs must be at least 1, got {args.runs}')
    from polynext.ops import cpu_kernels
    fused_built = cpu_kernels.kernel_available() and dtype in cpu_kernels.library().attention_fused
    if args.whole_model and not fused_built:
        needs = 'AVX-512 BF16' if dtype == torch.bfloat16 else 'AVX-512'
        parser.error(f'--whole-model times the fused attention kernel on and off, which is not built here for '
                     f'{args.dtype} (it needs {needs} and the kernels on); drop --whole-model, or run it on such a CPU')
    import timm
    import polynext  # noqa: F401  (registers the models)
    from polynext.errors import ConfigError
    from polynext.factory import check_model_name
    for name in args.models:
        try:
            check_model_name(name)
        except ConfigError as err:
            parser.error(str(err))
    if argv is None:
        from polynext.bench import ensure_pinned_allocator
        ensure_pinned_allocator('poly_attention.py', announce=lambda m: print(m.split(' (')[0], file=sys.stderr))
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    shapes = {name: _attention_shapes(timm.create_model(name).eval(), x) for name in args.models}
    for name, found in shapes.items():
        if not found:
            parser.error(f'{name} runs no polynomial attention kernel (no PolyAttn, or a fully polynomial / '
                         'windowed / softmax one); pass an APolyNeXt model such as apolynext_t')

    from polynext.bench import allocator_status, environment, write_report
    from polynext.ops.poly_attention import poly_attention, poly_attention_reference

    kernels = {'expression': poly_attention_reference}
    if args.baseline is not None:
        spec = importlib.util.spec_from_file_location('poly_attention_baseline', args.baseline)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        kernels['baseline'] = module.poly_attention
    if fused_built:
        def unfused(*a, **kw):
            with cpu_kernels.fused_attention(False):
                return poly_attention(*a, **kw)
        kernels['unfused'] = unfused
    kernels['polynext'] = poly_attention
    env = environment(torch.device('cpu'))
    print(f"{env['device_name']}, {torch.get_num_threads()} threads, allocator {allocator_status()}, {args.dtype}, "
          f"batch {args.batch_size}, {args.img_size} px, "
          f"{'forward + backward' if args.mode == 'train' else 'inference forward'} ms (median of {args.runs})",
          flush=True)
    step = _step if args.mode == 'train' else _infer
    rows = []
    for name in args.models:
        for shape in shapes[name]:
            small = (2,) + shape[1:]
            q64, k64, v64 = _heads(small, torch.float64, 1)
            g64 = torch.randn(small, dtype=torch.float64)
            want = step(poly_attention_reference, q64, k64, v64, g64)
            err = max(((a - b).abs().max() / b.abs().max()).item()
                      for a, b in zip(step(poly_attention, q64, k64, v64, g64), want))
            # the timed dtype's code path (the fused kernel in float32) against float64 on the same values
            qd, kd, vd, gd = (t.to(dtype) for t in (q64, k64, v64, g64))
            want_d = step(poly_attention_reference, *(t.double() for t in (qd, kd, vd, gd)))
            err_d = max(((a.double() - b).abs().max() / b.abs().max()).item()
                        for a, b in zip(step(poly_attention, qd, kd, vd, gd), want_d))
            q, k, v = _heads(shape, dtype, 0)
            g = torch.randn(shape).to(dtype)
            times = {key: [] for key in kernels}
            order = list(kernels)
            for fn in kernels.values():
                step(fn, q, k, v, g)                    # warm-up
            for r in range(args.runs):
                for key in (order if r % 2 == 0 else order[::-1]):
                    t = time.perf_counter()
                    step(kernels[key], q, k, v, g)
                    times[key].append(time.perf_counter() - t)
            ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}
            row = dict(model=name, shape=list(shape), **{f'{key}_ms': round(t, 2) for key, t in ms.items()},
                       speedup_vs_expression=round(ms['expression'] / ms['polynext'], 2),
                       max_rel_diff_fp64=err, max_rel_diff_dtype=err_d)
            if 'unfused' in ms:
                row['speedup_vs_unfused'] = round(ms['unfused'] / ms['polynext'], 3)
            if 'baseline' in ms:
                row['speedup_vs_baseline'] = round(ms['baseline'] / ms['polynext'], 3)
                row['identical_to_baseline'] = all(torch.equal(a, b) for a, b in zip(
                    step(kernels['baseline'], q, k, v, g), step(poly_attention, q, k, v, g)))
            rows.append(row)
            cols = '  '.join(f'{key} {t:8.1f}' for key, t in ms.items())
            extra = f"  x{row['speedup_vs_unfused']:.3f} unfused" if 'unfused' in ms else ''
            extra += (f"  x{row['speedup_vs_baseline']:.3f} baseline"
                     f"{' (bit-identical)' if row['identical_to_baseline'] else ' (differs)'}") if 'baseline' in ms else ''
            print(f'{name:12s} {str(list(shape)):18s} {cols}  x{row["speedup_vs_expression"]:.2f} expression{extra}'
                  f'  rel diff fp64 {err:.1e}, {args.dtype} {err_d:.1e}', flush=True)
    models = _whole_model(args) if args.whole_model else None
    out = dict(command=['python', 'benchmarks/poly_attention.py'] + list(argv if argv is not None else sys.argv[1:]),
               environment=env, allocator=allocator_status(), batch_size=args.batch_size, img_size=args.img_size,
               dtype=args.dtype, mode=args.mode, baseline=str(args.baseline) if args.baseline else None, rows=rows,
               whole_model=models)
    write_report(args.json, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
