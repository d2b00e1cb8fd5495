"""Planning and running the ablation cells (one row × one seed each).

A cell is an ordinary classification training run: the recipe's ``TrainConfig`` with the row's
model and switches and the cell's seed, trained by ``polynext.train`` (``train_cell`` is the one
place that starts it). Every cell of a seed therefore sees the same images in the same order,
and only the architecture differs between the rows.

* **Keys and resuming.** A cell's key is a hash of its whole config (model, switches, seed and
  every recipe field; not the run-control fields such as threads or the output folder). It names
  the cell's folder ``OUTPUT/cells/ROW/seedS-KEY``; a folder with a ``result.json`` of that key
  is finished and skipped. A cell killed part-way resumes from its last epoch checkpoint (the
  trainer's own resume), so re-running the command continues where it stopped, and changing a
  setting gives new cells beside the old ones instead of mixing them.
* **Divergence.** A non-finite loss or gradient stops that cell only: it is recorded as
  ``diverged`` with the epoch in which it happened, and the study goes on.
* **Parallelism.** ``jobs`` cells run at once in worker processes, the usable cores split evenly
  between them (one thread each by default on a CPU). Under ``torchrun`` every rank takes every
  WORLD_SIZE-th cell, trains it as a single process, and rank 0 writes the report once all cells
  have a result (ranks meet through the files only: a process group would tie the independent
  training runs together).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..checkpoint import atomic_write
from ..engine.config import config_to_dict
from ..errors import ConfigError
from ..train.recipes import TrainConfig
from .rows import PaperRow, row_options

__all__ = ['Cell', 'AblationPlan', 'plan_cells', 'cell_key', 'load_result', 'train_cell', 'run_cells',
           'RESULT_FORMAT', 'DEFAULT_OUTPUT', 'usable_cores']

RESULT_FORMAT = 'polynext.ablate.cell/1'
DEFAULT_OUTPUT = 'runs/ablate'
RESULT_FILE = 'result.json'
#: files of a finished cell that are only needed to resume it (removed unless keep_checkpoints)
_RESUME_FILES = ('last.state.pt', 'best.state.pt', 'best.safetensors')


@dataclass(frozen=True)
class Cell:
    """One training run of the study."""
    row: str
    family: str          # 'conv' | 'attn'
    seed: int
    config: TrainConfig
    key: str
    folder: Path

    @property
    def label(self) -> str:
        return f'{self.row} seed {self.seed}'


@dataclass
class AblationPlan:
    """What a study runs: the recipe, the models of the two families, rows, seeds, output folder."""
    recipe: str
    base: TrainConfig
    models: Dict[str, str]                   # family → model name
    rows: List[PaperRow]
    seeds: List[int]
    output: Path
    init_channels: Optional[int] = None      # None: the recipe's; 0: the model's own width
    keep_checkpoints: bool = False
    params: Dict[str, int] = field(default_factory=dict)   # row → parameter count (filled by check_models)

    def cells(self) -> List['Cell']:
        return plan_cells(self)


def usable_cores() -> int:
    """CPU cores this process may use (its affinity), shared by the ranks of this node under torchrun."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, n // max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1'))))


def cell_key(config: TrainConfig) -> str:
    """12 hex digits of a hash of everything in ``config`` that changes the result (not the code: a
    changed model or data generator needs a new ``--output`` folder)."""
    from ..train.trainer import RESUME_SAFE_KEYS      # what may change between a run and its resumption
    # fields at TrainConfig's default are left out, so that a field added to TrainConfig later (with a default
    # that keeps the old behaviour) does not rename every finished cell
    defaults = config_to_dict(TrainConfig())
    d = {k: v for k, v in config_to_dict(config).items()
         if k not in RESUME_SAFE_KEYS and not (k in defaults and v == defaults[k])}
    if config.data:
        # the trainer lets a moved dataset resume, but a study on other data is another study: the folder
        # (resolved) is part of the key; left out when unset, so that the built-in study's keys stay as they were
        d['data'] = str(Path(config.data).expanduser().resolve())
    text = json.dumps(dict(format=RESULT_FORMAT, config=d), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def model_kwargs_for(plan: AblationPlan, row: PaperRow) -> Dict[str, Any]:
    """The model keyword arguments of ``row``: the recipe's (e.g. its base width), the width
    asked for, and the row's switches."""
    kwargs = dict(plan.base.model_kwargs)
    if plan.init_channels == 0:
        kwargs.pop('init_channels', None)
    elif plan.init_channels:
        kwargs['init_channels'] = int(plan.init_channels)
    kwargs.update(row_options(row.name))
    return kwargs


def plan_cells(plan: AblationPlan) -> List[Cell]:
    """Every (row, seed) cell, seed-major (all rows of seed 0 first: partial runs give whole tables)."""
    cells = []
    for seed in plan.seeds:
        for row in plan.rows:
            cfg = dataclasses.replace(plan.base, model=plan.models[row.family], model_kwargs=model_kwargs_for(plan, row),
                                      seed=int(seed), output=None)
            key = cell_key(cfg)
            folder = plan.output / 'cells' / row.name / f'seed{seed}-{key}'
            cells.append(Cell(row.name, row.family, int(seed), dataclasses.replace(cfg, output=str(folder)), key, folder))
    return cells


def load_result(cell: Cell) -> Optional[Dict[str, Any]]:
    """The finished result of ``cell``, or ``None`` (no file, another key, or an unreadable file)."""
    path = cell.folder / RESULT_FILE
    if not path.is_file():
        return None
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return res if res.get('format') == RESULT_FORMAT and res.get('key') == cell.key else None


# --------------------------------------------------------------------------------------------
# one cell
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """Hide torchrun's world from the trainer: a cell is one process (LOCAL_RANK still picks the GPU)."""
    saved = {k: os.environ.get(k) for k in ('WORLD_SIZE', 'RANK')}
    os.environ['WORLD_SIZE'], os.environ['RANK'] = '1', '0'
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start_training(config: TrainConfig, recipe: str) -> List[Dict[str, Any]]:
    """Train (or resume) one run with the classification task's entry point; returns its epoch rows.
    The one place where the study meets the training engine."""
    from ..train.trainer import train
    out = train(config, recipe, show_progress=False, quiet=True)
    return list(out.get('history') or [])


def _read_history(folder: Path) -> List[Dict[str, Any]]:
    path = folder / 'metrics.json'
    try:
        return list(json.loads(path.read_text())) if path.is_file() else []
    except (OSError, ValueError):
        return []


def _device_name(device: str) -> str:
    """What a cell trained on, for the report's timings: the GPU's or the CPU's name."""
    import torch
    if device != 'cpu' and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device) if device.startswith('cuda:') else None)
    from ..bench import _cpu_name
    return _cpu_name()


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def train_cell(cell: Cell, recipe: str, keep_checkpoints: bool = False) -> Dict[str, Any]:
    """Train one cell and write its ``result.json``; a divergence is a result, not an error.

    Returns the result: status ('finished' | 'diverged'), per-epoch history (train loss, val loss,
    val top-1), final and best val top-1, the epoch of the first non-finite loss, CPU and wall
    seconds of this process."""
    from ..engine.nonfinite import NonFiniteError
    t0, c0 = time.time(), _cpu_seconds()
    status, message, diverged_epoch = 'finished', '', None
    try:
        with _single_process():
            history = _start_training(cell.config, recipe)
    except NonFiniteError as e:
        # the trainer stops before the weights change; metrics.json holds the finished epochs
        history = _read_history(cell.folder)
        status, message, diverged_epoch = 'diverged', str(e), len(history) + 1
    keep = ('epoch', 'train_loss', 'train_top1', 'val_loss', 'val_top1', 'grad_norm', 'lr')
    rows = [{k: r.get(k) for k in keep} for r in history]
    tops = [r['val_top1'] for r in rows if r.get('val_top1') is not None]
    result = dict(
        format=RESULT_FORMAT, key=cell.key, row=cell.row, family=cell.family, seed=cell.seed,
        model=cell.config.model, model_kwargs=dict(cell.config.model_kwargs), epochs=cell.config.total_epochs,
        status=status, diverged_epoch=diverged_epoch, message=message,
        final_top1=tops[-1] if tops and status == 'finished' else None,
        last_top1=tops[-1] if tops else None, best_top1=max(tops) if tops else None,
        history=rows, cpu_s=round(_cpu_seconds() - c0, 2), wall_s=round(time.time() - t0, 2),
        threads=cell.config.threads, device=_device_name(cell.config.device))
    atomic_write(cell.folder / RESULT_FILE, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + '\n'))
    if not keep_checkpoints:
        for name in _RESUME_FILES:
            (cell.folder / name).unlink(missing_ok=True)
    return result


def _worker_init() -> None:
    # a worker process never needs more than the threads its cells ask for (set by the trainer)
    import torch
    torch.set_num_interop_threads(1)


# --------------------------------------------------------------------------------------------
# many cells
# --------------------------------------------------------------------------------------------

def _fmt_time(s: float) -> str:
    s = max(0, int(round(s)))
    return f'{s // 3600}h{s % 3600 // 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


class Progress:
    """One line per finished cell, with the count over the whole study and an ETA."""

    def __init__(self, total: int, done: int, todo: int, jobs: int, echo: Callable[[str], None] = print):
        self.total, self.done, self.todo, self.jobs, self.echo = total, done, todo, jobs, echo
        self.start = time.time()
        self.finished_here = 0
        self.width = len(str(total))

    def cell_done(self, cell: Cell, res: Dict[str, Any]) -> None:
        self.done += 1
        self.finished_here += 1
        elapsed = time.time() - self.start
        left = self.todo - self.finished_here
        eta = elapsed / self.finished_here * left if left else 0.0
        if res['status'] == 'diverged':
            what = f'diverged at epoch {res["diverged_epoch"]}'
        else:
            what = f'top-1 {res["final_top1"]:6.2f}%'
        self.echo(f'[{self.done:>{self.width}}/{self.total}] {cell.row:<24} seed {cell.seed}  {what}  '
                  f'({res["wall_s"]:.0f} s, {res["cpu_s"]:.0f} CPU-s)' + (f'  ETA {_fmt_time(eta)}' if left else ''))


def run_cells(cells: Sequence[Cell], recipe: str, jobs: int = 1, threads: int = 1, keep_checkpoints: bool = False,
              progress: Optional[Progress] = None) -> Dict[str, Dict[str, Any]]:
    """Train ``cells`` (``jobs`` at a time, ``threads`` torch threads each); returns key → result."""
    cells = [dataclasses.replace(c, config=dataclasses.replace(c.config, threads=threads)) for c in cells]
    results: Dict[str, Dict[str, Any]] = {}
    if not cells:
        return results
    if jobs <= 1:
        for cell in cells:
            res = train_cell(cell, recipe, keep_checkpoints)
            results[cell.key] = res
            if progress:
                progress.cell_done(cell, res)
        return results
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    ctx = multiprocessing.get_context('spawn')   # no fork of a process that holds torch threads
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init) as pool:
        pending = {pool.submit(train_cell, c, recipe, keep_checkpoints): c for c in cells}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    cell = pending.pop(fut)
                    res = fut.result()
                    results[cell.key] = res
                    if progress:
                        progress.cell_done(cell, res)
        except BaseException:
            # an error in one cell (bad data, out of memory) or Ctrl-C stops the study: the finished cells
            # keep their results and a re-run resumes the others from their last epoch
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results


def distributed_share(cells: Sequence[Cell]) -> Tuple[List[Cell], int, int]:
    """(this rank's cells, rank, world size): every WORLD_SIZE-th cell under torchrun."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f'bad torchrun environment: RANK={rank} WORLD_SIZE={world}')
    return list(cells[rank::world]), rank, world


def wait_for_results(cells: Sequence[Cell], poll_s: float = 2.0, echo: Callable[[str], None] = print,
                     timeout_s: Optional[float] = None) -> Dict[str, Dict[str, Any]]:
    """Rank 0 under torchrun: wait until every cell has a result (the other ranks write them)."""
    start, last_count = time.time(), -1
    while True:
        found = {c.key: r for c in cells if (r := load_result(c)) is not None}
        if len(found) == len(cells):
            return found
        if len(found) != last_count:
            echo(f'waiting for the other ranks: {len(found)}/{len(cells)} cells have a result')
            last_count = len(found)
        if timeout_s is not None and time.time() - start > timeout_s:
            raise TimeoutError(f'{len(cells) - len(found)} cells still have no result after {timeout_s:.0f} s')
        time.sleep(poll_s)


def default_jobs(device: str, cells: int) -> int:
    """All usable cores, one thread each, on a CPU (these models are too small to use several threads
    well); one cell at a time on a GPU."""
    import torch
    on_gpu = device.startswith('cuda') or (device == 'auto' and torch.cuda.is_available())
    if on_gpu:
        return 1
    return max(1, min(usable_cores(), cells))
