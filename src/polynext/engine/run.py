"""The run folder: resolved config, metrics, learning curve, log and atomic checkpoints.

Layout (every file written by rank 0 only, each write atomic: temp file + fsync + rename)::

    RUN/config.yaml            the resolved config (pass it back with --config to repeat the run)
    RUN/metrics.csv, .json     one row per epoch (rewritten from the full history each epoch,
                               so a resumed run never duplicates or loses a row)
    RUN/learning_curve.png     loss and accuracy against epoch
    RUN/log.txt                what was printed
    RUN/last.safetensors       weights (+ last_ema.safetensors when an EMA exists)
    RUN/last.state.pt          everything needed to resume (model, optimizer, scheduler, EMA,
                               scaler, epoch, step, sampler position, every rank's RNG states)
    RUN/best.safetensors, best.state.pt   the same at the best validation epoch

A checkpoint's state file is written before its weights file and holds the weights too, so
whatever moment a run is killed at, ``last.state.pt`` is a complete, consistent checkpoint.

Nothing is written before the run has checked its inputs: the folder is created by the first write
(``config.yaml``, when training starts), log lines printed before that are kept and written then,
and the output path was checked by ``plan_run`` (a folder, writable) and the free disk space by the
``Session`` (room for one checkpoint). A write that fails (disk full, read-only) is one error line
naming the file, the cause and the command that resumes once it is fixed; the previous checkpoint
stays as it was. Temporary files of a write that was killed before its rename are removed when the
run folder is next opened, and the log says so.

Starting a run, the same for every task:

* ``plan_run(cfg, recipe, ...)`` decides the run folder and whether to resume: ``--resume PATH``
  (the saved config is the base; the task's resume-safe keys, such as ``data`` or ``workers``,
  and the optimisation settings ``TUNABLE_ON_RESUME`` (``lr``, ``clip_grad``, ...) may change,
  anything else is refused with the list of what may), or the folder's own ``last.state.pt`` when
  the same command runs again (a different config there is refused with the ways out), or a fresh
  start. An unreadable ``last.state.pt`` falls back to the folder's other good state
  (``best.state.pt``), and says so.
* ``start_run(path, env, cfg)``: the batch layout, the run folder and the backend of a process.
* ``launch(plan, train, progress, best)`` starts the process group (``torchrun``), says so and
  returns when the plan's run is already finished, else runs ``train(env, plan)``; under
  ``on_nonfinite=rollback`` a non-finite loss re-plans from the last good checkpoint with a lower
  ``lr`` and trains again (at most ``nonfinite_limit`` times); Ctrl-C ends with the command that
  resumes; the group is destroyed however it ends.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import dataclasses
from dataclasses import dataclass

import torch

from ..checkpoint import atomic_write, read_checkpoint, remove_stale_temporary_files, save_safetensors
from ..errors import CheckpointError, ConfigError, PolyNeXtError
from ..outputs import WRITE_ERRNOS, check_output_folder, format_bytes, write_failure
from .config import apply_overrides, config_diff, config_to_dict
from .metrics import csv_text
from .nonfinite import NonFiniteError, assert_finite_state

__all__ = ['RunFolder', 'load_training_state', 'load_resumable_state', 'CurvePanel', 'RunPlan', 'plan_run',
           'start_run', 'launch', 'default_output', 'command_prefix', 'Interrupted', 'LAST_STATE',
           'TUNABLE_ON_RESUME']

#: the resumable checkpoint of a run folder
LAST_STATE = 'last.state.pt'
#: the other states of a run folder, tried in this order when ``last.state.pt`` cannot be read
FALLBACK_STATES = ('best.state.pt',)
#: optimisation settings that a resumed run may change, for every task (the way out of a diverged run); the
#: engine applies them on restore (``Session.restore``). A task adds its own (segmentation: ``cell_grad_clip``).
TUNABLE_ON_RESUME = ('lr', 'min_lr', 'weight_decay', 'clip_grad', 'on_nonfinite', 'nonfinite_limit',
                     'rollback_lr_factor')


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``str()`` is what to do next (the command that resumes)."""


def command_prefix(command: str, world_size: int = 1) -> str:
    """``command`` as the user starts it: ``polynext train``, or ``torchrun --nproc_per_node=N -m polynext train``."""
    if world_size > 1 and command.startswith('polynext '):
        return f'torchrun --nproc_per_node={world_size} -m {command}'
    return command

#: (panel title, y label, [(metric key, legend label), ...])
CurvePanel = Tuple[str, str, Sequence[Tuple[str, str]]]


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, (Path, torch.device)):
        return str(o)
    if torch.is_tensor(o):
        return o.tolist()
    raise TypeError(f'not JSON serialisable: {type(o).__name__}')


def load_training_state(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a ``*.state.pt`` training-state file (tensors and plain containers only); a folder means its
    ``last.state.pt``."""
    path = Path(path)
    if path.is_dir():
        path = path / LAST_STATE
        if not path.exists():
            raise CheckpointError(f'no {LAST_STATE} in {path.parent}; nothing to resume from')
    state = read_checkpoint(path)
    if not isinstance(state, dict) or 'format' not in state or 'model' not in state:
        raise CheckpointError(f'{path} is not a polynext training-state file (*.state.pt); for weights only, '
                              f'use it as an initial checkpoint instead of --resume')
    return state


def load_resumable_state(path: Union[str, Path]) -> Tuple[Dict[str, Any], Path, Optional[str]]:
    """(state, file, note) of a run folder or state file to resume. An unreadable ``last.state.pt`` (truncated
    or corrupt) falls back to the folder's other good state (``best.state.pt``), which the note says; with none,
    one ``CheckpointError`` names the ways out (``--fresh``, ``--output``)."""
    path = Path(path)
    file = path / LAST_STATE if path.is_dir() else path
    try:
        return load_training_state(path), file, None
    except CheckpointError as e:
        if file.name != LAST_STATE or not file.exists():
            raise
        problem = str(e)
    for name in FALLBACK_STATES:
        other = file.parent / name
        if not other.is_file():
            continue
        try:
            state = load_training_state(other)
        except CheckpointError:
            continue
        return state, other, (f'{file} cannot be read (truncated or corrupt); resuming from the last good state '
                              f'{other} (optimizer step {state.get("global_step")}) instead')
    raise CheckpointError(f'{file} cannot be read (truncated or corrupt) and {file.parent} holds no other readable '
                          f'state ({", ".join(FALLBACK_STATES)}); start over with --fresh, or resume from a copy of '
                          f'the run with --resume PATH. ({problem.split("; ")[0]})')


class RunFolder:
    """Files of one training run (writes happen on the main process only)."""

    CONFIG = 'config.yaml'
    METRICS_CSV = 'metrics.csv'
    METRICS_JSON = 'metrics.json'
    CURVE = 'learning_curve.png'
    LOG = 'log.txt'

    def __init__(self, path: Union[str, Path], is_main: bool = True, quiet: bool = False,
                 command: str = 'polynext train'):
        self.path = Path(path)
        self.is_main = is_main
        self.quiet = quiet
        self.command = command          # the task's command, named in the fix of a failed write
        self.opened = False             # the folder exists and this process writes into it
        self._pending: List[str] = []   # log lines (stamped) printed before the folder existed

    def open(self) -> None:
        """Create the folder (the first write does: nothing exists before the run's checks passed), remove the
        temporary files of a write killed before its rename, and write the log lines kept until now."""
        if self.opened or not self.is_main:
            return
        with self.writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        self.opened = True
        removed = remove_stale_temporary_files(self.path)
        pending, self._pending = self._pending, []
        if pending:
            with self.writing(self.path / self.LOG), open(self.path / self.LOG, 'a') as f:
                f.writelines(pending)
        if removed:
            self.log(f'removed {len(removed)} temporary file(s) left by an interrupted write: ' +
                     ', '.join(f'{name} ({format_bytes(size)})' for name, size in removed))

    @contextlib.contextmanager
    def writing(self, target: Union[str, Path]):
        """An ``OSError`` of the file system (disk full, read-only, permission) while writing ``target`` becomes
        one error naming the cause and the way back: the previous checkpoint is intact, resume once fixed."""
        try:
            yield
        except OSError as e:
            if isinstance(e, PolyNeXtError) or e.errno not in WRITE_ERRNOS:
                raise
            last = self.state_path('last')
            if last.is_file():
                fix = (f'the previous checkpoint {last} is intact. ' +
                       ('Free some space' if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else
                        f'Make {self.path} writable') +
                       f' and resume with `{self.command} --resume {self.path}`, or resume into another folder '
                       f'with `{self.command} --resume {self.path} --output NEW_DIR`')
            else:
                fix = ('free some space' if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else
                       f'make {self.path} writable') + ' and run the command again, or pass --output another folder'
            raise write_failure(e, target, fix) from None

    # ---- paths -----------------------------------------------------------------------
    def weights_path(self, tag: str) -> Path:
        return self.path / f'{tag}.safetensors'

    def state_path(self, tag: str) -> Path:
        return self.path / f'{tag}.state.pt'     # 'last' → LAST_STATE

    def has_state(self, tag: str = 'last') -> bool:
        return self.state_path(tag).is_file()

    # ---- text ------------------------------------------------------------------------
    def log(self, message: str, console: bool = True) -> None:
        """Print (main process) and append to log.txt with a timestamp."""
        if not self.is_main:
            return
        if console and not self.quiet:
            print(message, flush=True)
        stamp = time.strftime('%Y-%m-%d %H:%M:%S')
        lines = [f'{stamp} {line}\n' for line in str(message).splitlines() or ['']]
        if not self.opened:
            self._pending += lines
            return
        with self.writing(self.path / self.LOG), open(self.path / self.LOG, 'a') as f:
            f.writelines(lines)

    def write_config(self, config: Mapping[str, Any], header: str = '') -> Optional[Path]:
        if not self.is_main:
            return None
        from .config import dump_yaml
        self.open()
        with self.writing(self.path / self.CONFIG):
            return dump_yaml(config, self.path / self.CONFIG, header=header)

    def write_metrics(self, history: List[Mapping[str, Any]]) -> None:
        """metrics.json (a list of rows) and metrics.csv (columns = union of the row keys)."""
        if not self.is_main:
            return
        history = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                   for row in history]     # JSON has no NaN / inf: written as null (an empty CSV cell)
        text = json.dumps(list(history), indent=1, default=_json_default, allow_nan=False)
        self.open()
        with self.writing(self.path / self.METRICS_JSON):
            atomic_write(self.path / self.METRICS_JSON, lambda tmp: Path(tmp).write_text(text + '\n'))
        table = csv_text(history)
        with self.writing(self.path / self.METRICS_CSV):
            atomic_write(self.path / self.METRICS_CSV, lambda tmp: Path(tmp).write_text(table))

    def plot_curves(self, history: List[Mapping[str, Any]], panels: Sequence[CurvePanel], x_key: str = 'epoch',
                    title: str = '') -> Optional[Path]:
        """learning_curve.png: one panel per (title, y label, series) with matplotlib's Agg backend."""
        if not self.is_main or not history:
            return None
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        fig = Figure(figsize=(5.2 * len(panels), 3.8), dpi=110)
        FigureCanvasAgg(fig)
        for i, (ptitle, ylabel, series) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            for key, label in series:
                pts = [(r[x_key], r[key]) for r in history if r.get(key) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker='o' if len(pts) < 40 else None, ms=3, label=label)
            ax.set_title(ptitle)
            ax.set_xlabel(x_key)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend()
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        out = self.path / self.CURVE
        self.open()
        with self.writing(out):
            atomic_write(out, lambda tmp: fig.savefig(tmp, format='png'))
        return out

    # ---- checkpoints -------------------------------------------------------------------
    def save_checkpoint(self, tag: str, state: Dict[str, Any], weights: Mapping[str, torch.Tensor],
                        metadata: Optional[Mapping[str, Any]] = None,
                        extra_weights: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None) -> None:
        """Write ``{tag}.state.pt`` then ``{tag}.safetensors`` (+ ``{tag}_{name}.safetensors`` for
        each entry of ``extra_weights``, e.g. the EMA). Refuses non-finite weights."""
        if not self.is_main:
            return
        assert_finite_state(weights, f'the {tag} checkpoint')
        for name, sd in (extra_weights or {}).items():
            assert_finite_state(sd, f'the {tag} checkpoint ({name})')
        self.open()
        with self.writing(self.state_path(tag)):
            atomic_write(self.state_path(tag), lambda tmp: torch.save(state, tmp))
        with self.writing(self.weights_path(tag)):
            save_safetensors(weights, self.weights_path(tag), metadata=dict(metadata or {}))
        for name, sd in (extra_weights or {}).items():
            with self.writing(self.weights_path(f'{tag}_{name}')):
                save_safetensors(sd, self.weights_path(f'{tag}_{name}'), metadata=dict(metadata or {}, weights=name))

    def copy_checkpoint(self, src: str, dst: str, extra: Iterable[str] = ()) -> None:
        """Copy checkpoint ``src`` to ``dst`` atomically (state, weights and extra weight files)."""
        if not self.is_main:
            return
        pairs = [(self.state_path(src), self.state_path(dst)), (self.weights_path(src), self.weights_path(dst))]
        pairs += [(self.weights_path(f'{src}_{n}'), self.weights_path(f'{dst}_{n}')) for n in extra]
        self.open()
        for a, b in pairs:
            if a.exists():
                with self.writing(b):
                    atomic_write(b, lambda tmp, a=a: shutil.copyfile(a, tmp))

    def write_weights(self, name: str, weights: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, Any]] = None) -> Optional[Path]:
        """A standalone safetensors file ``{name}.safetensors`` (e.g. the best EMA weights)."""
        if not self.is_main:
            return None
        assert_finite_state(weights, name)
        self.open()
        with self.writing(self.weights_path(name)):
            return save_safetensors(weights, self.weights_path(name), metadata=dict(metadata or {}))


def progress(iterable, total: Optional[int] = None, desc: str = '', enabled: bool = True, **kw):
    """A tqdm bar on the main process (hidden when stderr is not a terminal); a disabled one (a plain pass over
    the iterable, whose ``set_postfix`` / ``close`` do nothing) when not ``enabled``."""
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr,
                disable=None if enabled else True, **kw)


# ---------------------------------------------------------------------------------------
# Starting a run
# ---------------------------------------------------------------------------------------

def default_output(recipe: str) -> str:
    """The run folder of a recipe when ``--output`` is not given."""
    return str(Path('runs') / recipe)


@dataclass
class RunPlan:
    """What ``plan_run`` decided: the config to run, the recipe, the run folder, the state to resume and the
    command that trains it (named in messages)."""
    config: Any
    recipe: str
    path: Path
    state: Optional[Dict[str, Any]] = None
    command: str = 'polynext train'


def _resume_refusal(key: str, saved: Any, asked: Any, resume_safe_keys: Sequence[str],
                    tunable_keys: Sequence[str]) -> ConfigError:
    safe = [k for k in resume_safe_keys if k not in tunable_keys]
    return ConfigError(
        f"cannot change '{key}' when resuming ({saved!r} in the checkpoint, {asked!r} asked for): it would change "
        f"what the run trains. A resumed run may change {', '.join(tunable_keys)} (optimisation) and "
        f"{', '.join(safe)} (where and how it runs); for anything else start a new run with --output DIR")


def plan_run(cfg: Any, recipe: str, *, state_format: str, resume_safe_keys: Sequence[str], command: str,
             resume: Optional[Union[str, Path]] = None, fresh: bool = False,
             explicit: Optional[Mapping[str, Any]] = None,
             tunable_keys: Sequence[str] = TUNABLE_ON_RESUME) -> RunPlan:
    """Decide the run folder and whether to resume (see the module doc); the run folder is checked (a folder,
    writable) and nothing is created.

    ``explicit``: the config keys the user set on the command line, with their values (on ``--resume``
    these alone are compared with the saved config); ``resume_safe_keys`` (where and how the run runs) and
    ``tunable_keys`` (optimisation settings) may change on ``--resume``; ``command`` names the task's
    command in messages."""
    explicit = dict(explicit or {})
    tunable_keys = tuple(k for k in tunable_keys if k in {f.name for f in dataclasses.fields(cfg)})
    allowed = tuple(resume_safe_keys) + tunable_keys
    if resume:
        state, file, note = load_resumable_state(resume)
        if state.get('format') != state_format:
            raise CheckpointError(f'{file} is a {state.get("format")!r} training state, not {state_format!r}: '
                                  f'resume it with the command that wrote it, not `{command}`')
        saved = apply_overrides(type(cfg)(), state['config'], source=str(file))
        bad = [k for k, v in explicit.items() if k not in allowed and config_diff({k: v}, {k: getattr(saved, k)})]
        if bad:
            raise _resume_refusal(bad[0], getattr(saved, bad[0]), explicit[bad[0]], resume_safe_keys, tunable_keys)
        changes = {k: v for k, v in explicit.items() if k in allowed}
        cfg = dataclasses.replace(saved, **changes).validate()
        run_dir = Path(changes['output']) if changes.get('output') else file.parent
        check_output_folder(run_dir)
        return RunPlan(cfg, state.get('recipe', recipe), run_dir, _with_notes(state, note), command)
    run_dir = Path(cfg.output or default_output(recipe))
    check_output_folder(run_dir)
    last = run_dir / LAST_STATE
    if not last.is_file() or fresh:
        return RunPlan(cfg, recipe, run_dir, None, command)
    state, file, note = load_resumable_state(run_dir)
    diff = config_diff(state.get('config') or {}, config_to_dict(cfg), ignore=resume_safe_keys)
    if state.get('format') != state_format or diff:
        what = (f' with another config ({diff[0][0]}: {diff[0][1]!r} there, {diff[0][2]!r} now)' if diff else
                f' of another task ({state.get("format")!r})')
        tune = ''
        if diff and state.get('format') == state_format and all(k in tunable_keys for k, _, _ in diff):
            sets = ' '.join(f'--set {k}={_yaml_value(new)}' for k, _, new in diff)
            tune = f', `{command} --resume {run_dir} {sets}` to continue it with the new setting'
        raise ConfigError(f'{run_dir} holds a run{what}; resume it unchanged{tune}, pass --output NEW_DIR for a new '
                          f'run, or --fresh to overwrite it')
    return RunPlan(cfg, recipe, run_dir, _with_notes(state, note), command)


def _yaml_value(v: Any) -> str:
    import yaml
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()


def _with_notes(state: Dict[str, Any], note: Optional[str], reason: Optional[str] = None) -> Dict[str, Any]:
    """The state with what the session logs when it restores it (``resume_notes``, ``resume_reason``)."""
    extra: Dict[str, Any] = {}
    if note:
        extra['resume_notes'] = list(state.get('resume_notes') or []) + [note]
    if reason:
        extra['resume_reason'] = reason
    return dict(state, **extra) if extra else state


def start_run(path: Union[str, Path], env: Any, cfg: Any, quiet: bool = False) -> Tuple['RunFolder', Any]:
    """The first thing a trainer does: the batch layout (checked before anything is written), the run folder
    (created by its first write) and the backend (seed ``cfg.seed`` + rank, ``cfg.threads``, TF32 or
    ``cfg.deterministic``, cuDNN's algorithm search unless the config class sets ``CUDNN_BENCHMARK = False``);
    returns (run folder, layout)."""
    from .backend import setup_backend
    from .memory import BatchLayout
    layout = BatchLayout.split(cfg.batch_size, cfg.device_batch_size, env.world_size)
    run = RunFolder(path, is_main=env.is_main, quiet=quiet,
                    command=command_prefix(getattr(type(cfg), 'COMMAND', 'polynext train'), env.world_size))
    setup_backend(env.device, cfg.seed + env.rank, cfg.threads, deterministic=cfg.deterministic,
                  benchmark=getattr(type(cfg), 'CUDNN_BENCHMARK', True))
    return run, layout


def launch(plan: RunPlan, train: Callable[[Any, RunPlan], Dict[str, Any]], progress: Tuple[str, int, str],
           best: Callable[[Mapping[str, Any]], str], quiet: bool = False) -> Dict[str, Any]:
    """Run ``train(env, plan)`` in the process group of ``plan.config.device``.

    ``progress`` = (state key, total, unit), e.g. ``('epoch', 300, 'epochs')``: a resumed state that has
    reached the total is a finished run, reported with ``best(state['best'])`` and returned as it is.
    ``on_nonfinite=rollback``: a non-finite loss goes back to the last good checkpoint with the lr multiplied
    by ``rollback_lr_factor``, at most ``nonfinite_limit`` times. Ctrl-C raises ``Interrupted`` with the
    command that resumes."""
    from .distributed import barrier, cleanup_distributed, init_distributed
    env = init_distributed(plan.config.device)
    try:
        key, total, unit = progress
        if plan.state is not None and int(plan.state[key]) >= total:
            done = plan.state.get('best') or {}
            if env.is_main and not quiet:
                print(f'{plan.path} is a finished run ({total} {unit}, {best(done)}); pass --fresh to train it '
                      f'again or --output NEW_DIR')
            return dict(best=done, history=plan.state.get('history', []), run=str(plan.path))
        done_rollbacks = _rollbacks(plan.state)
        while True:
            try:
                result = train(env, plan)
                # every rank through its last collective before any rank tears the group down: a rank that
                # closed its connections while the other still waited on one aborted it (gloo, once in CI)
                barrier()
                return result
            except NonFiniteError as e:
                if not e.rollback:
                    raise
                limit = int(plan.config.nonfinite_limit)
                done_rollbacks = max(done_rollbacks, _rollbacks(plan.state))
                if done_rollbacks >= limit:
                    raise NonFiniteError(f'{e} {done_rollbacks} rollback(s) with a lower lr did not help '
                                         f'(nonfinite_limit={limit}).') from None
                done_rollbacks += 1
                plan = _rollback(plan, str(e), done_rollbacks, limit, env, quiet)
    except KeyboardInterrupt:
        command = command_prefix(plan.command, env.world_size)
        last = plan.path / LAST_STATE
        raise Interrupted(f'the last checkpoint is {last}: resume with `{command} --resume {plan.path}` (or run the '
                          f'same command again)' if last.is_file() else
                          'nothing was saved yet: run the same command again to start over') from None
    finally:
        cleanup_distributed()


def _rollbacks(state: Optional[Mapping[str, Any]]) -> int:
    """Rollbacks recorded in a state's ``changes``."""
    return sum(1 for c in (state or {}).get('changes') or [] if str(c.get('reason', '')).startswith('rollback'))


def _rollback(plan: RunPlan, error: str, k: int, limit: int, env: Any, quiet: bool) -> RunPlan:
    """The plan that goes back to the run's last good checkpoint (the start when none exists) with a lower lr."""
    cfg = plan.config
    lr = cfg.lr * cfg.rollback_lr_factor
    cfg = dataclasses.replace(cfg, lr=lr, **({'min_lr': min(cfg.min_lr, lr)} if hasattr(cfg, 'min_lr') else {}))
    reason = f'rollback {k} of {limit} after a non-finite value'
    state, note = None, None
    if (plan.path / LAST_STATE).is_file():
        state, file, note = load_resumable_state(plan.path)
        state = _with_notes(state, note, reason)
        where = f'the last good checkpoint {file} (optimizer step {state.get("global_step")})'
    else:
        where = 'the start (no checkpoint was written yet)'
    if env.is_main:
        run = RunFolder(plan.path, quiet=quiet)
        run.open()
        run.log(f'{error.split("; ")[0]}; {reason}: back to {where} with lr {cfg.lr:.3g}')
    return RunPlan(cfg, plan.recipe, plan.path, state, plan.command)
