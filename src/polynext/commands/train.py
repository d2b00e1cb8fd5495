"""Train a classifier: the papers' recipes as named presets, or your own data the same way.

With no arguments, trains a small CPolyNeXt-LR on scikit-learn's bundled handwritten digits
(no download; a few minutes on 2 CPU cores) and writes runs/cpolynext_lr_digits/.

Examples:
  polynext train                                            # the built-in demo
  polynext train --recipe cpolynext_s --data /data/imagenet # the paper's CPolyNeXt-S recipe
  torchrun --nproc_per_node=8 -m polynext train --recipe apolynext_t --data /data/imagenet
  polynext train --recipe cpolynext_lr_cifar10 --data ./cifar --download
  polynext train --model cpolynext_t --data ./my_images --epochs 50 --set lr=1e-3 --set ema=false
  polynext train --recipe cpolynext_t --data DIR --usual wd_exclusions     # the usual practice instead of a quirk
  polynext train --resume runs/cpolynext_s/last.state.pt    # (re-running the same command also resumes)
  polynext train --recipe cpolynext_fhe_digits --fhe-levels 21   # deepest bn model for 21 CKKS levels
  polynext train --list-recipes
  polynext train --recipe cpolynext_s --show-config

Overrides apply in this order: recipe < --config FILE.yaml < --usual < flags < --set key=value.
"""
from __future__ import annotations

import argparse

#: command-line flag → config field
_FLAGS = {
    'model': 'model', 'data': 'data', 'dataset': 'dataset', 'download': 'download', 'output': 'output',
    'epochs': 'epochs', 'batch_size': 'batch_size', 'device_batch_size': 'device_batch_size', 'lr': 'lr',
    'workers': 'workers', 'initial_checkpoint': 'initial_checkpoint', 'device': 'device',
    'checkpoint_every': 'checkpoint_every', 'seed': 'seed', 'compile': 'compile', 'fhe_levels': 'fhe_levels',
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .common import add_run_arguments
    add_run_arguments(parser, 'the digits demo')
    parser.add_argument('--model', default=None, help='model name (a recipe of the same name is used if one exists)')
    parser.add_argument('--data', default=None, metavar='DIR', help='dataset folder (folder: DIR/train, DIR/val)')
    parser.add_argument('--dataset', default=None, choices=['folder', 'digits', 'cifar10', 'svhn', 'tiny_imagenet'],
                        help='kind of dataset (default: the recipe\'s)')
    parser.add_argument('--download', action='store_true', default=None,
                        help='let torchvision download cifar10 / svhn / tiny_imagenet into --data')
    parser.add_argument('--output', default=None, metavar='DIR', help='run folder (default: runs/RECIPE)')
    parser.add_argument('--epochs', type=int, default=None)
    parser.add_argument('--batch-size', type=int, default=None,
                        help='effective batch (per-device batch × devices × accumulation)')
    parser.add_argument('--device-batch-size', type=int, default=None,
                        help='images per device per micro-batch; accumulation makes up the effective batch')
    parser.add_argument('--lr', type=float, default=None)
    parser.add_argument('--workers', type=int, default=None, help='data-loading processes per device')
    parser.add_argument('--initial-checkpoint', default=None, metavar='PATH', help='weights to fine-tune from')
    parser.add_argument('--device', default=None, help='auto | cpu | cuda')
    parser.add_argument('--checkpoint-every', type=int, default=None, metavar='STEPS',
                        help='also checkpoint every STEPS optimizer steps (mid-epoch)')
    parser.add_argument('--seed', type=int, default=None)
    parser.add_argument('--compile', action='store_true', default=None, help='torch.compile the model')
    parser.add_argument('--fhe-levels', type=int, default=None, metavar='N',
                        help='CKKS level budget: build the deepest fully polynomial (bn) PolyNeXt whose folded HE '
                             'program fits N levels (cells per stage), checked before training')
    parser.add_argument('--usual', action='append', default=[], metavar='FLAG',
                        help='use the usual practice instead of a reference quirk: wd_exclusions, ema_from_start, '
                             'no_cooldown, or all')


def run(args: argparse.Namespace) -> int:
    from ..train import PRESETS, train
    from .common import run_recipe
    return run_recipe(args, PRESETS, train, _FLAGS)
