"""polynext: activation-free polynomial vision backbones (PolyNeXt) and MetaFormer baselines,
as timm models. ``import polynext`` registers every model with timm."""
__version__ = '0.1.0'

from .checkpoint import load_weights, read_checkpoint, unwrap_state_dict
from .errors import CheckpointError, ConfigError, DataError, PolyNeXtError
from .factory import create_model, list_models
from .models import (
    ABLATIONS, PUBLISHED_ARCHS, ChannelBatchNorm, ChannelScale, FreeScale, GatedHead, HadamardProduct,
    HeadDropout, LayerNorm2d, LayerScaleGates, PolyAttn, PolyAttnBlock, PolyConv, PolyConvBlock, PolyMLP,
    PolyNeXt, PolyNeXtCell, PolyNeXtStage, RunningRowSumNorm, SigmoidScale, Ablation, load_reference_state_dict,
)
from .models import (
    METAFORMER_ABLATIONS, METAFORMER_MODELS, IsotropicMetaFormer, MetaFormerOptions, RandFormer, RandomMixing,
    apply_authors_head,
)
from .models.folded import FoldedPolyNeXt, fold_for_inference
from .deploy.hub import save_pretrained
from .ops import poly_attention

__all__ = [
    'ABLATIONS', 'Ablation', 'PUBLISHED_ARCHS', 'ChannelBatchNorm', 'ChannelScale', 'FreeScale', 'GatedHead',
    'HadamardProduct', 'HeadDropout', 'LayerNorm2d', 'LayerScaleGates', 'PolyAttn', 'PolyAttnBlock', 'PolyConv',
    'PolyConvBlock', 'PolyMLP', 'PolyNeXt', 'PolyNeXtCell', 'PolyNeXtStage', 'RunningRowSumNorm', 'SigmoidScale',
    'load_reference_state_dict', 'load_weights', 'read_checkpoint', 'unwrap_state_dict', 'poly_attention',
    'CheckpointError', 'ConfigError', 'DataError', 'PolyNeXtError', 'create_model', 'list_models',
    'METAFORMER_ABLATIONS', 'METAFORMER_MODELS', 'IsotropicMetaFormer', 'MetaFormerOptions', 'RandFormer',
    'RandomMixing', 'apply_authors_head', 'FoldedPolyNeXt', 'fold_for_inference', 'save_pretrained',
]
