"""UperNet decode head and FCN auxiliary head, as in MMSegmentation (the literature's UperNet).

``UPerHead`` (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", 2018, as
implemented by MMSegmentation and used by every UperNet number of Swin, ConvNeXt, MetaFormer
and PolyNeXt):

    PPM on the last stage: [x, up(ConvBNReLU1x1(AvgPool_s(x))) for s in (1, 2, 3, 6)]
        → concat → ConvBNReLU3x3 → lateral of the last stage
    lateral_i = ConvBNReLU1x1(stage_i)                        (the other stages)
    top-down: lateral_{i-1} += up(lateral_i)                   (from the last to the first)
    fpn_i = ConvBNReLU3x3(lateral_i) (i < last);  fpn_last = lateral_last (the PPM output)
    out = Conv1x1(Dropout2d(ConvBNReLU3x3(concat(up(fpn_i) to stride 4))))

``FCNHead`` (auxiliary deep supervision on one stage): ``num_convs`` ConvBNReLU3x3,
optional concat with the input, Dropout2d, Conv1x1.

Every up-sampling is bilinear with ``align_corners=False``. Initialisation as mmcv's
``ConvModule`` (conv: Kaiming normal, fan-out, ReLU gain; BN weight 1, bias 0) and mmseg's
``BaseDecodeHead`` (classifier conv: N(0, 0.01), bias 0).

Reused from segmentation_models_pytorch (0.6.0) where it matches MMSegmentation exactly:

* ``Conv2dReLU(..., use_norm='batchnorm')`` is conv (no bias) → BatchNorm2d → ReLU, the same
  layers in the same order as mmcv's ``ConvModule(norm_cfg=BN, act_cfg=ReLU)``;
* ``PSPModule`` is mmseg's ``PPM`` + the UPerHead ``bottleneck``: the same pooling scales,
  1x1 ConvBNReLU per scale, bilinear (``align_corners=False``) up-sampling, concatenation
  order ``[x, scale 1, 2, 3, 6]`` and 3x3 ConvBNReLU.

smp's ``UPerNetDecoder`` itself is not used: it puts its own LayerNorm (eps 1e-6) on every
input feature (our backbone wrapper owns the per-stage norms, as the reference), has no
dropout and no classifier, and smp's UPerNet has no FCN auxiliary head; the top-down/FPN part
is written here (a few lines) so the head holds exactly MMSegmentation's layers.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from segmentation_models_pytorch.base.modules import Conv2dReLU
from segmentation_models_pytorch.decoders.upernet.decoder import PSPModule

__all__ = ['UPerHead', 'FCNHead', 'ConvBNReLU', 'init_conv_bn_relu']


def ConvBNReLU(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """mmcv ``ConvModule(in, out, k, padding=k // 2, norm_cfg=BN, act_cfg=ReLU)``."""
    return Conv2dReLU(in_channels, out_channels, kernel_size, padding=kernel_size // 2, use_norm='batchnorm')


def init_conv_bn_relu(module: nn.Module) -> None:
    """mmcv ``ConvModule.init_weights``: Kaiming normal (fan-out, ReLU) convs, BN weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _resize(x: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=align_corners)


class _Classifier(nn.Module):
    """mmseg ``cls_seg``: Dropout2d (channel dropout) → 1x1 conv with bias, init N(0, 0.01)."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class UPerHead(nn.Module):
    """UperNet head over stage features at strides 4/8/16/32; logits at stride 4.

    Args:
        in_channels: channels of the stage features, highest resolution first.
        channels: width of every internal layer (512 in the literature).
        num_classes: output classes (150 for ADE20K).
        pool_scales: PPM output sizes on the last stage.
        dropout: Dropout2d rate before the classifier.
        align_corners: of every bilinear resize.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 512, num_classes: int = 150,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, align_corners: bool = False):
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(f'UPerHead needs at least 2 stages, got in_channels={list(in_channels)}')
        self.in_channels = list(in_channels)
        self.channels = channels
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.psp = PSPModule(self.in_channels[-1], channels, sizes=tuple(pool_scales), use_norm='batchnorm')
        self.lateral_convs = nn.ModuleList([ConvBNReLU(c, channels, 1) for c in self.in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvBNReLU(channels, channels, 3) for _ in self.in_channels[:-1]])
        self.fpn_bottleneck = ConvBNReLU(len(self.in_channels) * channels, channels, 3)
        init_conv_bn_relu(self)
        self.cls = _Classifier(channels, num_classes, dropout)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.in_channels):
            raise ValueError(f'UPerHead expects {len(self.in_channels)} features, got {len(features)}')
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        laterals.append(self.psp(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):   # top-down path
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:], self.align_corners)
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [_resize(o, size, self.align_corners) for o in outs[1:]]
        return self.cls(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(nn.Module):
    """FCN head (auxiliary deep supervision): ``num_convs`` 3x3 ConvBNReLU [→ concat input →
    3x3 ConvBNReLU] → Dropout2d → 1x1 classifier. Logits at the input feature's stride."""

    def __init__(self, in_channels: int, channels: int = 256, num_classes: int = 150, num_convs: int = 1,
                 concat_input: bool = False, dropout: float = 0.1):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f'FCNHead needs num_convs >= 1, got {num_convs}')
        self.in_channels = in_channels
        self.channels = channels
        self.num_classes = num_classes
        self.convs = nn.Sequential(*[ConvBNReLU(in_channels if i == 0 else channels, channels, 3)
                                     for i in range(num_convs)])
        self.conv_cat = ConvBNReLU(in_channels + channels, channels, 3) if concat_input else None
        init_conv_bn_relu(self)
        self.cls = _Classifier(channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.cls(out)
