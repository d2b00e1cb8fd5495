"""Cascade R-CNN RoI heads (Cai & Vasconcelos, CVPR 2018) with mask branches, on torchvision's ops.

torchvision has no cascade, so this module writes mmdetection's ``CascadeRoIHead`` (v2, the
version of the Swin / ConvNeXt 3x configs that MetaFormer followed) with torchvision's pieces:
``Matcher``, ``BalancedPositiveNegativeSampler``, ``BoxCoder``, ``box_iou``,
``generalized_box_iou_loss``, ``MultiScaleRoIAlign`` (``AlignedRoIAlign``), the mask loss /
inference helpers and ``RoIHeads.postprocess_detections`` (class-wise NMS).

Training, stage t = 0, 1, 2 (IoU thresholds 0.5 / 0.6 / 0.7, loss weights 1 / 0.5 / 0.25):

    proposals_t ∪ ground truth → match (IoU ≥ thr_t: positive, < thr_t: background)
      → sample 512 per image (≤ 25 % positive) → RoIAlign 7x7 → 4conv1fc head →
      CE(classes + background)  +  10 · GIoU(decode_t(deltas), matched box) / #sampled
      + mask head on the positives (BCE on the label's 28x28 mask)
    proposals_{t+1} = decode_t(deltas of the label; background RoIs: of the arg-max class),
      ground-truth proposals removed, gradient stopped.

Inference: each stage re-classifies the boxes refined by the previous one; the class logits of
the three stages are averaged, the boxes are the last stage's, then score threshold 0.05,
class-wise NMS 0.5, 100 per image. Each detection's mask is the mean of the three stages' mask
probabilities (mmdetection's ``merge_aug_masks``). ``box_stds`` are mmdetection's per-stage
target stds (torchvision's ``BoxCoder`` weights are their inverses).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import box_iou, clip_boxes_to_image, generalized_box_iou_loss

__all__ = ['CascadeRoIHeads', 'CASCADE_IOUS', 'CASCADE_STAGE_WEIGHTS', 'CASCADE_BOX_STDS']

CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_STAGE_WEIGHTS = (1.0, 0.5, 0.25)
CASCADE_BOX_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


class CascadeRoIHeads(RoIHeads):
    """Three-stage cascade with per-stage box heads, predictors and mask heads.

    ``box_heads`` / ``box_predictors`` / ``mask_heads`` / ``mask_predictors``: one per stage
    (``BoxPredictor`` layout: logits for background + classes, deltas per class or class-agnostic)."""

    def __init__(self, box_roi_pool: nn.Module, box_heads: Sequence[nn.Module], box_predictors: Sequence[nn.Module],
                 mask_roi_pool: Optional[nn.Module] = None, mask_heads: Optional[Sequence[nn.Module]] = None,
                 mask_predictors: Optional[Sequence[nn.Module]] = None, ious: Sequence[float] = CASCADE_IOUS,
                 stage_weights: Sequence[float] = CASCADE_STAGE_WEIGHTS,
                 box_stds: Sequence[Sequence[float]] = CASCADE_BOX_STDS, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, giou_weight: float = 10.0, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100):
        n = len(ious)
        if not (len(box_heads) == len(box_predictors) == len(stage_weights) == len(box_stds) == n):
            raise ValueError('the cascade needs one box head, predictor, loss weight and std per IoU threshold')
        coders = [det_utils.BoxCoder(tuple(1.0 / s for s in stds)) for stds in box_stds]
        super().__init__(box_roi_pool, nn.Identity(), nn.Identity(), ious[0], ious[0], batch_size_per_image,
                         positive_fraction, coders[-1].weights, score_thresh, nms_thresh, detections_per_img)
        del self.box_head, self.box_predictor
        self.box_coder = coders[-1]          # postprocess_detections decodes the last stage
        self.coders = coders
        self.box_heads = nn.ModuleList(box_heads)
        self.box_predictors = nn.ModuleList(box_predictors)
        self.matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in ious]
        self.ious = tuple(ious)
        self.stage_weights = tuple(stage_weights)
        self.giou_weight = giou_weight
        if mask_roi_pool is not None:
            self.mask_roi_pool = mask_roi_pool
            self.mask_heads = nn.ModuleList(mask_heads)
            self.mask_predictors = nn.ModuleList(mask_predictors)
            if not (len(self.mask_heads) == len(self.mask_predictors) == n):
                raise ValueError('the cascade needs one mask head and predictor per stage')
        else:
            self.mask_heads = self.mask_predictors = None

    @property
    def num_stages(self) -> int:
        return len(self.ious)

    def has_mask(self) -> bool:
        return self.mask_heads is not None

    # ---------------------------------------------------------------------------------
    def _sample(self, stage: int, proposals: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]]):
        """Per image: sampled RoIs, labels, matched gt index, matched gt box, is-ground-truth flag."""
        out = []
        for props, t in zip(proposals, targets):
            props, gt = props.float(), t['boxes'].float()    # box geometry in float32 under autocast too
            props = torch.cat([props, gt])
            is_gt = torch.zeros(props.shape[0], dtype=torch.bool, device=props.device)
            is_gt[props.shape[0] - gt.shape[0]:] = True
            if gt.numel() == 0:
                matched = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                labels = torch.zeros_like(matched)
            else:
                idx = self.matchers[stage](box_iou(gt, props))
                matched = idx.clamp(min=0)
                labels = t['labels'][matched].to(torch.int64)
                labels[idx == self.matchers[stage].BELOW_LOW_THRESHOLD] = 0
                labels[idx == self.matchers[stage].BETWEEN_THRESHOLDS] = -1
            pos, neg = self.fg_bg_sampler([labels])
            keep = torch.where(pos[0] | neg[0])[0]
            gt_boxes = gt[matched[keep]] if gt.numel() else props.new_zeros((keep.numel(), 4))
            out.append((props[keep], labels[keep], matched[keep], gt_boxes, is_gt[keep]))
        return out

    def _stage_forward(self, stage: int, features, rois: List[torch.Tensor], image_shapes):
        x = self.box_roi_pool(features, rois, image_shapes)
        return self.box_predictors[stage](self.box_heads[stage](x))

    def _class_deltas(self, stage: int, deltas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.box_predictors[stage].class_agnostic:
            return deltas
        return deltas.reshape(deltas.shape[0], -1, 4)[torch.arange(deltas.shape[0], device=deltas.device), labels]

    def _decode(self, stage: int, deltas: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return self.coders[stage].decode_single(deltas, rois)

    def _mask_logits(self, stage: int, mask_feats: torch.Tensor) -> torch.Tensor:
        return self.mask_predictors[stage](self.mask_heads[stage](mask_feats))

    # ---------------------------------------------------------------------------------
    def forward(self, features: Dict[str, torch.Tensor], proposals: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        if self.training:
            if targets is None:
                raise ValueError('targets are needed in training mode')
            return [], self._losses(features, proposals, image_shapes, targets)
        return self._detect(features, proposals, image_shapes), {}

    def _losses(self, features, proposals, image_shapes, targets) -> Dict[str, torch.Tensor]:
        losses: Dict[str, torch.Tensor] = {}
        proposals = [p.detach() for p in proposals]
        for stage, weight in enumerate(self.stage_weights):
            sampled = self._sample(stage, proposals, targets)
            rois = [s[0] for s in sampled]
            labels = torch.cat([s[1] for s in sampled])
            gt_boxes = torch.cat([s[3] for s in sampled])
            logits, deltas = self._stage_forward(stage, features, rois, image_shapes)
            loss_cls = F.cross_entropy(logits, labels)
            pos = torch.where(labels > 0)[0]
            all_rois = torch.cat(rois)
            if pos.numel():
                boxes = self._decode(stage, self._class_deltas(stage, deltas[pos], labels[pos]), all_rois[pos])
                loss_box = generalized_box_iou_loss(boxes, gt_boxes[pos].to(boxes.dtype), reduction='sum')
                loss_box = self.giou_weight * loss_box / labels.numel()
            else:
                loss_box = deltas.sum() * 0
            losses[f's{stage}.loss_classifier'] = weight * loss_cls
            losses[f's{stage}.loss_box_reg'] = weight * loss_box
            if self.has_mask():
                pos_props = [s[0][s[1] > 0] for s in sampled]
                pos_matched = [s[2][s[1] > 0] for s in sampled]
                mask_feats = self.mask_roi_pool(features, pos_props, image_shapes)
                mask_logits = self._mask_logits(stage, mask_feats)
                if mask_logits.shape[0]:
                    loss_mask = maskrcnn_loss(mask_logits, pos_props, [t['masks'] for t in targets],
                                              [t['labels'] for t in targets], pos_matched)
                else:
                    loss_mask = mask_logits.sum() * 0
                losses[f's{stage}.loss_mask'] = weight * loss_mask
            if stage < self.num_stages - 1:   # refine: next stage's proposals, ground truth removed
                with torch.no_grad():
                    refine_labels = torch.where(labels > 0, labels, logits[:, 1:].argmax(1) + 1)
                    boxes = self._decode(stage, self._class_deltas(stage, deltas, refine_labels), all_rois)
                    per_image = boxes.split([r.shape[0] for r in rois])
                    proposals = [clip_boxes_to_image(b[~s[4]], shape).detach()
                                 for b, s, shape in zip(per_image, sampled, image_shapes)]
        return losses

    def _detect(self, features, proposals, image_shapes) -> List[Dict[str, torch.Tensor]]:
        rois = proposals
        stage_logits = []
        deltas = None
        for stage in range(self.num_stages):
            logits, deltas = self._stage_forward(stage, features, rois, image_shapes)
            stage_logits.append(logits)
            if stage < self.num_stages - 1:
                labels = logits[:, 1:].argmax(1) + 1
                boxes = self._decode(stage, self._class_deltas(stage, deltas, labels), torch.cat(rois))
                rois = [clip_boxes_to_image(b, shape) for b, shape in
                        zip(boxes.split([r.shape[0] for r in rois]), image_shapes)]
        logits = torch.stack(stage_logits).mean(0)
        if self.box_predictors[-1].class_agnostic:
            deltas = deltas.repeat(1, logits.shape[1])
        boxes, scores, labels = self.postprocess_detections(logits, deltas, rois, image_shapes)
        result = [dict(boxes=b, labels=l, scores=s) for b, s, l in zip(boxes, scores, labels)]
        if self.has_mask():
            det_boxes = [r['boxes'] for r in result]
            mask_feats = self.mask_roi_pool(features, det_boxes, image_shapes)
            probs = None
            for stage in range(self.num_stages):
                p = torch.cat(maskrcnn_inference(self._mask_logits(stage, mask_feats), [r['labels'] for r in result])) \
                    if det_boxes and mask_feats.shape[0] else mask_feats.new_zeros((0, 1) + mask_feats.shape[-2:])
                probs = p if probs is None else probs + p
            probs = probs / self.num_stages
            for r, m in zip(result, probs.split([b.shape[0] for b in det_boxes])):
                r['masks'] = m
        return result
