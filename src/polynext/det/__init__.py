"""Object detection and instance segmentation: Mask R-CNN and Cascade Mask R-CNN on COCO with any
polynext / timm backbone (``polynext det``).

    from polynext.det import DetectorSpec, build_detector, load_detector, count_detector
    model = build_detector(DetectorSpec('mask_rcnn', 'convformer_s18'), checkpoint='convformer_s18.pth')
    model = load_detector('runs/maskrcnn_convformer_s18_3x/best.safetensors')     # a trained one
    count_detector(DetectorSpec('cascade_mask_rcnn', 'caformer_s18', attn_window=(14, 7)))['macs']
    name, cfg = DET_PRESETS.resolve('maskrcnn_convformer_s18_3x', flags=dict(data='/data/coco'))
    train_detection(cfg, name)                                                   # = polynext det train
"""
from .cascade import CascadeRoIHeads
from .cost import PAPER_TABLE9, count_detector, detector_cost
from .data import CocoSource, DetSamples
from .detector import DetectorSpec, build_detector, load_detector
from .evaluate import coco_evaluate, coco_results, postprocess
from .evaluation import evaluate_checkpoint, score_results
from .recipes import DET_PRESETS, DetConfig
from .synthetic import ShapesInstances, write_coco_folder
from .trainer import train_detection

__all__ = ['CascadeRoIHeads', 'PAPER_TABLE9', 'count_detector', 'detector_cost', 'CocoSource', 'DetSamples',
           'DetectorSpec', 'build_detector', 'load_detector', 'coco_evaluate', 'coco_results', 'postprocess',
           'ShapesInstances', 'write_coco_folder', 'evaluate_checkpoint', 'score_results', 'DET_PRESETS', 'DetConfig',
           'train_detection']
