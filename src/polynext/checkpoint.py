"""Checkpoint files: reading any format, strict loading, atomic writing, metadata. Model-agnostic.

* ``read_checkpoint(path)``: a ``.pt/.pth/.tar`` (torch) or ``.safetensors`` file, with one
  clear error for a missing, truncated or foreign file.
* ``unwrap_state_dict(obj)``: accepts the usual wrappers (``state_dict``, ``model``, an EMA
  entry which wins, ``module.`` / ``_orig_mod.`` prefixes, AveragedModel's ``n_averaged``).
* ``convert_to_model_layout(sd, model)``: the model family's own timm ``checkpoint_filter_fn``
  (the convention of timm model files) turns a foreign layout into the model's keys; each family
  keeps the knowledge of its authors' layout next to its models (``models/polynext.py``,
  ``models/metaformer_baselines.py``).
* ``load_state_dict_strict`` / ``load_weights``: strict loading with one clear error.
* ``atomic_write`` / ``atomic_save`` / ``save_safetensors``: temp file + fsync + rename, so that a
  run killed at any moment leaves either the old or the new file, never half of one;
  ``read_safetensors_metadata`` reads back what ``save_safetensors`` wrote.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .errors import CheckpointError

__all__ = [
    'read_checkpoint', 'unwrap_state_dict', 'convert_to_model_layout', 'load_state_dict_strict', 'load_weights',
    'atomic_save', 'atomic_write', 'atomic_write_json', 'save_safetensors', 'read_safetensors_metadata', 'model_name',
    'stale_temporary_files', 'remove_stale_temporary_files',
]

_EMA_KEYS = ('state_dict_ema', 'model_ema', 'ema')
_PLAIN_KEYS = ('state_dict', 'model', 'module', 'weights')
_PREFIXES = ('module.', '_orig_mod.')


def read_checkpoint(path: Union[str, Path]) -> Any:
    """Load a checkpoint file (torch or safetensors) onto the CPU."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f'checkpoint not found: {path}; check the path')
    if path.is_dir():
        raise CheckpointError(f'{path} is a folder; pass the checkpoint file inside it')
    if path.stat().st_size == 0:
        raise CheckpointError(f'checkpoint {path} is empty (0 bytes); the download or copy did not finish')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device='cpu')
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(
                f'cannot read {path} as safetensors ({type(e).__name__}: {e}); the file is truncated or corrupt: copy '
                f'it again from where it came from, or check the path') from None
    try:
        return torch.load(str(path), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses both real objects ('Unsupported global: GLOBAL pathlib.PosixPath ...') and bytes
        # that are no pickle at all ('Unsupported operand 250'): only the first is a file of objects
        if 'unsupported global' not in str(e).lower():
            raise _unreadable(path, e) from None
        raise CheckpointError(        # a real pickle of objects that weights_only refuses to build
            f'{path} holds objects other than tensors and plain containers; polynext only loads weights '
            f'(torch.load(weights_only=True)): save the state_dict() instead') from None
    except Exception as e:  # noqa: BLE001 - zip, pickle and legacy-format readers raise many types
        raise _unreadable(path, e) from None


def _unreadable(path: Path, e: BaseException) -> CheckpointError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CheckpointError(
        f'cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {msg[:120]}); the file is truncated, '
        f'corrupt or not a checkpoint: copy it again from where it came from, or check the path')


def _looks_like_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) for k in obj) and any(torch.is_tensor(v) for v in obj.values())


def unwrap_state_dict(obj: Any, prefer_ema: bool = True) -> Dict[str, torch.Tensor]:
    """Find the model weights inside a checkpoint object and strip wrapper prefixes."""
    seen = 0
    while isinstance(obj, Mapping) and not _looks_like_state_dict(obj) and seen < 4:
        seen += 1
        keys = (_EMA_KEYS if prefer_ema else ()) + _PLAIN_KEYS
        nxt = next((obj[k] for k in keys if isinstance(obj.get(k), Mapping) and obj.get(k)), None)
        if nxt is None:
            break
        obj = nxt
    if isinstance(obj, Mapping) and prefer_ema:
        # a flat dict that also carries an EMA sub-dict, e.g. {'state_dict': .., 'state_dict_ema': ..}
        for k in _EMA_KEYS:
            if isinstance(obj.get(k), Mapping) and _looks_like_state_dict(obj[k]):
                obj = obj[k]
                break
    if not _looks_like_state_dict(obj):
        kind = type(obj).__name__
        keys = list(obj.keys())[:8] if isinstance(obj, Mapping) else []
        raise CheckpointError(f'no model weights found in the checkpoint (a {kind} with keys {keys})')
    out = OrderedDict()
    for k, v in obj.items():
        if not torch.is_tensor(v):
            continue
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        if k == 'n_averaged':  # torch.optim.swa_utils.AveragedModel counter
            continue
        out[k] = v
    return out


def model_name(model: torch.nn.Module) -> str:
    """The registered architecture name of a timm model (its class name otherwise), for messages."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


def convert_to_model_layout(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """``state_dict`` in ``model``'s key layout: the ``checkpoint_filter_fn`` of the model's own module (the timm
    model-file convention), which converts the authors' layouts; unchanged for models without one."""
    filter_fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
    if filter_fn is None:
        return dict(state_dict)
    try:
        return filter_fn(state_dict, model)
    except KeyError as e:  # timm's converters index the model's state dict with each checkpoint key
        raise CheckpointError(f'checkpoint does not match {model_name(model)}: unexpected key {e}') from None


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """``model.load_state_dict(strict=True)`` with one clear error for the first bad key."""
    expected = model.state_dict()
    name = model_name(model)
    for k, v in expected.items():
        if k not in state_dict:
            raise CheckpointError(f"checkpoint does not match {name}: key '{k}' is missing "
                                  f"(expected shape {list(v.shape)}).")
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise CheckpointError(f"checkpoint does not match {name}: '{k}' has shape {list(state_dict[k].shape)} "
                                  f"but the model expects {list(v.shape)}.")
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise CheckpointError(f"checkpoint does not match {name}: unexpected key '{extra[0]}' "
                              f"({len(extra)} unused in all).")
    model.load_state_dict(state_dict, strict=True)


def load_weights(model: torch.nn.Module, path_or_state: Any, prefer_ema: bool = True) -> torch.nn.Module:
    """Load weights strictly from a file or checkpoint object in any supported layout.

    The model's own timm ``checkpoint_filter_fn`` (the convention of timm model files) converts
    foreign layouts: the authors' PolyNeXt keys, sail-sg MetaFormer keys, and so on.
    """
    obj = read_checkpoint(path_or_state) if isinstance(path_or_state, (str, Path)) else path_or_state
    load_state_dict_strict(model, convert_to_model_layout(unwrap_state_dict(obj, prefer_ema=prefer_ema), model))
    return model


# ---------------------------------------------------------------------------------------
# Atomic writing
# ---------------------------------------------------------------------------------------

def atomic_write(path: Union[str, Path], writer: Callable[[str], None]) -> Path:
    """Run ``writer(tmp_path)`` then fsync and rename onto ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=str(path.parent))
    os.close(fd)
    try:
        writer(tmp)
        # mkstemp creates 0600 and some writers (safetensors) replace the file: the usual permissions, last
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(str(path.parent), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


#: ``atomic_write``'s temporary files: ``.NAME.XXXXXXXX.tmp`` (``tempfile.mkstemp``'s 8 random characters)
_TEMP_NAME = re.compile(r'^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$')


def stale_temporary_files(folder: Union[str, Path]) -> List[Path]:
    """``atomic_write``'s temporary files in ``folder`` (left by a process killed between writing and
    renaming: nothing else removes them, and each can be as large as a checkpoint)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _TEMP_NAME.match(p.name) and p.is_file())


def remove_stale_temporary_files(folder: Union[str, Path]) -> List[Tuple[str, int]]:
    """Remove ``stale_temporary_files(folder)``; returns [(name, size in bytes)] of what was removed. Call it
    where no other process writes into ``folder`` at the same time (a run's main process)."""
    removed = []
    for p in stale_temporary_files(folder):
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append((p.name, size))
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: Union[str, Path]) -> Path:
    """``torch.save`` atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_json(path: Union[str, Path], obj: Any, **dumps_kwargs: Any) -> Path:
    """``obj`` as indented JSON (a trailing newline), written atomically; ``dumps_kwargs`` go to
    ``json.dumps`` (e.g. ``default=float``)."""
    text = json.dumps(obj, indent=1, **dumps_kwargs) + '\n'
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: Union[str, Path],
                     metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Write a state dict as safetensors atomically (tensors made contiguous, metadata as strings)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_safetensors_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """The metadata :func:`save_safetensors` wrote (architecture, model_kwargs, classes, eval ...), each value
    decoded from JSON where it is JSON; ``{}`` for anything that is not a readable ``.safetensors`` file
    (:func:`read_checkpoint` gives unreadable files their clear error later)."""
    path = Path(path)
    if path.suffix != '.safetensors' or not path.is_file():
        return {}
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            raw = f.metadata() or {}
    except Exception:  # noqa: BLE001
        return {}
    out: Dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out
