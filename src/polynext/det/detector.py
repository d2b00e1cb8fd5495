"""Mask R-CNN and Cascade Mask R-CNN over any timm ``features_only`` backbone (strides 4/8/16/32).

    image → backbone stages → stage-output LayerNorms (optional) → FPN (256, + max-pool P6)
          → RPN (3 anchors per position, sizes 32-512) → RoI heads (box + mask)

* Mask R-CNN is torchvision's ``MaskRCNN`` (its RPN, ``RoIHeads``, box and mask heads), given
  mmdetection's values where torchvision's defaults differ (RoIAlign ``aligned`` with adaptive
  sampling, RPN post-NMS proposals 1000 in training, mmdetection's initialisations).
* Cascade Mask R-CNN is torchvision's ``GeneralizedRCNN`` with the same backbone / FPN / RPN
  and ``CascadeRoIHeads`` (three stages, 4conv1fc heads, GIoU loss; ``cascade.py``).
* ``DetectorSpec`` holds everything that defines the network (stored in every checkpoint's
  metadata, so ``polynext det eval`` rebuilds it from the weights file alone).
* ``build_detector(spec, checkpoint=None)``: ``checkpoint`` is a *classification* checkpoint for
  the backbone, loaded strictly (``polynext.seg.build_feature_body``, shared with segmentation).
* Images enter as a list of float tensors in [0, 1] already resized by the data pipeline; the
  model normalises them (ImageNet mean / std) and pads the batch to a multiple of 32. Outputs
  are in the input's pixel coordinates, masks as 28x28 probabilities (``postprocess`` in
  ``evaluate.py`` maps them to the original image).
"""
from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..errors import CheckpointError, ConfigError
from .cascade import CASCADE_BOX_STDS, CASCADE_IOUS, CASCADE_STAGE_WEIGHTS, CascadeRoIHeads
from .heads import AlignedRoIAlign, BoxPredictor, ConvFCHead, TwoFCHead, mask_head, mask_predictor

__all__ = ['DetectorSpec', 'DetBackbone', 'DetTransform', 'build_detector', 'check_detector', 'load_detector',
           'spec_metadata',
           'DETECTOR_KINDS', 'IMAGENET_MEAN', 'IMAGENET_STD']

DETECTOR_KINDS = ('mask_rcnn', 'cascade_mask_rcnn')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DetectorSpec:
    """The architecture of a detector and its fixed box / proposal settings (mmdetection's values)."""
    kind: str = 'mask_rcnn'                      # mask_rcnn | cascade_mask_rcnn
    backbone: str = 'convformer_s18'
    num_classes: int = 80
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    drop_path: float = 0.0
    extra_norms: bool = True                     # fresh LayerNorm (with bias) on every stage output
    attn_window: Tuple[int, ...] = ()            # sliding-window size per attention stage (0 = global)
    fpn_channels: int = 256
    anchor_sizes: Tuple[int, ...] = (32, 64, 128, 256, 512)   # one per FPN level (P2-P6): 8 × stride
    anchor_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_train: int = 2000                # per level
    rpn_post_nms_train: int = 1000               # per image (cascade configs: 2000)
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 1000
    rpn_batch: int = 256
    roi_batch: int = 512
    box_fc: int = 1024
    box_convs: int = 4                           # cascade 4conv1fc heads (0: mmdetection's 2fc head)
    conv_channels: int = 256
    mask_channels: int = 256
    class_agnostic: bool = False                 # cascade box regression (the 3x configs: class-specific)
    cascade_ious: Tuple[float, ...] = CASCADE_IOUS
    giou_weight: float = 10.0
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'DetectorSpec':
        types = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in types]
        if unknown:
            raise CheckpointError(f"unknown detector setting '{unknown[0]}' in the checkpoint metadata "
                                  f'(written by a newer polynext?)')
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})

    def validate(self) -> 'DetectorSpec':
        if self.kind not in DETECTOR_KINDS:
            raise ConfigError(f"unknown detector '{self.kind}'; choose {' or '.join(DETECTOR_KINDS)}")
        if len(self.anchor_sizes) != 5:
            raise ConfigError(f'anchor_sizes needs 5 entries (FPN levels P2-P6), got {list(self.anchor_sizes)}')
        if self.kind == 'mask_rcnn' and self.class_agnostic:
            raise ConfigError("class_agnostic applies to the cascade's box heads (torchvision's Mask R-CNN regresses "
                              "per class); drop it or use kind=cascade_mask_rcnn")
        return self


class DetBackbone(nn.Module):
    """Feature body [+ stage-output norms] + FPN: returns {'0': P2, '1': P3, '2': P4, '3': P5, 'pool': P6}."""

    def __init__(self, features: nn.Module, fpn_channels: int = 256):
        super().__init__()
        self.body = features
        self.fpn = FeaturePyramidNetwork(list(features.channels), fpn_channels, extra_blocks=LastLevelMaxPool())
        for m in self.fpn.modules():     # mmdetection's FPN: Xavier (uniform) init, bias 0
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


class DetTransform(GeneralizedRCNNTransform):
    """Normalise and pad to a multiple of 32; no resizing (the data pipeline resizes, as mmdetection)
    and no post-processing (``evaluate.postprocess`` rescales to the original image)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, size_divisible: int = 32):
        super().__init__(min_size=800, max_size=1333, image_mean=list(mean), image_std=list(std),
                         size_divisible=size_divisible)

    def resize(self, image, target=None):
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result


class Fp32AnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` with its anchors in float32 whatever the features' dtype.

    torchvision makes the anchors in the dtype of the feature maps: under bf16 autocast (the CUDA default
    of the detection recipes) the FPN's bf16. bf16 keeps 8 significant bits, so a coordinate in 1024-2047
    is rounded by up to 4 px and proposals, regression targets and the ground truth cast to their dtype
    inherit it. The features only lend their shapes (zero-stride views of a float32 scalar, no copy)."""

    def forward(self, image_list, feature_maps: List[torch.Tensor]) -> List[torch.Tensor]:
        shapes = [torch.zeros((), dtype=torch.float32, device=f.device).expand(f.shape) for f in feature_maps]
        return super().forward(image_list, shapes)


class Fp32RPNHead(RPNHead):
    """torchvision's ``RPNHead`` returning float32 objectness and deltas (its convolutions still run in the
    autocast dtype): ``BoxCoder.decode`` casts the anchors to the deltas' dtype, so bf16 deltas would undo
    :class:`Fp32AnchorGenerator`."""

    def forward(self, x: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


def _anchor_generator(spec: DetectorSpec) -> AnchorGenerator:
    return Fp32AnchorGenerator(tuple((s,) for s in spec.anchor_sizes), (tuple(spec.anchor_ratios),) * 5)


def _rpn(spec: DetectorSpec, channels: int) -> RegionProposalNetwork:
    anchors = _anchor_generator(spec)
    head = Fp32RPNHead(channels, anchors.num_anchors_per_location()[0])
    return RegionProposalNetwork(
        anchors, head, fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=spec.rpn_batch,
        positive_fraction=0.5, pre_nms_top_n=dict(training=spec.rpn_pre_nms_train, testing=spec.rpn_pre_nms_test),
        post_nms_top_n=dict(training=spec.rpn_post_nms_train, testing=spec.rpn_post_nms_test), nms_thresh=0.7)


def _mask_rcnn(spec: DetectorSpec, backbone: DetBackbone) -> MaskRCNN:
    c = backbone.out_channels
    model = MaskRCNN(
        backbone, num_classes=None,
        rpn_anchor_generator=_anchor_generator(spec),
        rpn_pre_nms_top_n_train=spec.rpn_pre_nms_train, rpn_pre_nms_top_n_test=spec.rpn_pre_nms_test,
        rpn_post_nms_top_n_train=spec.rpn_post_nms_train, rpn_post_nms_top_n_test=spec.rpn_post_nms_test,
        rpn_batch_size_per_image=spec.rpn_batch,
        box_roi_pool=AlignedRoIAlign(7), box_head=TwoFCHead(c, 7, spec.box_fc),
        box_predictor=BoxPredictor(spec.box_fc, spec.num_classes),
        box_score_thresh=spec.score_thresh, box_nms_thresh=spec.nms_thresh,
        box_detections_per_img=spec.detections_per_img, box_batch_size_per_image=spec.roi_batch,
        mask_roi_pool=AlignedRoIAlign(14), mask_head=mask_head(c, spec.mask_channels),
        mask_predictor=mask_predictor(spec.mask_channels, spec.num_classes))
    model.rpn = _rpn(spec, c)
    return model


def _cascade(spec: DetectorSpec, backbone: DetBackbone) -> GeneralizedRCNN:
    c = backbone.out_channels
    n = len(spec.cascade_ious)
    if n != 3:
        raise ConfigError(f'cascade_ious needs 3 thresholds (one per stage), got {list(spec.cascade_ious)}')

    def box_head():
        if spec.box_convs:
            return ConvFCHead(c, 7, spec.conv_channels, spec.box_fc, spec.box_convs)
        return TwoFCHead(c, 7, spec.box_fc)

    heads = CascadeRoIHeads(
        AlignedRoIAlign(7), [box_head() for _ in range(n)],
        [BoxPredictor(spec.box_fc, spec.num_classes, spec.class_agnostic) for _ in range(n)],
        AlignedRoIAlign(14), [mask_head(c, spec.mask_channels) for _ in range(n)],
        [mask_predictor(spec.mask_channels, spec.num_classes) for _ in range(n)],
        ious=spec.cascade_ious, stage_weights=CASCADE_STAGE_WEIGHTS, box_stds=CASCADE_BOX_STDS,
        batch_size_per_image=spec.roi_batch, giou_weight=spec.giou_weight, score_thresh=spec.score_thresh,
        nms_thresh=spec.nms_thresh, detections_per_img=spec.detections_per_img)
    return GeneralizedRCNN(backbone, _rpn(spec, c), heads, DetTransform())


def build_detector(spec: DetectorSpec, checkpoint: Optional[Union[str, Path, Mapping[str, Any]]] = None,
                   prefer_ema: bool = True) -> GeneralizedRCNN:
    """The detector of ``spec``; ``checkpoint``: classification weights for the backbone (strict)."""
    from ..models.attention_window import set_attention_window
    from ..seg.segmentor import SegmentationBackbone, build_feature_body
    spec.validate()
    name = 'Mask R-CNN' if spec.kind == 'mask_rcnn' else 'Cascade Mask R-CNN'
    body = build_feature_body(spec.backbone, spec.backbone_kwargs, spec.drop_path, checkpoint, prefer_ema, task=name)
    set_attention_window(body, spec.attn_window)
    features = SegmentationBackbone(body, spec.backbone, extra_norms=spec.extra_norms, task=f'{name} (FPN)')
    backbone = DetBackbone(features, spec.fpn_channels)
    model = _mask_rcnn(spec, backbone) if spec.kind == 'mask_rcnn' else _cascade(spec, backbone)
    model.transform = DetTransform()
    model.spec = spec
    return model


def check_detector(spec: DetectorSpec, checkpoint: Optional[Union[str, Path, Mapping[str, Any]]] = None) -> None:
    """The errors ``build_detector`` would raise, found cheaply (before a run writes anything): the backbone's
    name and strides (built on the meta device), and a strict load of ``checkpoint`` when one is given."""
    from ..seg.segmentor import SegmentationBackbone, build_feature_body
    spec.validate()
    name = 'Mask R-CNN' if spec.kind == 'mask_rcnn' else 'Cascade Mask R-CNN'
    if checkpoint is not None:
        try:
            body = build_feature_body(spec.backbone, spec.backbone_kwargs, 0.0, checkpoint, task=name)
        except CheckpointError as e:
            if '--backbone' in str(e):      # it already names the backbone to pass
                raise
            raise CheckpointError(f'{str(e).rstrip(".")}; the initial checkpoint must hold classification weights of '
                                  f'{spec.backbone} (or pass the --backbone it was trained as)') from None
    else:
        try:   # shapes only: no memory, no initialisation
            with torch.device('meta'):
                body = build_feature_body(spec.backbone, spec.backbone_kwargs, 0.0, task=name)
        except (RuntimeError, NotImplementedError, CheckpointError):   # models that initialise from tensors
            body = build_feature_body(spec.backbone, spec.backbone_kwargs, 0.0, task=name)
    SegmentationBackbone(body, spec.backbone, extra_norms=False, task=f'{name} (FPN)')


def spec_metadata(spec: DetectorSpec) -> Dict[str, str]:
    """safetensors metadata that ``load_detector`` reads back."""
    return {'polynext_detector': json.dumps(spec.to_dict())}


def load_detector(path: Union[str, Path], spec: Optional[DetectorSpec] = None) -> GeneralizedRCNN:
    """A trained detector from a run folder, a ``.safetensors`` (spec in its metadata) or ``*.state.pt``."""
    from ..checkpoint import load_state_dict_strict, read_checkpoint, read_safetensors_metadata
    path = Path(path)
    if path.is_dir():
        for name in ('best.safetensors', 'last.safetensors'):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f'no best.safetensors or last.safetensors in {path}; pass a detector checkpoint')
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    obj = read_checkpoint(path)
    if path.suffix == '.safetensors':
        sd = obj
        if spec is None:
            meta = read_safetensors_metadata(path)
            if 'polynext_detector' not in meta:
                raise CheckpointError(f'{path} holds no detector description (metadata polynext_detector); it is not '
                                      f'a checkpoint written by `polynext det train`')
            d = meta['polynext_detector']
            spec = DetectorSpec.from_dict(d if isinstance(d, dict) else json.loads(d))
    else:
        if not isinstance(obj, dict) or 'model' not in obj or (spec is None and 'spec' not in obj):
            raise CheckpointError(f'{path} is neither a detector weights file (.safetensors) nor a detection '
                                  f'training state')
        sd = obj['model']
        spec = spec or DetectorSpec.from_dict(obj['spec'])
    model = build_detector(dataclasses.replace(spec, drop_path=0.0))
    load_state_dict_strict(model, sd)
    return model
