"""MetaFormer baselines: RandFormer's frozen matrices and input sizes, the StarReLU variants and
other Table 8 switches, the authors' head, timm conventions, and loading sail-sg checkpoints."""
import copy
import json
import math
import re

import pytest
import timm
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2

import polynext
from polynext import CheckpointError, ConfigError
from polynext.cli import main as cli_main
from polynext.models import metaformer_baselines as mfb
from polynext.profile import count_params

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

# smallest model of each family, at 64 px (RandFormer built for 64 px: 4x4 and 2x2 tokens)
FAMILY = {
    'identityformer_s12': {}, 'randformer_s12': dict(img_size=64), 'poolformerv2_s12': {},
    'convformer_s18': {}, 'caformer_s18': {},
}
_BUILT = {}


def build(name, **kwargs):
    """polynext.create_model, cached per (name, kwargs) and deep-copied (building is the slow part)."""
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _BUILT:
        torch.manual_seed(0)
        _BUILT[key] = polynext.create_model(name, **kwargs).eval()
    return copy.deepcopy(_BUILT[key])


def meta(name, **kwargs):
    """polynext.create_model on the meta device: structure, shapes and counts without the cost of init."""
    with torch.device('meta'):
        return polynext.create_model(name, **kwargs)


def perturb(model, seed=1):
    """Move every weight off its init so norms, scales and StarReLU parameters matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def logits(model, x=X64):
    with torch.no_grad():
        return model.eval()(x)


# --------------------------------------------------------------------------------------
# RandFormer
# --------------------------------------------------------------------------------------

def test_randformer_states_token_counts_and_matrices_are_row_stochastic():
    model = build('randformer_s12')
    assert model.num_tokens == (3136, 784, 196, 49)
    assert model.pretrained_cfg['input_size'] == (3, 224, 224) and model.pretrained_cfg['fixed_input_size']
    mats = {n: b for n, b in model.named_buffers() if n.endswith('random_matrix')}
    assert sorted(mats) == sorted([f'stages.2.blocks.{i}.token_mixer.random_matrix' for i in range(6)]
                                  + [f'stages.3.blocks.{i}.token_mixer.random_matrix' for i in range(2)])
    for name, m in mats.items():
        n = 196 if name.startswith('stages.2') else 49
        assert m.shape == (n, n) and (m > 0).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(n))
    assert 'num_tokens=196 (14x14), frozen' in repr(model.stages[2].blocks[0].token_mixer)


def test_random_matrices_are_saved_but_never_optimised():
    model = build('randformer_s12', img_size=64)
    sd = model.state_dict()
    mats = [k for k in sd if k.endswith('random_matrix')]
    assert len(mats) == 8
    assert not any(n.endswith('random_matrix') for n, _ in model.named_parameters())
    param_ids = {id(p) for p in model.parameters()}
    for opt_name in ('adamw', 'lamb', 'sgd'):
        opt = create_optimizer_v2(model, opt_name, lr=0.1, weight_decay=0.05)
        in_groups = [p for g in opt.param_groups for p in g['params']]
        assert {id(p) for p in in_groups} == param_ids and len(in_groups) == len(param_ids)
        assert sum(p.numel() for p in in_groups) == 11_891_712
        assert not any(id(b) in param_ids for b in model.buffers())
    # one training step moves the weights, never the matrices
    before = {k: sd[k].clone() for k in mats}
    w_before = model.stem.conv.weight.detach().clone()
    opt = create_optimizer_v2(model, 'adamw', lr=0.1, weight_decay=0.05)
    model.train()
    model(X64).logsumexp(-1).mean().backward()
    opt.step()
    assert not torch.equal(model.stem.conv.weight, w_before)
    for k in mats:
        assert torch.equal(model.state_dict()[k], before[k])
    # saved and restored with the model
    other = polynext.create_model('randformer_s12', img_size=64)
    assert not torch.equal(other.state_dict()[mats[0]], before[mats[0]])
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.state_dict()[mats[0]], before[mats[0]])


def test_optimizer_parameter_count_excludes_matrices():
    model = build('randformer_s12')
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == 11_891_712


def test_wrong_input_size_is_a_clear_error():
    model = build('randformer_s12', img_size=64)
    with pytest.raises(ConfigError) as e:
        model(torch.randn(1, 3, 96, 96))
    msg = str(e.value)
    assert 'built for a 4x4 token grid (16 tokens, i.e. 64x64 input images)' in msg
    assert 'got a 6x6 grid (36 tokens' in msg and 'img_size=(96, 96)' in msg and 'dynamic_img_size=True' in msg


def test_dynamic_img_size_and_set_input_size():
    model = build('randformer_s12', img_size=64)
    dyn = polynext.create_model('randformer_s12', img_size=64, dynamic_img_size=True).eval()
    dyn.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(dyn), logits(model), rtol=0, atol=0)   # native size: the stored matrices
    x96 = torch.randn(1, 3, 96, 96)
    out = logits(dyn, x96)
    model.set_input_size(96)                                                 # same resampling, in place
    assert model.num_tokens[2:] == (36, 9)
    assert model.stages[2].blocks[0].token_mixer.random_matrix.shape == (36, 36)
    torch.testing.assert_close(logits(model, x96), out)


def test_resample_random_matrix():
    uniform = torch.full((16, 16), 1 / 16)
    torch.testing.assert_close(mfb.resample_random_matrix(uniform, (4, 4), (6, 6)), torch.full((36, 36), 1 / 36))
    m = torch.softmax(torch.rand(16, 16), -1)
    assert mfb.resample_random_matrix(m, (4, 4), (4, 4)) is m
    r = mfb.resample_random_matrix(m, (4, 4), (3, 5))
    assert r.shape == (15, 15) and (r >= 0).all()
    torch.testing.assert_close(r.sum(-1), torch.ones(15))
    # rows that all mix only source position (1, 2): bilinear x2 (half-pixel centres) spreads it over
    # rows 1-4 and columns 3-6 of the 8x8 grid with weights ¼ ¾ ¾ ¼, normalised to sum 1
    spike = torch.zeros(16, 16)
    spike[:, 1 * 4 + 2] = 1
    up = mfb.resample_random_matrix(spike, (4, 4), (8, 8)).reshape(64, 8, 8)
    a = torch.tensor([0, .25, .75, .75, .25, 0, 0, 0])
    b = torch.tensor([0, 0, 0, .25, .75, .75, .25, 0])
    torch.testing.assert_close(up, (torch.outer(a, b) / 4).expand(64, 8, 8))
    # the mixing of a constant map stays constant at any size (rows sum to 1)
    mixer = mfb.RandomMixing(8, grid_size=(4, 4), dynamic_img_size=True)
    ones = torch.ones(1, 8, 7, 5)
    torch.testing.assert_close(mixer(ones), ones)


def test_checkpoint_of_another_size_is_resampled_on_load():
    m224 = build('randformer_s12')
    m64 = polynext.create_model('randformer_s12', img_size=64, checkpoint=m224.state_dict())
    k = 'stages.2.blocks.0.token_mixer.random_matrix'
    expected = mfb.resample_random_matrix(m224.state_dict()[k], (14, 14), (4, 4))
    assert torch.equal(m64.state_dict()[k], expected)
    assert m64.pretrained_cfg['input_size'] == (3, 64, 64)
    assert logits(m64).shape == (2, 1000)


# --------------------------------------------------------------------------------------
# StarReLU variants and the other Table 8 switches
# --------------------------------------------------------------------------------------

R = 1 / math.sqrt(1.25)
STAR_RELU = {  # name: (y(x) for x, learnable parameter names)
    'starrelu': (lambda r2: 1.0 * r2 + 0.0, ['bias', 'scale']),
    'starrelu_scale': (lambda r2: 1.0 * r2, ['scale']),
    'starrelu_bias': (lambda r2: r2 + 0.0, ['bias']),
    'starrelu_fixed': (lambda r2: (r2 - 0.5) / math.sqrt(1.25), []),
    'starrelu_fixed_scale': (lambda r2: r2 / math.sqrt(1.25), []),
    'starrelu_fixed_bias': (lambda r2: r2 - 0.5, []),
    'squared_relu': (lambda r2: r2, []),
}


@pytest.mark.parametrize('name', list(STAR_RELU))
def test_star_relu_variants_math(name):
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    act = mfb.ACTIVATIONS[name]().double()
    formula, params = STAR_RELU[name]
    relu2 = torch.where(x > 0, x * x, torch.zeros_like(x))
    torch.testing.assert_close(act(x), formula(relu2), rtol=1e-12, atol=1e-12)
    assert sorted(n for n, p in act.named_parameters() if p.requires_grad) == params
    assert sum(p.numel() for p in act.parameters()) == len(params)
    # learnable terms really are s and b of s·ReLU(x)² + b
    if params:
        with torch.no_grad():
            for n, p in act.named_parameters():
                p.fill_({'scale': 0.8944, 'bias': -0.4472}[n])
        s = 0.8944 if 'scale' in params else 1.0
        b = -0.4472 if 'bias' in params else 0.0
        torch.testing.assert_close(act(x), s * relu2 + b, rtol=1e-12, atol=1e-12)


def test_fixed_constants_are_equation_13():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    y = mfb.StarReLUFixed()(x)
    torch.testing.assert_close(y, torch.tensor([-0.4472136, -0.4472136, 0.4472136, 3.1304952], dtype=torch.float64))
    assert mfb.StarReLUFixed().scale == pytest.approx(0.894427191) and mfb.StarReLUFixed().bias == pytest.approx(-R / 2)
    assert 'ReLU(x)²' in repr(mfb.StarReLUFixed()) and 's·ReLU(x)² + b' in repr(mfb.StarReLUVariant(1.0, 0.0, True))


def _act_modules(model):
    return [m for n, m in model.named_modules() if n.endswith(('.mlp.act', '.token_mixer.act1'))]


@pytest.mark.parametrize('act, act_params', [('starrelu', 2), ('starrelu_scale', 1), ('starrelu_bias', 1),
                                             ('starrelu_fixed', 0), ('relu', 0), ('gelu', 0)])
def test_act_switch_reaches_every_mlp_and_sepconv(act, act_params):
    model = meta('convformer_s18', act=act)
    acts = _act_modules(model)
    assert len(acts) == 2 * 18 and all(type(a) is mfb.ACTIVATIONS[act] for a in acts)
    assert count_params(model) == 26_774_448 - 2 * 36 + act_params * 36


def test_act_switch_forward():
    model = perturb(build('identityformer_s12', act='starrelu_fixed'))
    block = model.stages[0].blocks[0]
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        h = block.mlp.fc1(block.norm2(x))
        torch.testing.assert_close(block.mlp(block.norm2(x)), block.mlp.fc2((torch.relu(h) ** 2 - 0.5) / 1.25 ** 0.5))
    assert logits(model).shape == (2, 1000)


def test_act_switch_on_identityformer_and_timm_conflicts():
    model = meta('identityformer_s12', act='squared_relu')
    assert all(isinstance(a, mfb.SquaredReLU) for a in _act_modules(model)) and len(_act_modules(model)) == 12
    with pytest.raises(ConfigError, match="act='swish' is not one of: starrelu, starrelu_scale"):
        polynext.create_model('convformer_s18', act='swish')
    with pytest.raises(ConfigError, match='either act='):
        polynext.create_model('identityformer_s12', act='relu', mlp_act=nn.ReLU)


# ResScale on stages 3-4 of IdentityFormer-S12: (6 blocks · 320 + 2 · 512) · 2 scales per block
RES_SCALE_PARAMS = (6 * 320 + 2 * 512) * 2


@pytest.mark.parametrize('branch_scale, res, layer', [('res', True, False), ('layer', False, True),
                                                      ('branch', True, True), ('none', False, False)])
def test_branch_scale_switch(branch_scale, res, layer):
    model = polynext.create_model('identityformer_s12', branch_scale=branch_scale)
    blocks = [b for s in model.stages for b in s.blocks]
    for i, stage in enumerate(model.stages):
        for b in stage.blocks:
            assert isinstance(b.res_scale1, nn.Identity) != (res and i >= 2)
            assert isinstance(b.layer_scale2, nn.Identity) != (layer and i >= 2)
    if layer:
        assert torch.equal(blocks[-1].layer_scale1.scale, torch.full((512,), 1e-5))
    if res:
        assert torch.equal(blocks[-1].res_scale2.scale, torch.ones(512))
    extra = RES_SCALE_PARAMS * (int(res) + int(layer))
    assert count_params(model) == 11_891_712 - RES_SCALE_PARAMS + extra


def test_branch_scale_formula():
    """x' = λr ⊙ x + λl ⊙ f(Norm(x)) (Eq. 18), checked on one BranchScale block."""
    block = polynext.create_model('identityformer_s12', branch_scale='branch').stages[3].blocks[0].eval()
    with torch.no_grad():
        for s in (block.res_scale1, block.res_scale2, block.layer_scale1, block.layer_scale2):
            s.scale.uniform_(0.5, 1.5)
    x = torch.randn(1, 512, 2, 2)
    with torch.no_grad():
        v = lambda s: s.scale.view(1, -1, 1, 1)  # noqa: E731
        h = v(block.res_scale1) * x + v(block.layer_scale1) * block.norm1(x)  # identity mixer
        y = v(block.res_scale2) * h + v(block.layer_scale2) * block.mlp(block.norm2(h))
        torch.testing.assert_close(block(x), y)


@pytest.mark.parametrize('name, per_block, layers', [
    ('identityformer_s12', {64: 7, 128: 7, 320: 7, 512: 7}, 12 * 4),      # norm1, norm2 (C each), fc1 (4C), fc2 (C)
    ('convformer_s18', {64: 12, 128: 12, 320: 12, 512: 12}, 18 * 7),      # + SepConv pw1 (2C), dw (2C), pw2 (C)
    ('caformer_s18', {64: 12, 128: 12, 320: 11, 512: 11}, 6 * 7 + 12 * 6),  # attention: qkv (3C), proj (C)
])
def test_block_bias_switch(name, per_block, layers):
    base, biased = meta(name), meta(name, block_bias=True)
    depths = [len(s.blocks) for s in base.stages]
    dims = [s.blocks[0].norm1.weight.shape[0] for s in base.stages]
    extra = sum(d * c * per_block[c] for d, c in zip(depths, dims))
    assert count_params(biased) - count_params(base) == extra
    new = {k for k, _ in biased.named_parameters()} - {k for k, _ in base.named_parameters()}
    assert len(new) == layers and all(k.endswith('.bias') and '.blocks.' in k for k in new)
    # on a real model: zero biases, and the same function as the bias-free model with the same weights
    model = perturb(build(name))
    biased = copy.deepcopy(model)
    mfb._enable_block_biases(biased)
    for block in biased.stages[-1].blocks:
        assert torch.equal(block.norm1.bias, torch.zeros_like(block.norm1.bias))
    torch.testing.assert_close(logits(biased), logits(model), rtol=1e-5, atol=1e-5)


def test_ablations_table_builds_every_switch():
    assert len(mfb.METAFORMER_ABLATIONS) == 12
    for key, options in mfb.METAFORMER_ABLATIONS.items():
        model = meta('caformer_s18', **options)
        assert model.num_classes == 1000, key


# --------------------------------------------------------------------------------------
# The authors' head
# --------------------------------------------------------------------------------------

def authors_mlp_head(timm_head):
    """The authors' MlpHead, from torch modules: fc1 → SquaredReLU → nn.LayerNorm (eps 1e-5) → dropout → fc2."""
    ref = nn.Sequential(nn.Linear(512, 2048), mfb.SquaredReLU(), nn.LayerNorm(2048), nn.Dropout(0.0),
                        nn.Linear(2048, 1000))
    ref[0].load_state_dict(timm_head.fc1.state_dict())
    ref[2].load_state_dict(timm_head.norm.state_dict())
    ref[4].load_state_dict(timm_head.fc2.state_dict())
    return ref.eval()


def test_authors_head_gives_the_authors_logits():
    model = perturb(build('convformer_s18'))
    head = model.head.fc
    assert head.norm.eps == 1e-5 and head.head_drop.p == 0.0
    feats = torch.randn(4, 512) * 3
    with torch.no_grad():
        assert torch.equal(head(feats), authors_mlp_head(head)(feats))
        timm_head = mfb.MlpHead(512, 1000).eval()                  # timm's own head: LayerNorm eps 1e-6
        assert timm_head.norm.eps == 1e-6
        timm_head.load_state_dict(head.state_dict())
        assert not torch.equal(timm_head(feats), head(feats))
    assert meta('convformer_s18', head_norm_eps=1e-6).head.fc.norm.eps == 1e-6


def test_head_dropout_sits_between_head_norm_and_fc2():
    options = meta('caformer_s18', head_dropout=0.4)
    assert options.head.fc.head_drop.p == 0.4 and options.head.drop.p == 0.0 and options.head.fc.norm.eps == 1e-5
    model = polynext.models.apply_authors_head(build('caformer_s18'), head_dropout=1.0)
    out = model.train()(X64)                                    # everything fc2 sees is dropped: logits = fc2 bias
    torch.testing.assert_close(out, model.head.fc.fc2.bias.expand(2, -1), rtol=0, atol=0)
    linear = build('identityformer_s12', head_dropout=1.0)      # linear head: dropout right before it
    assert linear.head.drop.p == 1.0
    torch.testing.assert_close(linear.train()(X64), linear.head.fc.bias.expand(2, -1), rtol=0, atol=0)
    # re-applied after timm's reset_classifier (which builds a fresh timm head)
    model.reset_classifier(10)
    assert model.head.fc.head_drop.p == 0.0 and model.head.fc.norm.eps == 1e-6
    polynext.models.apply_authors_head(model, head_dropout=0.5)
    assert model.head.fc.head_drop.p == 0.5 and model.head.fc.norm.eps == 1e-5


def test_head_option_errors():
    with pytest.raises(ConfigError, match='linear classifier; head_norm_eps'):
        polynext.create_model('identityformer_s12', head_norm_eps=1e-5)
    with pytest.raises(ConfigError, match=r'head_dropout must be in \[0, 1\]'):
        polynext.create_model('convformer_s18', head_dropout=1.5)


# --------------------------------------------------------------------------------------
# timm conventions
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(FAMILY))
def test_features_only_strides_4_8_16_32(name):
    model = meta(name, features_only=True, **FAMILY[name])   # a meta forward checks every shape
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    feats = model(X64.to('meta'))
    assert [tuple(f.shape[1:]) for f in feats] == [(c, 64 // r, 64 // r) for c, r in
                                                   zip(model.feature_info.channels(), [4, 8, 16, 32])]
    assert model.feature_info.channels() == [64, 128, 320, 512]


@pytest.mark.parametrize('name', ['identityformer_s_iso', 'identityformer_s_iso_convstem'])
def test_isotropic_models(name):
    model = meta(name, features_only=True)
    assert model.feature_info.reduction() == [16] and model.feature_info.channels() == [384]
    assert [tuple(f.shape) for f in model(X64.to('meta'))] == [(2, 384, 4, 4)]
    full = polynext.create_model(name, num_classes=10)
    assert len(full.stages) == 1 and len(full.stages[0].blocks) == 12
    assert full.stages[0].blocks[0].mlp.fc1.out_channels == 6 * 384
    assert isinstance(full.stages[0].blocks[0].token_mixer, nn.Identity)
    assert isinstance(full.stages[0].blocks[0].res_scale1, nn.Identity)    # as the authors' class: no ResScale
    assert logits(full).shape == (2, 10)


def test_conv_stem_layout():
    stem = meta('identityformer_s_iso_convstem').stem
    convs = [stem.conv1.conv, stem.conv2.conv, stem.conv3.conv, stem.conv4]
    assert [c.kernel_size[0] for c in convs] == [7, 3, 3, 3] and all(c.stride == (2, 2) for c in convs)
    assert [c.out_channels for c in convs] == [48, 96, 192, 384]
    assert isinstance(stem.conv1.bn, nn.BatchNorm2d) and isinstance(stem.conv1.bn.act, nn.ReLU)


@pytest.mark.parametrize('name', ['identityformer_s12', 'randformer_s12'])
def test_timm_api(name):
    model = build(name, **FAMILY[name])
    assert timm.is_model(name) and name in polynext.list_models('former')
    final, inter = model.forward_intermediates(X64)
    with torch.no_grad():
        torch.testing.assert_close(final, model.forward_features(X64))
    assert [t.shape[-1] for t in inter] == [16, 8, 4, 2]
    model.reset_classifier(7)
    assert logits(model).shape == (2, 7) and model.get_classifier().out_features == 7
    model.reset_classifier(0)
    assert logits(model).shape == (2, 512)
    m = meta(name, num_classes=5, drop_path_rate=0.1, **FAMILY[name])
    assert m.stages[3].blocks[1].drop_path2.drop_prob == pytest.approx(0.1)
    assert m.pretrained_cfg['url'].endswith(f'/{name.split("_")[0]}/{name}.pth')


def test_model_listing_and_sources():
    names = polynext.list_models('former')
    assert names == list(mfb.METAFORMER_MODELS) and len(names) == 25
    from polynext.models import model_source
    assert model_source('randformer_m48') == 'polynext (MetaFormer baselines)'
    assert model_source('caformer_b36.sail_in1k') == 'timm (MetaFormer baselines)'


def test_models_command_lists_params_and_macs(capsys):
    assert cli_main(['models', 's_iso']) == 0
    out = capsys.readouterr().out
    assert re.search(r'identityformer_s_iso\s+21\.924\s+4\.220\s+224', out)
    assert re.search(r'identityformer_s_iso_convstem\s+22\.508\s+4\.641', out)
    assert cli_main(['models', 'randformer_s12']) == 0
    assert re.search(r'randformer_s12\s+11\.892\s+0\.235\s+1\.888', capsys.readouterr().out)


# --------------------------------------------------------------------------------------
# The authors' (sail-sg) checkpoints
# --------------------------------------------------------------------------------------

def to_authors_layout(state_dict):
    """Our / timm's keys → the authors' (spec §2 key table): stem and downsampling convs under
    ``downsample_layers``, blocks without ``.blocks``, ``head.norm`` → ``norm``, ``head.fc`` → ``head``,
    and the 1x1 conv weights of the NCHW MLPs and SepConvs as [out, in] Linear weights."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith('stem.conv.'):
            k = 'downsample_layers.0.conv.' + k[len('stem.conv.'):]
        elif k == 'stem.norm.weight':
            k = 'downsample_layers.0.post_norm.weight'
        elif m := re.fullmatch(r'stages\.(\d)\.downsample\.norm\.(\w+)', k):
            k = f'downsample_layers.{m[1]}.pre_norm.{m[2]}'
        elif m := re.fullmatch(r'stages\.(\d)\.downsample\.conv\.(\w+)', k):
            k = f'downsample_layers.{m[1]}.conv.{m[2]}'
        elif m := re.fullmatch(r'stages\.(\d)\.blocks\.(\d+)\.(.+)', k):
            k = f'stages.{m[1]}.{m[2]}.{m[3]}'
        elif k.startswith('head.norm.'):
            k = k[len('head.'):]
        elif k.startswith('head.fc.'):
            k = 'head.' + k[len('head.fc.'):]
        else:
            raise AssertionError(f'unmapped key {k}')
        if re.search(r'\.(mlp\.fc[12]|token_mixer\.pwconv[12])\.weight$', k) and v.dim() == 4:
            assert v.shape[-2:] == (1, 1)
            v = v.reshape(v.shape[:2])
        out[k] = v.clone()
    return out


@pytest.mark.parametrize('name', list(FAMILY))
def test_authors_layout_is_the_authors_key_list(name):
    """The key map above is checked against the authors' own models: every key, shape and dtype of the
    full-size sail-sg model (``tests/golden/metaformer_authors_keys.json``, written from their
    ``metaformer_baselines.py`` by ``tools/make_golden.py --metaformer-dir``); a state dict with exactly those
    keys and shapes loads strictly into ours and comes back unchanged."""
    from conftest import GOLDEN
    theirs = json.loads((GOLDEN / 'metaformer_authors_keys.json').read_text())['models'][name]
    model = build(name)
    authors = to_authors_layout(model.state_dict())
    assert {k: [list(v.shape), str(v.dtype).replace('torch.', '')] for k, v in authors.items()} == {
        k: [shape, dtype] for k, shape, dtype in theirs['state_dict']}
    g = torch.Generator().manual_seed(0)
    theirs_sd = {k: torch.randn(shape, generator=g) for k, shape, _ in theirs['state_dict']}
    polynext.load_weights(model, {'state_dict': theirs_sd})
    back = to_authors_layout(model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in theirs_sd.items())


@pytest.mark.parametrize('name', list(FAMILY))
def test_authors_layout_loads_bit_exact(name, tmp_path):
    kwargs = FAMILY[name]
    model = perturb(build(name, **kwargs))
    authors = to_authors_layout(model.state_dict())
    assert 'downsample_layers.0.post_norm.weight' in authors and not any('.blocks.' in k for k in authors)
    expected = logits(model)
    fresh = build(name, **kwargs)      # polynext.load_weights uses the model module's checkpoint_filter_fn
    assert not torch.equal(logits(fresh), expected)
    polynext.load_weights(fresh, {'state_dict': authors})
    assert torch.equal(logits(fresh), expected)


def test_authors_file_through_create_model_and_timm_pretrained_path(tmp_path):
    model = perturb(build('randformer_s12', img_size=64))
    path = tmp_path / 'randformer_s12.pth'
    torch.save(to_authors_layout(model.state_dict()), path)
    assert torch.equal(logits(polynext.create_model('randformer_s12', checkpoint=path, img_size=64)), logits(model))
    via_timm = timm.create_model('randformer_s12', pretrained=True, img_size=64,
                                 pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(logits(via_timm), logits(model))


def test_authors_mismatch_is_a_clear_error():
    authors = to_authors_layout(build('randformer_s12', img_size=64).state_dict())
    with pytest.raises(CheckpointError, match="does not match identityformer_s12: unexpected key "
                                              "'stages.2.blocks.0.token_mixer.random_matrix'"):
        polynext.create_model('identityformer_s12', checkpoint=authors)
    with pytest.raises(CheckpointError, match="does not match convformer_s18: unexpected key"):
        polynext.create_model('convformer_s18', checkpoint=authors)


def test_match_checkpoint():
    cf = build('caformer_s18')
    assert mfb.match_checkpoint(to_authors_layout(cf.state_dict())) == ['caformer_s18']
    assert mfb.match_checkpoint(cf.state_dict()) == ['caformer_s18']
    idf = build('identityformer_s12')
    assert mfb.match_checkpoint(to_authors_layout(idf.state_dict())) == ['identityformer_s12', 'poolformerv2_s12']


def test_convert_command(tmp_path, capsys):
    model = perturb(build('randformer_s12'))
    src = tmp_path / 'randformer_s12.pth'
    torch.save(to_authors_layout(model.state_dict()), src)
    out = tmp_path / 'randformer_s12.safetensors'
    assert cli_main(['convert', str(src), str(out)]) == 0
    assert 'inferred model: randformer_s12' in capsys.readouterr().out
    x224 = torch.randn(1, 3, 224, 224)
    assert torch.equal(logits(polynext.create_model('randformer_s12', checkpoint=out), x224), logits(model, x224))
    # IdentityFormer and PoolFormerV2 weights look the same: --model is required, and then works
    src = tmp_path / 'identityformer_s12.pth'
    idf = perturb(build('identityformer_s12'))
    torch.save({'model': to_authors_layout(idf.state_dict())}, src)
    assert cli_main(['convert', str(src), str(tmp_path / 'x.safetensors')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'it fits identityformer_s12 and poolformerv2_s12); pass --model' in err
    out = tmp_path / 'idf.safetensors'
    assert cli_main(['convert', str(src), str(out), '--model', 'identityformer_s12']) == 0
    assert torch.equal(logits(polynext.create_model('identityformer_s12', checkpoint=out)), logits(idf))


# --------------------------------------------------------------------------------------
# Architecture arguments (a narrow model) for every family polynext.create_model builds
# --------------------------------------------------------------------------------------

NARROW = dict(dims=(32, 64, 128, 256), depths=(1, 1, 2, 1))
#: one model per family of `polynext models`, with architecture arguments, and the stage widths they give
ARCH_ARGS = {
    'identityformer_s12': (NARROW, [32, 64, 128, 256]),
    'randformer_s12': (dict(NARROW, img_size=64), [32, 64, 128, 256]),
    'poolformerv2_s12': (NARROW, [32, 64, 128, 256]),
    'convformer_s18': (NARROW, [32, 64, 128, 256]),
    'caformer_s18': (NARROW, [32, 64, 128, 256]),
    'identityformer_s_iso': (dict(dim=64, depth=2), [64]),
    'cpolynext_t': (dict(init_channels=8, cells=(1, 1, 1, 1)), [8, 16, 32, 48]),
    'apolynext_t': (dict(init_channels=8), [8, 16, 32, 48]),
    'cpolynext_lr': (dict(init_channels=8), [8, 16, 32]),
}


@pytest.mark.parametrize('name', list(ARCH_ARGS))
def test_architecture_arguments_build_every_family(name):
    kwargs, widths = ARCH_ARGS[name]
    model = polynext.create_model(name, num_classes=5, **kwargs)
    assert [f['num_chs'] for f in model.feature_info] == widths
    size = 32 if name == 'cpolynext_lr' else 64
    assert model.eval()(torch.randn(1, 3, size, size)).shape == (1, 5)


def test_every_family_has_an_architecture_arguments_case():
    family = lambda n: n.split('_')[0] + ('_iso' if '_iso' in n else '') + ('_lr' if n.endswith('_lr') else '')
    assert {family(n) for n in polynext.list_models()} <= {family(n) for n in ARCH_ARGS} | {'cpolynext'}


@pytest.mark.parametrize('name', mfb.TIMM_ARCHS)
def test_timm_baseline_table_is_timm_s_published_configuration(name):
    """TIMM_BASELINE_ARCHS (from which a model with architecture arguments is built) holds what timm's entry
    points pass: the same modules and the same weight shapes."""
    with torch.device('meta'):
        ours = mfb.create_timm_baseline(name, dims=mfb.TIMM_BASELINE_ARCHS[name]['dims'])   # built from the table
        theirs = timm.create_model(name)
    assert [type(m).__name__ for m in ours.modules()] == [type(m).__name__ for m in theirs.modules()]
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
           [(k, v.shape) for k, v in theirs.state_dict().items()]
    assert ours.pretrained_cfg == theirs.pretrained_cfg


def test_the_authors_weights_of_a_narrow_baseline(tmp_path, capsys):
    for name in ('convformer_s18', 'caformer_s18'):
        model = perturb(build(name, **NARROW))
        path = tmp_path / f'{name}_narrow.pth'
        torch.save({'model': to_authors_layout(model.state_dict())}, path)
        assert torch.equal(logits(polynext.create_model(name, checkpoint=path, **NARROW)), logits(model))
    out = tmp_path / 'caformer_narrow.safetensors'
    assert cli_main(['convert', str(path), str(out), '--model', 'caformer_s18', '--model-kwargs',
                     '{dims: [32, 64, 128, 256], depths: [1, 1, 2, 1]}']) == 0, capsys.readouterr().err
    from polynext.checkpoint import read_safetensors_metadata
    meta = read_safetensors_metadata(out)
    assert meta['model_kwargs'] == dict(dims=[32, 64, 128, 256], depths=[1, 1, 2, 1])
    assert torch.equal(logits(polynext.create_model('caformer_s18', checkpoint=out, **meta['model_kwargs'])),
                       logits(model))
