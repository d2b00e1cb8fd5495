"""The folder where polynext keeps what it learns about this machine: ``$POLYNEXT_CACHE_DIR``, else
``$XDG_CACHE_HOME/polynext`` or ``~/.cache/polynext`` (the 1x1 kernel choices of ``ops.pointwise``, the
compiled kernels of ``ops.channel_norm``)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ['cache_dir']


def cache_dir() -> Path:
    root = os.environ.get('POLYNEXT_CACHE_DIR')
    if not root:
        root = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache'), 'polynext')
    return Path(root).expanduser()
