"""The Hugging Face Hub format (timm's layout): write, check, load and upload a model folder.

``save_pretrained(model, DIR)`` writes what ``timm.create_model("hf-hub:...")`` and
``timm.create_model("local-dir:DIR", pretrained=True)`` read:

* ``config.json`` (timm's ``save_for_hf``): ``architecture``, ``num_classes``, ``model_args``
  (the JSON-clean constructor arguments timm recorded: sizes, ablation switches, ``img_size``),
  ``pretrained_cfg`` (input size, crop, interpolation, mean / std), ``label_names`` when the
  class names are known, and a ``polynext`` entry (version; for timm's own PoolFormerV2 /
  ConvFormer / CAFormer built by polynext, the paper options timm cannot rebuild);
* ``model.safetensors``;
* ``README.md``, a model card whose first code line is ``import polynext`` (importing it registers
  the models with timm).

The folder is written under a temporary name, rebuilt from its own files and compared with the
model (equal logits), and only then renamed to ``DIR``. ``check_hub_folder`` validates a folder
(``config.json`` present and matching ``model.safetensors``) with one message per problem;
``push_to_hub`` uploads a checked folder with ``huggingface_hub``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from ..factory import load_pretrained, read_hub_config as _read_config

__all__ = ['save_pretrained', 'check_hub_folder', 'load_pretrained', 'push_to_hub', 'model_card']   # load_pretrained: factory's

WEIGHTS = 'model.safetensors'
#: timm constructor arguments that create_timm_baseline derives from polynext's options (not JSON)
_OPTION_DERIVED = ('mlp_act', 'act1_layer', 'res_scale_init_values', 'layer_scale_init_values')


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    arch = cfg.get('architecture')
    if not arch:
        raise ConfigError(f'this {type(model).__name__} has no pretrained_cfg architecture; create it with '
                          f'timm.create_model / polynext.create_model so that the Hub folder can name it')
    return arch


def _model_args_override(model: nn.Module) -> Optional[Dict[str, Any]]:
    """timm's recorded constructor arguments, without the entries polynext's options produced."""
    if not getattr(model, 'polynext_options', None):
        return None
    return {k: v for k, v in getattr(model, '_model_args', {}).items() if k not in _OPTION_DERIVED}


def model_card(architecture: str, config: Dict[str, Any], repo_id: Optional[str] = None,
               params: Optional[int] = None) -> str:
    """The README.md of a Hub folder; its first code line is ``import polynext``."""
    from .. import __version__
    from ..models import model_source
    source = f'hf-hub:{repo_id}' if repo_id else 'local-dir:PATH/TO/THIS/FOLDER'
    loader = (config.get('polynext') or {}).get('loader', 'timm')
    pcfg = config.get('pretrained_cfg', {})
    size = pcfg.get('input_size', [3, 224, 224])
    if loader == 'polynext':
        load = f'model = polynext.create_model("{source}", pretrained=True).eval()'
    else:
        load = f'model = timm.create_model("{source}", pretrained=True).eval()'
    args = json.dumps(config.get('model_args', {}))
    lines = [
        '---',
        'tags:', '- image-classification', '- timm', '- polynext',
        'library_name: timm', 'license: apache-2.0', '---',
        f'# {architecture}', '',
        f'{model_source(architecture)}, exported with polynext {__version__} '
        f'(https://github.com/polynext). {config.get("num_classes")} classes.', '',
        '```python',
        'import polynext',
        'import timm, torch',
        load,
        'cfg = timm.data.resolve_data_config(model=model)   # input size, crop, interpolation, mean / std',
        'transform = timm.data.create_transform(**cfg)',
        '```', '',
        '| | |', '|---|---|',
        f'| architecture | `{architecture}` |',
        f'| model arguments | `{args}` |',
        f'| input | {size[0]} x {size[1]} x {size[2]}, mean {pcfg.get("mean")}, std {pcfg.get("std")}, '
        f'{pcfg.get("interpolation")}, crop {pcfg.get("crop_pct")} |',
    ]
    if params is not None:
        lines.append(f'| parameters | {params:,} |')
    lines += ['', 'PolyNeXt: "Activation-Free Backbones for Image Recognition: Polynomial Alternatives within '
              'MetaFormer-Style Vision Models" (ICML 2026, arXiv 2605.20839).', '']
    return '\n'.join(lines)


def save_pretrained(model: nn.Module, directory, *, classes: Optional[Sequence[str]] = None,
                    model_args: Optional[Dict[str, Any]] = None, data_config: Optional[Dict[str, Any]] = None,
                    check: bool = True, overwrite: bool = False) -> Path:
    """Write ``model`` as a Hub folder (see the module docstring) and return its path.

    ``model_args`` adds or replaces recorded constructor arguments (JSON-clean); ``classes`` become
    ``label_names``; ``data_config`` (timm's keys) replaces the preprocessing. The folder is checked
    by rebuilding the model from it (equal logits) before it replaces anything.
    """
    from timm.models import save_for_hf

    from .. import __version__
    from ..models.folded import FoldedPolyNeXt
    if isinstance(model, FoldedPolyNeXt):
        raise ConfigError('the Hub format holds the model timm builds (its trainable form); save the unfolded model '
                          'and fold it after loading (polynext.fold_for_inference)')
    directory = Path(directory)
    if directory.exists() and not overwrite and any(directory.iterdir()):
        raise ConfigError(f'{directory} exists and is not empty; choose a new folder or pass overwrite=True '
                          f'(--overwrite)')
    architecture = _architecture(model)
    options = dict(getattr(model, 'polynext_options', None) or {})
    override = _model_args_override(model)
    saved_args = getattr(model, '_model_args', None)
    model_config: Dict[str, Any] = dict(polynext=dict(version=__version__, loader='polynext' if options else 'timm',
                                                      options=options))
    if classes is not None:
        if len(classes) != getattr(model, 'num_classes', len(classes)):
            raise ConfigError(f'{len(classes)} class names for a model with {model.num_classes} classes')
        model_config['label_names'] = [str(c) for c in classes]
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{directory.name}.', suffix='.tmp', dir=str(directory.parent)))
    was_training = model.training
    try:
        if override is not None:
            model._model_args = override
        try:
            save_for_hf(model.eval(), str(tmp), model_config=model_config, model_args=model_args,
                        safe_serialization=True, data_config=data_config)
        except ValueError as e:   # a constructor argument that JSON cannot hold
            raise ConfigError(f'{architecture}: {e} (pass model_args={{...}} with JSON values)') from None
        finally:
            if override is not None:
                model._model_args = saved_args
        config = json.loads((tmp / 'config.json').read_text())
        params = sum(p.numel() for p in model.parameters())
        (tmp / 'README.md').write_text(model_card(architecture, config, params=params))
        if check:
            _check_round_trip(model, tmp)
        for f in tmp.iterdir():
            with open(f, 'rb') as fh:
                os.fsync(fh.fileno())
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        model.train(was_training)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _check_round_trip(model: nn.Module, folder: Path) -> None:
    reloaded = load_pretrained(f'local-dir:{folder}').eval()
    from .export import _channels, _default_size
    h, w = _default_size(model)
    x = torch.randn(2, _channels(model), h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model.eval()(x), reloaded(x)
    diff = float((a - b).abs().max())
    if diff > 1e-6:
        raise ConfigError(f'the model rebuilt from the Hub folder differs from this one (max |Δ logit| {diff:.3g} at '
                          f'{h}x{w}); a constructor argument is not recorded: pass it in model_args')


# --------------------------------------------------------------------------------------
# Reading and checking a folder
# --------------------------------------------------------------------------------------

def check_hub_folder(folder) -> Dict[str, Any]:
    """Validate a Hub folder; return its config. One clear ``CheckpointError`` per problem:
    no folder, no / unreadable ``config.json``, an unknown architecture, no weights, or weights
    that do not fit the model ``config.json`` describes (the first mismatching tensor named)."""
    from safetensors import safe_open

    from ..factory import check_model_name
    folder = Path(folder)
    cfg = _read_config(folder)
    arch = cfg['architecture']
    try:
        check_model_name(arch)
    except ConfigError as e:
        raise CheckpointError(f'{folder}/config.json: {e}') from None
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f'{folder} has config.json but no {WEIGHTS}; write the folder again with polynext '
                              f'export --format hub')
    try:
        with safe_open(str(weights), framework='pt') as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f'{weights} is not readable safetensors ({type(e).__name__}); the upload or copy is '
                              f'incomplete') from None
    kwargs = dict(cfg.get('model_args') or {})
    kwargs.update((cfg.get('polynext') or {}).get('options') or {})
    kwargs.setdefault('num_classes', cfg.get('num_classes'))
    from ..factory import create_model
    try:
        model = create_model(arch, **kwargs)    # (PolyNeXt's constructor reads values, so not on 'meta')
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f'{folder}/config.json does not build {arch} ({type(e).__name__}: '
                              f'{str(e).splitlines()[0][:200]}); write the folder again with polynext export '
                              f'--format hub') from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in expected.items():
        if key not in shapes:
            raise CheckpointError(f'{folder}: {WEIGHTS} has no tensor {key} that the {arch} of config.json needs '
                                  f'(model_args {json.dumps(cfg.get("model_args", {}))}); config.json and the weights '
                                  f'do not match: write the folder again with polynext export --format hub')
        if shapes[key] != shape:
            raise CheckpointError(f'{folder}: config.json and {WEIGHTS} do not match: {key} is {list(shapes[key])} in '
                                  f'the weights but {list(shape)} in the {arch} that config.json describes '
                                  f'(num_classes {cfg.get("num_classes")}, model_args '
                                  f'{json.dumps(cfg.get("model_args", {}))}); write the folder again with polynext '
                                  f'export --format hub')
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise CheckpointError(f'{folder}: {WEIGHTS} has tensors the {arch} of config.json does not have ({extra[0]}, '
                              f'{len(extra)} in all); write the folder again with polynext export --format hub')
    return cfg


# --------------------------------------------------------------------------------------
# Upload
# --------------------------------------------------------------------------------------

def push_to_hub(folder, repo_id: str, *, token: Optional[str] = None, private: bool = False,
                commit_message: str = 'Upload polynext model') -> str:
    """Upload a checked Hub folder to ``repo_id`` (created if needed); returns the repo URL."""
    folder = Path(folder)
    cfg = check_hub_folder(folder)
    if not repo_id or repo_id.count('/') != 1 or any(not part for part in repo_id.split('/')):
        raise ConfigError(f"repository '{repo_id}' is not of the form USER/NAME (or ORG/NAME)")
    from huggingface_hub import HfApi, constants
    if constants.HF_HUB_OFFLINE:
        raise ConfigError('HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it (and log in with '
                          '`hf auth login` or pass --token) to push')
    card = model_card(cfg['architecture'], cfg, repo_id=repo_id)
    readme = folder / 'README.md'
    if not readme.exists() or 'PATH/TO/THIS/FOLDER' in readme.read_text():
        from ..checkpoint import atomic_write
        atomic_write(readme, lambda tmp: Path(tmp).write_text(card))
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type='model', commit_message=commit_message)
    except Exception as e:  # noqa: BLE001  (network, auth and HTTP errors of several types)
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ConfigError(f'upload to {repo_id} failed ({type(e).__name__}: {first}); check the network and the '
                          f'login (`hf auth login`, or --token), then run polynext push again') from None
    return str(url)
