"""Detection results and COCO evaluation (box and mask AP with pycocotools, the official evaluator).

* ``postprocess(output, meta)``: boxes from the network's input size back to the original image
  (÷ the resize ratios, as mmdetection's ``rescale=True``), masks pasted into the original image
  from their 28x28 probabilities with torchvision's ``paste_masks_in_image`` and thresholded at 0.5.
* ``coco_results(...)``: the official results format, one entry per detection: ``image_id``,
  ``category_id`` (the dataset's own ids), ``bbox`` [x, y, w, h], ``score`` and, for masks,
  ``segmentation`` as compressed RLE (``counts`` an ASCII string).
* ``coco_evaluate(gt, results)``: ``COCOeval`` for ``bbox`` and ``segm``: AP, AP50, AP75, APs,
  APm, APl, AR1, AR10, AR100, ARs, ARm, ARl in %. The boxes and the masks are scored from two lists
  (``results_bbox.json`` / ``results_segm.json``, as mmdetection writes them), because pycocotools'
  ``loadRes`` takes the area ranges of box results from the boxes and of mask results from the masks.
* ``run_inference(...)``: the model over a (sharded) loader; results gathered on every rank.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .data import coco_api, require_pycocotools

__all__ = ['postprocess', 'coco_results', 'coco_evaluate', 'run_inference', 'STAT_NAMES', 'load_results',
           'write_results', 'format_metrics']

STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')


def postprocess(output: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                mask_threshold: float = 0.5) -> Dict[str, torch.Tensor]:
    """One image's detections in its original pixel coordinates (boxes float, masks N×H×W bool)."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    h, w = meta['orig_size']
    sx, sy = meta['scale']
    boxes = output['boxes'].float().cpu() / torch.tensor([sx, sy, sx, sy])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    out = dict(boxes=boxes, scores=output['scores'].float().cpu(), labels=output['labels'].cpu())
    if 'masks' in output:
        probs = output['masks'].float().cpu()
        out['masks'] = (paste_masks_in_image(probs, boxes, (h, w), padding=1)[:, 0] >= mask_threshold) \
            if probs.shape[0] else torch.zeros(0, h, w, dtype=torch.bool)
    return out


def coco_results(image_id: int, det: Mapping[str, torch.Tensor], cat_ids: Sequence[int]) -> Tuple[List[dict], List[dict]]:
    """(box results, mask results) of one image in the official format; labels 1 … C → ``cat_ids``."""
    boxes = det['boxes'].tolist()
    scores = det['scores'].tolist()
    labels = det['labels'].tolist()
    bbox, segm = [], []
    rles = []
    if 'masks' in det and len(boxes):
        mask_utils = require_pycocotools().mask
        masks = np.asfortranarray(det['masks'].numpy().astype(np.uint8).transpose(1, 2, 0))
        rles = mask_utils.encode(masks)
    for i, (b, s, lab) in enumerate(zip(boxes, scores, labels)):
        entry = dict(image_id=int(image_id), category_id=int(cat_ids[int(lab) - 1]),
                     bbox=[round(b[0], 2), round(b[1], 2), round(b[2] - b[0], 2), round(b[3] - b[1], 2)],
                     score=round(float(s), 5))
        bbox.append(entry)
        if rles:
            rle = rles[i]
            segm.append(dict(entry, segmentation=dict(size=[int(v) for v in rle['size']],
                                                      counts=rle['counts'].decode('ascii'))))
    return bbox, segm


def write_results(path: Union[str, Path], results: List[dict]) -> Path:
    from ..checkpoint import atomic_write
    text = json.dumps(results)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_results(path: Union[str, Path]) -> List[dict]:
    from ..errors import DataError
    path = Path(path)
    if not path.is_file():
        raise DataError(f'results file not found: {path}')
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f'cannot read {path} as JSON ({e}); pass a results file written by polynext det eval') from None
    if not isinstance(data, list) or (data and not all(isinstance(d, dict) and 'image_id' in d and 'category_id' in d
                                                         and 'score' in d for d in data)):
        raise DataError(f'{path} is not a COCO results list (entries with image_id, category_id, bbox / '
                        f'segmentation, score)')
    return data


def coco_evaluate(gt: Union[Mapping[str, Any], Any], results: Mapping[str, List[dict]],
                  image_ids: Optional[Iterable[int]] = None) -> Dict[str, Dict[str, float]]:
    """``{'bbox': {AP: …, …}, 'segm': {…}}`` (in %) from ``results = {'bbox': [...], 'segm': [...]}``.

    ``gt``: a COCO instances dict or a ``pycocotools.coco.COCO``; ``image_ids``: the images that were
    evaluated (default: all of the ground truth). An empty result list scores 0."""
    require_pycocotools()
    from pycocotools.cocoeval import COCOeval
    coco_gt = gt if hasattr(gt, 'loadRes') else coco_api(dict(gt))
    ids = sorted(int(i) for i in image_ids) if image_ids is not None else sorted(coco_gt.getImgIds())
    out: Dict[str, Dict[str, float]] = {}
    for iou_type, res in results.items():
        if not res:
            out[iou_type] = {k: 0.0 for k in STAT_NAMES}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([dict(r) for r in res])
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.imgIds = ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # -1 (no ground truth in that area range) is reported as 0, as mmdetection prints it
        out[iou_type] = {k: float(max(v, 0.0)) * 100.0 for k, v in zip(STAT_NAMES, ev.stats)}
    return out


def format_metrics(metrics: Mapping[str, Mapping[str, float]]) -> str:
    lines = [f'{"":5} ' + ' '.join(f'{k:>6}' for k in STAT_NAMES[:6])]
    for iou_type, m in metrics.items():
        lines.append(f'{iou_type:5} ' + ' '.join(f'{m[k]:6.2f}' for k in STAT_NAMES[:6]))
    return '\n'.join(lines)


@torch.no_grad()
def run_inference(model: torch.nn.Module, loader, device: torch.device, cat_ids: Sequence[int],
                  show_progress: bool = False, desc: str = 'eval', total: Optional[int] = None,
                  channels_last: bool = False):
    """(box results, mask results, evaluated image ids, unreadable indices) of this rank's share."""
    from ..engine.run import progress
    model.eval()
    bbox, segm, ids, bad = [], [], [], []
    for images, targets, metas, flags in progress(loader, total=total, desc=desc, enabled=show_progress):
        batch = [img.to(device, non_blocking=True).float().div_(255) for img in images]
        outputs = model(batch)
        for out, meta, flag in zip(outputs, metas, flags):
            if flag >= 0:
                bad.append(int(flag))
                continue
            det = postprocess(out, meta)
            b, s = coco_results(meta['image_id'], det, cat_ids)
            bbox += b
            segm += s
            ids.append(int(meta['image_id']))
    return bbox, segm, ids, bad
