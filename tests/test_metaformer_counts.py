"""Exact parameter counts and MACs of the MetaFormer baselines (spec metaformer_baselines.md §1,
measured from the authors' code; paper Tables 3, 4 and 5).

Models are built on the meta device: shapes only, so even M48 / B36 cost a fraction of a second.
"""
import pytest
import timm
import torch

from polynext.models import METAFORMER_MODELS
from polynext.profile import count_macs, count_params

# name: (trainable params, frozen random-matrix entries) at 224, 1000 classes
PARAMS = {
    'identityformer_s12': (11_891_712, 0),
    'identityformer_s24': (21_341_464, 0),
    'identityformer_s36': (30_791_216, 0),
    'identityformer_m36': (56_077_168, 0),
    'identityformer_m48': (73_346_056, 0),
    'randformer_s12': (11_891_712, 235_298),    # 6·196² + 2·49²
    'randformer_s24': (21_341_464, 470_596),
    'randformer_s36': (30_791_216, 705_894),
    'randformer_m36': (56_077_168, 705_894),
    'randformer_m48': (73_346_056, 941_192),
    'poolformerv2_s12': (11_891_712, 0),
    'poolformerv2_s24': (21_341_464, 0),
    'poolformerv2_s36': (30_791_216, 0),
    'poolformerv2_m36': (56_077_168, 0),
    'poolformerv2_m48': (73_346_056, 0),
    'convformer_s18': (26_774_448, 0),
    'convformer_s36': (40_012_152, 0),
    'convformer_m36': (57_051_640, 0),
    'convformer_b36': (99_882_616, 0),
    'caformer_s18': (26_341_656, 0),
    'caformer_s36': (39_297_102, 0),
    'caformer_m36': (56_204_878, 0),
    'caformer_b36': (98_753_614, 0),
    'identityformer_s_iso': (21_924_352, 0),
    'identityformer_s_iso_convstem': (22_508_080, 0),
}

# the paper's rounded values: params (M, frozen M) and GMACs at 224
PAPER = {
    'identityformer_s12': (11.9, 0, 1.8), 'identityformer_s24': (21.3, 0, 3.4), 'identityformer_s36': (30.8, 0, 5.0),
    'identityformer_m36': (56.1, 0, 8.8), 'identityformer_m48': (73.3, 0, 11.5),
    'randformer_s12': (11.9, 0.2, 1.9), 'randformer_s24': (21.3, 0.5, 3.5), 'randformer_s36': (30.8, 0.7, 5.2),
    'randformer_m36': (56.1, 0.7, 9.0), 'randformer_m48': (73.3, 0.9, 11.9),
    'poolformerv2_s12': (11.9, 0, 1.8), 'poolformerv2_s24': (21.3, 0, 3.4), 'poolformerv2_s36': (30.8, 0, 5.0),
    'poolformerv2_m36': (56.1, 0, 8.8), 'poolformerv2_m48': (73.3, 0, 11.5),
    'convformer_s18': (27, 0, 3.9), 'convformer_s36': (40, 0, 7.6), 'convformer_m36': (57, 0, 12.8),
    'convformer_b36': (100, 0, 22.6),
    'caformer_s18': (26, 0, 4.1), 'caformer_s36': (39, 0, 8.0), 'caformer_m36': (56, 0, 13.2),
    'caformer_b36': (99, 0, 23.2),
    'identityformer_s_iso': (22, 0, 4.2), 'identityformer_s_iso_convstem': (23, 0, 4.6),
}

# one model per family (and both isotropic stems): exact MACs at 224
MACS = {
    'identityformer_s12': 1_812_267_008,
    'randformer_s12': 1_888_484_352,       # + 6·196²·320 + 2·49²·512 for the random mixing
    'poolformerv2_s12': 1_812_267_008,     # pooling is not a MAC
    'convformer_s18': 3_940_984_320,
    'caformer_s18': 4_106_941_440,         # attention matmuls counted (fused attention switched off)
    'identityformer_s_iso': 4_219_984_896,
    'identityformer_s_iso_convstem': 4_640_861_184,
}


def _meta_model(name, **kwargs):
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


def _frozen(model):
    return sum(b.numel() for n, b in model.named_buffers() if n.endswith('random_matrix'))


def test_every_model_is_counted():
    assert list(PARAMS) == list(METAFORMER_MODELS) == list(PAPER)


@pytest.mark.parametrize('name', list(PARAMS))
def test_params_exact_and_paper_rounding(name):
    model = _meta_model(name)
    params, frozen = PARAMS[name]
    assert count_params(model) == count_params(model, trainable_only=True) == params
    assert _frozen(model) == frozen
    paper_params, paper_frozen, _ = PAPER[name]
    digits = 1 if isinstance(paper_params, float) else 0
    assert round(params / 1e6, digits) == paper_params
    assert round(frozen / 1e6, 1) == paper_frozen


@pytest.mark.parametrize('name', list(MACS))
def test_macs_exact_and_paper_rounding(name):
    macs = count_macs(_meta_model(name))
    assert macs == MACS[name]
    assert round(macs / 1e9, 1) == PAPER[name][2]


def test_meta_device_count_equals_real_model():
    real = timm.create_model('randformer_s12')
    assert count_macs(real) == MACS['randformer_s12']
    assert count_params(real) + _frozen(real) == sum(PARAMS['randformer_s12'])


def test_macs_by_op_randformer():
    """RandFormer = IdentityFormer + one matmul per random-mixing block (196²·320 in stage 3, 49²·512 in stage 4)."""
    _, rand_ops = count_macs(_meta_model('randformer_s12'), by_op=True)
    _, id_ops = count_macs(_meta_model('identityformer_s12'), by_op=True)
    assert rand_ops == dict(id_ops, mm=6 * 196 ** 2 * 320 + 2 * 49 ** 2 * 512)
    assert id_ops == {'convolution': 1_811_755_008, 'addmm': 512 * 1000}
