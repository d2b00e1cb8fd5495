"""Epoch-based detection training (``polynext det train``): what differs from the other tasks.

One ``DetTrainer`` per process; under ``torchrun`` every rank runs it, DDP keeps the replicas in
step and the cascade heads' BatchNorms become SyncBatchNorm (on CUDA). The engine
(``polynext.engine``) does the run folder, resumption, the backend, precision, the micro-batch and
optimizer step, checkpoints and metric files; this file holds the detector, its data, the loss
(the sum of the detector's loss dict), COCO evaluation and the epoch-counted step schedule
(mmdetection's ``EpochBasedRunner`` with ``StepLrUpdaterHook``):

* per optimizer step, ``accumulation`` micro-batches of ``device_batch_size`` images (lists: each
  image keeps its own size; the model pads the batch), forward under the run's autocast, backward;
* lr(it) = lr · gamma^(number of ``lr_steps`` ≤ epoch) · warm-up, the warm-up linear from
  ``warmup_ratio`` over the first ``warmup_iters`` iterations (mmcv's ``linear`` warm-up);
* every ``log_every`` iterations a metrics row, every ``checkpoint_every`` and at each epoch's end
  the resumable ``last`` checkpoint, every ``eval_every`` epochs (and at the end) box / mask AP on
  the validation set, ``results_{bbox,segm}.json`` and, when the box AP improved, ``best``.

Data order: the engine's ``ResumableDistributedSampler`` (a new shuffle per epoch, incomplete
batches dropped), every image's augmentation seeded by (seed, epoch, index), so a resumed run
continues with exactly the images and augmentations it would have seen.

``train_detection(cfg, recipe)`` is the Python entry point (``polynext det train`` calls it).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ..engine.backend import optimizer_kwargs
from ..engine.config import config_to_dict
from ..engine.data import CorruptImages, make_loader
from ..engine.determinism import ResumableDistributedSampler, ShardSampler
from ..engine.distributed import DistEnv, all_gather_objects, broadcast_object
from ..engine.memory import BatchLayout, oom_advice
from ..engine.metrics import Meters, banner
from ..engine.precision import Precision
from ..engine.run import TUNABLE_ON_RESUME, launch, plan_run, progress, start_run
from ..engine.session import Session
from ..engine.step import TrainStep
from ..errors import ConfigError, DataError
from .data import CocoSource, DetSamples, collate
from .detector import build_detector, check_detector, spec_metadata
from .evaluate import coco_evaluate, format_metrics, run_inference, write_results
from .recipes import DET_PRESETS, RESUME_SAFE_KEYS, DetConfig
from .synthetic import ShapesInstances
from .transforms import EvalTransform, TrainTransform

__all__ = ['DetTrainer', 'train_detection', 'det_param_groups', 'layer_id', 'step_lr_factor', 'build_sources',
           'evaluate_sources', 'STATE_FORMAT', 'LOSS_GROUPS']

STATE_FORMAT = 'polynext.det/1'
#: the detector's losses, summed over cascade stages into these groups for the metric rows
LOSS_GROUPS = ('loss_objectness', 'loss_rpn_box_reg', 'loss_classifier', 'loss_box_reg', 'loss_mask')
CURVE_PANELS = [
    ('loss', 'loss', [('train_loss', 'total'), ('train_loss_classifier', 'classifier'),
                      ('train_loss_box_reg', 'box'), ('train_loss_mask', 'mask')]),
    ('validation', 'AP (%)', [('bbox_AP', 'box AP'), ('segm_AP', 'mask AP'), ('bbox_AP50', 'box AP50')]),
]


# -------------------------------------------------------------------------------------------
# optimizer: ConvNeXt's layer-wise decay constructor, mmcv's custom_keys, and the step schedule
# -------------------------------------------------------------------------------------------

_STAGE = re.compile(r'stages[._](\d+)\.(?:(downsample)|(?:blocks\.)?(\d+))?')


def layer_id(name: str, num_layers: int = 6) -> int:
    """ConvNeXt's ``get_num_layer_layer_wise`` on a detector parameter name: stem 0, stage 0 → 1,
    stage 1 → 2, stage 2 → 3 + block // 3 (its down-sampling 3), stage 3 → ``num_layers``,
    everything outside the backbone body (extra norms, FPN, heads) → ``num_layers`` + 1."""
    if not name.startswith('backbone.body.body.'):
        return num_layers + 1
    m = _STAGE.search(name)
    if m is None:
        return 0 if 'stem' in name else num_layers + 1
    stage = int(m.group(1))
    if stage == 0:
        return 1
    if stage == 1:
        return 2
    if stage == 2:
        return 3 if m.group(2) or m.group(3) is None else 3 + int(m.group(3)) // 3
    return num_layers


def _custom_rule(name: str, custom_keys: Mapping[str, Mapping[str, float]]) -> Tuple[float, float]:
    """mmcv's custom_keys: the longest key (alphabetical among equal lengths) that is a substring."""
    for key in sorted(sorted(custom_keys), key=len, reverse=True):
        if key in name:
            return float(custom_keys[key].get('lr_mult', 1.0)), float(custom_keys[key].get('decay_mult', 1.0))
    return 1.0, 1.0


def det_param_groups(model: nn.Module, cfg: DetConfig) -> List[Dict[str, Any]]:
    """AdamW groups: lr × layer_decay^(num_layers + 1 − layer id) (when ``layer_decay`` < 1) × the custom
    key's lr_mult; weight decay 0 for 1-D parameters and biases (``no_decay_1d``) else × decay_mult."""
    groups: Dict[Tuple[float, float], Dict[str, Any]] = {}
    n = cfg.layer_decay_layers
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult, decay_mult = _custom_rule(name, cfg.custom_keys)
        if cfg.layer_decay < 1.0:
            lr_mult *= cfg.layer_decay ** (n + 1 - layer_id(name, n))
        if cfg.no_decay_1d and (p.ndim == 1 or name.endswith('.bias')):
            decay_mult = 0.0
        g = groups.setdefault((lr_mult, decay_mult), dict(params=[], names=[], lr=cfg.lr * lr_mult,
                                                          weight_decay=cfg.weight_decay * decay_mult,
                                                          lr_mult=lr_mult, decay_mult=decay_mult))
        g['params'].append(p)
        g['names'].append(name)
    return list(groups.values())


def step_lr_factor(it: int, iters_per_epoch: int, cfg: DetConfig) -> float:
    """lr(it) / lr: gamma^(steps passed) with mmcv's linear warm-up (``it`` 0-based)."""
    epoch = it // max(iters_per_epoch, 1)
    factor = cfg.lr_gamma ** sum(epoch >= s for s in cfg.lr_steps)
    if cfg.warmup_iters and it < cfg.warmup_iters:
        factor *= 1.0 - (1.0 - it / cfg.warmup_iters) * (1.0 - cfg.warmup_ratio)
    return factor


# -------------------------------------------------------------------------------------------
# data
# -------------------------------------------------------------------------------------------

def build_sources(cfg: DetConfig, need_train: bool = True):
    """(train source or None, val source)."""
    if cfg.dataset == 'shapes':
        train = ShapesInstances('train', cfg.shapes_train, cfg.shapes_size, seed=cfg.seed) if need_train else None
        return train, ShapesInstances('val', cfg.shapes_val, cfg.shapes_size, seed=cfg.seed)
    if not cfg.data:
        raise ConfigError('pass --data PATH/COCO (with annotations/, train2017/, val2017/)')
    train = CocoSource(cfg.data, 'train', train=True) if need_train else None
    return train, CocoSource(cfg.data, 'val')


def evaluate_sources(source: Any) -> Dict[str, Any]:
    """The ground truth of a validation source as a COCO dict (the evaluator's input)."""
    return source.coco_dataset() if hasattr(source, 'coco_dataset') else source.dataset


def _targets_to(targets: List[Dict[str, Any]], device: torch.device) -> List[Dict[str, torch.Tensor]]:
    return [dict(boxes=t['boxes'].to(device), labels=t['labels'].to(device), masks=t['masks'].to(device))
            for t in targets]


class DetTrainer:
    """State and loop of one detection training process."""

    def __init__(self, cfg: DetConfig, recipe: str, run_dir: Path, env: DistEnv,
                 resume_state: Optional[Dict[str, Any]] = None, show_progress: bool = True, quiet: bool = False):
        self.cfg, self.recipe, self.env = cfg, recipe, env
        self.device = env.device
        self.cuda = self.device.type == 'cuda'
        self.show_progress = show_progress and env.is_main
        self.run, self.layout = start_run(run_dir, env, cfg, quiet)

        self.train_source, self.val_source = build_sources(cfg)
        self.classes = list(self.train_source.classes)
        if list(self.val_source.classes) != self.classes or list(self.val_source.cat_ids) != list(
                self.train_source.cat_ids):
            raise DataError(f'the training and validation annotations list different categories '
                            f'({len(self.classes)} vs {len(self.val_source.classes)}); use one category list')
        self.num_classes = cfg.num_classes or len(self.classes)
        if cfg.num_classes and cfg.num_classes != len(self.classes):
            raise DataError(f'num_classes={cfg.num_classes} but {self.train_source.description} has '
                            f'{len(self.classes)} categories; drop num_classes or fix the annotations')
        self.spec = cfg.spec(self.num_classes)
        model = build_detector(self.spec, checkpoint=cfg.initial_checkpoint if resume_state is None else None)
        if cfg.initial_checkpoint and resume_state is None:
            self.run.log(f'backbone weights: {cfg.initial_checkpoint}')
        if cfg.cell_grad_clip is not None:
            from ..seg.segmentor import find_polynext
            net = find_polynext(model.backbone)
            if net is None:
                raise ConfigError(f"cell_grad_clip applies to PolyNeXt backbones only, not '{cfg.backbone}'; "
                                  f"set --set cell_grad_clip=null")
            net.set_cell_grad_clip(cfg.cell_grad_clip)
        if cfg.grad_checkpointing:
            model.backbone.body.set_grad_checkpointing()     # the backbone (seg.segmentor.SegmentationBackbone)
        model.to(self.device)
        groups = det_param_groups(model, cfg)
        for g in groups:
            g.pop('names')
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.opt_betas), eps=cfg.opt_eps,
                                      weight_decay=cfg.weight_decay, **optimizer_kwargs(self.device))

        train_tf = TrainTransform(cfg.train_scales, cfg.max_size, cfg.hflip, cfg.crop_pre_scales,
                                  tuple(cfg.crop_range), cfg.crop_policy)
        self.eval_tf = EvalTransform(cfg.test_scale, cfg.max_size)
        self.train_set = DetSamples(self.train_source, train_tf, train=True, seed=cfg.seed)
        self.val_set = DetSamples(self.val_source, self.eval_tf, train=False)
        if cfg.eval_limit:
            from torch.utils.data import Subset
            self.val_set = Subset(self.val_set, range(min(cfg.eval_limit, len(self.val_set))))
        self.sampler = ResumableDistributedSampler(self.train_set, env.world_size, env.rank, shuffle=True, seed=cfg.seed)
        self.batches_per_epoch = self.sampler.num_samples // cfg.device_batch_size
        self.iters_per_epoch = self.batches_per_epoch // self.layout.accumulation
        if self.iters_per_epoch == 0:
            raise DataError(f'{self.train_source.description}: {self.sampler.num_samples} training images per device '
                            f'make no full step of {self.layout.device_batch} x {self.layout.accumulation}; use a '
                            f'smaller --batch-size or --device-batch-size')
        self.train_loader = make_loader(self.train_set, self.sampler, cfg.device_batch_size, cfg.workers, cfg.seed,
                                        pin_memory=self.cuda, drop_last=True, collate_fn=collate)
        self.val_sampler = ShardSampler(len(self.val_set), env.world_size, env.rank)
        self.val_loader = make_loader(self.val_set, self.val_sampler, 1, cfg.workers, cfg.seed, pin_memory=self.cuda,
                                      collate_fn=collate)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda it: step_lr_factor(it, self.iters_per_epoch, cfg))

        self.meters = Meters('loss', *LOSS_GROUPS, 'n')
        self.step = TrainStep(model, optimizer, Precision(self.device, cfg.amp, cfg.cpu_amp), self.layout,
                              self.meters, device=self.device, clip_grad=cfg.clip_grad)
        corrupt = dict(train=CorruptImages('training image', len(self.train_source), cfg.max_corrupt,
                                           self.train_source.name_of, self.run.log))
        self.session = Session(state_format=STATE_FORMAT, recipe=recipe, config=cfg, env=env, run=self.run,
                               step=self.step, scheduler=scheduler, classes=self.classes, corrupt=corrupt,
                               best=dict(bbox_AP=-1.0, epoch=None))
        self.last_eval: Dict[str, Any] = {}
        if resume_state is not None:
            self.session.check_classes(resume_state.get('classes'), self.train_source.description)
            self.session.restore(resume_state)
            self.run.log(f'resumed at iteration {self.iteration} (epoch {self.iteration // self.iters_per_epoch + 1} '
                         f'of {cfg.epochs})')
        if cfg.compile:
            model.backbone.body.compile()
        self.step.distribute(env, sync_batchnorm=True, log=self.run.log)

    @property
    def iteration(self) -> int:
        return self.step.global_step

    @property
    def total_iters(self) -> int:
        return self.cfg.epochs * self.iters_per_epoch

    # ---------------------------------------------------------------------------------
    def _weights_meta(self) -> Dict[str, Any]:
        meta = dict(recipe=self.recipe, iteration=self.iteration, backbone=self.cfg.backbone,
                    classes=json.dumps(list(self.classes)), category_ids=json.dumps(list(self.train_source.cat_ids)))
        meta.update(spec_metadata(self.spec))
        meta['polynext_det_config'] = json.dumps(config_to_dict(self.cfg))
        return meta

    def save(self, tag: str = 'last') -> None:
        self.session.save(tag, self._weights_meta(), spec=self.spec.to_dict(), iteration=self.iteration,
                          iters_per_epoch=self.iters_per_epoch, epochs_done=self.iteration // self.iters_per_epoch,
                          category_ids=list(self.train_source.cat_ids))

    # ---------------------------------------------------------------------------------
    def _micro_batches(self, epoch: int, start_batch: int) -> Iterator[Tuple[int, Any]]:
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start_batch * self.cfg.device_batch_size)
        b = start_batch
        for batch in self.train_loader:
            if b >= self.iters_per_epoch * self.layout.accumulation:
                break
            yield b, batch
            b += 1

    def train_epoch(self, epoch: int) -> None:
        """Train the rest of ``epoch`` (0-based), from the iteration the run is at."""
        cfg, step, acc = self.cfg, self.step, self.layout.accumulation
        model = step.model
        model.train()
        first = self.iteration - epoch * self.iters_per_epoch
        stream = self._micro_batches(epoch, first * acc)
        bar = progress(range(first, self.iters_per_epoch), total=self.iters_per_epoch - first,
                       desc=f'epoch {epoch + 1}/{cfg.epochs}', enabled=self.show_progress)
        bad: List[int] = []
        for _ in bar:
            for k in range(acc):
                b, (images, targets, flags) = next(stream)
                bad += [int(f) for f in flags if f >= 0]
                images = [img.to(self.device, non_blocking=True).float().div_(255) for img in images]
                with step.micro_batch(sync=k == acc - 1):
                    with step.autocast():
                        losses = model(images, _targets_to(targets, self.device))
                    loss = sum(losses.values())
                    step.backward(loss)
                n = float(len(images))
                parts = {g: 0.0 for g in LOSS_GROUPS}
                for name, value in losses.items():
                    parts[name.split('.')[-1]] += float(value.detach()) * n
                self.meters.add(loss=float(loss.detach()) * n, n=n, **parts)
            step.optimizer_step(float(loss.detach()), epoch=epoch, batch=b)
            self.session.scheduler.step()
            if self.show_progress and hasattr(bar, 'set_postfix') and self.meters['n']:
                bar.set_postfix(loss=f'{self.meters["loss"] / self.meters["n"]:.4f}', refresh=False)
            if cfg.log_every and self.iteration % cfg.log_every == 0:
                self._log_row()
            if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0 and \
                    self.iteration % self.iters_per_epoch:
                self.session.corrupt['train'].add(bad)
                bad = []
                self.save('last')
        if hasattr(bar, 'close'):
            bar.close()
        self.session.corrupt['train'].add(bad)

    def _train_metrics(self) -> Dict[str, Any]:
        red = self.meters.reduce()
        if not red['n']:
            return {}
        n = red['n']
        return dict(train_loss=red['loss'] / n, **{f'train_{g}': red[g] / n for g in LOSS_GROUPS},
                    grad_norm=Meters.mean_grad_norm(red))

    def _log_row(self, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        row: Dict[str, Any] = dict(iter=self.iteration, epoch=round(self.iteration / self.iters_per_epoch, 3),
                                   lr=self.step.optimizer.param_groups[0]['lr'] / self.step.optimizer.param_groups[0].get(
                                       'lr_mult', 1.0), **self._train_metrics(), **(extra or {}))
        self.meters.reset()
        row = self.session.add_row(row, 'iter')
        self.session.write_metrics('iter')
        self.run.log(self._row_line(row), console=bool(extra))
        return row

    def validate(self) -> Dict[str, Dict[str, float]]:
        """Box and mask AP on the validation images (every rank's share gathered; rank 0 scores and writes
        ``results_bbox.json`` / ``results_segm.json``); the metrics on every rank."""
        with oom_advice(BatchLayout(1, self.env.world_size, 1), 'evaluation'):
            bbox, segm, ids, bad = run_inference(self.step.module, self.val_loader, self.device,
                                                 self.val_source.cat_ids, show_progress=self.show_progress,
                                                 desc=f'eval @{self.iteration}', total=len(self.val_sampler))
        gathered = all_gather_objects((bbox, segm, ids, bad))
        names = sorted({self.val_source.name_of(i) for part in gathered for i in part[3]})
        if names:
            raise DataError(f'{len(names)} validation image(s) cannot be read, e.g. {", ".join(names[:3])}; the AP '
                            f'would be wrong. Fix or remove them.')
        metrics = None
        if self.env.is_main:
            bbox = [r for part in gathered for r in part[0]]
            segm = [r for part in gathered for r in part[1]]
            ids = [i for part in gathered for i in part[2]]
            write_results(self.run.path / 'results_bbox.json', bbox)
            write_results(self.run.path / 'results_segm.json', segm)
            metrics = coco_evaluate(evaluate_sources(self.val_source), dict(bbox=bbox, segm=segm), ids)
        return broadcast_object(metrics)

    def _evaluate(self, epoch: int, t_train: float) -> None:
        session = self.session
        t0 = time.time()
        metrics = self.validate()
        improved = metrics['bbox']['AP'] > session.best['bbox_AP']
        if improved:
            session.best = dict(bbox_AP=metrics['bbox']['AP'], segm_AP=metrics['segm']['AP'], epoch=epoch + 1)
        flat = {f'{t}_{k}': v for t, m in metrics.items() for k, v in m.items()}
        row = self._log_row(dict(flat, best_bbox_AP=session.best['bbox_AP'], train_time_s=round(t_train, 2),
                                 eval_time_s=round(time.time() - t0, 2)))
        self.last_eval = dict(row)
        self.save('last')
        if improved and self.env.is_main:
            session.copy_to_best()
        session.write_metrics('iter', CURVE_PANELS, title=f'{self.recipe} ({self.cfg.kind}, {self.cfg.backbone})')
        self.run.log(format_metrics(metrics), console=False)

    def fit(self) -> Dict[str, Any]:
        cfg, session = self.cfg, self.session
        session.write_config('polynext det train', DET_PRESETS.source(self.recipe))
        if self.iteration == 0:
            self.run.log(self._banner())
        while self.iteration < self.total_iters:
            epoch = self.iteration // self.iters_per_epoch
            t0 = time.time()
            self.train_epoch(epoch)
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                self._evaluate(epoch, time.time() - t0)
            else:
                if not (cfg.log_every and self.iteration % cfg.log_every == 0):
                    self._log_row()
                self.save('last')
                session.write_metrics('iter', CURVE_PANELS, title=f'{self.recipe} ({cfg.kind}, {cfg.backbone})')
        if self.env.is_main and cfg.demo_images:
            from .visualize import save_predictions
            path = save_predictions(self.step.module, self.val_source, self.run.path / 'predictions.png',
                                    self.eval_tf, self.device, num_images=cfg.demo_images)
            self.run.log(f'predictions (boxes and masks) beside the ground truth: {path}')
        best = session.best
        self.run.log(f'done: best box AP {best["bbox_AP"]:.2f} (mask AP {best.get("segm_AP", float("nan")):.2f}) '
                     f'at epoch {best["epoch"]}; run folder {self.run.path}')
        return dict(best=best, history=session.history, run=str(self.run.path), last_eval=self.last_eval)

    def _banner(self) -> str:
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.step.module.parameters())
        name = 'Mask R-CNN' if cfg.kind == 'mask_rcnn' else 'Cascade Mask R-CNN'
        return banner('polynext det train', self.recipe, f'{name} + {cfg.backbone}', n_params, self.num_classes,
                      self.train_source.description, self.layout,
                      f'AdamW lr {cfg.lr:g} wd {cfg.weight_decay:g}' +
                      (f' layer decay {cfg.layer_decay:g}' if cfg.layer_decay < 1 else ''),
                      f'{cfg.epochs} epochs × {self.iters_per_epoch} iterations, steps {list(cfg.lr_steps)}',
                      self.device.type, self.step.precision.name, str(self.run.path))

    @staticmethod
    def _row_line(row: Dict[str, Any]) -> str:
        s = f'iter {row["iter"]} (epoch {row["epoch"]:g})'
        if 'train_loss' in row:
            s += f'  loss {row["train_loss"]:.4f}'
        if 'bbox_AP' in row:
            s += f'  box AP {row["bbox_AP"]:.2f}  mask AP {row["segm_AP"]:.2f}  box AP50 {row["bbox_AP50"]:.2f}'
        return s + f'  lr {row["lr"]:.3g}'


# -------------------------------------------------------------------------------------------
# entry point
# -------------------------------------------------------------------------------------------

def train_detection(cfg: DetConfig, recipe: str, resume: Optional[str] = None, fresh: bool = False,
                    explicit: Optional[Dict[str, Any]] = None, show_progress: bool = True,
                    quiet: bool = False) -> Dict[str, Any]:
    """Train (or resume) a detection run; returns ``{'best', 'history', 'run', 'last_eval'}``.

    ``cfg``: a resolved config (``DET_PRESETS.resolve(...)``); ``recipe``: its name (the run folder's
    default name); ``resume``: a ``*.state.pt`` or run folder (re-running the same config in the same
    folder also resumes); ``fresh``: start over; ``explicit``: the keys set on the command line."""
    from ..factory import check_model_name
    from .data import require_pycocotools
    check_model_name(cfg.backbone)
    require_pycocotools()
    if cfg.dataset == 'coco' and not cfg.data and not resume:
        raise ConfigError(f"recipe '{recipe}' trains on COCO: pass --data PATH/COCO (or run `polynext det train` "
                          f"with no arguments for the generated demo set)")
    if not resume:   # bad folders, backbones and checkpoints fail before the run folder exists
        train_src, _ = build_sources(cfg)
        check_detector(cfg.spec(cfg.num_classes or len(train_src.classes)), cfg.initial_checkpoint)
    plan = plan_run(cfg, recipe, state_format=STATE_FORMAT, resume_safe_keys=RESUME_SAFE_KEYS,
                    command='polynext det train', resume=resume, fresh=fresh, explicit=explicit,
                    tunable_keys=TUNABLE_ON_RESUME + ('cell_grad_clip',))

    result = launch(plan, lambda env, plan: DetTrainer(plan.config, plan.recipe, plan.path, env,
                                                       resume_state=plan.state, show_progress=show_progress,
                                                       quiet=quiet).fit(),
                    progress=('epochs_done', plan.config.epochs, 'epochs'),
                    best=lambda b: f'best box AP {b.get("bbox_AP", float("nan")):.2f}', quiet=quiet)
    result.setdefault('last_eval', {})
    return result
