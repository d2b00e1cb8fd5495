"""Every ablation switch (``polynext.ABLATIONS``) checked as a formula.

Each test builds a mini model with the switch through ``polynext.create_model(name, switch=...)``,
takes the module the switch changes and compares its output with the paper's formula written out
here with plain ``torch.nn.functional`` calls on the module's own weights. Everything runs in
float64, so the tolerance (1e-10) is far below any change a switch makes: a switch that is
accepted but ignored, or that builds the wrong formula, fails.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import polynext
from polynext import ABLATIONS

from conftest import mini_kwargs

TOL = dict(atol=1e-10, rtol=1e-10)


def _model(name='cpolynext_t', **switches):
    torch.manual_seed(0)
    model = polynext.create_model(name, **mini_kwargs(name), **switches).double().eval()
    return model


def _x(c, h=6, w=7, seed=0):
    return torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _conv(conv, x):
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _ln(x, weight, eps=1e-5):
    """Channel LayerNorm, weight only: (x − E_c x) / sqrt(Var_c x + eps) · w."""
    u = x.mean(1, keepdim=True)
    var = ((x - u) ** 2).mean(1, keepdim=True)
    return (x - u) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1)


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


PRODUCTS = {  # (product_op, product_gelu) -> the interaction of the two branches a, b
    ('mul', 'none'): lambda a, b: a * b,                  # published: Hadamard product
    ('add', 'none'): lambda a, b: a + b,                  # "Hadamard → addition"
    ('mul', 'one_branch'): lambda a, b: _gelu(a) * b,     # "GELU on one multiplied branch"
    ('mul', 'after'): lambda a, b: _gelu(a * b),          # "GELU after the product"
}


def _polyconv(mixer, x, product):
    """W_o · DW3x3( P(DWcoarse(u), flip_c(DW3x3(u))) ),  u = W_i x."""
    u = _conv(mixer.pw_in, x)
    return _conv(mixer.pw_out, _conv(mixer.dw_out, product(_conv(mixer.coarse, u), _conv(mixer.fine, u).flip(1))))


def _polymlp(mlp, x, product):
    """W_o · LN( P(W_a x, W_b x) ), W_a / W_b = the two halves of one 1x1 projection."""
    a, b = _conv(mlp.fc_in, x).chunk(2, dim=1)
    return _conv(mlp.fc_out, _ln(product(a, b), mlp.norm.weight))


@pytest.mark.parametrize('ablation,product', [(None, ('mul', 'none')), ('hadamard_to_add', ('add', 'none')),
                                              ('gelu_one_branch', ('mul', 'one_branch')),
                                              ('gelu_after_product', ('mul', 'after'))])
def test_product_switches(ablation, product):
    """product_op / product_gelu change the interaction in PolyConv and PolyMLP alike."""
    switches = ABLATIONS[ablation] if ablation else {}
    op, gelu = product
    model = _model(**switches)
    block = model.stages[1].cells[0].blocks[0]
    x = _x(32)
    with torch.no_grad():
        torch.testing.assert_close(block.mixer(x), _polyconv(block.mixer, x, PRODUCTS[op, gelu]), **TOL)
        torch.testing.assert_close(block.mlp(x), _polymlp(block.mlp, x, PRODUCTS[op, gelu]), **TOL)
        if switches:  # not a no-op: the published product gives another result
            assert (block.mlp(x) - _polymlp(block.mlp, x, PRODUCTS['mul', 'none'])).abs().max() > 1e-3
            assert (block.mixer(x) - _polyconv(block.mixer, x, PRODUCTS['mul', 'none'])).abs().max() > 1e-3


def test_mlp_gelu():
    """PolyMLP → MLP + GELU: fc2 · LN(GELU(fc1 x)), fc1 as wide as the PolyMLP projection (2·hidden)."""
    model = _model(**ABLATIONS['mlp_gelu'])
    published = _model()
    for s, dim in enumerate((16, 32, 64, 96)):
        block, ref = model.stages[s].cells[0].blocks[0], published.stages[s].cells[0].blocks[0]
        mlp = block.mlp
        assert mlp.fc1.weight.shape == ref.mlp.fc_in.weight.shape == (int(dim * (2, 2, 1.75, 1.75)[s]), dim, 1, 1)
        assert mlp.fc2.weight.shape == (dim, int(dim * (2, 2, 1.75, 1.75)[s]), 1, 1)
        assert mlp.fc1.bias is None and mlp.fc2.bias is None
        x = _x(dim)
        with torch.no_grad():
            torch.testing.assert_close(mlp(x), _conv(mlp.fc2, _ln(_gelu(_conv(mlp.fc1, x)), mlp.norm.weight)), **TOL)
        assert type(block.mixer) is polynext.PolyConv  # only the MLP changes


def test_sepconv_gelu():
    """PolyConv → SepConv + GELU: pw2 · DW7x7(GELU(pw1 x)), inner width = the PolyConv inner width;
    the block keeps the norm after the mixer: x + g · LN(SepConv(x))."""
    model = _model(**ABLATIONS['sepconv_gelu'])
    for s, (dim, inner) in enumerate(((16, 16), (32, 32), (64, 48), (96, 72))):
        block = model.stages[s].cells[0].blocks[0]
        m = block.mixer
        assert m.pwconv1.weight.shape == (inner, dim, 1, 1) and m.pwconv2.weight.shape == (dim, inner, 1, 1)
        assert m.dwconv.kernel_size == (7, 7) and m.dwconv.padding == (3, 3) and m.dwconv.groups == inner
        x = _x(dim)
        expected_mixer = _conv(m.pwconv2, _conv(m.dwconv, _gelu(_conv(m.pwconv1, x))))
        with torch.no_grad():
            torch.testing.assert_close(m(x), expected_mixer, **TOL)
            g1, g2 = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
            y = x + g1 * _ln(expected_mixer, block.mixer_norm.weight)
            y = y + g2 * _polymlp(block.mlp, y, PRODUCTS['mul', 'none'])
            torch.testing.assert_close(block(x, g1, g2), y, **TOL)


def _heads(t, heads, head_dim):
    b = t.shape[0]
    return t.reshape(b, heads, head_dim, -1).transpose(-1, -2)  # (B, heads, N, head_dim)


def test_standard_attention():
    """PolyAttn → standard attention: timm's MHSA, softmax(q kᵀ / √32) v, head dim 32, no biases,
    separate q / k / v projections and no local convs; pre-norm block."""
    model = _model('apolynext_t', **ABLATIONS['std_attention'])
    block = model.stages[2].cells[0].blocks[0]
    m = block.mixer
    dim, heads = 64, 2
    assert m.qkv.weight.shape == (3 * dim, dim, 1, 1) and m.qkv.bias is None and m.proj.bias is None
    assert not any(hasattr(m, n) for n in ('q_conv', 'k_conv', 'v_conv', 'final_conv'))
    x = _x(dim, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _conv(m.proj, _attn_o(m, x, heads, dim)), **TOL)
        g1, g2 = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
        y = x + g1 * _conv(m.proj, _attn_o(m, _ln(x, block.mixer_norm.weight), heads, dim))
        y = y + g2 * _polymlp(block.mlp, y, PRODUCTS['mul', 'none'])
        torch.testing.assert_close(block(x, g1, g2), y, **TOL)
    assert model.stages[3].cells[0].blocks[0].mixer.qkv.weight.shape == (3 * 96, 96, 1, 1)  # 3 heads at 96


def _attn_o(m, x, heads, dim):
    b, _, h, w = x.shape
    q, k, v = (_heads(t, heads, 32) for t in _conv(m.qkv, x).chunk(3, dim=1))
    o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1) @ v
    return o.transpose(-1, -2).reshape(b, dim, h, w)


def _polyattn_o(m, x, kernel):
    b, _, h, w = x.shape
    qk, v = _conv(m.qkv, x).split(m.attn_dim, dim=1)
    q, k, v = (_heads(_conv(c, t), m.num_heads, 32) for c, t in ((m.q_conv, qk), (m.k_conv, qk), (m.v_conv, v)))
    scores = q @ k.transpose(-1, -2)
    if kernel == 'poly':  # (sigmoid(l_h) q kᵀ + 1)^4, l1-normalised rows
        a = (torch.sigmoid(m.scale) * scores + 1) ** 4
        a = a / a.sum(-1, keepdim=True)
    else:                 # softmax(q kᵀ / √d)
        a = torch.softmax(scores / math.sqrt(32), dim=-1)
    o = (a @ v).transpose(-1, -2).reshape(b, m.attn_dim, h, w)
    return _conv(m.proj, _conv(m.final_conv, o))


@pytest.mark.parametrize('kernel', ['poly', 'softmax'])
def test_polynomial_kernel_to_softmax(kernel):
    """attn='poly_softmax' keeps the shared Q/K projection and the convs and swaps the kernel."""
    switches = ABLATIONS['poly_kernel_to_softmax'] if kernel == 'softmax' else {}
    model = _model('apolynext_t', **switches)
    m = model.stages[3].cells[0].blocks[0].mixer   # 96 channels: 2 heads of 32
    assert type(m) is polynext.PolyAttn and m.qkv.weight.shape == (2 * 64, 96, 1, 1)  # shared Q/K
    with torch.no_grad():
        m.scale.copy_(torch.tensor([0.7, -1.3]).view(1, 2, 1, 1))  # a non-default scale: softmax ignores it
        x = _x(96, 5, 6)
        torch.testing.assert_close(m(x), _polyattn_o(m, x, kernel), **TOL)
        other = _polyattn_o(m, x, 'poly' if kernel == 'softmax' else 'softmax')
        assert (m(x) - other).abs().max() > 1e-3


# ---- the cell: residual scales, multi-input skip, merge norm, stacks ------------------

def _cell_formula(cell, s0, s1, gates, gate_index, multi_input_skip=True, cell_norm=True):
    """x = LN(a ⊙ s0 + b ⊙ s1);  x ← x + g[m_j] · LN(PolyConv(x));  x ← x + g[n_j] · PolyMLP(x)."""
    x = cell.scale1.scale * s1
    if multi_input_skip:
        x = cell.scale0.scale * s0 + x
    if cell_norm:
        x = _ln(x, cell.merge_norm.weight)
    for block, (i, j) in zip(cell.blocks, gate_index):
        x = x + gates[i] * _ln(_polyconv(block.mixer, x, PRODUCTS['mul', 'none']), block.mixer_norm.weight)
        x = x + gates[j] * _polymlp(block.mlp, x, PRODUCTS['mul', 'none'])
    return x


def _randomise_cell_inputs(cell, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (cell.scale0, cell.scale1):
            if p is not None:
                p.scale.copy_(torch.rand(p.scale.shape, generator=g, dtype=torch.float64) + 0.5)
        if hasattr(cell.merge_norm, 'weight'):
            cell.merge_norm.weight.copy_(torch.rand(cell.merge_norm.weight.shape, generator=g, dtype=torch.float64) + 0.5)


@pytest.mark.parametrize('name,paired', [('cpolynext_t', True), ('cpolynext_s', False)])
def test_published_sigmoid_scale_cell(name, paired):
    """The baseline of the residual switches: g = sigmoid(l); T pairs the gates (block j uses
    g[j], g[j+1]), S/B/L do not (g[2j], g[2j+1])."""
    model = _model(name)
    cell = model.stages[1].cells[0]
    _randomise_cell_inputs(cell)
    logits = torch.linspace(-2, 2, cell.gates.logits.numel(), dtype=torch.float64)
    with torch.no_grad():
        cell.gates.logits.copy_(logits)
    n = len(cell.blocks)
    index = [(j, j + 1) if paired else (2 * j, 2 * j + 1) for j in range(n)]
    s0, s1 = _x(32, seed=2), _x(32, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(cell(s0, s1), _cell_formula(cell, s0, s1, torch.sigmoid(logits), index), **TOL)


@pytest.mark.parametrize('name,init', [
    ('cpolynext_t', [0.5, 0.5, 0.25, 0.125, 0.0625, 0.03125]),                       # T: probabilities
    ('cpolynext_s', [1 / (1 + math.exp(i / 2)) for i in range(8)]),                  # S: sigmoid of the logits
])
def test_free_scalar(name, init):
    """Sigmoid-Scale → free scalar: x + s · f(x), s unconstrained, starting at the published gate."""
    model = _model(name, **ABLATIONS['free_scalar'])
    cell = model.stages[1].cells[0]
    assert type(cell.gates) is polynext.FreeScale
    assert cell.gates.scales.tolist() == pytest.approx(init, abs=1e-7)
    free = torch.tensor([1.7, -0.4, 2.5, 0.3, -1.1, 0.9, -2.0, 1.2][:len(init)], dtype=torch.float64)
    with torch.no_grad():
        cell.gates.scales.copy_(free)  # outside (0, 1): no sigmoid could give these
    _randomise_cell_inputs(cell)
    n = len(cell.blocks)
    paired = name == 'cpolynext_t'
    index = [(j, j + 1) if paired else (2 * j, 2 * j + 1) for j in range(n)]
    s0, s1 = _x(32, seed=2), _x(32, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(cell(s0, s1), _cell_formula(cell, s0, s1, free, index), **TOL)


@pytest.mark.parametrize('ablation,init', [('layerscale_1e-6', 1e-6), ('layerscale_1', 1.0)])
def test_layerscale_gates(ablation, init):
    """Sigmoid-Scale → LayerScale: a per-channel scale per residual (2 per block, never paired),
    initialised at 1e-6 or 1.0."""
    model = _model('cpolynext_t', **ABLATIONS[ablation])
    cell = model.stages[1].cells[0]
    n = len(cell.blocks)
    assert type(cell.gates) is polynext.LayerScaleGates
    assert torch.equal(cell.gates.scales, torch.full((2 * n, 32, 1, 1), init).double())  # float32 init
    scales = torch.randn(2 * n, 32, 1, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        cell.gates.scales.copy_(scales)
    _randomise_cell_inputs(cell)
    s0, s1 = _x(32, seed=2), _x(32, seed=3)
    index = [(2 * j, 2 * j + 1) for j in range(n)]
    with torch.no_grad():
        torch.testing.assert_close(cell(s0, s1), _cell_formula(cell, s0, s1, scales, index), **TOL)


def test_no_multi_input_skip():
    """The cell reads only the previous cell: x = LN(b ⊙ s1); no s0 scale and no s0 reduction."""
    model = _model(**ABLATIONS['no_multi_input_skip'])
    published = _model()
    cell = model.stages[1].cells[0]
    assert cell.scale0 is None
    _randomise_cell_inputs(cell)
    gates = torch.sigmoid(cell.gates.logits.detach())
    index = [(j, j + 1) for j in range(len(cell.blocks))]
    s1 = _x(32, seed=3)
    with torch.no_grad():
        out = cell(_x(32, seed=2), s1)
        torch.testing.assert_close(out, _cell_formula(cell, None, s1, gates, index, multi_input_skip=False), **TOL)
        torch.testing.assert_close(cell(_x(32, seed=9), s1), out, atol=0, rtol=0)  # s0 is not read at all
    # exactly the s0 scales and the s0 reductions are gone
    removed = sum(c.scale0.scale.numel() for s in published.stages for c in s.cells)
    removed += sum(p.numel() for s in published.stages for p in s.downsample_s0.parameters())
    assert _count(published) - _count(model) == removed > 0


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_no_cell_norm():
    """No norm before the cell: x = a ⊙ s0 + b ⊙ s1 enters the blocks as is."""
    model = _model(**ABLATIONS['no_cell_norm'])
    published = _model()
    cell = model.stages[1].cells[0]
    assert not list(cell.merge_norm.parameters())
    _randomise_cell_inputs(cell)
    gates = torch.sigmoid(cell.gates.logits.detach())
    index = [(j, j + 1) for j in range(len(cell.blocks))]
    s0, s1 = _x(32, seed=2), _x(32, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(cell(s0, s1), _cell_formula(cell, s0, s1, gates, index, cell_norm=False), **TOL)
    assert _count(published) - _count(model) == sum(c.merge_norm.weight.numel() for s in published.stages
                                                    for c in s.cells)


@pytest.mark.parametrize('ablation,stacks', [('wide_2_stacks', 2), ('wide_1_stack', 1)])
def test_stacks(ablation, stacks):
    """Wider, shallower cells: `stacks` blocks per cell, inner widths × (published blocks / stacks):
    conv inner = int(dim · conv_expansion · 3 / stacks), PolyMLP width = int(dim · mlp_expansion · 3 / stacks)."""
    model = _model(**ABLATIONS[ablation])
    f = 3 / stacks
    for s, (dim, ce, me) in enumerate(((16, 1, 2), (32, 1, 2), (64, 0.75, 1.75), (96, 0.75, 1.75))):
        for cell in model.stages[s].cells:
            assert len(cell.blocks) == stacks
            for block in cell.blocks:
                assert block.mixer.pw_in.weight.shape == (int(dim * ce * f), dim, 1, 1)
                assert block.mlp.fc_in.weight.shape == (int(dim * me * f), dim, 1, 1)
                assert block.mlp.fc_out.weight.shape == (dim, int(dim * me * f) // 2, 1, 1)
    cell = model.stages[1].cells[0]
    _randomise_cell_inputs(cell)
    gates = torch.sigmoid(cell.gates.logits.detach())
    index = [(j, j + 1) for j in range(stacks)]   # T pairs its gates
    s0, s1 = _x(32, seed=2), _x(32, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(cell(s0, s1), _cell_formula(cell, s0, s1, gates, index), **TOL)


COVERED = {'mlp_gelu', 'sepconv_gelu', 'gelu_one_branch', 'gelu_after_product', 'hadamard_to_add', 'std_attention',
           'poly_kernel_to_softmax', 'free_scalar', 'layerscale_1e-6', 'layerscale_1', 'no_multi_input_skip',
           'no_cell_norm', 'wide_2_stacks', 'wide_1_stack'}


def test_every_switch_has_a_formula_test():
    assert set(ABLATIONS) == COVERED, 'a new ablation switch needs a formula test in this file'
