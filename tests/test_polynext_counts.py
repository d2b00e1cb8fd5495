"""Exact parameter counts and MACs (spec §8 and §13, measured from the reference code)."""
import pytest
import timm

from polynext.profile import count_macs, count_params

from conftest import mini_kwargs

# name: (params at published size, MACs at 224 (LowRes: 32, 10 classes))
FULL = {
    'cpolynext_t': (6_431_752, 1_198_988_208),
    'cpolynext_s': (25_654_376, 4_780_196_208),
    'cpolynext_b': (39_753_160, 8_495_534_712),
    'cpolynext_l': (57_359_272, 12_618_775_872),
    'apolynext_t': (6_530_380, 1_342_081_536),
    'apolynext_s': (26_287_948, 5_290_033_760),
    'apolynext_b': (40_896_400, 9_311_661_072),
    'apolynext_l': (57_404_020, 13_350_370_176),
    'cpolynext_t_bn': (6_495_599, 1_198_988_208),   # incl. per-position tensors at 224
    'apolynext_t_bn': (6_612_791, 1_342_081_536),
    'cpolynext_s_bn': (25_756_884, 4_780_196_208),
    'cpolynext_lr': (5_460_322, 704_697_984),
}

# mini models (C0 = 16, 10 classes, bn at 64 px): params and state-dict entries (spec §13)
MINI = {
    'cpolynext_t': (703_770, 390), 'cpolynext_s': (1_332_738, 668), 'cpolynext_b': (1_543_698, 855),
    'cpolynext_l': (1_723_082, 975), 'apolynext_t': (741_000, 438), 'apolynext_s': (1_406_746, 756),
    'apolynext_b': (1_618_610, 959), 'apolynext_l': (1_798_898, 1095), 'cpolynext_lr': (304_906, 262),
    'cpolynext_t_bn': (708_982, 730), 'apolynext_t_bn': (747_820, 970), 'cpolynext_s_bn': (1_341_106, 1260),
}


@pytest.mark.parametrize('name', list(FULL))
def test_full_size_params_and_macs(name):
    model = timm.create_model(name)
    params, macs = FULL[name]
    assert count_params(model) == params
    assert count_macs(model) == macs


@pytest.mark.parametrize('name', list(MINI))
def test_mini_params_and_state_dict_entries(name):
    model = timm.create_model(name, **mini_kwargs(name))
    params, entries = MINI[name]
    assert count_params(model) == params
    assert len(model.state_dict()) == entries


def test_lowres_tiny_imagenet_size():
    model = timm.create_model('cpolynext_lr', num_classes=200)
    assert count_params(model) == 5_569_952
    assert round(count_macs(model, 64) / 1e9, 4) == 2.8189


def test_published_macs_breakdown_apolynext_t():
    total, ops = count_macs(timm.create_model('apolynext_t'), by_op=True)
    assert ops == {'convolution': 1_204_129_920, 'bmm': 137_375_616, 'addmm': 576_000}
