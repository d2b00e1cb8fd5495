"""Classification training and evaluation (``polynext train`` / ``polynext validate``).

* ``recipes``: ``TrainConfig`` and the named presets (PolyNeXt, low-res, MetaFormer, digits demo).
* ``data``: datasets (image folders, CIFAR-10, SVHN, Tiny-ImageNet, digits) and transforms.
* ``trainer``: the training loop (``train(cfg, recipe)``).
* ``validate``: ``evaluate(model, loader, ...)``, top-1 / top-5 / per-class.
* ``class_maps``: the ImageNet-21K → 1K head mapping.
"""
from .recipes import DEFAULT_RECIPE, FIDELITY, PRESETS, TrainConfig, get_preset, list_recipes, resolve_config

__all__ = ['DEFAULT_RECIPE', 'FIDELITY', 'PRESETS', 'TrainConfig', 'get_preset', 'list_recipes', 'resolve_config']
