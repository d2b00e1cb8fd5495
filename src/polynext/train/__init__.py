"""Classification training and evaluation (``polynext train`` / ``polynext validate``).

    from polynext.train import PRESETS, train, validate_checkpoint
    name, cfg = PRESETS.resolve('cpolynext_s', flags=dict(data='/data/imagenet'), set_items=['epochs=10'])
    train(cfg, name)                                                     # = polynext train
    validate_checkpoint('runs/cpolynext_s/best.safetensors', data='/data/imagenet')   # = polynext validate

* ``recipes``: ``TrainConfig`` and the named presets (PolyNeXt, low-res, MetaFormer, digits demo).
* ``data``: datasets (image folders, CIFAR-10, SVHN, Tiny-ImageNet, digits) and transforms.
* ``trainer``: the training loop on the shared engine (``train(cfg, recipe)``).
* ``validate``: ``evaluate(model, loader, ...)`` (top-1 / top-5 / per-class) and ``validate_checkpoint``.
* ``class_maps``: the ImageNet-21K → 1K head mapping.
"""
from .recipes import DEFAULT_RECIPE, FIDELITY, PRESETS, TrainConfig
from .trainer import Trainer, train
from .validate import ValidationResult, validate_checkpoint

__all__ = ['DEFAULT_RECIPE', 'FIDELITY', 'PRESETS', 'TrainConfig', 'Trainer', 'train', 'ValidationResult',
           'validate_checkpoint']
