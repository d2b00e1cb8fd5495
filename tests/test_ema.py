"""The EMA as math: ema ← d · ema + (1 − d) · w, checked against hand-computed values (decay 0.5).

The engine's ``EmaTracker`` (timm ``ModelEmaV3`` with the references' start rules) and its use in
``TrainStep``: the first update copies the weights, nothing happens before the start epoch,
floating buffers are averaged like the parameters (the reference's ``use_buffers=True``) while
integer counters are copied, one update follows each optimizer step (after it), and a restored
EMA continues the average instead of starting over. The training runs check the same recurrence
end to end (tests/test_train_run.py)."""
import pytest
import torch
import torch.nn as nn

from polynext.engine import BatchLayout, EmaTracker, Meters, Precision, TrainStep


class Tiny(nn.Module):
    """A weight, a bias and a BatchNorm (floating running statistics, an integer counter)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.fc(x))


def _fill(model, value, count=None):
    """Every parameter and floating buffer = ``value``; the BatchNorm counter = ``count``."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.fill_(value)
            elif count is not None:
                t.fill_(count)
    return model


def _values(model):
    """{key: the single value the tensor holds} (all tests fill tensors with one value)."""
    out = {}
    for k, t in model.state_dict().items():
        vals = t.flatten().unique().tolist()
        assert len(vals) == 1, k
        out[k] = vals[0]
    return out


FLOAT_KEYS = ('fc.weight', 'fc.bias', 'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var')


def _expect(ema, value, count):
    v = _values(ema.module)
    assert {k: v[k] for k in FLOAT_KEYS} == dict.fromkeys(FLOAT_KEYS, value)
    assert v['bn.num_batches_tracked'] == count


def test_decay_first_copy_start_epoch_and_buffers():
    model = _fill(Tiny(), 1.0, 0)
    ema = EmaTracker(model, decay=0.5, start_epoch=2, init='first_update')
    _expect(ema, 1.0, 0)                              # a copy of the model at creation
    _fill(model, 2.0, 3)
    ema.update(model, epoch=0)
    ema.update(model, epoch=1)                        # before the start epoch: nothing, not even counted
    assert ema.updates == 0 and not ema.started
    _expect(ema, 1.0, 0)
    _fill(model, 4.0, 5)
    ema.update(model, epoch=2)                        # the first update copies (not 0.5·1 + 0.5·4 = 2.5)
    assert ema.updates == 1 and ema.started
    _expect(ema, 4.0, 5)
    _fill(model, 8.0, 6)
    ema.update(model, epoch=2)                        # 0.5 · 4 + 0.5 · 8
    _expect(ema, 6.0, 6)                              # buffers averaged too; the integer counter copied
    _fill(model, 0.0, 9)
    ema.update(model, epoch=5)                        # 0.5 · 6 + 0.5 · 0
    _expect(ema, 3.0, 9)
    assert ema.updates == 3


def test_init_model_averages_from_the_creation_copy():
    """timm's --model-ema (MetaFormer recipes): no copy at the first update."""
    model = _fill(Tiny(), 1.0, 0)
    ema = EmaTracker(model, decay=0.5, start_epoch=0, init='model')
    _fill(model, 3.0, 1)
    ema.update(model, epoch=0)
    _expect(ema, 2.0, 1)                              # 0.5 · 1 + 0.5 · 3
    with pytest.raises(ValueError, match='init must be one of'):
        EmaTracker(model, decay=0.5, init='copy')


def test_decay_other_than_one_half():
    model = _fill(Tiny(), 0.0, 0)
    ema = EmaTracker(model, decay=0.75, start_epoch=0, init='model')
    _fill(model, 1.0)
    ema.update(model, epoch=0)
    ema.update(model, epoch=0)
    _expect(ema, 1 - 0.75 ** 2, 0)                    # 0.25, then 0.75·0.25 + 0.25 = 0.4375


def test_restore_continues_the_average():
    """A resumed run gets the saved EMA weights and update count: the next update averages with them
    (a restore that lost the count would copy; one that lost the weights would average the model)."""
    model = _fill(Tiny(), 4.0, 2)
    saved = EmaTracker(model, decay=0.5, start_epoch=1)
    saved.update(model, epoch=1)
    _fill(model, 8.0, 3)
    saved.update(model, epoch=1)
    _expect(saved, 6.0, 3)
    weights, updates = saved.module.state_dict(), saved.updates

    resumed_model = _fill(Tiny(), 8.0, 3)             # the raw weights at the checkpoint
    ema = EmaTracker(resumed_model, decay=0.5, start_epoch=1)
    ema.restore({k: v.clone() for k, v in weights.items()}, updates, resumed_model)
    assert ema.updates == 2
    _expect(ema, 6.0, 3)
    _fill(resumed_model, 2.0, 4)
    ema.update(resumed_model, epoch=1)
    _expect(ema, 4.0, 4)                              # 0.5 · 6 + 0.5 · 2, as the uninterrupted EMA

    # an EMA switched on at resumption (no saved weights) starts from the raw weights
    late = EmaTracker(_fill(Tiny(), 0.0, 0), decay=0.5, start_epoch=0)
    late.restore(None, 0, _fill(Tiny(), 5.0, 7))
    _expect(late, 5.0, 7)
    assert late.updates == 0


def test_train_step_updates_the_ema_once_per_optimizer_step_after_it():
    """Through the engine's optimizer step (2 micro-batches per step, SGD): from the start epoch the EMA
    follows the weights after each step, ema_k = 0.5 · ema_{k−1} + 0.5 · w_k, the first one a copy."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    ema = EmaTracker(model, decay=0.5, start_epoch=1)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), Precision(torch.device('cpu')),
                     BatchLayout(2, 1, 2), Meters(), device=torch.device('cpu'), ema=ema)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    initial = model.weight.detach().clone()
    expected, weights = None, []
    for epoch in range(3):
        for _ in range(2):                                    # two optimizer steps per epoch
            for k in range(2):
                with step.micro_batch(sync=k == 1):
                    step.backward(nn.functional.mse_loss(model(x[2 * k:2 * k + 2]), y[2 * k:2 * k + 2]))
            step.optimizer_step(0.0, epoch=epoch, batch=1)
            w = model.weight.detach().clone()
            weights.append(w)
            if epoch >= 1:
                expected = w.clone() if expected is None else 0.5 * expected + 0.5 * w
            torch.testing.assert_close(ema.module.weight, expected if expected is not None else initial,
                                       atol=1e-7, rtol=1e-6)
    assert ema.updates == 4 and step.global_step == 6
    assert not torch.equal(weights[-1], weights[-2])          # the weights did move: the EMA is not trivially equal
