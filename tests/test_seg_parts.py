"""Segmentation building blocks: head shapes and parameter counts (hand counts), metrics on a known
confusion matrix, sliding-window inference, the mmseg transforms (rescale rule, cat_max_ratio crop,
photometric distortion, padding, reduce_zero_label), the parameter-wise lr / decay rules against the
reference's rules on the authors' names, the poly schedule, and backbone checkpoint loading."""
import math

import pytest
import torch
from torchvision import tv_tensors

import polynext
from polynext.errors import CheckpointError, ConfigError
from polynext.seg.heads import FCNHead, UPerHead
from polynext.seg.inference import slide_inference, whole_inference, window_boxes
from polynext.seg.metrics import ConfusionMatrix, metrics_from_confusion
from polynext.seg.recipes import POLYNEXT_KEYS, REFERENCE_KEYS, SEG_PRESETS, SegConfig, effective_custom_keys
from polynext.seg.segmentor import SegmentorSpec, build_segmentor
from polynext.seg.trainer import build_param_groups, param_rule, poly_warmup_factor
from polynext.seg.transforms import (
    CatMaxRatioCrop, PadTo, PhotoMetricDistortion, RandomRescale, crop_is_acceptable, reduce_zero_label,
    rescale_size,
)

MINI = dict(init_channels=16)


def conv_bn(cin, cout, k):
    """conv (no bias) + BatchNorm (weight, bias)."""
    return cin * cout * k * k + 2 * cout


def uper_head_params(in_channels, c, k, scales=4):
    """Hand count of mmseg's UPerHead: PPM (1x1 per scale) + bottleneck 3x3 over [x, scales × c],
    1x1 laterals and 3x3 FPN convs for all but the last stage, 3x3 fusion of 4c, 1x1 classifier."""
    last = in_channels[-1]
    ppm = scales * conv_bn(last, c, 1) + conv_bn(last + scales * c, c, 3)
    laterals = sum(conv_bn(ci, c, 1) for ci in in_channels[:-1])
    fpn = (len(in_channels) - 1) * conv_bn(c, c, 3)
    fusion = conv_bn(len(in_channels) * c, c, 3)
    return ppm + laterals + fpn + fusion + c * k + k


def fcn_head_params(cin, c, k):
    return conv_bn(cin, c, 3) + c * k + k


def test_uper_head_shapes_and_hand_count():
    chans = [16, 32, 64, 96]
    head = UPerHead(chans, channels=24, num_classes=5).eval()
    feats = [torch.randn(2, c, 64 // s, 96 // s) for c, s in zip(chans, (4, 8, 16, 32))]
    out = head(feats)
    assert out.shape == (2, 5, 16, 24)
    assert sum(p.numel() for p in head.parameters()) == uper_head_params(chans, 24, 5)
    aux = FCNHead(64, channels=8, num_classes=5).eval()
    assert aux(feats[2]).shape == (2, 5, 4, 6)
    assert sum(p.numel() for p in aux.parameters()) == fcn_head_params(64, 8, 5)
    # the paper's heads over CPolyNeXt-S (72/144/288/432): 29,174,934 + 702,614 parameters
    assert uper_head_params([72, 144, 288, 432], 512, 150) == 29_174_934
    assert sum(p.numel() for p in UPerHead([72, 144, 288, 432], 512, 150).parameters()) == 29_174_934
    assert fcn_head_params(288, 256, 150) == 702_614


def test_head_layers_follow_mmseg():
    head = UPerHead([8, 16, 32, 48], channels=16, num_classes=3)
    assert isinstance(head.cls.dropout, torch.nn.Dropout2d) and head.cls.dropout.p == 0.1
    assert head.cls.conv_seg.bias is not None and float(head.cls.conv_seg.bias.detach().abs().sum()) == 0
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d) and m is not head.cls.conv_seg]
    assert all(m.bias is None for m in convs)                      # conv → BN: no conv bias (mmcv 'auto')
    assert [head.psp.blocks[i][0].output_size for i in range(4)] == [1, 2, 3, 6]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in head.modules()) == 4 + 1 + 3 + 3 + 1


def test_segmentor_outputs_and_extra_norms():
    model = build_segmentor(SegmentorSpec('cpolynext_t', num_classes=5, backbone_kwargs=MINI, channels=16,
                                          aux_channels=8))
    assert model.backbone.channels == [16, 32, 64, 96]
    norms = model.backbone.extra_norms
    assert len(norms) == 4 and all(n.bias is not None and float(n.weight.detach().sum()) == n.weight.numel()
                                   and float(n.bias.detach().abs().sum()) == 0 and n.eps == 1e-5 for n in norms)
    x = torch.randn(2, 3, 64, 96)
    model.train()
    out = model(x)
    assert out['out'].shape == (2, 5, 16, 24) and out['aux'].shape == (2, 5, 4, 6)
    model.eval()
    assert set(model(x)) == {'out'}
    assert model.encode_decode(x).shape == (2, 5, 64, 96)


def test_known_confusion_matrix():
    # rows: ground truth, columns: prediction; class 2 is never labelled but predicted once, class 3 absent
    m = torch.tensor([[5, 1, 0, 0], [2, 3, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    r = metrics_from_confusion(m, ['a', 'b', 'c', 'd'])
    # IoU: 5 / (6 + 7 - 5), 3 / (6 + 4 - 3), 0 / (0 + 1 - 0), NaN;  Acc: 5/6, 3/6, NaN, NaN
    assert r.iou[0] == pytest.approx(62.5) and r.iou[1] == pytest.approx(300 / 7) and r.iou[2] == 0.0
    assert math.isnan(r.iou[3]) and math.isnan(r.acc[2]) and math.isnan(r.acc[3])
    assert r.miou == pytest.approx((62.5 + 300 / 7 + 0.0) / 3)          # 35.119...
    assert r.macc == pytest.approx((500 / 6 + 50) / 2)                   # 66.667
    assert r.aacc == pytest.approx(100 * 8 / 12)
    # the same matrix from label / prediction maps with ignored pixels
    label = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 255, 255])
    pred = torch.tensor([0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 2, 3, 0])
    cm = ConfusionMatrix(4)
    cm.update(pred[:7], label[:7])
    cm.update(pred[7:], label[7:])
    assert torch.equal(cm.matrix, m)
    with pytest.raises(ValueError, match='label value 7'):
        cm.update(torch.tensor([0]), torch.tensor([7]))


def test_slide_equals_whole_on_a_window_sized_input_and_averages_overlaps():
    torch.manual_seed(0)
    model = build_segmentor(SegmentorSpec('cpolynext_t', num_classes=3, backbone_kwargs=MINI, channels=16,
                                          aux_channels=0)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        whole = whole_inference(model, x)
        slide = slide_inference(model, x, 3, crop=64, stride=43)
        assert torch.equal(slide, whole)
        # 64 x 96: two windows, x in [0, 64) and [32, 96) (the second moved back to the border)
        assert window_boxes(64, 96, 64, 43) == [(0, 64, 0, 64), (0, 64, 32, 96)]
        assert len(window_boxes(512, 683, 512, 341)) == 2 and len(window_boxes(512, 2048, 512, 341)) == 6
        y = torch.randn(1, 3, 64, 96)
        left, right = model.encode_decode(y[..., :64]), model.encode_decode(y[..., 32:])
        out = slide_inference(model, y, 3, crop=64, stride=43, window_batch=1)
        torch.testing.assert_close(out[..., :32], left[..., :32])
        torch.testing.assert_close(out[..., 32:64], (left[..., 32:] + right[..., :32]) / 2)
        torch.testing.assert_close(out[..., 64:], right[..., 32:])
        torch.testing.assert_close(slide_inference(model, y, 3, crop=64, stride=43, window_batch=4), out)
        assert slide_inference(model, y, 3, crop=64, stride=43, out_size=(32, 48)).shape == (1, 3, 32, 48)


def test_reduce_zero_label():
    label = torch.tensor([0, 1, 2, 150, 255], dtype=torch.uint8)
    assert reduce_zero_label(label).tolist() == [255, 0, 1, 149, 255]


def test_cat_max_ratio_rule_and_retries(monkeypatch):
    two = torch.tensor([0] * 80 + [1] * 20)
    assert not crop_is_acceptable(two, 0.75)                      # 80 % of one class
    assert crop_is_acceptable(torch.tensor([0] * 70 + [1] * 30), 0.75)
    assert not crop_is_acceptable(torch.tensor([3] * 100), 0.75)  # a single class is never acceptable
    assert crop_is_acceptable(torch.tensor([0] * 70 + [1] * 25 + [255] * 5), 0.75)   # 70 / 95 < 0.75
    assert not crop_is_acceptable(torch.tensor([0] * 76 + [1] * 24 + [255] * 50), 0.75)
    # a 4 x 40 label, class 1 from column 32 on: of the 4-wide crops only x = 30 (2 + 2 columns) is acceptable
    mask = torch.zeros(4, 40, dtype=torch.uint8)
    mask[:, 32:] = 1
    crop = CatMaxRatioCrop((4, 4), 0.75)
    draws = iter([(0, x, 4, 4) for x in (0, 31, 10, 30)] + [(0, 1, 4, 4)] * 20)
    monkeypatch.setattr(crop, '_draw', lambda h, w: next(draws))
    _, out = crop(tv_tensors.Image(torch.zeros(3, 4, 40)), tv_tensors.Mask(mask))
    assert out[0].tolist() == [0, 0, 1, 1]                        # the 4th draw is the first acceptable one
    # mmseg: 1 draw + 10 checked redraws; when all 10 checks fail the 11th draw is kept unchecked
    draws = iter([(0, x, 4, 4) for x in range(10)] + [(0, 36, 4, 4), (0, 30, 4, 4)])
    _, out = crop(tv_tensors.Image(torch.zeros(3, 4, 40)), tv_tensors.Mask(mask))
    assert out[0].tolist() == [1, 1, 1, 1] and next(draws) == (0, 30, 4, 4)
    # an image smaller than the crop is kept whole (padding comes later)
    img, m = CatMaxRatioCrop((8, 8), 1.0)(tv_tensors.Image(torch.zeros(3, 5, 6)), tv_tensors.Mask(torch.zeros(5, 6)))
    assert img.shape == (3, 5, 6) and m.shape == (5, 6)


def test_rescale_rule_and_joint_resize(monkeypatch):
    assert rescale_size(683, 512, (2048, 512)) == (683, 512)
    assert rescale_size(3000, 500, (2048, 512)) == (2048, 341)     # long side capped: 500 · 2048/3000 = 341.3
    assert rescale_size(400, 300, (1024, 256)) == (341, 256)
    t = RandomRescale((2048, 512), (0.5, 2.0))
    monkeypatch.setattr(torch, 'rand', lambda *a, **k: torch.tensor(0.25))   # ratio 0.5 + 0.25 · 1.5 = 0.875
    label = torch.randint(0, 3, (300, 400), dtype=torch.uint8)
    img, mask = t(tv_tensors.Image(torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)), tv_tensors.Mask(label))
    assert img.shape == (3, 448, 597) and mask.shape == (448, 597)         # scale (1792, 448): factor 448 / 300
    assert set(mask.unique().tolist()) <= {0, 1, 2}                        # nearest neighbour for labels


def test_photometric_distortion_semantics():
    t = PhotoMetricDistortion()
    img = tv_tensors.Image(torch.tensor([[[200]], [[100]], [[0]]], dtype=torch.uint8).expand(3, 2, 2).clone())
    none = dict(brightness=None, contrast_first=True, contrast=None, saturation=None, hue=None)
    assert torch.equal(t.transform(img, dict(none, brightness=70.5)).flatten()[::4], torch.tensor([255, 170, 70]))
    assert torch.equal(t.transform(img, dict(none, contrast=1.5)).flatten()[::4], torch.tensor([255, 150, 0]))
    red = tv_tensors.Image(torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1))
    assert t.transform(red, dict(none, hue=15)).flatten().tolist() == [255, 128, 0]     # +30°: orange
    assert t.transform(red, dict(none, hue=-18)).flatten().tolist() == [255, 0, 153]    # −36°
    assert t.transform(red, dict(none, saturation=0.5)).flatten().tolist() == [255, 128, 128]
    mask = tv_tensors.Mask(torch.ones(2, 2, dtype=torch.uint8))
    assert torch.equal(t(img, mask)[1], mask)                                           # labels untouched


def test_pad_to_crop_size():
    img, mask = PadTo((4, 5), 0.0, 255)(tv_tensors.Image(torch.ones(3, 2, 3)), tv_tensors.Mask(torch.ones(2, 3)))
    assert img.shape == (3, 4, 5) and float(img[:, 2:].abs().sum() + img[:, :, 3:].abs().sum()) == 0
    assert mask[:2, :3].eq(1).all() and mask[2:].eq(255).all() and mask[:, 3:].eq(255).all()


def _classify(model: torch.nn.Module, exempt_backbone_norms: bool):
    """Expected (lr_mult, decay_mult) of every parameter, from module types (independent of names)."""
    from polynext.models.polynext import ChannelScale, LayerNorm2d, PolyAttn, SigmoidScale
    expect = {}
    heads = [model.decode_head, model.auxiliary_head]
    for module in model.modules():
        for _, p in module.named_parameters(recurse=False):
            if any(p is q for h in heads for q in h.parameters()):
                expect[id(p)] = (10.0, 1.0)
            elif any(p is q for q in model.backbone.extra_norms.parameters()):
                expect[id(p)] = (1.0, 0.0)
            elif isinstance(module, (ChannelScale, SigmoidScale)) or (isinstance(module, PolyAttn) and p is module.scale):
                expect[id(p)] = (1.0, 0.0)
            elif isinstance(module, LayerNorm2d) and exempt_backbone_norms:
                expect[id(p)] = (1.0, 0.0)
            else:
                expect[id(p)] = (1.0, 1.0)
    return expect


@pytest.mark.parametrize('decay_norms', [True, False])
def test_param_rules_reproduce_the_reference(decay_norms):
    from polynext.models.polynext import reference_key_map
    model = build_segmentor(SegmentorSpec('apolynext_t', num_classes=5, backbone_kwargs=MINI, channels=16,
                                          aux_channels=8))
    cfg = SegConfig(decay_backbone_norms=decay_norms)
    keys = effective_custom_keys(cfg)
    expect = _classify(model, exempt_backbone_norms=not decay_norms)
    groups = build_param_groups(model, 1e-4, 0.05, keys)
    got = {id(p): (g['lr_mult'], g['decay_mult']) for g in groups for p in g['params']}
    assert got == expect
    for g in groups:
        assert g['lr'] == pytest.approx(1e-4 * g['lr_mult']) and g['weight_decay'] == pytest.approx(0.05 * g['decay_mult'])
    n_exempt = sum(p.numel() for p in model.parameters() if expect[id(p)][1] == 0)
    # the output norms (weight + bias, 16 + 32 + 64 + 96 channels: 416), the skip scales and gate
    # logits (1,416), the attention scales (30), and with exempt norms the backbone's LayerNorms (4,488)
    assert n_exempt == 416 + 1416 + 30 + (0 if decay_norms else 4488)
    if decay_norms:
        # the reference's custom_keys on the authors' names give the same rule for every backbone parameter
        net = model.backbone.body.model
        for ours, ref in reference_key_map(net).items():
            p = net.get_parameter(ours) if ours in dict(net.named_parameters()) else None
            if p is None:
                continue
            assert param_rule('backbone.' + ref, REFERENCE_KEYS)[:2] == got[id(p)], (ours, ref)
        assert param_rule('backbone.extra_norms.0.weight', REFERENCE_KEYS) == (1.0, 0.0, 'extra_norms')
    # mmcv's tie-break: equal lengths → alphabetical ('head' before 'norm')
    assert param_rule('decode_head.norm.weight', REFERENCE_KEYS) == (10.0, 1.0, 'head')


def test_presets_follow_the_spec():
    c = SEG_PRESETS['upernet_cpolynext_s'].config
    a = SEG_PRESETS['upernet_apolynext_s'].config
    assert (c.lr, c.opt_betas, c.weight_decay, c.iters, c.batch_size, c.warmup_iters, c.warmup_ratio) == (
        1e-4, (0.9, 0.999), 0.05, 160000, 16, 1500, 1e-6)
    assert (c.head_channels, c.aux_channels, c.aux_weight, c.aux_index, c.dropout, c.drop_path) == (512, 256, 0.4, 2, 0.1, 0.3)
    assert (c.img_scale, c.ratio_range, c.crop_size, c.cat_max_ratio, c.eval_mode, c.eval_crop, c.eval_stride) == (
        (2048, 512), (0.5, 2.0), 512, 0.75, 'slide', 512, 341)
    assert c.clip_grad is None and c.cell_grad_clip is None and c.custom_keys == POLYNEXT_KEYS
    assert a.backbone == 'apolynext_s' and a.clip_grad == 5.0 and a.cell_grad_clip == 5.0
    assert (c.eval_every, c.reduce_zero_label, c.amp) == (16000, True, 'bf16')


def test_poly_schedule_with_warmup():
    cfg = SegConfig()
    assert poly_warmup_factor(0, cfg, 1e-4) == pytest.approx(1e-6)
    assert poly_warmup_factor(750, cfg, 1e-4) == pytest.approx((1 - 750 / 160000) * (1 - 0.5 * (1 - 1e-6)))
    assert poly_warmup_factor(1500, cfg, 1e-4) == pytest.approx(1 - 1500 / 160000)
    assert poly_warmup_factor(80000, cfg, 1e-3) == pytest.approx(0.5)
    assert poly_warmup_factor(160000, cfg, 1e-4) == 0.0


def _classifier_checkpoint(name, tmp_path, layout='ours'):
    torch.manual_seed(1)
    clf = polynext.create_model(name, num_classes=7, **MINI)
    sd = clf.state_dict()
    if layout == 'authors':
        from polynext.models.polynext import reference_key_map
        sd = {ref: sd[ours] for ours, ref in reference_key_map(clf).items()}
    path = tmp_path / f'{name}_{layout}.pt'
    torch.save({'state_dict': sd}, path)
    return clf, path


@pytest.mark.parametrize('layout', ['ours', 'authors'])
def test_backbone_loads_a_classification_checkpoint(tmp_path, layout):
    clf, path = _classifier_checkpoint('cpolynext_t', tmp_path, layout)
    model = build_segmentor(SegmentorSpec('cpolynext_t', num_classes=5, backbone_kwargs=MINI, channels=16,
                                          aux_channels=8), checkpoint=path)
    body = model.backbone.body.model.state_dict()
    ref = clf.state_dict()
    assert set(body) == {k for k in ref if not k.startswith('head.')}
    assert all(torch.equal(body[k], ref[k]) for k in body)
    assert all(float(n.weight.detach().sum()) == n.weight.numel() for n in model.backbone.extra_norms)   # fresh


def test_bad_backbones_and_checkpoints(tmp_path):
    _, path = _classifier_checkpoint('apolynext_t', tmp_path)
    with pytest.raises(CheckpointError, match='does not match'):
        build_segmentor(SegmentorSpec('cpolynext_t', backbone_kwargs=MINI), checkpoint=path)
    with pytest.raises(ConfigError, match="unknown model 'cpolynxt_t'"):
        build_segmentor(SegmentorSpec('cpolynxt_t'))
    with pytest.raises(ConfigError, match='strides'):
        build_segmentor(SegmentorSpec('cpolynext_lr', backbone_kwargs=MINI))
    with pytest.raises(ConfigError, match='fully polynomial'):
        build_segmentor(SegmentorSpec('cpolynext_t_bn', backbone_kwargs=dict(MINI, img_size=64)))


def test_timm_backbone_with_checkpoint(tmp_path):
    """Any timm model with strides 4/8/16/32 (here timm's small ConvNeXt test model, FeatureListNet)."""
    clf = polynext.create_model('test_convnext', num_classes=11)
    path = tmp_path / 'convnext.pth'
    torch.save(clf.state_dict(), path)
    model = build_segmentor(SegmentorSpec('test_convnext', num_classes=4, channels=16, aux_channels=8,
                                          extra_norms=False), checkpoint=path)
    assert model.backbone.extra_norms is None
    w = dict(model.backbone.body.named_parameters())['stem_0.weight']
    assert torch.equal(w, clf.stem[0].weight)
    assert model.eval()(torch.randn(1, 3, 64, 64))['out'].shape == (1, 4, 16, 16)


def test_cell_grad_clip_reaches_the_polynext_backbone():
    model = build_segmentor(SegmentorSpec('apolynext_t', backbone_kwargs=MINI, channels=16, aux_channels=8))
    assert model.set_cell_grad_clip(5.0)
    cells = [c for s in model.backbone.body.model.stages for c in s.cells]
    assert len(cells) == 12 and all(c.grad_clip == 5.0 for c in cells)
    other = build_segmentor(SegmentorSpec('test_convnext', channels=16, aux_channels=8))
    assert not other.set_cell_grad_clip(5.0)


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
@pytest.mark.parametrize('align_corners', [False, True])
def test_upsampled_cross_entropy_equals_interpolate_then_cross_entropy(dtype, align_corners):
    """seg/loss.py against the plain expression: the loss and its gradient, ignored pixels included (fp64:
    to 1e-12; bf16 logits: float32 inside, as the plain expression's ``.float()``)."""
    import torch.nn.functional as F
    from polynext.seg.loss import upsampled_cross_entropy
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 6, 7, 9, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, 6, (3, 29, 35), generator=g)
    t[0, :4], t[2, :, 30:] = 255, 255
    up = F.interpolate(z.double() if dtype == torch.float64 else z.float(), size=(29, 35), mode='bilinear',
                       align_corners=align_corners)
    ref = F.cross_entropy(up, t, ignore_index=255, reduction='sum')
    out = upsampled_cross_entropy(z, t, 255, align_corners)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.dtype == ref.dtype and abs(out.item() - ref.item()) <= tol * abs(ref.item())
    (grad,), (ref_grad,) = torch.autograd.grad(out, z), torch.autograd.grad(ref, z)
    assert grad.dtype == dtype
    assert (grad.double() - ref_grad.double()).abs().max() <= tol * ref_grad.double().abs().max()


def test_upsampled_cross_entropy_keeps_no_full_resolution_logits():
    """Nothing of the label's size is saved for backward (the plain expression saves its float32 log-softmax),
    and a label outside the classes is one clear error, as in cross_entropy."""
    import torch.nn.functional as F
    from polynext.seg.loss import upsampled_cross_entropy
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    t = torch.randint(0, 4, (2, 64, 64))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        upsampled_cross_entropy(z, t)
    assert max(saved) == t.numel()                     # the labels themselves: 8192 int64, the logits: 512
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        F.cross_entropy(F.interpolate(z, size=(64, 64), mode='bilinear'), t, reduction='sum')
    assert max(saved) == 4 * t.numel()                 # the plain form: the full-resolution log-softmax
    t[1, 5, 5] = 4
    with pytest.raises(ValueError, match=r'a label outside 0\.\.3 \(and not the ignore index 255\)'):
        upsampled_cross_entropy(z, t)


def test_seg_memory_benchmark_runs_both_losses(tmp_path):
    """benchmarks/seg_memory.py at toy size: both losses in their own processes, the same loss value, JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    from conftest import subprocess_env
    script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'seg_memory.py'
    out = tmp_path / 'm.json'
    done = subprocess.run([sys.executable, str(script), '--backbone', 'cpolynext_t', '--size', '32', '128',
                           '--backbone-kwargs', '{"init_channels": 8}', '--head-channels', '32', '--threads', '1',
                           '--json', str(out)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(out.read_text())
    assert [row['variant'] for row in r['rows']] == ['plain', 'polynext']
    assert all(row['step_bytes'] > 0 for row in r['rows'])
    assert abs(r['rows'][0]['loss'] - r['rows'][1]['loss']) < 1e-5 * r['rows'][0]['loss']
    assert r['head_channels'] == 32   # a toy head: the recipe's 512-wide one under emulated bf16 took 30 s a step
    bad = subprocess.run([sys.executable, str(script), '--head-channels', '1', '--json', str(tmp_path / 'bad.json')],
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and '--head-channels 1: the head needs at least 2 channels' in bad.stderr
    assert not (tmp_path / 'bad.json').exists()


@pytest.mark.parametrize('backbone', ['cpolynext_t', 'convformer_s18'])
def test_grad_checkpointing_of_the_backbone_gives_the_same_gradients(backbone):
    """``grad_checkpointing`` reaches the model inside timm's features_only wrapper (PolyNeXt: every cell;
    MetaFormer: every stage) and changes no value: loss and every gradient equal, drop path on."""
    kwargs = dict(init_channels=8) if backbone == 'cpolynext_t' else dict(dims=(16, 32, 48, 64), depths=(1, 1, 2, 1))
    spec = SegmentorSpec(backbone=backbone, num_classes=5, backbone_kwargs=kwargs, channels=16, aux_channels=8,
                         drop_path=0.2)
    torch.manual_seed(0)
    model = build_segmentor(spec).double().train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)

    def grads():
        torch.manual_seed(1)
        kept = []                               # what autograd keeps outside the checkpointed regions
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            out = model(x)
        loss = out['out'].square().mean() + out['aux'].square().mean()
        return sum(kept), [loss] + list(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))
    kept_plain, plain = grads()
    model.set_grad_checkpointing()
    kept_ckpt, ckpt = grads()
    assert kept_ckpt < 0.7 * kept_plain
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))
