"""Parameters and MACs of a detector, counted the way mmdetection's ``get_flops`` did for Table 9.

mmdetection (``tools/analysis_tools/get_flops.py``, the tool of Swin's and ConvNeXt's detection
code) runs ``model.forward_dummy`` on one image of the given size, unpadded:

* backbone and FPN on the image; the RPN head on all five FPN levels;
* the box head on **1000** proposals (``torch.randn(1000, 4)``, the RPN's test-time count), and
  for Cascade R-CNN each of the **three** stages' box heads on the same 1000;
* the mask head on the first **100** of them (the test-time detection limit), and for Cascade
  R-CNN each of the three stages' mask heads;
* no RPN post-processing, NMS, RoIAlign or mask pasting.

Which operations count: polynext counts multiply-accumulates of convolutions, linear layers and
matrix products (``FlopCounterMode`` FLOPs / 2, the convention of both papers' classification
tables) and therefore the attention matmuls, which mmcv's module-hook counter cannot see. That is
what Table 9 must have done: CAFormer-S18 is 3 G *more* than ConvFormer-S18 there, while with
mmcv's counter (no matmuls) it would be 1.3 G *less* (its qkv + proj equal SepConv's two
projections, and SepConv's 7x7 depthwise conv is counted). Sliding-window attention counts the
2 · N · k² · d MACs of a neighbourhood kernel (``window_attention_macs``), not the masked
scores of polynext's tiled implementation. ``mmcv_extras`` adds what mmcv also counts (norms 2
ops / element when affine, 1 otherwise; ReLU, pooling, up-sampling 1 / element; conv biases)
for the comparison in the README.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..profile import count_params, unfused_attention

__all__ = ['detector_cost', 'count_detector', 'detector_costs', 'format_costs', 'COST_SIZES', 'PAPER_TABLE9', 'BOX_PROPOSALS', 'MASK_PROPOSALS']

#: mmdetection forward_dummy: box heads on 1000 proposals, mask heads on the first 100
BOX_PROPOSALS = 1000
MASK_PROPOSALS = 100

#: MetaFormer Table 9 (800x1333): preset → (GMACs, box AP, mask AP)
PAPER_TABLE9 = {
    'maskrcnn_convformer_s18_3x': (251, 47.7, 42.6),
    'maskrcnn_caformer_s18_3x': (254, 48.6, 43.7),
    'cascade_convformer_s18_3x': (729, 51.5, 44.6),
    'cascade_caformer_s18_3x': (733, 52.3, 45.2),
}


class _Counter:
    """FlopCounterMode with windowed attention counted analytically, plus mmcv's extra ops."""

    def __init__(self, model: nn.Module):
        self.mode = FlopCounterMode(display=False)
        self.window_fix = 0.0        # MACs: analytic window attention − what the counter saw in its core
        self.extras = 0.0            # mmcv's norm / activation / pooling / bias ops
        self._open: Dict[int, float] = {}
        self._children: Dict[int, float] = {}
        self._hooks = []
        for m in model.modules():
            self._hooks.append(m.register_forward_hook(self._extra))
            if _is_window_layer(m):   # core = everything inside the layer but its convs / linear layers
                self._watch(m, m)
                for child in m.modules():
                    if child is not m and isinstance(child, (nn.Linear, nn.Conv2d)):
                        self._watch(child, m)

    def _watch(self, module: nn.Module, layer: nn.Module) -> None:
        key = id(module)

        def enter(mod, inputs):
            self._open[key] = self.mode.get_total_flops() / 2

        def leave(mod, inputs, output):
            seen = self.mode.get_total_flops() / 2 - self._open.pop(key)
            if mod is layer:
                from ..models.attention_window import window_attention_macs
                core = seen - self._children.pop(key, 0.0)
                self.window_fix += window_attention_macs(mod, inputs, output) - core
            else:
                self._children[id(layer)] = self._children.get(id(layer), 0.0) + seen
        self._hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def _extra(self, module, inputs, output):
        if not torch.is_tensor(output):
            return
        if type(module) in (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm, nn.SyncBatchNorm):
            affine = getattr(module, 'affine', False) or getattr(module, 'elementwise_affine', False)
            self.extras += inputs[0].numel() * (2 if affine else 1)
        elif type(module) in (nn.ReLU, nn.MaxPool2d, nn.Upsample):
            self.extras += output.numel()
        elif type(module) in (nn.Conv2d, nn.ConvTranspose2d) and module.bias is not None:
            self.extras += output.numel()

    def close(self):
        for h in self._hooks:
            h.remove()


def _is_window_layer(m: nn.Module) -> bool:
    from ..models.attention_window import WindowedAttention
    from ..models.polynext import PolyAttn
    return isinstance(m, (WindowedAttention, PolyAttn)) and bool(getattr(m, 'window', None))


@contextlib.contextmanager
def _counting(model: nn.Module) -> Iterator[_Counter]:
    counter = _Counter(model)
    try:
        with torch.no_grad(), unfused_attention(model), counter.mode:
            yield counter
    finally:
        counter.close()


def _section(counter: _Counter, fn):
    before, fix, extra = counter.mode.get_total_flops() / 2, counter.window_fix, counter.extras
    out = fn()
    return out, (counter.mode.get_total_flops() / 2 - before) + (counter.window_fix - fix), counter.extras - extra


def detector_cost(model: nn.Module, size: Tuple[int, int] = (800, 1333), box_proposals: int = BOX_PROPOSALS,
                  mask_proposals: int = MASK_PROPOSALS) -> Dict[str, Any]:
    """Params and MACs of ``model`` (a ``build_detector`` result) for one ``size`` image, by part."""
    from .cascade import CascadeRoIHeads
    model.eval()
    h, w = int(size[0]), int(size[1])
    param = next(model.parameters())
    x = torch.zeros(1, 3, h, w, dtype=param.dtype, device=param.device)
    heads = model.roi_heads
    cascade = isinstance(heads, CascadeRoIHeads)
    parts: Dict[str, float] = {}
    extras: Dict[str, float] = {}
    with _counting(model) as c:
        feats, parts['backbone'], extras['backbone'] = _section(c, lambda: model.backbone.body(x))
        fpn_in = {str(i): f for i, f in enumerate(feats)}
        pyramid, parts['fpn'], extras['fpn'] = _section(c, lambda: model.backbone.fpn(fpn_in))
        levels = list(pyramid.values())
        _, parts['rpn'], extras['rpn'] = _section(c, lambda: model.rpn.head(levels))
        # RoIAlign is not counted (mmcv's counter does not see it either): its outputs suffice
        box_feats = pyramid['0'].new_zeros((box_proposals, pyramid['0'].shape[1]) + tuple(heads.box_roi_pool.output_size))
        mask_feats = pyramid['0'].new_zeros((min(mask_proposals, box_proposals), pyramid['0'].shape[1]) +
                                            tuple(heads.mask_roi_pool.output_size))
        if cascade:
            box_fn = lambda: [p(b(box_feats)) for b, p in zip(heads.box_heads, heads.box_predictors)]  # noqa: E731
            mask_fn = lambda: [p(m(mask_feats)) for m, p in zip(heads.mask_heads, heads.mask_predictors)]  # noqa: E731
        else:
            box_fn = lambda: heads.box_predictor(heads.box_head(box_feats))  # noqa: E731
            mask_fn = lambda: heads.mask_predictor(heads.mask_head(mask_feats))  # noqa: E731
        _, parts['box_heads'], extras['box_heads'] = _section(c, box_fn)
        _, parts['mask_heads'], extras['mask_heads'] = _section(c, mask_fn)
    total = sum(parts.values())
    return dict(size=[h, w], params=count_params(model), backbone_params=count_params(model.backbone.body),
                macs=total, parts=parts, mmcv_extras=sum(extras.values()), extras=extras,
                box_proposals=box_proposals, mask_proposals=mask_proposals,
                box_stages=len(heads.box_heads) if cascade else 1)


def count_detector(spec, size: Tuple[int, int] = (800, 1333), **kwargs: Any) -> Dict[str, Any]:
    """``detector_cost`` of the detector of ``spec``, built on the meta device (shapes only: seconds,
    no memory), or on the CPU for backbones that need real tensors (PolyNeXt's attention kernel)."""
    from .detector import build_detector
    try:
        with torch.device('meta'):
            model = build_detector(spec)
        return detector_cost(model, size, **kwargs)
    except (RuntimeError, NotImplementedError):
        return detector_cost(build_detector(spec), size, **kwargs)


#: the input sizes of the cost table: the caption's 800x1333, and mmdetection get_flops' default
#: ``--shape 1280 800`` (H 1280, W 800), which Table 9's figures match (see the README)
COST_SIZES = ((800, 1333), (1280, 800))


def detector_costs(recipes: Sequence[str] = (), backbones: Sequence[str] = (), kinds: Sequence[str] = ('mask_rcnn',),
                   sizes: Sequence[Tuple[int, int]] = COST_SIZES, num_classes: int = 80,
                   progress: bool = False) -> List[Dict[str, Any]]:
    """One row per recipe (its detector and backbone settings) and per backbone × detector kind:
    params, MACs at each size (and with mmcv's extra ops), and Table 9's figure where there is one."""
    import sys
    from .detector import DetectorSpec
    from .recipes import DET_PRESETS
    jobs = [(r, DET_PRESETS.get(r).config.spec(num_classes)) for r in recipes]
    jobs += [(f'{k}:{b}', DetectorSpec(kind=k, backbone=b, num_classes=num_classes)) for b in backbones for k in kinds]
    rows = []
    for name, spec in jobs:
        row: Dict[str, Any] = dict(name=name, detector=spec.kind, backbone=spec.backbone,
                                   attn_window=list(spec.attn_window), macs={}, macs_mmcv={})
        for size in sizes:
            if progress:
                print(f'counting {name} at {size[0]}x{size[1]} ...', file=sys.stderr, flush=True)
            r = count_detector(spec, tuple(size))
            key = f'{size[0]}x{size[1]}'
            row['macs'][key] = r['macs']
            row['macs_mmcv'][key] = r['macs'] + r['mmcv_extras']
            row.update(params=r['params'], backbone_params=r['backbone_params'], parts={key: r['parts']})
        paper = PAPER_TABLE9.get(name) if num_classes == 80 else None
        row['paper_gmacs'] = paper[0] if paper else None
        rows.append(row)
    return rows


def format_costs(rows: Sequence[Dict[str, Any]]) -> str:
    """The cost table as text (GMACs per size; the paper's figure and our deviation from it at 1280x800)."""
    sizes = list(rows[0]['macs']) if rows else []
    width = max([len(r['name']) for r in rows] + [8])
    head = f'{"detector":<{width}}  {"params":>12}  ' + '  '.join(f'{"GMACs " + s:>16}' for s in sizes) + \
        f'  {"paper":>6}  {"Δ":>6}'
    lines = ['Box heads on 1000 proposals, mask heads on 100 (every cascade stage), as mmdetection get_flops; '
             'MACs of convolutions, linear layers and matmuls (attention included).', head]
    for r in rows:
        cells = '  '.join(f'{r["macs"][s] / 1e9:>16.2f}' for s in sizes)
        paper = r.get('paper_gmacs')
        ref = r['macs'].get('1280x800')
        delta = f'{100 * (ref / 1e9 - paper) / paper:+5.1f}%' if paper and ref else ''
        lines.append(f'{r["name"]:<{width}}  {r["params"]:>12,}  {cells}  {paper or "-":>6}  {delta:>6}')
    return '\n'.join(lines)
