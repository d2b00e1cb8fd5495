"""The depthwise backward of ``polynext.ops.depthwise`` against autograd's, at a model's shapes.

For every distinct depthwise convolution of the model that polynext treats specially in training
(PolyConv's dilated coarse branch, PolyAttn's undilated 5x5 Q / K convolutions, and PolyConv's undilated 3x3
ones from 64 channels at 56x56, which ``depthwise_conv2d`` routes; the stage boundaries'
``StridedDepthwiseConv2d``) at the given input size and
batch, in one process, interleaved (order reversed every other round, medians):

  autograd   ``nn.Conv2d.forward`` and ``torch.autograd.grad`` (PyTorch's CPU backward, under autocast
             in PyTorch's dtype for it)
  no kernel  ``depthwise_conv2d(x, conv)`` with ``ops.cpu_kernels`` off (phase split on maps of 14x14 and
             larger, 5x5 kernels cut into 3- and 1-wide columns; crop of the taps that only meet padding and a
             per-tap weight gradient on smaller channels-last maps; undilated 3x3 layers: autograd's, as
             ``depthwise_conv2d`` routes them only for the kernel), or the strided layer's own forward
             (float32 inside autocast)
  polynext   the same with the kernels on: the weight gradient by ``polynext_dw_wgrad`` where it is built

forward + backward of the one layer, channels-last, in fp32 or under bf16 autocast (``--dtype bf16``, the
CPU training path with ``amp: bf16``); and the float64 agreement of both gradients. Prints a table and
writes JSON. Speed ratios depend on the CPU: the JSON names it.

    python benchmarks/depthwise_backward.py --json benchmarks/results/depthwise_backward.json
    python benchmarks/depthwise_backward.py apolynext_t apolynext_s --dtype bf16 --json r.json
    python benchmarks/depthwise_backward.py cpolynext_t --img-size 64 --init-channels 16   # ablation cells

Run it with the pinned allocator (the script re-runs itself with it, as ``polynext bench`` does).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn


def _special_layers(model: nn.Module, x: torch.Tensor):
    """(conv, input shape, polynext's function) of each distinct depthwise conv that polynext treats specially
    in training, in a forward of ``x`` (fusions off, so that every call goes through ``depthwise_conv2d``):
    those ``depthwise_conv2d`` routes (dilated, wider than 3, or 3x3 on maps of ``_MIN_NUMEL_3X3`` values) and the
    ``StridedDepthwiseConv2d`` layers."""
    import polynext.models.polynext as family
    from polynext.ops.depthwise import _MIN_NUMEL_3X3, StridedDepthwiseConv2d
    from polynext.ops.fused import fusion
    seen = {}
    real = family.depthwise_conv2d

    def record(inp, conv):
        if conv.dilation[0] > 1 or conv.kernel_size[0] > 3 or inp[0].numel() >= _MIN_NUMEL_3X3:
            seen.setdefault((tuple(inp.shape), conv.kernel_size, conv.dilation, 1), (conv, real))
        return real(inp, conv)

    def strided(conv, args):
        seen.setdefault((tuple(args[0].shape), conv.kernel_size, conv.dilation, conv.stride[0]),
                        (conv, lambda inp, c: c(inp)))
    hooks = [m.register_forward_pre_hook(strided) for m in model.modules() if isinstance(m, StridedDepthwiseConv2d)]
    family.depthwise_conv2d = record
    try:
        with torch.no_grad(), fusion(False):
            model(x)
    finally:
        family.depthwise_conv2d = real
        for hook in hooks:
            hook.remove()
    return [(conv, key[0], fn) for key, (conv, fn) in seen.items()]


def _step(fn, x, conv, g, dtype=None, kernels: bool = True):
    from polynext.ops.cpu_kernels import kernels as switch
    with switch(kernels):
        x = x.detach().requires_grad_()
        with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            y = fn(x, conv)
        return torch.autograd.grad(y, (x, conv.weight), g.to(y.dtype))


def main(argv=None) -> int:
    from polynext.ops.depthwise import depthwise_conv2d
    from polynext.bench import environment, write_report
    import timm
    import polynext  # noqa: F401  (registers the models)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='*', default=['cpolynext_t', 'cpolynext_s'])
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--init-channels', type=int, default=None, help='base width (default: the model\'s)')
    parser.add_argument('--runs', type=int, default=9)
    parser.add_argument('--dtype', choices=('fp32', 'bf16'), default='fp32',
                        help='fp32, or bf16 autocast with fp32 weights as CPU training runs it')
    parser.add_argument('--json', default=None, metavar='PATH')
    args = parser.parse_args(argv)
    if argv is None:
        from polynext.bench import ensure_pinned_allocator
        ensure_pinned_allocator('depthwise_backward.py', announce=lambda m: print(m.split(' (')[0], file=sys.stderr))
    autocast = torch.bfloat16 if args.dtype == 'bf16' else None
    if args.json and Path(args.json).is_dir():
        parser.error(f'--json {args.json} is a folder; give a file path such as {args.json}/depthwise.json')

    def autograd(x, conv):
        return nn.Conv2d.forward(conv, x)

    rows = []
    for name in args.models:
        kw = {} if args.init_channels is None else dict(init_channels=args.init_channels)
        model = timm.create_model(name, **kw).eval()
        x0 = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
        for conv, shape, ours in _special_layers(model, x0):
            conv = conv.float()
            x = torch.randn(shape).to(autocast or torch.float32).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                out_shape = autograd(x.float(), conv).shape
            g = torch.randn(out_shape).contiguous(memory_format=torch.channels_last)
            c64 = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                             padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=False).double()
            x64 = torch.randn(2, *shape[1:], dtype=torch.float64).contiguous(memory_format=torch.channels_last)
            g64 = torch.randn(2, *out_shape[1:], dtype=torch.float64).contiguous(memory_format=torch.channels_last)
            err = max((a - b).abs().max().item() for a, b in zip(_step(ours, x64, c64, g64),
                                                                  _step(autograd, x64, c64, g64)))
            times = {'autograd': [], 'no kernel': [], 'polynext': []}
            fns = [('autograd', autograd, True), ('no kernel', ours, False), ('polynext', ours, True)]
            for fn_name, fn, on in fns:
                _step(fn, x, conv, g, autocast, on)     # warm-up
            for r in range(args.runs):
                for fn_name, fn, on in (fns if r % 2 == 0 else fns[::-1]):
                    t = time.perf_counter()
                    _step(fn, x, conv, g, autocast, on)
                    times[fn_name].append(time.perf_counter() - t)
            a, n, p = (statistics.median(times[key]) * 1e3 for key in ('autograd', 'no kernel', 'polynext'))
            rows.append(dict(model=name, shape=list(shape), kernel=conv.kernel_size[0], dilation=conv.dilation[0],
                             stride=conv.stride[0], dtype=args.dtype,
                             autograd_ms=round(a, 3), no_kernel_ms=round(n, 3), polynext_ms=round(p, 3),
                             speedup=round(a / p, 2), speedup_vs_no_kernel=round(n / p, 2), max_abs_diff_fp64=err))
            print(f'{name:12s} {str(list(shape)):20s} k{conv.kernel_size[0]} d{conv.dilation[0]} s{conv.stride[0]}  '
                  f'autograd {a:8.2f} ms  no kernel {n:8.2f} ms  polynext {p:8.2f} ms  x{a / p:5.2f}  '
                  f'x{n / p:5.2f} no kernel  fp64 diff {err:.1e}', flush=True)
    out = dict(command=['python', 'benchmarks/depthwise_backward.py'] + list(argv if argv is not None else sys.argv[1:]),
               environment=environment(torch.device('cpu')), batch_size=args.batch_size, img_size=args.img_size,
               init_channels=args.init_channels, dtype=args.dtype, rows=rows)
    write_report(args.json, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
