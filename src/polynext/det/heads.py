"""RoI feature extraction and the RoI heads of mmdetection's configs, on torchvision's ops.

* ``AlignedRoIAlign``: mmdetection's ``SingleRoIExtractor`` + mmcv ``RoIAlign`` (``aligned=True``:
  the half-pixel offset of Detectron2 / mmcv; ``sampling_ratio=0``: adaptive, ceil(roi / bin)
  samples per bin). torchvision's ``MultiScaleRoIAlign`` calls ``roi_align`` with
  ``aligned=False`` and torchvision's Mask R-CNN uses ``sampling_ratio=2``, so this subclass
  keeps its interface (torchvision's ``MaskRCNN`` accepts it) and changes the call. The level of
  a RoI is floor(log2(√(w·h) / 56)) clipped to 0-3 (mmdetection's ``finest_scale`` 56, which
  equals torchvision's ``LevelMapper`` canonical 224 / level 4).
* ``TwoFCHead`` / ``ConvFCHead``: mmdetection's ``Shared2FCBBoxHead`` (Mask R-CNN; flatten →
  fc 1024 → ReLU → fc 1024 → ReLU) and ``ConvFCBBoxHead`` with 4 shared 3x3 convs (BatchNorm,
  ReLU) and 1 fc (the "4conv1fc" heads of the Cascade Mask R-CNN 3x configs).
* ``BoxPredictor``: fc_cls (classes + background) and fc_reg (4 per class, or 4 when
  class-agnostic), initialised as mmdetection does (normal std 0.01 / 0.001, bias 0).
* ``mask_head`` / ``mask_predictor``: torchvision's ``MaskRCNNHeads`` (4 × conv3x3 256 + ReLU)
  and ``MaskRCNNPredictor`` (deconv 2x2 stride 2 + ReLU, 1x1 logits): mmdetection's
  ``FCNMaskHead`` with the same initialisation (Kaiming normal, fan-out).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign, roi_align

__all__ = ['AlignedRoIAlign', 'TwoFCHead', 'ConvFCHead', 'BoxPredictor', 'mask_head', 'mask_predictor',
           'roi_levels', 'FINEST_SCALE']

#: mmdetection's SingleRoIExtractor: RoIs of √area < 112 go to stride 4, < 224 to stride 8, ...
FINEST_SCALE = 56


def roi_levels(boxes: torch.Tensor, num_levels: int = 4) -> torch.Tensor:
    """FPN level (0 = stride 4) of each box: floor(log2(√(w·h) / 56 + 1e-6)) clipped to the levels."""
    scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp_min(0).sqrt()
    return torch.floor(torch.log2(scale / FINEST_SCALE + 1e-6)).clamp(0, num_levels - 1).long()


class AlignedRoIAlign(MultiScaleRoIAlign):
    """Multi-level RoIAlign with mmcv's settings (aligned, adaptive sampling) and fixed strides."""

    def __init__(self, output_size: int, featmap_names: Sequence[str] = ('0', '1', '2', '3'),
                 strides: Sequence[int] = (4, 8, 16, 32), sampling_ratio: int = 0, aligned: bool = True):
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        self.strides = tuple(strides)
        self.aligned = aligned

    def forward(self, x: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                image_shapes: Optional[List[Tuple[int, int]]] = None) -> torch.Tensor:
        feats = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], dim=0)
        levels = roi_levels(rois[:, 1:], len(feats))
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1]) + tuple(self.output_size))
        for level, (feat, stride) in enumerate(zip(feats, self.strides)):
            idx = torch.where(levels == level)[0]
            if idx.numel():
                # under autocast torchvision's roi_align runs in float32 itself: the boxes keep their float32
                # coordinates (cast to bf16 they would move by up to 4 px); otherwise the dtypes must match
                level_rois = rois[idx] if torch.is_autocast_enabled(feat.device.type) else rois[idx].to(feat.dtype)
                out[idx] = roi_align(feat, level_rois, self.output_size, spatial_scale=1.0 / stride,
                                     sampling_ratio=self.sampling_ratio, aligned=self.aligned).to(out.dtype)
        return out


def _xavier(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


class TwoFCHead(nn.Module):
    """mmdetection ``Shared2FCBBoxHead`` trunk: flatten → fc → ReLU → fc → ReLU (Xavier init)."""

    def __init__(self, in_channels: int, roi_size: int = 7, fc_channels: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_channels * roi_size * roi_size, fc_channels)
        self.fc7 = nn.Linear(fc_channels, fc_channels)
        self.relu = nn.ReLU(inplace=True)
        self.out_channels = fc_channels
        _xavier(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.fc7(self.relu(self.fc6(x.flatten(1)))))


class ConvFCHead(nn.Module):
    """mmdetection ``ConvFCBBoxHead`` trunk with ``num_convs`` shared 3x3 convs (+ BatchNorm + ReLU,
    Kaiming init as mmcv's ``ConvModule``) and one fc (+ ReLU, Xavier init): the "4conv1fc" head."""

    def __init__(self, in_channels: int, roi_size: int = 7, conv_channels: int = 256, fc_channels: int = 1024,
                 num_convs: int = 4, norm: bool = True):
        super().__init__()
        layers: List[nn.Module] = []
        c = in_channels
        for _ in range(num_convs):
            conv = nn.Conv2d(c, conv_channels, 3, padding=1, bias=not norm)
            nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            layers += [conv] + ([nn.BatchNorm2d(conv_channels)] if norm else []) + [nn.ReLU(inplace=True)]
            c = conv_channels
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(c * roi_size * roi_size, fc_channels)
        self.relu = nn.ReLU(inplace=True)
        self.out_channels = fc_channels
        _xavier(self.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.fc(self.convs(x).flatten(1)))


class BoxPredictor(nn.Module):
    """Classification (classes + background at index 0, torchvision's convention) and box regression
    (4 · classes (+ background) deltas, or 4 when ``class_agnostic``)."""

    def __init__(self, in_channels: int, num_classes: int, class_agnostic: bool = False):
        super().__init__()
        self.class_agnostic = class_agnostic
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, 4 if class_agnostic else 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """float32 outputs under autocast too: the box coder decodes in the deltas' dtype (bf16 would round the
        boxes by up to 4 px), and the losses are taken in float32 anyway."""
        return self.cls_score(x).float(), self.bbox_pred(x).float()


def mask_head(in_channels: int, channels: int = 256, num_convs: int = 4) -> MaskRCNNHeads:
    return MaskRCNNHeads(in_channels, [channels] * num_convs, 1)


def mask_predictor(channels: int, num_classes: int) -> MaskRCNNPredictor:
    """Deconv + 1x1 logits for classes + background (torchvision indexes the mask by label)."""
    return MaskRCNNPredictor(channels, channels, num_classes + 1)
