"""Evaluate a checkpoint: top-1, top-5 and per-class accuracy on a dataset.

Takes polynext checkpoints (``*.safetensors`` from a run folder, whose metadata names the model,
its arguments, its classes and its eval transform; ``*.state.pt`` training states, EMA
preferred), the authors' PolyNeXt ``.pt`` files and sail-sg MetaFormer ``.pth`` files. Loading
is strict. The transform is the reference's (resize 232, centre crop 224, bicubic; a
polynext checkpoint's own eval transform; the low-resolution models at native size, no crop)
or, with ``--transform timm``, the model's timm ``pretrained_cfg`` (input size, crop_pct,
interpolation, mean / std).

Examples:
  polynext validate --checkpoint runs/cpolynext_lr_digits/best.safetensors --dataset digits
  polynext validate --model cpolynext_s --checkpoint cpolynext_s.pt --data /data/imagenet
  polynext validate --model cpolynext_lr --checkpoint cpolynext_lr_cifar10.pt --dataset cifar10 --data ./cifar
  torchrun --nproc_per_node=4 -m polynext validate --model apolynext_t --checkpoint apolynext_t.pt --data DIR

Writes OUTPUT/validate.json and OUTPUT/per_class.csv (OUTPUT defaults to validate-MODEL).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path


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


def _state_eval(config: dict) -> dict:
    return dict(resize=config['eval_resize'], crop=config['eval_crop'], interpolation=config['eval_interpolation'],
                mean=config['mean'], std=config['std'])


def _reference_eval(name: str, meta: dict, img_size):
    """(resize, crop, interpolation, mean, std) of the recipe that trains ``name``."""
    from ..train.recipes import PRESETS
    if isinstance(meta.get('eval'), dict):
        e = meta['eval']
        return e['resize'], e['crop'], e['interpolation'], tuple(e['mean']), tuple(e['std'])
    preset = PRESETS.get(name)
    if preset is None:
        preset = PRESETS['cpolynext_t']      # the PolyNeXt ImageNet protocol: 232 → 224 bicubic
    c = preset.config
    resize, crop = c.eval_resize, c.eval_crop
    if img_size:
        resize = round(img_size * c.eval_resize / (c.eval_crop or c.eval_resize))
        crop = img_size if c.eval_crop else None
        resize = img_size if crop is None else resize
    return resize, crop, c.eval_interpolation, c.mean, c.std


def run(args: argparse.Namespace) -> int:
    import torch
    import yaml
    from torch.utils.data import DataLoader

    from ..checkpoint import read_checkpoint, read_safetensors_metadata, unwrap_state_dict
    from ..engine.distributed import cleanup_distributed, init_distributed
    from ..engine.determinism import ShardSampler
    from ..engine.memory import BatchLayout, oom_advice
    from ..errors import CheckpointError, ConfigError, PolyNeXtError
    from ..factory import create_model
    from ..train.data import build_eval_data, build_eval_transform
    from ..train.validate import evaluate, per_class_rows

    ckpt = Path(args.checkpoint)
    meta = read_safetensors_metadata(ckpt)
    obj = read_checkpoint(ckpt)
    if isinstance(obj, dict) and str(obj.get('format', '')).startswith('polynext.train') and \
            isinstance(obj.get('config'), dict):
        # a training-state file: its config names the model, its arguments, classes and eval transform
        meta = dict(architecture=obj['config'].get('model'), model_kwargs=obj['config'].get('model_kwargs'),
                    classes=obj.get('classes'), eval=_state_eval(obj['config']))
        use_ema = not args.no_ema and obj.get('ema_updates') and obj.get('ema_state') is not None
        obj = obj['ema_state'] if use_ema else obj['model']
    name = args.model or meta.get('architecture')
    if not name:
        raise ConfigError('pass --model NAME (this checkpoint does not say which model it holds)')
    same = not args.model or args.model == meta.get('architecture')
    kwargs = dict(meta.get('model_kwargs') or {}) if same else {}
    if not same:
        meta = {}     # another model than the file's: its metadata does not apply
    if args.model_kwargs:
        extra = yaml.safe_load(args.model_kwargs)
        if not isinstance(extra, dict):
            raise ConfigError(f"--model-kwargs must be a mapping like '{{init_channels: 16}}', got {args.model_kwargs!r}")
        kwargs.update(extra)
    sd = unwrap_state_dict(obj, prefer_ema=not args.no_ema)
    model = create_model(name, checkpoint=sd, **kwargs)

    if args.transform == 'timm':
        from timm.data import create_transform, resolve_data_config
        dcfg = resolve_data_config(model=model)
        if args.img_size:
            dcfg['input_size'] = (3, args.img_size, args.img_size)
        transform = create_transform(**dcfg, is_training=False)
        tdesc = (f"timm pretrained_cfg: {dcfg['input_size'][-1]} px, crop_pct {dcfg['crop_pct']:.4g}, "
                 f"{dcfg['interpolation']}")
        img_size = dcfg['input_size'][-1]
    else:
        resize, crop, interp, mean, std = _reference_eval(name, meta, args.img_size)
        transform = build_eval_transform(resize, crop, interp, mean, std)
        tdesc = f'resize {resize} → ' + (f'centre crop {crop}' if crop else 'no crop') + f', {interp}'
        img_size = crop or resize
    data, classes, desc = build_eval_data(args.dataset, args.data, transform, split=args.split,
                                          download=args.download, img_size=img_size)
    num_classes = getattr(model, 'num_classes', None)
    if num_classes != len(classes):
        raise CheckpointError(f'the checkpoint has {num_classes} classes but {desc} has {len(classes)}; evaluate it '
                              f'on data with the classes it was trained on')
    saved = meta.get('classes')
    if isinstance(saved, list) and saved and list(saved) != list(classes):
        i = next(i for i, (a, b) in enumerate(zip(saved, classes)) if a != b)
        raise CheckpointError(f"the checkpoint's classes differ from {desc}: class {i} is '{saved[i]}' in the "
                              f"checkpoint but '{classes[i]}' in the data")

    env = init_distributed(args.device)
    try:
        model.to(env.device).to(memory_format=torch.channels_last)
        loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.workers,
                            sampler=ShardSampler(len(data), env.world_size, env.rank), pin_memory=env.device.type == 'cuda')
        with oom_advice(BatchLayout(args.batch_size, env.world_size), 'validation'):
            res = evaluate(model, loader, len(classes), env.device, per_class=True,
                           show_progress=env.is_main and not args.no_progress)
    except PolyNeXtError:
        if env.rank != 0:
            sys.exit(2)
        raise
    finally:
        cleanup_distributed()
    if not env.is_main:
        return 0
    rows = per_class_rows(res, classes)
    result = dict(model=name, checkpoint=str(ckpt), data=desc, transform=tdesc, images=res.images,
                  top1=round(res.top1, 4), top5=round(res.top5, 4), loss=round(res.loss, 6),
                  classes=len(classes), unreadable_images=len(res.skipped))
    out_dir = Path(args.output or f'validate-{name}')
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'validate.json').write_text(json.dumps(dict(result, per_class=rows), indent=1) + '\n')
    with open(out_dir / 'per_class.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f'{k:<{width}}  {v}')
    worst = sorted((r for r in rows if r['images']), key=lambda r: r['top1'])[:5]
    if len(rows) > 1 and worst:
        print('lowest per-class top-1: ' + ', '.join(f"{r['cls']} {r['top1']:.1f}%" for r in worst))
    print(f'wrote {out_dir / "validate.json"} and {out_dir / "per_class.csv"}')
    return 0
