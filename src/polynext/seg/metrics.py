"""Segmentation metrics from an accumulated confusion matrix (MMSegmentation's definitions).

``confusion[g, p]`` counts the pixels of ground-truth class g predicted as p (ignored pixels
are left out). With ``tp = diag``, ``gt = row sums`` and ``pred = column sums``:

    IoU_c = tp_c / (gt_c + pred_c − tp_c)      Acc_c = tp_c / gt_c
    mIoU = nanmean_c IoU_c                     mAcc = nanmean_c Acc_c        aAcc = Σ tp / Σ gt

A class with no ground-truth pixel has Acc NaN, and IoU NaN when it is also never predicted
(0 when it is predicted: false positives count); NaNs are left out of the means, as mmseg's
``np.nanmean``. The matrix is summed over ranks before the metrics are computed, so every
pixel counts exactly once whatever the number of processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ['ConfusionMatrix', 'SegMetrics', 'metrics_from_confusion', 'format_per_class']


class ConfusionMatrix:
    """Accumulates ``num_classes × num_classes`` pixel counts (int64) with ``torch.bincount``."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: Optional[torch.device] = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred`` and ``target``: integer class maps of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f'prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ in shape')
        n = self.num_classes
        target = target.reshape(-1).to(self.matrix.device)
        pred = pred.reshape(-1).to(self.matrix.device)
        valid = target != self.ignore_index
        if bool(((target < 0) | (target >= n))[valid].any()):
            bad = int(target[valid & ((target < 0) | (target >= n))][0])
            raise ValueError(f'label value {bad} is outside 0..{n - 1} (and not the ignore index '
                             f'{self.ignore_index}); check num_classes and reduce_zero_label')
        idx = target[valid].long() * n + pred[valid].long()
        self.matrix += torch.bincount(idx, minlength=n * n).reshape(n, n)

    def reduce(self) -> 'ConfusionMatrix':
        """Sum over all ranks (in place); a no-op in one process."""
        from ..engine.distributed import all_reduce_tensor
        self.matrix = all_reduce_tensor(self.matrix).to(self.matrix.device)
        return self

    def compute(self, class_names: Optional[Sequence[str]] = None) -> 'SegMetrics':
        return metrics_from_confusion(self.matrix, class_names)


@dataclass
class SegMetrics:
    """mIoU / mAcc / aAcc in percent, and per-class IoU / Acc (NaN: class absent)."""
    miou: float
    macc: float
    aacc: float
    iou: List[float]
    acc: List[float]
    class_names: List[str]
    pixels: int

    def as_dict(self, per_class: bool = False) -> Dict[str, object]:
        d: Dict[str, object] = dict(mIoU=self.miou, mAcc=self.macc, aAcc=self.aacc, pixels=self.pixels)
        if per_class:
            d['per_class'] = {n: dict(IoU=i, Acc=a) for n, i, a in zip(self.class_names, self.iou, self.acc)}
        return d


def _nanmean(x: torch.Tensor) -> float:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if bool(ok.any()) else float('nan')


def metrics_from_confusion(matrix: torch.Tensor, class_names: Optional[Sequence[str]] = None) -> SegMetrics:
    m = matrix.double().cpu()
    tp = m.diag()
    gt = m.sum(dim=1)
    pred = m.sum(dim=0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float('nan')))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float('nan')))
    total = float(gt.sum())
    names = list(class_names) if class_names is not None else [str(i) for i in range(m.shape[0])]
    return SegMetrics(miou=100.0 * _nanmean(iou), macc=100.0 * _nanmean(acc),
                      aacc=100.0 * float(tp.sum()) / total if total else float('nan'),
                      iou=[100.0 * float(v) for v in iou], acc=[100.0 * float(v) for v in acc],
                      class_names=names, pixels=int(total))


def format_per_class(metrics: SegMetrics) -> str:
    """A per-class table (IoU and Acc in percent) like mmseg's evaluation log."""
    width = max([len('class')] + [len(n) for n in metrics.class_names])
    lines = [f'{"class":<{width}}  {"IoU":>6}  {"Acc":>6}']
    for n, i, a in zip(metrics.class_names, metrics.iou, metrics.acc):
        lines.append(f'{n:<{width}}  {i:6.2f}  {a:6.2f}')
    lines.append(f'{"mean":<{width}}  {metrics.miou:6.2f}  {metrics.macc:6.2f}   aAcc {metrics.aacc:.2f}')
    return '\n'.join(lines)
