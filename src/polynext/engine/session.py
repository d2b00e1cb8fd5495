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
  ``.csv`` and the learning curve;
* the run's non-finite policy on the step (``NonFinitePolicy.of(config)``) and ``recovery_hint()``,
  the command that recovers from a non-finite loss (the one it names works: the tests run it);
* before anything is written, the free disk space for one checkpoint (rank 0 checks, every rank
  raises the same error).

Changed settings on resume. ``plan_run`` lets a resumed run change the task's resume-safe keys
(where and how it runs) and the optimisation settings (``lr``, ``clip_grad``, ...: the way out of
a diverged run). ``restore`` applies them on top of the saved state: the learning rate of every
parameter group is rescaled by new / old ``lr`` (the schedule's position is kept, its base values
are the new config's), weight decay comes from the new config; each change is logged, kept in the
state (``changes``: [{step, reason, changes: {key: [old, new]}}]) and listed in ``config.yaml``.

State fields (``torch.load(weights_only=True)``-loadable): ``format``, ``recipe``, ``config``,
``model``, ``ema_state``, ``ema_updates``, ``optimizer``, ``scheduler``, ``scaler``, ``global_step``,
``meters``, ``history``, ``best``, ``corrupt``, ``classes``, ``world_size``, ``rng``, ``versions``,
``changes`` and the task's own fields.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from ..errors import CheckpointError
from ..outputs import OutputError, free_space_problem
from .config import config_diff, config_to_dict
from .data import CorruptImages
from .determinism import capture_rng_state, restore_rng_state
from .distributed import DistEnv, all_gather_objects, broadcast_object
from .nonfinite import NonFinitePolicy
from .run import CurvePanel, RunFolder, command_prefix
from .step import TrainStep

__all__ = ['Session', 'checkpoint_bytes']

#: a torch LR scheduler's position in its state dict (kept on resume; the rest follows the new config)
_SCHEDULER_POSITION = ('last_epoch', '_step_count')


def checkpoint_bytes(step: TrainStep) -> int:
    """About the bytes of one checkpoint: the state file (weights, EMA, two optimizer moments per parameter as
    Adam-family optimizers keep) and the weights files (weights, EMA)."""
    model = sum(t.numel() * t.element_size() for t in step.module.state_dict().values())
    params = sum(p.numel() * p.element_size() for p in step.params)
    ema = model if step.ema is not None else 0
    return (model + ema + 2 * params) + (model + ema)


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
        self.changes: List[Dict[str, Any]] = []          # settings changed on resume / rollback
        self.saved_at: Optional[int] = None             # optimizer step of the last checkpoint on disk
        step.nonfinite = NonFinitePolicy.of(config)
        step.resume_hint = self.recovery_hint
        step.log = run.log
        self._check_room()

    @property
    def command(self) -> str:
        """The task's training command, as the user types it (``torchrun ... -m polynext ...`` under DDP)."""
        return command_prefix(getattr(type(self.config), 'COMMAND', 'polynext train'), self.env.world_size)

    def _check_room(self) -> None:
        """An ``OutputError`` on every rank when the run folder's disk cannot hold one checkpoint (checked by
        rank 0, which writes, before the run writes anything)."""
        problem = free_space_problem(self.run.path, checkpoint_bytes(self.step)) if self.env.is_main else None
        problem = broadcast_object(problem)
        if problem:
            raise OutputError(f'not enough disk space for the run folder {self.run.path}: {problem}; free some space '
                              f'or pass --output a folder on another disk')

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
            'versions': dict(torch=str(torch.__version__)), 'changes': [dict(c) for c in self.changes],
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
        this rank's RNG states from ``state`` (weights strictly; call before ``TrainStep.distribute``); settings
        that differ from the state's config are applied and recorded (see the module doc)."""
        from ..checkpoint import load_state_dict_strict
        step = self.step
        changed = {k: [old, new] for k, old, new in config_diff(state.get('config') or {}, config_to_dict(self.config))}
        fresh_groups = [{k: v for k, v in g.items() if k != 'params'} for g in step.optimizer.param_groups]
        fresh_scheduler = self.scheduler.state_dict() if self.scheduler is not None else None
        load_state_dict_strict(step.module, state['model'])
        if step.ema is not None:
            step.ema.restore(state.get('ema_state'), state.get('ema_updates', 0), step.module)
        step.optimizer.load_state_dict(state['optimizer'])
        if self.scheduler is not None and state.get('scheduler') is not None:
            saved = state['scheduler']
            if changed:   # the schedule's position from the state, its values from the new config
                saved = dict(fresh_scheduler, **{k: saved[k] for k in _SCHEDULER_POSITION if k in saved})
            self.scheduler.load_state_dict(saved)
        self._apply_optimizer_changes(changed, fresh_groups)
        step.precision.load_state_dict(state.get('scaler'))
        step.global_step = int(state['global_step'])
        self.saved_at = step.global_step
        step.meters.load_state_dict(state.get('meters'))
        self.history = list(state.get('history') or [])
        self.best = dict(state.get('best') or self.best)
        self.changes = [dict(c) for c in state.get('changes') or []]
        for split, names in (state.get('corrupt') or {}).items():
            if split in self.corrupt:
                self.corrupt[split].names = list(names)
        rng = state.get('rng') or []
        if int(state.get('world_size', 1)) != self.env.world_size:
            self.run.log(f'note: resumed on {self.env.world_size} device(s) but the checkpoint was written on '
                         f'{state.get("world_size")}; data order and random streams differ from the original run')
        elif self.env.rank < len(rng):
            restore_rng_state(rng[self.env.rank])
        for note in state.get('resume_notes') or []:
            self.run.log(f'note: {note}')
        if changed:
            reason = str(state.get('resume_reason') or '--resume')
            self.changes.append(dict(step=step.global_step, reason=reason, changes=changed))
            self.run.log(f'changed at optimizer step {step.global_step} ({reason}): ' + _describe(changed))

    def _apply_optimizer_changes(self, changed: Mapping[str, List[Any]], fresh_groups: List[Dict[str, Any]]) -> None:
        """The new config's ``lr`` (every group's lr rescaled by new / old: the schedule's position and the groups'
        multipliers stay) and ``weight_decay`` (the freshly built groups') on the restored optimizer."""
        groups = self.step.optimizer.param_groups
        if 'lr' in changed:
            old, new = (float(v) for v in changed['lr'])
            for g, fresh in zip(groups, fresh_groups):
                for key in ('lr', 'initial_lr'):
                    if key in g:
                        g[key] = g[key] * new / old if old > 0 else fresh.get(key, g[key])
        if 'weight_decay' in changed:
            for g, fresh in zip(groups, fresh_groups):
                if 'weight_decay' in fresh:
                    g['weight_decay'] = fresh['weight_decay']

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
        if tag == 'last':
            self.saved_at = self.step.global_step

    def copy_to_best(self) -> None:
        """``last`` (state, weights, EMA weights) copied to ``best``."""
        ema = self.step.ema
        self.run.copy_checkpoint('last', 'best', extra=('ema',) if ema is not None and ema.started else ())

    def write_config(self, command: str, source: Optional[str] = None) -> None:
        """``config.yaml``: the resolved config, with the recipe's source and the command that repeats the run."""
        header = (f'# {command}: recipe {self.recipe}' + (f' ({source})' if source else '') +
                  f'\n# resolved config; repeat with: {command} --config {self.run.path / RunFolder.CONFIG}')
        for c in self.changes:
            header += f'\n# changed at optimizer step {c["step"]} ({c["reason"]}): {_describe(c["changes"])}'
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

    def recovery_hint(self) -> str:
        """The way out of a non-finite loss, appended to its error: the command that resumes from the last good
        checkpoint with a tenth of the learning rate (and a gradient clip at 1 when the run clips looser or not
        at all), or, before any checkpoint, the one that starts again so."""
        cfg = self.config
        lower = f'--set lr={cfg.lr / 10:.3g}'
        if cfg.clip_grad is None or cfg.clip_grad > 1:
            lower += ' --set clip_grad=1'
        if self.saved_at is not None or self.run.has_state('last'):
            at = f' (optimizer step {self.saved_at})' if self.saved_at is not None else ''
            auto = '' if self.step.nonfinite.action == 'rollback' else (
                ', or run with --on-nonfinite rollback to do this automatically')
            return (f'Resume from the last good checkpoint{at} with a lower learning rate: `{self.command} --resume '
                    f'{self.run.path} {lower}`{auto}.')
        return (f'No checkpoint was written yet; start again with a lower learning rate: `{self.command} --config '
                f'{self.run.path / RunFolder.CONFIG} {lower}`.')


def _describe(changes: Mapping[str, Any]) -> str:
    """'lr 0.01 → 0.001, clip_grad 5.0 → 1.0'."""
    return ', '.join(f'{k} {old!r} → {new!r}' for k, (old, new) in changes.items())
