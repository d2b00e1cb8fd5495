"""PolyAttn's Q/K/V projection as two 1x1 convolutions (``ops.pointwise.split_pointwise``) against one convolution
whose output is split into channel slices.

    [qk, v] = W_qkv x;   Q = DW5x5_q(qk), K = DW5x5_k(qk), V = DW3x3(v)

As slices of one channels-last tensor, ``qk`` and ``v`` are strided views, and PyTorch's depthwise convolution copies
such an input into a contiguous tensor first (three copies per attention layer). ``split_pointwise`` computes the two
parts with the weight's two row blocks instead, each contiguous: the same products and sums per output channel.

For each model, ``polynext bench``'s step (inference, or ``--mode train``: forward, loss, backward, AdamW) with the
split and with one convolution, interleaved in one process (medians), and at inference the largest logit difference
between the two. Both with ``ops.attention_convs``' kernel off (``ops.cpu_kernels.heads_convs``): where it serves (CPU
inference with AVX-512) the model takes one convolution and the kernel reads its parts in place, so this split is
the path of training and of CPUs without the kernel. Prints a table and writes JSON. Speed ratios depend on the CPU: the JSON names it.

    python benchmarks/qkv_split.py --json benchmarks/results/qkv_split_fp32_zen4.json
    python benchmarks/qkv_split.py apolynext_s --dtype bf16 --runs 11
    python benchmarks/qkv_split.py apolynext_t --mode train --runs 5
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator

import torch


@contextlib.contextmanager
def split_parts(on: bool) -> Iterator[None]:
    """With ``on`` False the models split one convolution's output (what they did before ``split_pointwise``)."""
    if on:
        yield
        return
    from polynext.models import folded, polynext as models
    saved = models.split_pointwise, folded.split_pointwise
    models.split_pointwise = folded.split_pointwise = (
        lambda x, conv, split: conv(x).split([split, conv.out_channels - split], dim=1))
    try:
        yield
    finally:
        models.split_pointwise, folded.split_pointwise = saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='*', default=['apolynext_t', 'apolynext_s'])
    parser.add_argument('--mode', choices=('infer', 'train'), default='infer')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--runs', type=int, default=9)
    parser.add_argument('--dtype', choices=('fp32', 'bf16'), default='fp32')
    parser.add_argument('--channels-last', action='store_true',
                        help='the model and input channels-last (off: as polynext bench, the model converts after its stem)')
    parser.add_argument('--json', default=None, metavar='PATH')
    args = parser.parse_args(argv)
    import timm
    from polynext.bench import check_script_args
    from polynext.models.polynext import PolyAttn
    check_script_args(parser, args, 'qkv_split', argv)
    for name in args.models:
        if not any(isinstance(m, PolyAttn) for m in timm.create_model(name).modules()):
            parser.error(f'{name} has no PolyAttn; pass an APolyNeXt model such as apolynext_t')

    from polynext.bench import BenchSettings, allocator_status, environment, switch_ab_rows, write_report
    env = environment(torch.device('cpu'))
    print(f"{env['device_name']}, {torch.get_num_threads()} threads, allocator {allocator_status()}, {args.mode}, "
          f"{args.dtype}, channels-last {'on' if args.channels_last else 'off'}, batch {args.batch_size}, "
          f'{args.img_size} px, img/s (median of {args.runs})', flush=True)
    from polynext.ops.cpu_kernels import heads_convs
    settings = BenchSettings(mode=args.mode, dtype=args.dtype, batch_size=args.batch_size, img_size=args.img_size,
                             channels_last=args.channels_last)
    with heads_convs(False):
        rows = switch_ab_rows(args.models, settings, split_parts, args.runs, labels=('one_conv', 'split'),
                              names=('one conv, sliced', 'two convs'))
    out = dict(command=['python', 'benchmarks/qkv_split.py'] + list(argv if argv is not None else sys.argv[1:]),
               environment=env, allocator=allocator_status(), mode=args.mode,
               channels_last=args.channels_last, batch_size=args.batch_size, img_size=args.img_size, dtype=args.dtype, rows=rows)
    write_report(args.json, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
