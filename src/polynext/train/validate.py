"""Classification evaluation: top-1 / top-5 / loss and per-class accuracy, sharded over ranks.

``evaluate(model, loader, num_classes, device)`` runs the model in eval mode without
autocast (the reference validates in fp32), counts correct predictions as sums and reduces
them over all ranks, so every image counts exactly once however the shards fall. Images that
could not be read (``skipped >= 0`` from ``Samples``) are left out of the counts.

``validate_checkpoint(path, data=...)`` is ``polynext validate`` from Python: it reads any
checkpoint polynext loads (``*.safetensors`` with polynext metadata, ``*.state.pt`` training
states with the EMA preferred, the authors' ``.pt`` / ``.pth``), builds the model its metadata
names, picks the eval transform (the recipe's, or timm's ``pretrained_cfg``), checks that the
classes match the data, evaluates (sharded under ``torchrun``) and writes ``validate.json`` and
``per_class.csv`` to ``output``. With ``dtype='bf16'`` the model runs under bf16 autocast and every
batch also in fp32: the result adds the agreement of the two (``vs_fp32``: the largest |Δ logit| and
the share of images whose argmax is the same), since a polynomial network of high degree may
amplify rounding.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..engine.data import readable_batches
from ..engine.distributed import all_reduce_sums, all_reduce_tensor
from ..engine.run import progress

__all__ = ['EvalResult', 'evaluate', 'per_class_rows', 'ValidationResult', 'validate_checkpoint', 'eval_transform_of',
           'read_weights_and_metadata']


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    images: int
    per_class_total: Optional[List[int]] = None
    per_class_top1: Optional[List[int]] = None
    per_class_top5: Optional[List[int]] = None
    skipped: List[int] = field(default_factory=list)   # this rank's unreadable indices
    # with compare_fp32: the autocast logits against the fp32 model's, over all images
    max_abs_logit_diff: Optional[float] = None
    argmax_agreement: Optional[float] = None            # % of images with the same argmax

    def as_dict(self, prefix: str = '') -> Dict[str, float]:
        return {f'{prefix}top1': self.top1, f'{prefix}top5': self.top5, f'{prefix}loss': self.loss}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, num_classes: int, device: torch.device, per_class: bool = False,
             channels_last: bool = True, show_progress: bool = False, desc: str = 'val',
             autocast_dtype: Optional[torch.dtype] = None, compare_fp32: bool = False) -> EvalResult:
    """Top-1 / top-5 (%) and mean cross-entropy over the loader (all ranks together); with
    ``autocast_dtype`` and ``compare_fp32`` also each batch in fp32, and the agreement of the two."""
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    sums = dict(loss=0.0, top1=0.0, top5=0.0, n=0.0, agree=0.0)
    compare_fp32 = compare_fp32 and autocast_dtype is not None
    max_diff = 0.0
    total = torch.zeros(num_classes, dtype=torch.float64)
    hit1 = torch.zeros(num_classes, dtype=torch.float64)
    hit5 = torch.zeros(num_classes, dtype=torch.float64)
    skipped: List[int] = []
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    for x, y in readable_batches(progress(loader, total=len(loader), desc=desc, enabled=show_progress), skipped):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with amp:
            logits = model(x)
        logits = logits.float()
        if compare_fp32:
            ref = model(x).float()
            max_diff = max(max_diff, float((logits - ref).abs().max()))
            sums['agree'] += float((logits.argmax(1) == ref.argmax(1)).sum())
        sums['loss'] += float(F.cross_entropy(logits, y, reduction='sum'))
        topk = logits.topk(k, dim=1).indices
        c1 = topk[:, 0] == y
        c5 = (topk == y[:, None]).any(dim=1)
        sums['top1'] += float(c1.sum())
        sums['top5'] += float(c5.sum())
        sums['n'] += len(y)
        if per_class:
            yc = y.cpu()
            total += torch.bincount(yc, minlength=num_classes).double()
            hit1 += torch.bincount(yc[c1.cpu()], minlength=num_classes).double()
            hit5 += torch.bincount(yc[c5.cpu()], minlength=num_classes).double()
    reduced = all_reduce_sums(sums)
    if per_class:
        total, hit1, hit5 = all_reduce_tensor(torch.stack([total, hit1, hit5]))
    model.train(was_training)
    n = max(reduced['n'], 1.0)
    res = EvalResult(top1=100.0 * reduced['top1'] / n, top5=100.0 * reduced['top5'] / n,
                     loss=reduced['loss'] / n, images=int(reduced['n']), skipped=skipped)
    if compare_fp32:
        from ..engine.distributed import all_gather_objects
        res.max_abs_logit_diff = max(all_gather_objects(max_diff))
        res.argmax_agreement = 100.0 * reduced['agree'] / n
    if per_class:
        res.per_class_total = [int(v) for v in total.tolist()]
        res.per_class_top1 = [int(v) for v in hit1.tolist()]
        res.per_class_top5 = [int(v) for v in hit5.tolist()]
    return res


def per_class_rows(res: EvalResult, classes: List[str]) -> List[Dict[str, object]]:
    """One row per class: index, name, images, top-1 / top-5 correct and accuracy (%)."""
    rows = []
    for i, name in enumerate(classes):
        n = res.per_class_total[i]
        rows.append(dict(index=i, cls=name, images=n, top1_correct=res.per_class_top1[i],
                         top1=round(100.0 * res.per_class_top1[i] / n, 4) if n else None,
                         top5_correct=res.per_class_top5[i],
                         top5=round(100.0 * res.per_class_top5[i] / n, 4) if n else None))
    return rows


# ---------------------------------------------------------------------------------------
# polynext validate
# ---------------------------------------------------------------------------------------

@dataclass
class ValidationResult:
    """What ``validate_checkpoint`` measured: the summary (``result``), one row per class, the files written."""
    result: Dict[str, Any]
    per_class: List[Dict[str, Any]]
    files: List[Path] = field(default_factory=list)
    is_main: bool = True           # rank 0 (the one that reports) under torchrun


def eval_transform_of(name: str, meta: Mapping[str, Any], img_size: Optional[int] = None) -> Tuple[Any, ...]:
    """(resize, crop, interpolation, mean, std) of a checkpoint: its own ``eval`` metadata, else the recipe
    that trains ``name`` (the PolyNeXt ImageNet protocol 232 → 224 bicubic for a model without one), rescaled
    to ``img_size`` when given."""
    from .recipes import PRESETS
    if isinstance(meta.get('eval'), dict):
        e = meta['eval']
        return e['resize'], e['crop'], e['interpolation'], tuple(e['mean']), tuple(e['std'])
    c = PRESETS.get(name if name in PRESETS else 'cpolynext_t').config
    resize, crop = c.eval_resize, c.eval_crop
    if img_size:
        resize = round(img_size * c.eval_resize / (c.eval_crop or c.eval_resize))
        crop = img_size if c.eval_crop else None
        resize = img_size if crop is None else resize
    return resize, crop, c.eval_interpolation, c.mean, c.std


def read_weights_and_metadata(path: Union[str, Path], prefer_ema: bool = True) -> Tuple[Any, Dict[str, Any]]:
    """(weights object, metadata) of any classifier checkpoint: a polynext ``.safetensors`` file's metadata
    (architecture, model arguments, classes, eval transform, recipe, epoch), a training state's config standing
    in for it (EMA weights preferred when they exist), ``{}`` for the authors' files."""
    from ..checkpoint import read_checkpoint, read_safetensors_metadata
    from ..errors import CheckpointError
    path = Path(path)
    obj = read_checkpoint(path)
    meta = read_safetensors_metadata(path)
    fmt = str(obj.get('format', '')) if isinstance(obj, dict) else ''
    if isinstance(meta.get('polynext_segmentor'), dict):
        raise CheckpointError(f'{path} holds a segmentor (written by `polynext seg train`), not a classifier; '
                              f'evaluate it with `polynext seg eval --checkpoint {path}`')
    if fmt.startswith('polynext.') and not fmt.startswith('polynext.train'):
        raise CheckpointError(f'{path} is a {fmt!r} training state, not a classifier\'s; evaluate it with its own '
                              f'command (polynext.seg/1: `polynext seg eval --checkpoint {path}`)')
    if fmt.startswith('polynext.train') and isinstance(obj.get('config'), dict):
        config = obj['config']
        use_ema = bool(prefer_ema and obj.get('ema_updates') and obj.get('ema_state') is not None)
        meta = dict(format='polynext', architecture=config.get('model'), model_kwargs=config.get('model_kwargs'),
                    classes=obj.get('classes'), recipe=obj.get('recipe'), epoch=obj.get('epoch'),
                    weights='ema' if use_ema else 'raw',
                    eval=dict(resize=config['eval_resize'], crop=config['eval_crop'],
                              interpolation=config['eval_interpolation'], mean=config['mean'], std=config['std']))
        obj = obj['ema_state'] if use_ema else obj['model']
    return obj, meta


def _onnx_for_eval(path: Path, model: Optional[str], model_kwargs: Optional[Mapping[str, Any]]):
    """An ONNX Runtime session over a polynext ONNX export, its architecture and its metadata."""
    from ..deploy.runtime import OnnxRuntimeModel
    from ..errors import ConfigError
    if path.suffix != '.onnx':
        raise ConfigError(f'--runtime onnxruntime evaluates an .onnx file written by polynext export; '
                          f'{path.name} is not one (export it: polynext export {path} model.onnx)')
    if model_kwargs:
        raise ConfigError('an ONNX file holds its weights and architecture: drop --model-kwargs')
    net = OnnxRuntimeModel(path, threads=torch.get_num_threads())
    if model and model.split('.')[0] != net.architecture:
        raise ConfigError(f'{path.name} holds {net.architecture}, not {model}; drop --model')
    return net, net.architecture, dict(net.metadata)


def validate_checkpoint(checkpoint: Union[str, Path], data: Optional[str] = None, dataset: str = 'folder',
                        split: str = 'val', model: Optional[str] = None,
                        model_kwargs: Optional[Mapping[str, Any]] = None, transform: str = 'reference',
                        img_size: Optional[int] = None, prefer_ema: bool = True, batch_size: int = 100,
                        workers: int = 4, device: str = 'auto', download: bool = False,
                        output: Optional[Union[str, Path]] = None, show_progress: bool = False,
                        runtime: str = 'torch', dtype: str = 'fp32') -> ValidationResult:
    """Top-1 / top-5 / loss and per-class accuracy of a checkpoint on a dataset (see the module doc).

    ``model``: the architecture (default: the checkpoint's metadata); ``model_kwargs`` add to the
    checkpoint's; ``transform``: 'reference' (the recipe's eval transform) or 'timm' (``pretrained_cfg``);
    ``output``: where ``validate.json`` and ``per_class.csv`` go (default ``validate-MODEL``).
    ``runtime='onnxruntime'`` (implied by an ``.onnx`` file): ``checkpoint`` is a ``polynext export``
    ONNX file, run by ONNX Runtime with the same protocol; its metadata names the model.
    ``dtype='bf16'``: bf16 autocast, with its agreement with fp32 (module doc)."""
    from ..engine.data import make_loader
    from ..engine.determinism import ShardSampler
    from ..engine.distributed import cleanup_distributed, init_distributed
    from ..engine.memory import BatchLayout, oom_advice
    from ..errors import CheckpointError, ConfigError
    from ..factory import create_model
    from ..checkpoint import unwrap_state_dict
    from .data import build_eval_data, build_eval_transform

    path = Path(checkpoint)
    if dtype not in ('fp32', 'bf16'):
        raise ConfigError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    if dtype != 'fp32' and (runtime == 'onnxruntime' or path.suffix == '.onnx'):
        raise ConfigError(f'--dtype {dtype} runs the torch model under autocast; an ONNX file is evaluated as '
                          f'exported: drop --dtype or validate the .safetensors checkpoint')
    if runtime == 'onnxruntime' or path.suffix == '.onnx':
        runtime = 'onnxruntime'
        net, name, meta = _onnx_for_eval(path, model, model_kwargs)
    else:
        obj, meta = read_weights_and_metadata(path, prefer_ema)
        name = model or meta.get('architecture')
        if not name:
            raise ConfigError('pass --model NAME (this checkpoint does not say which model it holds)')
        same = not model or model == meta.get('architecture')
        kwargs = dict(meta.get('model_kwargs') or {}) if same else {}
        if not same:
            meta = {}     # another model than the file's: its metadata does not apply
        kwargs.update(model_kwargs or {})
        net = create_model(name, checkpoint=unwrap_state_dict(obj, prefer_ema=prefer_ema), **kwargs)
    from ..outputs import check_output_folder
    out_dir = check_output_folder(output or f'validate-{name}')     # before an evaluation that could take hours

    if transform == 'timm':
        from timm.data import create_transform, resolve_data_config
        dcfg = resolve_data_config(model=net)
        if img_size:
            dcfg['input_size'] = (3, img_size, img_size)
        tf = create_transform(**dcfg, is_training=False)
        tdesc = (f"timm pretrained_cfg: {dcfg['input_size'][-1]} px, crop_pct {dcfg['crop_pct']:.4g}, "
                 f"{dcfg['interpolation']}")
        size = dcfg['input_size'][-1]
    else:
        resize, crop, interp, mean, std = eval_transform_of(name, meta, img_size)
        tf = build_eval_transform(resize, crop, interp, mean, std)
        tdesc = f'resize {resize} → ' + (f'centre crop {crop}' if crop else 'no crop') + f', {interp}'
        size = crop or resize
    fixed = getattr(net, 'input', None) or {}          # an ONNX file exported at a fixed size
    if fixed and not fixed.get('dynamic_size', True) and size != fixed.get('height'):
        raise ConfigError(f"{path.name} takes {fixed['height']}x{fixed['width']} inputs only, but the transform gives "
                          f"{size} px; pass --img-size {fixed['height']}")
    ds, classes, desc = build_eval_data(dataset, data, tf, split=split, download=download, img_size=size)
    num_classes = getattr(net, 'num_classes', None)
    if num_classes != len(classes):
        raise CheckpointError(f'the checkpoint has {num_classes} classes but {desc} has {len(classes)}; evaluate it '
                              f'on data with the classes it was trained on')
    saved = meta.get('classes')
    if isinstance(saved, list) and saved and list(saved) != list(classes):
        i = next(i for i, (a, b) in enumerate(zip(saved, classes)) if a != b)
        raise CheckpointError(f"the checkpoint's classes differ from {desc}: class {i} is '{saved[i]}' in the "
                              f"checkpoint but '{classes[i]}' in the data; evaluate it on data with the classes it "
                              f"was trained on (the same class folder names)")

    env = init_distributed(device)
    try:
        net.to(env.device).to(memory_format=torch.channels_last)
        loader = make_loader(ds, ShardSampler(len(ds), env.world_size, env.rank), batch_size, workers, seed=0,
                             pin_memory=env.device.type == 'cuda')
        with oom_advice(BatchLayout(batch_size, env.world_size), 'validation'):
            res = evaluate(net, loader, len(classes), env.device, per_class=True,
                           show_progress=env.is_main and show_progress,
                           autocast_dtype=torch.bfloat16 if dtype == 'bf16' else None, compare_fp32=dtype != 'fp32')
    finally:
        cleanup_distributed()
    rows = per_class_rows(res, classes)
    result = dict(model=name, checkpoint=str(path), runtime=runtime, data=desc, transform=tdesc, images=res.images,
                  top1=round(res.top1, 4), top5=round(res.top5, 4), loss=round(res.loss, 6),
                  classes=len(classes), unreadable_images=len(res.skipped), dtype=dtype)
    if res.argmax_agreement is not None:
        result['vs_fp32'] = dict(max_abs_logit_diff=res.max_abs_logit_diff,
                                 argmax_agreement=round(res.argmax_agreement, 4))
    out = ValidationResult(result, rows, is_main=env.is_main)
    if env.is_main:
        from ..checkpoint import atomic_write
        text = json.dumps(dict(result, per_class=rows), indent=1) + '\n'
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        out.files = [atomic_write(out_dir / 'validate.json', lambda tmp: Path(tmp).write_text(text)),
                     atomic_write(out_dir / 'per_class.csv', lambda tmp: Path(tmp).write_text(buf.getvalue()))]
    return out
