"""Out-of-distribution robustness of ImageNet-1k classifiers: ImageNet-C (mCE), ImageNet-A,
ImageNet-R, ImageNet-Sketch (and clean val), with the protocols of the PolyNeXt paper.

Give any subset of the datasets and one or several models (polynext's or any timm model with
1000 classes); several models are compared side by side and read each image once. Every
finished cell (an ImageNet-C corruption/severity folder, or a whole dataset) is saved in
OUTPUT/state.json at once: run the same command again after an interruption and it continues
where it stopped.

Weights (--checkpoint, one per --model, in order): a file (polynext .safetensors, the authors'
.pt, sail-sg .pth, a timm / Hugging Face model.safetensors or pytorch_model.bin), or the word
'pretrained' for timm's pretrained weights of that name (Hugging Face cache or download).

Examples:
  polynext robustness --model cpolynext_s --checkpoint cpolynext_s.pt \\
      --imagenet-c /data/imagenet-c --imagenet-a /data/imagenet-a --imagenet-r /data/imagenet-r \\
      --sketch /data/imagenet-sketch --val /data/imagenet/val
  polynext robustness --model apolynext_s caformer_s18 --checkpoint apolynext_s.pt caformer_s18.pth \\
      --imagenet-a /data/imagenet-a --imagenet-r /data/imagenet-r
  polynext robustness --model resnet50.a1_in1k --checkpoint pretrained --imagenet-c /data/imagenet-c --allow-partial
  torchrun --nproc_per_node=8 -m polynext robustness --model cpolynext_b --checkpoint cpolynext_b.pt --imagenet-c DIR

Writes OUTPUT/robustness.json, OUTPUT/summary.csv, OUTPUT/imagenet_c.csv (OUTPUT defaults to ./robustness).
"""
from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', nargs='+', required=True, metavar='NAME',
                        help='model names (polynext or timm; a timm tag like resnet50.a1_in1k selects weights)')
    parser.add_argument('--checkpoint', nargs='+', default=None, metavar='PATH',
                        help="one per model: a weights file, or 'pretrained' for timm's pretrained weights")
    data = parser.add_argument_group('datasets (any subset)')
    data.add_argument('--imagenet-c', default=None, metavar='DIR', help='DIR/<corruption>/<severity 1-5>/<wnid>/<image>')
    data.add_argument('--imagenet-a', default=None, metavar='DIR', help='DIR/<wnid>/<image> (200 classes)')
    data.add_argument('--imagenet-r', default=None, metavar='DIR', help='DIR/<wnid>/<image> (200 classes)')
    data.add_argument('--sketch', default=None, metavar='DIR', help='DIR/<wnid>/<image> (1000 classes)')
    data.add_argument('--val', default=None, metavar='DIR',
                      help='ImageNet-1k val in class folders, DIR/<wnid>/<image>: clean top-1 (and the relative mCE)')
    parser.add_argument('--output', default='robustness', metavar='DIR',
                        help='results and resume state (default: ./robustness)')
    parser.add_argument('--allow-partial', action='store_true',
                        help='evaluate an ImageNet-C copy with missing corruptions / severities (reported as partial)')
    parser.add_argument('--relative-mce', action='store_true',
                        help='also report the relative mCE (needs --val for the clean error)')
    parser.add_argument('--allow-random-weights', action='store_true',
                        help='evaluate models without --checkpoint at their random initialisation (smoke tests)')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1), help='data loading processes')
    parser.add_argument('--device', default='auto', help='auto | cpu | cuda')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')


def _labels(names, checkpoints):
    """Model labels: the name, or name@checkpoint-stem where a name repeats."""
    counts = Counter(names)
    labels = []
    for i, name in enumerate(names):
        label = name
        if counts[name] > 1:
            ckpt = checkpoints[i] if checkpoints else None
            label = f'{name}@{Path(ckpt).stem}' if ckpt else f'{name}#{i + 1}'
        labels.append(label)
    if len(set(labels)) != len(labels):
        labels = [f'{lab}#{i + 1}' for i, lab in enumerate(labels)]
    return labels


def run(args: argparse.Namespace) -> int:
    from ..engine.distributed import cleanup_distributed, init_distributed
    from ..engine.memory import is_oom_error
    from ..engine.memory import OutOfMemory
    from ..errors import ConfigError
    from ..factory import check_model_name
    from ..robustness.models import model_entry
    from ..robustness.report import format_report, write_report
    from ..robustness.runner import RobustnessData, plan_cells, run_robustness

    if args.checkpoint is not None and len(args.checkpoint) != len(args.model):
        raise ConfigError(f'{len(args.model)} model(s) but {len(args.checkpoint)} checkpoint(s): give one --checkpoint '
                          f'per --model, in the same order')
    if args.batch_size < 1:
        raise ConfigError(f'--batch-size must be at least 1, got {args.batch_size}')
    data = RobustnessData(val=args.val, imagenet_c=args.imagenet_c, imagenet_a=args.imagenet_a,
                          imagenet_r=args.imagenet_r, sketch=args.sketch)
    from ..outputs import check_output_folder
    for name in args.model:                                   # cheap checks first: names, output, then folders
        check_model_name(name)
    check_output_folder(args.output)
    plan_cells(data, allow_partial=args.allow_partial)        # bad folders fail before any model is built
    checkpoints = args.checkpoint or [None] * len(args.model)
    labels = _labels(args.model, args.checkpoint)
    entries = [model_entry(name, ckpt, allow_random=args.allow_random_weights, label=label)
               for name, ckpt, label in zip(args.model, checkpoints, labels)]

    env = init_distributed(args.device)
    try:
        report = run_robustness(entries, data, Path(args.output), allow_partial=args.allow_partial,
                                relative_mce=args.relative_mce, batch_size=args.batch_size, workers=args.workers,
                                device=env.device, show_progress=not args.no_progress)
    except Exception as e:  # noqa: BLE001 - out-of-memory becomes one message with the fix
        if not is_oom_error(e):
            raise
        raise OutOfMemory(f'out of memory with --batch-size {args.batch_size} ({len(entries)} model(s) per batch); '
                          f'the finished cells are saved in {args.output}: rerun with --batch-size '
                          f'{max(1, args.batch_size // 2)} to continue') from None
    finally:
        cleanup_distributed()
    if not env.is_main:
        return 0
    files = write_report(report, Path(args.output))
    print()
    print(format_report(report))
    print('\nwrote ' + ', '.join(str(f) for f in files))
    return 0
