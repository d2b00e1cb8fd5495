"""Detection recipes: ``DetConfig`` (every knob, typed) and the named presets, in one place.

The COCO presets follow the ConvNeXt / Swin 3x configs that MetaFormer §3.2 followed ("AdamW,
multi-scale and 3x schedule training setting, following Swin and ConvNeXt"):

* Mask R-CNN (``maskrcnn_*_3x``) or Cascade Mask R-CNN with 4conv1fc heads and GIoU loss
  (``cascade_*_3x``); FPN 256; backbone outputs through fresh LayerNorms (as ConvNeXt's and Swin's
  detection backbones); 80 classes;
* 36 epochs of batch 16 (2 per GPU × 8), lr steps × 0.1 after epochs 27 and 33, linear warm-up over
  500 iterations from 0.001 × lr; AdamW betas (0.9, 0.999), weight decay 0.05;
* flip 0.5, then the AutoAugment-style policy: multi-scale resize (shorter side 480-800 in steps
  of 32, longer ≤ 1333) or resize (400 / 500 / 600) → random crop 384-600 → multi-scale resize;
  evaluation at 800 / 1333; fp16 in the configs (here bf16 autocast on GPUs).

Where MetaFormer states no value, ConvNeXt-T's is taken: lr 1e-4 (Mask R-CNN) / 2e-4 (Cascade),
layer-wise lr decay 0.95 / 0.7 over 6 layers (``LearningRateDecayOptimizerConstructor``, its
stage / block grouping applied to the MetaFormer stages, which have ConvNeXt-T's 3-3-9-3
depths), no weight decay on 1-D parameters and biases, drop path 0.4. CAFormer runs its attention
stages in sliding windows of 14 and 7 tokens (224 px at strides 16 and 32: the context it was
pre-trained with); MetaFormer names no size, and these reproduce Table 9's MACs (see
``cost.py``). Cascade box regression is class-specific (``reg_class_agnostic=False`` in the 3x
configs' 4conv1fc heads; the base cascade config's class-agnostic 2fc heads are overridden).

PolyNeXt presets (CPolyNeXt-S, APolyNeXt-S; the paper has no detection setting): the same
schedules with PolyNeXt's segmentation rules: its parameter-wise keys (no decay on the extra
norms, gates, per-channel input scales and attention scale logits), drop path 0.3, and for
APolyNeXt global-norm clipping 5 + per-cell clipping 5; no layer-wise decay; global chunked
polynomial attention.

``maskrcnn_shapes_demo`` (the default) trains a small Mask R-CNN (CPolyNeXt-T, C0 = 16, FPN 32)
on the generated shapes (no download) with the same pipeline scaled to 64 px.
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
from .detector import DETECTOR_KINDS, DetectorSpec
from .transforms import CROP_PRE_SCALES, MS_SCALES

__all__ = ['DetConfig', 'DET_PRESETS', 'DEFAULT_DET_RECIPE', 'POLYNEXT_DET_KEYS', 'RESUME_SAFE_KEYS']

#: PolyNeXt's segmentation custom_keys without the decode head's lr × 10 (no such rule in detection)
POLYNEXT_DET_KEYS: Dict[str, Dict[str, float]] = {
    'extra_norms': dict(decay_mult=0.0), '.gates.': dict(decay_mult=0.0), '.scale0.': dict(decay_mult=0.0),
    '.scale1.': dict(decay_mult=0.0), 'mixer.scale': dict(decay_mult=0.0),
}
#: config keys that may differ between a run and its resumption
RESUME_SAFE_KEYS = ('data', 'output', 'workers', 'device', 'checkpoint_every', 'log_every', 'threads', 'compile',
                    'max_corrupt', 'demo_images', 'eval_limit', 'grad_checkpointing')


@dataclass(frozen=True)
class DetConfig:
    """Every setting of a detection training run."""
    # ---- model ----
    kind: str = 'mask_rcnn'                      # mask_rcnn | cascade_mask_rcnn
    backbone: str = 'convformer_s18'
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    initial_checkpoint: Optional[str] = None     # classification weights for the backbone (any layout)
    drop_path: float = 0.4
    extra_norms: bool = True
    attn_window: Tuple[int, ...] = ()            # per attention stage, 0 = global; () = all global
    fpn_channels: int = 256
    anchor_sizes: Tuple[int, int, int, int, int] = (32, 64, 128, 256, 512)
    rpn_batch: int = 256
    rpn_post_nms_train: int = 1000
    roi_batch: int = 512
    box_fc: int = 1024
    box_convs: int = 0                           # cascade: 4 (4conv1fc); 0: 2fc
    conv_channels: int = 256
    mask_channels: int = 256
    class_agnostic: bool = False
    num_classes: Optional[int] = None            # None: the dataset's (80 for COCO)
    # ---- data ----
    dataset: str = 'coco'                        # coco | shapes (generated, no download)
    data: Optional[str] = None                   # the COCO folder
    train_scales: Tuple[int, ...] = MS_SCALES    # shorter sides of the multi-scale resize
    max_size: int = 1333                         # longer side limit
    crop_policy: bool = True                     # the AutoAugment-style resize → crop → resize branch
    crop_pre_scales: Tuple[int, ...] = CROP_PRE_SCALES
    crop_range: Tuple[int, int] = (384, 600)
    hflip: float = 0.5
    test_scale: int = 800                        # shorter side at evaluation (longer ≤ max_size)
    shapes_size: int = 64
    shapes_train: int = 400
    shapes_val: int = 100
    workers: int = 4
    max_corrupt: float = 0.001
    # ---- optimizer ----
    lr: float = 1e-4
    opt_betas: Tuple[float, float] = (0.9, 0.999)
    opt_eps: float = 1e-8
    weight_decay: float = 0.05
    no_decay_1d: bool = True                     # no weight decay on 1-D parameters and biases (ConvNeXt's rule)
    layer_decay: float = 0.95                    # layer-wise lr decay (1 = off); ConvNeXt's grouping
    layer_decay_layers: int = 6
    custom_keys: Dict[str, Any] = field(default_factory=dict)   # mmcv custom_keys: lr_mult / decay_mult
    clip_grad: Optional[float] = None
    cell_grad_clip: Optional[float] = None       # PolyNeXt per-cell gradient clipping
    on_nonfinite: str = 'stop'                   # at a NaN / inf loss or gradient: stop | skip | rollback
    nonfinite_limit: int = 3                     # skip: steps in a row; rollback: rollbacks per run (then stop)
    rollback_lr_factor: float = 0.5              # rollback: lr multiplier at each rollback
    # ---- schedule ----
    epochs: int = 36
    lr_steps: Tuple[int, ...] = (27, 33)         # epochs after which lr × lr_gamma
    lr_gamma: float = 0.1
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    batch_size: int = 16
    device_batch_size: int = 2
    # ---- evaluation ----
    eval_every: int = 1                          # epochs; also at the end
    eval_limit: Optional[int] = None             # evaluate on the first N validation images only
    # ---- precision and speed ----
    amp: str = 'bf16'
    cpu_amp: bool = False
    compile: bool = False
    grad_checkpointing: bool = False             # recompute the backbone in backward: less memory, same results
    channels_last: bool = False
    device: str = 'auto'
    threads: int = 0
    deterministic: bool = False                  # CUDA: deterministic algorithms, no TF32 / cudnn.benchmark (slower)
    # ---- run ----
    seed: int = 0
    output: Optional[str] = None
    checkpoint_every: int = 1000                 # 'last' checkpoint every N iterations (and every epoch)
    log_every: int = 50
    demo_images: int = 4                         # images in predictions.png at the end of training

    def spec(self, num_classes: int) -> DetectorSpec:
        return DetectorSpec(
            kind=self.kind, backbone=self.backbone, num_classes=num_classes, backbone_kwargs=dict(self.backbone_kwargs),
            drop_path=self.drop_path, extra_norms=self.extra_norms, attn_window=tuple(self.attn_window),
            fpn_channels=self.fpn_channels, anchor_sizes=tuple(self.anchor_sizes), rpn_batch=self.rpn_batch,
            rpn_post_nms_train=self.rpn_post_nms_train, roi_batch=self.roi_batch, box_fc=self.box_fc,
            box_convs=self.box_convs if self.kind == 'cascade_mask_rcnn' else 0, conv_channels=self.conv_channels,
            mask_channels=self.mask_channels, class_agnostic=self.class_agnostic)

    # ---- what the engine's preset table needs ----
    COMMAND: ClassVar[str] = 'polynext det train'
    #: every batch has its own padded size (multi-scale, aspect ratios): cuDNN's algorithm search would run
    #: again for each new shape (mmdetection turns it off too)
    CUDNN_BENCHMARK: ClassVar[bool] = False
    MODEL_FIELDS: ClassVar[Tuple[str, str]] = ('backbone', 'backbone_kwargs')
    DATA_DATASETS: ClassVar[Dict[str, str]] = {'shapes': 'coco'}   # --data on the demo: a COCO folder

    def summary(self) -> Dict[str, str]:
        """The columns of ``polynext det train --list-recipes``."""
        return dict(detector=self.kind, backbone=self.backbone, data=self.dataset, epochs=str(self.epochs),
                    batch=str(self.batch_size), lr=f'{self.lr:g}')

    def validate(self) -> 'DetConfig':
        check_fields(
            self, choices=dict(kind=DETECTOR_KINDS, dataset=('coco', 'shapes'), amp=AMP_CHOICES),
            positive=('epochs', 'batch_size', 'device_batch_size', 'fpn_channels', 'rpn_batch', 'roi_batch', 'box_fc',
                      'conv_channels', 'mask_channels', 'max_size', 'test_scale', 'shapes_size', 'shapes_train',
                      'shapes_val', 'eval_every', 'rpn_post_nms_train', 'layer_decay_layers'),
            non_negative=('lr', 'weight_decay', 'warmup_iters', 'workers', 'checkpoint_every', 'threads', 'max_corrupt',
                          'log_every', 'demo_images', 'box_convs'),
            fractions=('drop_path', 'hflip', 'warmup_ratio', 'lr_gamma'))
        check_device(self.device)
        BatchLayout.check(self.batch_size, self.device_batch_size)
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"bad value for 'layer_decay': {self.layer_decay}; it must be in (0, 1] (1 = off)")
        if not self.train_scales or min(self.train_scales) <= 0:
            raise ConfigError(f"bad value for 'train_scales': {list(self.train_scales)}; give positive shorter sides")
        if list(self.lr_steps) != sorted(self.lr_steps) or any(s <= 0 for s in self.lr_steps):
            raise ConfigError(f"bad value for 'lr_steps': {list(self.lr_steps)}; increasing positive epochs")
        if any(w < 0 for w in self.attn_window):
            raise ConfigError(f"bad value for 'attn_window': {list(self.attn_window)}; window sizes >= 0 (0 = global)")
        for key, rule in self.custom_keys.items():
            if not isinstance(rule, Mapping) or not set(rule) <= {'lr_mult', 'decay_mult'} or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in rule.values()):
                raise ConfigError(f"bad custom_keys entry '{key}': {rule!r}; write {{KEY: {{lr_mult: X, decay_mult: "
                                  f"Y}}}} with non-negative numbers")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"bad value for 'clip_grad': {self.clip_grad}; positive or null")
        NonFinitePolicy.check_config(self)
        self.spec(self.num_classes or 1).validate()
        return self


DEFAULT_DET_RECIPE = 'maskrcnn_shapes_demo'
DET_PRESETS: PresetTable = PresetTable(DetConfig, default=DEFAULT_DET_RECIPE)

_MASK = DetConfig()     # the field defaults are the Mask R-CNN 3x protocol (ConvNeXt-T values)
_CASCADE = dataclasses.replace(_MASK, kind='cascade_mask_rcnn', lr=2e-4, layer_decay=0.7, box_convs=4,
                               rpn_post_nms_train=2000)
_WINDOWS = {'caformer_s18': (14, 7)}
_SOURCE = ('MetaFormer §3.2 (3x, AdamW, multi-scale); ConvNeXt-T {det} 3x config for the values MetaFormer does '
           'not state (lr {lr:g}, layer decay {ld}, drop path 0.4)')
for _name in ('convformer_s18', 'caformer_s18'):
    DET_PRESETS.add(f'maskrcnn_{_name}_3x', dataclasses.replace(_MASK, backbone=_name, attn_window=_WINDOWS.get(_name, ())),
                    source=_SOURCE.format(det='Mask R-CNN', lr=1e-4, ld=0.95) +
                    ('; sliding windows 14 / 7' if _name in _WINDOWS else ''))
    DET_PRESETS.add(f'cascade_{_name}_3x', dataclasses.replace(_CASCADE, backbone=_name,
                                                                 attn_window=_WINDOWS.get(_name, ())),
                    source=_SOURCE.format(det='Cascade Mask R-CNN', lr=2e-4, ld=0.7) +
                    ('; sliding windows 14 / 7' if _name in _WINDOWS else ''))
for _name in ('cpolynext_s', 'apolynext_s'):
    _poly = dict(backbone=_name, drop_path=0.3, layer_decay=1.0, no_decay_1d=False, custom_keys=dict(POLYNEXT_DET_KEYS))
    if _name.startswith('apolynext'):
        _poly.update(clip_grad=5.0, cell_grad_clip=5.0)
    _src = 'the 3x schedule with PolyNeXt\'s segmentation rules (spec §11: keys, drop path 0.3' + \
        (', clip 5 + per-cell clip 5)' if _name.startswith('apolynext') else ')')
    DET_PRESETS.add(f'maskrcnn_{_name}_3x', dataclasses.replace(_MASK, **_poly), source=_src)
    DET_PRESETS.add(f'cascade_{_name}_3x', dataclasses.replace(_CASCADE, **_poly), source=_src)

DET_PRESETS.add(DEFAULT_DET_RECIPE, dataclasses.replace(
    _MASK, backbone='cpolynext_t', backbone_kwargs=dict(init_channels=16), drop_path=0.0, fpn_channels=32,
    anchor_sizes=(8, 16, 32, 64, 128), rpn_batch=64, roi_batch=64, box_fc=128, mask_channels=32,
    dataset='shapes', train_scales=(56, 64, 72), crop_policy=False, test_scale=64, max_size=1333,
    lr=2e-3, layer_decay=1.0, no_decay_1d=True, epochs=12, lr_steps=(9, 11), warmup_iters=50,
    batch_size=8, device_batch_size=8, checkpoint_every=100, log_every=10, workers=1, eval_every=2),
    source='polynext demo: generated shapes (3 classes, 64x64, 400 train / 100 val), CPolyNeXt-T C0=16')
