"""The evaluation protocols of the robustness benchmarks and the ImageNet-C arithmetic.

Protocols (polynext_reference.md §10; fp32, eval mode, a 1000-way ImageNet-1k classifier):

==============  =============================================  ===========================================
dataset         transform                                       scored over
==============  =============================================  ===========================================
clean (--val)   Resize 232 bicubic → CenterCrop 224             1000 classes
ImageNet-C      Resize 224 bicubic, no crop (images are 224²)   1000 classes, per corruption × severity
ImageNet-A      Resize 232 bicubic → CenterCrop 224             the 200 IN-A classes (logits restricted)
ImageNet-R      Resize 232 bilinear → CenterCrop 224            the 200 IN-R classes (logits restricted)
Sketch          Resize 232 bicubic → CenterCrop 224             1000 classes
==============  =============================================  ===========================================

Every transform ends with ToTensor → Normalize(model mean / std). Restricting the logits to a
subset keeps the columns of the subset's ImageNet-1k indices in ascending order; for ImageNet-R
this is the same as the reference's boolean mask over the 1000 sorted wnids.

ImageNet-C scores (Hendrycks & Dietterich 2019), with ``E`` top-1 errors in %:

* per corruption ``c``: ``mean_top1_c`` over its severities and ``CE_c = 100 · (100 − mean_top1_c)
  / E^AlexNet_c`` with the AlexNet averages of the spec (88.6, 89.4, ..., 60.7);
  ``mCE = mean_c CE_c``.
* relative (optional, needs the clean error): ``relCE_c = 100 · Σ_s (E_c,s − E_clean) /
  Σ_s (E^AlexNet_c,s − E^AlexNet_clean)`` with AlexNet's per-severity errors and its clean error
  43.478; ``relative mCE = mean_c relCE_c``.

A corruption with missing severities is averaged over the severities it has (and marked); the
mean over corruptions covers the corruptions present, and the score says which are missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Mapping, Optional, Tuple

from .class_maps import read_package_json

__all__ = ['CORRUPTIONS', 'CORRUPTION_CATEGORIES', 'SEVERITIES', 'DATASETS', 'Protocol', 'PROTOCOLS',
           'AlexNetReference', 'alexnet_reference', 'CorruptionScore', 'ImageNetCScore', 'score_imagenet_c']

#: the 15 corruptions of the mCE, in the order of the ImageNet-C paper
CORRUPTIONS: Tuple[str, ...] = (
    'gaussian_noise', 'shot_noise', 'impulse_noise',
    'defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur',
    'snow', 'frost', 'fog', 'brightness',
    'contrast', 'elastic_transform', 'pixelate', 'jpeg_compression',
)
#: the released tarballs group the corruptions by category (``DIR/<category>/<corruption>`` is accepted)
CORRUPTION_CATEGORIES: Dict[str, Tuple[str, ...]] = {
    'noise': CORRUPTIONS[0:3], 'blur': CORRUPTIONS[3:7], 'weather': CORRUPTIONS[7:11], 'digital': CORRUPTIONS[11:15],
}
SEVERITIES: Tuple[int, ...] = (1, 2, 3, 4, 5)
#: evaluation order and the command-line names of the datasets
DATASETS: Tuple[str, ...] = ('clean', 'imagenet_c', 'imagenet_a', 'imagenet_r', 'sketch')


@dataclass(frozen=True)
class Protocol:
    """How one dataset is read and scored."""
    key: str
    title: str
    resize: int
    crop: Optional[int]            # None: no crop
    interpolation: str
    subset: Optional[str] = None   # 'imagenet_a' / 'imagenet_r': logits restricted to that subset

    def describe(self) -> str:
        crop = f'CenterCrop {self.crop}' if self.crop else 'no crop'
        scored = f'logits restricted to the 200 {self.title} classes' if self.subset else '1000 classes'
        return f'Resize {self.resize} {self.interpolation} → {crop}; {scored}'

    def signature(self) -> str:
        """What the result of a cell depends on besides the model and the images."""
        return f'{self.resize}/{self.crop}/{self.interpolation}/{self.subset}'


PROTOCOLS: Dict[str, Protocol] = {
    'clean': Protocol('clean', 'ImageNet-1k val', 232, 224, 'bicubic'),
    'imagenet_c': Protocol('imagenet_c', 'ImageNet-C', 224, None, 'bicubic'),
    'imagenet_a': Protocol('imagenet_a', 'ImageNet-A', 232, 224, 'bicubic', subset='imagenet_a'),
    'imagenet_r': Protocol('imagenet_r', 'ImageNet-R', 232, 224, 'bilinear', subset='imagenet_r'),
    'sketch': Protocol('sketch', 'ImageNet-Sketch', 232, 224, 'bicubic'),
}


@dataclass(frozen=True)
class AlexNetReference:
    """AlexNet's ImageNet-C errors (%): the mCE normalisers and the relative-mCE errors."""
    mce_errors: Mapping[str, float]                    # per corruption, averaged over severities (spec, 0.1)
    severity_errors: Mapping[str, Tuple[float, ...]]   # per corruption, severities 1..5
    clean_error: float


@lru_cache(maxsize=None)
def alexnet_reference() -> AlexNetReference:
    """From ``polynext/data/imagenet_c_alexnet.json``."""
    data = read_package_json('imagenet_c_alexnet.json')
    return AlexNetReference(
        mce_errors={c: float(data['mce_errors']['errors'][c]) for c in CORRUPTIONS},
        severity_errors={c: tuple(float(v) for v in data['severity_errors']['errors'][c]) for c in CORRUPTIONS},
        clean_error=float(data['clean_error']['error']))


@dataclass
class CorruptionScore:
    corruption: str
    top1: Dict[int, float]               # severity → top-1 (%), the severities evaluated
    missing_severities: List[int]
    mean_top1: float
    error: float                          # 100 − mean_top1
    alexnet_error: float
    ce: float                             # 100 · error / alexnet_error
    relative_ce: Optional[float] = None

    def as_dict(self) -> dict:
        return dict(top1={str(s): v for s, v in self.top1.items()}, missing_severities=self.missing_severities,
                    mean_top1=self.mean_top1, error=self.error, alexnet_error=self.alexnet_error, ce=self.ce,
                    relative_ce=self.relative_ce)


@dataclass
class ImageNetCScore:
    corruptions: Dict[str, CorruptionScore]
    mce: Optional[float]
    relative_mce: Optional[float]
    missing: List[str] = field(default_factory=list)   # 'fog' (whole corruption) or 'frost/3'

    @property
    def complete(self) -> bool:
        return not self.missing

    def as_dict(self) -> dict:
        return dict(mce=self.mce, relative_mce=self.relative_mce, complete=self.complete,
                    corruptions_evaluated=len(self.corruptions), missing=list(self.missing),
                    corruptions={c: s.as_dict() for c, s in self.corruptions.items()})


def score_imagenet_c(top1: Mapping[str, Mapping[int, float]], clean_top1: Optional[float] = None,
                     reference: Optional[AlexNetReference] = None) -> ImageNetCScore:
    """mCE (and relative mCE when ``clean_top1`` is given) from top-1 (%) per corruption and severity.

    ``top1[c][s]`` for the cells that were evaluated; anything absent is listed in ``missing``.
    """
    ref = reference or alexnet_reference()
    unknown = sorted(set(top1) - set(CORRUPTIONS))
    if unknown:
        raise ValueError(f'not ImageNet-C corruptions: {unknown}')
    scores: Dict[str, CorruptionScore] = {}
    missing: List[str] = []
    for c in CORRUPTIONS:
        cells = {int(s): float(v) for s, v in sorted((top1.get(c) or {}).items())}
        if not cells:
            missing.append(c)
            continue
        absent = [s for s in SEVERITIES if s not in cells]
        missing += [f'{c}/{s}' for s in absent]
        mean_top1 = sum(cells.values()) / len(cells)
        error = 100.0 - mean_top1
        score = CorruptionScore(corruption=c, top1=cells, missing_severities=absent, mean_top1=mean_top1,
                                error=error, alexnet_error=ref.mce_errors[c], ce=100.0 * error / ref.mce_errors[c])
        if clean_top1 is not None:
            clean_error = 100.0 - clean_top1
            num = sum((100.0 - v) - clean_error for v in cells.values())
            den = sum(ref.severity_errors[c][s - 1] - ref.clean_error for s in cells)
            score.relative_ce = 100.0 * num / den
        scores[c] = score
    mce = sum(s.ce for s in scores.values()) / len(scores) if scores else None
    rel = None
    if clean_top1 is not None and scores:
        rel = sum(s.relative_ce for s in scores.values()) / len(scores)
    return ImageNetCScore(corruptions=scores, mce=mce, relative_mce=rel, missing=missing)
