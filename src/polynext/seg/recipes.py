"""Segmentation recipes: ``SegConfig`` (every knob, typed) and the named presets, in one place.

The ADE20K presets reproduce spec §11 (the PolyNeXt authors' MMSegmentation configs
``upernet_{c,a}polynext_s_512_160k_ade20k.py``):

* UperNet (UPerHead 512 channels, PPM (1, 2, 3, 6), dropout 0.1) + FCN auxiliary head on stage
  2 (256 channels, loss weight 0.4); fresh LayerNorms (with bias) on the four backbone outputs;
  backbone drop path 0.3; 150 classes, reduce-zero-label.
* Data: rescale to (2048, 512) × U(0.5, 2.0) keeping the ratio, 512² crop with cat_max_ratio
  0.75, flip 0.5, photometric distortion, normalise, pad 512 (label 255); evaluation at
  (2048, 512) with 512² sliding windows, stride 341.
* AdamW lr 1e-4, betas (0.9, 0.999), wd 0.05, with the reference's parameter-wise rules
  (``custom_keys``: substring of the full parameter name, the longest key wins; see
  ``POLYNEXT_KEYS``); poly schedule (power 1, min lr 0) per iteration, linear warm-up over 1500
  iterations from ratio 1e-6; 160k iterations of batch 16; evaluation and best checkpoint every
  16k iterations; gradient clipping: none (CPolyNeXt), global norm 5 + per-cell clipping at 5
  (APolyNeXt); bf16 autocast on GPU for training (evaluation in fp32).

The reference's keys were ``norm``, ``extra_norms``, ``skip_weight``, ``scale`` (decay ×0) and
``head`` (lr ×10). On the authors' parameter names ``norm`` matched no backbone LayerNorm (cell
norms are named ``postprocess`` / ``ops.k.N``), so their effect was: no decay on the extra
norms, the per-channel input scales (``preprocess*.scale``), the attention scale logits and
the gates (``skip_weight``); the backbone LayerNorm weights **were** decayed. ``POLYNEXT_KEYS``
gives the same effect on polynext's names; ``decay_backbone_norms=false`` also exempts the
backbone norms (adds the key ``norm``), which is what the reference meant to do.

ConvFormer-S18 / CAFormer-S18 (MetaFormer Table 10: "following Swin and ConvNeXt", AdamW,
batch 16, 160k iterations; no segmentation code or config was released): the same recipe with
the reference's keys applied literally to timm's names (``norm``, ``scale``, ``extra_norms``:
no decay on norms, layer / residual scales and StarReLU scales; ``head``: lr ×10), no
clipping, and drop path 0.3 (the value of the PolyNeXt configs; the MetaFormer paper does not
state one).

``upernet_shapes_demo`` (the default) trains a small CPolyNeXt-T (C0 = 16) with a 32-channel
UperNet on the generated shapes (no download) with the same pipeline scaled to 64 px.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

from ..engine.config import check_device, check_fields
from ..engine.memory import BatchLayout
from ..engine.nonfinite import NonFinitePolicy
from ..engine.precision import AMP_CHOICES
from ..engine.presets import PresetTable
from ..errors import ConfigError
from .segmentor import SegmentorSpec
from .transforms import ADE_MEAN, ADE_STD

__all__ = ['SegConfig', 'SEG_PRESETS', 'DEFAULT_SEG_RECIPE', 'POLYNEXT_KEYS', 'REFERENCE_KEYS',
           'effective_custom_keys', 'RESUME_SAFE_KEYS']

#: the reference's custom_keys mapped onto polynext's parameter names (same effect, see the module doc)
POLYNEXT_KEYS: Dict[str, Dict[str, float]] = {
    'extra_norms': dict(decay_mult=0.0),    # the segmentation wrapper's stage-output LayerNorms
    '.gates.': dict(decay_mult=0.0),        # Sigmoid-Scale gate logits (reference: skip_weight)
    '.scale0.': dict(decay_mult=0.0),       # per-channel input scales (reference: preprocess0.scale)
    '.scale1.': dict(decay_mult=0.0),       # (reference: preprocess1.scale)
    'mixer.scale': dict(decay_mult=0.0),    # PolyAttn per-head scale logits (reference: attention scale)
    'head': dict(lr_mult=10.0),             # decode_head and auxiliary_head, their BatchNorms included
}
#: the reference's custom_keys as written (what they do on timm's MetaFormer names)
REFERENCE_KEYS: Dict[str, Dict[str, float]] = {
    'norm': dict(decay_mult=0.0), 'extra_norms': dict(decay_mult=0.0), 'skip_weight': dict(decay_mult=0.0),
    'scale': dict(decay_mult=0.0), 'head': dict(lr_mult=10.0),
}
#: config keys that may differ between a run and its resumption
RESUME_SAFE_KEYS = ('data', 'output', 'workers', 'device', 'checkpoint_every', 'log_every', 'threads', 'compile',
                    'max_corrupt', 'eval_window_batch', 'demo_images', 'grad_checkpointing')


@dataclass(frozen=True)
class SegConfig:
    """Every setting of a segmentation training run."""
    # ---- model ----
    backbone: str = 'cpolynext_s'
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)   # extra timm.create_model arguments
    initial_checkpoint: Optional[str] = None     # classification weights for the backbone (any layout)
    drop_path: float = 0.3
    extra_norms: bool = True                     # fresh LayerNorm (with bias) on every backbone output
    head_channels: int = 512
    aux_channels: int = 256                      # 0: no auxiliary head
    aux_index: int = 2
    aux_weight: float = 0.4
    dropout: float = 0.1
    num_classes: Optional[int] = None            # None: the dataset's (150 for ADE20K)
    # ---- data ----
    dataset: str = 'ade20k'                      # ade20k | shapes (generated, no download)
    data: Optional[str] = None                   # the ADEChallengeData2016 folder
    reduce_zero_label: bool = True
    img_scale: Tuple[int, int] = (2048, 512)     # (long, short) edge targets of the keep-ratio resize
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    crop_size: int = 512
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True
    mean: Tuple[float, float, float] = ADE_MEAN  # 0-255 scale, RGB
    std: Tuple[float, float, float] = ADE_STD
    ignore_index: int = 255
    shapes_size: int = 64                        # generated set: image side, train / val images
    shapes_train: int = 400
    shapes_val: int = 100
    workers: int = 8
    max_corrupt: float = 0.001                   # unreadable training images tolerated: fraction (< 1) or count
    # ---- loss ----
    loss_average: str = 'all_pixels'             # all_pixels (mmseg: ignored pixels in the mean) | valid_pixels
    # ---- optimizer ----
    lr: float = 1e-4
    opt_betas: Tuple[float, float] = (0.9, 0.999)
    opt_eps: float = 1e-8
    weight_decay: float = 0.05
    custom_keys: Dict[str, Any] = field(default_factory=lambda: dict(POLYNEXT_KEYS))
    decay_backbone_norms: bool = True            # false: also no decay on parameters named *norm*
    clip_grad: Optional[float] = None            # global L2 norm; None: off
    cell_grad_clip: Optional[float] = None       # PolyNeXt per-cell gradient clipping (APolyNeXt: 5)
    on_nonfinite: str = 'stop'                   # at a NaN / inf loss or gradient: stop | skip | rollback
    nonfinite_limit: int = 3                     # skip: steps in a row; rollback: rollbacks per run (then stop)
    rollback_lr_factor: float = 0.5              # rollback: lr multiplier at each rollback
    # ---- schedule ----
    iters: int = 160000
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    min_lr: float = 0.0
    batch_size: int = 16                         # effective: device batch × devices × accumulation
    device_batch_size: int = 8
    # ---- evaluation ----
    eval_every: int = 16000                      # iterations; also at the end
    eval_mode: str = 'slide'                     # slide | whole
    eval_scale: Tuple[int, int] = (2048, 512)
    eval_crop: int = 512
    eval_stride: int = 341
    eval_window_batch: int = 4                   # sliding windows per forward
    # ---- precision and speed ----
    amp: str = 'bf16'                            # bf16 | fp16 | none: training autocast on CUDA (evaluation fp32)
    cpu_amp: bool = False                        # also autocast on CPU (slow on most CPUs; for testing)
    compile: bool = False
    grad_checkpointing: bool = False             # recompute the backbone in backward: less memory, same results
    channels_last: bool = True
    device: str = 'auto'
    threads: int = 0
    deterministic: bool = False                  # CUDA: deterministic algorithms, no TF32 / cudnn.benchmark (slower)
    # ---- run ----
    seed: int = 0
    output: Optional[str] = None                 # run folder (default runs/<recipe>)
    checkpoint_every: int = 1000                 # 'last' checkpoint every N iterations (resumable)
    log_every: int = 50                          # metrics row / progress refresh every N iterations
    demo_images: int = 6                         # rows of predictions.png at the end of training

    def spec(self, num_classes: int) -> SegmentorSpec:
        return SegmentorSpec(backbone=self.backbone, num_classes=num_classes, backbone_kwargs=dict(self.backbone_kwargs),
                             drop_path=self.drop_path, extra_norms=self.extra_norms, channels=self.head_channels,
                             dropout=self.dropout, aux_channels=self.aux_channels, aux_index=self.aux_index)

    # ---- what the engine's preset table needs ----
    COMMAND: ClassVar[str] = 'polynext seg train'
    MODEL_FIELDS: ClassVar[Tuple[str, str]] = ('backbone', 'backbone_kwargs')
    DATA_DATASETS: ClassVar[Dict[str, str]] = {'shapes': 'ade20k'}   # --data on the demo: an ADE20K folder

    def summary(self) -> Dict[str, str]:
        """The columns of ``polynext seg train --list-recipes``."""
        return dict(backbone=self.backbone, data=self.dataset, iters=str(self.iters), batch=str(self.batch_size),
                    lr=f'{self.lr:g}')

    def validate(self) -> 'SegConfig':
        check_fields(
            self,
            choices=dict(dataset=('ade20k', 'shapes'), loss_average=('all_pixels', 'valid_pixels'),
                         eval_mode=('slide', 'whole'), amp=AMP_CHOICES),
            positive=('iters', 'batch_size', 'device_batch_size', 'crop_size', 'head_channels', 'eval_crop',
                      'eval_stride', 'eval_every', 'shapes_size', 'shapes_train', 'shapes_val', 'eval_window_batch'),
            non_negative=('lr', 'min_lr', 'weight_decay', 'warmup_iters', 'workers', 'checkpoint_every',
                          'aux_channels', 'aux_weight', 'threads', 'max_corrupt', 'log_every', 'demo_images'),
            fractions=('drop_path', 'dropout', 'hflip', 'warmup_ratio'))
        check_device(self.device)
        if not 0.0 < self.cat_max_ratio <= 1.0:
            raise ConfigError(f"bad value for 'cat_max_ratio': {self.cat_max_ratio}; it must be in (0, 1]")
        if self.ratio_range[0] <= 0 or self.ratio_range[0] > self.ratio_range[1]:
            raise ConfigError(f"bad value for 'ratio_range': {list(self.ratio_range)}; need 0 < min <= max")
        BatchLayout.check(self.batch_size, self.device_batch_size)
        if self.warmup_iters >= self.iters and self.warmup_iters:
            raise ConfigError(f'warmup_iters {self.warmup_iters} must be below iters {self.iters}; pass '
                              f'--set warmup_iters={self.iters // 2} (or 0 for none), or more --iters')
        if self.min_lr > self.lr:
            raise ConfigError(f'min_lr {self.min_lr} is larger than lr {self.lr}; lower it too (--set min_lr=...)')
        NonFinitePolicy.check_config(self)
        for key, rule in self.custom_keys.items():
            if not isinstance(rule, Mapping) or not set(rule) <= {'lr_mult', 'decay_mult'} or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in rule.values()):
                raise ConfigError(f"bad custom_keys entry '{key}': {rule!r}; write {{KEY: {{lr_mult: X, decay_mult: "
                                  f"Y}}}} with non-negative numbers")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"bad value for 'clip_grad': {self.clip_grad}; positive or null")
        return self


def effective_custom_keys(cfg: SegConfig) -> Dict[str, Dict[str, float]]:
    """``cfg.custom_keys`` plus ``norm`` → decay ×0 when ``decay_backbone_norms`` is false."""
    keys = {k: dict(v) for k, v in cfg.custom_keys.items()}
    if not cfg.decay_backbone_norms:
        keys.setdefault('norm', dict(decay_mult=0.0))
    return keys


DEFAULT_SEG_RECIPE = 'upernet_shapes_demo'
SEG_PRESETS: PresetTable = PresetTable(SegConfig, default=DEFAULT_SEG_RECIPE)

_ADE = SegConfig()   # the field defaults are the ADE20K protocol
SEG_PRESETS.add('upernet_cpolynext_s', dataclasses.replace(_ADE, backbone='cpolynext_s'),
                source="spec §11 (authors' configs/PolyNeXt/upernet_polynext_s_512_160k_ade20k.py)")
SEG_PRESETS.add('upernet_apolynext_s', dataclasses.replace(_ADE, backbone='apolynext_s', clip_grad=5.0,
                                                           cell_grad_clip=5.0),
                source="spec §11 (authors' configs/PolyNeXt/upernet_apolynext_s_512_160k_ade20k.py)")
for _name in ('convformer_s18', 'caformer_s18'):
    SEG_PRESETS.add(f'upernet_{_name}', dataclasses.replace(
        _ADE, backbone=_name, custom_keys={k: v for k, v in REFERENCE_KEYS.items() if k != 'norm'},
        decay_backbone_norms=False),
        source='MetaFormer Table 10 setting (no config released): the PolyNeXt recipe, reference keys literally, '
               'drop path 0.3')

SEG_PRESETS.add(DEFAULT_SEG_RECIPE, dataclasses.replace(
    _ADE, backbone='cpolynext_t', backbone_kwargs=dict(init_channels=16), drop_path=0.0, head_channels=32,
    aux_channels=16, dataset='shapes', reduce_zero_label=False, img_scale=(128, 64), ratio_range=(0.75, 1.5),
    crop_size=64, eval_scale=(128, 64), eval_mode='whole', eval_crop=64, eval_stride=43, lr=2e-3, warmup_iters=50,
    iters=1000, batch_size=8, device_batch_size=8, eval_every=250, checkpoint_every=250, log_every=25, workers=1),
    source='polynext demo: generated shapes (4 classes, 64x64, 400 train / 100 val), CPolyNeXt-T C0=16')

