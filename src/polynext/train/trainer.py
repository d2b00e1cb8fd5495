"""The classification training loop (``polynext train``).

One ``Trainer`` per process; under ``torchrun`` every rank runs it and DDP keeps the replicas in
step. What the loop does, in the reference's order (spec §9):

* at each epoch start: head dropout p_e = min(p, p·e/R) (``head_dropout_ramp``), the epoch's
  learning rate (timm scheduler, ``step(epoch)``; per-step schedules call ``step_update``);
* per micro-batch: Mixup/CutMix on the device batch (timm ``Mixup``, label smoothing applied to
  the mixed targets), forward + loss under autocast (CUDA), backward of loss / accumulation;
* per optimizer step (every ``accumulation`` micro-batches and at the last one of the epoch):
  gradient norm (clipped to ``clip_grad`` when set), a non-finite check that stops before the
  weights change, the step, the EMA update (from ``ema_start_epoch``), and a mid-epoch
  checkpoint every ``checkpoint_every`` steps;
* at each epoch end: validation of the raw weights (and the EMA), metrics reduced over ranks,
  the run folder updated (metrics, curve, ``last`` and, when the top-1 improved, ``best``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..checkpoint import read_checkpoint, unwrap_state_dict
from ..engine.config import config_diff, config_to_dict
from ..engine.determinism import (
    ResumableDistributedSampler, ShardSampler, capture_rng_state, restore_rng_state, seed_everything,
)
from ..engine.distributed import DistEnv, all_gather_objects, all_reduce_sums, cleanup_distributed, init_distributed
from ..engine.memory import BatchLayout, oom_advice
from ..engine.nonfinite import check_step
from ..engine.run import RunFolder, load_training_state, progress
from ..errors import CheckpointError, ConfigError, DataError
from .data import DataBundle, build_data, corrupt_limit
from .recipes import PRESETS, TrainConfig, accumulation_steps, get_preset
from .validate import evaluate

__all__ = ['Trainer', 'train', 'build_optimizer', 'build_scheduler', 'build_loss', 'head_dropout_at', 'STATE_FORMAT',
           'RESUME_SAFE_KEYS', 'default_output']

STATE_FORMAT = 'polynext.train/1'
#: config keys that may differ between a run and its resumption
RESUME_SAFE_KEYS = ('data', 'output', 'workers', 'download', 'compile', 'checkpoint_every', 'log_every', 'device',
                    'max_corrupt', 'threads')

CURVE_PANELS = [
    ('loss', 'cross-entropy', [('train_loss', 'train (smoothed / mixed targets)'), ('val_loss', 'val')]),
    ('accuracy', 'top-1 (%)', [('train_top1', 'train'), ('val_top1', 'val'),
                               ('val_ema_top1', 'val EMA')]),
]


def default_output(recipe: str) -> str:
    return str(Path('runs') / recipe)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _classifier_keys(model: nn.Module) -> Tuple[str, ...]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    names = cfg.get('classifier') or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f'{n}.{p}' for n in names for p in ('weight', 'bias'))


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """timm ``create_optimizer_v2``: one param group decaying every parameter (the reference), or
    timm's split (1-D params and ``model.no_weight_decay()`` undecayed) with ``wd_exclusions``."""
    from timm.optim import create_optimizer_v2
    kw: Dict[str, Any] = dict(eps=cfg.opt_eps, betas=tuple(cfg.opt_betas))
    if cfg.optimizer == 'lamb':
        kw.update(max_grad_norm=cfg.lamb_max_grad_norm, decoupled_decay=cfg.lamb_decoupled_decay)
    elif fused:
        kw.update(fused=True)       # as the reference: torch.optim.AdamW(fused=True) on CUDA
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
    """State and loop of one training process."""

    def __init__(self, cfg: TrainConfig, recipe: str, run_dir: Path, env: DistEnv,
                 resume_state: Optional[Dict[str, Any]] = None, show_progress: bool = True, quiet: bool = False):
        self.cfg, self.recipe, self.env = cfg, recipe, env
        self.device = env.device
        self.cuda = self.device.type == 'cuda'
        self.show_progress = show_progress and env.is_main
        self.run = RunFolder(run_dir, is_main=env.is_main, quiet=quiet)
        self.accumulation = accumulation_steps(cfg, env.world_size)
        self.layout = BatchLayout(cfg.device_batch_size, env.world_size, self.accumulation)
        seed_everything(cfg.seed + env.rank)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True   # as the reference
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

        self.data: DataBundle = build_data(cfg)
        self.num_classes = cfg.num_classes or self.data.num_classes
        if cfg.num_classes and cfg.num_classes != self.data.num_classes:
            raise DataError(f'the recipe sets num_classes={cfg.num_classes} but {self.data.description} has '
                            f'{self.data.num_classes} classes')
        self.model = self._build_model()
        self.ema = self._build_ema()
        self.optimizer = self._build_optimizer()
        self.train_sampler = ResumableDistributedSampler(self.data.train, env.world_size, env.rank, shuffle=True,
                                                         seed=cfg.seed)
        self.train_loader = self._loader(self.data.train, self.train_sampler, drop_last=cfg.mixing)
        self.val_loader = self._loader(self.data.val, ShardSampler(len(self.data.val), env.world_size, env.rank),
                                       drop_last=False)
        self.batches_per_epoch = self._batches_per_epoch()
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.accumulation)
        self.scheduler = self._build_scheduler()
        self.mixup, self.criterion = self._build_loss()
        self.amp_dtype = None
        if cfg.amp != 'none' and (self.cuda or cfg.cpu_amp):
            self.amp_dtype = torch.bfloat16 if cfg.amp == 'bf16' else torch.float16
        # fp16 needs loss scaling; bf16 (the reference) does not
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None

        # progress counters (restored on resume)
        self.epoch = 0                 # epoch in progress
        self.batch_in_epoch = 0        # micro-batches of that epoch already trained
        self.global_step = 0           # optimizer steps taken
        self.ema_updates = 0
        self.meters = self._zero_meters()
        self.history: List[Dict[str, Any]] = []
        self.best: Dict[str, Any] = dict(top1=-1.0, epoch=None, weights=None)
        self.corrupt: Dict[str, List[str]] = dict(train=[], val=[])
        if resume_state is not None:
            self._restore(resume_state)

        if cfg.compile:
            _unwrap(self.model).compile()
        if env.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.cuda else None)

    # ---------------------------------------------------------------------------------
    # set-up
    # ---------------------------------------------------------------------------------
    def _build_model(self) -> nn.Module:
        from ..factory import create_model
        cfg = self.cfg
        model = create_model(cfg.model, num_classes=self.num_classes, drop_path_rate=cfg.drop_path,
                             drop_rate=cfg.head_dropout, **cfg.model_kwargs)
        if cfg.initial_checkpoint:
            self._load_initial(model)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def _load_initial(self, model: nn.Module) -> None:
        """Strict load of ``initial_checkpoint`` (any layout), with the 21K → 1K head mapping."""
        import sys
        from ..checkpoint import load_state_dict_strict
        from .class_maps import map_head_rows
        cfg = self.cfg
        sd = unwrap_state_dict(read_checkpoint(cfg.initial_checkpoint))
        filter_fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
        if filter_fn is not None:
            sd = filter_fn(sd, model)
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

    def _build_ema(self):
        if not self.cfg.ema:
            return None
        from timm.utils import ModelEmaV3
        return ModelEmaV3(self.model, decay=self.cfg.ema_decay)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.model, self.cfg, fused=self.cuda)

    def _build_scheduler(self):
        return build_scheduler(self.optimizer, self.cfg, self.steps_per_epoch)

    def _build_loss(self):
        return build_loss(self.cfg, self.num_classes)

    def _loader(self, dataset, sampler, drop_last: bool):
        from torch.utils.data import DataLoader
        cfg = self.cfg
        gen = torch.Generator()
        gen.manual_seed(cfg.seed)   # the loader's base seed never touches the global generator
        workers = min(cfg.workers, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else
                      (os.cpu_count() or 1))     # no more loader processes than usable cores
        return DataLoader(dataset, batch_size=cfg.device_batch_size, sampler=sampler, num_workers=workers,
                          pin_memory=self.cuda, drop_last=drop_last, generator=gen, persistent_workers=workers > 0)

    def _batches_per_epoch(self) -> int:
        n = self.train_sampler.num_samples
        b = self.cfg.device_batch_size
        batches = n // b if self.cfg.mixing else math.ceil(n / b)
        if batches == 0:
            raise DataError(f'{self.data.description}: {n} training images per device is less than one batch of '
                            f'{b}; use a smaller --device-batch-size')
        return batches

    @staticmethod
    def _zero_meters() -> Dict[str, float]:
        return dict(loss=0.0, correct=0.0, n=0.0, grad_norm=0.0, steps=0.0)

    # ---------------------------------------------------------------------------------
    # state
    # ---------------------------------------------------------------------------------
    def state_dict(self, rng_states: List[Any]) -> Dict[str, Any]:
        return {
            'format': STATE_FORMAT, 'recipe': self.recipe, 'config': config_to_dict(self.cfg),
            'epoch': self.epoch, 'batch_in_epoch': self.batch_in_epoch, 'global_step': self.global_step,
            'model': _unwrap(self.model).state_dict(),
            # not named 'ema': checkpoint readers would take a never-updated EMA for the weights
            'ema_state': self.ema.module.state_dict() if self.ema is not None else None,
            'ema_updates': self.ema_updates,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict() if self.scheduler is not None else None,
            'scaler': self.scaler.state_dict() if self.scaler is not None else None,
            'meters': dict(self.meters), 'history': list(self.history), 'best': dict(self.best),
            'corrupt': {k: list(v) for k, v in self.corrupt.items()},
            'classes': list(self.data.classes), 'world_size': self.env.world_size, 'rng': rng_states,
            'versions': dict(torch=str(torch.__version__)),
        }

    def _restore(self, state: Dict[str, Any]) -> None:
        from ..checkpoint import load_state_dict_strict
        if state.get('classes') and list(state['classes']) != list(self.data.classes):
            saved, now = state['classes'], self.data.classes
            first = next((i for i, (a, b) in enumerate(zip(saved, now)) if a != b), min(len(saved), len(now)))
            raise CheckpointError(
                f'the checkpoint was trained on {len(saved)} classes but {self.data.description} has {len(now)}; '
                f'they first differ at class {first} '
                f'({saved[first] if first < len(saved) else "-"} vs {now[first] if first < len(now) else "-"})')
        load_state_dict_strict(_unwrap(self.model), state['model'])
        if self.ema is not None:
            if state.get('ema_state') is not None:
                load_state_dict_strict(self.ema.module, state['ema_state'])
            else:
                self.ema.set(_unwrap(self.model))
        self.ema_updates = int(state.get('ema_updates', 0))
        self.optimizer.load_state_dict(state['optimizer'])
        if self.scheduler is not None and state.get('scheduler') is not None:
            self.scheduler.load_state_dict(state['scheduler'])
        if self.scaler is not None and state.get('scaler') is not None:
            self.scaler.load_state_dict(state['scaler'])
        self.epoch = int(state['epoch'])
        self.batch_in_epoch = int(state['batch_in_epoch'])
        self.global_step = int(state['global_step'])
        self.meters = dict(state.get('meters') or self._zero_meters())
        self.history = list(state.get('history') or [])
        self.best = dict(state.get('best') or self.best)
        self.corrupt = {k: list(v) for k, v in (state.get('corrupt') or self.corrupt).items()}
        rng = state.get('rng') or []
        if int(state.get('world_size', 1)) != self.env.world_size:
            self.run.log(f'note: resumed on {self.env.world_size} device(s) but the checkpoint was written on '
                         f'{state.get("world_size")}; data order and random streams differ from the original run')
        elif self.env.rank < len(rng):
            restore_rng_state(rng[self.env.rank])
        where = (f'epoch {self.epoch + 1}, batch {self.batch_in_epoch}' if self.batch_in_epoch else
                 f'the start of epoch {self.epoch + 1}')
        self.run.log(f'resumed from {where} (optimizer step {self.global_step})')

    def save(self, tag: str = 'last') -> None:
        """Checkpoint ``tag`` (collective: every rank contributes its RNG state)."""
        rng_states = all_gather_objects(capture_rng_state())
        if not self.env.is_main:
            return
        model = _unwrap(self.model)
        meta = self._weights_meta('raw')
        extra = {'ema': self.ema.module.state_dict()} if self.ema is not None and self.ema_updates else None
        self.run.save_checkpoint(tag, self.state_dict(rng_states), model.state_dict(), metadata=meta,
                                 extra_weights=extra)

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
    def _resume_hint(self) -> str:
        last = self.run.state_path('last')
        if last.exists() or self.env.world_size > 1:
            return (f'Resume from the last good checkpoint with `polynext train --resume {last}` (a lower lr, e.g. '
                    f'--set lr={self.cfg.lr / 2:g}, or --set clip_grad=1 can help).')
        return 'No checkpoint was written yet; restart with a lower lr (e.g. --set lr=%g).' % (self.cfg.lr / 2)

    def _set_epoch_hyperparams(self, epoch: int) -> None:
        cfg = self.cfg
        model = _unwrap(self.model)
        if cfg.head_dropout_ramp and hasattr(model, 'set_head_dropout'):
            model.set_head_dropout(head_dropout_at(cfg, epoch))
        if self.scheduler is not None:
            if cfg.schedule_granularity == 'epoch':
                self.scheduler.step(epoch)
            else:
                self.scheduler.step_update(self.global_step)

    def _current_head_dropout(self) -> Optional[float]:
        head = getattr(_unwrap(self.model), 'head', None)
        drop = getattr(head, 'drop', None)
        p = getattr(drop, 'p', None)
        return float(p) if torch.is_tensor(p) else None

    def _ema_update(self, epoch: int) -> None:
        if self.ema is None or epoch < self.cfg.ema_start_epoch:
            return
        model = _unwrap(self.model)
        if self.cfg.ema_init == 'first_update' and self.ema_updates == 0:
            self.ema.set(model)            # AveragedModel: the first update copies the weights
        else:
            self.ema.update(model)
        self.ema_updates += 1

    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        cfg = self.cfg
        model = self.model
        model.train()
        self._set_epoch_hyperparams(epoch)
        start = self.batch_in_epoch
        self.train_sampler.set_epoch(epoch)
        self.train_sampler.set_start(start * cfg.device_batch_size)
        if start == 0:
            self.meters = self._zero_meters()
        params = [p for p in model.parameters() if p.requires_grad]
        clip = cfg.clip_grad if cfg.clip_grad is not None else float('inf')
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        n_batches = self.batches_per_epoch
        skipped: List[int] = []
        bar = progress(self.train_loader, total=n_batches - start, desc=f'epoch {epoch + 1}/{cfg.total_epochs}',
                       enabled=self.show_progress)
        self.optimizer.zero_grad(set_to_none=True)
        b = start
        for x, y, bad in bar:
            if b >= n_batches:
                break
            if bool((bad >= 0).any()):
                skipped += bad[bad >= 0].tolist()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.mixup is not None:
                x, target = self.mixup(x, y)
                hard = target.argmax(dim=1)       # the reference's train accuracy: argmax of the mixed target
            else:
                target, hard = y, y
            is_step = (b + 1) % self.accumulation == 0 or b + 1 == n_batches
            sync = contextlib.nullcontext() if (is_step or not ddp) else model.no_sync()
            with oom_advice(self.layout, 'training'), sync:
                with amp:
                    logits = model(x)
                    loss = self.criterion(logits, target)
                scaled = loss / self.accumulation
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_v = float(loss.detach())
            n = len(y)
            self.meters['loss'] += loss_v * n
            self.meters['correct'] += float((logits.detach().argmax(dim=1) == hard).sum())
            self.meters['n'] += n
            if is_step:
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
                # fp16: an infinite gradient is the scaler's business (it skips the step and lowers the scale)
                check_step(loss_v, norm if self.scaler is None else 0.0, epoch=epoch + 1, step=b,
                           global_step=self.global_step, resume_hint=self._resume_hint())
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                if math.isfinite(float(norm)):      # fp16: steps the scaler skipped do not count
                    self.meters['grad_norm'] += float(norm)
                    self.meters['steps'] += 1
                if self.scheduler is not None and cfg.schedule_granularity == 'step':
                    self.scheduler.step_update(self.global_step)
                self._ema_update(epoch)
            b += 1
            self.batch_in_epoch = b
            if self.show_progress and hasattr(bar, 'set_postfix') and (b % max(1, cfg.log_every // 10) == 0):
                bar.set_postfix(loss=f'{self.meters["loss"] / max(self.meters["n"], 1):.4f}', refresh=False)
            if is_step and cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0 and b < n_batches:
                self._check_corrupt('train', skipped)
                skipped = []
                self.save('last')
        if hasattr(bar, 'close'):
            bar.close()
        self._check_corrupt('train', skipped)
        red = all_reduce_sums(self.meters)
        n = max(red['n'], 1.0)
        return dict(train_loss=red['loss'] / n, train_top1=100.0 * red['correct'] / n,
                    grad_norm=red['grad_norm'] / max(red['steps'], 1.0))

    def _check_corrupt(self, split: str, local: List[int]) -> None:
        """Gather unreadable-image indices of all ranks, log new ones, stop past the limit."""
        gathered = all_gather_objects(sorted(set(local)))
        ds = self.data.train if split == 'train' else self.data.val
        names = sorted({ds.path_of(i) for part in gathered for i in part})
        new = [p for p in names if p not in self.corrupt[split]]
        for p in new:
            self.run.log(f'warning: unreadable {split} image skipped: {p}')
        self.corrupt[split] = sorted(set(self.corrupt[split]) | set(new))
        limit = corrupt_limit(self.cfg.max_corrupt, len(ds))
        if len(self.corrupt[split]) > limit:
            shown = ', '.join(self.corrupt[split][:3])
            raise DataError(f'{len(self.corrupt[split])} of {len(ds)} {split} images cannot be read (limit {limit}, '
                            f'max_corrupt={self.cfg.max_corrupt:g}), e.g. {shown}; fix or remove them, or raise the '
                            f'limit with --set max_corrupt=...')

    def validate(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        with oom_advice(BatchLayout(self.cfg.device_batch_size, self.env.world_size, 1), 'validation'):
            res = evaluate(self.model if not isinstance(self.model, nn.parallel.DistributedDataParallel)
                           else self.model.module, self.val_loader, self.num_classes, self.device,
                           channels_last=self.cfg.channels_last, show_progress=self.show_progress)
            out.update(val_loss=res.loss, val_top1=res.top1, val_top5=res.top5, val_images=res.images)
            self._check_corrupt('val', res.skipped)
            if self.ema is not None and self.ema_updates > 0:
                ema_res = evaluate(self.ema.module, self.val_loader, self.num_classes, self.device,
                                   channels_last=self.cfg.channels_last, show_progress=self.show_progress,
                                   desc='val EMA')
                out.update(val_ema_loss=ema_res.loss, val_ema_top1=ema_res.top1, val_ema_top5=ema_res.top5)
        return out

    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        total = cfg.total_epochs
        self._write_config()
        if self.epoch == 0 and self.batch_in_epoch == 0:
            self.run.log(self._banner())
        while self.epoch < total:
            epoch = self.epoch
            t0 = time.time()
            train_metrics = self.train_one_epoch(epoch)
            lr = self.optimizer.param_groups[0]['lr']
            val_metrics = self.validate()
            elapsed = time.time() - t0
            row: Dict[str, Any] = dict(epoch=epoch + 1, lr=lr, head_dropout=self._current_head_dropout(),
                                       **train_metrics, **val_metrics, epoch_time_s=round(elapsed, 3))
            cand = [('raw', val_metrics['val_top1'])]
            if 'val_ema_top1' in val_metrics:
                cand.append(('ema', val_metrics['val_ema_top1']))
            which, top1 = max(cand, key=lambda t: t[1])
            improved = top1 > self.best['top1']
            if improved:
                self.best = dict(top1=top1, epoch=epoch + 1, weights=which)
            row['best_top1'] = self.best['top1']
            self.history.append(row)
            self.epoch, self.batch_in_epoch = epoch + 1, 0
            self.save('last')
            if improved:
                self._save_best(which)
            self.run.write_metrics(self.history)
            self.run.plot_curves(self.history, CURVE_PANELS, title=f'{self.recipe} ({cfg.model})')
            self.run.log(self._epoch_line(row, total))
        self.run.log(f'done: best val top-1 {self.best["top1"]:.2f}% at epoch {self.best["epoch"]} '
                     f'({self.best["weights"]} weights); run folder {self.run.path}')
        return dict(best=self.best, history=self.history, run=str(self.run.path))

    def _save_best(self, which: str) -> None:
        if not self.env.is_main:
            return
        self.run.copy_checkpoint('last', 'best', extra=('ema',) if self.ema is not None and self.ema_updates else ())
        weights = (self.ema.module.state_dict() if which == 'ema' else _unwrap(self.model).state_dict())
        self.run.write_weights('best', weights, metadata=self._weights_meta(which))

    def _write_config(self) -> None:
        preset = PRESETS.get(self.recipe)
        header = (f'# polynext train: recipe {self.recipe}' + (f' ({preset.source})' if preset else '') +
                  f'\n# resolved config; repeat with: polynext train --config {self.run.path / RunFolder.CONFIG}')
        self.run.write_config(dict(recipe=self.recipe, **config_to_dict(self.cfg)), header=header)

    def _banner(self) -> str:
        cfg, L = self.cfg, self.layout
        model = _unwrap(self.model)
        n_params = sum(p.numel() for p in model.parameters())
        amp = cfg.amp if self.amp_dtype is not None else 'fp32'
        return (f'polynext train: recipe {self.recipe} | model {cfg.model} ({n_params:,} params, '
                f'{self.num_classes} classes) | {self.data.description}\n'
                f'  batch {L.effective} = {L.device_batch} per device × {L.world_size} device(s) × {L.accumulation} '
                f'accumulation | {cfg.optimizer} lr {cfg.lr:g} wd {cfg.weight_decay:g} | {cfg.total_epochs} epochs, '
                f'{self.steps_per_epoch} steps/epoch | {self.device.type} {amp} | run folder {self.run.path}')

    @staticmethod
    def _epoch_line(row: Dict[str, Any], total: int) -> str:
        s = (f'epoch {row["epoch"]:>{len(str(total))}}/{total}  train loss {row["train_loss"]:.4f}  '
             f'train top-1 {row["train_top1"]:.2f}%  val loss {row["val_loss"]:.4f}  val top-1 {row["val_top1"]:.2f}%  '
             f'top-5 {row["val_top5"]:.2f}%')
        if row.get('val_ema_top1') is not None:
            s += f'  EMA top-1 {row["val_ema_top1"]:.2f}%'
        return s + f'  lr {row["lr"]:.3g}  {row["epoch_time_s"]:.1f} s'


# -------------------------------------------------------------------------------------------
# entry point
# -------------------------------------------------------------------------------------------

def _prepare(cfg: TrainConfig, recipe: str, resume: Optional[str], fresh: bool,
             explicit: Dict[str, Any]) -> Tuple[TrainConfig, str, Path, Optional[Dict[str, Any]]]:
    """Decide the run folder and whether to resume (explicitly, or from the folder's last.state.pt)."""
    state = None
    if resume:
        state = load_training_state(resume)
        from ..engine.config import apply_overrides
        saved = apply_overrides(TrainConfig(), state['config'], source=str(resume))
        # the saved config is the base; only run-control keys may be changed on the command line
        bad = [k for k, v in explicit.items()
               if k not in RESUME_SAFE_KEYS and config_diff({k: v}, {k: getattr(saved, k)})]
        if bad:
            raise ConfigError(f"cannot change '{bad[0]}' when resuming ({getattr(saved, bad[0])!r} in the checkpoint, "
                              f"{explicit[bad[0]]!r} asked for); start a new run with --output DIR instead")
        changes = {k: v for k, v in explicit.items() if k in RESUME_SAFE_KEYS}
        cfg = dataclasses.replace(saved, **changes).validate()
        recipe = state.get('recipe', recipe)
        if changes.get('output'):
            run_dir = Path(changes['output'])
        else:
            run_dir = Path(resume).parent if Path(resume).is_file() else Path(resume)
        return cfg, recipe, run_dir, state
    run_dir = Path(cfg.output or default_output(recipe))
    last = run_dir / 'last.state.pt'
    if last.is_file() and not fresh:
        state = load_training_state(last)
        diff = config_diff(state['config'], config_to_dict(cfg), ignore=RESUME_SAFE_KEYS)
        if diff:
            k, old, new = diff[0]
            raise ConfigError(f"{run_dir} holds a run with another config ({k}: {old!r} there, {new!r} now); resume "
                              f"it unchanged, pass --output NEW_DIR for a new run, or --fresh to overwrite it")
    return cfg, recipe, run_dir, state


def train(cfg: TrainConfig, recipe: str, resume: Optional[str] = None, fresh: bool = False,
          explicit: Optional[Dict[str, Any]] = None, show_progress: bool = True, quiet: bool = False) -> Dict[str, Any]:
    """Train (or resume) a run; returns ``{'best': ..., 'history': [...], 'run': folder}``."""
    from ..factory import check_model_name
    check_model_name(cfg.model)
    if get_preset(recipe).needs_checkpoint and not cfg.initial_checkpoint and not resume:
        raise ConfigError(f"recipe '{recipe}' fine-tunes a trained model: pass --initial-checkpoint PATH")
    cfg, recipe, run_dir, state = _prepare(cfg, recipe, resume, fresh, dict(explicit or {}))
    env = init_distributed(cfg.device)
    try:
        if state is not None and int(state['epoch']) >= cfg.total_epochs:
            best = state.get('best') or {}
            if env.is_main and not quiet:
                print(f'{run_dir} is a finished run ({cfg.total_epochs} epochs, best val top-1 '
                      f'{best.get("top1", float("nan")):.2f}%); pass --fresh to train it again or --output NEW_DIR')
            return dict(best=best, history=state.get('history', []), run=str(run_dir))
        trainer = Trainer(cfg, recipe, run_dir, env, resume_state=state, show_progress=show_progress, quiet=quiet)
        return trainer.fit()
    finally:
        cleanup_distributed()
