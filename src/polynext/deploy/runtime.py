"""Run a polynext ONNX export with ONNX Runtime, as a drop-in for the eager model.

``OnnxRuntimeModel(path)`` reads the file's polynext metadata (a file without it is refused with
one message), opens a CPU session and is called like the model: a float tensor (N, C, H, W) in,
logits as a tensor out. It has what ``polynext.train.validate.evaluate`` and the benchmark use
(``eval``, ``train(False)``, ``to``, ``num_classes``, ``pretrained_cfg``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..errors import CheckpointError, ConfigError
from .export import ONNX_FORMAT_TAG, ONNX_INPUT, onnx_session

__all__ = ['OnnxRuntimeModel', 'read_onnx_metadata']


def read_onnx_metadata(path) -> Dict[str, Any]:
    """polynext's metadata of an ONNX file (JSON values decoded); a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'ONNX file not found: {path}')
    try:
        import onnx
    except ImportError:
        raise ConfigError('reading ONNX files needs onnx and onnxruntime; pip install "polynext[export]"') from None
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001  (protobuf decode errors have several types)
        raise CheckpointError(f'{path} is not a readable ONNX file ({type(e).__name__}); export it with '
                              f'polynext export MODEL {path.name}') from None
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get('polynext_format') != ONNX_FORMAT_TAG:
        found = f"format {props['polynext_format']!r}" if 'polynext_format' in props else 'no polynext metadata'
        raise CheckpointError(f'{path} is not a polynext ONNX export ({found}; producer {proto.producer_name!r}); '
                              f'export the model with polynext export MODEL {path.name}, which records the '
                              f'architecture, classes and preprocessing this command needs')
    meta: Dict[str, Any] = {}
    for k, v in props.items():
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            meta[k] = v
    return meta


class OnnxRuntimeModel:
    """A polynext ONNX export behind the eager model's calling convention."""

    training = False

    def __init__(self, path, threads: Optional[int] = None):
        self.path = Path(path)
        self.metadata = read_onnx_metadata(self.path)
        self.session = onnx_session(str(self.path), threads)
        self.num_classes = int(self.metadata.get('num_classes') or 0)
        self.architecture = self.metadata.get('architecture')
        self.pretrained_cfg = dict(self.metadata.get('pretrained_cfg') or {}, architecture=self.architecture)
        self.input = self.metadata.get('input') or {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input.get('dynamic_size', True):
            size = (self.input['height'], self.input['width'])
            if tuple(x.shape[-2:]) != size:
                raise ConfigError(f'{self.path.name} takes {size[0]}x{size[1]} inputs only '
                                  f'({self.input.get("fixed_reason", "fixed at export")}), got '
                                  f'{x.shape[-2]}x{x.shape[-1]}; evaluate it at {size[0]} px')
        out = self.session.run(None, {ONNX_INPUT: x.detach().float().contiguous().cpu().numpy()})[0]
        return torch.from_numpy(out)

    forward = __call__

    def eval(self) -> 'OnnxRuntimeModel':
        return self

    def train(self, mode: bool = True) -> 'OnnxRuntimeModel':
        if mode:
            raise RuntimeError('an ONNX Runtime session is for inference only')
        return self

    def to(self, *args, **kwargs) -> 'OnnxRuntimeModel':
        return self

    def parameters(self):
        return iter(())

    def __repr__(self) -> str:
        return f'OnnxRuntimeModel({self.path}, architecture={self.architecture})'
