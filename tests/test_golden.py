"""The models reproduce the authors' reference implementation (golden data in tests/golden).

The golden sets are produced by the authors' code (``tools/make_golden.py --reference-dir DIR``
regenerates them byte for byte). Tolerances are the measured error plus a margin (2-core AMD EPYC,
torch 2.14.1, channels-last and NCHW):

* eval logits: polynext differs from the reference by ≤ 2.2e-6 (at most 0.4 of the tolerance);
* train-mode logits of the bn models (batch statistics): ≤ 5.1e-6 (CPolyNeXt_S_bn; the reference's
  own float32 result is 8.5e-6 away from its float64 one there), so 2x looser;
* running buffers after that forward: ≤ 6.1e-5 absolute on variances up to ~50 (≤ 0.2 of it).
"""
import json
from unittest import mock

import pytest
import timm
import torch
from safetensors.torch import load_file

import polynext
from polynext import load_reference_state_dict
from polynext.models.polynext import reference_key_map

from conftest import GOLDEN, GOLDEN_MODELS

#: eval logits: measured ≤ 2.2e-6 (|logits| ≤ 0.7)
ATOL, RTOL = 5e-6, 1e-5
#: train-mode logits of the bn models: measured ≤ 5.1e-6
TRAIN_ATOL, TRAIN_RTOL = 1e-5, 2e-5
#: running buffers after one train-mode forward: measured ≤ 6.1e-5 absolute on values up to ~50
BUF_ATOL, BUF_RTOL = 1e-6, 5e-6

BN_FOLDERS = [f for f in GOLDEN_MODELS if (GOLDEN / f / 'output_train.safetensors').exists()]


def _load(folder):
    d = GOLDEN / folder
    sd = load_file(str(d / 'state_dict.safetensors'))
    x = load_file(str(d / 'input.safetensors'))['x']
    y = load_file(str(d / 'output.safetensors'))['logits']
    return sd, x, y


def _mini(folder, **kw):
    name, extra = GOLDEN_MODELS[folder]
    return timm.create_model(name, init_channels=16, num_classes=10, **extra, **kw)


def _loaded(folder, **kw):
    sd, x, y = _load(folder)
    model = _mini(folder, **kw)
    load_reference_state_dict(model, sd)
    return model, x, y


def test_golden_sets_cover_every_kind_of_published_model():
    """T, S and L sizes, conv and attention, LowRes, and all three fully polynomial (bn) models."""
    assert set(GOLDEN_MODELS) == {'CPolyNeXt_T', 'APolyNeXt_T', 'LowRes', 'CPolyNeXt_T_bn', 'CPolyNeXt_S',
                                  'CPolyNeXt_L', 'APolyNeXt_T_bn', 'CPolyNeXt_S_bn'}
    assert {f: GOLDEN_MODELS[f][0] for f in BN_FOLDERS} == {
        'CPolyNeXt_T_bn': 'cpolynext_t_bn', 'APolyNeXt_T_bn': 'apolynext_t_bn', 'CPolyNeXt_S_bn': 'cpolynext_s_bn'}
    for folder, (name, _) in GOLDEN_MODELS.items():
        meta = json.loads((GOLDEN / folder / 'meta.json').read_text())
        assert polynext.models.polynext.REFERENCE_NAMES[name] == folder
        assert meta['name'] == folder and meta['init_channels'] == 16 and meta['num_classes'] == 10


@pytest.mark.parametrize('channels_last', [True, False], ids=['channels_last', 'nchw'])
@pytest.mark.parametrize('folder', list(GOLDEN_MODELS))
def test_eval_logits_match_reference(folder, channels_last):
    """The channels-last fast path is a choice, not a requirement: plain NCHW matches too."""
    model, x, y = _loaded(folder, channels_last=channels_last)
    with torch.no_grad():
        out = model.eval()(x)
    torch.testing.assert_close(out, y, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize('folder', BN_FOLDERS)
def test_bn_train_mode_logits_and_running_buffers(folder):
    """Train mode: batch statistics, and the running statistics (per-position mean / variance of
    ChannelBatchNorm, the attention row sums of RunningRowSumNorm) updated with momentum 0.1."""
    model, x, _ = _loaded(folder)
    expected = load_file(str(GOLDEN / folder / 'output_train.safetensors'))
    with torch.no_grad():
        out = model.train()(x)
    torch.testing.assert_close(out, expected['logits'], atol=TRAIN_ATOL, rtol=TRAIN_RTOL)
    state = model.state_dict()
    ours = {ref: state[k] for k, ref in reference_key_map(model).items()}
    buffers = [k for k in expected if k != 'logits']
    assert sorted(buffers) == sorted(k for k in ours if k.rsplit('.', 1)[-1] in (
        'running_mean', 'running_var', 'running_denom', 'num_batches_tracked'))
    if folder.startswith('APolyNeXt'):
        assert any(k.endswith('running_denom') for k in buffers)
    for k in buffers:
        if k.endswith('num_batches_tracked'):
            assert int(ours[k]) == int(expected[k]) == 201, k     # 200 calibration passes + this one
        else:
            torch.testing.assert_close(ours[k], expected[k], atol=BUF_ATOL, rtol=BUF_RTOL, msg=k)


def _set_norm_eps(model, eps):
    """eps of every LayerNorm (ln models) or ChannelBatchNorm (bn models: they have no LayerNorm)."""
    changed = 0
    for m in model.modules():
        if isinstance(m, (polynext.LayerNorm2d, polynext.ChannelBatchNorm)):
            m.eps = eps
            changed += 1
    assert changed
    return model


@pytest.mark.parametrize('folder', list(GOLDEN_MODELS))
def test_norm_eps_change_fails_every_golden_set(folder):
    """The tolerance notices a small semantic change: eps 1e-5 → 1e-6 in the norms moves the
    logits of every set outside it (by 1.9× the tolerance for CPolyNeXt_L, the least sensitive)."""
    model, x, y = _loaded(folder)
    _set_norm_eps(model, 1e-6)
    with torch.no_grad():
        out = model.eval()(x)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out, y, atol=ATOL, rtol=RTOL)
    excess = ((out - y).abs() / (ATOL + RTOL * y.abs())).max().item()
    assert excess > 1.5, f'eps change only {excess:.2f}x the tolerance'


@pytest.mark.parametrize('folder', list(GOLDEN_MODELS))
def test_seeded_init_reproduces_reference_weights(folder):
    """Same construction + init order as the reference: torch.manual_seed(0) gives its exact
    weights. This pins the initialisation distributions (POLY/Kaiming-normal vs PyTorch
    default), the gate and attention-scale init values and every shape."""
    sd, _, _ = _load(folder)
    torch.manual_seed(0)
    model = _mini(folder)
    mapping = reference_key_map(model)
    assert sorted(mapping.values()) == sorted(sd)
    ours = model.state_dict()
    for k, ref in mapping.items():
        if 'running_' in ref or 'num_batches' in ref:  # calibrated in the golden data
            continue
        assert torch.equal(ours[k], sd[ref]), f'{k} ({ref}) differs from the reference init'


@pytest.mark.parametrize('folder', list(GOLDEN_MODELS))
def test_full_size_state_dict_layout(folder):
    """At published size the converted key list, shapes and dtypes equal the reference's."""
    meta = json.loads((GOLDEN / folder / 'meta.json').read_text())
    name, _ = GOLDEN_MODELS[folder]
    noop = lambda t, *args, **kwargs: t  # noqa: E731  (shapes only: skip the random init, 10x faster)
    with mock.patch.object(torch.nn.init, 'kaiming_normal_', noop), \
            mock.patch.object(torch.nn.init, 'kaiming_uniform_', noop), mock.patch.object(torch.nn.init, 'uniform_', noop):
        model = timm.create_model(name)
    sd = model.state_dict()
    ours = {ref: (list(sd[k].shape), str(sd[k].dtype).replace('torch.', '')) for k, ref in reference_key_map(model).items()}
    theirs = {k: (shape, dtype) for k, shape, dtype in meta['full_model']['state_dict']}
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) == meta['full_model']['param_count']
