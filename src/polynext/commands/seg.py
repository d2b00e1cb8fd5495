"""Semantic segmentation with UperNet on any polynext / timm backbone: train, evaluate, count cost.

  polynext seg train                       # demo: generated shapes, CPolyNeXt-T, a few minutes on CPU
  polynext seg train --recipe upernet_cpolynext_s --data /data/ADEChallengeData2016 \\
                     --initial-checkpoint cpolynext_s.pt
  torchrun --nproc_per_node=2 -m polynext seg train --recipe upernet_apolynext_s --data DIR \\
                     --initial-checkpoint apolynext_s.pt --device-batch-size 8
  polynext seg train --resume runs/upernet_cpolynext_s      # (re-running the same command also resumes)
  polynext seg train --recipe upernet_cpolynext_s --data DIR --backbone convnext_tiny --set extra_norms=false
  polynext seg train --list-recipes | --recipe NAME --show-config
  polynext seg eval --checkpoint runs/upernet_cpolynext_s/best.safetensors --data DIR [--mode whole]
  polynext seg cost                        # params / MACs at 512x2048 of the paper's four segmentors
  polynext seg cost --backbone convnext_tiny --size 512 512

Training overrides apply in this order: recipe < --config FILE.yaml < flags < --set key=value.
"""
from __future__ import annotations

import argparse

#: command-line flag → SegConfig field
_TRAIN_FLAGS = {
    'backbone': 'backbone', 'data': 'data', 'output': 'output', 'iters': 'iters', 'batch_size': 'batch_size',
    'device_batch_size': 'device_batch_size', 'lr': 'lr', 'workers': 'workers',
    'initial_checkpoint': 'initial_checkpoint', 'device': 'device', 'checkpoint_every': 'checkpoint_every',
    'eval_every': 'eval_every', 'seed': 'seed', 'threads': 'threads', 'compile': 'compile',
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .common import add_run_arguments
    sub = parser.add_subparsers(dest='action', metavar='ACTION')
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser('train', help='train an UperNet segmentor (recipe presets, ADE20K or the generated demo)',
                       formatter_class=fmt, description=__doc__)
    add_run_arguments(t, 'the generated-shapes demo')
    t.add_argument('--data', default=None, metavar='DIR', help='the ADEChallengeData2016 folder')
    t.add_argument('--backbone', default=None, help='any timm / polynext model with strides 4/8/16/32')
    t.add_argument('--initial-checkpoint', default=None, metavar='PATH',
                   help='classification weights for the backbone (polynext, authors\' .pt, timm, sail-sg)')
    t.add_argument('--output', default=None, metavar='DIR', help='run folder (default: runs/RECIPE)')
    t.add_argument('--iters', type=int, default=None, help='training iterations (optimizer steps)')
    t.add_argument('--batch-size', type=int, default=None, help='effective batch (per device × devices × accumulation)')
    t.add_argument('--device-batch-size', type=int, default=None, help='crops per device per micro-batch')
    t.add_argument('--lr', type=float, default=None)
    t.add_argument('--workers', type=int, default=None, help='data-loading processes per device')
    t.add_argument('--device', default=None, help='auto | cpu | cuda')
    t.add_argument('--threads', type=int, default=None, help='CPU threads of torch per process (0: default)')
    t.add_argument('--checkpoint-every', type=int, default=None, metavar='ITERS', help='resumable checkpoint interval')
    t.add_argument('--eval-every', type=int, default=None, metavar='ITERS', help='evaluation / best-checkpoint interval')
    t.add_argument('--seed', type=int, default=None)
    t.add_argument('--compile', action='store_true', default=None, help='torch.compile the backbone')

    e = sub.add_parser('eval', help='mIoU / mAcc / aAcc (+ per-class IoU) of a trained segmentor',
                       formatter_class=fmt)
    e.add_argument('--checkpoint', required=True, metavar='PATH',
                   help='a run folder, *.safetensors written by `seg train`, or a *.state.pt')
    e.add_argument('--data', default=None, metavar='DIR',
                   help='the ADEChallengeData2016 folder (default: the dataset the model was trained on)')
    e.add_argument('--split', default='val', choices=['val', 'train'])
    e.add_argument('--mode', default=None, choices=['slide', 'whole'], help='inference mode (default: training\'s)')
    e.add_argument('--crop', type=int, default=None, help='sliding window size')
    e.add_argument('--stride', type=int, default=None, help='sliding window stride')
    e.add_argument('--window-batch', type=int, default=4, help='sliding windows per forward')
    e.add_argument('--device', default='auto')
    e.add_argument('--workers', type=int, default=4)
    e.add_argument('--limit', type=int, default=None, metavar='N', help='only the first N images')
    e.add_argument('--per-class', action='store_true', help='print the per-class table')
    e.add_argument('--json', default=None, metavar='FILE', help='write the metrics (with per-class IoU) as JSON')
    e.add_argument('--no-progress', action='store_true')

    c = sub.add_parser('cost', help='parameters and MACs of UperNet segmentors (default: the paper\'s four at 512x2048)',
                       formatter_class=fmt)
    c.add_argument('--backbone', action='append', default=[], help='backbone name (repeatable)')
    c.add_argument('--recipe', action='append', default=[], help='segmentation recipe name (repeatable)')
    c.add_argument('--size', type=int, nargs=2, default=(512, 2048), metavar=('H', 'W'))
    c.add_argument('--num-classes', type=int, default=150)
    c.add_argument('--json', default=None, metavar='FILE', help='also write the table as JSON')


def _train(args: argparse.Namespace) -> int:
    from ..seg import SEG_PRESETS, train_segmentation
    from .common import run_recipe
    return run_recipe(args, SEG_PRESETS, train_segmentation, _TRAIN_FLAGS)


def _write_json(path: str, data) -> None:
    from ..checkpoint import atomic_write_json
    atomic_write_json(path, data)


def _eval(args: argparse.Namespace) -> int:
    from ..outputs import check_output_file
    from ..seg import evaluate_checkpoint
    from ..seg.metrics import format_per_class
    if args.json:
        check_output_file(args.json, '--json')
    res = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, mode=args.mode, crop=args.crop,
                              stride=args.stride, window_batch=args.window_batch, device=args.device,
                              workers=args.workers, limit=args.limit, show_progress=not args.no_progress)
    if res.is_main:
        if args.per_class:
            print(format_per_class(res.metrics))
        print(res.summary())
        if args.json:
            _write_json(args.json, res.as_dict())
    return 0


def _cost(args: argparse.Namespace) -> int:
    from ..outputs import check_output_file
    from ..seg import PAPER_COST, format_costs, segmentor_costs
    if args.json:
        check_output_file(args.json, '--json')
    recipes = list(args.recipe) or ([] if args.backbone else list(PAPER_COST))
    rows = segmentor_costs(list(args.backbone), recipes, tuple(args.size), args.num_classes, progress=True)
    print(format_costs(rows))
    if args.json:
        _write_json(args.json, rows)
    return 0


def run(args: argparse.Namespace) -> int:
    return {'train': _train, 'eval': _eval, 'cost': _cost}[args.action](args)
