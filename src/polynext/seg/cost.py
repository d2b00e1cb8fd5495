"""Parameters and MACs of UperNet segmentors, against the papers' figures (``polynext seg cost``).

    from polynext.seg import segmentor_costs
    rows = segmentor_costs(recipes=['upernet_cpolynext_s'])          # 512x2048, 150 classes
    rows[0]['params'], rows[0]['macs'], rows[0]['macs_with_bn']

Counting convention (batch 1, inference): the backbone and the decode head run; the auxiliary head
counts in the parameters only (it does not run at inference). MACs are ``FlopCounterMode`` FLOPs / 2:
convolutions, linear layers and attention matmuls. ``bn_ops`` adds 2 ops per output element of each
BatchNorm (an affine norm at inference, as mmcv's and fvcore's counters do); ``macs_with_bn`` is the
sum, which is what the papers' tables report.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Sequence, Tuple

import torch

__all__ = ['PAPER_COST', 'segmentor_costs', 'format_costs']

#: the papers' UperNet rows at 512x2048: (params in M, GMACs) (PolyNeXt: ADE20K table; MetaFormer: Table 10)
PAPER_COST: Dict[str, Tuple[int, int]] = {
    'upernet_cpolynext_s': (54, 942), 'upernet_apolynext_s': (55, 1121),
    'upernet_convformer_s18': (54, 925), 'upernet_caformer_s18': (54, 1024),
}


def segmentor_costs(backbones: Sequence[str] = (), recipes: Sequence[str] = (), size: Sequence[int] = (512, 2048),
                    num_classes: int = 150, progress: bool = False) -> List[Dict[str, Any]]:
    """One row per recipe (its segmentor) and per bare backbone (a default UperNet on it): params (total,
    backbone, decode head, auxiliary head), MACs, BatchNorm ops, and the paper's figures where they apply."""
    from ..profile import count_macs, count_params
    from .recipes import SEG_PRESETS
    from .segmentor import SegmentorSpec, build_segmentor
    jobs = [(r, SEG_PRESETS.get(r).config.spec(num_classes)) for r in recipes]
    jobs += [(b, SegmentorSpec(backbone=b, num_classes=num_classes)) for b in backbones]
    rows = []
    for name, spec in jobs:
        if progress:
            print(f'counting {name} at {size[0]}x{size[1]} ...', file=sys.stderr, flush=True)
        model = build_segmentor(spec)
        bn_ops = [0]

        def count_bn(module, inputs, output):   # affine BatchNorm at inference: 2 ops per element (mmcv, fvcore)
            bn_ops[0] += 2 * output.numel()
        hooks = [m.register_forward_hook(count_bn) for m in model.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        try:
            macs = count_macs(model, (3, int(size[0]), int(size[1])))
        finally:
            for h in hooks:
                h.remove()
        paper = PAPER_COST.get(name) if tuple(size) == (512, 2048) and num_classes == 150 else None
        rows.append(dict(name=name, backbone=spec.backbone, params=count_params(model),
                         backbone_params=count_params(model.backbone),
                         head_params=count_params(model.decode_head),
                         aux_params=count_params(model.auxiliary_head) if model.auxiliary_head is not None else 0,
                         macs=macs, bn_ops=bn_ops[0], macs_with_bn=macs + bn_ops[0], size=list(size),
                         paper_params_m=paper[0] if paper else None,
                         paper_macs_g=paper[1] if paper else None))
        del model
    return rows


def format_costs(rows: Sequence[Dict[str, Any]]) -> str:
    """The table ``polynext seg cost`` prints, with its counting convention."""
    h, w = rows[0]['size']
    width = max(len(r['name']) for r in rows)
    lines = [f'UperNet segmentors at {h}x{w}, batch 1. MACs: convolutions, linear layers and attention matmuls '
             f'(FlopCounterMode FLOPs / 2, decode path); +BN adds 2 ops per BatchNorm output element, as mmcv and '
             f'fvcore count them. The auxiliary head counts in params only (it does not run at inference).',
             f'{"segmentor":<{width}}  {"params":>12} {"(M)":>6} {"GMACs":>8} {"+BN":>8}   {"paper":>12}']
    for r in rows:
        paper = (f'{r["paper_params_m"]}M / {r["paper_macs_g"]}G' if r['paper_params_m'] else '-')
        lines.append(f'{r["name"]:<{width}}  {r["params"]:>12,} {r["params"] / 1e6:>6.2f} {r["macs"] / 1e9:>8.2f} '
                     f'{r["macs_with_bn"] / 1e9:>8.2f}   {paper:>12}')
    return '\n'.join(lines)
