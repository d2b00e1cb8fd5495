"""Semantic segmentation: UperNet on ADE20K with any polynext / timm backbone (``polynext seg``).

    from polynext.seg import SEG_PRESETS, SegmentorSpec, build_segmentor, load_segmentor, slide_inference
    model = build_segmentor(SegmentorSpec('cpolynext_s', num_classes=150), checkpoint='cpolynext_s.pt')
    model = load_segmentor('runs/upernet_cpolynext_s/best.safetensors')      # a trained one
    logits = slide_inference(model.eval(), image, num_classes=150)            # 512 windows, stride 341

    name, cfg = SEG_PRESETS.resolve('upernet_cpolynext_s', set_items=['iters=1000'], flags=dict(data=DIR))
    train_segmentation(cfg, name)                                             # = polynext seg train
    evaluate_checkpoint('runs/upernet_cpolynext_s', data=DIR).metrics.miou    # = polynext seg eval
    segmentor_costs(recipes=['upernet_cpolynext_s'])                          # = polynext seg cost
"""
from .cost import PAPER_COST, format_costs, segmentor_costs
from .evaluation import SegEvaluation, checkpoint_config, evaluate_checkpoint
from .heads import FCNHead, UPerHead
from .inference import evaluate, slide_inference, whole_inference
from .metrics import ConfusionMatrix, SegMetrics, metrics_from_confusion
from .recipes import DEFAULT_SEG_RECIPE, SEG_PRESETS, SegConfig
from .segmentor import SegmentationBackbone, SegmentorSpec, UperNet, build_segmentor, load_segmentor
from .trainer import SegTrainer, train_segmentation

__all__ = ['FCNHead', 'UPerHead', 'evaluate', 'slide_inference', 'whole_inference', 'ConfusionMatrix', 'SegMetrics',
           'metrics_from_confusion', 'DEFAULT_SEG_RECIPE', 'SEG_PRESETS', 'SegConfig', 'SegmentationBackbone',
           'SegmentorSpec', 'UperNet', 'build_segmentor', 'load_segmentor', 'SegTrainer', 'train_segmentation',
           'SegEvaluation', 'checkpoint_config', 'evaluate_checkpoint', 'PAPER_COST', 'format_costs',
           'segmentor_costs']
