"""Training metrics shared by every task: running sums reduced over ranks, and the start banner.

``Meters('loss', 'correct', 'n')`` keeps float sums for one logging period (an epoch, or
``log_every`` iterations). Tasks ``add`` their own sums; every task also gets ``grad_norm`` and
``steps``, fed by ``engine.step.TrainStep`` with the gradient norm of each optimizer step, finite
values only (an fp16 step that the scaler skipped for an infinite gradient does not count, and
cannot turn the mean into inf or NaN). ``reduce()`` sums over all ranks (one collective), so a
task divides sums by counts after it and uneven shards weigh correctly.

The rows built from them go to ``RunFolder.write_metrics`` (``metrics.json`` / ``.csv``) and
``RunFolder.plot_curves`` (``learning_curve.png``).
"""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .distributed import all_reduce_sums
from .memory import BatchLayout

__all__ = ['Meters', 'banner']


class Meters:
    """Float sums of one logging period, plus the gradient-norm sum and the optimizer-step count."""

    def __init__(self, *names: str):
        self.names = tuple(names) + ('grad_norm', 'steps')
        self.sums: Dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(self.names, 0.0)

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] += v

    def add_grad_norm(self, norm) -> None:
        """One optimizer step's gradient norm; non-finite norms are left out of the mean."""
        norm = float(norm)
        if math.isfinite(norm):
            self.sums['grad_norm'] += norm
            self.sums['steps'] += 1

    def __getitem__(self, name: str) -> float:
        return self.sums[name]

    def reduce(self) -> Dict[str, float]:
        """Every sum added over all ranks."""
        return all_reduce_sums(self.sums)

    @staticmethod
    def mean_grad_norm(reduced: Mapping[str, float]) -> float:
        return reduced['grad_norm'] / max(reduced['steps'], 1.0)

    def state_dict(self) -> Dict[str, float]:
        return dict(self.sums)

    def load_state_dict(self, sums: Optional[Mapping[str, float]]) -> None:
        self.reset()
        for k, v in (sums or {}).items():
            if k in self.sums:
                self.sums[k] = float(v)


def banner(command: str, recipe: str, model: str, n_params: int, num_classes: int, data: str, layout: BatchLayout,
           optimizer: str, schedule: str, device: str, precision: str, run: str) -> str:
    """The two lines every run starts with: what is trained on what, with which batch layout and where."""
    return (f'{command}: recipe {recipe} | {model} ({n_params:,} params, {num_classes} classes) | {data}\n'
            f'  batch {layout.effective} = {layout.device_batch} per device × {layout.world_size} device(s) × '
            f'{layout.accumulation} accumulation | {optimizer} | {schedule} | {device} {precision} | run folder {run}')


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as CSV text: the columns are the union of the row keys in first-seen order, ``None`` is an empty
    cell and a list or dict value is written as JSON (one cell)."""
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction='ignore')
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ('' if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v)
                         for k, v in row.items()})
    return buf.getvalue()
