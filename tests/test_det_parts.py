"""Detection parts: sliding-window attention, COCO reading, the evaluator on known predictions, the cascade's
stage targets, the 3x transforms and the cost counting of Table 9."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip('pycocotools')

from polynext.det.cascade import CascadeRoIHeads  # noqa: E402
from polynext.det.cost import PAPER_TABLE9, count_detector  # noqa: E402
from polynext.det.data import CocoSource, decode_segmentation  # noqa: E402
from polynext.det.detector import DetectorSpec  # noqa: E402
from polynext.det.evaluate import coco_evaluate, coco_results, write_results  # noqa: E402
from polynext.det.heads import AlignedRoIAlign, BoxPredictor, TwoFCHead, roi_levels  # noqa: E402
from polynext.det.synthetic import FOLDER_CATEGORY_IDS, ShapesInstances, write_coco_folder  # noqa: E402
from polynext.det.transforms import TrainTransform, crop, hflip, rescale_size  # noqa: E402
from polynext.ops.window_attention import (  # noqa: E402
    neighborhood_attention, neighborhood_attention_reference, neighborhood_macs, neighborhood_mask,
)


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    return write_coco_folder(tmp_path_factory.mktemp('coco'), num_train=8, num_val=8, size=64)


# ---------------------------------------------------------------------------------------------
# sliding-window attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('size,window,tile', [((5, 7), 3, None), ((9, 13), 4, None), ((10, 11), 5, 3), ((6, 6), 7, None),
                                              ((1, 9), 3, None)])
@pytest.mark.parametrize('kernel', ['softmax', 'poly'])
def test_neighborhood_attention_equals_the_masked_expression(size, window, tile, kernel):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, size[0] * size[1], 8, generator=g, dtype=torch.float64) for _ in range(3))
    if kernel == 'poly':
        q, k = q * 0.2, k * 0.2
    out = neighborhood_attention(q, k, v, size, window, kernel, tile=tile)
    ref = neighborhood_attention_reference(q, k, v, size, window, kernel)
    assert torch.allclose(out, ref, atol=1e-12)


@pytest.mark.parametrize('kernel', ['softmax', 'poly'])
def test_neighborhood_attention_gradients_equal_the_masked_expression(kernel):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = torch.autograd.grad(neighborhood_attention(q * 0.3, k * 0.3, v, (5, 6), 3, kernel).square().sum(), (q, k, v))
    ref = torch.autograd.grad(neighborhood_attention_reference(q * 0.3, k * 0.3, v, (5, 6), 3, kernel).square().sum(),
                              (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(out, ref))


def test_neighborhood_windows_are_shifted_inwards_at_the_borders():
    mask = neighborhood_mask((5, 7), 3)
    assert mask.sum(1).unique().tolist() == [9]          # every query sees exactly k² keys
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2, 7, 8, 9, 14, 15, 16]   # corner: rows / cols 0-2
    assert neighborhood_macs(10, (50, 84), 14, 32) == 2 * 10 * 4200 * 196 * 32


def test_attention_window_switches_caformer_and_apolynext():
    import polynext
    from timm.layers import LayerNorm2d
    from timm.models.metaformer import Attention, LayerNormNoBias, MetaFormer, SepConv
    from polynext.models.attention_window import WindowedMetaFormerStage, set_attention_window
    torch.manual_seed(0)
    x = torch.randn(1, 3, 96, 128)
    small_caformer = MetaFormer(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), token_mixers=[SepConv, SepConv, Attention,
                                                                                       Attention],
                                norm_layers=[LayerNorm2d] * 2 + [LayerNormNoBias] * 2, num_classes=0)
    small_apolynext = polynext.create_model('apolynext_t', init_channels=8, num_classes=0)
    for m, windows in ((small_caformer, [100, 100]), (small_apolynext, 100)):
        m.eval()
        keys = list(m.state_dict())
        with torch.no_grad():
            ref = m.forward_features(x)
            assert set_attention_window(m, windows) == (3 if m is small_caformer else 18 + 6)   # windowed layers
            same = m.forward_features(x)                   # windows larger than the grid: global attention
            set_attention_window(m, 3)
            local = m.forward_features(x)
        assert torch.allclose(ref, same, atol=2e-5)
        assert not torch.allclose(ref, local, atol=1e-3)
        assert list(m.state_dict()) == keys                # same parameters: checkpoints load as before
    assert isinstance(small_caformer.stages[2], WindowedMetaFormerStage)


# ---------------------------------------------------------------------------------------------
# COCO reading
# ---------------------------------------------------------------------------------------------

def test_coco_layout_polygons_rle_crowd_and_category_ids(coco):
    data = json.loads((coco / 'annotations' / 'instances_val2017.json').read_text())
    kinds = {('polygon' if isinstance(a['segmentation'], list) else
              'rle' if isinstance(a['segmentation']['counts'], str) else 'uncompressed') for a in data['annotations']}
    assert kinds == {'polygon', 'rle', 'uncompressed'}
    src = CocoSource(coco, 'val')
    assert src.cat_ids == list(FOLDER_CATEGORY_IDS) and src.classes == ('circle', 'rectangle', 'triangle')
    assert len(src) == 8
    shapes = ShapesInstances('val', 8, 64)
    for i in range(len(src)):
        img, t = src.read(i)
        img2, t2 = shapes.read(i)
        assert torch.equal(img, img2)                                    # PNG: lossless
        assert torch.equal(t['labels'], t2['labels'])                    # ids 1, 3, 7 → labels 1, 2, 3
        assert torch.equal(t['boxes'], t2['boxes'])                      # crowd regions are not targets
        anns = [a for a in src.anns[t['image_id']] if not a['iscrowd']]
        for k, a in enumerate(anns):
            if isinstance(a['segmentation'], list):      # a rectangle's outline: its area, rasterised by COCO's rule
                assert abs(int(t['masks'][k].sum()) - int(t2['masks'][k].sum())) <= t2['masks'][k].sum() ** 0.5 * 4
            else:                                        # RLE: exactly the generated mask
                assert torch.equal(t['masks'][k], t2['masks'][k])
    crowd = [a for a in data['annotations'] if a['iscrowd']]
    assert crowd and decode_segmentation(crowd[0]['segmentation'], 64, 64).sum() == crowd[0]['area']


def test_training_split_skips_images_without_annotations(coco, tmp_path):
    data = json.loads((coco / 'annotations' / 'instances_train2017.json').read_text())
    data['annotations'] = [a for a in data['annotations'] if a['image_id'] != 1]
    (tmp_path / 'annotations').mkdir()
    (tmp_path / 'annotations' / 'instances_train2017.json').write_text(json.dumps(data))
    (tmp_path / 'train2017').symlink_to(coco / 'train2017')
    src = CocoSource(tmp_path, 'train', train=True)
    assert len(src) == 7 and src.skipped == 1 and 1 not in src.ids


# ---------------------------------------------------------------------------------------------
# evaluation: known predictions
# ---------------------------------------------------------------------------------------------

def _predictions(src, shift_iou=None):
    bbox, segm = [], []
    for i in range(len(src)):
        _, t = src.read(i)
        boxes = t['boxes'].clone()
        if shift_iou is not None:                 # shift right so that IoU(box, truth) = shift_iou
            d = (boxes[:, 2] - boxes[:, 0]) * (1 - shift_iou) / (1 + shift_iou)
            boxes[:, 0] += d
            boxes[:, 2] += d
        det = dict(boxes=boxes, scores=torch.linspace(1, 0.5, len(boxes)), labels=t['labels'], masks=t['masks'].bool())
        b, s = coco_results(t['image_id'], det, src.cat_ids)
        bbox += b
        segm += s
    return bbox, segm


def test_ap_of_perfect_and_shifted_predictions_equals_the_evaluator(coco, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    src = CocoSource(coco, 'val')
    bbox, segm = _predictions(src)
    perfect = coco_evaluate(src.dataset, dict(bbox=bbox, segm=segm))
    assert perfect['bbox']['AP'] == pytest.approx(100.0) and perfect['segm']['AP'] == pytest.approx(100.0)
    shifted = coco_evaluate(src.dataset, dict(bbox=_predictions(src, 0.62)[0]))['bbox']
    # IoU 0.62 passes the thresholds 0.50, 0.55, 0.60 of the ten: AP = 30, AP50 = 100, AP75 = 0
    assert (shifted['AP'], shifted['AP50'], shifted['AP75']) == pytest.approx((30.0, 100.0, 0.0))
    # the official evaluator on the results file gives the same numbers
    path = write_results(tmp_path / 'results_bbox.json', _predictions(src, 0.62)[0])
    gt = COCO(str(coco / 'annotations' / 'instances_val2017.json'))
    ev = COCOeval(gt, gt.loadRes(str(path)), 'bbox')
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert [100 * max(v, 0) for v in ev.stats[:3]] == pytest.approx([shifted['AP'], shifted['AP50'], shifted['AP75']])


# ---------------------------------------------------------------------------------------------
# the cascade's stage targets, RoI levels
# ---------------------------------------------------------------------------------------------

def test_cascade_stage_targets_follow_the_iou_thresholds():
    heads = CascadeRoIHeads(AlignedRoIAlign(7), [TwoFCHead(4, 7, 8) for _ in range(3)],
                            [BoxPredictor(8, 2) for _ in range(3)], batch_size_per_image=512)
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    # proposals overlapping the ground truth at IoU 0.45, 0.55, 0.65, 0.75 (width shrunk from the right)
    props = torch.tensor([[0.0, 0.0, 100.0 * iou, 100.0] for iou in (0.45, 0.55, 0.65, 0.75)])
    targets = [dict(boxes=gt, labels=torch.tensor([2]))]
    positives = []
    for stage in range(3):
        rois, labels, matched, gt_boxes, is_gt = heads._sample(stage, [props], targets)[0]
        by_iou = {round(float(r[2]) / 100, 2): int(l) for r, l, g in zip(rois, labels, is_gt) if not g}
        positives.append(sorted(iou for iou, lab in by_iou.items() if lab > 0))
        assert int(labels[is_gt].item()) == 2                      # the ground truth joins as a positive
        assert all(lab in (0, 2) for lab in labels.tolist())
    assert positives == [[0.55, 0.65, 0.75], [0.65, 0.75], [0.75]]   # IoU ≥ 0.5 / 0.6 / 0.7


def test_roi_levels_are_mmdetections():
    sides = torch.tensor([50.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    assert roi_levels(boxes).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------

def test_keep_ratio_rule_crop_and_flip():
    assert rescale_size(480, 640, 800, 1333) == (800, 1067)        # shorter side to 800
    assert rescale_size(400, 1200, 800, 1333) == (444, 1333)       # longer side capped at 1333
    target = dict(boxes=torch.tensor([[2.0, 2.0, 10.0, 10.0], [30.0, 30.0, 40.0, 40.0]]), labels=torch.tensor([1, 2]),
                  masks=torch.zeros(2, 48, 48, dtype=torch.uint8))
    img = torch.zeros(3, 48, 48, dtype=torch.uint8)
    _, t = crop(img, target, 0, 0, 20, 20)
    assert t['boxes'].tolist() == [[2.0, 2.0, 10.0, 10.0]] and t['labels'].tolist() == [1]
    assert t['masks'].shape == (1, 20, 20)
    _, f = hflip(img, target)
    assert f['boxes'][0].tolist() == [38.0, 2.0, 46.0, 10.0]
    tf = TrainTransform(scales=(32,), max_size=1333, flip=0.0, crop_policy=False)
    out, t = tf(img, target)
    assert out.shape[-2:] == (32, 32) and t['boxes'][0].tolist() == pytest.approx([4 / 3, 4 / 3, 20 / 3, 20 / 3])


# ---------------------------------------------------------------------------------------------
# cost
# ---------------------------------------------------------------------------------------------

def test_cost_at_800x1333_and_table9_within_2_percent():
    """mmdetection's counting (box head on 1000 proposals, mask head on 100, matmuls included): ConvFormer-S18
    Mask R-CNN exactly, and Table 9's figures at get_flops' default 1280x800 within 2 %."""
    mask = count_detector(DetectorSpec('mask_rcnn', 'convformer_s18'), (800, 1333))
    assert mask['params'] == 43_843_517
    assert mask['parts']['box_heads'] == 1000 * (256 * 49 * 1024 + 1024 * 1024 + 1024 * 81 + 1024 * 324)
    assert mask['parts']['mask_heads'] == 100 * (4 * 196 * 9 * 256 * 256 + 784 * 256 * 256 + 784 * 256 * 81)
    assert mask['macs'] / 1e9 == pytest.approx(258.60, abs=0.01)
    at = count_detector(DetectorSpec('cascade_mask_rcnn', 'caformer_s18', attn_window=(14, 7), box_convs=4),
                        (1280, 800))
    assert at['macs'] / 1e9 == pytest.approx(PAPER_TABLE9['cascade_caformer_s18_3x'][0], rel=0.02)
    assert at['macs'] / 1e9 == pytest.approx(732.15, abs=0.01)


def test_layer_wise_decay_groups_and_step_schedule_follow_convnext_and_mmcv():
    from polynext.det.recipes import DET_PRESETS
    from polynext.det.trainer import layer_id, step_lr_factor
    names = ['backbone.body.body.stem.conv.weight', 'backbone.body.body.stages_0.blocks.2.mlp.fc1.weight',
             'backbone.body.body.stages_1.downsample.conv.weight', 'backbone.body.body.stages_2.downsample.conv.weight',
             'backbone.body.body.stages_2.blocks.2.norm1.weight', 'backbone.body.body.stages_2.blocks.3.norm1.weight',
             'backbone.body.body.stages_2.blocks.8.norm1.weight', 'backbone.body.body.stages_3.blocks.0.norm1.weight',
             'backbone.body.extra_norms.0.weight', 'roi_heads.box_head.fc6.weight']
    assert [layer_id(n) for n in names] == [0, 1, 2, 3, 3, 4, 5, 6, 7, 7]
    cfg = DET_PRESETS.get('maskrcnn_convformer_s18_3x').config
    per_epoch = 100
    assert step_lr_factor(0, per_epoch, cfg) == pytest.approx(0.001)              # warm-up from 0.001 × lr
    assert step_lr_factor(250, per_epoch, cfg) == pytest.approx(1 - 0.5 * 0.999)
    assert [step_lr_factor(e * per_epoch, per_epoch, cfg) for e in (26, 27, 32, 33, 35)] == pytest.approx(
        [1, 0.1, 0.1, 0.01, 0.01])                                                # steps after epochs 27 and 33


@pytest.mark.parametrize('kind', ['mask_rcnn', 'cascade_mask_rcnn'])
def test_box_geometry_stays_float32_under_bf16_autocast(kind):
    """Under bf16 autocast (the recipes' CUDA default; here the CPU's) the anchors, proposals, RoIs, regression
    outputs and final boxes stay float32: torchvision would make them bf16 (8 significant bits, up to 4 px off
    at 1024-2047), and the ground truth cast to the proposals' dtype with them."""
    from polynext.det.detector import build_detector
    torch.manual_seed(0)
    spec = DetectorSpec(kind, 'cpolynext_t', num_classes=3, backbone_kwargs=dict(init_channels=8), fpn_channels=16,
                        box_fc=32, conv_channels=16, mask_channels=8, rpn_batch=32, roi_batch=32)
    model = build_detector(spec)
    seen = {}

    def record(name, tensors):
        seen.setdefault(name, tensors[0].dtype)     # (a hook that returns a value replaces the output)
    model.rpn.anchor_generator.register_forward_hook(lambda m, i, o: record('anchors', o))
    model.roi_heads.register_forward_pre_hook(lambda m, args: record('proposals', args[1]))
    model.roi_heads.box_roi_pool.register_forward_pre_hook(lambda m, args: record('rois', args[1]))
    box = torch.tensor([[1211.1, 300.3, 1500.7, 640.9]])          # 1211.1 in bf16 is 1208
    images = [torch.rand(3, 704, 1600)]
    targets = [dict(boxes=box, labels=torch.tensor([1]), masks=torch.zeros(1, 704, 1600, dtype=torch.uint8))]
    targets[0]['masks'][0, 300:640, 1211:1500] = 1
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert seen == dict(anchors=torch.float32, proposals=torch.float32, rois=torch.float32)
    model.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(images)
    assert out[0]['boxes'].dtype == torch.float32
