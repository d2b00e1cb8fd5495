"""Classification training (``polynext train``): what differs from the other tasks, on the shared engine.

One ``Trainer`` per process; under ``torchrun`` every rank runs it and DDP keeps the replicas in
step. The engine (``polynext.engine``) does the run folder, resumption, the backend, precision,
the micro-batch and optimizer step, the EMA, checkpoints and metric files; this file holds the
classifier, its data, loss, metrics and the epoch-counted schedule. In the reference's order
(spec §9):

* at each epoch start: head dropout p_e = min(p, p·e/R) (``head_dropout_ramp``), the epoch's
  learning rate (timm scheduler, ``step(epoch)``; per-step schedules call ``step_update``);
* per micro-batch: Mixup/CutMix on the device batch (timm ``Mixup``, label smoothing applied to
  the mixed targets), forward + loss under autocast, backward of loss / accumulation;
* per optimizer step (every ``accumulation`` micro-batches and at the last one of the epoch):
  the engine's step (clip, non-finite check, step, EMA update from ``ema_start_epoch``), the
  scheduler, and a mid-epoch checkpoint every ``checkpoint_every`` steps;
* at each epoch end: validation of the raw weights (and the EMA), metrics reduced over ranks,
  the run folder updated (metrics, curve, ``last`` and, when the top-1 improved, ``best``).

``train(cfg, recipe)`` is the Python entry point (``polynext train`` calls it).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ..engine.backend import optimizer_kwargs
from ..engine.data import CorruptImages, make_loader
from ..engine.determinism import ResumableDistributedSampler, ShardSampler
from ..engine.distributed import DistEnv
from ..engine.ema import EmaTracker
from ..engine.memory import BatchLayout, oom_advice
from ..engine.metrics import Meters, banner
from ..engine.precision import Precision
from ..engine.run import launch, plan_run, progress, start_run
from ..engine.session import Session
from ..engine.step import TrainStep, to_channels_last
from ..errors import CheckpointError, ConfigError, DataError
from .data import DataBundle, build_data
from .recipes import PRESETS, TrainConfig
from .validate import evaluate

__all__ = ['Trainer', 'train', 'build_model', 'build_optimizer', 'build_scheduler', 'build_loss', 'head_dropout_at',
           'STATE_FORMAT', 'RESUME_SAFE_KEYS']

STATE_FORMAT = 'polynext.train/1'
#: config keys that may differ between a run and its resumption
RESUME_SAFE_KEYS = ('data', 'output', 'workers', 'download', 'compile', 'checkpoint_every', 'log_every', 'device',
                    'max_corrupt', 'threads', 'grad_checkpointing')

CURVE_PANELS = [
    ('loss', 'cross-entropy', [('train_loss', 'train (smoothed / mixed targets)'), ('val_loss', 'val')]),
    ('accuracy', 'top-1 (%)', [('train_top1', 'train'), ('val_top1', 'val'),
                               ('val_ema_top1', 'val EMA')]),
]


def _classifier_keys(model: nn.Module):
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    names = cfg.get('classifier') or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f'{n}.{p}' for n in names for p in ('weight', 'bias'))


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The recipe's classifier: drop path, and the head dropout where the model family puts it (PolyNeXt:
    before the classifier; MetaFormer MLP heads: between their norm and fc2, the authors' ``--head-dropout``)."""
    from ..factory import create_model, head_dropout_kwargs
    return create_model(cfg.model, num_classes=num_classes, drop_path_rate=cfg.drop_path,
                        **head_dropout_kwargs(cfg.model, cfg.head_dropout), **cfg.model_kwargs)


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """timm ``create_optimizer_v2``: one param group decaying every parameter (the reference), or
    timm's split (1-D params and ``model.no_weight_decay()`` undecayed) with ``wd_exclusions``."""
    from timm.optim import create_optimizer_v2
    kw: Dict[str, Any] = dict(eps=cfg.opt_eps, betas=tuple(cfg.opt_betas))
    if cfg.optimizer == 'lamb':
        kw.update(max_grad_norm=cfg.lamb_max_grad_norm, decoupled_decay=cfg.lamb_decoupled_decay)
    elif fused:
        kw.update(fused=True)       # engine.backend.optimizer_kwargs: the fused AdamW kernel
    # a plain parameter list gives one group (timm would honour model.no_weight_decay() for a module)
    target = model if cfg.wd_exclusions else [p for p in model.parameters() if p.requires_grad]
    return create_optimizer_v2(target, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               filter_bias_and_bn=cfg.wd_exclusions, **kw)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """timm's cosine scheduler (warm-up, ``min_lr``, cool-down), stepped per epoch or per optimizer
    step; ``None`` for a constant learning rate. lr_e = min + (lr - min)(1 + cos(pi e / epochs)) / 2."""
    if cfg.schedule == 'constant':
        return None
    from timm.scheduler import create_scheduler_v2
    sched, _ = create_scheduler_v2(
        optimizer, sched='cosine', num_epochs=cfg.epochs, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
        warmup_epochs=cfg.warmup_epochs, cooldown_epochs=cfg.cooldown_epochs,
        step_on_epochs=cfg.schedule_granularity == 'epoch', updates_per_epoch=steps_per_epoch)
    return sched


def build_loss(cfg: TrainConfig, num_classes: int):
    """(timm ``Mixup`` or ``None``, criterion).

    With mixing: per device batch, CutMix with probability ``mix_switch_prob`` else MixUp, the
    batch mixed with its reverse (the reference's ``RandomChoice([CutMix(1.0), MixUp(0.8)])``
    mixes with the batch rolled by one: the same distribution over a shuffled batch); the
    targets are smoothed after mixing, which equals ``CrossEntropyLoss(label_smoothing)`` on
    the mixed soft targets. Without mixing: timm ``LabelSmoothingCrossEntropy``."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if cfg.mixing:
        mix = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=1.0,
                    switch_prob=cfg.mix_switch_prob, mode='batch', correct_lam=True,
                    label_smoothing=cfg.label_smoothing, num_classes=num_classes)
        return mix, SoftTargetCrossEntropy()
    if cfg.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(cfg.label_smoothing)
    return None, nn.CrossEntropyLoss()


def head_dropout_at(cfg: TrainConfig, epoch: int) -> float:
    """Head dropout of (0-based) ``epoch``: min(p, p·e/R) with the ramp, else p."""
    if not cfg.head_dropout_ramp:
        return cfg.head_dropout
    return min(cfg.head_dropout, cfg.head_dropout * epoch / cfg.head_dropout_ramp)


class Trainer:
    """State and loop of one classification training process."""

    def __init__(self, cfg: TrainConfig, recipe: str, run_dir: Path, env: DistEnv,
                 resume_state: Optional[Dict[str, Any]] = None, show_progress: bool = True, quiet: bool = False):
        self.cfg, self.recipe, self.env, self.device = cfg, recipe, env, env.device
        self.show_progress = show_progress and env.is_main
        self.run, self.layout = start_run(run_dir, env, cfg, quiet)
        cuda = self.device.type == 'cuda'

        self.data: DataBundle = build_data(cfg)
        self.num_classes = cfg.num_classes or self.data.num_classes
        if cfg.num_classes and cfg.num_classes != self.data.num_classes:
            raise DataError(f'the recipe sets num_classes={cfg.num_classes} but {self.data.description} has '
                            f'{self.data.num_classes} classes')
        model = self._build_model()
        ema = EmaTracker(model, cfg.ema_decay, cfg.ema_start_epoch, cfg.ema_init) if cfg.ema else None
        optimizer = build_optimizer(model, cfg, fused=bool(optimizer_kwargs(self.device).get('fused')))
        self.train_sampler = ResumableDistributedSampler(self.data.train, env.world_size, env.rank, shuffle=True,
                                                         seed=cfg.seed)
        self.train_loader = make_loader(self.data.train, self.train_sampler, cfg.device_batch_size, cfg.workers,
                                        cfg.seed, pin_memory=cuda, drop_last=cfg.mixing)
        self.val_loader = make_loader(self.data.val, ShardSampler(len(self.data.val), env.world_size, env.rank),
                                      cfg.device_batch_size, cfg.workers, cfg.seed, pin_memory=cuda)
        self.batches_per_epoch = self._batches_per_epoch()
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.layout.accumulation)
        scheduler = build_scheduler(optimizer, cfg, self.steps_per_epoch)
        self.mixup, self.criterion = build_loss(cfg, self.num_classes)

        self.meters = Meters('loss', 'correct', 'n')
        self.step = TrainStep(model, optimizer, Precision(self.device, cfg.amp, cfg.cpu_amp), self.layout,
                              self.meters, device=self.device, clip_grad=cfg.clip_grad,
                              channels_last=cfg.channels_last, ema=ema)
        corrupt = {split: CorruptImages(f'{split} image', len(ds), cfg.max_corrupt, ds.path_of, self.run.log)
                   for split, ds in (('train', self.data.train), ('val', self.data.val))}
        self.session = Session(state_format=STATE_FORMAT, recipe=recipe, config=cfg, env=env, run=self.run,
                               step=self.step, scheduler=scheduler, classes=self.data.classes, corrupt=corrupt,
                               best=dict(top1=-1.0, epoch=None, weights=None))
        # progress counters (restored on resume; the optimizer steps are the engine's global_step)
        self.epoch = 0                 # epoch in progress
        self.batch_in_epoch = 0        # micro-batches of that epoch already trained
        if resume_state is not None:
            self._restore(resume_state)
        if cfg.compile:
            model.compile()
        self.step.distribute(env)

    # ---------------------------------------------------------------------------------
    # set-up
    # ---------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.step.model

    @property
    def ema(self) -> Optional[EmaTracker]:
        return self.step.ema

    def _build_model(self) -> nn.Module:
        cfg = self.cfg
        model = build_model(cfg, self.num_classes)
        if cfg.initial_checkpoint:
            self._load_initial(model)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing()      # timm's switch (PolyNeXt: per cell; MetaFormer: per stage)
        model.to(self.device)
        if cfg.channels_last:
            to_channels_last(model)
        return model

    def _load_initial(self, model: nn.Module) -> None:
        """Strict load of ``initial_checkpoint`` (any layout), with the 21K → 1K head mapping."""
        from ..checkpoint import convert_to_model_layout, load_state_dict_strict, read_checkpoint, unwrap_state_dict
        from .class_maps import map_head_rows
        cfg = self.cfg
        sd = convert_to_model_layout(unwrap_state_dict(read_checkpoint(cfg.initial_checkpoint)), model)
        if cfg.head_map:
            sd, mapped = map_head_rows(sd, cfg.head_map)
            self.run.log(f'head mapped 21841 → 1000 classes ({", ".join(mapped)})')
        cls_keys = [k for k in _classifier_keys(model) if k in model.state_dict()]
        if cls_keys and cls_keys[0] in sd:
            n_ckpt = int(sd[cls_keys[0]].shape[0])
            if n_ckpt != self.num_classes:
                raise CheckpointError(
                    f'the initial checkpoint {cfg.initial_checkpoint} has {n_ckpt} classes but the data has '
                    f'{self.num_classes} ({self.data.description}); use data with the same classes, or '
                    f'--set head_map=in21k_to_in1k for a 21K checkpoint on ImageNet-1k')
        load_state_dict_strict(model, sd)
        self.run.log(f'initial weights: {cfg.initial_checkpoint}')

    def _batches_per_epoch(self) -> int:
        n = self.train_sampler.num_samples
        b = self.cfg.device_batch_size
        batches = n // b if self.cfg.mixing else math.ceil(n / b)
        if batches == 0:
            raise DataError(f'{self.data.description}: {n} training images per device is less than one batch of '
                            f'{b}; use a smaller --device-batch-size')
        return batches

    # ---------------------------------------------------------------------------------
    # state
    # ---------------------------------------------------------------------------------
    def _restore(self, state: Dict[str, Any]) -> None:
        self.session.check_classes(state.get('classes'), self.data.description)
        self.session.restore(state)
        self.epoch = int(state['epoch'])
        self.batch_in_epoch = int(state['batch_in_epoch'])
        where = (f'epoch {self.epoch + 1}, batch {self.batch_in_epoch}' if self.batch_in_epoch else
                 f'the start of epoch {self.epoch + 1}')
        self.run.log(f'resumed from {where} (optimizer step {self.step.global_step})')

    def save(self, tag: str = 'last', unreadable: Optional[List[int]] = None) -> None:
        """Checkpoint ``tag`` (collective: every rank contributes its RNG state and its unreadable images)."""
        self.session.save(tag, self._weights_meta('raw'), unreadable=dict(train=unreadable or []), epoch=self.epoch,
                          batch_in_epoch=self.batch_in_epoch)

    def _weights_meta(self, which: str) -> Dict[str, Any]:
        return {'format': 'polynext', 'architecture': self.cfg.model, 'num_classes': self.num_classes,
                'model_kwargs': dict(self.cfg.model_kwargs), 'classes': list(self.data.classes),
                'recipe': self.recipe, 'epoch': self.epoch, 'weights': which,
                'eval': dict(resize=self.cfg.eval_resize, crop=self.cfg.eval_crop,
                             interpolation=self.cfg.eval_interpolation, mean=list(self.cfg.mean),
                             std=list(self.cfg.std))}

    # ---------------------------------------------------------------------------------
    # loop
    # ---------------------------------------------------------------------------------
    def _set_epoch_hyperparams(self, epoch: int) -> None:
        cfg = self.cfg
        model = self.step.module
        if cfg.head_dropout_ramp and hasattr(model, 'set_head_dropout'):
            model.set_head_dropout(head_dropout_at(cfg, epoch))
        scheduler = self.session.scheduler
        if scheduler is not None:
            if cfg.schedule_granularity == 'epoch':
                scheduler.step(epoch)
            else:
                scheduler.step_update(self.step.global_step)

    def _current_head_dropout(self) -> Optional[float]:
        head = getattr(self.step.module, 'head', None)
        drop = getattr(head, 'drop', None)
        p = getattr(drop, 'p', None)
        return float(p) if torch.is_tensor(p) else None

    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        cfg, step = self.cfg, self.step
        model = step.model
        model.train()
        self._set_epoch_hyperparams(epoch)
        start = self.batch_in_epoch
        self.train_sampler.set_epoch(epoch)
        self.train_sampler.set_start(start * cfg.device_batch_size)
        if start == 0:
            self.meters.reset()
        n_batches = self.batches_per_epoch
        skipped: List[int] = []
        bar = progress(self.train_loader, total=n_batches - start, desc=f'epoch {epoch + 1}/{cfg.total_epochs}',
                       enabled=self.show_progress)
        b = start
        for x, y, bad in bar:
            if b >= n_batches:
                break
            if bool((bad >= 0).any()):
                skipped += bad[bad >= 0].tolist()
            x, y = step.to_device(x, y)
            if self.mixup is not None:
                x, target = self.mixup(x, y)
                hard = target.argmax(dim=1)       # the reference's train accuracy: argmax of the mixed target
            else:
                target, hard = y, y
            is_step = (b + 1) % self.layout.accumulation == 0 or b + 1 == n_batches
            with step.micro_batch(sync=is_step):
                with step.autocast():
                    logits = model(x)
                    loss = self.criterion(logits, target)
                step.backward(loss)
            loss_v = float(loss.detach())
            n = len(y)
            self.meters.add(loss=loss_v * n, correct=float((logits.detach().argmax(dim=1) == hard).sum()), n=n)
            if is_step:
                step.optimizer_step(loss_v, epoch=epoch, batch=b)
                if self.session.scheduler is not None and cfg.schedule_granularity == 'step':
                    self.session.scheduler.step_update(step.global_step)
            b += 1
            self.batch_in_epoch = b
            if b % max(1, cfg.log_every // 10) == 0:
                bar.set_postfix(loss=f'{self.meters["loss"] / max(self.meters["n"], 1):.4f}', refresh=False)
            if is_step and cfg.checkpoint_every and step.global_step % cfg.checkpoint_every == 0 and b < n_batches:
                self.save('last', unreadable=skipped)
                skipped = []
        bar.close()
        self.session.corrupt['train'].add(skipped)
        red = self.meters.reduce()
        n = max(red['n'], 1.0)
        return dict(train_loss=red['loss'] / n, train_top1=100.0 * red['correct'] / n,
                    grad_norm=Meters.mean_grad_norm(red))

    def validate(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        cfg = self.cfg
        with oom_advice(BatchLayout(cfg.device_batch_size, self.env.world_size, 1), 'validation'):
            res = evaluate(self.step.module, self.val_loader, self.num_classes, self.device,
                           channels_last=cfg.channels_last, show_progress=self.show_progress)
            out.update(val_loss=res.loss, val_top1=res.top1, val_top5=res.top5, val_images=res.images)
            self.session.corrupt['val'].add(res.skipped)
            if self.ema is not None and self.ema.started:
                ema_res = evaluate(self.ema.module, self.val_loader, self.num_classes, self.device,
                                   channels_last=cfg.channels_last, show_progress=self.show_progress,
                                   desc='val EMA')
                out.update(val_ema_loss=ema_res.loss, val_ema_top1=ema_res.top1, val_ema_top5=ema_res.top5)
        return out

    def fit(self) -> Dict[str, Any]:
        cfg, session = self.cfg, self.session
        total = cfg.total_epochs
        session.write_config('polynext train', PRESETS.source(self.recipe))
        if self.epoch == 0 and self.batch_in_epoch == 0:
            self.run.log(self._banner())
        while self.epoch < total:
            epoch = self.epoch
            t0 = time.time()
            train_metrics = self.train_one_epoch(epoch)
            lr = self.step.optimizer.param_groups[0]['lr']
            val_metrics = self.validate()
            elapsed = time.time() - t0
            row: Dict[str, Any] = dict(epoch=epoch + 1, lr=lr, head_dropout=self._current_head_dropout(),
                                       **train_metrics, **val_metrics, epoch_time_s=round(elapsed, 3))
            cand = [('raw', val_metrics['val_top1'])]
            if 'val_ema_top1' in val_metrics:
                cand.append(('ema', val_metrics['val_ema_top1']))
            which, top1 = max(cand, key=lambda t: t[1])
            improved = top1 > session.best['top1']
            if improved:
                session.best = dict(top1=top1, epoch=epoch + 1, weights=which)
            row['best_top1'] = session.best['top1']
            session.add_row(row, 'epoch')
            self.epoch, self.batch_in_epoch = epoch + 1, 0
            self.save('last')
            if improved:
                self._save_best(which)
            session.write_metrics('epoch', CURVE_PANELS, title=f'{self.recipe} ({cfg.model})')
            self.run.log(self._epoch_line(row, total))
        best = session.best
        self.run.log(f'done: best val top-1 {best["top1"]:.2f}% at epoch {best["epoch"]} '
                     f'({best["weights"]} weights); run folder {self.run.path}')
        return dict(best=best, history=session.history, run=str(self.run.path))

    def _save_best(self, which: str) -> None:
        if not self.env.is_main:
            return
        self.session.copy_to_best()
        weights = self.ema.module.state_dict() if which == 'ema' else self.step.module.state_dict()
        self.run.write_weights('best', weights, metadata=self._weights_meta(which))

    def _banner(self) -> str:
        cfg = self.cfg
        return banner('polynext train', self.recipe, f'model {cfg.model}', _count_params(self.step.module),
                      self.num_classes, self.data.description, self.layout,
                      f'{cfg.optimizer} lr {cfg.lr:g} wd {cfg.weight_decay:g}',
                      f'{cfg.total_epochs} epochs, {self.steps_per_epoch} steps/epoch', self.device.type,
                      self.step.precision.name, str(self.run.path))

    @staticmethod
    def _epoch_line(row: Dict[str, Any], total: int) -> str:
        s = (f'epoch {row["epoch"]:>{len(str(total))}}/{total}  train loss {row["train_loss"]:.4f}  '
             f'train top-1 {row["train_top1"]:.2f}%  val loss {row["val_loss"]:.4f}  val top-1 {row["val_top1"]:.2f}%  '
             f'top-5 {row["val_top5"]:.2f}%')
        if row.get('val_ema_top1') is not None:
            s += f'  EMA top-1 {row["val_ema_top1"]:.2f}%'
        return s + f'  lr {row["lr"]:.3g}  {row["epoch_time_s"]:.1f} s'


def train(cfg: TrainConfig, recipe: str, resume: Optional[str] = None, fresh: bool = False,
          explicit: Optional[Dict[str, Any]] = None, show_progress: bool = True, quiet: bool = False) -> Dict[str, Any]:
    """Train (or resume) a classifier; returns ``{'best': ..., 'history': [...], 'run': folder}``.

    ``cfg``: a resolved config (``PRESETS.resolve(...)``); ``recipe``: its name (the run folder's default
    name); ``resume``: a ``*.state.pt`` or run folder (re-running the same config in the same folder also
    resumes); ``fresh``: start over; ``explicit``: the keys set on the command line (checked on resume)."""
    from ..factory import check_model_name
    check_model_name(cfg.model)
    if cfg.fhe_levels is not None:
        cfg = fit_fhe_levels(cfg, quiet)
    if recipe in PRESETS and PRESETS.get(recipe).needs_checkpoint and not cfg.initial_checkpoint and not resume:
        raise ConfigError(f"recipe '{recipe}' fine-tunes a trained model: pass --initial-checkpoint PATH")
    plan = plan_run(cfg, recipe, state_format=STATE_FORMAT, resume_safe_keys=RESUME_SAFE_KEYS,
                    command='polynext train', resume=resume, fresh=fresh, explicit=explicit)

    return launch(plan, lambda env, plan: Trainer(plan.config, plan.recipe, plan.path, env, resume_state=plan.state,
                                                  show_progress=show_progress, quiet=quiet).fit(),
                  progress=('epoch', plan.config.total_epochs, 'epochs'),
                  best=lambda b: f'best val top-1 {b.get("top1", float("nan")):.2f}%', quiet=quiet)


def fit_fhe_levels(cfg: TrainConfig, quiet: bool = False) -> TrainConfig:
    """``--fhe-levels N``: the config with the deepest bn PolyNeXt (cells per stage) whose folded HE program
    needs at most N levels (``polynext.fhe.depth``), its fit printed before training starts."""
    import dataclasses
    from ..fhe.depth import deepest_fitting
    num_classes = cfg.num_classes or (10 if cfg.dataset in ('digits', 'cifar10', 'svhn') else 1000)
    kwargs, fit = deepest_fitting(cfg.model, cfg.model_kwargs, cfg.fhe_levels, cfg.img_size, num_classes)
    if not quiet:
        print(f"fhe: {cfg.model} with cells {tuple(fit['cells'])}, blocks {tuple(fit['blocks'])} (bn): "
              f"{fit['levels']} levels ≤ budget {fit['budget']}, {fit['ct_ct_products']} ct×ct products "
              f"(`polynext fhe analyze` on the trained checkpoint gives the full report)", flush=True)
    return dataclasses.replace(cfg, model_kwargs=kwargs)


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
