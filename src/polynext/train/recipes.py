"""Training recipes: ``TrainConfig`` (every knob, typed) and the named presets, in one place.

A preset reproduces what the authors actually ran, quirks included:

* PolyNeXt ImageNet-1k (``cpolynext_t`` ... ``cpolynext_s_bn``): spec §9, i.e. the authors'
  ``train_multiGpu.py`` + ``scripts/*.sh``.
* PolyNeXt low-resolution (``cpolynext_lr_cifar10`` / ``_svhn`` / ``_tiny_imagenet``, and
  ``cpolynext_lr`` = the CIFAR-10 one): spec §9.2, ``train_lowres.py``.
* MetaFormer baselines (Tables 13-15 of the MetaFormer paper, with what ``train.py`` and the
  scripts add: the hidden 10 cool-down epochs, the warm-up lr, min lr and colour jitter):
  ``identityformer_s12`` ... ``caformer_b36`` from scratch, ``*_384`` fine-tuning at 384,
  ``*_in21k`` pre-training and ``*_in21ft1k`` / ``*_in21ft1k_384`` fine-tuning from 21K with
  the 21841 → 1000 head mapping.
* ``cpolynext_lr_digits``: the built-in demo (scikit-learn's handwritten digits, no download).

Where the reference has a quirk, the preset keeps it and ``FIDELITY`` names the field and the
usual practice (``polynext train --usual NAME`` switches it).

The effective batch is stored (``batch_size``) together with the per-device batch
(``device_batch_size``); the accumulation steps follow from the number of devices
(``accumulation_steps``), so the recipe is the same on 1, 2 or 8 GPUs.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..errors import ConfigError
from ..models.polynext import REFERENCE_NAMES

__all__ = ['DATASETS', 'TrainConfig', 'Preset', 'PRESETS', 'FIDELITY', 'FidelityFlag', 'DEFAULT_RECIPE', 'get_preset',
           'list_recipes', 'accumulation_steps', 'usual_practice_overrides', 'resolve_config', 'RAND_AUGMENT']

#: the kinds of ``TrainConfig.dataset`` (see ``polynext.train.data``)
DATASETS = ('folder', 'digits', 'cluttered_digits', 'cifar10', 'svhn', 'tiny_imagenet')
#: timm RandAugment string of every recipe here: magnitude 9, std 0.5, "increasing" op set
RAND_AUGMENT = 'rand-m9-mstd0.5-inc1'
CIFAR_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR_STD = (0.24703233, 0.24348505, 0.26158768)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a classification training run. Fields are grouped as in the paper tables."""
    # ---- model ----
    model: str = 'cpolynext_t'
    model_kwargs: Dict[str, Any] = field(default_factory=dict)   # extra timm.create_model arguments
    drop_path: float = 0.0                     # peak stochastic depth (linear over the blocks)
    head_dropout: float = 0.0                  # dropout before the classifier
    head_dropout_ramp: Optional[int] = None    # p_e = min(p, p·e/R) set at each epoch start; None: constant p
    initial_checkpoint: Optional[str] = None   # weights to start from (fine-tuning), any layout polynext loads
    head_map: Optional[str] = None             # 'in21k_to_in1k' or a JSON class map: remap a 21841-class head
    # ---- data ----
    dataset: str = 'folder'                    # one of DATASETS
    data: Optional[str] = None                 # dataset root (folder: train/ and val/ class folders)
    cluttered_train: int = 2400                # cluttered_digits (generated): train / val images
    cluttered_val: int = 800
    download: bool = False                     # let torchvision download cifar10 / svhn / tiny_imagenet
    num_classes: Optional[int] = None          # None: taken from the data
    img_size: int = 224
    train_interpolation: str = 'bicubic'       # bicubic | bilinear | random (per-image choice)
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    randaugment: Optional[str] = RAND_AUGMENT  # timm RandAugment config string; None: off
    color_jitter: Optional[float] = None       # (timm disables it when RandAugment is on)
    aug_pipeline: str = 'reference'            # reference (PolyNeXt scripts) | timm (timm create_transform)
    random_erasing: float = 0.25               # probability; per-pixel N(0, 1) values, one box
    mean: Tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: Tuple[float, float, float] = IMAGENET_DEFAULT_STD
    eval_resize: int = 232                     # shorter side before the centre crop
    eval_crop: Optional[int] = 224             # None: no crop
    eval_interpolation: str = 'bicubic'
    workers: int = 8                           # data-loading processes per device
    max_corrupt: float = 0.01                  # unreadable images tolerated: fraction (< 1) or count (>= 1)
    # ---- batch mixing and loss ----
    mixup_alpha: float = 0.8                   # 0: off
    cutmix_alpha: float = 1.0                  # 0: off
    mix_switch_prob: float = 0.5               # per batch: CutMix with this probability, else MixUp
    label_smoothing: float = 0.1               # applied on top of the mixed soft targets
    # ---- optimizer ----
    optimizer: str = 'adamw'                   # adamw | lamb  (timm create_optimizer_v2)
    lr: float = 4e-3                           # absolute (not rescaled by the batch size)
    min_lr: float = 1e-5
    weight_decay: float = 0.01
    wd_exclusions: bool = False                # True: no decay on 1-D params and model.no_weight_decay()
    opt_eps: float = 1e-8
    opt_betas: Tuple[float, float] = (0.9, 0.999)
    clip_grad: Optional[float] = 5.0           # global L2 norm clip before each step; None: off
    lamb_max_grad_norm: Optional[float] = None  # LAMB's internal global-norm clip
    lamb_decoupled_decay: bool = True          # LAMB: p ← p − lr·wd·p before the trust ratio
    # ---- schedule ----
    epochs: int = 300
    schedule: str = 'cosine'                   # cosine | constant
    schedule_granularity: str = 'epoch'        # epoch: lr constant within an epoch | step
    warmup_epochs: int = 0
    warmup_lr: float = 0.0
    cooldown_epochs: int = 0                   # extra epochs at min_lr after `epochs` (timm's cool-down)
    batch_size: int = 1024                     # effective batch = device batch × devices × accumulation
    device_batch_size: int = 128
    # ---- EMA ----
    ema: bool = True
    ema_decay: float = 0.9999
    ema_start_epoch: int = 200                 # EMA updated once per optimizer step from this epoch on
    ema_init: str = 'first_update'             # first_update: 1st update copies | model: copy at creation
    # ---- precision and speed ----
    amp: str = 'bf16'                          # bf16 | fp16 | none: autocast on CUDA (CPU runs fp32)
    cpu_amp: bool = False                      # also autocast on CPU (slow on most CPUs; for testing)
    compile: bool = False                      # torch.compile the model
    channels_last: bool = True
    device: str = 'auto'                       # auto | cpu | cuda
    threads: int = 0                           # CPU threads of torch per process; 0: torch's default
    # ---- run ----
    seed: int = 0
    output: Optional[str] = None               # run folder (default runs/<recipe>)
    checkpoint_every: int = 0                  # also save 'last' every N optimizer steps; 0: epoch ends only
    log_every: int = 50                        # progress-bar refresh, in micro-batches

    # ------------------------------------------------------------------------------------
    def validate(self) -> 'TrainConfig':
        """One clear ``ConfigError`` for an impossible value."""
        choices = dict(dataset=DATASETS,
                       train_interpolation=('bicubic', 'bilinear', 'random'),
                       eval_interpolation=('bicubic', 'bilinear'), aug_pipeline=('reference', 'timm'),
                       optimizer=('adamw', 'lamb'), schedule=('cosine', 'constant'),
                       schedule_granularity=('epoch', 'step'), ema_init=('first_update', 'model'),
                       amp=('bf16', 'fp16', 'none'), device=None)
        for name, allowed in choices.items():
            value = getattr(self, name)
            if allowed is not None and value not in allowed:
                raise ConfigError(f"bad value for '{name}': {value!r}; choose one of {', '.join(allowed)}")
        if not (self.device in ('auto', 'cpu', 'cuda') or self.device.startswith('cuda:')):
            raise ConfigError(f"bad value for 'device': {self.device!r}; choose auto, cpu, cuda or cuda:N")
        positive = dict(epochs=self.epochs, batch_size=self.batch_size, device_batch_size=self.device_batch_size,
                        img_size=self.img_size, eval_resize=self.eval_resize, cluttered_train=self.cluttered_train,
                        cluttered_val=self.cluttered_val)
        for name, v in positive.items():
            if v <= 0:
                raise ConfigError(f"bad value for '{name}': {v}; it must be positive")
        for name in ('lr', 'min_lr', 'weight_decay', 'warmup_lr', 'mixup_alpha', 'cutmix_alpha', 'max_corrupt',
                     'warmup_epochs', 'cooldown_epochs', 'workers', 'checkpoint_every', 'ema_start_epoch', 'threads'):
            if getattr(self, name) < 0:
                raise ConfigError(f"bad value for '{name}': {getattr(self, name)}; it must be >= 0")
        for name in ('drop_path', 'head_dropout', 'hflip', 'random_erasing', 'mix_switch_prob',
                     'label_smoothing'):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"bad value for '{name}': {v}; it must be between 0 and 1")
        if self.head_dropout >= 1.0:
            raise ConfigError(f"bad value for 'head_dropout': {self.head_dropout}; it must be below 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"bad value for 'ema_decay': {self.ema_decay}; it must be in [0, 1)")
        if self.head_dropout_ramp is not None and self.head_dropout_ramp <= 0:
            raise ConfigError("bad value for 'head_dropout_ramp': must be a positive number of epochs or null")
        if self.batch_size % self.device_batch_size:
            raise ConfigError(f'the effective batch {self.batch_size} is not a multiple of the per-device batch '
                              f'{self.device_batch_size}; change --batch-size or --device-batch-size')
        if self.eval_crop is not None and self.eval_crop > self.eval_resize:
            raise ConfigError(f'eval_crop {self.eval_crop} is larger than eval_resize {self.eval_resize}')
        if self.warmup_epochs >= self.epochs and self.schedule == 'cosine' and self.warmup_epochs:
            raise ConfigError(f'warmup_epochs {self.warmup_epochs} must be below epochs {self.epochs}')
        if self.min_lr > self.lr:
            raise ConfigError(f'min_lr {self.min_lr} is larger than lr {self.lr}')
        return self

    @property
    def total_epochs(self) -> int:
        """Epochs that actually run: ``epochs`` + the cool-down at ``min_lr``."""
        return self.epochs + self.cooldown_epochs

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Gradient-accumulation steps that give the effective batch on ``world_size`` devices."""
    per_step = cfg.device_batch_size * world_size
    if cfg.batch_size % per_step:
        raise ConfigError(
            f'the effective batch {cfg.batch_size} cannot be split into {world_size} device(s) × '
            f'{cfg.device_batch_size} per device × whole accumulation steps; choose --device-batch-size so that '
            f'{cfg.batch_size} is a multiple of (device batch × {world_size})')
    return cfg.batch_size // per_step


# ----------------------------------------------------------------------------------------
# Fidelity flags: the reference's quirks, each a field with the usual practice as the other value
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FidelityFlag:
    field: str
    usual: Any
    reference: str      # what the reference does
    practice: str       # what the usual value does


FIDELITY: Dict[str, FidelityFlag] = {
    'wd_exclusions': FidelityFlag(
        'wd_exclusions', True,
        'PolyNeXt decays every parameter (norm weights, gates, scales, biases): one param group',
        'no weight decay on 1-D parameters and model.no_weight_decay() (timm filter_bias_and_bn)'),
    'ema_from_start': FidelityFlag(
        'ema_start_epoch', 0,
        'PolyNeXt updates the EMA only from epoch 200 (the first update copies the weights)',
        'EMA updated from the first step'),
    'no_cooldown': FidelityFlag(
        'cooldown_epochs', 0,
        "MetaFormer's train.py runs timm's 10 cool-down epochs at min_lr after the 300 (310 in all)",
        'exactly `epochs` epochs, as the paper states'),
}


def usual_practice_overrides(names: List[str], cfg: TrainConfig) -> Dict[str, Any]:
    """``{field: usual value}`` for the named fidelity flags ('all' = every one)."""
    if not names:
        return {}
    if 'all' in names:
        names = list(FIDELITY)
    out = {}
    for n in names:
        if n not in FIDELITY:
            close = difflib.get_close_matches(n, list(FIDELITY), n=1) or [f for f in FIDELITY if f.startswith(n)]
            hint = f" Did you mean '{close[0]}'?" if close else ''
            raise ConfigError(f"unknown fidelity flag '{n}'.{hint} Choose from: {', '.join(FIDELITY)}, all")
        flag = FIDELITY[n]
        out[flag.field] = flag.usual
    return out


# ----------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    config: TrainConfig
    source: str                        # where the values come from
    needs_checkpoint: bool = False     # fine-tuning recipes need --initial-checkpoint


PRESETS: Dict[str, Preset] = {}

# --- PolyNeXt ImageNet-1k (spec §9): shared by every script ---------------------------------
_POLYNEXT_IN1K = TrainConfig(
    dataset='folder', img_size=224, epochs=300, min_lr=1e-5, label_smoothing=0.1, mixup_alpha=0.8,
    cutmix_alpha=1.0, mix_switch_prob=0.5, randaugment=RAND_AUGMENT, random_erasing=0.25, hflip=0.5,
    aug_pipeline='reference', eval_resize=232, eval_crop=224, eval_interpolation='bicubic', schedule='cosine',
    schedule_granularity='epoch', warmup_epochs=0, clip_grad=5.0, ema=True, ema_decay=0.9999, ema_start_epoch=200,
    ema_init='first_update', amp='bf16', batch_size=1024, wd_exclusions=False, opt_eps=1e-8)

# name: (optimizer, lr, weight decay, per-GPU batch, drop path, head dropout, ramp, random interp, extra)
# (AdamW always runs with eps 1e-8: the scripts' --eps only ever reaches LAMB)
_POLYNEXT_TABLE = {
    'cpolynext_t':    ('adamw', 4e-3, 0.01, 128, 0.0,  0.0, None, False, {}),
    'cpolynext_s':    ('adamw', 4e-3, 0.01, 128, 0.2,  0.4, 300,  True,  {}),
    'cpolynext_b':    ('adamw', 4e-3, 0.01, 128, 0.3,  0.6, 300,  True,  {}),
    'cpolynext_l':    ('adamw', 4e-3, 0.01, 128, 0.5,  0.6, 300,  True,  {}),
    'apolynext_t':    ('lamb',  2e-3, 0.01, 128, 0.03, 0.1, 300,  False, {}),
    'apolynext_s':    ('lamb',  2e-3, 0.01, 128, 0.25, 0.4, 300,  True,  {}),
    'apolynext_b':    ('lamb',  2e-3, 0.01, 128, 0.4,  0.6, 300,  True,  {}),
    'apolynext_l':    ('lamb',  2e-3, 0.01, 128, 0.55, 0.7, 300,  True,  dict(opt_eps=1e-6)),
    'cpolynext_t_bn': ('adamw', 1e-3, 0.05, 256, 0.0,  0.0, None, False, {}),
    'apolynext_t_bn': ('adamw', 1e-3, 0.05, 256, 0.0,  0.0, None, False, {}),
    # the S_BN script passes --dropout 0.4 without --rampout: constant 0.4 from the first epoch
    'cpolynext_s_bn': ('adamw', 1e-3, 0.05, 256, 0.2,  0.4, None, False, {}),
}
for _name, (_opt, _lr, _wd, _bs, _dp, _hd, _ramp, _ri, _extra) in _POLYNEXT_TABLE.items():
    _opt_fields = (dict(clip_grad=5.0) if _opt == 'adamw' else
                   # LAMB: internal clip at 5, external clip disabled, decay before the trust ratio
                   dict(clip_grad=None, lamb_max_grad_norm=5.0, lamb_decoupled_decay=True))
    PRESETS[_name] = Preset(dataclasses.replace(
        _POLYNEXT_IN1K, model=_name, optimizer=_opt, lr=_lr, weight_decay=_wd, device_batch_size=_bs,
        drop_path=_dp, head_dropout=_hd, head_dropout_ramp=_ramp,
        train_interpolation='random' if _ri else 'bicubic', **_opt_fields, **_extra),
        source=f"spec §9 (authors' scripts/{REFERENCE_NAMES[_name].replace('_bn', '_BN')}.sh)")

# --- PolyNeXt low resolution (spec §9.2) ------------------------------------------------------
_LOWRES = TrainConfig(
    model='cpolynext_lr', optimizer='adamw', lr=1e-3, min_lr=0.0, weight_decay=0.05, opt_eps=1e-8,
    batch_size=96, device_batch_size=96, epochs=300, schedule='cosine', schedule_granularity='epoch',
    warmup_epochs=0, label_smoothing=0.1, mixup_alpha=1.0, cutmix_alpha=1.0, mix_switch_prob=0.5,
    randaugment=RAND_AUGMENT, drop_path=0.0, head_dropout=0.0, clip_grad=5.0, amp='bf16', ema=False,
    train_interpolation='random', crop_scale=(0.08, 1.0), random_erasing=0.25, mean=CIFAR_MEAN, std=CIFAR_STD,
    aug_pipeline='reference', wd_exclusions=False, workers=8)
for _name, _size, _flip, _script in (('cifar10', 32, 0.5, 'CIFAR10'), ('svhn', 32, 0.0, 'SVHN'),
                                     ('tiny_imagenet', 64, 0.5, 'TinyImageNet')):
    PRESETS[f'cpolynext_lr_{_name}'] = Preset(dataclasses.replace(
        _LOWRES, dataset=_name, img_size=_size, hflip=_flip, eval_resize=_size, eval_crop=None),
        source=f"spec §9.2 (authors' scripts/CPolyNeXt_LR_{_script}.sh)")
PRESETS['cpolynext_lr'] = PRESETS['cpolynext_lr_cifar10']

# --- the built-in demo: scikit-learn digits, 2 CPU cores, a few minutes ------------------------
# one compute thread: the tiny model gains little from a second one, and on a busy machine two
# OpenMP threads slow it down many times over; batch 32 leaves the polynomial net's initial
# plateau within ~2 epochs (lr 1e-2; at 3e-3 it stays there much longer)
DEFAULT_RECIPE = 'cpolynext_lr_digits'
PRESETS[DEFAULT_RECIPE] = Preset(TrainConfig(
    model='cpolynext_lr', model_kwargs=dict(init_channels=8), dataset='digits', img_size=16,
    optimizer='adamw', lr=1e-2, min_lr=1e-5, weight_decay=0.05, batch_size=32, device_batch_size=32, epochs=15,
    schedule='cosine', schedule_granularity='step', warmup_epochs=0, label_smoothing=0.1, mixup_alpha=0.0,
    cutmix_alpha=0.0, randaugment=None, hflip=0.0, train_interpolation='bilinear', crop_scale=(0.6, 1.0),
    crop_ratio=(0.8, 1.25), random_erasing=0.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), eval_resize=16,
    eval_crop=None, clip_grad=5.0, ema=False, amp='bf16', workers=0, device='auto', threads=1),
    source='polynext demo: scikit-learn digits (8x8 → 16x16), stratified 80/20 split, seed 0')

# --- generated cluttered digits: the recipe of `polynext ablate` ---------------------------------
# CPolyNeXt-T at base width 16 (the paper's depth: 12 cells, 36 blocks) on 64 px cluttered digits,
# 3 epochs of 2400 images: short enough that every row of both ablation tables × 3 seeds fits in
# 30 minutes on 2 CPU cores, long enough that the baseline leaves the polynomial net's initial
# plateau (see README "Ablations"). No augmentation: every image is already a fresh rendering.
PRESETS['cluttered_digits'] = Preset(TrainConfig(
    model='cpolynext_t', model_kwargs=dict(init_channels=16), dataset='cluttered_digits', img_size=64,
    cluttered_train=2400, cluttered_val=800,
    optimizer='adamw', lr=4e-3, min_lr=1e-5, weight_decay=0.05, batch_size=32, device_batch_size=32, epochs=3,
    schedule='cosine', schedule_granularity='step', warmup_epochs=0, label_smoothing=0.1, mixup_alpha=0.0,
    cutmix_alpha=0.0, randaugment=None, hflip=0.0, train_interpolation='bilinear', crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0), random_erasing=0.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), eval_resize=64,
    eval_crop=None, clip_grad=5.0, ema=False, amp='bf16', workers=0, device='auto', threads=1),
    source='polynext: generated cluttered digits (64x64), CPolyNeXt-T C0=16, 3 epochs; `polynext ablate`')

# --- MetaFormer baselines (metaformer_baselines.md §4) -----------------------------------------
_MF_SCRATCH = TrainConfig(
    dataset='folder', img_size=224, epochs=300, cooldown_epochs=10, schedule='cosine', schedule_granularity='epoch',
    warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.05, wd_exclusions=True, batch_size=4096, device_batch_size=128,
    label_smoothing=0.1, randaugment=RAND_AUGMENT, mixup_alpha=0.8, cutmix_alpha=1.0, mix_switch_prob=0.5,
    random_erasing=0.25, color_jitter=0.4, train_interpolation='random', aug_pipeline='timm', clip_grad=None,
    ema=False, amp='none', eval_resize=224, eval_crop=224, eval_interpolation='bicubic', opt_eps=1e-8)
_LAMB_TIMM06 = dict(optimizer='lamb', opt_eps=1e-6, lamb_max_grad_norm=1.0, lamb_decoupled_decay=False,
                    clip_grad=None)
_MF_SIZES_13 = ('s12', 's24', 's36', 'm36', 'm48')
_MF_SIZES_14 = ('s18', 's36', 'm36', 'b36')
_TABLE13 = {  # family: drop path S12/S24/S36/M36/M48 (AdamW 4e-3, 5 warm-up epochs, linear head)
    'identityformer': (0.1, 0.1, 0.2, 0.3, 0.4),
    'randformer': (0.1, 0.1, 0.2, 0.3, 0.3),
    'poolformerv2': (0.1, 0.1, 0.2, 0.3, 0.4),
}
for _fam, _dps in _TABLE13.items():
    for _size, _dp in zip(_MF_SIZES_13, _dps):
        PRESETS[f'{_fam}_{_size}'] = Preset(dataclasses.replace(
            _MF_SCRATCH, model=f'{_fam}_{_size}', optimizer='adamw', lr=4e-3, warmup_epochs=5, drop_path=_dp),
            source='MetaFormer Table 13 + train.py defaults')
# Table 4's isotropic IdentityFormer-S: the paper gives no separate recipe; it follows DeiT-S, whose
# drop path (0.1) equals the Table 13 S12 setting, so the Table 13 recipe is used (an inference).
for _model in ('identityformer_s_iso', 'identityformer_s_iso_convstem'):
    PRESETS[_model] = Preset(dataclasses.replace(
        _MF_SCRATCH, model=_model, optimizer='adamw', lr=4e-3, warmup_epochs=5, drop_path=0.1),
        source='MetaFormer Table 4 (no recipe published; Table 13 recipe with DeiT-S drop path 0.1, inferred)')
_TABLE14 = {  # family: (optimizer fields, lr, warmup, drop path, head dropout, finetune lr, ft drop path, ft head dropout)
    'convformer': (dict(optimizer='adamw'), 4e-3, (0.2, 0.3, 0.4, 0.6), (0.0, 0.0, 0.0, 0.0),
                   5e-5, (0.3, 0.5, 0.8, 0.8), (0.4, 0.4, 0.5, 0.5)),
    'caformer': (_LAMB_TIMM06, 8e-3, (0.15, 0.3, 0.4, 0.6), (0.0, 0.4, 0.4, 0.5),
                 1e-4, (0.3, 0.5, 0.7, 0.8), (0.4, 0.4, 0.4, 0.5)),
}
_MF_FINETUNE = dict(epochs=30, cooldown_epochs=0, schedule='constant', warmup_epochs=0, batch_size=1024,
                    device_batch_size=32, mixup_alpha=0.0, cutmix_alpha=0.0, ema=True, ema_decay=0.9999,
                    ema_start_epoch=0, ema_init='model')
for _fam, (_optf, _lr, _dps, _hds, _ftlr, _ftdps, _fthds) in _TABLE14.items():
    for i, _size in enumerate(_MF_SIZES_14):
        _model = f'{_fam}_{_size}'
        PRESETS[_model] = Preset(dataclasses.replace(
            _MF_SCRATCH, model=_model, lr=_lr, warmup_epochs=20, drop_path=_dps[i], head_dropout=_hds[i], **_optf),
            source='MetaFormer Table 14 + scripts/' + _fam + f'/train_{_model}.sh')
        PRESETS[f'{_model}_384'] = Preset(dataclasses.replace(
            _MF_SCRATCH, model=_model, lr=_ftlr, drop_path=_ftdps[i], head_dropout=_fthds[i], img_size=384,
            eval_resize=384, eval_crop=384, **_optf, **_MF_FINETUNE),
            source='MetaFormer Table 14 (384 fine-tuning) + scripts/' + _fam + f'/finetune_{_model}_384.sh',
            needs_checkpoint=True)
_TABLE15 = {  # family: (opt fields, pretrain lr, pretrain dp, pretrain hd, finetune lr, ft dp, ft hd)
    'convformer': (dict(optimizer='adamw'), 1e-3, (0.0, 0.0, 0.1, 0.2), (0.2, 0.2, 0.2, 0.3),
                   5e-5, (0.1, 0.1, 0.1, 0.3), (0.2, 0.2, 0.2, 0.5)),
    'caformer': (_LAMB_TIMM06, 2e-3, (0.1, 0.1, 0.1, 0.3), (0.2, 0.2, 0.2, 0.4),
                 1e-4, (0.1, 0.1, 0.1, 0.3), (0.2, 0.2, 0.2, 0.5)),
}
for _fam, (_optf, _lr, _dps, _hds, _ftlr, _ftdps, _fthds) in _TABLE15.items():
    for i, _size in enumerate(_MF_SIZES_14):
        _model = f'{_fam}_{_size}'
        PRESETS[f'{_model}_in21k'] = Preset(dataclasses.replace(
            _MF_SCRATCH, model=_model, epochs=90, lr=_lr, warmup_epochs=5, drop_path=_dps[i], head_dropout=_hds[i],
            num_classes=21841, **_optf),
            source='MetaFormer Table 15 (ImageNet-21K pre-training; no script released, train.py defaults)')
        for _res in (224, 384):
            _suffix = '_in21ft1k' + ('_384' if _res == 384 else '')
            PRESETS[_model + _suffix] = Preset(dataclasses.replace(
                _MF_SCRATCH, model=_model, lr=_ftlr, drop_path=_ftdps[i], head_dropout=_fthds[i], img_size=_res,
                eval_resize=_res, eval_crop=_res, head_map='in21k_to_in1k', **_optf, **_MF_FINETUNE),
                source=f'MetaFormer Table 15 (21K → 1K fine-tuning at {_res}; head rows mapped 21841 → 1000)',
                needs_checkpoint=True)


def list_recipes(pattern: str = '') -> List[str]:
    return [n for n in PRESETS if pattern in n]


def get_preset(name: str) -> Preset:
    """The named preset, or a ``ConfigError`` naming the closest recipes."""
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, list(PRESETS), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ''
    raise ConfigError(f"unknown recipe '{name}'.{hint} `polynext train --list-recipes` lists them.")


def resolve_config(recipe: Optional[str] = None, config_file: Optional[str] = None,
                   flags: Optional[Mapping[str, Any]] = None, set_items: Optional[List[str]] = None,
                   usual: Optional[List[str]] = None) -> Tuple[str, TrainConfig]:
    """The recipe name and its config after every override, in this order: preset < YAML file
    < ``--usual`` fidelity flags < command-line flags < ``--set key=value``.

    The base preset is ``recipe``, else the YAML file's ``recipe:`` key, else the preset named
    like ``flags['model']``, else the built-in digits demo.
    """
    from ..engine.config import apply_overrides, load_yaml, parse_set_args
    file_values = load_yaml(config_file) if config_file else {}
    file_recipe = file_values.pop('recipe', None)
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    model_flag = flags.get('model')
    name = recipe or file_recipe or (model_flag if model_flag in PRESETS else None) or DEFAULT_RECIPE
    cfg = get_preset(name).config
    cfg = apply_overrides(cfg, file_values, source=str(config_file))
    cfg = apply_overrides(cfg, usual_practice_overrides(list(usual or []), cfg), source='--usual')
    set_values = parse_set_args(set_items or [])
    if model_flag and model_flag != cfg.model and 'model_kwargs' not in set_values and 'model_kwargs' not in file_values:
        flags['model_kwargs'] = {}   # the preset's extra model arguments belong to its own model
    if 'data' in flags and cfg.dataset == 'digits' and 'dataset' not in flags and 'dataset' not in set_values:
        flags['dataset'] = 'folder'  # --data on the built-in demo means image folders
    cfg = apply_overrides(cfg, flags, source='the command line')
    cfg = apply_overrides(cfg, set_values, source='--set')
    return name, cfg.validate()
