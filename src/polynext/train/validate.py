"""Classification evaluation: top-1 / top-5 / loss and per-class accuracy, sharded over ranks.

``evaluate(model, loader, num_classes, device)`` runs the model in eval mode without
autocast (the reference validates in fp32), counts correct predictions as sums and reduces
them over all ranks, so every image counts exactly once however the shards fall. Images that
could not be read (``skipped >= 0`` from ``Samples``) are left out of the counts.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..engine.distributed import all_reduce_sums, all_reduce_tensor
from ..engine.run import progress

__all__ = ['EvalResult', 'evaluate', 'per_class_rows']


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    images: int
    per_class_total: Optional[List[int]] = None
    per_class_top1: Optional[List[int]] = None
    per_class_top5: Optional[List[int]] = None
    skipped: List[int] = field(default_factory=list)   # this rank's unreadable indices

    def as_dict(self, prefix: str = '') -> Dict[str, float]:
        return {f'{prefix}top1': self.top1, f'{prefix}top5': self.top5, f'{prefix}loss': self.loss}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, num_classes: int, device: torch.device, per_class: bool = False,
             channels_last: bool = True, show_progress: bool = False, desc: str = 'val',
             autocast_dtype: Optional[torch.dtype] = None) -> EvalResult:
    """Top-1 / top-5 (%) and mean cross-entropy over the loader (all ranks together)."""
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    sums = dict(loss=0.0, top1=0.0, top5=0.0, n=0.0)
    total = torch.zeros(num_classes, dtype=torch.float64)
    hit1 = torch.zeros(num_classes, dtype=torch.float64)
    hit5 = torch.zeros(num_classes, dtype=torch.float64)
    skipped: List[int] = []
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    for x, y, bad in progress(loader, total=len(loader), desc=desc, enabled=show_progress):
        keep = bad < 0
        if not bool(keep.all()):
            skipped += bad[~keep].tolist()
            x, y = x[keep], y[keep]
            if len(y) == 0:
                continue
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with amp:
            logits = model(x)
        logits = logits.float()
        sums['loss'] += float(F.cross_entropy(logits, y, reduction='sum'))
        topk = logits.topk(k, dim=1).indices
        c1 = topk[:, 0] == y
        c5 = (topk == y[:, None]).any(dim=1)
        sums['top1'] += float(c1.sum())
        sums['top5'] += float(c5.sum())
        sums['n'] += len(y)
        if per_class:
            yc = y.cpu()
            total += torch.bincount(yc, minlength=num_classes).double()
            hit1 += torch.bincount(yc[c1.cpu()], minlength=num_classes).double()
            hit5 += torch.bincount(yc[c5.cpu()], minlength=num_classes).double()
    reduced = all_reduce_sums(sums)
    if per_class:
        total, hit1, hit5 = all_reduce_tensor(torch.stack([total, hit1, hit5]))
    model.train(was_training)
    n = max(reduced['n'], 1.0)
    res = EvalResult(top1=100.0 * reduced['top1'] / n, top5=100.0 * reduced['top5'] / n,
                     loss=reduced['loss'] / n, images=int(reduced['n']), skipped=skipped)
    if per_class:
        res.per_class_total = [int(v) for v in total.tolist()]
        res.per_class_top1 = [int(v) for v in hit1.tolist()]
        res.per_class_top5 = [int(v) for v in hit5.tolist()]
    return res


def per_class_rows(res: EvalResult, classes: List[str]) -> List[Dict[str, object]]:
    """One row per class: index, name, images, top-1 / top-5 correct and accuracy (%)."""
    rows = []
    for i, name in enumerate(classes):
        n = res.per_class_total[i]
        rows.append(dict(index=i, cls=name, images=n, top1_correct=res.per_class_top1[i],
                         top1=round(100.0 * res.per_class_top1[i] / n, 4) if n else None,
                         top5_correct=res.per_class_top5[i],
                         top5=round(100.0 * res.per_class_top5[i] / n, 4) if n else None))
    return rows
