"""Depth-aware model choice: the deepest PolyNeXt whose folded HE program fits a level budget.

``polynext train --fhe-levels N`` keeps the recipe's model family and width and searches the number
of cells per stage (then one block per cell, if even one cell per stage is too deep): every candidate
is built (bn norms), folded, compiled (shapes only) and its level count compared with N. The chosen
architecture and its analysis line are printed before training starts.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from ..errors import ConfigError

__all__ = ['program_levels', 'deepest_fitting']


def program_levels(model_name: str, kwargs: Dict[str, Any], num_classes: int) -> Tuple[int, int]:
    """(levels, ct×ct products) of the folded program of ``model_name(**kwargs)`` (random weights)."""
    from ..factory import create_model
    from ..models.folded import fold_for_inference
    from .graph import build_graph
    from .program import CompileOptions, compile_graph
    model = create_model(model_name, num_classes=num_classes, **kwargs).eval()
    graph = build_graph(fold_for_inference(model))
    slots = 1 << max(14, (graph.input_shape[1] * graph.input_shape[2] - 1).bit_length())
    prog = compile_graph(graph, CompileOptions(slots=slots, max_depth=10 ** 6, numeric=False))
    return prog.levels, graph.ct_products()


def deepest_fitting(model_name: str, model_kwargs: Dict[str, Any], levels: int, img_size: int,
                    num_classes: int, max_cells: int = 16) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The recipe's ``model_kwargs`` with bn norms and the most cells per stage whose program needs at most
    ``levels`` levels, and a summary of the fit."""
    from ..models.polynext import PUBLISHED_ARCHS
    if model_name not in PUBLISHED_ARCHS:
        raise ConfigError(f'--fhe-levels needs a PolyNeXt model, got {model_name!r}')
    if levels < 1:
        raise ConfigError(f'--fhe-levels must be positive, got {levels}')
    arch = dict(PUBLISHED_ARCHS[model_name], **model_kwargs)
    if arch.get('attn_stages'):
        raise ConfigError('--fhe-levels: PolyAttn stages are not compiled to HE yet; use a CPolyNeXt model')
    base = dict(model_kwargs, norm='bn', img_size=model_kwargs.get('img_size', img_size))
    n_stages = len(arch['cells'])
    blocks = tuple(arch['blocks'])
    best: Optional[Tuple[Dict[str, Any], int, int]] = None
    for blk in (blocks, (1,) * n_stages):
        for k in range(1, max_cells + 1):
            kw = dict(base, cells=(k,) * n_stages, blocks=blk)
            need, products = program_levels(model_name, kw, num_classes)
            if need > levels:
                break
            best = (kw, need, products)
        if best is not None:
            break
    if best is None:
        kw = dict(base, cells=(1,) * n_stages, blocks=(1,) * n_stages)
        need, _ = program_levels(model_name, kw, num_classes)
        raise ConfigError(f'--fhe-levels {levels}: even one cell of one block per stage needs {need} levels; '
                          f'allow at least {need}, or use fewer stages (model_kwargs)')
    kw, need, products = best
    return kw, dict(levels=need, budget=levels, ct_ct_products=products, cells=list(kw['cells']),
                    blocks=list(kw['blocks']))
