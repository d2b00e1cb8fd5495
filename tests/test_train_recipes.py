"""Recipes against the spec (values typed in from spec §9 / §9.2 and metaformer_baselines.md §4,
not read from polynext), overrides and their errors, optimizer / schedule / loss construction."""
import math

import numpy as np
import pytest
import timm
import torch

from polynext.errors import ConfigError
from polynext.train.class_maps import in21k_to_in1k_class_map, load_class_map, map_head_rows
from polynext.engine.memory import BatchLayout
from polynext.train.recipes import FIDELITY, PRESETS
from polynext.train.trainer import build_loss, build_optimizer, build_scheduler, head_dropout_at

get_preset, resolve_config = PRESETS.get, PRESETS.resolve


def accumulation_steps(cfg, world_size):
    return BatchLayout.split(cfg.batch_size, cfg.device_batch_size, world_size).accumulation

# spec §9 table: opt, lr, wd, per-GPU batch, accumulation on the reference's 2 GPUs, drop path,
# head dropout, ramp epochs (None: constant), random interpolation
SPEC_IN1K = {
    'cpolynext_t':    ('adamw', 4e-3, 0.01, 128, 4, 0.0,  0.0, None, False),
    'cpolynext_s':    ('adamw', 4e-3, 0.01, 128, 4, 0.2,  0.4, 300,  True),
    'cpolynext_b':    ('adamw', 4e-3, 0.01, 128, 4, 0.3,  0.6, 300,  True),
    'cpolynext_l':    ('adamw', 4e-3, 0.01, 128, 4, 0.5,  0.6, 300,  True),
    'apolynext_t':    ('lamb',  2e-3, 0.01, 128, 4, 0.03, 0.1, 300,  False),
    'apolynext_s':    ('lamb',  2e-3, 0.01, 128, 4, 0.25, 0.4, 300,  True),
    'apolynext_b':    ('lamb',  2e-3, 0.01, 128, 4, 0.4,  0.6, 300,  True),
    'apolynext_l':    ('lamb',  2e-3, 0.01, 128, 4, 0.55, 0.7, 300,  True),
    'cpolynext_t_bn': ('adamw', 1e-3, 0.05, 256, 2, 0.0,  0.0, None, False),
    'apolynext_t_bn': ('adamw', 1e-3, 0.05, 256, 2, 0.0,  0.0, None, False),
    # scripts/CPolyNeXt_S_BN.sh: --dropout 0.4 --rampout 300 (spec §9 table: "head dropout (ramp 300)")
    'cpolynext_s_bn': ('adamw', 1e-3, 0.05, 256, 2, 0.2,  0.4, 300,  False),
}


@pytest.mark.parametrize('name', list(SPEC_IN1K))
def test_polynext_in1k_recipe_matches_spec(name):
    opt, lr, wd, per_gpu, accum2, dp, hd, ramp, rand_interp = SPEC_IN1K[name]
    c = get_preset(name).config
    assert c.model == name
    assert (c.optimizer, c.lr, c.weight_decay, c.device_batch_size) == (opt, lr, wd, per_gpu)
    assert c.batch_size == 1024 and accumulation_steps(c, 2) == accum2 and accumulation_steps(c, 1) == 1024 // per_gpu
    assert (c.drop_path, c.head_dropout, c.head_dropout_ramp) == (dp, hd, ramp)
    assert c.train_interpolation == ('random' if rand_interp else 'bicubic')
    # common to every ImageNet script
    assert (c.epochs, c.cooldown_epochs, c.min_lr, c.warmup_epochs) == (300, 0, 1e-5, 0)
    assert (c.schedule, c.schedule_granularity) == ('cosine', 'epoch')
    assert (c.label_smoothing, c.mixup_alpha, c.cutmix_alpha, c.mix_switch_prob) == (0.1, 0.8, 1.0, 0.5)
    assert c.randaugment == 'rand-m9-mstd0.5-inc1' and c.random_erasing == 0.25 and c.hflip == 0.5
    assert c.crop_scale == (0.08, 1.0) and c.img_size == 224
    assert (c.eval_resize, c.eval_crop, c.eval_interpolation) == (232, 224, 'bicubic')
    assert tuple(round(m, 3) for m in c.mean) == (0.485, 0.456, 0.406)
    assert (c.ema, c.ema_decay, c.ema_start_epoch, c.ema_init) == (True, 0.9999, 200, 'first_update')
    assert c.amp == 'bf16' and c.wd_exclusions is False and c.seed == 0
    if opt == 'adamw':
        assert c.clip_grad == 5.0 and c.opt_eps == 1e-8
    else:
        assert c.clip_grad is None and c.lamb_max_grad_norm == 5.0 and c.lamb_decoupled_decay is True
        assert c.opt_eps == (1e-6 if name == 'apolynext_l' else 1e-8)


# spec §9.2: AdamW 1e-3, wd 0.05, batch 96, 300 epochs, cosine per epoch to 0, smoothing 0.1, CutMix 1 / MixUp 1,
# RandAugment, no drop path / dropout, clip 5, bf16, no EMA; sizes and flips per dataset
SPEC_LOWRES = {'cpolynext_lr_cifar10': ('cifar10', 32, 0.5), 'cpolynext_lr_svhn': ('svhn', 32, 0.0),
               'cpolynext_lr_tiny_imagenet': ('tiny_imagenet', 64, 0.5), 'cpolynext_lr': ('cifar10', 32, 0.5)}


@pytest.mark.parametrize('name', list(SPEC_LOWRES))
def test_lowres_recipe_matches_spec(name):
    dataset, size, flip = SPEC_LOWRES[name]
    c = get_preset(name).config
    assert (c.model, c.dataset, c.img_size, c.hflip) == ('cpolynext_lr', dataset, size, flip)
    assert (c.optimizer, c.lr, c.weight_decay, c.opt_eps, c.batch_size, c.device_batch_size) == (
        'adamw', 1e-3, 0.05, 1e-8, 96, 96)
    assert (c.epochs, c.min_lr, c.warmup_epochs, c.schedule_granularity) == (300, 0.0, 0, 'epoch')
    assert (c.label_smoothing, c.cutmix_alpha, c.mixup_alpha) == (0.1, 1.0, 1.0)
    assert (c.drop_path, c.head_dropout, c.clip_grad, c.amp, c.ema) == (0.0, 0.0, 5.0, 'bf16', False)
    assert c.train_interpolation == 'random' and c.randaugment == 'rand-m9-mstd0.5-inc1'
    assert c.mean == (0.49139968, 0.48215827, 0.44653124) and c.std == (0.24703233, 0.24348505, 0.26158768)
    assert (c.eval_resize, c.eval_crop) == (size, None)


def test_every_published_model_has_a_recipe():
    from polynext.models import POLYNEXT_MODELS
    from polynext.models import PUBLISHED_ARCHS
    assert set(POLYNEXT_MODELS) <= set(PRESETS)
    assert len(PUBLISHED_ARCHS) == 12 and set(PUBLISHED_ARCHS) <= set(POLYNEXT_MODELS)


# metaformer_baselines.md §4: Table 13 drop paths, Table 14 / 15 optimizers, lrs and regularisation
def test_metaformer_recipes_match_the_paper_tables():
    for fam, dps in (('identityformer', (0.1, 0.1, 0.2, 0.3, 0.4)), ('randformer', (0.1, 0.1, 0.2, 0.3, 0.3)),
                     ('poolformerv2', (0.1, 0.1, 0.2, 0.3, 0.4))):
        for size, dp in zip(('s12', 's24', 's36', 'm36', 'm48'), dps):
            c = get_preset(f'{fam}_{size}').config
            assert (c.optimizer, c.lr, c.warmup_epochs, c.drop_path, c.weight_decay) == ('adamw', 4e-3, 5, dp, 0.05)
            assert (c.epochs, c.cooldown_epochs, c.batch_size, c.min_lr, c.warmup_lr) == (300, 10, 4096, 1e-5, 1e-6)
            assert c.total_epochs == 310 and c.ema is False and c.clip_grad is None and c.wd_exclusions
    sizes = ('s18', 's36', 'm36', 'b36')
    conv = dict(dp=(0.2, 0.3, 0.4, 0.6), hd=(0, 0, 0, 0), ft_dp=(0.3, 0.5, 0.8, 0.8), ft_hd=(0.4, 0.4, 0.5, 0.5))
    caf = dict(dp=(0.15, 0.3, 0.4, 0.6), hd=(0.0, 0.4, 0.4, 0.5), ft_dp=(0.3, 0.5, 0.7, 0.8), ft_hd=(0.4, 0.4, 0.4, 0.5))
    for fam, t, opt, lr, ft_lr in (('convformer', conv, 'adamw', 4e-3, 5e-5), ('caformer', caf, 'lamb', 8e-3, 1e-4)):
        for i, size in enumerate(sizes):
            c = get_preset(f'{fam}_{size}').config
            assert (c.optimizer, c.lr, c.warmup_epochs, c.drop_path, c.head_dropout) == (opt, lr, 20, t['dp'][i], t['hd'][i])
            assert (c.mixup_alpha, c.cutmix_alpha, c.random_erasing, c.label_smoothing) == (0.8, 1.0, 0.25, 0.1)
            ft = get_preset(f'{fam}_{size}_384')
            f = ft.config
            assert ft.needs_checkpoint and (f.img_size, f.epochs, f.batch_size, f.schedule) == (384, 30, 1024, 'constant')
            assert (f.optimizer, f.lr, f.drop_path, f.head_dropout) == (opt, ft_lr, t['ft_dp'][i], t['ft_hd'][i])
            assert (f.mixup_alpha, f.cutmix_alpha, f.ema, f.ema_decay, f.ema_start_epoch) == (0, 0, True, 0.9999, 0)
            if opt == 'lamb':   # timm 0.6 Lamb defaults used by the authors: eps 1e-6, internal clip 1.0, L2-style decay
                assert (c.opt_eps, c.lamb_max_grad_norm, c.lamb_decoupled_decay) == (1e-6, 1.0, False)
    # Table 15
    for fam, opt, lr, dp, hd, ft_lr, ft_dp, ft_hd in (
            ('convformer', 'adamw', 1e-3, (0, 0, 0.1, 0.2), (0.2, 0.2, 0.2, 0.3), 5e-5, (0.1, 0.1, 0.1, 0.3),
             (0.2, 0.2, 0.2, 0.5)),
            ('caformer', 'lamb', 2e-3, (0.1, 0.1, 0.1, 0.3), (0.2, 0.2, 0.2, 0.4), 1e-4, (0.1, 0.1, 0.1, 0.3),
             (0.2, 0.2, 0.2, 0.5))):
        for i, size in enumerate(sizes):
            c = get_preset(f'{fam}_{size}_in21k').config
            assert (c.epochs, c.optimizer, c.lr, c.warmup_epochs, c.num_classes) == (90, opt, lr, 5, 21841)
            assert (c.cooldown_epochs, c.total_epochs) == (0, 90)      # Table 15's 90 epochs, no hidden cool-down
            assert (c.drop_path, c.head_dropout) == (dp[i], hd[i])
            for suffix, res in (('_in21ft1k', 224), ('_in21ft1k_384', 384)):
                f = get_preset(f'{fam}_{size}{suffix}').config
                assert (f.img_size, f.lr, f.drop_path, f.head_dropout, f.head_map) == (res, ft_lr, ft_dp[i], ft_hd[i],
                                                                                      'in21k_to_in1k')
                assert (f.epochs, f.schedule, f.ema, f.mixup_alpha, f.cutmix_alpha) == (30, 'constant', True, 0, 0)


def _tiny(name='cpolynext_lr', **kw):
    return timm.create_model(name, num_classes=10, init_channels=8, **kw)


def test_weight_decay_on_every_parameter_unless_the_usual_flag():
    model = _tiny()
    c = get_preset('cpolynext_t').config
    opt = build_optimizer(model, c)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
    g = opt.param_groups[0]
    assert g['weight_decay'] == 0.01 and len(g['params']) == len(list(model.parameters()))
    assert g['eps'] == 1e-8 and g['betas'] == (0.9, 0.999)
    usual = resolve_config('cpolynext_t', usual=['wd_exclusions'])[1]
    opt = build_optimizer(model, usual)
    decayed = [g for g in opt.param_groups if g['weight_decay'] > 0]
    undecayed = [g for g in opt.param_groups if g['weight_decay'] == 0]
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for g in undecayed for p in g['params']}
    assert skipped == {n for n, p in model.named_parameters() if p.ndim <= 1} | model.no_weight_decay()
    assert sum(len(g['params']) for g in decayed) + len(skipped) == len(list(model.parameters()))


def test_lamb_settings_of_the_reference():
    from timm.optim import Lamb
    c = get_preset('apolynext_l').config
    opt = build_optimizer(_tiny(), c)
    assert isinstance(opt, Lamb)
    g = opt.param_groups[0]
    assert (g['lr'], g['weight_decay'], g['eps'], g['max_grad_norm'], g['decoupled_decay'], g['trust_clip']) == (
        2e-3, 0.01, 1e-6, 5.0, True, False)


def test_cosine_per_epoch_schedule_matches_the_closed_form():
    c = get_preset('cpolynext_s').config
    opt = build_optimizer(_tiny(), c)
    sched = build_scheduler(opt, c, steps_per_epoch=1251)
    for e in (0, 1, 100, 150, 299):
        sched.step(e)
        expected = 1e-5 + (4e-3 - 1e-5) * (1 + math.cos(math.pi * e / 300)) / 2
        assert opt.param_groups[0]['lr'] == pytest.approx(expected, rel=1e-12)
    # per-step granularity changes the lr inside an epoch, and MetaFormer's cool-down stays at min_lr
    c2 = resolve_config('cpolynext_s', set_items=['schedule_granularity=step'])[1]
    sched = build_scheduler(opt, c2, steps_per_epoch=10)
    sched.step_update(5)
    assert opt.param_groups[0]['lr'] == pytest.approx(1e-5 + (4e-3 - 1e-5) * (1 + math.cos(math.pi * 5 / 3000)) / 2)
    mf = get_preset('convformer_s18').config
    sched = build_scheduler(opt, mf, steps_per_epoch=1)
    sched.step(2)   # warm-up: 1e-6 → 4e-3 over 20 epochs
    assert opt.param_groups[0]['lr'] == pytest.approx(1e-6 + 2 * (4e-3 - 1e-6) / 20)
    sched.step(305)
    assert opt.param_groups[0]['lr'] == pytest.approx(1e-5)


def test_label_smoothing_applies_on_top_of_the_mixed_targets():
    """timm Mixup(label_smoothing) + SoftTargetCrossEntropy == torch CrossEntropyLoss(label_smoothing=0.1)
    on the torchvision-style mixed soft targets (the reference)."""
    c = get_preset('cpolynext_s').config
    mixup, criterion = build_loss(c, num_classes=10)
    assert mixup.mixup_alpha == 0.8 and mixup.cutmix_alpha == 1.0 and mixup.switch_prob == 0.5
    assert mixup.mode == 'batch' and mixup.label_smoothing == 0.1
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8) % 10
    np.random.seed(3)
    xm, soft = mixup(x.clone(), y)
    lam = (soft[0, y[0]].item() - 0.01) / 0.9        # smoothed one-hot: on = 1 - 0.1 + 0.1/10, off = 0.01
    onehot = torch.nn.functional.one_hot(y, 10).float()
    mixed = lam * onehot + (1 - lam) * onehot.flip(0)
    logits = torch.randn(8, 10)
    ref = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, mixed)
    assert criterion(logits, soft).item() == pytest.approx(ref.item(), rel=1e-6)
    # without mixing (fine-tuning recipes): plain label smoothing
    _, ce = build_loss(get_preset('convformer_s18_384').config, num_classes=10)
    assert ce(logits, y).item() == pytest.approx(torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, y).item(),
                                                 rel=1e-6)


def test_head_dropout_ramp():
    c = get_preset('cpolynext_b').config      # 0.6 over 300 epochs
    assert [head_dropout_at(c, e) for e in (0, 150, 299, 300, 310)] == [0.0, 0.3, 0.6 * 299 / 300, 0.6, 0.6]
    s_bn = get_preset('cpolynext_s_bn').config  # ramps like the others (the script passes --rampout 300)
    assert [head_dropout_at(s_bn, e) for e in (0, 150, 299)] == [0.0, 0.2, 0.4 * 299 / 300]


def test_overrides_order_and_types(tmp_path):
    cfg_file = tmp_path / 'c.yaml'
    cfg_file.write_text('recipe: cpolynext_t\nlr: 0.002\nepochs: 10\ncrop_scale: [0.5, 1.0]\n')
    name, c = resolve_config(None, str(cfg_file), flags=dict(epochs=20), set_items=['ema=false', 'lr=1e-3'],
                             usual=['ema_from_start'])
    assert name == 'cpolynext_t'
    assert (c.lr, c.epochs, c.ema, c.crop_scale, c.ema_start_epoch) == (1e-3, 20, False, (0.5, 1.0), 0)
    assert resolve_config(flags=dict(model='cpolynext_b'))[0] == 'cpolynext_b'
    name, c = resolve_config(flags=dict(data='/x'))
    assert name == 'cpolynext_lr_digits' and c.dataset == 'folder'
    assert PRESETS.usual_practice(['all']) == {f.field: f.usual for f in FIDELITY.values()}


@pytest.mark.parametrize('kwargs, message', [
    (dict(set_items=['lr=abc']), "bad value for 'lr': 'abc' is not a number"),
    (dict(set_items=['lrr=1']), "unknown config key 'lrr' in --set. Did you mean 'lr'?"),
    (dict(set_items=['epochs=2.5']), "bad value for 'epochs': '2.5' is not an integer"),
    (dict(set_items=['crop_scale=0.5']), "bad value for 'crop_scale': [0.5] needs 2 entries"),
    (dict(set_items=['ema=maybe']), "bad value for 'ema': 'maybe' is not true/false"),
    (dict(set_items=['optimizer=sgd']), "bad value for 'optimizer': 'sgd'; choose one of adamw, lamb"),
    (dict(set_items=['lr']), "bad --set argument 'lr': write it as key=value"),
    (dict(recipe='cpolynext_x'), "unknown recipe 'cpolynext_x'. Did you mean"),
    (dict(usual=['wd']), "unknown fidelity flag 'wd'. Did you mean 'wd_exclusions'?"),
    (dict(recipe='cpolynext_t', flags=dict(device_batch_size=100)),
     'the effective batch 1024 is not a multiple of the per-device batch 100'),
])
def test_bad_overrides_give_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError) as e:
        resolve_config(**kwargs)
    assert message in str(e.value) and '\n' not in str(e.value)


def test_accumulation_needs_whole_steps():
    c = get_preset('cpolynext_t').config
    assert [accumulation_steps(c, w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ConfigError, match='cannot be split into 3 device'):
        accumulation_steps(c, 3)


def test_in21k_to_in1k_map_and_head_mapping(tmp_path):
    m = in21k_to_in1k_class_map()
    # the authors' misc/in21k_to_1k_class_map.json: 999 pairs, no entry for class 850 (teddy bear), the 21K
    # indices sum to 6,367,649, start (0, 359), (1, 368), (2, 460) and end with 21815
    assert len(m['in1k_idx']) == len(m['in21k_idx']) == 999
    assert 850 not in m['in1k_idx'] and m['in1k_idx'] == sorted(set(m['in1k_idx']))
    assert sum(m['in21k_idx']) == 6367649 and m['in21k_idx'][:3] == [359, 368, 460] and m['in21k_idx'][-1] == 21815
    # head mapping on a generated map: 6 source classes → 4 target classes, target 2 uncovered (mean row)
    w = torch.arange(6 * 3, dtype=torch.float32).reshape(6, 3)
    b = torch.arange(6, dtype=torch.float32)
    cmap = tmp_path / 'map.json'
    cmap.write_text('{"in1k_idx": [0, 1, 3], "in21k_idx": [5, 0, 2]}')
    sd, mapped = map_head_rows({'head.fc.weight': w, 'head.fc.bias': b, 'stem.weight': torch.ones(3, 3)},
                               str(cmap), num_source=6, num_target=4)
    assert mapped == ['head.fc.weight', 'head.fc.bias']
    assert sd['head.fc.bias'].tolist() == [5.0, 0.0, 2.5, 2.0]
    assert sd['head.fc.weight'][2].tolist() == w.mean(0).tolist() and sd['head.fc.weight'][0].tolist() == w[5].tolist()
    assert load_class_map('in21k_to_in1k') == m
    with pytest.raises(ConfigError, match="must be a JSON object with lists 'in1k_idx' and 'in21k_idx'"):
        bad = tmp_path / 'bad.json'
        bad.write_text('[1, 2]')
        load_class_map(str(bad))


def test_head_dropout_sits_where_the_authors_put_it():
    """The MetaFormer recipes' head dropout is the authors' --head-dropout, inside the MLP head between its norm and
    fc2 (caformer_s36: head.fc.head_drop.p = 0.4), not timm's drop_rate before the whole head (head.drop.p = 0);
    PolyNeXt's sits right before its classifier (the authors' BufferedDropout, head.drop.p)."""
    import dataclasses
    from polynext.factory import head_dropout_kwargs
    from polynext.models import METAFORMER_MODELS
    from polynext.train.trainer import build_model
    with torch.device('meta'):
        m = build_model(get_preset('caformer_s36').config, 1000)
    assert m.head.drop.p == 0.0 and m.head.fc.head_drop.p == 0.4
    with_dropout = [(n, p.config) for n, p in PRESETS.items() if p.config.head_dropout]
    for name, c in with_dropout:      # every such recipe builds its model the same way
        expected = 'head_dropout' if c.model in METAFORMER_MODELS else 'drop_rate'
        assert head_dropout_kwargs(c.model, c.head_dropout) == {expected: c.head_dropout}, name
    assert sum(c.model in METAFORMER_MODELS for _, c in with_dropout) == 35      # Tables 14 and 15
    m = build_model(dataclasses.replace(get_preset('cpolynext_s').config, model_kwargs=dict(init_channels=8)), 10)
    assert float(m.head.drop.p) == pytest.approx(0.4)
