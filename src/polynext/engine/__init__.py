"""Task-independent training machinery, shared by classification (``polynext train``) and
segmentation: distributed set-up and metric reduction, typed config overrides, the run
folder (config, metrics, curves, atomic checkpoints), resumable deterministic sampling,
non-finite detection and out-of-memory advice."""
from .config import apply_overrides, config_diff, config_to_dict, dump_yaml, load_yaml, parse_set_args
from .determinism import (
    ResumableDistributedSampler, ShardSampler, capture_rng_state, restore_rng_state, sample_seed, seed_everything,
    seeded_rng,
)
from .distributed import (
    DistEnv, all_gather_objects, all_reduce_sums, all_reduce_tensor, barrier, broadcast_object, cleanup_distributed, init_distributed,
    is_distributed, is_main,
)
from .memory import BatchLayout, OutOfMemory, is_oom_error, oom_advice
from .nonfinite import NonFiniteError, assert_finite_state, check_step
from .run import RunFolder, load_training_state, progress

__all__ = [
    'apply_overrides', 'config_diff', 'config_to_dict', 'dump_yaml', 'load_yaml', 'parse_set_args',
    'ResumableDistributedSampler', 'ShardSampler', 'capture_rng_state', 'restore_rng_state', 'sample_seed',
    'seed_everything', 'seeded_rng', 'DistEnv', 'all_gather_objects', 'all_reduce_sums', 'all_reduce_tensor', 'barrier',
    'broadcast_object', 'cleanup_distributed', 'init_distributed', 'is_distributed', 'is_main', 'BatchLayout',
    'OutOfMemory', 'is_oom_error', 'oom_advice', 'NonFiniteError', 'assert_finite_state', 'check_step',
    'RunFolder', 'load_training_state', 'progress',
]
