"""Evaluate a trained segmentor checkpoint (``polynext seg eval``), from Python as from the command line.

    from polynext.seg import evaluate_checkpoint
    res = evaluate_checkpoint('runs/upernet_cpolynext_s', data='/data/ADEChallengeData2016')
    res.metrics.miou, res.metrics.iou, res.as_dict()

The checkpoint (a run folder, a ``*.safetensors`` written by ``seg train`` or a ``*.state.pt``) carries
the segmentor description and the training config: the dataset, the evaluation scale, the inference mode
(slide / whole) and its window, mean / std and the ignore index are the training's unless overridden.
Under ``torchrun`` the images are sharded over the ranks and the confusion matrices summed, so the
numbers equal a one-process evaluation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .metrics import SegMetrics

__all__ = ['SegEvaluation', 'evaluate_checkpoint', 'checkpoint_config']


@dataclass
class SegEvaluation:
    """What ``evaluate_checkpoint`` measured, and how."""
    metrics: SegMetrics
    checkpoint: str
    data: str
    mode: str
    crop: int
    stride: int
    scale: tuple
    is_main: bool = True         # rank 0 (the one that reports) under torchrun

    @property
    def protocol(self) -> str:
        window = f' {self.crop}/{self.stride}' if self.mode == 'slide' else ''
        return f'{self.mode}{window}, scale {tuple(self.scale)}'

    def summary(self) -> str:
        m = self.metrics
        return f'{self.data} | {self.protocol} | mIoU {m.miou:.2f}  mAcc {m.macc:.2f}  aAcc {m.aacc:.2f}'

    def as_dict(self) -> Dict[str, Any]:
        return dict(checkpoint=self.checkpoint, data=self.data, mode=self.mode, crop=self.crop, stride=self.stride,
                    scale=list(self.scale), **self.metrics.as_dict(per_class=True))


def checkpoint_config(path: Union[str, Path]):
    """The ``SegConfig`` a segmentation checkpoint was trained with (defaults where it says nothing)."""
    from ..checkpoint import read_checkpoint, read_safetensors_metadata
    from ..engine.config import apply_overrides
    from .recipes import SegConfig
    path = Path(path)
    if path.is_dir():
        path = next((path / n for n in ('best.safetensors', 'last.safetensors') if (path / n).is_file()), path)
    saved: Dict[str, Any] = {}
    if path.suffix == '.safetensors' and path.is_file():
        saved = read_safetensors_metadata(path).get('polynext_seg_config') or {}
    elif path.is_file():
        state = read_checkpoint(path)
        if isinstance(state, dict) and str(state.get('format', '')).startswith('polynext.seg'):
            saved = dict(state.get('config') or {})     # (another task's state: load_segmentor says what it is)
    known = {f.name for f in dataclasses.fields(SegConfig)}
    return apply_overrides(SegConfig(), {k: v for k, v in saved.items() if k in known}, source=str(path))


def evaluate_checkpoint(checkpoint: Union[str, Path], data: Optional[str] = None, split: str = 'val',
                        mode: Optional[str] = None, crop: Optional[int] = None, stride: Optional[int] = None,
                        window_batch: int = 4, device: str = 'auto', workers: int = 4, limit: Optional[int] = None,
                        show_progress: bool = False) -> SegEvaluation:
    """mIoU / mAcc / aAcc and per-class IoU of a trained segmentor (see the module doc).

    ``data``: an ADEChallengeData2016 folder (default: the dataset the model was trained on); ``mode``,
    ``crop``, ``stride``: the inference protocol (default: the training's); ``limit``: the first N images."""
    from torch.utils.data import Subset
    from ..engine.data import make_loader
    from ..engine.determinism import ShardSampler
    from ..engine.distributed import all_gather_objects, cleanup_distributed, init_distributed
    from ..errors import ConfigError, DataError
    from .data import SegSamples, collate_eval
    from .inference import evaluate
    from .segmentor import load_segmentor
    from .trainer import build_sources
    from .transforms import build_eval_transform

    path = Path(checkpoint)
    cfg = checkpoint_config(path)
    changes: Dict[str, Any] = {}
    if data:
        changes.update(data=data, dataset='ade20k')
    for key, value in (('eval_mode', mode), ('eval_crop', crop), ('eval_stride', stride)):
        if value:
            changes[key] = value
    cfg = dataclasses.replace(cfg, **changes)
    if cfg.dataset == 'ade20k' and not cfg.data:
        raise ConfigError('pass --data PATH/ADEChallengeData2016 (the checkpoint does not name its dataset folder)')
    env = init_distributed(device)
    try:
        model = load_segmentor(path).to(env.device)
        train_src, val_src, classes = build_sources(cfg)
        source = val_src if split == 'val' else train_src
        if model.num_classes != len(classes):
            raise ConfigError(f'the model predicts {model.num_classes} classes but the data has {len(classes)}')
        ds = SegSamples(source, build_eval_transform(cfg.eval_scale, cfg.mean, cfg.std), train=False,
                        ignore_index=cfg.ignore_index)
        if limit:
            ds = Subset(ds, range(min(limit, len(ds))))
        sampler = ShardSampler(len(ds), env.world_size, env.rank)
        loader = make_loader(ds, sampler, 1, workers, seed=0, collate_fn=collate_eval)
        cm, bad = evaluate(model, loader, model.num_classes, env.device, cfg.eval_mode, cfg.eval_crop, cfg.eval_stride,
                           cfg.ignore_index, window_batch=window_batch, show_progress=env.is_main and show_progress,
                           total=len(sampler))
        names = sorted({source.name_of(i) for part in all_gather_objects(bad) for i in part})
        if names:
            raise DataError(f'{len(names)} image(s) cannot be read, e.g. {", ".join(names[:3])}')
        metrics = cm.reduce().compute(classes)
    finally:
        cleanup_distributed()
    return SegEvaluation(metrics, str(path), source.description, cfg.eval_mode, cfg.eval_crop, cfg.eval_stride,
                         tuple(cfg.eval_scale), is_main=env.is_main)
