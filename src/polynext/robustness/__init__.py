"""Out-of-distribution robustness: ImageNet-C (mCE), ImageNet-A, ImageNet-R, ImageNet-Sketch.

``polynext robustness`` on the command line; in Python::

    from polynext.robustness import ModelEntry, RobustnessData, run_robustness, write_report, format_report
    entry = ModelEntry.from_model('cpolynext_s', polynext.create_model('cpolynext_s', checkpoint='cpolynext_s.pt'))
    report = run_robustness([entry], RobustnessData(imagenet_a='imagenet-a'), output='robustness')
    write_report(report, 'robustness'); print(format_report(report))

The protocols and the mCE arithmetic are in ``protocols``, the class maps in ``class_maps``.
"""
from .class_maps import SubsetMap, imagenet_1k_index, imagenet_1k_wnids, subset_map
from .protocols import (
    CORRUPTIONS, DATASETS, PROTOCOLS, SEVERITIES, AlexNetReference, CorruptionScore, ImageNetCScore, Protocol,
    alexnet_reference, score_imagenet_c,
)
from .report import format_report, write_report
from .runner import ModelEntry, ProtocolHead, RobustnessData, RobustnessReport, run_robustness, weights_fingerprint

__all__ = [
    'SubsetMap', 'imagenet_1k_index', 'imagenet_1k_wnids', 'subset_map', 'CORRUPTIONS', 'DATASETS', 'PROTOCOLS',
    'SEVERITIES', 'AlexNetReference', 'CorruptionScore', 'ImageNetCScore', 'Protocol', 'alexnet_reference',
    'score_imagenet_c', 'format_report', 'write_report', 'ModelEntry', 'ProtocolHead', 'RobustnessData',
    'RobustnessReport', 'run_robustness', 'weights_fingerprint',
]
