"""The training engine: everything about a run that does not depend on the task.

Tasks (``polynext.train`` classification, ``polynext.seg`` segmentation, detection next) keep
their model, data, loss, metrics and schedule, and call the engine for the rest:

* ``presets``: ``PresetTable`` (named recipes: get / list / resolve / ``--show-config``, one
  override order) and ``run_command`` (a task's ``train`` sub-command);
* ``run``: ``plan_run`` (run folder, resume decision, changed-config refusal), ``launch``
  (process group, finished runs), ``RunFolder`` (config, metrics, curve, log, atomic checkpoints);
* ``backend``: ``setup_backend`` (seed, threads, TF32 / determinism); ``distributed``: process
  group, device, reductions; ``memory``: ``BatchLayout`` (effective batch = per device × devices
  × accumulation), out-of-memory advice;
* ``precision``: ``Precision`` (autocast and the fp16 scaler); ``step``: ``TrainStep`` (micro-batch
  context, backward, optimizer step: unscale, clip, non-finite check, step, EMA) and DDP wrapping;
  ``ema``: ``EmaTracker``; ``metrics``: ``Meters``, the banner;
* ``session``: ``Session`` (the common state fields, atomic save and exact restore, metric rows);
* ``data``: ``make_loader`` (worker cap), ``CorruptImages`` (the unreadable-image limit);
  ``determinism``: resumable samplers, per-sample seeded augmentation, RNG capture.

Nothing here imports a task package. ``docs/architecture.md`` shows how a task uses it.
"""
from .backend import setup_backend
from .config import apply_overrides, config_diff, config_to_dict, dump_yaml, load_yaml, parse_set_args
from .data import CorruptImages, corrupt_limit, make_loader
from .determinism import (
    ResumableDistributedSampler, ShardSampler, capture_rng_state, restore_rng_state, sample_seed, seed_everything,
    seeded_rng,
)
from .distributed import (
    DistEnv, all_gather_objects, all_reduce_sums, all_reduce_tensor, barrier, broadcast_object, cleanup_distributed,
    init_distributed, is_distributed, is_main, resolve_device,
)
from .ema import EmaTracker
from .memory import BatchLayout, OutOfMemory, is_oom_error, oom_advice
from .metrics import Meters, banner
from .nonfinite import NonFiniteError, assert_finite_state, check_step
from .precision import Precision
from .presets import FidelityFlag, Preset, PresetTable
from .run import RunFolder, RunPlan, launch, load_training_state, plan_run, progress, start_run
from .session import Session
from .step import TrainStep, unwrap, wrap_model

__all__ = [
    'setup_backend', 'apply_overrides', 'config_diff', 'config_to_dict', 'dump_yaml', 'load_yaml', 'parse_set_args',
    'CorruptImages', 'corrupt_limit', 'make_loader',
    'ResumableDistributedSampler', 'ShardSampler', 'capture_rng_state', 'restore_rng_state', 'sample_seed',
    'seed_everything', 'seeded_rng', 'DistEnv', 'all_gather_objects', 'all_reduce_sums', 'all_reduce_tensor', 'barrier',
    'broadcast_object', 'cleanup_distributed', 'init_distributed', 'is_distributed', 'is_main', 'resolve_device',
    'EmaTracker', 'BatchLayout', 'OutOfMemory', 'is_oom_error', 'oom_advice', 'Meters', 'banner', 'NonFiniteError',
    'assert_finite_state', 'check_step', 'Precision', 'FidelityFlag', 'Preset', 'PresetTable', 'RunFolder', 'RunPlan',
    'launch', 'load_training_state', 'plan_run', 'progress', 'start_run', 'Session', 'TrainStep', 'unwrap',
    'wrap_model',
]
