"""timm API, features, training behaviour and ablation switches of the PolyNeXt models."""
import math

import pytest
import timm
import torch
import torch.nn as nn

import polynext
from polynext import ABLATIONS, PolyNeXt
from polynext.profile import count_params

from conftest import mini_kwargs

ALL = ['cpolynext_t', 'cpolynext_s', 'cpolynext_b', 'cpolynext_l', 'apolynext_t', 'apolynext_s', 'apolynext_b',
       'apolynext_l', 'cpolynext_t_bn', 'apolynext_t_bn', 'cpolynext_s_bn', 'cpolynext_lr']


def _input(name, batch=2):
    return torch.randn(batch, 3, *((32, 32) if name == 'cpolynext_lr' else (64, 64)))


def test_all_models_registered_on_import():
    for name in ALL:
        assert timm.is_model(name)
        assert name in timm.list_models('*polynext*')


@pytest.mark.parametrize('name', ALL)
def test_timm_api(name):
    model = timm.create_model(name, **mini_kwargs(name, num_classes=7, drop_rate=0.1, drop_path_rate=0.1))
    x = _input(name)
    model.eval()
    feats = model.forward_features(x)
    assert feats.shape[1] == model.num_features
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, model.head_hidden_size) and model.head_hidden_size == 2 * model.num_features
    assert model(x).shape == (2, 7)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, model.head_hidden_size)
    cfg = model.pretrained_cfg
    assert cfg['mean'] and cfg['std'] and cfg['input_size'] and cfg['crop_pct'] and cfg['interpolation'] == 'bicubic'
    assert float(model.head.drop.p) == pytest.approx(0.1)


def test_pretrained_cfg_values():
    cfg = timm.create_model('cpolynext_s').pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == pytest.approx(224 / 232)
    assert cfg['mean'] == (0.485, 0.456, 0.406)
    lr = timm.create_model('cpolynext_lr').pretrained_cfg
    assert lr['input_size'] == (3, 32, 32) and lr['num_classes'] == 10 and lr['crop_pct'] == 1.0
    tiny = timm.create_model('cpolynext_lr.tiny_imagenet').pretrained_cfg
    assert tiny['input_size'] == (3, 64, 64) and tiny['num_classes'] == 200


@pytest.mark.parametrize('name,strides', [('cpolynext_t', (4, 8, 16, 32)), ('apolynext_s', (4, 8, 16, 32)),
                                          ('cpolynext_t_bn', (4, 8, 16, 32)), ('cpolynext_lr', (1, 2, 4))])
def test_features_only(name, strides):
    kw = mini_kwargs(name)
    kw.pop('num_classes')
    model = timm.create_model(name, features_only=True, **kw)
    x = _input(name)
    outs = model(x)
    assert [o.shape[-1] for o in outs] == [x.shape[-1] // s for s in strides]
    assert model.feature_info.reduction() == list(strides)
    assert [o.shape[1] for o in outs] == model.feature_info.channels()
    assert not any(n.startswith('head') for n, _ in model.named_parameters())  # head pruned
    sub = timm.create_model(name, features_only=True, out_indices=(1, 2), **kw)
    assert [o.shape[-1] for o in sub(x)] == [x.shape[-1] // s for s in strides[1:3]]


def test_forward_intermediates_match_forward_features():
    model = timm.create_model('apolynext_t', **mini_kwargs('apolynext_t')).eval()
    x = _input('apolynext_t')
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert len(inter) == 4
        torch.testing.assert_close(final, model.forward_features(x))
        only = model.forward_intermediates(x, indices=[0, 3], intermediates_only=True)
    torch.testing.assert_close(only[1], inter[3])


def test_unknown_kwarg_is_an_error():
    with pytest.raises(TypeError, match="unknown argument 'init_channel'.*init_channels"):
        timm.create_model('cpolynext_t', init_channel=16)


def test_init_channels_sets_stage_widths():
    model = timm.create_model('cpolynext_s', init_channels=40, num_classes=10)
    assert [f['num_chs'] for f in model.feature_info] == [40, 80, 160, 240]
    with pytest.raises(ValueError, match='odd'):
        timm.create_model('cpolynext_s', init_channels=49)


def test_bn_model_has_all_tensors_at_construction_and_rejects_other_sizes():
    model = timm.create_model('cpolynext_t_bn', img_size=96, init_channels=16, num_classes=10)
    sd_before = {k: v.shape for k, v in model.state_dict().items()}
    assert any(k.endswith('gamma_hw') for k in sd_before)
    assert model.stages[0].cells[0].merge_norm.gamma_hw.shape == (1, 1, 24, 24)
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 96, 96))
    assert {k: v.shape for k, v in model.state_dict().items()} == sd_before
    with pytest.raises(ValueError, match='img_size=64'):
        model(torch.randn(1, 3, 64, 64))


def test_drop_path_schedule_per_cell():
    model = timm.create_model('cpolynext_s', drop_path_rate=0.3, init_channels=16, num_classes=10)
    rates = []
    for stage in model.stages:
        for cell in stage.cells:
            probs = {b.drop_path.drop_prob if hasattr(b.drop_path, 'drop_prob') else 0.0 for b in cell.blocks}
            assert len(probs) == 1  # every block of a cell shares the cell's rate
            rates.append(probs.pop())
    expected = torch.linspace(0, 0.3, 17).tolist()
    assert rates == pytest.approx(expected)


def test_head_dropout_rate_changes_between_epochs():
    model = timm.create_model('cpolynext_t', init_channels=16, num_classes=10)
    assert float(model.head.drop.p) == 0.0
    model.set_head_dropout(0.4)
    assert 'head.drop.p' in model.state_dict() and float(model.state_dict()['head.drop.p']) == pytest.approx(0.4)
    model.train()
    torch.manual_seed(0)
    x = torch.ones(4000, 2)
    y = model.head.drop(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.6) < 0.03 and torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.6))


def test_no_biases_except_classifier():
    model = timm.create_model('apolynext_t', init_channels=16, num_classes=10)
    with_bias = [n for n, m in model.named_modules() if getattr(m, 'bias', None) is not None]
    assert with_bias == ['head.fc']


def test_init_distributions():
    torch.manual_seed(0)
    model = timm.create_model('cpolynext_s')
    conv = model.stages[2].cells[0].blocks[0].mixer.pw_in  # POLY init: N(0, 2 / fan_in)
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.03)
    stem = model.stem  # PyTorch default: U(±1/sqrt(fan_in))
    bound = 1 / math.sqrt(stem.weight[0].numel())
    assert stem.weight.abs().max().item() <= bound
    assert stem.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    gates_s = torch.sigmoid(model.stages[0].cells[0].gates.logits)
    assert gates_s.tolist() == pytest.approx([0.5, 0.3775, 0.2689, 0.1824, 0.1192, 0.0759, 0.0474, 0.0293], abs=1e-4)
    t = timm.create_model('cpolynext_t')
    assert t.stages[0].cells[0].gate_index == [(0, 1), (1, 2), (2, 3)]  # paired: shared gates
    assert torch.sigmoid(t.stages[0].cells[0].gates.logits).tolist()[:4] == pytest.approx([0.5, 0.5, 0.25, 0.125])
    lr = timm.create_model('cpolynext_lr')  # LowRes quirk: the T list read as logits
    assert torch.sigmoid(lr.stages[0].cells[0].gates.logits).tolist()[:2] == pytest.approx([0.6225, 0.6225], abs=1e-4)
    attn = timm.create_model('apolynext_t').stages[2].cells[0].blocks[0].mixer
    assert torch.sigmoid(attn.scale).flatten().tolist() == pytest.approx([32 ** -0.5] * 3)


@pytest.mark.parametrize('name', ALL)
def test_finite_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **mini_kwargs(name, drop_path_rate=0.1, drop_rate=0.1))
    model.train()
    loss = nn.functional.cross_entropy(model(_input(name, 4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f'no gradient reaches {n}'
        assert torch.isfinite(p.grad).all(), f'non-finite gradient in {n}'


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model('apolynext_t', **mini_kwargs('apolynext_t'))
    x = _input('apolynext_t')
    model(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-4)


def test_cell_grad_clip_limits_incoming_gradient():
    model = timm.create_model('cpolynext_t', **mini_kwargs('cpolynext_t'))
    cell = model.stages[0].cells[0]
    seen = []
    model.set_cell_grad_clip(1e-3)
    s = torch.randn(2, 16, 16, 16)
    out = cell(s, s)
    out.register_hook(lambda g: seen.append(g.norm().item()))  # runs after the clip hook
    (out * 1000).sum().backward()
    assert seen and seen[0] == pytest.approx(1e-3, rel=1e-4)  # 1000x larger before the clip


@pytest.mark.parametrize('ablation', list(ABLATIONS))
def test_ablation_switch_builds_and_runs(ablation):
    name = 'apolynext_t' if ablation in ('std_attention', 'poly_kernel_to_softmax') else 'cpolynext_t'
    torch.manual_seed(0)
    model = timm.create_model(name, **mini_kwargs(name), **ABLATIONS[ablation])
    base = timm.create_model(name, **mini_kwargs(name))
    out = model(_input(name))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    if ablation == 'poly_kernel_to_softmax':
        # the softmax kernel does not read PolyAttn's per-head scale: 8 attention cells × 3 blocks leave it
        # without a gradient (DDP then needs find_unused_parameters=True for this ablation)
        assert len(no_grad) == 24 and all(n.endswith('.mixer.scale') for n in no_grad)
    else:
        assert no_grad == []                                    # every parameter takes part
    assert not model.ablation.is_published and base.ablation.is_published
    assert repr(model) != repr(base)


def test_ablation_details():
    kw = mini_kwargs('cpolynext_t')
    add = timm.create_model('cpolynext_t', product_op='add', **kw)
    assert add.stages[0].cells[0].blocks[0].mixer.product.op == 'add'
    ls = timm.create_model('cpolynext_t', residual_scale='layerscale', layerscale_init=1.0, **kw)
    assert torch.equal(ls.stages[0].cells[0].gates.gates(), torch.ones(6, 16, 1, 1))
    free = timm.create_model('cpolynext_t', residual_scale='free', **kw)
    assert free.stages[0].cells[0].gates.gates().tolist()[:3] == pytest.approx([0.5, 0.5, 0.25])
    noskip = timm.create_model('cpolynext_t', multi_input_skip=False, **kw)
    assert noskip.stages[0].cells[0].scale0 is None and isinstance(noskip.stages[1].downsample_s0, nn.Identity)
    nonorm = timm.create_model('cpolynext_t', cell_norm=False, **kw)
    assert isinstance(nonorm.stages[0].cells[0].merge_norm, nn.Identity)
    with pytest.raises(ValueError, match='mlp'):
        timm.create_model('cpolynext_t', mlp='relu', **kw)


@pytest.mark.parametrize('stacks', [2, 1])
def test_wide_cells_match_parameters(stacks):
    base = count_params(timm.create_model('cpolynext_t'))
    wide = timm.create_model('cpolynext_t', stacks=stacks)
    assert all(len(c.blocks) == stacks for s in wide.stages for c in s.cells)
    assert abs(count_params(wide) - base) / base < 0.01


def test_building_blocks_standalone_nchw():
    x = torch.randn(2, 24, 9, 9)
    assert polynext.PolyMLP(24, 36)(x).shape == x.shape
    assert polynext.PolyConv(24, 18, coarse_kernel=5)(x).shape == x.shape
    assert polynext.PolyAttn(24)(x).shape == x.shape
    assert polynext.LayerNorm2d(24)(x).shape == x.shape
    gate = polynext.SigmoidScale(0.25)
    torch.testing.assert_close(gate(x, 2 * x), x + 0.5 * x)
    cell = polynext.PolyNeXtCell(24, 2, 'conv', 24, 24, 3, [0.5] * 4, False, True)
    assert cell(x, x).shape == x.shape
    bn = polynext.ChannelBatchNorm(24, (9, 9))
    assert bn(x).shape == x.shape and int(bn.num_batches_tracked) == 1
    head = polynext.GatedHead(24, 5, polynext.LayerNorm2d)
    assert head(x).shape == (2, 5)


def test_polyconv_flip_semantics():
    """The fine branch is channel-reversed before the product (spec quirk 4)."""
    conv = polynext.PolyConv(4, 4, coarse_kernel=3)
    x = torch.randn(1, 4, 5, 5)
    u = conv.pw_in(x)
    t = conv.coarse(u) * conv.fine(u)[:, [3, 2, 1, 0]]
    torch.testing.assert_close(conv(x), conv.pw_out(conv.dw_out(t)))


def test_polyattn_matches_formula():
    torch.manual_seed(0)
    attn = polynext.PolyAttn(64).eval()
    x = torch.randn(2, 64, 5, 6)
    qk, v = attn.qkv(x).split(attn.attn_dim, 1)

    def heads(t):
        return t.reshape(2, attn.num_heads, 32, -1).transpose(-1, -2)
    q, k, v = heads(attn.q_conv(qk)), heads(attn.k_conv(qk)), heads(attn.v_conv(v))
    a = (torch.sigmoid(attn.scale) * (q @ k.transpose(-1, -2)) + 1) ** 4
    o = nn.functional.normalize(a, p=1, dim=-1) @ v
    o = o.transpose(1, 2).reshape(2, 5, 6, -1).permute(0, 3, 1, 2)
    expected = attn.proj(attn.final_conv(o))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-4)
