"""polynext model families; importing this registers them with timm."""
from .polynext import *  # noqa: F401,F403
from .polynext import PolyNeXt, PUBLISHED_ARCHS, ABLATIONS, REFERENCE_NAMES
