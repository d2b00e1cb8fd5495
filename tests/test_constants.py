"""ops.constants: values derived from parameters (packed weights, gated weights, depthwise taps) are computed once
and recomputed exactly when a source changes through PyTorch, never served stale."""
import gc

import pytest
import timm
import torch
import torch.nn as nn

import polynext  # noqa: F401  (registers the models)
from polynext.ops import constants as cs


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self):
        self.calls += 1
        return self.fn()


def test_kept_until_a_source_changes():
    """The same value while the parameter is unchanged; recomputed after an in-place change (no_grad), a
    ``load_state_dict`` and a ``.data`` reassignment; equal gate values keep it, other values do not."""
    conv = nn.Conv2d(8, 4, 1, bias=False)
    w = conv.weight
    make = _Counter(lambda: w * 2)
    first = cs.derived('t', (w,), make)
    assert cs.derived('t', (w,), make) is first and make.calls == 1
    with torch.no_grad():
        w.add_(1.0)                                                       # an optimizer step's kind of write
    again = cs.derived('t', (w,), make)
    assert make.calls == 2 and torch.equal(again, w * 2)
    conv.load_state_dict({'weight': torch.zeros(4, 8, 1, 1)})
    assert torch.equal(cs.derived('t', (w,), make), torch.zeros(4, 8, 1, 1)) and make.calls == 3
    w.data = torch.ones(4, 8, 1, 1)                                       # new storage
    assert torch.equal(cs.derived('t', (w,), make), 2 * torch.ones(4, 8, 1, 1)) and make.calls == 4
    gate = torch.tensor([0.5])
    a = cs.scaled_weight(w, gate)
    assert cs.scaled_weight(w, torch.tensor([0.5])) is a                   # equal values, a fresh tensor
    b = cs.scaled_weight(w, torch.tensor([0.25]))
    assert b is not a and torch.equal(b, w * 0.25)


def test_an_optimizer_step_renews_every_value():
    """A step of the fused AdamW kernel writes the parameters without advancing their version counters; any
    optimizer's step renews the kept values all the same."""
    p = nn.Parameter(torch.randn(4))
    p.grad = torch.ones(4)
    optimizer = torch.optim.AdamW([p], lr=0.1, fused=True)
    before = cs.derived('t', (p,), lambda: p * 1)
    optimizer.step()
    after = cs.derived('t', (p,), lambda: p * 1)
    assert not torch.equal(before, after) and torch.equal(after, p)


def test_not_kept_for_other_tensors_or_when_off():
    """A tensor computed in the forward (not a parameter), a parameter made under ``inference_mode`` (no version
    counter) and the switch off: computed on every call."""
    t = torch.randn(3)
    make = _Counter(lambda: t + 1)
    cs.derived('t', (t,), make)
    cs.derived('t', (t,), make)
    assert make.calls == 2
    with torch.inference_mode():
        p = nn.Parameter(torch.randn(3))
    make = _Counter(lambda: p + 1)
    cs.derived('t', (p,), make)
    cs.derived('t', (p,), make)
    assert make.calls == 2
    q = nn.Parameter(torch.randn(3))
    make = _Counter(lambda: q + 1)
    with cs.keep(False):
        cs.derived('t', (q,), make)
        cs.derived('t', (q,), make)
    assert make.calls == 2


def test_entries_go_with_their_parameter_and_views_are_copied():
    """An entry is dropped when its parameter is freed; a value that is a view of its source (here the parameter
    itself, made contiguous) is a copy, so a later write to the parameter does not show through it; ``clear`` forgets
    everything (after writes through ``.data``, which PyTorch does not version)."""
    p = nn.Parameter(torch.randn(4))
    v = cs.derived('view', (p,), lambda: p.contiguous())
    assert v.data_ptr() != p.data_ptr() and torch.equal(v, p)
    before = len(cs._TABLE)
    del p
    gc.collect()
    assert len(cs._TABLE) == before - 1
    q = nn.Parameter(torch.zeros(2))
    cs.derived('t', (q,), lambda: q + 1)
    q.data.add_(5.0)                                                      # not versioned: not seen ...
    assert torch.equal(cs.derived('t', (q,), lambda: q + 1), torch.ones(2))
    cs.clear()                                                            # ... until cleared
    assert torch.equal(cs.derived('t', (q,), lambda: q + 1), torch.full((2,), 6.0))


def test_model_logits_follow_a_weight_update():
    """cpolynext_t at inference keeps its packed and gated weights; after an in-place update of its parameters (as an
    optimizer step makes) the logits are those of a model that recomputes everything, and so after a dtype change."""
    torch.manual_seed(0)
    model = timm.create_model('cpolynext_t', init_channels=48, num_classes=5, cells=(1, 1, 1, 1)).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        y0 = model(x)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1).add_(0.01)
    with torch.inference_mode():
        y1 = model(x)
        with cs.keep(False):
            ref = model(x)
    assert not torch.equal(y0, y1) and torch.equal(y1, ref)
    model.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    with torch.inference_mode():
        yb = model(xb)
        with cs.keep(False):
            assert torch.equal(yb, model(xb))


def test_switch_benchmark_at_a_tiny_size(tmp_path, capsys):
    """``benchmarks/switch_ab.py constants.keep``: both settings timed on a model, equal logits, the JSON; every
    switch of the modules that define them is listed."""
    import json
    from conftest import load_benchmark
    bench = load_benchmark('switch_ab')
    assert {'constants.keep', 'cpu_kernels.kernels', 'cpu_kernels.heads_convs', 'fused.fusion'} <= set(bench.switches())
    out = tmp_path / 'sw.json'
    assert bench.main(['constants.keep', 'cpolynext_t', '--batch-size', '2', '--img-size', '32', '--runs', '1',
                       '--json', str(out)]) == 0
    data = json.loads(out.read_text())
    (row,) = data['rows']
    assert data['switch'] == 'constants.keep' and row['off_img_s'] > 0 and row['on_img_s'] > 0
    assert row['max_abs_logit_diff'] == 0
    assert 'constants.keep off and on' in capsys.readouterr().out
