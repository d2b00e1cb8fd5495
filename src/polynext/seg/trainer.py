"""Iteration-based segmentation training (``polynext seg train``): what differs from the other tasks.

One ``SegTrainer`` per process; under ``torchrun`` every rank runs it, DDP keeps the replicas in
step and the heads' BatchNorms become SyncBatchNorm (on CUDA). The engine (``polynext.engine``)
does the run folder, resumption, the backend, precision, the micro-batch and optimizer step,
checkpoints and metric files; this file holds the segmentor, its data, loss, metrics and the
iteration-counted schedule. Per iteration (mmseg's ``IterBasedRunner``):

* ``accumulation`` micro-batches of ``device_batch_size`` crops; forward (under the run's
  autocast), loss = CE(decode logits ↑ crop size) + ``aux_weight`` · CE(aux logits ↑ crop size),
  in fp32, ignore index 255, averaged over all pixels (mmseg) or the labelled ones;
* the engine's optimizer step (global-norm clip at ``clip_grad`` when set, the non-finite check,
  AdamW with the parameter-wise lr / decay multipliers), then the learning rate of the next
  iteration (poly × linear warm-up, per parameter group);
* every ``log_every`` iterations a metrics row (loss, decode accuracy, lr), every
  ``checkpoint_every`` the resumable ``last`` checkpoint, every ``eval_every`` (and at the end)
  an evaluation (mIoU / mAcc / aAcc) and, when the mIoU improved, ``best``.

The data order is the engine's ``ResumableDistributedSampler`` (a new shuffle per pass over the
data, incomplete batches dropped) and every crop's augmentation is seeded by (seed, pass,
index), so a resumed run continues with exactly the crops it would have seen.

``train_segmentation(cfg, recipe)`` is the Python entry point (``polynext seg train`` calls it).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.backend import optimizer_kwargs
from ..engine.config import config_to_dict
from ..engine.data import CorruptImages, make_loader
from ..engine.determinism import ResumableDistributedSampler, ShardSampler
from ..engine.distributed import DistEnv, all_gather_objects
from ..engine.memory import BatchLayout, oom_advice
from ..engine.metrics import Meters, banner
from ..engine.precision import Precision
from ..engine.run import TUNABLE_ON_RESUME, launch, plan_run, progress, start_run
from ..engine.session import Session
from ..engine.step import TrainStep, to_channels_last
from ..errors import ConfigError, DataError
from .data import ADE20KSource, SegSamples, collate_eval, collate_train
from .inference import evaluate
from .loss import upsampled_cross_entropy
from .metrics import SegMetrics, format_per_class
from .recipes import RESUME_SAFE_KEYS, SEG_PRESETS, SegConfig, effective_custom_keys
from .segmentor import UperNet, build_segmentor, spec_metadata
from .synthetic import ShapesSource
from .transforms import build_eval_transform, build_train_transform

__all__ = ['SegTrainer', 'train_segmentation', 'param_rule', 'build_param_groups', 'poly_warmup_factor',
           'seg_loss', 'build_sources', 'STATE_FORMAT']

STATE_FORMAT = 'polynext.seg/1'

CURVE_PANELS = [
    ('loss', 'cross-entropy', [('train_loss', 'train (decode + 0.4 aux)'), ('train_decode_loss', 'train decode')]),
    ('validation', '%', [('mIoU', 'mIoU'), ('mAcc', 'mAcc'), ('aAcc', 'aAcc')]),
]


# -------------------------------------------------------------------------------------------
# optimizer: mmcv's DefaultOptimizerConstructor custom_keys, and the poly schedule
# -------------------------------------------------------------------------------------------

def param_rule(name: str, custom_keys: Mapping[str, Mapping[str, float]]) -> Tuple[float, float, Optional[str]]:
    """(lr_mult, decay_mult, key) of one parameter: the first key, in order of decreasing length
    (alphabetical among equal lengths), that is a substring of ``name`` (mmcv's rule)."""
    for key in sorted(sorted(custom_keys), key=len, reverse=True):
        if key in name:
            rule = custom_keys[key]
            return float(rule.get('lr_mult', 1.0)), float(rule.get('decay_mult', 1.0)), key
    return 1.0, 1.0, None


def build_param_groups(model: nn.Module, lr: float, weight_decay: float,
                       custom_keys: Mapping[str, Mapping[str, float]]) -> List[Dict[str, Any]]:
    """AdamW parameter groups: one per distinct (lr_mult, decay_mult), in first-seen order."""
    groups: Dict[Tuple[float, float], Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult, decay_mult, _ = param_rule(name, custom_keys)
        g = groups.setdefault((lr_mult, decay_mult), dict(params=[], names=[], lr=lr * lr_mult,
                                                          weight_decay=weight_decay * decay_mult,
                                                          lr_mult=lr_mult, decay_mult=decay_mult))
        g['params'].append(p)
        g['names'].append(name)
    return list(groups.values())


def poly_warmup_factor(it: int, cfg: SegConfig, base_lr: float) -> float:
    """lr(it) / base_lr of mmcv's ``PolyLrUpdaterHook`` with linear warm-up (``it`` 0-based):
    regular = (base − min)(1 − it / iters)^power + min; in the first ``warmup_iters`` the regular
    lr is multiplied by 1 − (1 − it / warmup_iters)(1 − warmup_ratio)."""
    coeff = (1.0 - min(it, cfg.iters) / cfg.iters) ** cfg.poly_power
    lr = (base_lr - cfg.min_lr) * coeff + cfg.min_lr
    if cfg.warmup_iters and it < cfg.warmup_iters:
        lr *= 1.0 - (1.0 - it / cfg.warmup_iters) * (1.0 - cfg.warmup_ratio)
    return lr / base_lr if base_lr else 0.0


# -------------------------------------------------------------------------------------------
# loss
# -------------------------------------------------------------------------------------------

def _ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, average: str,
        align_corners: bool = False) -> torch.Tensor:
    """CE of the logits up-sampled to the label size, float32, without keeping the full-resolution logits
    (``seg/loss.py``)."""
    total = upsampled_cross_entropy(logits, target, ignore_index, align_corners)
    if average == 'all_pixels':        # mmseg: ignored pixels contribute 0 but count in the mean
        return total / target.numel()
    valid = (target != ignore_index).sum()
    return total / valid.clamp(min=1)


def seg_loss(outputs: Mapping[str, torch.Tensor], target: torch.Tensor, aux_weight: float = 0.4,
             ignore_index: int = 255, average: str = 'all_pixels') -> Tuple[torch.Tensor, Dict[str, float]]:
    """Total loss and its parts (decode loss, aux loss, decode pixel accuracy in %)."""
    decode = _ce(outputs['out'], target, ignore_index, average)
    total = decode
    parts = dict(decode_loss=float(decode.detach()))
    if 'aux' in outputs and aux_weight:
        aux = _ce(outputs['aux'], target, ignore_index, average)
        total = total + aux_weight * aux
        parts['aux_loss'] = float(aux.detach())
    return total, parts


def _decode_accuracy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> Tuple[float, float]:
    """(correct, labelled) pixels of the decode logits up-sampled to the label size (mmseg acc_seg)."""
    with torch.no_grad():
        pred = F.interpolate(logits.float(), size=target.shape[-2:], mode='bilinear', align_corners=False).argmax(1)
        valid = target != ignore_index
        return float((pred[valid] == target[valid]).sum()), float(valid.sum())


# -------------------------------------------------------------------------------------------
# data
# -------------------------------------------------------------------------------------------

def build_sources(cfg: SegConfig):
    """(train source, val source, class names)."""
    if cfg.dataset == 'shapes':
        train = ShapesSource('train', cfg.shapes_train, cfg.shapes_size, seed=cfg.seed)
        val = ShapesSource('val', cfg.shapes_val, cfg.shapes_size, seed=cfg.seed)
    else:
        if not cfg.data:
            raise ConfigError('pass --data PATH/ADEChallengeData2016')
        train = ADE20KSource(cfg.data, 'train', cfg.reduce_zero_label)
        val = ADE20KSource(cfg.data, 'val', cfg.reduce_zero_label)
    return train, val, list(train.classes)


class SegTrainer:
    """State and loop of one segmentation training process."""

    def __init__(self, cfg: SegConfig, recipe: str, run_dir: Path, env: DistEnv,
                 resume_state: Optional[Dict[str, Any]] = None, show_progress: bool = True, quiet: bool = False):
        self.cfg, self.recipe, self.env, self.device = cfg, recipe, env, env.device
        self.cuda = self.device.type == 'cuda'
        if cfg.device_batch_size < 2 and not (self.cuda and env.world_size > 1):
            raise ConfigError(
                'a per-device batch of 1 cannot train UperNet here: its pyramid pooling normalises a 1x1 map with '
                'BatchNorm, which needs 2 or more images for batch statistics. Use --device-batch-size 2 or more (on '
                'several GPUs, SyncBatchNorm pools the images of all devices, so 1 per GPU works)')
        self.show_progress = show_progress and env.is_main
        self.run, self.layout = start_run(run_dir, env, cfg, quiet)

        self.train_source, self.val_source, self.classes = build_sources(cfg)
        self.num_classes = cfg.num_classes or len(self.classes)
        if cfg.num_classes and cfg.num_classes != len(self.classes):
            raise DataError(f'num_classes={cfg.num_classes} but {self.train_source.description} has '
                            f'{len(self.classes)} classes')
        self.spec = cfg.spec(self.num_classes)
        model = self._build_model(resume_state is None)
        optimizer = self._build_optimizer(model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [lambda it, base=g['lr']: poly_warmup_factor(it, cfg, base) for g in optimizer.param_groups])

        train_tf = build_train_transform(cfg.img_scale, cfg.ratio_range, cfg.crop_size, cfg.cat_max_ratio, cfg.hflip,
                                         cfg.photometric, cfg.mean, cfg.std, cfg.ignore_index)
        eval_tf = build_eval_transform(cfg.eval_scale, cfg.mean, cfg.std)
        fallback = (cfg.crop_size, cfg.crop_size)
        self.train_set = SegSamples(self.train_source, train_tf, train=True, seed=cfg.seed,
                                    ignore_index=cfg.ignore_index, fallback_size=fallback)
        self.val_set = SegSamples(self.val_source, eval_tf, train=False, ignore_index=cfg.ignore_index,
                                  fallback_size=fallback)
        self.sampler = ResumableDistributedSampler(self.train_set, env.world_size, env.rank, shuffle=True,
                                                   seed=cfg.seed)
        self.batches_per_pass = self.sampler.num_samples // cfg.device_batch_size
        if self.batches_per_pass == 0:
            raise DataError(f'{self.train_source.description}: {self.sampler.num_samples} training images per device '
                            f'is less than one batch of {cfg.device_batch_size}; use a smaller --device-batch-size')
        self.train_loader = make_loader(self.train_set, self.sampler, cfg.device_batch_size, cfg.workers, cfg.seed,
                                        pin_memory=self.cuda, drop_last=True, collate_fn=collate_train)
        self.val_sampler = ShardSampler(len(self.val_set), env.world_size, env.rank)
        self.val_loader = make_loader(self.val_set, self.val_sampler, 1, cfg.workers, cfg.seed, pin_memory=self.cuda,
                                      collate_fn=collate_eval)

        self.meters = Meters('loss', 'decode_loss', 'aux_loss', 'correct', 'labelled', 'n')
        self.step = TrainStep(model, optimizer, Precision(self.device, cfg.amp, cfg.cpu_amp), self.layout,
                              self.meters, device=self.device, clip_grad=cfg.clip_grad,
                              channels_last=cfg.channels_last)
        corrupt = dict(train=CorruptImages('training image', len(self.train_source), cfg.max_corrupt,
                                           self.train_source.name_of, self.run.log))
        self.session = Session(state_format=STATE_FORMAT, recipe=recipe, config=cfg, env=env, run=self.run,
                               step=self.step, scheduler=scheduler, classes=self.classes, corrupt=corrupt,
                               best=dict(mIoU=-1.0, iteration=None))
        self.last_eval: Dict[str, Any] = {}
        if resume_state is not None:
            if 'global_step' not in resume_state:   # a state written before the shared engine (polynext 0.1.0)
                resume_state = dict(resume_state, global_step=resume_state['iteration'],
                                    corrupt=dict(train=list(resume_state.get('corrupt') or [])))
            self.session.check_classes(resume_state.get('classes'), self.train_source.description)
            self.session.restore(resume_state)
            self.run.log(f'resumed at iteration {self.iteration} of {cfg.iters}')
        if cfg.compile:
            model.backbone.compile()
        self.step.distribute(env, sync_batchnorm=True, log=self.run.log)

    @property
    def iteration(self) -> int:
        """Iterations done (= the engine's optimizer steps)."""
        return self.step.global_step

    @property
    def model(self) -> nn.Module:
        return self.step.model

    # ---------------------------------------------------------------------------------
    def _build_model(self, load_initial: bool) -> UperNet:
        cfg = self.cfg
        ckpt = cfg.initial_checkpoint if load_initial else None
        model = build_segmentor(self.spec, checkpoint=ckpt)
        if ckpt:
            self.run.log(f'backbone weights: {ckpt}')
        if cfg.cell_grad_clip is not None and not model.set_cell_grad_clip(cfg.cell_grad_clip):
            raise ConfigError(f"cell_grad_clip applies to PolyNeXt backbones only, not '{cfg.backbone}'; "
                              f"set --set cell_grad_clip=null")
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing()
        model.to(self.device)
        if cfg.channels_last:
            to_channels_last(model)
        return model

    def _build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = self.cfg
        groups = build_param_groups(model, cfg.lr, cfg.weight_decay, effective_custom_keys(cfg))
        for g in groups:
            g.pop('names')
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.opt_betas), eps=cfg.opt_eps,
                                 weight_decay=cfg.weight_decay, **optimizer_kwargs(self.device))

    # ---------------------------------------------------------------------------------
    # state
    # ---------------------------------------------------------------------------------
    def _weights_meta(self) -> Dict[str, Any]:
        meta = dict(recipe=self.recipe, iteration=self.iteration, backbone=self.cfg.backbone,
                    classes=json.dumps(list(self.classes)))
        meta.update(spec_metadata(self.spec))
        meta['polynext_seg_config'] = json.dumps(config_to_dict(self.cfg))
        return meta

    def save(self, tag: str = 'last', unreadable: Optional[List[int]] = None) -> None:
        """Checkpoint ``tag`` (collective: every rank contributes its RNG state and its unreadable images)."""
        self.session.save(tag, self._weights_meta(), unreadable=dict(train=unreadable or []),
                          spec=self.spec.to_dict(), iteration=self.iteration)

    # ---------------------------------------------------------------------------------
    # training
    # ---------------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[Tuple[int, int, Any]]:
        """(pass, batch index in the pass, batch) from micro-batch ``iteration × accumulation`` on."""
        m = self.iteration * self.layout.accumulation
        epoch, pos = divmod(m, self.batches_per_pass)
        while True:
            self.sampler.set_epoch(epoch)
            self.sampler.set_start(pos * self.cfg.device_batch_size)
            b = pos
            for batch in self.train_loader:
                if b >= self.batches_per_pass:
                    break
                yield epoch, b, batch
                b += 1
            epoch, pos = epoch + 1, 0

    def train_steps(self, until: int) -> None:
        """Train up to iteration ``until`` (exclusive of evaluation)."""
        cfg, step = self.cfg, self.step
        model = step.model
        model.train()
        stream = self._micro_batches()
        bar = progress(range(self.iteration, until), total=until - self.iteration,
                       desc=f'iter {self.iteration}→{until}/{cfg.iters}', enabled=self.show_progress)
        bad: List[int] = []
        for _ in bar:
            for k in range(self.layout.accumulation):
                epoch, b, (x, y, skipped) = next(stream)
                if bool((skipped >= 0).any()):
                    bad += skipped[skipped >= 0].tolist()
                x, y = step.to_device(x, y)
                with step.micro_batch(sync=k == self.layout.accumulation - 1):
                    with step.autocast():
                        outputs = model(x)
                    loss, parts = seg_loss(outputs, y, cfg.aux_weight, cfg.ignore_index, cfg.loss_average)
                    step.backward(loss)
                n = float(x.shape[0])
                correct, labelled = _decode_accuracy(outputs['out'].detach(), y, cfg.ignore_index)
                self.meters.add(loss=float(loss.detach()) * n, decode_loss=parts['decode_loss'] * n,
                                aux_loss=parts.get('aux_loss', 0.0) * n, correct=correct, labelled=labelled, n=n)
            step.optimizer_step(float(loss.detach()), epoch=epoch, batch=b)
            self.session.scheduler.step()
            if self.meters['n']:
                bar.set_postfix(loss=f'{self.meters["loss"] / self.meters["n"]:.4f}', refresh=False)
            if cfg.log_every and self.iteration % cfg.log_every == 0:
                self._log_row()
            if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0 and self.iteration < until:
                self.save('last', unreadable=bad)
                bad = []
        bar.close()
        self.session.corrupt['train'].add(bad)

    def _train_metrics(self) -> Dict[str, Any]:
        red = self.meters.reduce()
        if not red['n']:
            return {}
        n = red['n']
        return dict(train_loss=red['loss'] / n, train_decode_loss=red['decode_loss'] / n,
                    train_aux_loss=red['aux_loss'] / n,
                    train_acc=100.0 * red['correct'] / max(red['labelled'], 1.0),
                    grad_norm=Meters.mean_grad_norm(red))

    def _log_row(self, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        row: Dict[str, Any] = dict(iter=self.iteration, lr=self.step.optimizer.param_groups[0]['lr'],
                                   **self._train_metrics(), **(extra or {}))
        self.meters.reset()
        row = self.session.add_row(row, 'iter')
        self.session.write_metrics('iter')
        self.run.log(self._row_line(row), console=bool(extra))
        return row

    def validate(self) -> SegMetrics:
        cfg = self.cfg
        with oom_advice(BatchLayout(1, self.env.world_size, 1), 'evaluation'):
            cm, bad = evaluate(self.step.module, self.val_loader, self.num_classes, self.device, cfg.eval_mode,
                               cfg.eval_crop, cfg.eval_stride, cfg.ignore_index, channels_last=cfg.channels_last,
                               window_batch=cfg.eval_window_batch, show_progress=self.show_progress,
                               desc=f'eval @{self.iteration}', total=len(self.val_sampler))
        gathered = all_gather_objects(bad)
        names = sorted({self.val_source.name_of(i) for part in gathered for i in part})
        if names:
            raise DataError(f'{len(names)} validation image(s) cannot be read, e.g. {", ".join(names[:3])}; '
                            f'the metrics would be wrong. Fix or remove them.')
        return cm.reduce().compute(self.classes)

    def _evaluate_and_checkpoint(self, t_train: float) -> None:
        session = self.session
        t0 = time.time()
        metrics = self.validate()
        improved = metrics.miou > session.best['mIoU']
        if improved:
            session.best = dict(mIoU=metrics.miou, iteration=self.iteration)
        row = self._log_row(dict(mIoU=metrics.miou, mAcc=metrics.macc, aAcc=metrics.aacc,
                                 best_mIoU=session.best['mIoU'], train_time_s=round(t_train, 2),
                                 eval_time_s=round(time.time() - t0, 2)))
        self.last_eval = dict(row, per_class=dict(zip(metrics.class_names, metrics.iou)))
        self.save('last')
        if improved and self.env.is_main:
            session.copy_to_best()
        session.write_metrics('iter', CURVE_PANELS, title=f'{self.recipe} ({self.cfg.backbone})')
        self.run.log(format_per_class(metrics), console=False)

    def fit(self) -> Dict[str, Any]:
        cfg, session = self.cfg, self.session
        session.write_config('polynext seg train', SEG_PRESETS.source(self.recipe))
        if self.iteration == 0:
            self.run.log(self._banner())
        while self.iteration < cfg.iters:
            until = min(cfg.iters, (self.iteration // cfg.eval_every + 1) * cfg.eval_every)
            t0 = time.time()
            self.train_steps(until)
            self._evaluate_and_checkpoint(time.time() - t0)
        if self.env.is_main and cfg.demo_images:
            from .visualize import save_predictions
            path = save_predictions(self.step.module, self.val_source, self.run.path / 'predictions.png',
                                    cfg, self.device, num_images=cfg.demo_images)
            self.run.log(f'predictions beside the ground truth: {path}')
        best = session.best
        self.run.log(f'done: best mIoU {best["mIoU"]:.2f} at iteration {best["iteration"]}; '
                     f'run folder {self.run.path}')
        return dict(best=best, history=session.history, run=str(self.run.path), last_eval=self.last_eval)

    def _banner(self) -> str:
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.step.module.parameters())
        return banner('polynext seg train', self.recipe, f'UperNet + {cfg.backbone}', n_params, self.num_classes,
                      self.train_source.description, self.layout, f'AdamW lr {cfg.lr:g} wd {cfg.weight_decay:g}',
                      f'{cfg.iters} iterations, eval every {cfg.eval_every} ({cfg.eval_mode})', self.device.type,
                      self.step.precision.name, str(self.run.path))

    @staticmethod
    def _row_line(row: Dict[str, Any]) -> str:
        s = f'iter {row["iter"]}'
        if 'train_loss' in row:
            s += f'  loss {row["train_loss"]:.4f}  acc {row["train_acc"]:.2f}%'
        if 'mIoU' in row:
            s += f'  mIoU {row["mIoU"]:.2f}  mAcc {row["mAcc"]:.2f}  aAcc {row["aAcc"]:.2f}'
        return s + f'  lr {row["lr"]:.3g}'


# -------------------------------------------------------------------------------------------
# entry point
# -------------------------------------------------------------------------------------------

def train_segmentation(cfg: SegConfig, recipe: str, resume: Optional[str] = None, fresh: bool = False,
                       explicit: Optional[Dict[str, Any]] = None, show_progress: bool = True,
                       quiet: bool = False) -> Dict[str, Any]:
    """Train (or resume) a segmentation run; returns ``{'best', 'history', 'run', 'last_eval'}``.

    ``cfg``: a resolved config (``SEG_PRESETS.resolve(...)``); ``recipe``: its name (the run folder's default
    name); ``resume``: a ``*.state.pt`` or run folder (re-running the same config in the same folder also
    resumes); ``fresh``: start over; ``explicit``: the keys set on the command line (checked on resume)."""
    from ..factory import check_model_name
    check_model_name(cfg.backbone)
    if cfg.dataset == 'ade20k' and not cfg.data and not resume:
        raise ConfigError(f"recipe '{recipe}' trains on ADE20K: pass --data PATH/ADEChallengeData2016 (or run "
                          f"`polynext seg train` with no arguments for the generated demo set)")
    plan = plan_run(cfg, recipe, state_format=STATE_FORMAT, resume_safe_keys=RESUME_SAFE_KEYS,
                    command='polynext seg train', resume=resume, fresh=fresh, explicit=explicit,
                    tunable_keys=TUNABLE_ON_RESUME + ('cell_grad_clip',))

    result = launch(plan, lambda env, plan: SegTrainer(plan.config, plan.recipe, plan.path, env,
                                                       resume_state=plan.state, show_progress=show_progress,
                                                       quiet=quiet).fit(),
                    progress=('iteration', plan.config.iters, 'iterations'),
                    best=lambda b: f'best mIoU {b.get("mIoU", float("nan")):.2f}', quiet=quiet)
    result.setdefault('last_eval', {})
    return result
