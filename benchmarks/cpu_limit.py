"""CPU inference against the machine's bound: each PolyNeXt model in its inference modes, interleaved.

For each model, in one process (rounds interleaved, order reversed every other round, medians):

  eager          the model as built (channels-last inside), fusions off (``ops.fused.fusion(False)``: PyTorch's
                 operators only)
  eager fused    the default eager path: oneDNN post-op convolutions and the hand-written kernels of
                 ``ops.cpu_kernels`` (channel LayerNorms, the attention's power and normalisation)
  folded         ``polynext.fold_for_inference(model)`` with the fusions (``polynext bench --fold``)
  compiled       ``torch.compile`` of the folded model (``--compile``; the compile time is reported)

and the machine's 1x1-conv peak measured in the same process (``polynext.perf.measure_peaks``):
MACs x img/s as a fraction of it, and the bound (img/s if every MAC ran at that peak). Logits of
every variant are compared with the eager model's first. Writes JSON.

    python benchmarks/cpu_limit.py --json benchmarks/results/cpu_limit.json
    python benchmarks/cpu_limit.py cpolynext_t --batch-size 32 --runs 9 --compile --json r.json

Run it with the pinned allocator (the script re-runs itself with it, as ``polynext bench`` does).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='*', default=['cpolynext_t', 'apolynext_t', 'cpolynext_s', 'apolynext_s'])
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--runs', type=int, default=7, help='timed rounds (default 7)')
    parser.add_argument('--dtype', choices=('fp32', 'bf16'), default='fp32')
    parser.add_argument('--compile', action='store_true', help='add the compiled folded model')
    parser.add_argument('--json', default=None, metavar='PATH')
    args = parser.parse_args(argv)
    if argv is None:
        from polynext.bench import ensure_pinned_allocator
        ensure_pinned_allocator('cpu_limit.py', announce=lambda m: print(m.split(' (')[0], file=sys.stderr))

    import timm
    import polynext
    from polynext.bench import allocator_status, environment
    from polynext.ops.fused import fusion
    from polynext.perf import conv1x1_bound, measure_peaks
    from polynext.profile import count_macs
    dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16}[args.dtype]
    peaks = measure_peaks(args.dtype, batch_size=args.batch_size)
    env = environment(torch.device('cpu'))
    print(f"{env['device_name']}, {torch.get_num_threads()} threads, allocator {allocator_status()}, {args.dtype}; "
          f"1x1-conv peak {peaks['conv1x1'].rate:.1f} GMAC/s ({peaks['conv1x1'].probe})", flush=True)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    result = dict(command=['python', 'benchmarks/cpu_limit.py'] + list(argv if argv is not None else sys.argv[1:]),
                  environment=env, allocator=allocator_status(), dtype=args.dtype, batch_size=args.batch_size,
                  peaks={k: vars(p) for k, p in peaks.items()}, models={})
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        macs = float(count_macs(model, input_size=args.img_size))
        folded = polynext.fold_for_inference(model).to(dtype)
        model = model.to(dtype)

        def runner(m, fused):
            def step():
                with fusion(fused), torch.inference_mode():
                    return m(x)
            return step
        steps = {'eager': runner(model, False), 'eager fused': runner(model, True), 'folded': runner(folded, True)}
        compile_s = None
        if args.compile:
            compiled = torch.compile(folded)
            t0 = time.perf_counter()
            runner(compiled, True)()
            compile_s = time.perf_counter() - t0
            steps['compiled'] = runner(compiled, True)
        ref = steps['eager']().float()
        diffs = {k: (s().float() - ref).abs().max().item() for k, s in steps.items()}
        times = {k: [] for k in steps}
        order = list(steps)
        for r in range(args.runs):
            for k in (order if r % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                steps[k]()
                times[k].append(time.perf_counter() - t0)
        bound = conv1x1_bound(macs, peaks)
        rows = {}
        print(f'\n{name}: {macs / 1e9:.3f} GMAC/img, bound {bound:.1f} img/s')
        for k, t in times.items():
            ips = args.batch_size / statistics.median(t)
            rows[k] = dict(img_per_s=ips, gmacs_per_s=ips * macs / 1e9, of_conv1x1_peak=ips / bound,
                           x_eager=ips / (args.batch_size / statistics.median(times['eager'])),
                           max_abs_logit_diff=diffs[k])
            print(f"  {k:12s} {ips:8.1f} img/s  {ips * macs / 1e9:7.1f} GMAC/s  {100 * ips / bound:5.1f} % of peak  "
                  f"x{rows[k]['x_eager']:.3f} eager  max|Δ| {diffs[k]:.1e}", flush=True)
        result['models'][name] = dict(macs_per_image=macs, bound_img_per_s=bound, compile_s=compile_s, variants=rows)
        del model, folded, steps
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f'.{path.name}.tmp')
        tmp.write_text(json.dumps(result, indent=2) + '\n')
        tmp.replace(path)
        print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
