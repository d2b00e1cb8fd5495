"""polynext.fold_for_inference: every inference-time constant folded, logits unchanged (issue 12)."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import polynext
from polynext import load_reference_state_dict
from polynext.errors import ConfigError
from polynext.models.polynext import calibrate_running_stats
from polynext.models.folded import (
    FOLDED_MODULE_TYPES, CellMerge, ChannelLayerNorm, FoldedPolyAttn, FoldedPolyConv, FoldedPolyNeXt, PositionAffine,
    fold_for_inference,
)

from conftest import GOLDEN, GOLDEN_MODELS

ALL = ['cpolynext_t', 'cpolynext_s', 'cpolynext_b', 'cpolynext_l', 'apolynext_t', 'apolynext_s', 'apolynext_b',
       'apolynext_l', 'cpolynext_t_bn', 'apolynext_t_bn', 'cpolynext_s_bn', 'cpolynext_lr']


def _perturb(model, gen):
    """Move every inference-time constant away from its initial value (gates, scales, norm weights,
    attention scales), so that a fold that dropped or misplaced one of them would show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit('.', 1)[-1]
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if leaf == 'logits' or name.endswith('mixer.scale'):
                p.add_(0.5 * noise)
            elif leaf in ('scale', 'gamma', 'gamma_c', 'gamma_hw', 'scales') or (leaf == 'weight' and p.ndim == 1):
                p.mul_(1 + 0.3 * noise)


def _tiny(name, dtype=torch.float64, **kw):
    """A perturbed, calibrated small build of ``name`` and an input batch."""
    gen = torch.Generator().manual_seed(0)
    size = 16 if name == 'cpolynext_lr' else 32
    torch.manual_seed(0)
    model = timm.create_model(name, init_channels=8, num_classes=5, img_size=size, **kw).to(dtype)
    _perturb(model, gen)
    x = torch.randn(6, 3, size, size, generator=gen, dtype=dtype)
    return calibrate_running_stats(model, x), x[:3]


#: one model per structural variant: paired gates, full3x3 reductions and unpaired gates (S, B, L),
#: attention, bn norms and the attention row sum, the 3x3 stem of the low-resolution model
STRUCTURES = ['cpolynext_t', 'cpolynext_s', 'apolynext_t', 'apolynext_s', 'cpolynext_t_bn', 'apolynext_t_bn',
              'cpolynext_s_bn', 'cpolynext_lr']


@pytest.mark.parametrize('name', STRUCTURES)
def test_fold_is_exact_in_float64(name):
    """Folding is exact in real arithmetic: in float64 only the last digits move (every constant
    perturbed away from its initial value first)."""
    model, x = _tiny(name)
    folded = fold_for_inference(model)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    scale = float(ref.abs().max())
    assert 0.01 < scale < 1e3 and torch.isfinite(ref).all()
    assert float((out - ref).abs().max()) <= 1e-10 * max(1.0, scale)


@pytest.mark.parametrize('name', ALL)
def test_fold_fp32_every_registered_model_within_1e5(name):
    """Every registered model (the golden mini builds: C0 = 16, 64 px, bn statistics from 32
    images), fp32: the folded logits are within 1e-5 of the model's."""
    size = 32 if name == 'cpolynext_lr' else 64
    torch.manual_seed(0)
    model = timm.create_model(name, init_channels=16, num_classes=10, img_size=size)
    x = torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(1))
    if name.endswith('_bn'):
        calibrate_running_stats(model, x)
    folded = fold_for_inference(model.eval())
    with torch.no_grad():
        ref, out = model(x[:4]), folded(x[:4])
    assert out.shape == ref.shape == (4, 10)
    assert float((out - ref).abs().max()) <= 1e-5


@pytest.mark.parametrize('name', ['cpolynext_t', 'apolynext_t', 'cpolynext_t_bn', 'apolynext_t_bn', 'cpolynext_lr'])
def test_fold_fp32_published_width_within_1e5(name):
    """Published width and initialisation, fp32: the bn variants at their 224 px (running statistics
    from 4 images), the LN models at 64 px (cpolynext_lr at its 32). The S / B / L models are covered
    by the mini builds above and by the float64 check of their structure."""
    bn = name.endswith('_bn')
    size = 224 if bn else (32 if name == 'cpolynext_lr' else 64)
    torch.manual_seed(0)
    model = timm.create_model(name)
    x = torch.randn(4 if bn else 2, 3, size, size, generator=torch.Generator().manual_seed(1))
    if bn:
        calibrate_running_stats(model, x)
    folded = fold_for_inference(model.eval())
    with torch.no_grad():
        ref, out = model(x[:2]), folded(x[:2])
    assert out.shape == ref.shape == (2, model.num_classes)
    assert float((out - ref).abs().max()) <= 1e-5


@pytest.mark.parametrize('folder', list(GOLDEN_MODELS))
def test_folded_golden_models_reproduce_the_authors_logits(folder):
    """The authors' own weights (golden data): the folded model gives their logits."""
    from safetensors.torch import load_file
    name, kw = GOLDEN_MODELS[folder]
    model = timm.create_model(name, init_channels=16, num_classes=10, **kw)
    load_reference_state_dict(model, load_file(str(GOLDEN / folder / 'state_dict.safetensors')))
    x = load_file(str(GOLDEN / folder / 'input.safetensors'))['x']
    expected = load_file(str(GOLDEN / folder / 'output.safetensors'))['logits']
    folded = fold_for_inference(model.eval())
    with torch.no_grad():
        out, eager = folded(x), model(x)
    assert float((out - eager).abs().max()) <= 1e-5
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('kwargs', [dict(residual_scale='free'), dict(residual_scale='layerscale', layerscale_init=0.3),
                                    dict(multi_input_skip=False), dict(cell_norm=False), dict(stacks=2)],
                         ids=['free', 'layerscale', 'no_skip', 'no_cell_norm', 'stacks2'])
@pytest.mark.parametrize('name', ['cpolynext_t_bn', 'apolynext_t'])
def test_fold_of_the_stabilisation_ablations_is_exact(name, kwargs):
    model, x = _tiny(name, **kwargs)
    folded = fold_for_inference(model)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert float((out - ref).abs().max()) <= 1e-10 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize('name', ['cpolynext_s', 'cpolynext_t_bn'])
def test_flip_kept_in_the_data_is_exact_too(name):
    model, x = _tiny(name)
    folded = fold_for_inference(model, flip='channels')
    convs = [m for m in folded.modules() if isinstance(m, FoldedPolyConv)]
    assert convs and all(m.pw_in_flip is None for m in convs)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert float((out - ref).abs().max()) <= 1e-10 * max(1.0, float(ref.abs().max()))
    with pytest.raises(ConfigError, match="flip must be one of weights, channels, got 'rows'"):
        fold_for_inference(model, flip='rows')


@pytest.mark.parametrize('kwargs,word', [(dict(mlp='gelu'), "mlp='gelu'"), (dict(product_op='add'), "product_op='add'"),
                                         (dict(attn='standard'), "attn='standard'")])
def test_fold_refuses_ablations_that_replace_the_polynomial_blocks(kwargs, word):
    model = timm.create_model('apolynext_t', init_channels=8, num_classes=5, **kwargs)
    with pytest.raises(ConfigError, match='fold_for_inference') as e:
        fold_for_inference(model)
    assert word in str(e.value) and '\n' not in str(e.value)


def test_fold_refuses_other_models_and_headless_models():
    with pytest.raises(ConfigError, match='PolyNeXt models; got a'):
        fold_for_inference(timm.create_model('identityformer_s12', num_classes=5))
    headless = timm.create_model('cpolynext_t', init_channels=8, num_classes=5)
    headless.prune_intermediate_layers(indices=2)
    with pytest.raises(ConfigError, match='no classifier head'):
        fold_for_inference(headless)


def _module_types(model):
    return {type(m) for m in model.modules()} - {nn.Sequential, nn.ModuleList}


def test_folded_module_tree_cpolynext_t_bn():
    model, x = _tiny('cpolynext_t_bn', dtype=torch.float32)
    folded = fold_for_inference(model)
    types = _module_types(folded)
    allowed = set(FOLDED_MODULE_TYPES) | {timm.layers.SelectAdaptivePool2d, nn.AdaptiveAvgPool2d, nn.Flatten}
    assert types <= allowed, types - allowed
    assert ChannelLayerNorm not in types and FoldedPolyAttn not in types
    affines = [m for m in folded.modules() if isinstance(m, PositionAffine)]
    # 12 cells (merge norm) + 36 blocks × (PolyConv norm + PolyMLP norm) + the head norm
    assert len(affines) == 12 + 36 * 2 + 1
    per_channel = [m for m in affines if m.mean.shape[1] > 1]
    assert len(per_channel) == 12 + 36            # the norms whose γ_c went into the conv before them
    assert all(m.scale.shape[:2] == (1, 1) for m in affines)
    merges = [m for m in folded.modules() if isinstance(m, CellMerge)]
    assert len(merges) == 12
    assert merges[0].num_inputs == 1                                      # stage 0, cell 0: s0 is s1
    assert [m.weight0 is None for m in merges] == [True, False, True, False, True] + [False] * 5 + [True, False]
    assert folded.fully_polynomial and folded.num_classes == 5
    assert not any(p.requires_grad for p in folded.parameters())


def test_folded_module_tree_apolynext_t_ln_counts():
    model, _ = _tiny('apolynext_t', dtype=torch.float32)
    folded = fold_for_inference(model)
    norms = [m for m in folded.modules() if isinstance(m, ChannelLayerNorm)]
    with_weight = [m for m in norms if m.weight is not None]
    # weight kept: 12 merge norms + 12 PolyConv closing norms; folded into the next 1x1 conv:
    # 36 PolyMLP norms, 24 PolyAttn pre-norms and the head norm
    assert (len(with_weight), len(norms) - len(with_weight)) == (24, 61)
    attn = [m for m in folded.modules() if isinstance(m, FoldedPolyAttn)]
    assert len(attn) == 24 and all(m.row_scale is None for m in attn)
    assert not folded.fully_polynomial


def test_flip_is_a_row_permutation_of_the_weights():
    model, _ = _tiny('cpolynext_t', dtype=torch.float32)
    folded = fold_for_inference(model)
    src = model.stages[1].cells[0].blocks[2].mixer
    dst = folded.stages[1].cells[0].blocks[2].mixer
    assert isinstance(dst, FoldedPolyConv)
    assert torch.equal(dst.pw_in.weight, src.pw_in.weight)
    assert torch.equal(dst.pw_in_flip.weight, src.pw_in.weight.flip(0))
    assert torch.equal(dst.fine.weight, src.fine.weight.flip(0))


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


#: every aten op a folded bn model may execute: linear maps, products, sums, layout changes, the pool
POLYNOMIAL_ATEN = {'convolution', 'mul', 'add', 'sub', 'mean', 'addmm', 'mm', 'bmm', 'matmul', 'expand', 'view',
                   'reshape', 'permute', 'transpose', 't', 'split', 'split_with_sizes', 'chunk', 'slice', 'clone',
                   'contiguous', '_unsafe_view', 'unsqueeze', 'squeeze', 'flatten', 'detach', 'empty_like',
                   'copy_', 'alias', 'as_strided', 'linear', 'adaptive_avg_pool2d', '_adaptive_avg_pool2d',
                   'mean_dim', 'sum', 'dim', 'size', 'stride', 'empty', 'is_contiguous', 'add_', 'as_strided_'}


@pytest.mark.parametrize('name', ['cpolynext_t_bn', 'apolynext_t_bn'])
def test_folded_bn_models_execute_only_polynomial_ops(name):
    model, x = _tiny(name, dtype=torch.float32)
    folded_model = fold_for_inference(model)
    eager, folded = _OpLog(), _OpLog()
    with torch.no_grad():
        with eager:
            model(x)
        with folded:
            folded_model(x)
    assert {'rsqrt', 'sigmoid', 'flip'} & eager.ops           # what the fold removes is there before
    assert folded.ops <= POLYNOMIAL_ATEN, folded.ops - POLYNOMIAL_ATEN
    assert not {'div', 'rsqrt', 'sigmoid', 'flip', 'pow', 'native_layer_norm'} & folded.ops


def test_fold_leaves_the_model_unchanged_and_is_eval_only():
    model, x = _tiny('apolynext_t_bn', dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_for_inference(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(folded, FoldedPolyNeXt) and not folded.training
    with pytest.raises(RuntimeError, match='inference only'):
        folded.train()
    with pytest.raises(ValueError, match='built for 32x32'):
        folded(torch.randn(1, 3, 64, 64))
    assert folded.pretrained_cfg == model.pretrained_cfg
    assert folded.forward_head(folded.forward_features(x), pre_logits=True).shape == (3, 2 * folded.num_features)


def test_fold_keeps_dtype_device_and_nchw_models():
    model, x = _tiny('cpolynext_t', dtype=torch.float32, channels_last=False)
    folded = fold_for_inference(model)
    assert not folded.channels_last and folded.stem.weight.dtype == torch.float32
    with torch.no_grad():
        assert float((folded(x) - model(x)).abs().max()) <= 1e-5
    assert polynext.fold_for_inference is fold_for_inference


def test_folded_model_has_the_parameters_the_fold_says():
    """Parameter count: the source's, minus gates / scales / norm weights / bn statistics folded
    away, plus the fine branch's flipped copy of each PolyConv's pw_in (a row permutation)."""
    model = timm.create_model('cpolynext_t', init_channels=8, num_classes=5)
    folded = fold_for_inference(model)
    flips = sum(m.pw_in_flip.weight.numel() for m in folded.modules() if isinstance(m, FoldedPolyConv))
    gone = sum(p.numel() for n, p in model.named_parameters()
               if n.endswith(('gates.logits', 'mixer.scale')) or '.mlp.norm.' in n or 'head.norm.' in n)
    gone += sum(stage.cells[0].scale0.scale.numel() for stage in model.stages)   # into ds0 / merged a + b
    proj_bias = folded.head.proj.bias.numel()
    n_src = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in folded.parameters()) == n_src - gone + flips + proj_bias
