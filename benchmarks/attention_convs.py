"""PolyAttn's depthwise convolutions at CPU inference: the head-layout kernel of ``ops.attention_convs`` against
PyTorch's path.

For every distinct PolyAttn shape of the models at the given batch and input size, in one process, interleaved
(order reversed every other round, medians), on the channels-last activation the model passes, ``PolyAttn.attend``
(everything before the output projection: the Q/K/V projection, the Q, K and V convolutions, the attention, the
output convolution):

  pytorch   with the kernel off (``ops.cpu_kernels.heads_convs``): the projection as two 1x1 convolutions, oneDNN's
            three depthwise convolutions, Q, K and V copied into contiguous heads, Q times the head scale, the
            output copied back to channels-last, oneDNN's output convolution
  kernel    with it on: one projection, Q and K in one kernel call and V in another, written as heads; the output
            convolution reading the heads

and the largest difference of the two outputs (relative to the largest value). The attention itself is the same in
both. With ``--whole-model``, then each model's inference step (``polynext bench``'s) with the kernel on and off,
interleaved, and the largest logit difference.

The kernel needs AVX-512 or AVX2 (elsewhere PyTorch's path serves every call and there is nothing to time). Prints tables
and writes JSON. Speed ratios depend on the CPU: the JSON names it.

    python benchmarks/attention_convs.py --whole-model --runs 9 --json benchmarks/results/attention_convs_zen4.json
    python benchmarks/attention_convs.py apolynext_s --dtype bf16 --whole-model
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch


def _shapes(model: torch.nn.Module, x: torch.Tensor):
    """[(PolyAttn module, its input's shape)] for each distinct input shape of a forward of ``x``."""
    from polynext.models.polynext import PolyAttn
    found, hooks = {}, []
    for m in model.modules():
        if isinstance(m, PolyAttn):
            def hook(mod, args, out, m=m):   # (returns None: the output stays)
                found.setdefault(tuple(args[0].shape), m)
            hooks.append(m.qkv.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return [(m, shape) for shape, m in found.items()]


def _whole_model(args) -> list:
    """Each model's ``polynext bench`` inference step with the kernel on and off, interleaved."""
    from polynext.bench import BenchSettings, switch_ab_rows
    from polynext.ops import cpu_kernels

    print(f'whole model, inference, img/s (median of {args.runs}):', flush=True)
    settings = BenchSettings(mode='infer', dtype=args.dtype, batch_size=args.batch_size, img_size=args.img_size,
                             channels_last=True)
    return switch_ab_rows(args.models, settings, cpu_kernels.heads_convs, args.runs, labels=('pytorch', 'kernel'),
                          names=("PyTorch's path", 'kernel'))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='*', default=['apolynext_t', 'apolynext_s'])
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
    check_script_args(parser, args, 'attention_convs', argv)
    from polynext.ops import cpu_kernels
    if not (cpu_kernels.kernel_available() and cpu_kernels.library().heads_dw):
        parser.error('the attention convolutions kernel is not built here (it needs AVX-512 or AVX2, a C compiler and the '
                     "kernels on); PyTorch's path serves every call, so there is nothing to compare: run it on such "
                     'a CPU')
    dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16}[args.dtype]
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    shapes = {}
    for name in args.models:
        model = timm.create_model(name).eval()
        shapes[name] = _shapes(model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last))
        if not shapes[name]:
            parser.error(f'{name} has no PolyAttn; pass an APolyNeXt model such as apolynext_t')

    from polynext.bench import allocator_status, environment, time_interleaved, write_report
    env = environment(torch.device('cpu'))
    print(f"{env['device_name']}, {torch.get_num_threads()} threads, allocator {allocator_status()}, {args.dtype}, "
          f'batch {args.batch_size}, {args.img_size} px, PolyAttn.attend ms (median of {args.runs})', flush=True)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name in args.models:
        for attn, shape in shapes[name]:
            attn = attn.to(dtype)
            z = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)

            def attend(on: bool):
                def step():
                    with torch.inference_mode(), cpu_kernels.heads_convs(on):
                        return attn.attend(z)
                return step
            steps = {'pytorch': attend(False), 'kernel': attend(True)}
            want, got = (fn().float() for fn in steps.values())   # (also the warm-up)
            diff = ((got - want).abs().max() / want.abs().max()).item()
            ms = {key: statistics.median(t) * 1e3 for key, t in time_interleaved(steps, args.runs).items()}
            row = dict(model=name, shape=list(shape), heads=attn.num_heads, head_dim=attn.head_dim,
                       **{f'{key}_ms': round(t, 3) for key, t in ms.items()},
                       speedup=round(ms['pytorch'] / ms['kernel'], 3), max_rel_diff=diff)
            rows.append(row)
            print(f"{name:12s} {str(list(shape)):18s} {attn.num_heads} heads  PyTorch {ms['pytorch']:7.2f}  "
                  f"kernel {ms['kernel']:7.2f}  x{row['speedup']:.2f}  rel diff {diff:.1e}", flush=True)
    models = _whole_model(args) if args.whole_model else None
    out = dict(command=['python', 'benchmarks/attention_convs.py'] + list(argv if argv is not None else sys.argv[1:]),
               environment=env, allocator=allocator_status(), batch_size=args.batch_size, img_size=args.img_size,
               dtype=args.dtype, rows=rows, whole_model=models)
    write_report(args.json, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
