"""Iteration-based segmentation training (``polynext seg train``) on the shared engine.

One ``SegTrainer`` per process; under ``torchrun`` every rank runs it, DDP keeps the replicas
in step and the heads' BatchNorms become SyncBatchNorm. Per iteration (mmseg's
``IterBasedRunner``):

* ``accumulation`` micro-batches of ``device_batch_size`` crops; forward (bf16 autocast on
  CUDA), loss = CE(decode logits ↑ crop size) + ``aux_weight`` · CE(aux logits ↑ crop size),
  in fp32, ignore index 255, averaged over all pixels (mmseg) or the labelled ones;
* the gradient norm (clipped to ``clip_grad`` when set), a non-finite check that stops before
  the weights change, the AdamW step with the parameter-wise lr / decay multipliers, and the
  learning rate of the next iteration (poly × linear warm-up, per parameter group);
* every ``log_every`` iterations a metrics row (loss, decode accuracy, lr), every
  ``checkpoint_every`` the resumable ``last`` checkpoint, every ``eval_every`` (and at the end)
  an evaluation (mIoU / mAcc / aAcc) and, when the mIoU improved, ``best``.

The data order is the engine's ``ResumableDistributedSampler`` (a new shuffle per pass over the
data, incomplete batches dropped) and every crop's augmentation is seeded by (seed, pass,
index), so a resumed run continues with exactly the crops it would have seen.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.config import config_diff, config_to_dict
from ..engine.determinism import (
    ResumableDistributedSampler, ShardSampler, capture_rng_state, restore_rng_state, seed_everything,
)
from ..engine.distributed import DistEnv, all_gather_objects, all_reduce_sums, cleanup_distributed, init_distributed
from ..engine.memory import BatchLayout, oom_advice
from ..engine.nonfinite import check_step
from ..engine.run import RunFolder, load_training_state, progress
from ..errors import CheckpointError, ConfigError, DataError
from .data import ADE20KSource, SegSamples, collate_eval, collate_train
from .inference import evaluate
from .metrics import SegMetrics, format_per_class
from .recipes import (
    RESUME_SAFE_KEYS, SEG_PRESETS, SegConfig, effective_custom_keys, seg_accumulation_steps,
)
from .segmentor import UperNet, build_segmentor, spec_metadata
from .synthetic import ShapesSource
from .transforms import build_eval_transform, build_train_transform

__all__ = ['SegTrainer', 'train_segmentation', 'param_rule', 'build_param_groups', 'poly_warmup_factor',
           'seg_loss', 'build_sources', 'STATE_FORMAT', 'default_output']

STATE_FORMAT = 'polynext.seg/1'

CURVE_PANELS = [
    ('loss', 'cross-entropy', [('train_loss', 'train (decode + 0.4 aux)'), ('train_decode_loss', 'train decode')]),
    ('validation', '%', [('mIoU', 'mIoU'), ('mAcc', 'mAcc'), ('aAcc', 'aAcc')]),
]


def default_output(recipe: str) -> str:
    return str(Path('runs') / recipe)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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
    logits = F.interpolate(logits.float(), size=target.shape[-2:], mode='bilinear', align_corners=align_corners)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction='none')
    if average == 'all_pixels':        # mmseg: ignored pixels contribute 0 but count in the mean
        return loss.mean()
    valid = (target != ignore_index).sum()
    return loss.sum() / valid.clamp(min=1)


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
        self.cfg, self.recipe, self.env = cfg, recipe, env
        self.device = env.device
        self.cuda = self.device.type == 'cuda'
        self.show_progress = show_progress and env.is_main
        self.run = RunFolder(run_dir, is_main=env.is_main, quiet=quiet)
        self.accumulation = seg_accumulation_steps(cfg, env.world_size)
        if cfg.device_batch_size < 2 and not (self.cuda and env.world_size > 1):
            raise ConfigError(
                'a per-device batch of 1 cannot train UperNet here: its pyramid pooling normalises a 1x1 map with '
                'BatchNorm, which needs 2 or more images for batch statistics. Use --device-batch-size 2 or more (on '
                'several GPUs, SyncBatchNorm pools the images of all devices, so 1 per GPU works)')
        self.layout = BatchLayout(cfg.device_batch_size, env.world_size, self.accumulation)
        seed_everything(cfg.seed + env.rank)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

        self.train_source, self.val_source, self.classes = build_sources(cfg)
        self.num_classes = cfg.num_classes or len(self.classes)
        if cfg.num_classes and cfg.num_classes != len(self.classes):
            raise DataError(f'num_classes={cfg.num_classes} but {self.train_source.description} has '
                            f'{len(self.classes)} classes')
        self.spec = cfg.spec(self.num_classes)
        self.model: nn.Module = self._build_model(resume_state is None)
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, [lambda it, base=g['lr']: poly_warmup_factor(it, cfg, base) for g in self.optimizer.param_groups])

        train_tf = build_train_transform(cfg.img_scale, cfg.ratio_range, cfg.crop_size, cfg.cat_max_ratio, cfg.hflip,
                                         cfg.photometric, cfg.mean, cfg.std, cfg.ignore_index)
        eval_tf = build_eval_transform(cfg.eval_scale, cfg.mean, cfg.std)
        fallback = (cfg.crop_size, cfg.crop_size)
        self.train_set = SegSamples(self.train_source, train_tf, train=True, seed=cfg.seed,
                                    ignore_index=cfg.ignore_index, fallback_size=fallback)
        self.val_set = SegSamples(self.val_source, eval_tf, train=False, ignore_index=cfg.ignore_index,
                                  fallback_size=fallback)
        self.sampler = ResumableDistributedSampler(self.train_set, env.world_size, env.rank, shuffle=True, seed=cfg.seed)
        self.batches_per_pass = self.sampler.num_samples // cfg.device_batch_size
        if self.batches_per_pass == 0:
            raise DataError(f'{self.train_source.description}: {self.sampler.num_samples} training images per device '
                            f'is less than one batch of {cfg.device_batch_size}; use a smaller --device-batch-size')
        self.train_loader = self._loader(self.train_set, self.sampler, cfg.device_batch_size, collate_train, True)
        self.val_sampler = ShardSampler(len(self.val_set), env.world_size, env.rank)
        self.val_loader = self._loader(self.val_set, self.val_sampler, 1, collate_eval, False)
        self.amp_dtype = None
        if self.cuda and cfg.amp != 'none':
            self.amp_dtype = torch.bfloat16 if cfg.amp == 'bf16' else torch.float16
        self.scaler = torch.amp.GradScaler('cuda') if self.amp_dtype == torch.float16 else None

        self.iteration = 0               # optimizer steps taken
        self.history: List[Dict[str, Any]] = []
        self.best: Dict[str, Any] = dict(mIoU=-1.0, iteration=None)
        self.meters = self._zero_meters()
        self.corrupt: List[str] = []
        self.last_eval: Dict[str, Any] = {}
        if resume_state is not None:
            self._restore(resume_state)

        if cfg.compile:
            _unwrap(self.model).backbone.compile()
        if env.distributed:
            if self.cuda:   # torch's SyncBatchNorm runs on GPUs only; CPU processes keep per-process statistics
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            else:
                self.run.log('note: BatchNorm statistics are per process on CPU (SyncBatchNorm needs CUDA)')
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.cuda else None)

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
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
            for p in model.parameters():   # (1, C, 1, 1) scales: standard strides, the layout of their gradients
                if p.dim() == 4 and p.shape[0] == 1 and p.shape[2:] == (1, 1):   # (DDP's buckets follow the param)
                    p.data = p.data.clone(memory_format=torch.contiguous_format)
        return model

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        groups = build_param_groups(self.model, cfg.lr, cfg.weight_decay, effective_custom_keys(cfg))
        for g in groups:
            g.pop('names')
        kw = dict(fused=True) if self.cuda else {}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.opt_betas), eps=cfg.opt_eps,
                                 weight_decay=cfg.weight_decay, **kw)

    def _loader(self, dataset, sampler, batch_size: int, collate, drop_last: bool):
        from torch.utils.data import DataLoader
        cfg = self.cfg
        gen = torch.Generator()
        gen.manual_seed(cfg.seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=cfg.workers,
                          collate_fn=collate, pin_memory=self.cuda, drop_last=drop_last, generator=gen,
                          persistent_workers=cfg.workers > 0)

    @staticmethod
    def _zero_meters() -> Dict[str, float]:
        return dict(loss=0.0, decode_loss=0.0, aux_loss=0.0, correct=0.0, labelled=0.0, n=0.0, grad_norm=0.0,
                    steps=0.0)

    # ---------------------------------------------------------------------------------
    # state
    # ---------------------------------------------------------------------------------
    def state_dict(self, rng_states: List[Any]) -> Dict[str, Any]:
        return {
            'format': STATE_FORMAT, 'recipe': self.recipe, 'config': config_to_dict(self.cfg),
            'spec': self.spec.to_dict(), 'iteration': self.iteration,
            'model': _unwrap(self.model).state_dict(), 'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'scaler': self.scaler.state_dict() if self.scaler is not None else None,
            'meters': dict(self.meters), 'history': list(self.history), 'best': dict(self.best),
            'corrupt': list(self.corrupt), 'classes': list(self.classes), 'world_size': self.env.world_size,
            'rng': rng_states, 'versions': dict(torch=str(torch.__version__)),
        }

    def _restore(self, state: Dict[str, Any]) -> None:
        from ..checkpoint import load_state_dict_strict
        if state.get('format') != STATE_FORMAT:
            raise CheckpointError(f'not a segmentation training state (format {state.get("format")!r}); '
                                  f'classification runs resume with `polynext train --resume`')
        if state.get('classes') and list(state['classes']) != list(self.classes):
            raise CheckpointError(f'the checkpoint was trained on {len(state["classes"])} classes '
                                  f'({state["classes"][:3]}...) but {self.train_source.description} has '
                                  f'{len(self.classes)} ({self.classes[:3]}...)')
        load_state_dict_strict(_unwrap(self.model), state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        if self.scaler is not None and state.get('scaler') is not None:
            self.scaler.load_state_dict(state['scaler'])
        self.iteration = int(state['iteration'])
        self.meters = dict(state.get('meters') or self._zero_meters())
        self.history = list(state.get('history') or [])
        self.best = dict(state.get('best') or self.best)
        self.corrupt = list(state.get('corrupt') or [])
        rng = state.get('rng') or []
        if int(state.get('world_size', 1)) != self.env.world_size:
            self.run.log(f'note: resumed on {self.env.world_size} device(s) but the checkpoint was written on '
                         f'{state.get("world_size")}; data order and random streams differ from the original run')
        elif self.env.rank < len(rng):
            restore_rng_state(rng[self.env.rank])
        self.run.log(f'resumed at iteration {self.iteration} of {self.cfg.iters}')

    def _weights_meta(self) -> Dict[str, Any]:
        meta = dict(recipe=self.recipe, iteration=self.iteration, backbone=self.cfg.backbone,
                    classes=json_classes(self.classes))
        meta.update(spec_metadata(self.spec))
        meta['polynext_seg_config'] = json.dumps(config_to_dict(self.cfg))
        return meta

    def save(self, tag: str = 'last') -> None:
        """Checkpoint ``tag`` (collective: every rank contributes its RNG state)."""
        rng_states = all_gather_objects(capture_rng_state())
        if not self.env.is_main:
            return
        self.run.save_checkpoint(tag, self.state_dict(rng_states), _unwrap(self.model).state_dict(),
                                 metadata=self._weights_meta())

    def _resume_hint(self) -> str:
        return f'Resume from the last checkpoint with: polynext seg train --resume {self.run.path}'

    # ---------------------------------------------------------------------------------
    # training
    # ---------------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[Tuple[int, int, Any]]:
        """(pass, batch index in the pass, batch) from micro-batch ``iteration × accumulation`` on."""
        m = self.iteration * self.accumulation
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

    def _check_corrupt(self, local: List[int]) -> None:
        gathered = all_gather_objects(sorted(set(local)))
        names = sorted({self.train_source.name_of(i) for part in gathered for i in part})
        new = [n for n in names if n not in self.corrupt]
        for n in new:
            self.run.log(f'warning: unreadable training image or annotation (its crop is ignored): {n}')
        self.corrupt = sorted(set(self.corrupt) | set(new))
        from ..train.data import corrupt_limit
        limit = corrupt_limit(self.cfg.max_corrupt, len(self.train_source))
        if len(self.corrupt) > limit:
            raise DataError(f'{len(self.corrupt)} of {len(self.train_source)} training images cannot be read (limit '
                            f'{limit}), e.g. {", ".join(self.corrupt[:3])}; fix or remove them, or raise the limit '
                            f'with --set max_corrupt=...')

    def train_steps(self, until: int) -> None:
        """Train up to iteration ``until`` (exclusive of evaluation)."""
        cfg = self.cfg
        model = self.model
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        clip = cfg.clip_grad if cfg.clip_grad is not None else float('inf')
        amp = (torch.autocast('cuda', dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        stream = self._micro_batches()
        bar = progress(range(self.iteration, until), total=until - self.iteration,
                       desc=f'iter {self.iteration}→{until}/{cfg.iters}', enabled=self.show_progress)
        bad: List[int] = []
        for _ in bar:
            self.optimizer.zero_grad(set_to_none=True)
            for k in range(self.accumulation):
                epoch, b, (x, y, skipped) = next(stream)
                if bool((skipped >= 0).any()):
                    bad += skipped[skipped >= 0].tolist()
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                last = k == self.accumulation - 1
                sync = contextlib.nullcontext() if (last or not ddp) else model.no_sync()
                with oom_advice(self.layout, 'training'), sync:
                    with amp:
                        outputs = model(x)
                    loss, parts = seg_loss(outputs, y, cfg.aux_weight, cfg.ignore_index, cfg.loss_average)
                    scaled = loss / self.accumulation
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                n = float(x.shape[0])
                correct, labelled = _decode_accuracy(outputs['out'].detach(), y, cfg.ignore_index)
                m = self.meters
                m['loss'] += float(loss.detach()) * n
                m['decode_loss'] += parts['decode_loss'] * n
                m['aux_loss'] += parts.get('aux_loss', 0.0) * n
                m['correct'] += correct
                m['labelled'] += labelled
                m['n'] += n
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            check_step(float(loss.detach()), norm if self.scaler is None else 0.0, epoch=epoch + 1, step=b,
                       global_step=self.iteration, resume_hint=self._resume_hint())
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.iteration += 1
            self.meters['grad_norm'] += float(norm)
            self.meters['steps'] += 1
            if self.show_progress and hasattr(bar, 'set_postfix') and self.meters['n']:
                bar.set_postfix(loss=f'{self.meters["loss"] / self.meters["n"]:.4f}', refresh=False)
            if cfg.log_every and self.iteration % cfg.log_every == 0:
                self._log_row()
            if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0 and self.iteration < until:
                self._check_corrupt(bad)
                bad = []
                self.save('last')
        if hasattr(bar, 'close'):
            bar.close()
        self._check_corrupt(bad)

    def _train_metrics(self) -> Dict[str, Any]:
        red = all_reduce_sums(self.meters)
        if not red['n']:
            return {}
        n = red['n']
        return dict(train_loss=red['loss'] / n, train_decode_loss=red['decode_loss'] / n,
                    train_aux_loss=red['aux_loss'] / n,
                    train_acc=100.0 * red['correct'] / max(red['labelled'], 1.0),
                    grad_norm=red['grad_norm'] / max(red['steps'], 1.0))

    def _log_row(self, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        row: Dict[str, Any] = dict(iter=self.iteration, lr=self.optimizer.param_groups[0]['lr'],
                                   **self._train_metrics(), **(extra or {}))
        self.meters = self._zero_meters()
        if self.history and self.history[-1]['iter'] == self.iteration:
            self.history[-1].update(row)
            row = self.history[-1]
        else:
            self.history.append(row)
        self.run.write_metrics(self.history)
        self.run.log(self._row_line(row), console=bool(extra))
        return row

    def validate(self) -> SegMetrics:
        cfg = self.cfg
        model = _unwrap(self.model)
        with oom_advice(BatchLayout(1, self.env.world_size, 1), 'evaluation'):
            cm, bad = evaluate(model, self.val_loader, self.num_classes, self.device, cfg.eval_mode, cfg.eval_crop,
                               cfg.eval_stride, cfg.ignore_index, channels_last=cfg.channels_last,
                               window_batch=cfg.eval_window_batch, show_progress=self.show_progress,
                               desc=f'eval @{self.iteration}', total=len(self.val_sampler))
        gathered = all_gather_objects(bad)
        names = sorted({self.val_source.name_of(i) for part in gathered for i in part})
        if names:
            raise DataError(f'{len(names)} validation image(s) cannot be read, e.g. {", ".join(names[:3])}; '
                            f'the metrics would be wrong. Fix or remove them.')
        return cm.reduce().compute(self.classes)

    def _evaluate_and_checkpoint(self, t_train: float) -> None:
        t0 = time.time()
        metrics = self.validate()
        improved = metrics.miou > self.best['mIoU']
        if improved:
            self.best = dict(mIoU=metrics.miou, iteration=self.iteration)
        row = self._log_row(dict(mIoU=metrics.miou, mAcc=metrics.macc, aAcc=metrics.aacc, best_mIoU=self.best['mIoU'],
                                 train_time_s=round(t_train, 2), eval_time_s=round(time.time() - t0, 2)))
        self.last_eval = dict(row, per_class=dict(zip(metrics.class_names, metrics.iou)))
        self.save('last')
        if improved and self.env.is_main:
            self.run.copy_checkpoint('last', 'best')
        self.run.plot_curves(self.history, CURVE_PANELS, x_key='iter', title=f'{self.recipe} ({self.cfg.backbone})')
        self.run.log(format_per_class(metrics), console=False)

    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        self._write_config()
        if self.iteration == 0:
            self.run.log(self._banner())
        while self.iteration < cfg.iters:
            until = min(cfg.iters, (self.iteration // cfg.eval_every + 1) * cfg.eval_every)
            t0 = time.time()
            self.train_steps(until)
            self._evaluate_and_checkpoint(time.time() - t0)
        if self.env.is_main and cfg.demo_images:
            from .visualize import save_predictions
            path = save_predictions(_unwrap(self.model), self.val_source, self.run.path / 'predictions.png',
                                    cfg, self.device, num_images=cfg.demo_images)
            self.run.log(f'predictions beside the ground truth: {path}')
        self.run.log(f'done: best mIoU {self.best["mIoU"]:.2f} at iteration {self.best["iteration"]}; '
                     f'run folder {self.run.path}')
        return dict(best=self.best, history=self.history, run=str(self.run.path), last_eval=self.last_eval)

    def _write_config(self) -> None:
        preset = SEG_PRESETS.get(self.recipe)
        header = (f'# polynext seg train: recipe {self.recipe}' + (f' ({preset.source})' if preset else '') +
                  f'\n# resolved config; repeat with: polynext seg train --config {self.run.path / RunFolder.CONFIG}')
        self.run.write_config(dict(recipe=self.recipe, **config_to_dict(self.cfg)), header=header)

    def _banner(self) -> str:
        cfg, L = self.cfg, self.layout
        model = _unwrap(self.model)
        n_params = sum(p.numel() for p in model.parameters())
        amp = cfg.amp if self.amp_dtype is not None else 'fp32'
        return (f'polynext seg train: recipe {self.recipe} | UperNet + {cfg.backbone} ({n_params:,} params, '
                f'{self.num_classes} classes) | {self.train_source.description}\n'
                f'  batch {L.effective} = {L.device_batch} per device × {L.world_size} device(s) × {L.accumulation} '
                f'accumulation | AdamW lr {cfg.lr:g} wd {cfg.weight_decay:g} | {cfg.iters} iterations, eval every '
                f'{cfg.eval_every} ({cfg.eval_mode}) | {self.device.type} {amp} | run folder {self.run.path}')

    @staticmethod
    def _row_line(row: Dict[str, Any]) -> str:
        s = f'iter {row["iter"]}'
        if 'train_loss' in row:
            s += f'  loss {row["train_loss"]:.4f}  acc {row["train_acc"]:.2f}%'
        if 'mIoU' in row:
            s += f'  mIoU {row["mIoU"]:.2f}  mAcc {row["mAcc"]:.2f}  aAcc {row["aAcc"]:.2f}'
        return s + f'  lr {row["lr"]:.3g}'


def json_classes(classes: List[str]) -> str:
    return json.dumps(list(classes))


# -------------------------------------------------------------------------------------------
# entry point
# -------------------------------------------------------------------------------------------

def _prepare(cfg: SegConfig, recipe: str, resume: Optional[str], fresh: bool,
             explicit: Dict[str, Any]) -> Tuple[SegConfig, str, Path, Optional[Dict[str, Any]]]:
    state = None
    if resume:
        state = load_training_state(resume)
        if state.get('format') != STATE_FORMAT:
            raise CheckpointError(f'{resume} is not a segmentation training state; classification runs resume with '
                                  f'`polynext train --resume`')
        from ..engine.config import apply_overrides
        saved = apply_overrides(SegConfig(), state['config'], source=str(resume))
        bad = [k for k, v in explicit.items()
               if k not in RESUME_SAFE_KEYS and config_diff({k: v}, {k: getattr(saved, k)})]
        if bad:
            raise ConfigError(f"cannot change '{bad[0]}' when resuming ({getattr(saved, bad[0])!r} in the checkpoint, "
                              f"{explicit[bad[0]]!r} asked for); start a new run with --output DIR instead")
        changes = {k: v for k, v in explicit.items() if k in RESUME_SAFE_KEYS}
        cfg = dataclasses.replace(saved, **changes).validate()
        recipe = state.get('recipe', recipe)
        run_dir = Path(changes['output']) if changes.get('output') else (
            Path(resume).parent if Path(resume).is_file() else Path(resume))
        return cfg, recipe, run_dir, state
    run_dir = Path(cfg.output or default_output(recipe))
    last = run_dir / 'last.state.pt'
    if last.is_file() and not fresh:
        state = load_training_state(last)
        diff = config_diff(state.get('config', {}), config_to_dict(cfg), ignore=RESUME_SAFE_KEYS)
        if state.get('format') != STATE_FORMAT or diff:
            what = f' ({diff[0][0]}: {diff[0][1]!r} there, {diff[0][2]!r} now)' if diff else ''
            raise ConfigError(f'{run_dir} holds another run{what}; resume it unchanged, pass --output NEW_DIR for a '
                              f'new run, or --fresh to overwrite it')
    return cfg, recipe, run_dir, state


def train_segmentation(cfg: SegConfig, recipe: str, resume: Optional[str] = None, fresh: bool = False,
                       explicit: Optional[Dict[str, Any]] = None, show_progress: bool = True,
                       quiet: bool = False) -> Dict[str, Any]:
    """Train (or resume) a segmentation run; returns ``{'best', 'history', 'run', 'last_eval'}``."""
    from ..factory import check_model_name
    check_model_name(cfg.backbone)
    cfg, recipe, run_dir, state = _prepare(cfg, recipe, resume, fresh, dict(explicit or {}))
    env = init_distributed(cfg.device)
    try:
        if state is not None and int(state['iteration']) >= cfg.iters:
            best = state.get('best') or {}
            if env.is_main and not quiet:
                print(f'{run_dir} is a finished run ({cfg.iters} iterations, best mIoU '
                      f'{best.get("mIoU", float("nan")):.2f}); pass --fresh to train it again or --output NEW_DIR')
            return dict(best=best, history=state.get('history', []), run=str(run_dir), last_eval={})
        trainer = SegTrainer(cfg, recipe, run_dir, env, resume_state=state, show_progress=show_progress, quiet=quiet)
        return trainer.fit()
    finally:
        cleanup_distributed()
