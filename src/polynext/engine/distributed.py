"""Distributed helpers: set-up from the ``torchrun`` environment, rank queries, metric reduction.

Everything here also works in a single process without ``torch.distributed`` initialised
(world size 1), so training code calls the same functions in both cases.

* ``resolve_device(device)``: 'auto' / 'cpu' / 'cuda' / 'cuda:N' → a ``torch.device``, with one clear
  error for a device that is not there (the one home of this rule; ``polynext bench`` uses it too).
* ``init_distributed(device='auto')`` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by
  ``torchrun``, or derived from SLURM's variables under ``srun``: ``slurm_environment``), initialises
  the process group (NCCL on CUDA, gloo on CPU) and returns a ``DistEnv`` with the rank, the world
  size and the device of this process.
* ``all_reduce_sums(values)``: sum a dict of numbers over all ranks (metrics are reduced as
  sums and counts, then divided, so uneven shards weigh correctly).
* ``all_gather_objects(obj)``: every rank's picklable object, in rank order.
* ``is_main()``: only rank 0 writes files and prints.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist

__all__ = ['DistEnv', 'init_distributed', 'slurm_environment', 'first_slurm_host', 'cleanup_distributed',
           'is_distributed', 'rank', 'world_size', 'is_main', 'barrier', 'all_reduce_sums', 'all_reduce_tensor',
           'all_gather_objects', 'broadcast_object', 'resolve_device']


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank / world size / device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str = 'auto', local_rank: int = 0) -> torch.device:
    """'auto' → this rank's CUDA device if there is one, else the CPU; 'cpu' / 'cuda' / 'cuda:N' as given
    (plain 'cuda' → the rank's device, made current), with one clear error for a device that is not there."""
    from ..errors import ConfigError
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            build = f'built for CUDA {torch.version.cuda}' if torch.version.cuda else 'a CPU-only build'
            raise ConfigError(f'--device {device}: no CUDA device is available on this machine '
                              f'(torch {torch.__version__}, {build}); use --device cpu')
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f'--device {device}: this machine has {count} CUDA device(s) '
                              f'(cuda:0 .. cuda:{count - 1})')
        if dev.index is None:
            dev = torch.device('cuda', local_rank % max(1, count))
        torch.cuda.set_device(dev)
    elif dev.type != 'cpu':
        raise ConfigError(f'--device {device}: only cpu and cuda are supported')
    return dev


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[03-05,9],gpu1`` → ``node03``, ``rack[1-2]-n[7-8]`` →
    ``rack1-n7`` (the compressed form ``scontrol show hostnames`` expands; here without a subprocess)."""
    first, depth = '', 0
    for ch in nodelist.strip():            # the first entry: up to a comma outside brackets
        if ch == ',' and depth == 0:
            break
        depth += ch == '['
        depth -= ch == ']'
        first += ch
    return re.sub(r'\[([^\]]*)\]', lambda m: m.group(1).split(',')[0].split('-')[0], first)


def slurm_environment(env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """torchrun's variables derived from SLURM's, for ``srun ... polynext train`` (one task per process).

    Only when torchrun's ``RANK`` / ``WORLD_SIZE`` are absent and SLURM started several tasks:
    RANK = ``SLURM_PROCID``, WORLD_SIZE = ``SLURM_NTASKS``, LOCAL_RANK = ``SLURM_LOCALID``, MASTER_ADDR =
    the first host of ``SLURM_JOB_NODELIST`` (``SLURM_NODELIST``), MASTER_PORT = 29500 + job id mod 10000
    (so two jobs sharing a node do not collide). MASTER_ADDR / MASTER_PORT already set are kept.
    Returns the variables to set ({} when none apply)."""
    env = os.environ if env is None else env
    if 'RANK' in env or 'WORLD_SIZE' in env or 'SLURM_PROCID' not in env:
        return {}
    ntasks = int(env.get('SLURM_NTASKS') or env.get('SLURM_NPROCS') or 1)
    if ntasks <= 1:
        return {}
    nodelist = env.get('SLURM_JOB_NODELIST') or env.get('SLURM_NODELIST') or ''
    if 'MASTER_ADDR' not in env and not nodelist:
        from ..errors import ConfigError
        raise ConfigError('SLURM started several tasks but SLURM_JOB_NODELIST is not set; set MASTER_ADDR to the '
                          'first node, or launch with torchrun')
    out = dict(RANK=env['SLURM_PROCID'], WORLD_SIZE=str(ntasks), LOCAL_RANK=env.get('SLURM_LOCALID', '0'))
    if 'SLURM_NTASKS_PER_NODE' in env and env['SLURM_NTASKS_PER_NODE'].split('(')[0].isdigit():
        out['LOCAL_WORLD_SIZE'] = env['SLURM_NTASKS_PER_NODE'].split('(')[0]
    if 'MASTER_ADDR' not in env:
        out['MASTER_ADDR'] = first_slurm_host(nodelist)
    if 'MASTER_PORT' not in env:
        job = env.get('SLURM_JOB_ID', '')
        out['MASTER_PORT'] = str(29500 + int(job) % 10000) if job.isdigit() else '29500'
    return out


def init_distributed(device: str = 'auto', timeout_s: float = 1800.) -> DistEnv:
    """Initialise from the ``torchrun`` environment variables (a single process without them), or
    from SLURM's (``srun``) where torchrun's are absent (:func:`slurm_environment`)."""
    os.environ.update(slurm_environment())
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank_ = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        kwargs = dict(backend=backend, init_method='env://', timeout=datetime.timedelta(seconds=timeout_s))
        if dev.type == 'cuda':
            kwargs['device_id'] = dev
        dist.init_process_group(**kwargs)
    return DistEnv(rank=rank_, world_size=world, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    """Destroy the process group while the interpreter is fully alive. The garbage collection first frees what
    still holds the group from a reference cycle (a DDP wrapper's reducer, the trainer's objects), so that the
    gloo backend and its worker threads go when the group is destroyed, not during interpreter shutdown, where
    a worker thread still holding tensors aborts the process ("terminate called without an active exception":
    pytorch/pytorch#179291; a DDP CPU test's rank died so after its work was done, in two of this project's
    clean-clone CI runs)."""
    if dist.is_available() and dist.is_initialized():
        import gc
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors
    if is_distributed() and dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def all_reduce_sums(values: Mapping[str, float]) -> Dict[str, float]:
    """Sum each value over all ranks (float64, one collective for the whole dict)."""
    keys = list(values)
    if not is_distributed() or not keys:
        return {k: float(values[k]) for k in keys}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.cpu().tolist()))


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``t`` over all ranks (a new CPU tensor; ``t`` itself in one process)."""
    if not is_distributed():
        return t
    buf = t.detach().to(_reduce_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.cpu()


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: List[Optional[Any]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
