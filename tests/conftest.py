import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault('TIMM_FUSED_ATTN', '1')
# one intra-op thread per xdist worker (2 workers on 2 cores); 2 threads in a plain run
torch.set_num_threads(1 if os.environ.get('PYTEST_XDIST_WORKER') else min(2, os.cpu_count() or 1))

import polynext  # noqa: E402,F401  (registers the models)

GOLDEN = Path(__file__).parent / 'golden'

#: golden folder -> (our model name, extra kwargs of the mini model)
GOLDEN_MODELS = {
    'CPolyNeXt_T': ('cpolynext_t', {}),
    'APolyNeXt_T': ('apolynext_t', {}),
    'LowRes': ('cpolynext_lr', {}),
    'CPolyNeXt_T_bn': ('cpolynext_t_bn', {'img_size': 64}),
    'CPolyNeXt_S': ('cpolynext_s', {}),
    'CPolyNeXt_L': ('cpolynext_l', {}),
    'APolyNeXt_T_bn': ('apolynext_t_bn', {'img_size': 64}),
    'CPolyNeXt_S_bn': ('cpolynext_s_bn', {'img_size': 64}),
}


def mini_kwargs(name: str, **extra):
    """The golden 'mini' build of a published model: C0 = 16, 10 classes (bn at 64 px)."""
    kw = dict(init_channels=16, num_classes=10)
    if name.endswith('_bn'):
        kw['img_size'] = 64
    kw.update(extra)
    return kw


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
