"""The rows of the PolyNeXt paper's two ablation tables, with the paper's numbers.

Every row is one switch of ``polynext.ABLATIONS`` on the tiny model of its table: the
activation / kernel rows and the whole stabilisation / architecture table on CPolyNeXt-T, the
two attention rows on APolyNeXt-T. ``baseline`` and ``baseline_attn`` are the unchanged models;
each row is compared with the baseline of its model family trained with the same seeds.

The paper's deltas are top-1 points on ImageNet-1k after the full recipe (baselines 80.2 for
CPolyNeXt-T and 80.9 for APolyNeXt-T); "PolyMLP → MLP+GELU" is given as a range (−0.1 to −0.4).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from ..errors import ConfigError
from ..models.polynext import ABLATIONS

__all__ = ['PaperRow', 'PAPER_ROWS', 'TABLES', 'BASELINES', 'PAPER_BASELINE_TOP1', 'select_rows', 'row_options']

#: table id → title as in the paper
TABLES: Dict[str, str] = {
    'activation': 'Activation / kernel ablation',
    'stabilisation': 'Stabilisation / architecture ablation',
}
#: model family → its baseline row
BASELINES: Dict[str, str] = {'conv': 'baseline', 'attn': 'baseline_attn'}
#: the paper's top-1 of the two baselines (ImageNet-1k)
PAPER_BASELINE_TOP1: Dict[str, float] = {'conv': 80.2, 'attn': 80.9}


@dataclass(frozen=True)
class PaperRow:
    """One row: ``name`` (a key of ``polynext.ABLATIONS``, or a baseline), the table it belongs to,
    the model family it runs on ('conv' = CPolyNeXt, 'attn' = APolyNeXt), the paper's wording
    and the paper's Δ top-1 as a (low, high) range in points (equal ends for a single number)."""
    name: str
    table: str
    family: str
    label: str
    paper_delta: Optional[Tuple[float, float]] = None

    @property
    def is_baseline(self) -> bool:
        return self.paper_delta is None

    @property
    def paper_mid(self) -> Optional[float]:
        """The paper's Δ (the middle of a range)."""
        return None if self.paper_delta is None else (self.paper_delta[0] + self.paper_delta[1]) / 2

    @property
    def paper_text(self) -> str:
        if self.paper_delta is None:
            return ''
        lo, hi = self.paper_delta
        return f'{lo:+.1f}' if lo == hi else f'{hi:+.1f} to {lo:+.1f}'


def _r(name: str, table: str, label: str, delta: Optional[float], family: str = 'conv',
       low: Optional[float] = None) -> PaperRow:
    return PaperRow(name, table, family, label, None if delta is None else (low if low is not None else delta, delta))


#: the two tables in the paper's order (the conv baseline is shared by both tables)
PAPER_ROWS: Tuple[PaperRow, ...] = (
    _r('baseline', 'activation', 'CPolyNeXt-T (baseline)', None),
    _r('mlp_gelu', 'activation', 'PolyMLP → MLP+GELU', -0.1, low=-0.4),
    _r('sepconv_gelu', 'activation', 'PolyConv → SepConv+GELU', -0.9),
    _r('gelu_one_branch', 'activation', 'GELU on one multiplied branch', -0.4),
    _r('gelu_after_product', 'activation', 'GELU after the product', -1.0),
    _r('hadamard_to_add', 'activation', 'Hadamard → addition', -22.3),
    _r('baseline_attn', 'activation', 'APolyNeXt-T (baseline)', None, family='attn'),
    _r('std_attention', 'activation', 'PolyAttn → standard attention', -1.3, family='attn'),
    _r('poly_kernel_to_softmax', 'activation', 'polynomial kernel → softmax', -0.1, family='attn'),
    _r('free_scalar', 'stabilisation', 'Sigmoid-Scale → free scalar', -0.5),
    _r('layerscale_1e-6', 'stabilisation', 'Sigmoid-Scale → LayerScale init 1e-6', -0.8),
    _r('layerscale_1', 'stabilisation', 'Sigmoid-Scale → LayerScale init 1.0', -12.8),
    _r('no_multi_input_skip', 'stabilisation', 'remove multi-input skip', -0.6),
    _r('no_cell_norm', 'stabilisation', 'remove norm before cell', -0.4),
    _r('wide_2_stacks', 'stabilisation', 'wider cells, 2 stacks', -0.7),
    _r('wide_1_stack', 'stabilisation', 'wider cells, 1 stack', -1.5),
)
_BY_NAME: Dict[str, PaperRow] = {r.name: r for r in PAPER_ROWS}
assert set(_BY_NAME) - set(BASELINES.values()) == set(ABLATIONS), 'every switch of ABLATIONS has a paper row'


def row_options(name: str) -> Dict[str, object]:
    """The model keyword arguments of a row (``{}`` for a baseline)."""
    return dict(ABLATIONS.get(name, {}))


def select_rows(names: Optional[Iterable[str]] = None) -> List[PaperRow]:
    """The rows to run, in the paper's order, with the baseline of every family they need.

    ``None`` or ``['all']``: every row. Unknown names raise one ``ConfigError`` naming the
    closest rows."""
    names = [n.strip() for n in (names or []) if n.strip()]
    if not names or names == ['all']:
        return list(PAPER_ROWS)
    for n in names:
        if n not in _BY_NAME:
            close = difflib.get_close_matches(n, list(_BY_NAME), n=2)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ''
            raise ConfigError(f"unknown ablation row '{n}'.{hint} `polynext ablate --list-rows` lists them.")
    wanted = set(names) | {BASELINES[_BY_NAME[n].family] for n in names}
    return [r for r in PAPER_ROWS if r.name in wanted]


def get_row(name: str) -> PaperRow:
    return _BY_NAME[name]
