"""Checkpoint reading, reference-key conversion and atomic writing.

* ``read_checkpoint(path)``: a ``.pt/.pth/.tar`` (torch) or ``.safetensors`` file, with one
  clear error for a missing, truncated or foreign file.
* ``unwrap_state_dict(obj)``: accepts the usual wrappers (``state_dict``, ``model``, an EMA
  entry which wins, ``module.`` / ``_orig_mod.`` prefixes, AveragedModel's ``n_averaged``).
* ``load_reference_state_dict(model, sd)``: strict load of the authors' key names.
* ``atomic_save`` / ``save_safetensors``: temp file + fsync + rename, so that a run killed at
  any moment leaves either the old or the new file, never half of one.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

from .errors import CheckpointError

__all__ = [
    'read_checkpoint', 'unwrap_state_dict', 'convert_reference_state_dict', 'load_reference_state_dict',
    'load_state_dict_strict', 'atomic_save', 'atomic_write', 'save_safetensors', 'load_weights',
    'infer_reference_arch',
]

_EMA_KEYS = ('state_dict_ema', 'model_ema', 'ema')
_PLAIN_KEYS = ('state_dict', 'model', 'module', 'weights')
_PREFIXES = ('module.', '_orig_mod.')


def read_checkpoint(path: Union[str, Path]) -> Any:
    """Load a checkpoint file (torch or safetensors) onto the CPU."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f'checkpoint not found: {path}')
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
                f'cannot read {path} as safetensors ({type(e).__name__}: {e}); the file is truncated or corrupt') from None
    try:
        return torch.load(str(path), map_location='cpu', weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f'cannot read {path} as a PyTorch checkpoint ({msg}); the file is truncated, corrupt or not a '
            f'checkpoint. Download it again or check the path.') from None
    except Exception as e:  # pickle.UnpicklingError for non-tensor objects under weights_only
        raise CheckpointError(
            f'{path} holds objects other than tensors and plain containers ({type(e).__name__}); '
            f'polynext only loads weights (torch.load(weights_only=True)).') from None


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


def _model_name(model: torch.nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


def infer_reference_arch(state_dict: Mapping[str, torch.Tensor]) -> Optional[Dict[str, Any]]:
    """Guess (name, init_channels, num_classes) of an authors'-format PolyNeXt checkpoint."""
    from .models.polynext import PUBLISHED_ARCHS
    if 'stem.weight' not in state_dict:
        return None
    stem = state_dict['stem.weight']
    c0 = stem.shape[0]
    n_cells = 1 + max((int(k.split('.')[1]) for k in state_dict if k.startswith('cells.')), default=-1)
    attn = any('.q_conv.' in k for k in state_dict)
    bn = any(k.endswith('gamma_hw') for k in state_dict)
    lowres = stem.shape[-1] == 3
    num_classes = state_dict['head.3.weight'].shape[0] if 'head.3.weight' in state_dict else None
    for name, arch in PUBLISHED_ARCHS.items():
        if (sum(arch['cells']) == n_cells and bool(arch.get('attn_stages')) == attn
                and (arch.get('norm', 'ln') == 'bn') == bn and (arch.get('stem', 'patch4') == 'conv3') == lowres):
            return dict(name=name, init_channels=c0, num_classes=num_classes)
    return None


def _arch_hint(state_dict: Mapping[str, torch.Tensor]) -> str:
    guess = infer_reference_arch(state_dict)
    if not guess:
        return ''
    return (f" The checkpoint looks like {guess['name']} (init_channels={guess['init_channels']}, "
            f"num_classes={guess['num_classes']}).")


def convert_reference_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                                 skip_shape_check: tuple = ()) -> Dict[str, torch.Tensor]:
    """Rename an authors'-layout state dict to ``model``'s keys, strictly.

    Every model key must be present with the right shape, and every checkpoint key must be
    used; the first problem raises a ``CheckpointError`` that names the key. Keys starting
    with a prefix in ``skip_shape_check`` are renamed without a shape check (timm's pretrained
    path drops a classifier of another class count itself).
    """
    from .models.polynext import reference_key_map
    mapping = reference_key_map(model)
    expected = model.state_dict()
    name = _model_name(model)
    out = OrderedDict()
    for ours, ref in mapping.items():
        if ref not in state_dict:
            raise CheckpointError(
                f"checkpoint does not match {name}: key '{ref}' is missing (expected shape "
                f"{list(expected[ours].shape)} for '{ours}'). The file is truncated or was saved from another "
                f"model.{_arch_hint(state_dict)}")
        t = state_dict[ref]
        if tuple(t.shape) != tuple(expected[ours].shape) and not (skip_shape_check and ours.startswith(skip_shape_check)):
            raise CheckpointError(
                f"checkpoint does not match {name}: '{ref}' has shape {list(t.shape)} but the model expects "
                f"{list(expected[ours].shape)} (parameter '{ours}'). Check the model name, init_channels, "
                f"num_classes and img_size.{_arch_hint(state_dict)}")
        out[ours] = t
    used = set(mapping.values())
    extra = [k for k in state_dict if k not in used]
    if extra:
        raise CheckpointError(
            f"checkpoint does not match {name}: unexpected key '{extra[0]}' ({len(extra)} unused in all)."
            f"{_arch_hint(state_dict)}")
    return out


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """``model.load_state_dict(strict=True)`` with one clear error for the first bad key."""
    expected = model.state_dict()
    name = _model_name(model)
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


def load_reference_state_dict(model: torch.nn.Module, state_dict: Any) -> torch.nn.Module:
    """Load a state dict in the authors' key names (as in their released ``.pt`` files).

    Accepts the usual wrappers (``state_dict`` / ``model`` / EMA entries, ``module.``).
    Strict: every key is used and every shape is checked. Returns ``model``.
    """
    sd = unwrap_state_dict(state_dict)
    from .models.polynext import _is_reference_layout
    if not _is_reference_layout(sd):
        raise CheckpointError(
            f"this is not an authors'-format PolyNeXt checkpoint (no 'cells.*' keys; first key "
            f"'{next(iter(sd))}'). For polynext files use polynext.load_weights().")
    load_state_dict_strict(model, convert_reference_state_dict(model, sd))
    return model


def load_weights(model: torch.nn.Module, path_or_state: Any, prefer_ema: bool = True) -> torch.nn.Module:
    """Load weights strictly from a file or checkpoint object in any supported layout.

    The model's own timm ``checkpoint_filter_fn`` (the convention of timm model files) converts
    foreign layouts: the authors' PolyNeXt keys, sail-sg MetaFormer keys, and so on.
    """
    obj = read_checkpoint(path_or_state) if isinstance(path_or_state, (str, Path)) else path_or_state
    sd = unwrap_state_dict(obj, prefer_ema=prefer_ema)
    filter_fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except KeyError as e:  # timm's converters index the model's state dict with each checkpoint key
            raise CheckpointError(f'checkpoint does not match {_model_name(model)}: unexpected key {e}') from None
    load_state_dict_strict(model, sd)
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
    os.chmod(tmp, 0o666 & ~_umask())   # mkstemp creates 0600; give the file the usual permissions
    try:
        writer(tmp)
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: Union[str, Path]) -> Path:
    """``torch.save`` atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


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
