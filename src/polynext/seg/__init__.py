"""Semantic segmentation: UperNet on ADE20K with any polynext / timm backbone (``polynext seg``).

    from polynext.seg import SegmentorSpec, build_segmentor, load_segmentor, slide_inference
    model = build_segmentor(SegmentorSpec('cpolynext_s', num_classes=150), checkpoint='cpolynext_s.pt')
    model = load_segmentor('runs/upernet_cpolynext_s/best.safetensors')      # a trained one
    logits = slide_inference(model.eval(), image, num_classes=150)            # 512 windows, stride 341
"""
from .heads import FCNHead, UPerHead
from .inference import evaluate, slide_inference, whole_inference
from .metrics import ConfusionMatrix, SegMetrics, metrics_from_confusion
from .recipes import SEG_PRESETS, SegConfig, get_seg_preset, resolve_seg_config
from .segmentor import SegmentationBackbone, SegmentorSpec, UperNet, build_segmentor, load_segmentor

__all__ = ['FCNHead', 'UPerHead', 'evaluate', 'slide_inference', 'whole_inference', 'ConfusionMatrix', 'SegMetrics',
           'metrics_from_confusion', 'SEG_PRESETS', 'SegConfig', 'get_seg_preset', 'resolve_seg_config',
           'SegmentationBackbone', 'SegmentorSpec', 'UperNet', 'build_segmentor', 'load_segmentor']
