"""The state every training task shares, saved atomically and restored exactly.

A task builds its model, optimizer, scheduler and data, then hands the task-independent parts to a
``Session``. The session owns:

* ``step``: the ``TrainStep`` (model, optimizer, precision and scaler, EMA, meters, global step);
* ``scheduler``: anything with ``state_dict`` / ``load_state_dict`` (or ``None``);
* ``history`` (the metric rows), ``best`` (the best result so far), ``corrupt`` (one
  ``CorruptImages`` per split);
* ``state_dict(**task_fields)`` / ``restore(state)``: the common state fields, plus whatever
  counters the task adds (classification: epoch and batch in the epoch; segmentation: none, its
  iteration is the global step), with every rank's RNG states;
* ``save(tag, metadata)``: a collective; rank 0 writes ``{tag}.state.pt`` then
  ``{tag}.safetensors`` (and ``{tag}_ema.safetensors`` once the EMA has started), atomically;
* ``add_row(row, key)`` / ``write_metrics(...)``: the metric rows, written to ``metrics.json`` /
  ``.csv`` and the learning curve.

State fields (``torch.load(weights_only=True)``-loadable): ``format``, ``recipe``, ``config``,
``model``, ``ema_state``, ``ema_updates``, ``optimizer``, ``scheduler``, ``scaler``, ``global_step``,
``meters``, ``history``, ``best``, ``corrupt``, ``classes``, ``world_size``, ``rng``, ``versions``
and the task's own fields.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from ..errors import CheckpointError
from .config import config_to_dict
from .data import CorruptImages
from .determinism import capture_rng_state, restore_rng_state
from .distributed import DistEnv, all_gather_objects
from .run import CurvePanel, RunFolder
from .step import TrainStep

__all__ = ['Session']


class Session:
    """Common state of one training process (see the module doc)."""

    def __init__(self, *, state_format: str, recipe: str, config: Any, env: DistEnv, run: RunFolder, step: TrainStep,
                 scheduler: Any = None, classes: Sequence[str] = (), corrupt: Optional[Dict[str, CorruptImages]] = None,
                 best: Optional[Dict[str, Any]] = None):
        self.state_format = state_format
        self.recipe = recipe
        self.config = config
        self.env = env
        self.run = run
        self.step = step
        self.scheduler = scheduler
        self.classes = list(classes)
        self.corrupt = dict(corrupt or {})
        self.history: List[Dict[str, Any]] = []
        self.best: Dict[str, Any] = dict(best or {})

    # ---- state ----------------------------------------------------------------------
    def state_dict(self, rng_states: List[Any], **task_fields: Any) -> Dict[str, Any]:
        step, ema = self.step, self.step.ema
        return {
            'format': self.state_format, 'recipe': self.recipe, 'config': config_to_dict(self.config),
            **task_fields,
            'global_step': step.global_step,
            'model': step.module.state_dict(),
            # not named 'ema': checkpoint readers would take a never-updated EMA for the weights
            'ema_state': ema.module.state_dict() if ema is not None else None,
            'ema_updates': ema.updates if ema is not None else 0,
            'optimizer': step.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict() if self.scheduler is not None else None,
            'scaler': step.precision.state_dict(),
            'meters': step.meters.state_dict(), 'history': list(self.history), 'best': dict(self.best),
            'corrupt': {split: list(c.names) for split, c in self.corrupt.items()},
            'classes': list(self.classes), 'world_size': self.env.world_size, 'rng': rng_states,
            'versions': dict(torch=str(torch.__version__)),
        }

    def check_classes(self, saved: Sequence[str], data_description: str) -> None:
        """A ``CheckpointError`` naming the first difference when a checkpoint's classes are not the data's."""
        saved, now = list(saved or []), self.classes
        if not saved or saved == now:
            return
        first = next((i for i, (a, b) in enumerate(zip(saved, now)) if a != b), min(len(saved), len(now)))
        raise CheckpointError(
            f'the checkpoint was trained on {len(saved)} classes but {data_description} has {len(now)}; they first '
            f'differ at class {first} ({saved[first] if first < len(saved) else "-"} vs '
            f'{now[first] if first < len(now) else "-"})')

    def restore(self, state: Mapping[str, Any]) -> None:
        """Model, EMA, optimizer, scheduler, scaler, counters, meters, history, best, unreadable images and
        this rank's RNG states from ``state`` (weights strictly; call before ``TrainStep.distribute``)."""
        from ..checkpoint import load_state_dict_strict
        step = self.step
        load_state_dict_strict(step.module, state['model'])
        if step.ema is not None:
            step.ema.restore(state.get('ema_state'), state.get('ema_updates', 0), step.module)
        step.optimizer.load_state_dict(state['optimizer'])
        if self.scheduler is not None and state.get('scheduler') is not None:
            self.scheduler.load_state_dict(state['scheduler'])
        step.precision.load_state_dict(state.get('scaler'))
        step.global_step = int(state['global_step'])
        step.meters.load_state_dict(state.get('meters'))
        self.history = list(state.get('history') or [])
        self.best = dict(state.get('best') or self.best)
        for split, names in (state.get('corrupt') or {}).items():
            if split in self.corrupt:
                self.corrupt[split].names = list(names)
        rng = state.get('rng') or []
        if int(state.get('world_size', 1)) != self.env.world_size:
            self.run.log(f'note: resumed on {self.env.world_size} device(s) but the checkpoint was written on '
                         f'{state.get("world_size")}; data order and random streams differ from the original run')
        elif self.env.rank < len(rng):
            restore_rng_state(rng[self.env.rank])

    def save(self, tag: str, metadata: Mapping[str, Any], unreadable: Optional[Mapping[str, List[int]]] = None,
             **task_fields: Any) -> None:
        """Checkpoint ``tag`` (a collective: every rank contributes its RNG states; rank 0 writes). ``unreadable``:
        {split: indices this rank skipped since the last report}, reported (and limit-checked) first."""
        for split, indices in (unreadable or {}).items():
            self.corrupt[split].add(indices)
        rng_states = all_gather_objects(capture_rng_state())
        if not self.env.is_main:
            return
        ema = self.step.ema
        extra = {'ema': ema.module.state_dict()} if ema is not None and ema.started else None
        self.run.save_checkpoint(tag, self.state_dict(rng_states, **task_fields), self.step.module.state_dict(),
                                 metadata=metadata, extra_weights=extra)

    def copy_to_best(self) -> None:
        """``last`` (state, weights, EMA weights) copied to ``best``."""
        ema = self.step.ema
        self.run.copy_checkpoint('last', 'best', extra=('ema',) if ema is not None and ema.started else ())

    def write_config(self, command: str, source: Optional[str] = None) -> None:
        """``config.yaml``: the resolved config, with the recipe's source and the command that repeats the run."""
        header = (f'# {command}: recipe {self.recipe}' + (f' ({source})' if source else '') +
                  f'\n# resolved config; repeat with: {command} --config {self.run.path / RunFolder.CONFIG}')
        self.run.write_config(dict(recipe=self.recipe, **config_to_dict(self.config)), header=header)

    # ---- metrics ----------------------------------------------------------------------
    def add_row(self, row: Dict[str, Any], key: str) -> Dict[str, Any]:
        """Add a metric row to the history, merged into the last row when both have the same ``key`` value (an
        evaluation row at the iteration of a training row); returns the stored row."""
        if self.history and self.history[-1].get(key) == row.get(key):
            self.history[-1].update(row)
            return self.history[-1]
        self.history.append(row)
        return row

    def write_metrics(self, key: str, panels: Sequence[CurvePanel] = (), title: str = '') -> None:
        """Rewrite ``metrics.json`` / ``.csv`` from the whole history and, with ``panels``, the learning curve
        against ``key`` (rank 0 only)."""
        self.run.write_metrics(self.history)
        if panels:
            self.run.plot_curves(self.history, panels, x_key=key, title=title)

    def resume_hint(self, command: str, lr: float) -> Callable[[], str]:
        """The advice appended to a non-finite error: the resume command once a checkpoint exists."""
        def hint() -> str:
            last = self.run.state_path('last')
            if last.exists() or self.env.world_size > 1:
                return (f'Resume from the last good checkpoint with `{command} --resume {last}` (a lower lr, e.g. '
                        f'--set lr={lr / 2:g}, or --set clip_grad=1 can help).')
            return f'No checkpoint was written yet; restart with a lower lr (e.g. --set lr={lr / 2:g}).'
        return hint
