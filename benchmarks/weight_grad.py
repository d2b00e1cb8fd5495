"""Training step with the 1x1 weight gradients of ``polynext.ops.pointwise`` against PyTorch's own.

For each model, in one process, on one model and one optimizer (rounds interleaved, order reversed
every other round, medians):

  onednn     ``weight_grad_backend('onednn')``: every 1x1 layer is plain ``nn.Conv2d`` (PyTorch's
             oneDNN backward for both gradients)
  auto       the default: each 1x1 shape's weight gradient from the kernel its first backward measured
             faster on this machine (oneDNN, or ``torch.mm`` by ``pointwise.MM_MARGIN``), as kept in
             ``pointwise.cache_path()``

a whole training step (forward, cross-entropy, backward, fused AdamW, batch on channels-last) as
``polynext bench --mode train`` times it; the time of the 1x1 layers' backward inside that step (the
profiler's operator time of every 1x1 ``convolution_backward`` and, where ``torch.mm`` serves the weight
gradient, the ops of that backward: the layout copy, the input-gradient convolution, the product), which a
whole-step ratio cannot resolve when the gain is smaller than the step's round-to-round spread; and the
kernel chosen for each 1x1 shape of the model, with the layer's backward on each path (``time_kernels``: oneDNN's
one call for both gradients; the input-gradient call and ``torch.mm``).
Prints a table and writes JSON. Speed ratios depend on the CPU: the JSON names it.

    python benchmarks/weight_grad.py --json benchmarks/results/weight_grad.json
    python benchmarks/weight_grad.py cpolynext_s --batch-size 64 --runs 9

Run it with the pinned allocator (the script re-runs itself with it, as ``polynext bench`` does).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch


def _model_shapes(model: torch.nn.Module, step) -> list:
    """Each distinct 1x1 layer shape this model's training step runs (one more step, recorded), with how many
    layers have it, the kernel chosen for it and the layer's backward on both paths on fresh tensors of that
    shape (``time_kernels``, cold caches, best of 5)."""
    import polynext.models.polynext as family
    from polynext.ops import pointwise
    seen, layers = {}, Counter()
    real = pointwise.pointwise_conv2d

    def record(x, weight, bias=None):
        # every PolyNeXt 1x1 layer comes here: PointwiseConv2d.forward, and the gated ones from _gated_conv
        key = (tuple(x.shape), weight.shape[0])
        seen.setdefault(key, weight)
        layers[key] += 1
        return real(x, weight, bias)
    pointwise.pointwise_conv2d = family.pointwise_conv2d = record
    try:
        step()
    finally:
        pointwise.pointwise_conv2d = family.pointwise_conv2d = real
    choices = pointwise.weight_grad_choices()
    rows = []
    for (shape, out_ch), weight in seen.items():
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        grad = torch.randn(shape[0], out_ch, *shape[2:]).contiguous(memory_format=torch.channels_last)
        best = pointwise.time_kernels(grad, x, weight.detach(), repeats=5)
        pixels = x.numel() // shape[1]
        chosen = next(v for k, v in choices.items() if k.startswith(f'{pixels}x{shape[1]}->{out_ch} '))
        rows.append(dict(input=list(shape), out_channels=out_ch, layers=layers[(shape, out_ch)], chosen=chosen,
                         **{f'{k}_ms': round(t * 1e3, 3) for k, t in best.items()}))
    return rows


def _in_step_backward_ms(step) -> tuple:
    """(milliseconds, layers counted): the operator time of the 1x1 layers' backward in one profiled training
    step, i.e. the ops run by ``_PointwiseConvFunction``'s backward (layout copy, input gradient,
    ``torch.mm``) and every other 1x1 ``convolution_backward`` (both gradients in one oneDNN call). The
    Python of the autograd function itself is left out: the profiler inflates it. Every 1x1 layer's
    backward is counted once, whichever kernel."""
    from torch.profiler import ProfilerActivity, profile
    from polynext.perf import conv_op_class, prefault_heap
    prefault_heap()   # no page faults the profiler causes charged to the operators
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    total_us, layers = 0.0, 0
    for event in prof.events():
        if event.name == '_PointwiseConvFunctionBackward':
            total_us += sum(child.cpu_time_total for child in event.cpu_children)
            layers += 1
        elif (event.name == 'aten::convolution_backward' and conv_op_class(event) == '1x1 conv'
              and (event.cpu_parent is None or event.cpu_parent.name != '_PointwiseConvFunctionBackward')):
            total_us += event.cpu_time_total
            layers += 1
    return total_us / 1e3, layers


def _check_models(parser: argparse.ArgumentParser, names) -> None:
    """One line for a name that is not a model, or not a PolyNeXt (only they have ``PointwiseConv2d`` layers)."""
    from timm.models import model_entrypoint
    from polynext.errors import ConfigError
    from polynext.factory import check_model_name
    for name in names:
        try:
            check_model_name(name)
        except ConfigError as err:
            parser.error(str(err))
        if model_entrypoint(name).__module__ != 'polynext.models.polynext':
            parser.error(f'{name} is not a PolyNeXt model (its 1x1 layers are plain nn.Conv2d); pass e.g. cpolynext_t')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='*', default=['cpolynext_t', 'apolynext_t'])
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--runs', type=int, default=7, help='timed rounds (default 7)')
    parser.add_argument('--json', default=None, metavar='PATH')
    args = parser.parse_args(argv)
    if args.json and Path(args.json).is_dir():
        parser.error(f'--json {args.json} is a folder; give a file path such as {args.json}/weight_grad.json')
    if args.runs < 1:
        parser.error(f'--runs must be at least 1, got {args.runs}')
    _check_models(parser, args.models)
    if argv is None:
        from polynext.bench import ensure_pinned_allocator
        ensure_pinned_allocator('weight_grad.py', announce=lambda m: print(m.split(' (')[0], file=sys.stderr))

    import timm
    import polynext  # noqa: F401  (registers the models)
    from polynext.bench import BenchSettings, allocator_status, environment, make_step, time_interleaved, write_report
    from polynext.ops import pointwise

    env = environment(torch.device('cpu'))
    print(f"{env['device_name']}, {torch.get_num_threads()} threads, allocator {allocator_status()}, fp32, "
          f"batch {args.batch_size}, {args.img_size} px; kernel choices in {pointwise.cache_path()}", flush=True)
    settings = BenchSettings(img_size=args.img_size, batch_size=args.batch_size, mode='train', channels_last=True)
    rows = []
    for name in args.models:
        model = timm.create_model(name)
        step = make_step(model, settings, torch.device('cpu'), label=name)

        def onednn() -> None:
            with pointwise.weight_grad_backend('onednn'):
                step()
        steps = {'onednn': onednn, 'auto': step}
        for fn in steps.values():           # warm-up; the first 'auto' backward measures unknown shapes
            fn()
        seconds = time_interleaved(steps, args.runs)
        med = {k: statistics.median(v) for k, v in seconds.items()}
        in_step, counted = {k: [] for k in steps}, {}
        for i in range(args.runs):          # interleaved, order reversed every other round
            for k in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
                ms, counted[k] = _in_step_backward_ms(steps[k])
                in_step[k].append(ms)
        in_med = {k: statistics.median(v) for k, v in in_step.items()}
        shapes = _model_shapes(model, step)
        kernels = Counter(r['chosen'] for r in shapes)
        # what the choices save per step by these per-shape times: every layer of a shape, 'mm' shapes only
        saved_ms = sum(r['layers'] * (r['onednn_ms'] - r['mm_ms']) for r in shapes if r['chosen'] == 'mm')
        paired = [a / b for a, b in zip(seconds['onednn'], seconds['auto'])]
        row = dict(model=name, onednn_s=round(med['onednn'], 4), auto_s=round(med['auto'], 4),
                   speedup=round(med['onednn'] / med['auto'], 3), runs=args.runs,
                   seconds={k: [round(t, 4) for t in v] for k, v in seconds.items()},
                   paired_speedup=round(statistics.median(paired), 3), auto_faster_rounds=sum(p > 1 for p in paired),
                   in_step_1x1_backward_ms={k: round(v, 1) for k, v in in_med.items()},
                   in_step_1x1_backward_rounds_ms={k: [round(t, 1) for t in v] for k, v in in_step.items()},
                   in_step_saved_ms=round(in_med['onednn'] - in_med['auto'], 1), in_step_layers=counted,
                   kernels=dict(kernels), saved_ms_by_shape_times=round(saved_ms, 1), shapes=shapes)
        rows.append(row)
        print(f"{name:14s} onednn {med['onednn']:.3f} s  auto {med['auto']:.3f} s  x{row['speedup']:.3f}  "
              f"(round by round x{row['paired_speedup']:.3f}, auto faster in {row['auto_faster_rounds']} of "
              f"{args.runs}; {kernels.get('mm', 0)} of {len(shapes)} 1x1 shapes on torch.mm, saving "
              f"{saved_ms:.0f} ms a step by the times below)", flush=True)
        print(f"    1x1 backward inside the step (profiled, medians): onednn {in_med['onednn']:.0f} ms, auto "
              f"{in_med['auto']:.0f} ms, {row['in_step_saved_ms']:.0f} ms saved "
              f"({row['in_step_saved_ms'] / (1e3 * med['auto']):.1%} of the auto step)", flush=True)
        for r in shapes:
            n, c, h, w = r['input']
            print(f"    {r['layers']:3d} x {c:4d} -> {r['out_channels']:4d} at {h}x{w}: backward oneDNN {r['onednn_ms']:7.2f} ms, "
                  f"conv + torch.mm {r['mm_ms']:7.2f} ms, chosen {r['chosen']}", flush=True)
    out = dict(command=['python', 'benchmarks/weight_grad.py'] + list(argv if argv is not None else sys.argv[1:]),
               environment=env, allocator=allocator_status(), batch_size=args.batch_size, img_size=args.img_size,
               rows=rows)
    write_report(args.json, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
