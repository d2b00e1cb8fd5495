"""Model creation with clear errors, and loading weights at creation time.

``polynext.create_model(name, checkpoint=PATH, **kwargs)`` is timm's ``create_model`` plus:
an unknown name gives one message with the closest names; ``checkpoint`` loads weights in
any supported layout (ours, the authors', timm's) strictly, and when the checkpoint's
classifier has another class count than asked for, the model is built with the
checkpoint's count unless ``num_classes`` was given explicitly (then it is an error).
timm's own MetaFormer baselines (PoolFormerV2, ConvFormer, CAFormer) are built through
``models.metaformer_baselines.create_timm_baseline``, which adds the paper's options
(``head_dropout``, ``act``, ``branch_scale``, ``block_bias``; authors' head LayerNorm eps).
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import timm
import torch
import torch.nn as nn

from .checkpoint import convert_to_model_layout, load_weights, read_checkpoint, unwrap_state_dict
from .errors import CheckpointError, ConfigError

__all__ = ['create_model', 'list_models', 'check_model_name', 'checkpoint_num_classes', 'head_dropout_kwargs',
           'load_pretrained', 'read_hub_config']


def list_models(pattern: str = '') -> List[str]:
    """Every architecture polynext registers (PolyNeXt + MetaFormer baselines)."""
    from . import models  # noqa: F401  (registration)
    from .models import POLYNEXT_MODELS
    names = list(POLYNEXT_MODELS)
    return [n for n in names if pattern in n]


def check_model_name(name: str) -> str:
    """Raise a ``ConfigError`` naming the closest models if ``name`` is not a timm model."""
    from . import models  # noqa: F401
    arch = name.split('.')[0]
    if timm.is_model(arch):
        return name
    candidates = list_models() + timm.list_models()
    close = difflib.get_close_matches(arch, candidates, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ''
    raise ConfigError(f"unknown model '{name}'.{hint} Run `polynext models` to list polynext's models.")


def checkpoint_num_classes(model: nn.Module, state_dict: dict) -> Optional[int]:
    """Number of classes of the classifier stored in ``state_dict`` (after the model's key filter)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifier = cfg.get('classifier')
    if not classifier:
        return None
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    try:
        sd = convert_to_model_layout(dict(state_dict), model)
    except Exception:  # noqa: BLE001 - a checkpoint that does not convert fails with its own message on loading
        sd = state_dict
    for n in names:
        w = sd.get(n + '.weight')
        if w is not None:
            return int(w.shape[0])
    return None


def head_dropout_kwargs(name: str, p: float) -> Dict[str, float]:
    """The ``create_model`` argument that puts dropout ``p`` right before a model's last linear layer, where the
    papers' recipes mean it: ``head_dropout`` for the MetaFormer baselines (inside the MLP head, between its norm
    and fc2: the authors' ``--head-dropout``; timm's ``drop_rate`` would sit before the whole head), else timm's
    ``drop_rate`` (PolyNeXt's gated head and timm's linear heads: right before the classifier). ``{}`` for 0."""
    if not p:
        return {}
    from .models.metaformer_baselines import METAFORMER_MODELS
    return dict(head_dropout=p) if name.split('.')[0] in METAFORMER_MODELS else dict(drop_rate=p)


def create_model(name: str, checkpoint: Optional[Union[str, Path, dict]] = None, pretrained: bool = False,
                 prefer_ema: bool = True, **kwargs: Any) -> nn.Module:
    """timm ``create_model`` with clear errors; optionally load ``checkpoint`` strictly.

    ``local-dir:PATH`` / ``hf-hub:REPO`` load a Hub folder (``polynext.save_pretrained``), with the
    paper options it records for timm's own MetaFormers."""
    if name.startswith(('local-dir:', 'hf-hub:')):
        model = load_pretrained(name, **kwargs)
        if checkpoint is not None:
            load_weights(model, checkpoint, prefer_ema=prefer_ema)
        return model
    check_model_name(name)
    from .models.metaformer_baselines import TIMM_ARCHS, create_timm_baseline
    build = create_timm_baseline if name.split('.')[0] in TIMM_ARCHS else timm.create_model
    try:
        model = build(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ConfigError(f'{name}: {e}') from None
    if checkpoint is None:
        return model
    obj = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    sd = unwrap_state_dict(obj, prefer_ema=prefer_ema)
    n_ckpt = checkpoint_num_classes(model, sd)
    if n_ckpt is not None and n_ckpt != getattr(model, 'num_classes', n_ckpt):
        if 'num_classes' in kwargs:
            raise CheckpointError(
                f'the checkpoint has {n_ckpt} classes but num_classes={kwargs["num_classes"]} was asked for; '
                f'drop num_classes to use the checkpoint as is, or fine-tune to change the class count')
        model = build(name, num_classes=n_ckpt, **kwargs)
    load_weights(model, sd, prefer_ema=prefer_ema)
    return model


# --------------------------------------------------------------------------------------
# Hub folders (polynext.save_pretrained writes them)
# --------------------------------------------------------------------------------------

def read_hub_config(folder: Path) -> Dict[str, Any]:
    """``config.json`` of a Hub folder, with one clear error for a missing or unreadable one."""
    folder = Path(folder)
    cfg_file = folder / 'config.json'
    if not folder.is_dir():
        raise CheckpointError(f'{folder} is not a folder; write one with polynext export MODEL {folder} --format hub')
    if not cfg_file.is_file():
        raise CheckpointError(f'{folder} has no config.json; it is not a Hub model folder. Write one with '
                              f'polynext export MODEL {folder} --format hub (or polynext.save_pretrained)')
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f'{cfg_file} is not valid JSON ({e}); write the folder again with polynext export '
                              f'--format hub') from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get('architecture'), str):
        raise CheckpointError(f'{cfg_file} names no architecture; write the folder again with polynext export '
                              f'--format hub')
    return cfg


def load_pretrained(source: str, **kwargs) -> nn.Module:
    """A model from ``local-dir:PATH`` or ``hf-hub:REPO``: timm's loader, or for folders that record
    polynext options (timm's MetaFormers built with paper options) polynext's constructor plus the
    folder's weights."""
    from timm.models import parse_model_name
    kind, model_id = parse_model_name(source)
    if kind == 'local-dir':
        folder = Path(model_id)
        cfg = read_hub_config(folder)
    elif kind == 'hf-hub':
        from timm.models._hub import download_from_hf
        cfg = json.loads(Path(download_from_hf(model_id, 'config.json')).read_text())
    else:
        raise ConfigError(f"{source!r} is not a local-dir:PATH or hf-hub:REPO name")
    options = (cfg.get('polynext') or {}).get('options') or {}
    if not options:
        return timm.create_model(source, pretrained=True, **kwargs)
    args = dict(cfg.get('model_args') or {}, **options)
    args.update(kwargs)
    model = create_model(cfg['architecture'], **args)
    if kind == 'local-dir':
        from timm.models._hub import load_state_dict_from_path
        sd = load_state_dict_from_path(folder)
    else:
        from timm.models._hub import load_state_dict_from_hf
        sd = load_state_dict_from_hf(model_id, 'model.safetensors')
    model.load_state_dict(sd, strict=True)
    return model
