"""Object detection and instance segmentation (Mask R-CNN, Cascade Mask R-CNN) on any polynext / timm backbone.

  polynext det train                       # demo: generated shapes, CPolyNeXt-T, a few minutes on CPU
  polynext det train --recipe maskrcnn_convformer_s18_3x --data /data/coco --initial-checkpoint convformer_s18.pth
  torchrun --nproc_per_node=8 -m polynext det train --recipe cascade_caformer_s18_3x --data /data/coco \\
                     --initial-checkpoint caformer_s18.pth
  polynext det train --resume runs/maskrcnn_convformer_s18_3x   # (re-running the same command also resumes)
  polynext det train --list-recipes | --recipe NAME --show-config
  polynext det eval --checkpoint runs/maskrcnn_convformer_s18_3x --data /data/coco --output eval/
  polynext det eval --results eval/results_bbox.json eval/results_segm.json --data /data/coco
  polynext det cost                        # params / MACs of Table 9's four detectors
  polynext det cost --backbone apolynext_s --backbone convnext_tiny --detector cascade_mask_rcnn

Training overrides apply in this order: recipe < --config FILE.yaml < flags < --set key=value.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

#: command-line flag → DetConfig field
_TRAIN_FLAGS = {
    'backbone': 'backbone', 'detector': 'kind', 'data': 'data', 'output': 'output', 'epochs': 'epochs',
    'batch_size': 'batch_size', 'device_batch_size': 'device_batch_size', 'lr': 'lr', 'workers': 'workers',
    'initial_checkpoint': 'initial_checkpoint', 'device': 'device', 'checkpoint_every': 'checkpoint_every',
    'eval_every': 'eval_every', 'seed': 'seed', 'threads': 'threads', 'compile': 'compile',
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .common import add_run_arguments
    sub = parser.add_subparsers(dest='action', metavar='ACTION')
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser('train', help='train a detector (recipe presets, COCO or the generated demo)',
                       formatter_class=fmt, description=__doc__)
    add_run_arguments(t, 'the generated-shapes demo')
    t.add_argument('--data', default=None, metavar='DIR', help='the COCO folder (annotations/, train2017/, val2017/)')
    t.add_argument('--backbone', default=None, help='any timm / polynext model with strides 4/8/16/32')
    t.add_argument('--detector', default=None, choices=['mask_rcnn', 'cascade_mask_rcnn'])
    t.add_argument('--initial-checkpoint', default=None, metavar='PATH',
                   help="classification weights for the backbone (polynext, authors' .pt, timm, sail-sg)")
    t.add_argument('--output', default=None, metavar='DIR', help='run folder (default: runs/RECIPE)')
    t.add_argument('--epochs', type=int, default=None)
    t.add_argument('--batch-size', type=int, default=None, help='effective batch (per device × devices × accumulation)')
    t.add_argument('--device-batch-size', type=int, default=None, help='images per device per micro-batch')
    t.add_argument('--lr', type=float, default=None)
    t.add_argument('--workers', type=int, default=None, help='data-loading processes per device')
    t.add_argument('--device', default=None, help='auto | cpu | cuda')
    t.add_argument('--threads', type=int, default=None, help='CPU threads of torch per process (0: default)')
    t.add_argument('--checkpoint-every', type=int, default=None, metavar='ITERS', help='resumable checkpoint interval')
    t.add_argument('--eval-every', type=int, default=None, metavar='EPOCHS', help='evaluation / best-checkpoint interval')
    t.add_argument('--seed', type=int, default=None)
    t.add_argument('--compile', action='store_true', default=None, help='torch.compile the backbone')

    e = sub.add_parser('eval', help='box and mask AP (pycocotools) of a trained detector or of results files',
                       formatter_class=fmt)
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument('--checkpoint', metavar='PATH', help='a run folder, *.safetensors or *.state.pt of det train')
    src.add_argument('--results', nargs='+', metavar='FILE', help='results JSON files (official COCO format)')
    e.add_argument('--data', default=None, metavar='DIR', help='the COCO folder (default: the training data)')
    e.add_argument('--dataset', default='coco', choices=['coco', 'shapes'], help='with --results: the ground truth')
    e.add_argument('--output', default=None, metavar='DIR', help='write results_{bbox,segm}.json and metrics.json')
    e.add_argument('--device', default='auto')
    e.add_argument('--workers', type=int, default=4)
    e.add_argument('--limit', type=int, default=None, metavar='N', help='only the first N images')
    e.add_argument('--json', default=None, metavar='FILE', help='write the metrics as JSON')
    e.add_argument('--no-progress', action='store_true')

    c = sub.add_parser('cost', help="parameters and MACs of detectors (default: Table 9's four)", formatter_class=fmt)
    c.add_argument('--recipe', action='append', default=[], help='detection recipe name (repeatable)')
    c.add_argument('--backbone', action='append', default=[], help='backbone name (repeatable)')
    c.add_argument('--detector', action='append', default=[], choices=['mask_rcnn', 'cascade_mask_rcnn'],
                   help='with --backbone: the detector(s) (default: both)')
    c.add_argument('--size', type=int, nargs=2, action='append', default=[], metavar=('H', 'W'),
                   help='input size (repeatable; default: 800 1333 and 1280 800)')
    c.add_argument('--num-classes', type=int, default=80)
    c.add_argument('--json', default=None, metavar='FILE', help='also write the table as JSON')


def _train(args: argparse.Namespace) -> int:
    from ..det.recipes import DET_PRESETS
    from ..det.trainer import train_detection
    from .common import run_recipe
    return run_recipe(args, DET_PRESETS, train_detection, _TRAIN_FLAGS)


def _eval(args: argparse.Namespace) -> int:
    from ..det.evaluation import evaluate_checkpoint, score_results
    if args.results:
        res = score_results(args.results, data=args.data, dataset=args.dataset, output=args.output)
    else:
        res = evaluate_checkpoint(args.checkpoint, data=args.data, device=args.device, workers=args.workers,
                                  limit=args.limit, output=args.output, show_progress=not args.no_progress)
    if res.is_main:
        print(res.summary())
        for p in res.written:
            print(f'wrote {p}')
        if args.json:
            from ..checkpoint import atomic_write
            text = json.dumps(res.as_dict(), indent=1) + '\n'
            atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
    return 0


def _cost(args: argparse.Namespace) -> int:
    from ..det.cost import COST_SIZES, PAPER_TABLE9, detector_costs, format_costs
    recipes = list(args.recipe) or ([] if args.backbone else list(PAPER_TABLE9))
    kinds = list(args.detector) or ['mask_rcnn', 'cascade_mask_rcnn']
    sizes = [tuple(s) for s in args.size] or list(COST_SIZES)
    rows = detector_costs(recipes, list(args.backbone), kinds, sizes, args.num_classes, progress=True)
    print(format_costs(rows))
    if args.json:
        from ..checkpoint import atomic_write
        text = json.dumps(rows, indent=1) + '\n'
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
    return 0


def run(args: argparse.Namespace) -> int:
    return {'train': _train, 'eval': _eval, 'cost': _cost}[args.action](args)
