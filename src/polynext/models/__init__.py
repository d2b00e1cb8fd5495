"""polynext model families; importing this registers them with timm.

``POLYNEXT_MODELS`` lists every architecture polynext offers, in display order.
"""
from .polynext import *  # noqa: F401,F403
from .polynext import ABLATIONS, PUBLISHED_ARCHS, REFERENCE_NAMES, PolyNeXt

POLYNEXT_MODELS = list(PUBLISHED_ARCHS)


def model_source(name: str) -> str:
    """Where a model's implementation comes from (for listings)."""
    arch = name.split('.')[0]
    if arch in PUBLISHED_ARCHS:
        return 'polynext (PolyNeXt, ICML 2026)'
    return 'timm'
