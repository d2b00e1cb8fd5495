"""The shared training engine, tested once for every task: precision and the scaler, the loader's worker
cap, the gradient-norm meter, the optimizer step with accumulation, the EMA start rules, the batch layout,
the preset table, run planning, and the import layout (no circle; the engine imports no task)."""
import ast
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Dict, Tuple

import pytest
import torch
import torch.nn as nn

from polynext.engine import (
    BatchLayout, EmaTracker, Meters, NonFiniteError, Precision, PresetTable, TrainStep, make_loader, plan_run,
)
from polynext.engine.data import usable_cores
from polynext.errors import CheckpointError, ConfigError

SRC = Path(__file__).resolve().parents[1] / 'src' / 'polynext'
#: packages that hold one task each (the ablation study over the classification task, and the commands on
#: top); the engine may import none of them
TASK_PACKAGES = ('train', 'seg', 'det', 'robustness', 'ablate', 'commands')


# ---------------------------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('amp, cpu_amp, dtype, scaler', [
    ('bf16', False, None, False),             # CPU without cpu_amp: fp32 whatever the recipe says
    ('bf16', True, torch.bfloat16, False),    # CPU autocast allowed on request; bf16 needs no scaler
    ('fp16', True, torch.float16, True),      # fp16: a scaler for the device type (CPU here)
    ('none', True, None, False),
])
def test_precision_for_the_device(amp, cpu_amp, dtype, scaler):
    p = Precision(torch.device('cpu'), amp, cpu_amp)
    assert p.dtype == dtype and (p.scaler is not None) == scaler
    assert p.name == {torch.bfloat16: 'bf16', torch.float16: 'fp16', None: 'fp32'}[dtype]
    if scaler:
        assert p.scaler._device == 'cpu'      # not GradScaler('cuda') on a CPU run
    with p.autocast():
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == (dtype or torch.float32)


def test_loader_workers_never_exceed_the_usable_cores():
    data = list(range(8))
    assert make_loader(data, None, 2, workers=10_000, seed=0).num_workers == usable_cores()
    assert make_loader(data, None, 2, workers=0, seed=0).num_workers == 0


def test_grad_norm_meter_counts_finite_norms_only():
    m = Meters('loss')
    for norm in (1.0, float('inf'), 3.0, float('nan')):
        m.add_grad_norm(torch.tensor(norm))
    m.add(loss=2.5)
    red = m.reduce()
    assert (red['grad_norm'], red['steps'], red['loss']) == (4.0, 2.0, 2.5)
    assert Meters.mean_grad_norm(red) == 2.0
    m.reset()
    assert m.state_dict() == dict(loss=0.0, grad_norm=0.0, steps=0.0)


def _regression(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(3, 1, bias=False), torch.randn(8, 3), torch.randn(8, 1)


def test_accumulated_micro_batches_make_the_full_batch_step():
    """2 micro-batches of 4 with accumulation 2 = one step on the batch of 8 (mean loss), clipped the same."""
    ref, x, y = _regression()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    nn.functional.mse_loss(ref(x), y).backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5))
    opt.step()

    model, _, _ = _regression()
    meters = Meters()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), Precision(torch.device('cpu')),
                     BatchLayout(4, 1, 2), meters, device=torch.device('cpu'), clip_grad=0.5)
    for k in range(2):
        xb, yb = step.to_device(x[4 * k:4 * k + 4], y[4 * k:4 * k + 4])
        with step.micro_batch(sync=k == 1):
            with step.autocast():
                loss = nn.functional.mse_loss(model(xb), yb)
            step.backward(loss)
    norm = step.optimizer_step(float(loss.detach()), epoch=0, batch=1)
    assert norm == pytest.approx(ref_norm, rel=1e-6) and ref_norm > 0.5       # the norm before clipping
    assert torch.allclose(model.weight, ref.weight, atol=1e-7)
    assert model.weight.grad is None and step.global_step == 1 and meters['steps'] == 1


def test_a_non_finite_loss_stops_before_the_step():
    model, x, y = _regression()
    before = model.weight.detach().clone()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), Precision(torch.device('cpu')),
                     BatchLayout(8), Meters(), device=torch.device('cpu'), resume_hint=lambda: 'Resume with X.')
    with step.micro_batch(sync=True):
        step.backward(nn.functional.mse_loss(model(x), y) * float('nan'))
    with pytest.raises(NonFiniteError, match=r'at optimizer step 1 \(epoch 3, batch 8\).*Resume with X\.'):
        step.optimizer_step(float('nan'), epoch=2, batch=7)     # 0-based counters in, 1-based in the message
    assert torch.equal(model.weight, before) and step.global_step == 0


def test_ema_starts_at_its_epoch_and_its_first_update_copies():
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 1.0)
    ema = EmaTracker(model, decay=0.5, start_epoch=1, init='first_update')
    nn.init.constant_(model.weight, 3.0)
    ema.update(model, epoch=0)                    # before the start epoch: nothing
    assert (ema.updates, ema.module.weight.detach().item()) == (0, 1.0)
    ema.update(model, epoch=1)                    # first update: a copy
    nn.init.constant_(model.weight, 5.0)
    ema.update(model, epoch=1)                    # then 0.5 · 3 + 0.5 · 5
    assert (ema.updates, ema.module.weight.detach().item()) == (2, 4.0)
    fresh = EmaTracker(model, decay=0.5, init='model')   # from the copy at creation: 0.5 · 5 + 0.5 · 7
    nn.init.constant_(model.weight, 7.0)
    fresh.update(model, epoch=0)
    assert fresh.module.weight.detach().item() == 6.0


def test_batch_layout_is_computed_in_one_place():
    assert BatchLayout.split(1024, 128, 2) == BatchLayout(128, 2, 4)
    assert BatchLayout.split(1024, 128, 2).effective == 1024
    with pytest.raises(ConfigError, match=r'cannot be split into 3 device\(s\) × 128 per device'):
        BatchLayout.split(1024, 128, 3)
    with pytest.raises(ConfigError, match='is not a multiple of the per-device batch 100'):
        BatchLayout.check(1024, 100)


# ---------------------------------------------------------------------------------------------
# presets and run planning
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Cfg:
    model: str = 'a'
    model_kwargs: Dict[str, int] = field(default_factory=dict)
    dataset: str = 'demo'
    data: str = ''
    lr: float = 1.0
    epochs: int = 1
    output: str = ''
    device: str = 'cpu'
    COMMAND: ClassVar[str] = 'polynext toy train'
    MODEL_FIELDS: ClassVar[Tuple[str, str]] = ('model', 'model_kwargs')
    DATA_DATASETS: ClassVar[Dict[str, str]] = {'demo': 'folder'}

    def validate(self):
        if self.lr <= 0:
            raise ConfigError('lr must be positive')
        return self

    def summary(self):
        return dict(model=self.model, lr=f'{self.lr:g}')


def _table():
    t = PresetTable(_Cfg, default='demo')
    t.add('demo', _Cfg(model_kwargs=dict(width=8)), source='a demo')
    t.add('b', _Cfg(model='b', lr=2.0, dataset='folder'), source='paper B', needs_checkpoint=True)
    return t


def test_one_override_order_for_every_task(tmp_path):
    t = _table()
    yaml_file = tmp_path / 'c.yaml'
    yaml_file.write_text('recipe: b\nlr: 3.0\nepochs: 4\n')
    name, cfg = t.resolve(config_file=str(yaml_file), flags=dict(epochs=5), set_items=['lr=6'])
    assert (name, cfg.lr, cfg.epochs) == ('b', 6.0, 5)                      # recipe < YAML < flags < --set
    assert t.resolve(flags=dict(model='b'))[0] == 'b'                       # a recipe named like the model
    name, cfg = t.resolve(flags=dict(model='c', data='/x'))
    assert (name, cfg.model, cfg.model_kwargs, cfg.dataset) == ('demo', 'c', {}, 'folder')
    resolved = t.resolve_explicit('b', flags=dict(epochs=2, data=None), set_items=['lr=7'])
    assert resolved.explicit == dict(epochs=2, lr=7.0)
    assert t.show_config('b', cfg).startswith('recipe: b\nmodel: c\n')
    assert t.listing().splitlines() == ['recipe  model  lr  source', 'demo    a      1   a demo',
                                        'b       b      2   paper B']


@pytest.mark.parametrize('kwargs, message', [
    (dict(recipe='bb'), "unknown recipe 'bb'. Did you mean 'b'? `polynext toy train --list-recipes` lists them."),
    (dict(set_items=['lrr=1']), "unknown config key 'lrr' in --set. Did you mean 'lr'? `polynext toy train "
                                "--show-config` lists the keys."),
    (dict(set_items=['lr=0']), 'lr must be positive'),
    (dict(usual=['x']), "unknown fidelity flag 'x'. Choose from: none for this task"),
])
def test_preset_errors_name_the_fix(kwargs, message):
    with pytest.raises(ConfigError) as e:
        _table().resolve(**kwargs)
    assert str(e.value) == message


def test_plan_run_resumes_refuses_and_starts_fresh(tmp_path):
    cfg = _Cfg(output=str(tmp_path / 'run'))
    plan = plan_run(cfg, 'demo', state_format='toy/1', resume_safe_keys=('data',), command='polynext toy train')
    assert plan.state is None and plan.path == tmp_path / 'run'
    plan.path.mkdir()
    torch.save(dict(format='toy/1', model={}, config=dict(vars(cfg)), recipe='demo'), plan.path / 'last.state.pt')
    kw = dict(state_format='toy/1', resume_safe_keys=('data',), command='polynext toy train')
    assert plan_run(cfg, 'demo', **kw).state['recipe'] == 'demo'                       # the same command resumes
    with pytest.raises(ConfigError, match=r'holds a run with another config \(lr: 1.0 there, 2.0 now\)'):
        plan_run(_Cfg(output=cfg.output, lr=2.0), 'demo', **kw)
    assert plan_run(_Cfg(output=cfg.output, lr=2.0), 'demo', fresh=True, **kw).state is None
    resumed = plan_run(cfg, '', resume=str(plan.path), explicit=dict(data='/elsewhere'), **kw)
    assert resumed.config.data == '/elsewhere' and resumed.recipe == 'demo'
    with pytest.raises(ConfigError) as e:                  # the lr alone differs: the way to continue with it
        plan_run(_Cfg(output=cfg.output, lr=2.0), 'demo', **kw)
    assert f'`polynext toy train --resume {plan.path} --set lr=2.0` to continue it with the new setting' in str(e.value)
    assert plan_run(cfg, '', resume=str(plan.path), explicit=dict(lr=3.0), **kw).config.lr == 3.0   # optimisation
    with pytest.raises(ConfigError) as e:
        plan_run(cfg, '', resume=str(plan.path), explicit=dict(model='b'), **kw)
    assert str(e.value) == ("cannot change 'model' when resuming ('a' in the checkpoint, 'b' asked for): it would "
                            "change what the run trains. A resumed run may change lr (optimisation) and data (where "
                            "and how it runs); for anything else start a new run with --output DIR")
    with pytest.raises(CheckpointError, match="is a 'toy/1' training state, not 'other/1'"):
        plan_run(cfg, '', resume=str(plan.path), **dict(kw, state_format='other/1'))


# ---------------------------------------------------------------------------------------------
# the import layout
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _import_graph():
    """module → the polynext modules it imports anywhere in its file (functions included)."""
    modules = {}
    for path in SRC.rglob('*.py'):
        parts = list(path.relative_to(SRC.parent).with_suffix('').parts)
        is_pkg = parts[-1] == '__init__'
        modules['.'.join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    graph = {}
    for name, (path, is_pkg) in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = name.split('.') if is_pkg else name.split('.')[:-1]
                if node.level:
                    base = base[:len(base) - (node.level - 1)]
                    target = '.'.join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ''
                targets = [f'{target}.{a.name}' if f'{target}.{a.name}' in modules else target for a in node.names]
            for t in targets:
                while t not in modules and '.' in t:
                    t = t.rsplit('.', 1)[0]
                if t in modules and t != name:
                    deps.add(t)
        graph[name] = frozenset(deps)
    return graph


def _find_circle(graph):
    """The first import circle (a list of modules, first = last) or ``None``. A package's ``__init__`` importing
    its own submodules is how packages work, not a circle."""
    state: Dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + '.'):
                continue
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_the_import_graph_has_no_circle():
    graph = _import_graph()
    # the parser sees imports inside functions too (the old circle: checkpoint ↔ models.polynext was one)
    assert {'polynext.checkpoint', 'polynext.ops.poly_attention'} <= graph['polynext.models.polynext']
    assert 'polynext.engine.run' in graph['polynext.train.trainer'] and 'polynext.seg' in graph['polynext.commands.seg']
    circle = _find_circle(dict(graph, **{'polynext.checkpoint': set(graph['polynext.checkpoint']) | {
        'polynext.models.polynext'}}))
    assert circle[0] == circle[-1] and set(circle) == {'polynext.checkpoint', 'polynext.models.polynext'}
    assert _find_circle(graph) is None


def test_the_engine_imports_no_task_and_checkpoint_io_no_model():
    graph = _import_graph()
    tasks = tuple(f'polynext.{p}' for p in TASK_PACKAGES)
    for module, deps in graph.items():
        if module.startswith('polynext.engine'):
            assert not [d for d in deps if d.startswith(tasks)], module
    assert not [d for d in graph['polynext.checkpoint'] if d.startswith('polynext.models')]
    # the models sit below the engine and the tasks
    for module, deps in graph.items():
        if module.startswith('polynext.models'):
            assert not [d for d in deps if d.startswith(tasks + ('polynext.engine',))], module


def test_to_channels_last_keeps_per_channel_scales_in_standard_strides():
    """Every 4-D weight goes channels-last except the (1, C, 1, 1) scales, which keep the strides autograd gives
    their gradients (DDP's buckets follow the parameter: a mismatch is a copy per step); values unchanged."""
    import timm
    from polynext.engine.step import to_channels_last
    from conftest import mini_kwargs
    model = timm.create_model('cpolynext_t', **mini_kwargs('cpolynext_t'))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scales = [n for n, p in model.named_parameters() if p.dim() == 4 and p.shape[0] == 1 and p.shape[2:] == (1, 1)]
    assert scales                                       # the cells' per-channel input scales
    to_channels_last(model)
    for name, p in model.named_parameters():
        if name in scales:
            assert p.stride() == torch.empty(p.shape).stride(), name
        elif p.dim() == 4 and p.shape[1] > 1 and p.shape[2:] != (1, 1):
            assert p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous(), name
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    assert all(p.grad.stride() == p.stride() for n, p in model.named_parameters() if n in scales)


def test_cudnn_benchmark_is_off_for_detection_only(monkeypatch):
    """cuDNN's algorithm search pays for fixed shapes (classification, segmentation crops) and re-runs for every
    new one: detection (a padded size per batch) turns it off. The flags are set without touching a GPU."""
    from polynext.det.recipes import DetConfig
    from polynext.engine import run as engine_run
    from polynext.engine.backend import setup_backend
    from polynext.seg.recipes import SegConfig
    from polynext.train.recipes import TrainConfig
    seen = {}
    with monkeypatch.context() as m:
        m.setattr('polynext.engine.backend.setup_backend',
                  lambda device, seed, threads, deterministic, benchmark: seen.update({type(cfg): benchmark}))
        env = type('Env', (), dict(device=torch.device('cpu'), rank=0, world_size=1, is_main=False))()
        for cfg in (TrainConfig(), SegConfig(), DetConfig()):
            engine_run.start_run('/nonexistent/never-written', env, cfg, quiet=True)
    assert seen == {TrainConfig: True, SegConfig: True, DetConfig: False}
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        setup_backend(torch.device('cuda'), 0, benchmark=False)
        assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.allow_tf32
        setup_backend(torch.device('cuda'), 0)
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
