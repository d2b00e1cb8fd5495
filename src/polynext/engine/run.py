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

Starting a run, the same for every task:

* ``plan_run(cfg, recipe, ...)`` decides the run folder and whether to resume: ``--resume PATH``
  (the saved config is the base; only the task's resume-safe keys, such as ``data`` or
  ``workers``, may change), or the folder's own ``last.state.pt`` when the same command runs
  again (a different config there is refused with the three ways out), or a fresh start.
* ``start_run(path, env, cfg)``: the batch layout, the run folder and the backend of a process.
* ``launch(plan, train, progress, best)`` starts the process group (``torchrun``), says so and
  returns when the plan's run is already finished, else runs ``train(env)``; the group is
  destroyed however it ends.
"""
from __future__ import annotations

import csv
import io
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

from ..checkpoint import atomic_write, read_checkpoint, save_safetensors
from ..errors import CheckpointError, ConfigError
from .config import apply_overrides, config_diff, config_to_dict
from .nonfinite import assert_finite_state

__all__ = ['RunFolder', 'load_training_state', 'CurvePanel', 'RunPlan', 'plan_run', 'start_run', 'launch',
           'default_output', 'LAST_STATE']

#: the resumable checkpoint of a run folder
LAST_STATE = 'last.state.pt'

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
    """Read a ``*.state.pt`` training-state file (tensors and plain containers only)."""
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


class RunFolder:
    """Files of one training run (writes happen on the main process only)."""

    CONFIG = 'config.yaml'
    METRICS_CSV = 'metrics.csv'
    METRICS_JSON = 'metrics.json'
    CURVE = 'learning_curve.png'
    LOG = 'log.txt'

    def __init__(self, path: Union[str, Path], is_main: bool = True, quiet: bool = False):
        self.path = Path(path)
        self.is_main = is_main
        self.quiet = quiet
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)

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
        with open(self.path / self.LOG, 'a') as f:
            for line in str(message).splitlines() or ['']:
                f.write(f'{stamp} {line}\n')

    def write_config(self, config: Mapping[str, Any], header: str = '') -> Optional[Path]:
        if not self.is_main:
            return None
        from .config import dump_yaml
        return dump_yaml(config, self.path / self.CONFIG, header=header)

    def write_metrics(self, history: List[Mapping[str, Any]]) -> None:
        """metrics.json (a list of rows) and metrics.csv (columns = union of the row keys)."""
        if not self.is_main:
            return
        history = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                   for row in history]     # JSON has no NaN / inf: written as null (an empty CSV cell)
        text = json.dumps(list(history), indent=1, default=_json_default, allow_nan=False)
        atomic_write(self.path / self.METRICS_JSON, lambda tmp: Path(tmp).write_text(text + '\n'))
        columns: List[str] = []
        for row in history:
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction='ignore')
        writer.writeheader()
        for row in history:
            writer.writerow({k: ('' if v is None else v) for k, v in row.items()})
        atomic_write(self.path / self.METRICS_CSV, lambda tmp: Path(tmp).write_text(buf.getvalue()))

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
        atomic_write(self.state_path(tag), lambda tmp: torch.save(state, tmp))
        save_safetensors(weights, self.weights_path(tag), metadata=dict(metadata or {}))
        for name, sd in (extra_weights or {}).items():
            save_safetensors(sd, self.weights_path(f'{tag}_{name}'), metadata=dict(metadata or {}, weights=name))

    def copy_checkpoint(self, src: str, dst: str, extra: Iterable[str] = ()) -> None:
        """Copy checkpoint ``src`` to ``dst`` atomically (state, weights and extra weight files)."""
        if not self.is_main:
            return
        pairs = [(self.state_path(src), self.state_path(dst)), (self.weights_path(src), self.weights_path(dst))]
        pairs += [(self.weights_path(f'{src}_{n}'), self.weights_path(f'{dst}_{n}')) for n in extra]
        for a, b in pairs:
            if a.exists():
                atomic_write(b, lambda tmp, a=a: shutil.copyfile(a, tmp))

    def write_weights(self, name: str, weights: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, Any]] = None) -> Optional[Path]:
        """A standalone safetensors file ``{name}.safetensors`` (e.g. the best EMA weights)."""
        if not self.is_main:
            return None
        assert_finite_state(weights, name)
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
    """What ``plan_run`` decided: the config to run, the recipe, the run folder and the state to resume."""
    config: Any
    recipe: str
    path: Path
    state: Optional[Dict[str, Any]] = None


def plan_run(cfg: Any, recipe: str, *, state_format: str, resume_safe_keys: Sequence[str], command: str,
             resume: Optional[Union[str, Path]] = None, fresh: bool = False,
             explicit: Optional[Mapping[str, Any]] = None) -> RunPlan:
    """Decide the run folder and whether to resume (see the module doc).

    ``explicit``: the config keys the user set on the command line, with their values (on ``--resume``
    these alone are compared with the saved config); ``command`` names the task's command in messages."""
    explicit = dict(explicit or {})
    if resume:
        state = load_training_state(resume)
        if state.get('format') != state_format:
            raise CheckpointError(f'{resume} is a {state.get("format")!r} training state, not {state_format!r}: '
                                  f'resume it with the command that wrote it, not `{command}`')
        saved = apply_overrides(type(cfg)(), state['config'], source=str(resume))
        bad = [k for k, v in explicit.items()
               if k not in resume_safe_keys and config_diff({k: v}, {k: getattr(saved, k)})]
        if bad:
            raise ConfigError(f"cannot change '{bad[0]}' when resuming ({getattr(saved, bad[0])!r} in the checkpoint, "
                              f"{explicit[bad[0]]!r} asked for); start a new run with --output DIR instead")
        changes = {k: v for k, v in explicit.items() if k in resume_safe_keys}
        cfg = dataclasses.replace(saved, **changes).validate()
        if changes.get('output'):
            run_dir = Path(changes['output'])
        else:
            run_dir = Path(resume).parent if Path(resume).is_file() else Path(resume)
        return RunPlan(cfg, state.get('recipe', recipe), run_dir, state)
    run_dir = Path(cfg.output or default_output(recipe))
    last = run_dir / LAST_STATE
    if not last.is_file() or fresh:
        return RunPlan(cfg, recipe, run_dir, None)
    state = load_training_state(last)
    diff = config_diff(state.get('config') or {}, config_to_dict(cfg), ignore=resume_safe_keys)
    if state.get('format') != state_format or diff:
        what = (f' with another config ({diff[0][0]}: {diff[0][1]!r} there, {diff[0][2]!r} now)' if diff else
                f' of another task ({state.get("format")!r})')
        raise ConfigError(f'{run_dir} holds a run{what}; resume it unchanged, pass --output NEW_DIR for a new run, '
                          f'or --fresh to overwrite it')
    return RunPlan(cfg, recipe, run_dir, state)


def start_run(path: Union[str, Path], env: Any, cfg: Any, quiet: bool = False) -> Tuple['RunFolder', Any]:
    """The first thing a trainer does: the batch layout (checked before anything is written), the run folder
    and the backend (seed ``cfg.seed`` + rank, ``cfg.threads``, TF32 or ``cfg.deterministic``); returns
    (run folder, layout)."""
    from .backend import setup_backend
    from .memory import BatchLayout
    layout = BatchLayout.split(cfg.batch_size, cfg.device_batch_size, env.world_size)
    run = RunFolder(path, is_main=env.is_main, quiet=quiet)
    setup_backend(env.device, cfg.seed + env.rank, cfg.threads, deterministic=cfg.deterministic)
    return run, layout


def launch(plan: RunPlan, train: Callable[[Any], Dict[str, Any]], progress: Tuple[str, int, str],
           best: Callable[[Mapping[str, Any]], str], quiet: bool = False) -> Dict[str, Any]:
    """Run ``train(env)`` in the process group of ``plan.config.device``.

    ``progress`` = (state key, total, unit), e.g. ``('epoch', 300, 'epochs')``: a resumed state that has
    reached the total is a finished run, reported with ``best(state['best'])`` and returned as it is."""
    from .distributed import cleanup_distributed, init_distributed
    env = init_distributed(plan.config.device)
    try:
        key, total, unit = progress
        if plan.state is not None and int(plan.state[key]) >= total:
            done = plan.state.get('best') or {}
            if env.is_main and not quiet:
                print(f'{plan.path} is a finished run ({total} {unit}, {best(done)}); pass --fresh to train it '
                      f'again or --output NEW_DIR')
            return dict(best=done, history=plan.state.get('history', []), run=str(plan.path))
        return train(env)
    finally:
        cleanup_distributed()
