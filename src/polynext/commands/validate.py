"""Evaluate a checkpoint: top-1, top-5 and per-class accuracy on a dataset.

Takes polynext checkpoints (``*.safetensors`` from a run folder, whose metadata names the model,
its arguments, its classes and its eval transform; ``*.state.pt`` training states, EMA
preferred), the authors' PolyNeXt ``.pt`` files and sail-sg MetaFormer ``.pth`` files. Loading
is strict. The transform is the reference's (resize 232, centre crop 224, bicubic; a
polynext checkpoint's own eval transform; the low-resolution models at native size, no crop)
or, with ``--transform timm``, the model's timm ``pretrained_cfg`` (input size, crop_pct,
interpolation, mean / std).

With ``--runtime onnxruntime`` (implied by an ``.onnx`` checkpoint) an ONNX file written by
``polynext export`` is evaluated in ONNX Runtime with the same data, transform and metrics; its
metadata supplies the architecture, classes and eval transform.

Examples:
  polynext validate --checkpoint runs/cpolynext_lr_digits/best.safetensors --dataset digits
  polynext validate --runtime onnxruntime --checkpoint cpolynext_s.onnx --data /data/imagenet
  polynext validate --model cpolynext_s --checkpoint cpolynext_s.pt --data /data/imagenet
  polynext validate --model cpolynext_lr --checkpoint cpolynext_lr_cifar10.pt --dataset cifar10 --data ./cifar
  torchrun --nproc_per_node=4 -m polynext validate --model apolynext_t --checkpoint apolynext_t.pt --data DIR

Writes OUTPUT/validate.json and OUTPUT/per_class.csv (OUTPUT defaults to validate-MODEL).
"""
from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..train.recipes import DATASETS
    parser.add_argument('--checkpoint', required=True, metavar='PATH',
                        help='weights: polynext .safetensors / .state.pt, authors\' .pt / .pth')
    parser.add_argument('--model', default=None, help='model name (read from a polynext checkpoint if omitted)')
    parser.add_argument('--data', default=None, metavar='DIR',
                        help='dataset folder (folder: DIR/val/<class>/*, or DIR/<class>/*)')
    parser.add_argument('--dataset', default='folder', choices=DATASETS,
                        help='kind of dataset (default: folder)')
    parser.add_argument('--split', default='val', help='sub-folder of --data to evaluate (folder datasets)')
    parser.add_argument('--download', action='store_true', help='let torchvision download cifar10 / svhn')
    parser.add_argument('--transform', default='reference', choices=['reference', 'timm'],
                        help="reference: the recipe's eval transform (232 → 224 bicubic for ImageNet); "
                             "timm: the model's pretrained_cfg")
    parser.add_argument('--img-size', type=int, default=None, help='evaluate at this crop size (reference transform)')
    parser.add_argument('--no-ema', action='store_true', help='take the raw weights even if an EMA entry exists')
    parser.add_argument('--batch-size', type=int, default=100)
    parser.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument('--device', default='auto', help='auto | cpu | cuda')
    parser.add_argument('--output', default=None, metavar='DIR', help='where to write validate.json and per_class.csv')
    parser.add_argument('--json', action='store_true', help='print the result as JSON instead of a table')
    parser.add_argument('--no-progress', action='store_true')
    parser.add_argument('--model-kwargs', default=None, metavar='YAML',
                        help="extra model arguments, e.g. '{init_channels: 16}'")
    parser.add_argument('--runtime', default='torch', choices=['torch', 'onnxruntime'],
                        help='torch (default), or onnxruntime: --checkpoint is an .onnx file from polynext export, '
                             'evaluated with the same data, transform and metrics')
    parser.add_argument('--dtype', default='fp32', choices=['fp32', 'bf16'],
                        help='bf16: run under bf16 autocast and report its agreement with fp32 (max |Δ logit|, '
                             'argmax agreement)')


def run(args: argparse.Namespace) -> int:
    import yaml
    from ..errors import ConfigError
    from ..train.validate import validate_checkpoint
    extra = None
    if args.model_kwargs:
        extra = yaml.safe_load(args.model_kwargs)
        if not isinstance(extra, dict):
            raise ConfigError(f"--model-kwargs must be a mapping like '{{init_channels: 16}}', got {args.model_kwargs!r}")
    res = validate_checkpoint(args.checkpoint, data=args.data, dataset=args.dataset, split=args.split,
                              model=args.model, model_kwargs=extra, transform=args.transform, img_size=args.img_size,
                              prefer_ema=not args.no_ema, batch_size=args.batch_size, workers=args.workers,
                              device=args.device, download=args.download, output=args.output,
                              show_progress=not args.no_progress, runtime=args.runtime, dtype=args.dtype)
    if not res.is_main:
        return 0
    if args.json:
        print(json.dumps(res.result, indent=1))
        return 0
    width = max(len(k) for k in res.result)
    for k, v in res.result.items():
        print(f'{k:<{width}}  {v}')
    worst = sorted((r for r in res.per_class if r['images']), key=lambda r: r['top1'])[:5]
    if len(res.per_class) > 1 and worst:
        print('lowest per-class top-1: ' + ', '.join(f"{r['cls']} {r['top1']:.1f}%" for r in worst))
    print(f'wrote {res.files[0]} and {res.files[1]}')
    return 0
