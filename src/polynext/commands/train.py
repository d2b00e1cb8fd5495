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
  polynext train --list-recipes
  polynext train --recipe cpolynext_s --show-config

Overrides apply in this order: recipe < --config FILE.yaml < --usual < flags < --set key=value.
"""
from __future__ import annotations

import argparse
import os
import sys

#: command-line flag → config field
_FLAGS = {
    'model': 'model', 'data': 'data', 'dataset': 'dataset', 'output': 'output', 'epochs': 'epochs',
    'batch_size': 'batch_size', 'device_batch_size': 'device_batch_size', 'lr': 'lr', 'workers': 'workers',
    'initial_checkpoint': 'initial_checkpoint', 'device': 'device', 'checkpoint_every': 'checkpoint_every',
    'seed': 'seed',
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..train.recipes import DATASETS
    parser.add_argument('--recipe', default=None, help='named preset (default: the digits demo; see --list-recipes)')
    parser.add_argument('--config', default=None, metavar='FILE.yaml',
                        help='YAML file of config keys (a run folder\'s config.yaml repeats that run)')
    parser.add_argument('--model', default=None, help='model name (a recipe of the same name is used if one exists)')
    parser.add_argument('--data', default=None, metavar='DIR', help='dataset folder (folder: DIR/train, DIR/val)')
    parser.add_argument('--dataset', default=None, choices=DATASETS,
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
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='override any config key (repeatable), e.g. --set ema_start_epoch=0')
    parser.add_argument('--usual', action='append', default=[], metavar='FLAG',
                        help='use the usual practice instead of a reference quirk: wd_exclusions, ema_from_start, '
                             'no_cooldown, or all')
    parser.add_argument('--resume', default=None, metavar='PATH',
                        help='resume from a *.state.pt file or a run folder')
    parser.add_argument('--fresh', action='store_true', help='start over even if the run folder holds a checkpoint')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    parser.add_argument('--list-recipes', action='store_true', help='list the named recipes and exit')
    parser.add_argument('--show-config', action='store_true', help='print the resolved config (YAML) and exit')


def _list_recipes() -> None:
    from ..train.recipes import PRESETS
    width = max(len(n) for n in PRESETS)
    print(f'{"recipe":<{width}}  {"model":<18} {"opt":<5} {"lr":>7} {"epochs":>6} {"batch":>5}  source')
    for name, p in PRESETS.items():
        c = p.config
        ep = f'{c.epochs}+{c.cooldown_epochs}' if c.cooldown_epochs else str(c.epochs)
        print(f'{name:<{width}}  {c.model:<18} {c.optimizer:<5} {c.lr:>7g} {ep:>6} {c.batch_size:>5}  {p.source}')


def run(args: argparse.Namespace) -> int:
    from ..engine.config import config_to_dict, parse_set_args
    from ..errors import PolyNeXtError
    from ..train.recipes import resolve_config

    if args.list_recipes:
        _list_recipes()
        return 0
    flags = {field: getattr(args, flag) for flag, field in _FLAGS.items() if getattr(args, flag) is not None}
    if args.download:
        flags['download'] = True
    if args.compile:
        flags['compile'] = True
    name, cfg = resolve_config(args.recipe, args.config, flags, args.set, args.usual)
    if args.show_config:
        import yaml
        print(yaml.safe_dump(dict(recipe=name, **config_to_dict(cfg)), sort_keys=False, default_flow_style=None),
              end='')
        return 0
    explicit_keys = set(flags) | set(parse_set_args(args.set))
    explicit = {k: getattr(cfg, k) for k in explicit_keys}
    from ..train.trainer import train
    try:
        train(cfg, name, resume=args.resume, fresh=args.fresh, explicit=explicit,
              show_progress=not args.no_progress)
    except PolyNeXtError:
        if int(os.environ.get('RANK', '0')) != 0:   # under torchrun, rank 0 alone reports the error
            sys.exit(2)
        raise
    return 0
