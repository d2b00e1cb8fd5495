"""Joint image + label transforms of the MMSegmentation ADE20K pipeline (spec §11), on
torchvision's ``transforms.v2`` with ``tv_tensors.Image`` (uint8, CHW) and ``tv_tensors.Mask``.

Training (``build_train_transform``), in mmseg's order::

    RandomRescale(img_scale=(2048, 512), ratio_range=(0.5, 2.0))   keep ratio, bilinear / nearest
    CatMaxRatioCrop(512, cat_max_ratio=0.75)                       up to 10 tries
    v2.RandomHorizontalFlip(0.5)                                    image and mask together
    PhotoMetricDistortion()                                         image only
    v2.ToDtype(float32, scale=False) → v2.Normalize(mean, std)      image only, 0-255 statistics
    PadTo(512, image 0, mask 255)                                   bottom / right

Evaluation (``build_eval_transform``): ``Rescale(img_scale)`` keep ratio → normalise; the
label stays at its original size (predictions are resized back to it).

Taken from torchvision: the flip, dtype conversion, normalisation and every kernel (resize,
crop, pad) with its per-type dispatch (a ``Mask`` is always resized with nearest neighbour,
padded with its own fill). Written here, because ``transforms.v2`` has no equivalent:

* ``RandomRescale`` / ``Rescale``: mmcv's rule. The target is ``(int(2048 r), int(512 r))``
  with r ~ U(0.5, 2.0), and the image is scaled by ``min(long / long_edge, short / short_edge)``
  with sizes rounded as ``int(x * f + 0.5)``. ``v2.RandomResize`` instead draws the shorter
  side as an integer and has no long-side cap. Bilinear without antialiasing, like the cv2
  resize mmcv uses.
* ``CatMaxRatioCrop``: a random crop re-drawn (up to 10 times) while one class covers
  ``cat_max_ratio`` or more of the crop's labelled pixels or the crop holds fewer than two
  classes; ``v2.RandomCrop`` has no such rule.
* ``PhotoMetricDistortion``: mmseg's, not ``ColorJitter``'s, semantics: additive brightness
  (±32 grey levels), contrast as a plain multiplication (no blending with the mean), saturation
  as a scaling of the HSV S channel, hue as a shift of H by an integer in [-18, 18) OpenCV units
  (2° each), each applied with probability 1/2 and rounded to uint8 after each step; contrast
  goes first or last (probability 1/2 each).
* ``PadTo``: ``v2.Pad`` takes fixed amounts; mmseg pads each sample at the bottom / right up
  to the crop size.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2._utils import query_size

__all__ = ['rescale_size', 'RandomRescale', 'Rescale', 'CatMaxRatioCrop', 'PhotoMetricDistortion', 'PadTo',
           'build_train_transform', 'build_eval_transform', 'reduce_zero_label', 'ADE_MEAN', 'ADE_STD',
           'crop_is_acceptable']

#: ImageNet statistics on the 0-255 scale (mmseg ``img_norm_cfg``, RGB order)
ADE_MEAN = (123.675, 116.28, 103.53)
ADE_STD = (58.395, 57.12, 57.375)


def reduce_zero_label(label: torch.Tensor) -> torch.Tensor:
    """mmseg ``reduce_zero_label``: 0 ("other") → 255 (ignored), every other value − 1 (uint8)."""
    label = label.to(torch.uint8)
    out = label - 1                       # 0 wraps to 255
    out[label == 255] = 255               # 255 stays ignored (254 after the shift in mmseg, then 255)
    return out


def rescale_size(width: int, height: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """mmcv ``rescale_size``: the (width, height) that fits ``scale`` (long, short edge) keeping
    the aspect ratio: factor = min(long / max(w, h), short / min(w, h)), sizes int(x f + 0.5)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(width * factor + 0.5), int(height * factor + 0.5)


class Rescale(v2.Transform):
    """Keep-ratio resize to fit ``img_scale`` = (long, short) edges (mmseg ``Resize``, no ratio)."""

    def __init__(self, img_scale: Tuple[int, int] = (2048, 512)):
        super().__init__()
        self.img_scale = tuple(img_scale)

    def _target(self, flat_inputs: List[Any]) -> Tuple[int, int]:
        return self.img_scale

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = query_size(flat_inputs)
        new_w, new_h = rescale_size(w, h, self._target(flat_inputs))
        return dict(size=[new_h, new_w])

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, params['size'], interpolation=v2.InterpolationMode.BILINEAR,
                                 antialias=False)


class RandomRescale(Rescale):
    """mmseg ``Resize(img_scale, ratio_range)``: target ``(int(L r), int(S r))``, r ~ U(ratio_range)."""

    def __init__(self, img_scale: Tuple[int, int] = (2048, 512), ratio_range: Tuple[float, float] = (0.5, 2.0)):
        super().__init__(img_scale)
        self.ratio_range = tuple(ratio_range)

    def _target(self, flat_inputs: List[Any]) -> Tuple[int, int]:
        lo, hi = self.ratio_range
        ratio = float(torch.rand(())) * (hi - lo) + lo
        return int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio)


def crop_is_acceptable(label: torch.Tensor, cat_max_ratio: float, ignore_index: int = 255) -> bool:
    """mmseg's test: at least two classes and none covering ``cat_max_ratio`` or more of the
    crop's non-ignored pixels."""
    counts = torch.bincount(label.reshape(-1).long(), minlength=256)
    counts = counts[torch.arange(counts.numel()) != ignore_index]
    counts = counts[counts > 0]
    return counts.numel() > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio


class CatMaxRatioCrop(v2.Transform):
    """Random ``size`` crop (the whole side when the image is smaller), re-drawn up to
    ``tries`` times while ``crop_is_acceptable`` fails (mmseg ``RandomCrop(cat_max_ratio)``);
    after the last failed try the last crop drawn is kept, as in mmseg."""

    def __init__(self, size: Tuple[int, int], cat_max_ratio: float = 0.75, ignore_index: int = 255, tries: int = 10):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.tries = tries

    def _draw(self, h: int, w: int) -> Tuple[int, int, int, int]:
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return top, left, ch, cw

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = query_size(flat_inputs)
        box = self._draw(h, w)
        masks = [x for x in flat_inputs if isinstance(x, tv_tensors.Mask)]
        if self.cat_max_ratio < 1.0 and masks:
            mask = masks[0]
            for _ in range(self.tries):
                top, left, ch, cw = box
                if crop_is_acceptable(mask[..., top:top + ch, left:left + cw], self.cat_max_ratio, self.ignore_index):
                    break
                box = self._draw(h, w)
        top, left, ch, cw = box
        return dict(top=top, left=left, height=ch, width=cw)

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        return self._call_kernel(TF.crop, inpt, **params)


def _rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] (…, 3, H, W) → HSV in [0, 1]."""
    r, g, b = img.unbind(-3)
    maxc, _ = img.max(dim=-3)
    minc, _ = img.min(dim=-3)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    d = delta.clamp(min=1e-12)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(img: torch.Tensor) -> torch.Tensor:
    """HSV in [0, 1] → RGB in [0, 1]: channel n ∈ (5, 3, 1) is V − V·S·clamp(min(k, 4 − k), 0, 1)
    with k = (n + 6 H) mod 6."""
    h, s, v = img.unbind(-3)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + h * 6.0) % 6.0
        out.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(out, dim=-3)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """numpy ``clip(0, 255).astype(uint8)`` (truncation)."""
    return x.clamp(0, 255).to(torch.uint8)


class PhotoMetricDistortion(v2.Transform):
    """mmseg ``PhotoMetricDistortion`` on a uint8 RGB ``tv_tensors.Image`` (see the module doc)."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, brightness_delta: float = 32, contrast_range: Tuple[float, float] = (0.5, 1.5),
                 saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18):
        super().__init__()
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    @staticmethod
    def _coin() -> bool:
        return bool(torch.randint(0, 2, ()))

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return float(torch.rand(())) * (hi - lo) + lo

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        coin = self._coin
        return dict(
            brightness=self._uniform(-self.brightness_delta, self.brightness_delta) if coin() else None,
            contrast_first=coin(),
            contrast=self._uniform(*self.contrast_range) if coin() else None,
            saturation=self._uniform(*self.saturation_range) if coin() else None,
            hue=int(torch.randint(-self.hue_delta, self.hue_delta, ())) if coin() else None)

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        img = inpt.as_subclass(torch.Tensor)
        if img.dtype != torch.uint8:
            raise TypeError('PhotoMetricDistortion expects a uint8 image (apply it before normalisation)')
        if params['brightness'] is not None:
            img = _to_uint8(img.float() + params['brightness'])
        if params['contrast_first'] and params['contrast'] is not None:
            img = _to_uint8(img.float() * params['contrast'])
        if params['saturation'] is not None:
            hsv = _rgb_to_hsv(img.float() / 255.0)
            hsv[..., 1, :, :] = (hsv[..., 1, :, :] * params['saturation']).clamp(0, 1)
            img = _to_uint8((_hsv_to_rgb(hsv) * 255.0).round())
        if params['hue'] is not None:
            hsv = _rgb_to_hsv(img.float() / 255.0)
            hsv[..., 0, :, :] = (hsv[..., 0, :, :] + params['hue'] / 180.0) % 1.0
            img = _to_uint8((_hsv_to_rgb(hsv) * 255.0).round())
        if not params['contrast_first'] and params['contrast'] is not None:
            img = _to_uint8(img.float() * params['contrast'])
        return tv_tensors.wrap(img, like=inpt)


class PadTo(v2.Transform):
    """Pad at the bottom / right up to ``size`` (image with ``fill``, mask with ``mask_fill``)."""

    def __init__(self, size: Tuple[int, int], fill: float = 0.0, mask_fill: int = 255):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.fill = fill
        self.mask_fill = mask_fill

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = query_size(flat_inputs)
        return dict(padding=[0, 0, max(self.size[1] - w, 0), max(self.size[0] - h, 0)])

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if not any(params['padding']):
            return inpt
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.fill
        return self._call_kernel(TF.pad, inpt, params['padding'], fill=fill)


def _normalise(mean: Sequence[float], std: Sequence[float]) -> List[v2.Transform]:
    return [v2.ToDtype({tv_tensors.Image: torch.float32, 'others': None}, scale=False),
            v2.Normalize(list(mean), list(std))]


def build_train_transform(img_scale: Tuple[int, int] = (2048, 512), ratio_range: Tuple[float, float] = (0.5, 2.0),
                          crop_size: int = 512, cat_max_ratio: float = 0.75, hflip: float = 0.5,
                          photometric: bool = True, mean: Sequence[float] = ADE_MEAN,
                          std: Sequence[float] = ADE_STD, ignore_index: int = 255) -> v2.Compose:
    """The mmseg ADE20K training pipeline on (``tv_tensors.Image``, ``tv_tensors.Mask``) pairs."""
    steps: List[v2.Transform] = [RandomRescale(img_scale, ratio_range),
                                 CatMaxRatioCrop((crop_size, crop_size), cat_max_ratio, ignore_index)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += _normalise(mean, std)
    steps.append(PadTo((crop_size, crop_size), 0.0, ignore_index))
    return v2.Compose(steps)


def build_eval_transform(img_scale: Tuple[int, int] = (2048, 512), mean: Sequence[float] = ADE_MEAN,
                         std: Sequence[float] = ADE_STD) -> v2.Compose:
    """Keep-ratio resize to ``img_scale`` and normalisation (image only)."""
    return v2.Compose([Rescale(img_scale)] + _normalise(mean, std))
