"""Mapping a classifier trained on ImageNet-21K (21841 classes, fall11) to ImageNet-1k.

The MetaFormer authors fine-tune 21K checkpoints on 1K after picking, for every 1K class,
the head row of the same WordNet synset in the sorted fall11 list; class 850 (n04399382,
"teddy bear") is not in fall11 and gets the mean of all rows. ``in21k_to_in1k_class_map()``
derives that correspondence from the synset lists that ship with timm
(``imagenet_synsets.txt`` and ``imagenet22k_synsets.txt``); it equals the authors'
``misc/in21k_to_1k_class_map.json`` entry for entry (999 pairs). A JSON file in the authors'
format ``{"in1k_idx": [...], "in21k_idx": [...]}`` can be given instead.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Tuple, Union

import torch

from ..errors import CheckpointError, ConfigError

__all__ = ['IN21K_CLASSES', 'IN1K_CLASSES', 'in21k_to_in1k_class_map', 'load_class_map', 'map_head_rows']

IN21K_CLASSES = 21841
IN1K_CLASSES = 1000


def in21k_to_in1k_class_map() -> Dict[str, List[int]]:
    """``{'in1k_idx': [...], 'in21k_idx': [...]}``: 1K class i takes 21K row j, from timm's synset lists."""
    from timm.data import ImageNetInfo
    in1k = ImageNetInfo('imagenet-1k').label_names()
    in22k = ImageNetInfo('imagenet-22k').label_names()
    row = {wnid: j for j, wnid in enumerate(in22k)}
    pairs = [(i, row[w]) for i, w in enumerate(in1k) if w in row]
    return {'in1k_idx': [i for i, _ in pairs], 'in21k_idx': [j for _, j in pairs]}


def load_class_map(spec: Union[str, Path, Mapping[str, List[int]]]) -> Dict[str, List[int]]:
    """'in21k_to_in1k' (built in), a JSON file path, or a mapping with ``in1k_idx`` / ``in21k_idx``."""
    if isinstance(spec, Mapping):
        data = dict(spec)
        where = 'the class map'
    elif str(spec) == 'in21k_to_in1k':
        return in21k_to_in1k_class_map()
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"class map not found: {path} (use head_map=in21k_to_in1k for the built-in map)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f'cannot parse class map {path} as JSON: {e}') from None
        where = str(path)
    if not isinstance(data, dict) or 'in1k_idx' not in data or 'in21k_idx' not in data:
        raise ConfigError(f"{where} must be a JSON object with lists 'in1k_idx' and 'in21k_idx'")
    a, b = list(data['in1k_idx']), list(data['in21k_idx'])
    if len(a) != len(b):
        raise ConfigError(f"{where}: 'in1k_idx' has {len(a)} entries but 'in21k_idx' has {len(b)}")
    return {'in1k_idx': [int(x) for x in a], 'in21k_idx': [int(x) for x in b]}


def map_head_rows(state_dict: Mapping[str, torch.Tensor], class_map: Union[str, Path, Mapping] = 'in21k_to_in1k',
                  num_source: int = IN21K_CLASSES, num_target: int = IN1K_CLASSES,
                  fill: str = 'mean') -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Remap every tensor whose first dimension is ``num_source`` (classifier weight and bias)
    to ``num_target`` rows: row ``in1k_idx[k]`` ← source row ``in21k_idx[k]``; target rows the
    map does not cover get the mean of all source rows (``fill='mean'``) or zeros.

    Returns the new state dict and the names of the remapped tensors.
    """
    cmap = load_class_map(class_map)
    dst = torch.tensor(cmap['in1k_idx'], dtype=torch.long)
    src = torch.tensor(cmap['in21k_idx'], dtype=torch.long)
    if len(dst) and (int(dst.max()) >= num_target or int(dst.min()) < 0):
        raise ConfigError(f'class map targets index {int(dst.max())} outside 0..{num_target - 1}')
    if len(src) and (int(src.max()) >= num_source or int(src.min()) < 0):
        raise ConfigError(f'class map reads source row {int(src.max())} outside 0..{num_source - 1}')
    covered = torch.zeros(num_target, dtype=torch.bool)
    covered[dst] = True
    out: Dict[str, torch.Tensor] = {}
    mapped = []
    for k, v in state_dict.items():
        if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == num_source:
            if fill == 'mean':
                new = v.mean(0, keepdim=True).expand(num_target, *v.shape[1:]).clone()
            else:
                new = v.new_zeros((num_target, *v.shape[1:]))
            new[dst] = v[src]
            out[k] = new
            mapped.append(k)
        else:
            out[k] = v
    if not mapped:
        raise CheckpointError(f'head mapping asked for, but no tensor in the checkpoint has {num_source} rows '
                              f'(is it a 21K checkpoint?)')
    return out, mapped
