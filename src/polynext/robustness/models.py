"""Building the classifiers to evaluate: polynext's models and any timm model with 1000 classes.

Weights, one source per model:

* a file (``--checkpoint PATH``): anything ``polynext.create_model`` loads strictly — polynext
  ``.safetensors`` (whose metadata may carry the model's arguments, e.g. ``init_channels``),
  the authors' ``.pt`` / sail-sg ``.pth`` files, timm / Hugging Face ``model.safetensors`` or
  ``pytorch_model.bin`` files (the same file timm takes as
  ``pretrained_cfg_overlay=dict(file=PATH)``);
* ``pretrained``: timm's own pretrained weights of that name (``resnet50.a1_in1k`` picks a
  tag), read from the Hugging Face cache or downloaded by timm (``HF_HUB_OFFLINE=1`` forbids
  the download);
* none: refused unless ``allow_random=True`` — an untrained model scores ~0.1 % and would be
  reported as if it were a result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from .runner import NUM_CLASSES, ModelEntry

__all__ = ['PRETRAINED', 'load_classifier', 'model_entry']

#: the ``--checkpoint`` value that asks for timm's pretrained weights
PRETRAINED = 'pretrained'


def load_classifier(name: str, checkpoint: Optional[str], allow_random: bool = False) -> Tuple[nn.Module, str]:
    """(model in eval mode, where its weights came from); a 1000-class model or a clear error."""
    from ..factory import check_model_name, create_model
    check_model_name(name)
    if checkpoint is None:
        if not allow_random:
            raise ConfigError(f"no weights for '{name}': pass --checkpoint PATH (a weights file), or "
                              f"--checkpoint {PRETRAINED} for timm's pretrained weights of a timm model; "
                              f"--allow-random-weights evaluates an untrained model (a smoke test, not a result)")
        model, source = create_model(name), 'random weights (--allow-random-weights)'
    elif checkpoint == PRETRAINED and not Path(checkpoint).exists():
        try:
            model = create_model(name, pretrained=True)
        except Exception as e:  # noqa: BLE001 - hub / network / missing-weights errors of many kinds
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"timm's pretrained weights of '{name}' could not be loaded ({type(e).__name__}: "
                                  f"{msg}); download the weights file and pass it with --checkpoint PATH") from None
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        where = cfg.get('hf_hub_id') or cfg.get('url') or cfg.get('file') or 'timm'
        source = f'timm pretrained ({where})'
    else:
        path = Path(checkpoint).expanduser()
        from ..checkpoint import read_safetensors_metadata
        meta = read_safetensors_metadata(path)
        kwargs = dict(meta.get('model_kwargs') or {}) if meta.get('architecture') == name.split('.')[0] else {}
        model = create_model(name, checkpoint=path, **kwargs)
        source = str(path)
    n = getattr(model, 'num_classes', None)
    if n != NUM_CLASSES:
        raise ConfigError(f"'{name}' with weights from {source} has {n} classes; the robustness benchmarks score "
                          f"ImageNet-1k classifiers (1000 classes). Evaluate a checkpoint trained or fine-tuned on "
                          f"ImageNet-1k")
    return model.eval(), source


def model_entry(name: str, checkpoint: Optional[str], allow_random: bool = False,
                label: Optional[str] = None) -> ModelEntry:
    model, source = load_classifier(name, checkpoint, allow_random=allow_random)
    return ModelEntry.from_model(label or name, model, source=source, architecture=name)
