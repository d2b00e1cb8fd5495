"""UperNet segmentor over any timm ``features_only`` backbone with strides 4/8/16/32.

    image → backbone stages (strides 4, 8, 16, 32) → per-stage output norms (optional)
          → UPerHead → logits at stride 4            (+ FCNHead on stage ``aux_index`` when training)

* ``SegmentationBackbone``: timm's ``features_only`` wrapper of any model (PolyNeXt, the
  MetaFormer baselines, ConvNeXt, ResNet, ...; for PolyNeXt timm's ``FeatureGetterNet`` holds
  the network at ``.model``), the four stride-4/8/16/32 outputs, and the reference wrapper's
  ``extra_norms``: a fresh channel LayerNorm **with bias** (eps 1e-5, weight 1, bias 0) on
  every stage output.
* ``UperNet``: backbone + ``decode_head`` (UPerHead) + ``auxiliary_head`` (FCNHead, used for
  the auxiliary loss only). ``forward`` returns ``{'out': logits}`` (+ ``'aux'`` in training
  mode) at the heads' strides; ``encode_decode`` resizes the logits to the input size.
* ``SegmentorSpec``: everything that defines the architecture (stored in every checkpoint's
  metadata, so ``polynext seg eval`` rebuilds the model from the weights file alone).
* ``build_segmentor(spec, checkpoint=None)``: the model; ``checkpoint`` is a *classification*
  checkpoint for the backbone (ours, the authors' ``.pt``, timm's or sail-sg's layout). It is
  loaded strictly into the full classifier first (``polynext.create_model``: every backbone
  key must be present with the right shape, one clear error otherwise), then timm builds the
  feature backbone from those weights (its state-dict pass-through, still strict) and drops
  the classifier. The extra norms and heads stay fresh.

Without a checkpoint the backbone keeps its own initialisation (PolyNeXt: the reference's
Kaiming "POLY" init of classification training). The reference segmentation wrapper would
re-initialise every backbone conv with trunc_normal(std 0.02) before loading; that only
matters for training from scratch, which the paper never does.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError
from .heads import FCNHead, UPerHead

__all__ = ['SegmentorSpec', 'SegmentationBackbone', 'UperNet', 'build_segmentor', 'load_segmentor', 'build_feature_body',
           'REQUIRED_STRIDES', 'find_polynext']

REQUIRED_STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class SegmentorSpec:
    """The architecture of an UperNet segmentor (no training settings)."""
    backbone: str = 'cpolynext_s'
    num_classes: int = 150
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)   # extra timm.create_model arguments
    drop_path: float = 0.0                 # backbone stochastic depth (linear over the blocks)
    extra_norms: bool = True               # fresh LayerNorm (with bias) on every stage output
    channels: int = 512                    # UPerHead width
    pool_scales: Tuple[int, ...] = (1, 2, 3, 6)
    dropout: float = 0.1                   # Dropout2d before both classifiers
    aux_channels: int = 256                # FCNHead width; 0: no auxiliary head
    aux_index: int = 2                     # stage feeding the FCNHead (stride 16)
    align_corners: bool = False

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d['pool_scales'] = list(self.pool_scales)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'SegmentorSpec':
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            raise CheckpointError(f"unknown segmentor setting '{unknown[0]}' in the checkpoint metadata "
                                  f'(written by a newer polynext?)')
        d = dict(d)
        if 'pool_scales' in d:
            d['pool_scales'] = tuple(d['pool_scales'])
        return cls(**d)


def find_polynext(module: nn.Module) -> Optional[nn.Module]:
    """The PolyNeXt network inside a (wrapped) backbone, or ``None``."""
    from ..models.polynext import PolyNeXt
    for m in module.modules():
        if isinstance(m, PolyNeXt):
            return m
    return None


def _create(name: str, **kwargs: Any) -> nn.Module:
    from ..factory import create_model
    return create_model(name, **kwargs)


class SegmentationBackbone(nn.Module):
    """timm ``features_only`` body → the stride-4/8/16/32 stage outputs [→ ``extra_norms``]."""

    def __init__(self, body: nn.Module, name: str = '', extra_norms: bool = True, task: str = 'UperNet'):
        super().__init__()
        info = body.feature_info
        reductions, channels = list(info.reduction()), list(info.channels())
        take = [reductions.index(s) if s in reductions else None for s in REQUIRED_STRIDES]
        if None in take:
            raise ConfigError(
                f"backbone '{name}' gives features at strides {reductions}; {task} needs strides "
                f"{list(REQUIRED_STRIDES)} (low-resolution models such as cpolynext_lr do not have them); choose a "
                f"four-stage backbone such as cpolynext_t or convformer_s18")
        self.body = body
        self.take = take
        self.channels = [channels[i] for i in take]
        from ..models.polynext import LayerNorm2d
        self.extra_norms = (nn.ModuleList([LayerNorm2d(c, eps=1e-5, bias=True) for c in self.channels])
                            if extra_norms else None)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone in backward instead of keeping its activations (timm's
        ``set_grad_checkpointing`` of the model inside the ``features_only`` wrapper; PolyNeXt: per cell)."""
        model = self.body if hasattr(self.body, 'set_grad_checkpointing') else getattr(self.body, 'model', None)
        if model is None or not hasattr(model, 'set_grad_checkpointing'):
            raise ConfigError(f'grad_checkpointing: the backbone {type(self.body).__name__} has no '
                              f'set_grad_checkpointing; drop --set grad_checkpointing=true')
        model.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = self.body(x)
        feats = [feats[i] for i in self.take]
        if self.extra_norms is not None:
            feats = [norm(f) for norm, f in zip(self.extra_norms, feats)]
        return feats


class UperNet(nn.Module):
    """UperNet: ``backbone`` → ``decode_head`` (UPerHead) [+ ``auxiliary_head`` (FCNHead)]."""

    def __init__(self, backbone: SegmentationBackbone, num_classes: int = 150, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, aux_channels: int = 256,
                 aux_index: int = 2, align_corners: bool = False):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.decode_head = UPerHead(backbone.channels, channels, num_classes, pool_scales, dropout, align_corners)
        self.aux_index = aux_index
        self.auxiliary_head = (FCNHead(backbone.channels[aux_index], aux_channels, num_classes, num_convs=1,
                                       concat_input=False, dropout=dropout) if aux_channels else None)
        self.spec: Optional[SegmentorSpec] = None

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{'out': decode logits at stride 4}`` (+ ``'aux'`` at stride 16 in training mode)."""
        feats = self.backbone(x)
        out = {'out': self.decode_head(feats)}
        if self.training and self.auxiliary_head is not None:
            out['aux'] = self.auxiliary_head(feats[self.aux_index])
        return out

    def encode_decode(self, x: torch.Tensor) -> torch.Tensor:
        """Decode logits resized (bilinear) to the input's size (mmseg ``encode_decode``)."""
        logits = self(x)['out']
        return F.interpolate(logits, size=x.shape[2:], mode='bilinear', align_corners=self.align_corners)

    @torch.jit.ignore
    def set_cell_grad_clip(self, max_norm: Optional[float]) -> bool:
        """Per-cell gradient clipping of a PolyNeXt backbone (the reference's APolyNeXt setting);
        ``False`` when the backbone is not a PolyNeXt."""
        net = find_polynext(self.backbone)
        if net is None:
            return False
        net.set_cell_grad_clip(max_norm)
        return True

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the backbone (the heads keep their activations)."""
        self.backbone.set_grad_checkpointing(enable)


def _checkpoint_architecture(checkpoint: Union[str, Path, Mapping[str, Any]]) -> Optional[str]:
    """The classifier a polynext checkpoint says it holds (safetensors metadata, or a training state's config);
    None where it does not say."""
    from ..checkpoint import read_safetensors_metadata
    if isinstance(checkpoint, (str, Path)):
        name = read_safetensors_metadata(checkpoint).get('architecture')
    elif str(checkpoint.get('format', '')).startswith('polynext.train') and isinstance(checkpoint.get('config'), Mapping):
        name = checkpoint['config'].get('model')
    else:
        name = None
    return name if isinstance(name, str) else None


def _describe(checkpoint: Union[str, Path, Mapping[str, Any]]) -> str:
    return str(checkpoint) if isinstance(checkpoint, (str, Path)) else 'the checkpoint'


def build_feature_body(backbone: str, backbone_kwargs: Optional[Mapping[str, Any]] = None, drop_path: float = 0.0,
                       checkpoint: Optional[Union[str, Path, Mapping[str, Any]]] = None,
                       prefer_ema: bool = True, task: str = 'UperNet') -> nn.Module:
    """timm ``features_only`` body of ``backbone``; ``checkpoint``: classification weights (strict).

    Shared by the dense-prediction tasks (segmentation, detection)."""
    from ..factory import check_model_name
    check_model_name(backbone)
    kw = dict(backbone_kwargs or {})
    for forbidden in ('features_only', 'out_indices', 'pretrained', 'num_classes'):
        if forbidden in kw:
            raise ConfigError(f"backbone_kwargs may not set '{forbidden}' (the {task} model sets it)")
    load_kw: Dict[str, Any] = {}
    if checkpoint is not None:
        trained_as = _checkpoint_architecture(checkpoint)
        if trained_as and trained_as != backbone:
            raise CheckpointError(f'{_describe(checkpoint)} holds {trained_as} weights, not {backbone}: pass '
                                  f'--backbone {trained_as}, or a checkpoint of {backbone}')
        # strict load into the full classifier: any layout, class count from the checkpoint, clear errors
        full = _create(backbone, checkpoint=checkpoint, prefer_ema=prefer_ema, **kw)
        n_cls = int(getattr(full, 'num_classes', 0) or 0)
        # timm builds the feature backbone from these weights (pass-through state dict, strict: the
        # overlay's num_classes=0 equals the features' 0, so timm does not relax strictness) and then
        # drops the classifier
        load_kw = dict(pretrained=True, num_classes=n_cls,
                       pretrained_cfg_overlay=dict(state_dict=full.state_dict(), num_classes=0))
        del full
    if drop_path:
        kw['drop_path_rate'] = drop_path
    try:
        body = _create(backbone, features_only=True, **load_kw, **kw)
    except RuntimeError as e:   # a strict-load failure inside timm (should not happen after the check above)
        raise CheckpointError(f'cannot load the backbone weights into {backbone}: {str(e).splitlines()[0]}') \
            from None
    net = find_polynext(body)
    if net is not None and net.norm_kind == 'bn':
        raise ConfigError(
            f"'{backbone}' is a fully polynomial (bn) variant: its norms have per-position weights tied to "
            f"one input size, so it cannot process images of other sizes; use the LayerNorm model instead")
    return body


def build_segmentor(spec: SegmentorSpec, checkpoint: Optional[Union[str, Path, Mapping[str, Any]]] = None,
                    prefer_ema: bool = True) -> UperNet:
    """The UperNet of ``spec``; ``checkpoint``: classification weights for the backbone (strict)."""
    body = build_feature_body(spec.backbone, spec.backbone_kwargs, spec.drop_path, checkpoint, prefer_ema)
    backbone = SegmentationBackbone(body, spec.backbone, extra_norms=spec.extra_norms)
    if not 0 <= spec.aux_index < len(backbone.channels):
        raise ConfigError(f'aux_index {spec.aux_index} is not a stage index (0-{len(backbone.channels) - 1})')
    model = UperNet(backbone, spec.num_classes, spec.channels, spec.pool_scales, spec.dropout, spec.aux_channels,
                    spec.aux_index, spec.align_corners)
    model.spec = spec
    return model


def spec_metadata(spec: SegmentorSpec) -> Dict[str, str]:
    """safetensors metadata that ``load_segmentor`` reads back."""
    return {'polynext_segmentor': json.dumps(spec.to_dict())}


def gives_dense_features(backbone: str) -> bool:
    """Whether ``backbone`` has stages at strides 4, 8, 16 and 32 (what UperNet and FPN need); built on the meta
    device (no memory, no initialisation) where the model allows it."""
    try:
        try:
            with torch.device('meta'):
                body = build_feature_body(backbone)
        except (RuntimeError, NotImplementedError, CheckpointError):   # models that initialise from tensors
            body = build_feature_body(backbone)
    except Exception:  # noqa: BLE001 - an unknown or unbuildable name gives no dense features
        return False
    return set(REQUIRED_STRIDES) <= set(body.feature_info.reduction())


def classifier_next_steps(path: Path, classifier: str, command: str) -> str:
    """What to do with the classifier checkpoint ``path`` given to a dense-prediction ``command`` (``seg`` or
    ``det``): validate it, and train on it where its backbone has the strides the task needs."""
    steps = f'evaluate it with `polynext validate --checkpoint {path}`'
    task = dict(seg='segmentor', det='detector')[command]
    if gives_dense_features(classifier):
        return (f'{steps}, or train a {task} on it with `polynext {command} train --backbone {classifier} '
                f'--initial-checkpoint {path}`')
    return f'{steps} ({classifier} has no stride-4/8/16/32 stages, so it cannot be the backbone of a {task})'


def _not_a_segmentor(path: Path, classifier: Optional[str]) -> str:
    """Why ``path`` cannot be evaluated as a segmentor, and what to do with it instead."""
    if classifier:
        return f'{path} is a classifier ({classifier}), not a segmentor: ' + classifier_next_steps(path, classifier,
                                                                                                    'seg')
    return (f'{path} holds no segmentor (it was not written by `polynext seg train`); pass a run folder of '
            f'`polynext seg train` or a file in it')


def load_segmentor(path: Union[str, Path], spec: Optional[SegmentorSpec] = None) -> UperNet:
    """A trained segmentor from a ``.safetensors`` (spec in its metadata) or ``*.state.pt`` file."""
    from ..checkpoint import load_state_dict_strict, read_checkpoint
    path = Path(path)
    if path.is_dir():
        for name in ('best.safetensors', 'last.safetensors'):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f'no best.safetensors or last.safetensors in {path}')
    obj = read_checkpoint(path)
    if path.suffix == '.safetensors':
        sd = obj
        if spec is None:
            from ..checkpoint import read_safetensors_metadata
            meta = read_safetensors_metadata(path)
            description = meta.get('polynext_segmentor')
            if not isinstance(description, dict):
                raise CheckpointError(_not_a_segmentor(path, meta.get('architecture')))
            spec = SegmentorSpec.from_dict(description)
    else:
        if not isinstance(obj, dict) or 'model' not in obj:
            raise CheckpointError(f'{path} is neither a segmentor weights file (.safetensors) nor a training state; '
                                  f'pass a run folder of `polynext seg train` or a file in it')
        sd = obj['model']
        if spec is None:
            if 'spec' not in obj:
                config = obj.get('config') if isinstance(obj.get('config'), dict) else {}
                raise CheckpointError(_not_a_segmentor(path, config.get('model')))
            spec = SegmentorSpec.from_dict(obj['spec'])
    model = build_segmentor(dataclasses.replace(spec, drop_path=0.0))
    load_state_dict_strict(model, sd)
    return model
