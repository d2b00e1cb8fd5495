"""``polynext ablate`` as a library: plan a study, check it, run it, report it.

    plan = make_plan(rows=['hadamard_to_add', 'layerscale_1'], seeds=3)   # + baselines added
    check_plan(plan)                 # every model builds, the data is there: before anything is written
    report = run_ablation(plan)      # trains the missing cells, writes the report, returns it (rank 0)
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..checkpoint import atomic_write
from ..errors import ConfigError
from .report import format_table, summarise, write_report
from .rows import select_rows
from .runner import (
    DEFAULT_OUTPUT, AblationPlan, Progress, default_jobs, distributed_share, load_result, model_kwargs_for, run_cells,
    usable_cores, wait_for_results,
)

__all__ = ['DEFAULT_RECIPE', 'make_plan', 'check_plan', 'run_ablation', 'attention_twin']

#: the built-in study: CPolyNeXt-T / APolyNeXt-T at C0 = 16 on 64 px cluttered digits, 3 epochs
DEFAULT_RECIPE = 'cluttered_digits'


def attention_twin(model: str) -> Optional[str]:
    """'cpolynext_s' → 'apolynext_s' (the APolyNeXt of the same size), if it exists."""
    import timm
    from .. import models  # noqa: F401  (registers the models with timm)
    if model.startswith('cpolynext'):
        twin = 'a' + model[1:]
        return twin if timm.is_model(twin) else None
    return None


def make_plan(recipe: Optional[str] = None, rows: Optional[Sequence[str]] = None, seeds: int = 3,
              epochs: Optional[int] = None, data: Optional[str] = None, dataset: Optional[str] = None,
              model: Optional[str] = None, attn_model: Optional[str] = None, init_channels: Optional[int] = None,
              output: Optional[str] = None, set_items: Optional[List[str]] = None, device: Optional[str] = None,
              keep_checkpoints: bool = False) -> AblationPlan:
    """Resolve a study: the recipe with its overrides (order: recipe < ``--epochs/--data/--dataset/
    --device`` < ``--set``), the model of each family, the rows (with the baselines they need) and
    the seeds 0 … seeds−1."""
    from ..factory import check_model_name
    from ..train.recipes import PRESETS
    if seeds < 1:
        raise ConfigError(f'--seeds must be at least 1, got {seeds}')
    if init_channels is not None and init_channels < 0:
        raise ConfigError(f'--init-channels must be positive (or 0 for the model\'s own width), got {init_channels}')
    flags: Dict[str, Any] = dict(epochs=epochs, data=data, dataset=dataset, device=device)
    name, base = PRESETS.resolve(recipe or DEFAULT_RECIPE, None, flags, set_items or [])
    selected = select_rows(rows)
    families = {r.family for r in selected}
    conv = check_model_name(model) if model else base.model
    models = {'conv': conv}
    if 'attn' in families:
        attn = check_model_name(attn_model) if attn_model else attention_twin(conv)
        if attn is None:
            raise ConfigError(f"'{conv}' has no APolyNeXt twin for the attention rows; pass --attn-model "
                              f"(e.g. apolynext_t), or choose rows without them with --rows")
        models['attn'] = attn
    return AblationPlan(recipe=name, base=base, models=models, rows=selected, seeds=list(range(seeds)),
                        output=Path(output or DEFAULT_OUTPUT), init_channels=init_channels,
                        keep_checkpoints=keep_checkpoints)


def _num_classes(plan: AblationPlan) -> int:
    """Classes of the study's data; image folders and datasets on disk are opened (and checked) here."""
    cfg = plan.base
    if cfg.num_classes:
        return int(cfg.num_classes)
    if cfg.dataset in ('cluttered_digits', 'digits'):
        return 10
    from ..train.data import build_data
    return build_data(cfg).num_classes


def check_plan(plan: AblationPlan) -> int:
    """Build every row's model once (bad switches or widths fail here with the row named) and open
    the data; fills ``plan.params`` and returns the number of classes. Writes nothing."""
    from ..factory import create_model
    k = _num_classes(plan)
    for row in plan.rows:
        kwargs = model_kwargs_for(plan, row)
        try:
            m = create_model(plan.models[row.family], num_classes=k, **kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"row '{row.name}' cannot be built as {plan.models[row.family]}({kwargs}): "
                              f"{str(e).splitlines()[0]}") from None
        plan.params[row.name] = sum(p.numel() for p in m.parameters())
    return k


def _data_text(plan: AblationPlan) -> str:
    cfg = plan.base
    if cfg.dataset == 'cluttered_digits':
        return (f'generated cluttered digits, {cfg.img_size} px, {cfg.cluttered_train} train / '
                f'{cfg.cluttered_val} val')
    return f'{cfg.dataset} {cfg.data or ""} at {cfg.img_size} px'.replace('  ', ' ')


def _settings(plan: AblationPlan) -> Dict[str, Any]:
    width = plan.init_channels if plan.init_channels else plan.base.model_kwargs.get('init_channels')
    return dict(recipe=plan.recipe, epochs=plan.base.total_epochs, init_channels=width, data=_data_text(plan),
                rows=[r.name for r in plan.rows], seeds=plan.seeds, models=plan.models,
                lr=plan.base.lr, batch_size=plan.base.batch_size, optimizer=plan.base.optimizer)


def run_ablation(plan: AblationPlan, jobs: Optional[int] = None, echo: Callable[[str], None] = print,
                 num_classes: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """Train every cell that has no result yet and write the report; returns it (``None`` on the
    ranks other than 0 under torchrun, which only train their share)."""
    if num_classes is None:
        num_classes = check_plan(plan)
    cells = plan.cells()
    mine, rank, world = distributed_share(cells)
    prefix = f'[rank {rank}] ' if world > 1 else ''
    say = (lambda m: echo(prefix + m)) if prefix else echo
    finished = {c.key for c in cells if load_result(c) is not None}
    todo = [c for c in mine if c.key not in finished]
    if jobs is None:
        jobs = default_jobs(plan.base.device, len(todo))
    if jobs < 1:
        raise ConfigError(f'--jobs must be at least 1, got {jobs}')
    jobs = max(1, min(jobs, len(todo) or 1))
    threads = max(1, usable_cores() // jobs)
    if rank == 0:
        atomic_write(plan.output / 'plan.json', lambda tmp: Path(tmp).write_text(json.dumps(dict(
            _settings(plan), cells=[dict(row=c.row, seed=c.seed, key=c.key, folder=str(c.folder)) for c in cells]),
            indent=1) + '\n'))
    say(f'polynext ablate: {len(plan.rows)} rows × {len(plan.seeds)} seeds = {len(cells)} cells '
        f'({len(finished)} already finished) | recipe {plan.recipe}, {plan.base.total_epochs} epochs, '
        f'{", ".join(plan.models.values())} | {len(todo)} to train here: {jobs} at a time × {threads} thread(s) '
        f'| {plan.output}')
    start = time.time()
    progress = Progress(len(cells), len(finished), len(todo), jobs, echo=say)
    run_cells(todo, plan.recipe, jobs=jobs, threads=threads, keep_checkpoints=plan.keep_checkpoints,
              progress=progress)
    if rank != 0:
        return None
    if world > 1:
        wait_for_results(cells, echo=say)
    results = {}
    for c in cells:
        res = load_result(c)
        if res is None:
            raise RuntimeError(f'cell {c.label} has no result in {c.folder}')
        results[(c.row, c.seed)] = res
    n = len(results)
    settings = dict(_settings(plan), wall_s_this_invocation=round(time.time() - start, 1),
                    cells_trained_this_invocation=len(todo),
                    cpu_s_all_cells=round(sum(r['cpu_s'] for r in results.values()), 1),
                    cpu_s_per_cell=round(sum(r['cpu_s'] for r in results.values()) / n, 1),
                    wall_s_per_cell=round(sum(r['wall_s'] for r in results.values()) / n, 1),
                    cell_threads=sorted({r.get('threads') for r in results.values()}, key=str),
                    devices=sorted({r['device'] for r in results.values() if r.get('device')}),
                    jobs=jobs, threads=threads, world_size=world)
    report = summarise(plan.rows, results, plan.seeds, num_classes, plan.models, plan.params, settings)
    paths = write_report(report, plan.output)
    echo('\n' + format_table(report))
    echo(f'report: {", ".join(str(p) for p in paths.values())}')
    return report
