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
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

#: command-line flag → SegConfig field
_TRAIN_FLAGS = {
    'backbone': 'backbone', 'data': 'data', 'output': 'output', 'iters': 'iters', 'batch_size': 'batch_size',
    'device_batch_size': 'device_batch_size', 'lr': 'lr', 'workers': 'workers',
    'initial_checkpoint': 'initial_checkpoint', 'device': 'device', 'checkpoint_every': 'checkpoint_every',
    'eval_every': 'eval_every', 'seed': 'seed', 'threads': 'threads',
}

#: the paper's UperNet rows (PolyNeXt Table: ADE20K; MetaFormer Table 10), at 512x2048
PAPER_COST = {
    'upernet_cpolynext_s': (54, 942), 'upernet_apolynext_s': (55, 1121),
    'upernet_convformer_s18': (54, 925), 'upernet_caformer_s18': (54, 1024),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='action', metavar='ACTION')
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser('train', help='train an UperNet segmentor (recipe presets, ADE20K or the generated demo)',
                       formatter_class=fmt, description=__doc__)
    t.add_argument('--recipe', default=None, help='named preset (default: the generated-shapes demo)')
    t.add_argument('--config', default=None, metavar='FILE.yaml', help="YAML of config keys (a run's config.yaml)")
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
    t.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='override any config key (repeatable), e.g. --set decay_backbone_norms=false')
    t.add_argument('--resume', default=None, metavar='PATH', help='resume from a *.state.pt file or a run folder')
    t.add_argument('--fresh', action='store_true', help='start over even if the run folder holds a checkpoint')
    t.add_argument('--no-progress', action='store_true', help='no progress bars')
    t.add_argument('--list-recipes', action='store_true', help='list the named recipes and exit')
    t.add_argument('--show-config', action='store_true', help='print the resolved config (YAML) and exit')

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


# ------------------------------------------------------------------------------------------
def _list_recipes() -> None:
    from ..seg.recipes import SEG_PRESETS
    width = max(len(n) for n in SEG_PRESETS)
    print(f'{"recipe":<{width}}  {"backbone":<15} {"data":<7} {"iters":>6} {"batch":>5} {"lr":>7}  source')
    for name, p in SEG_PRESETS.items():
        c = p.config
        print(f'{name:<{width}}  {c.backbone:<15} {c.dataset:<7} {c.iters:>6} {c.batch_size:>5} {c.lr:>7g}  {p.source}')


def _train(args: argparse.Namespace) -> int:
    from ..engine.config import config_to_dict, parse_set_args
    from ..errors import ConfigError, PolyNeXtError
    from ..seg.recipes import resolve_seg_config
    if args.list_recipes:
        _list_recipes()
        return 0
    flags = {field: getattr(args, flag) for flag, field in _TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    if args.compile:
        flags['compile'] = True
    try:
        if args.resume:   # the run's own config is the base; the recipe's data check does not apply
            from ..seg.recipes import SegConfig
            from ..engine.config import apply_overrides
            name, cfg = args.recipe or '', apply_overrides(SegConfig(), {**flags, **parse_set_args(args.set)}, '--set')
        else:
            name, cfg = resolve_seg_config(args.recipe, args.config, flags, args.set)
    except ConfigError as e:
        raise ConfigError(str(e).replace('`polynext train --show-config`', '`polynext seg train --show-config`')) \
            from None
    if args.show_config:
        import yaml
        print(yaml.safe_dump(dict(recipe=name, **config_to_dict(cfg)), sort_keys=False, default_flow_style=None),
              end='')
        return 0
    if cfg.dataset == 'ade20k' and not cfg.data and not args.resume:
        raise ConfigError(f"recipe '{name}' trains on ADE20K: pass --data PATH/ADEChallengeData2016 (or run "
                          f"`polynext seg train` with no arguments for the generated demo set)")
    explicit_keys = set(flags) | set(parse_set_args(args.set))
    explicit = {k: getattr(cfg, k) for k in explicit_keys}
    from ..seg.trainer import train_segmentation
    try:
        train_segmentation(cfg, name, resume=args.resume, fresh=args.fresh, explicit=explicit,
                           show_progress=not args.no_progress)
    except PolyNeXtError:
        if int(os.environ.get('RANK', '0')) != 0:   # under torchrun, rank 0 alone reports the error
            sys.exit(2)
        raise
    return 0


def _eval_settings(path: Path) -> Dict[str, Any]:
    """The training config stored with a checkpoint (safetensors metadata or the state file)."""
    from ..checkpoint import read_checkpoint
    if path.is_dir():
        path = next((path / n for n in ('best.safetensors', 'last.safetensors') if (path / n).is_file()), path)
    if path.suffix == '.safetensors' and path.is_file():
        from safetensors import safe_open
        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
        return json.loads(meta.get('polynext_seg_config', '{}'))
    if path.is_file():
        state = read_checkpoint(path)
        return dict(state.get('config') or {}) if isinstance(state, dict) else {}
    return {}


def _eval(args: argparse.Namespace) -> int:
    import dataclasses
    import torch
    from torch.utils.data import DataLoader, Subset
    from ..engine.config import apply_overrides
    from ..engine.distributed import cleanup_distributed, init_distributed
    from ..errors import ConfigError
    from ..seg.data import SegSamples, collate_eval
    from ..seg.inference import evaluate
    from ..seg.metrics import format_per_class
    from ..seg.recipes import SegConfig
    from ..seg.segmentor import load_segmentor
    from ..seg.trainer import build_sources
    from ..seg.transforms import build_eval_transform
    from ..engine.determinism import ShardSampler

    path = Path(args.checkpoint)
    saved = _eval_settings(path)
    known = {f.name for f in dataclasses.fields(SegConfig)}
    cfg = apply_overrides(SegConfig(), {k: v for k, v in saved.items() if k in known}, source=str(path))
    changes: Dict[str, Any] = {}
    if args.data:
        changes.update(data=args.data, dataset='ade20k')
    if args.mode:
        changes['eval_mode'] = args.mode
    if args.crop:
        changes['eval_crop'] = args.crop
    if args.stride:
        changes['eval_stride'] = args.stride
    cfg = dataclasses.replace(cfg, **changes)
    if cfg.dataset == 'ade20k' and not cfg.data:
        raise ConfigError('pass --data PATH/ADEChallengeData2016 (the checkpoint does not name its dataset folder)')
    env = init_distributed(args.device)
    try:
        model = load_segmentor(path).to(env.device)
        train_src, val_src, classes = build_sources(cfg)
        source = val_src if args.split == 'val' else train_src
        if model.num_classes != len(classes):
            raise ConfigError(f'the model predicts {model.num_classes} classes but the data has {len(classes)}')
        ds = SegSamples(source, build_eval_transform(cfg.eval_scale, cfg.mean, cfg.std), train=False,
                        ignore_index=cfg.ignore_index)
        if args.limit:
            ds = Subset(ds, range(min(args.limit, len(ds))))
        sampler = ShardSampler(len(ds), env.world_size, env.rank)
        loader = DataLoader(ds, batch_size=1, sampler=sampler, num_workers=args.workers, collate_fn=collate_eval)
        cm, bad = evaluate(model, loader, model.num_classes, env.device, cfg.eval_mode, cfg.eval_crop, cfg.eval_stride,
                           cfg.ignore_index, window_batch=args.window_batch,
                           show_progress=env.is_main and not args.no_progress, total=len(sampler))
        from ..engine.distributed import all_gather_objects
        names = sorted({source.name_of(i) for part in all_gather_objects(bad) for i in part})
        if names:
            from ..errors import DataError
            raise DataError(f'{len(names)} image(s) cannot be read, e.g. {", ".join(names[:3])}')
        metrics = cm.reduce().compute(classes)
        if env.is_main:
            protocol = (f'{cfg.eval_mode}' + (f' {cfg.eval_crop}/{cfg.eval_stride}' if cfg.eval_mode == 'slide' else '') +
                        f', scale {tuple(cfg.eval_scale)}')
            if args.per_class:
                print(format_per_class(metrics))
            print(f'{source.description} | {protocol} | mIoU {metrics.miou:.2f}  mAcc {metrics.macc:.2f}  '
                  f'aAcc {metrics.aacc:.2f}')
            if args.json:
                out = dict(checkpoint=str(path), data=source.description, mode=cfg.eval_mode, crop=cfg.eval_crop,
                           stride=cfg.eval_stride, scale=list(cfg.eval_scale), **metrics.as_dict(per_class=True))
                Path(args.json).write_text(json.dumps(out, indent=1, allow_nan=True) + '\n')
    finally:
        cleanup_distributed()
    return 0


def cost_rows(backbones: List[str], recipes: List[str], size=(512, 2048), num_classes: int = 150,
              progress: bool = True) -> List[Dict[str, Any]]:
    """Params and MACs (batch 1, eval: backbone + decode head; the auxiliary head's params count,
    its MACs do not, as it does not run at inference)."""
    import torch
    from ..profile import count_macs, count_params
    from ..seg.recipes import get_seg_preset
    from ..seg.segmentor import SegmentorSpec, build_segmentor
    jobs = [(r, get_seg_preset(r).config.spec(num_classes)) for r in recipes]
    jobs += [(b, SegmentorSpec(backbone=b, num_classes=num_classes)) for b in backbones]
    rows = []
    for name, spec in jobs:
        if progress:
            print(f'counting {name} at {size[0]}x{size[1]} ...', file=sys.stderr, flush=True)
        model = build_segmentor(spec)
        bn_ops = [0]

        def count_bn(module, inputs, output):   # affine BatchNorm at inference: 2 ops per element (mmcv, fvcore)
            bn_ops[0] += 2 * output.numel()
        hooks = [m.register_forward_hook(count_bn) for m in model.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        try:
            macs = count_macs(model, (3, int(size[0]), int(size[1])))
        finally:
            for h in hooks:
                h.remove()
        paper = PAPER_COST.get(name) if tuple(size) == (512, 2048) and num_classes == 150 else None
        rows.append(dict(name=name, backbone=spec.backbone, params=count_params(model),
                         backbone_params=count_params(model.backbone),
                         head_params=count_params(model.decode_head),
                         aux_params=count_params(model.auxiliary_head) if model.auxiliary_head is not None else 0,
                         macs=macs, bn_ops=bn_ops[0], macs_with_bn=macs + bn_ops[0], size=list(size),
                         paper_params_m=paper[0] if paper else None,
                         paper_macs_g=paper[1] if paper else None))
        del model
    return rows


def _cost(args: argparse.Namespace) -> int:
    recipes = list(args.recipe)
    if not args.backbone and not recipes:
        recipes = list(PAPER_COST)
    rows = cost_rows(list(args.backbone), recipes, tuple(args.size), args.num_classes)
    h, w = args.size
    width = max(len(r['name']) for r in rows)
    print(f'UperNet segmentors at {h}x{w}, batch 1. MACs: convolutions, linear layers and attention matmuls '
          f'(FlopCounterMode FLOPs / 2, decode path); +BN adds 2 ops per BatchNorm output element, as mmcv and '
          f'fvcore count them. The auxiliary head counts in params only (it does not run at inference).')
    print(f'{"segmentor":<{width}}  {"params":>12} {"(M)":>6} {"GMACs":>8} {"+BN":>8}   {"paper":>12}')
    for r in rows:
        paper = (f'{r["paper_params_m"]}M / {r["paper_macs_g"]}G' if r['paper_params_m'] else '-')
        print(f'{r["name"]:<{width}}  {r["params"]:>12,} {r["params"] / 1e6:>6.2f} {r["macs"] / 1e9:>8.2f} '
              f'{r["macs_with_bn"] / 1e9:>8.2f}   {paper:>12}')
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + '\n')
    return 0


def run(args: argparse.Namespace) -> int:
    return {'train': _train, 'eval': _eval, 'cost': _cost}[args.action](args)
