"""polynext model families; importing this registers them with timm.

``POLYNEXT_MODELS`` lists every architecture polynext offers, in display order.
"""
from .polynext import *  # noqa: F401,F403
from .polynext import ABLATIONS, PUBLISHED_ARCHS, REFERENCE_NAMES, PolyNeXt
from .metaformer_baselines import *  # noqa: F401,F403
from .folded import *  # noqa: F401,F403
from .metaformer_baselines import BASELINE_ARCHS, METAFORMER_MODELS, TIMM_ARCHS

POLYNEXT_MODELS = list(PUBLISHED_ARCHS) + list(METAFORMER_MODELS)


def model_source(name: str) -> str:
    """Where a model's implementation comes from (for listings)."""
    arch = name.split('.')[0]
    if arch in PUBLISHED_ARCHS:
        return 'polynext (PolyNeXt, ICML 2026)'
    if arch in BASELINE_ARCHS:
        return 'polynext (MetaFormer baselines)'
    if arch in TIMM_ARCHS:
        return 'timm (MetaFormer baselines)'
    return 'timm'
