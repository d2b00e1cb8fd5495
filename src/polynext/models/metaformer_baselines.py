"""MetaFormer baselines: IdentityFormer, RandFormer, PoolFormerV2, ConvFormer, CAFormer.

Paper: "MetaFormer Baselines for Vision" (Yu et al., TPAMI 2023, arXiv 2210.13452).
Authors' code: https://github.com/sail-sg/metaformer (commit 64c534a).

Everything is built on timm's ``timm.models.metaformer.MetaFormer`` and its layers:

* PoolFormerV2, ConvFormer and CAFormer are timm's own registered models. polynext lists them,
  loads the authors' files into them and adds the paper's options through
  ``polynext.create_model`` (``create_timm_baseline``): the authors' MLP head (dropout between
  its norm and fc2, LayerNorm eps 1e-5) and the Table 8 switches.
* IdentityFormer (identity mixer) and RandFormer (frozen random mixing in stages 3 and 4) are
  registered here, S12 to M48, plus the isotropic IdentityFormer-S of Table 4 (plain and with a
  4-layer conv stem).

The Table 8 switches (``act``, ``branch_scale``, ``block_bias``) and the head options
(``head_dropout``, ``head_norm_eps``) are keyword arguments of every model here, see
``MetaFormerOptions``; ``METAFORMER_ABLATIONS`` maps each Table 8 row to its option.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ConvNormAct, Mlp, PatchEmbed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import metaformer as timm_metaformer
from timm.models.metaformer import (
    GroupNorm1NoBias, LayerNorm2dNoBias, MetaFormer, MetaFormerBlock, MlpHead, SquaredReLU, StarReLU,
)

from ..errors import CheckpointError, ConfigError

__all__ = [
    'RandomMixing', 'RandFormer', 'IsotropicMetaFormer', 'ConvStem',
    'StarReLUVariant', 'StarReLUScaleOnly', 'StarReLUBiasOnly', 'StarReLUFixed', 'StarReLUFixedScaleOnly',
    'StarReLUFixedBiasOnly', 'ACTIVATIONS', 'BRANCH_SCALES', 'METAFORMER_ABLATIONS', 'MetaFormerOptions',
    'AUTHORS_HEAD_NORM_EPS', 'apply_authors_head', 'create_timm_baseline', 'resample_random_matrix',
    'checkpoint_filter_fn', 'match_checkpoint', 'BASELINE_ARCHS', 'TIMM_ARCHS', 'METAFORMER_MODELS',
]

#: ``nn.LayerNorm``'s default, which the authors' MlpHead uses (timm's MlpHead uses 1e-6).
AUTHORS_HEAD_NORM_EPS = 1e-5


# --------------------------------------------------------------------------------------
# StarReLU variants (paper Eq. 15 and Table 8)
# --------------------------------------------------------------------------------------

class StarReLUVariant(nn.Module):
    """``s · ReLU(x)² + b`` (paper Eq. 15) where each of ``s`` and ``b`` is learnable (a (1,)
    parameter named ``scale`` / ``bias``, as in timm's ``StarReLU``), a fixed constant, or absent.

    timm's layers build activations from a class without arguments, so each Table 8 variant is a
    subclass that fixes the choice; the default (learnable ``s`` and ``b``) is timm's ``StarReLU``.
    """

    def __init__(self, scale: Optional[float], bias: Optional[float], learnable: bool,
                 device=None, dtype=None):
        super().__init__()
        self.learnable = learnable
        if learnable:
            dd = dict(device=device, dtype=dtype)
            self.scale = None if scale is None else nn.Parameter(torch.full((1,), float(scale), **dd))
            self.bias = None if bias is None else nn.Parameter(torch.full((1,), float(bias), **dd))
        else:
            self.scale = scale
            self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(x) ** 2
        if self.scale is not None:
            y = y * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        def term(v, name):
            return name if isinstance(v, nn.Parameter) else f'{v:.6g}'
        s = '' if self.scale is None else f'{term(self.scale, "s")}·'
        b = '' if self.bias is None else f' + {term(self.bias, "b")}'
        return f'{s}ReLU(x)²{b}'


class StarReLUScaleOnly(StarReLUVariant):
    """``s · ReLU(x)²`` with a learnable ``s`` (init 1)."""

    def __init__(self, device=None, dtype=None):
        super().__init__(1.0, None, learnable=True, device=device, dtype=dtype)


class StarReLUBiasOnly(StarReLUVariant):
    """``ReLU(x)² + b`` with a learnable ``b`` (init 0)."""

    def __init__(self, device=None, dtype=None):
        super().__init__(None, 0.0, learnable=True, device=device, dtype=dtype)


#: E[ReLU(x)²] and Var[ReLU(x)²] for x ~ N(0, 1) (paper Eq. 11).
RELU2_MEAN, RELU2_VAR = 0.5, 1.25


class StarReLUFixed(StarReLUVariant):
    """``(ReLU(x)² − 0.5) / √1.25`` (paper Eq. 13): fixed, no parameters."""

    def __init__(self, device=None, dtype=None):
        super().__init__(1 / math.sqrt(RELU2_VAR), -RELU2_MEAN / math.sqrt(RELU2_VAR), learnable=False)


class StarReLUFixedScaleOnly(StarReLUVariant):
    """``ReLU(x)² / √1.25``: fixed, no parameters."""

    def __init__(self, device=None, dtype=None):
        super().__init__(1 / math.sqrt(RELU2_VAR), None, learnable=False)


class StarReLUFixedBiasOnly(StarReLUVariant):
    """``ReLU(x)² − 0.5``: fixed, no parameters."""

    def __init__(self, device=None, dtype=None):
        super().__init__(None, -RELU2_MEAN, learnable=False)


#: ``act=`` values: the activation of every MLP and of every SepConv (its ``act1``).
ACTIVATIONS: Dict[str, Type[nn.Module]] = {
    'starrelu': StarReLU,                             # s·ReLU(x)² + b, s and b learnable (the paper's default)
    'starrelu_scale': StarReLUScaleOnly,              # s·ReLU(x)²
    'starrelu_bias': StarReLUBiasOnly,                # ReLU(x)² + b
    'starrelu_fixed': StarReLUFixed,                  # 1/√1.25·ReLU(x)² − 0.5/√1.25
    'starrelu_fixed_scale': StarReLUFixedScaleOnly,   # 1/√1.25·ReLU(x)²
    'starrelu_fixed_bias': StarReLUFixedBiasOnly,     # ReLU(x)² − 0.5
    'squared_relu': SquaredReLU,
    'relu': nn.ReLU,
    'gelu': nn.GELU,
}

#: ``branch_scale=`` values (paper Eqs. 16-18): which of the residual (ResScale, init 1) and the
#: branch (LayerScale, init ``layer_scale_init``) are scaled, on the stages that carry ResScale by
#: default (the last two of a 4-stage model).
BRANCH_SCALES: Dict[str, Tuple[bool, bool]] = {
    'res': (True, False),      # ResScale  x' = λr ⊙ x + f(x)  (the paper's default)
    'layer': (False, True),    # LayerScale x' = x + λl ⊙ f(x)
    'branch': (True, True),    # BranchScale x' = λr ⊙ x + λl ⊙ f(x)
    'none': (False, False),
}

#: Table 8's rows as options (ConvFormer-S18 / CAFormer-S18 in the paper; they apply to every model here).
METAFORMER_ABLATIONS: Dict[str, Dict[str, Any]] = {
    'relu': dict(act='relu'),                                  # StarReLU → ReLU
    'squared_relu': dict(act='squared_relu'),                  # StarReLU → Squared ReLU
    'gelu': dict(act='gelu'),                                  # StarReLU → GELU
    'starrelu_scale': dict(act='starrelu_scale'),              # → α·ReLU(x)²
    'starrelu_bias': dict(act='starrelu_bias'),                # → ReLU(x)² + β
    'starrelu_fixed': dict(act='starrelu_fixed'),              # → 1/√1.25·ReLU(x)² − 0.5/√1.25
    'starrelu_fixed_scale': dict(act='starrelu_fixed_scale'),  # → 1/√1.25·ReLU(x)²
    'starrelu_fixed_bias': dict(act='starrelu_fixed_bias'),    # → ReLU(x)² − 0.5
    'no_branch_scale': dict(branch_scale='none'),              # ResScale → None
    'layer_scale': dict(branch_scale='layer'),                 # ResScale → LayerScale
    'branch_scale': dict(branch_scale='branch'),               # ResScale → BranchScale
    'block_bias': dict(block_bias=True),                       # enable biases of norm, FC and conv in each block
}


# --------------------------------------------------------------------------------------
# Random mixing (paper Eq. 5)
# --------------------------------------------------------------------------------------

def resample_random_matrix(matrix: torch.Tensor, old_grid: Tuple[int, int],
                           new_grid: Tuple[int, int]) -> torch.Tensor:
    """Resample an N×N token-mixing matrix from an ``old_grid`` token grid to ``new_grid``.

    The matrix is read as a 4-D kernel W[(i, j), (k, l)] and bilinearly resized over the source
    positions (k, l) and then over the target positions (i, j); each row is then rescaled to sum to
    1, as the softmax-normalised originals do (so a constant input stays constant). Bilinear keeps
    every weight non-negative.
    """
    (h, w), (nh, nw) = tuple(old_grid), tuple(new_grid)
    if (h, w) == (nh, nw):
        return matrix
    if matrix.shape != (h * w, h * w):
        raise ValueError(f'matrix of shape {list(matrix.shape)} does not fit a {h}x{w} grid')
    x = matrix.float().reshape(h * w, 1, h, w)                                   # rows: target, grid: source
    x = F.interpolate(x, size=(nh, nw), mode='bilinear', align_corners=False)    # (hw, 1, nh, nw)
    x = x.reshape(h, w, nh * nw).permute(2, 0, 1).unsqueeze(1)                   # rows: new source, grid: target
    x = F.interpolate(x, size=(nh, nw), mode='bilinear', align_corners=False)    # (nhw, 1, nh, nw)
    x = x.reshape(nh * nw, nh * nw).t()                                          # [target, source]
    return (x / x.sum(dim=-1, keepdim=True)).to(matrix.dtype)


class RandomMixing(nn.Module):
    """Global random token mixing (paper Eq. 5): ``X ← W_R X`` over the H·W tokens of an NCHW map.

    ``W_R`` is ``softmax(U(0, 1) N×N)`` (rows sum to 1), drawn at construction and never trained. It
    is a persistent buffer named ``random_matrix`` (the authors' key): saved in the ``state_dict``,
    moved by ``.to()``, but never in ``parameters()``, so no optimizer, weight decay, gradient
    clipping or EMA averaging ever touches it.

    The matrix is built for one token grid (``grid_size``). Another input size is an error, unless
    ``dynamic_img_size=True``: then the matrix is resampled for each grid (``resample_random_matrix``).
    """

    def __init__(self, dim: int, grid_size: Tuple[int, int] = (14, 14), reduction: int = 16,
                 dynamic_img_size: bool = False, device=None, dtype=None, **kwargs):
        super().__init__()
        self.grid_size = to_2tuple(grid_size)
        self.reduction = reduction
        self.dynamic_img_size = dynamic_img_size
        n = self.num_tokens
        matrix = torch.softmax(torch.rand(n, n, device=device), dim=-1)
        self.register_buffer('random_matrix', matrix.to(dtype=dtype or torch.get_default_dtype()))

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def set_grid_size(self, grid_size: Tuple[int, int]) -> None:
        """Resample the matrix for another token grid (the model's ``set_input_size`` uses this)."""
        grid_size = to_2tuple(grid_size)
        self.random_matrix = resample_random_matrix(self.random_matrix, self.grid_size, grid_size)
        self.grid_size = grid_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        matrix = self.random_matrix
        if (H, W) != self.grid_size:
            if not self.dynamic_img_size:
                h, w = self.grid_size
                r = self.reduction
                raise ConfigError(
                    f'RandomMixing was built for a {h}x{w} token grid ({h * w} tokens, i.e. {h * r}x{w * r} input '
                    f'images) but got a {H}x{W} grid ({H * W} tokens, about {H * r}x{W * r} images). Create the '
                    f'model with img_size=({H * r}, {W * r}) (a checkpoint of another size is resampled on '
                    f'load), call model.set_input_size(...), or pass dynamic_img_size=True to resample the '
                    f'random matrices for every input size.')
            matrix = resample_random_matrix(matrix, self.grid_size, (H, W))
        # out[b, c, m] = Σ_n W[m, n] x[b, c, n]
        return F.linear(x.reshape(B, C, H * W), matrix).reshape(B, C, H, W)

    def extra_repr(self) -> str:
        h, w = self.grid_size
        return f'num_tokens={h * w} ({h}x{w}), frozen' + (', dynamic_img_size' if self.dynamic_img_size else '')


def _conv_out(size: int, conv: nn.Conv2d, dim: int) -> int:
    k, s, p = conv.kernel_size[dim], conv.stride[dim], conv.padding[dim]
    return (size + 2 * p - k) // s + 1


class RandFormer(MetaFormer):
    """RandFormer: timm's MetaFormer with identity mixers in stages 1-2 and frozen ``RandomMixing``
    in ``random_mixing_stages`` (stages 3 and 4), one random matrix per block.

    The matrices are sized for ``img_size`` (default 224: 14x14 = 196 and 7x7 = 49 tokens, as the
    authors' models); ``model.num_tokens`` states the token count of every stage.
    ``dynamic_img_size=True`` resamples them for any other input size; ``set_input_size`` resizes
    them in place. (timm's ``MetaFormer`` builds one mixer class per stage and passes the same
    keyword arguments to every stage, so a per-stage token count cannot go through it: the identity
    mixers of the random stages are swapped for ``RandomMixing`` after timm builds the model.)
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, random_mixing_stages: Sequence[int] = (2, 3),
                 dynamic_img_size: bool = False, device=None, dtype=None, **kwargs):
        if 'token_mixers' in kwargs:
            raise TypeError('RandFormer sets its own token mixers (identity + random mixing in random_mixing_stages)')
        super().__init__(token_mixers=nn.Identity, device=device, dtype=dtype, **kwargs)
        self.img_size = to_2tuple(img_size)
        self.dynamic_img_size = dynamic_img_size
        self.random_mixing_stages = tuple(random_mixing_stages)
        grids = self.grid_sizes(self.img_size)
        for i in self.random_mixing_stages:
            info = self.feature_info[i]
            for block in self.stages[i].blocks:
                block.token_mixer = RandomMixing(
                    info['num_chs'], grid_size=grids[i], reduction=info['reduction'],
                    dynamic_img_size=dynamic_img_size, device=device, dtype=dtype)

    def grid_sizes(self, img_size: Union[int, Tuple[int, int]]) -> List[Tuple[int, int]]:
        """Token grid (H, W) of every stage for an input of ``img_size`` (conv arithmetic)."""
        h, w = to_2tuple(img_size)
        h, w = _conv_out(h, self.stem.conv, 0), _conv_out(w, self.stem.conv, 1)
        grids = []
        for stage in self.stages:
            if isinstance(stage.downsample, nn.Identity):
                grids.append((h, w))
                continue
            conv = stage.downsample.conv
            h, w = _conv_out(h, conv, 0), _conv_out(w, conv, 1)
            grids.append((h, w))
        return grids

    @property
    def num_tokens(self) -> Tuple[int, ...]:
        """Tokens per stage at ``img_size`` (stages 3 and 4 of the 224 models: 196 and 49)."""
        return tuple(h * w for h, w in self.grid_sizes(self.img_size))

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Resample every random matrix for ``img_size`` inputs (as timm's ViT ``set_input_size``)."""
        self.img_size = to_2tuple(img_size)
        grids = self.grid_sizes(self.img_size)
        for i in self.random_mixing_stages:
            for block in self.stages[i].blocks:
                block.token_mixer.set_grid_size(grids[i])


# --------------------------------------------------------------------------------------
# Isotropic MetaFormer (Table 4)
# --------------------------------------------------------------------------------------

class ConvStem(nn.Module):
    """Table 4's stem of 4 convolutions with kernels 7, 3, 3, 3 and stride 2 each (stride 16 in
    all), BatchNorm + ReLU between them, then the MetaFormer stem norm. Widths default to
    dim/8, dim/4, dim/2 (48-96-192 for dim 384: 22.51M params / 4.641 GMACs with IdentityFormer-S,
    the paper's 23M / 4.6G)."""

    def __init__(self, in_chans: int, out_chans: int, widths: Optional[Sequence[int]] = None,
                 norm_layer: Type[nn.Module] = LayerNorm2dNoBias, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        w1, w2, w3 = widths or (out_chans // 8, out_chans // 4, out_chans // 2)
        self.conv1 = ConvNormAct(in_chans, w1, 7, stride=2, **dd)
        self.conv2 = ConvNormAct(w1, w2, 3, stride=2, **dd)
        self.conv3 = ConvNormAct(w2, w3, 3, stride=2, **dd)
        self.conv4 = nn.Conv2d(w3, out_chans, 3, stride=2, padding=1, **dd)
        self.norm = norm_layer(out_chans, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv4(self.conv3(self.conv2(self.conv1(x)))))


class IsotropicMetaFormer(MetaFormer):
    """One-stage ("isotropic", ViT-like) MetaFormer: a stride-16 stem, ``depth`` blocks of width
    ``dim`` with MLP ratio ``mlp_ratio``, global average pooling, norm and head (no class token, no
    position embedding).

    ``stem='patch'``: a 16x16 stride-16 patch conv (timm ``PatchEmbed``) + the stem norm;
    ``stem='conv'``: ``ConvStem``. Table 4's IdentityFormer-S (iso.) is depth 12, dim 384 and MLP
    ratio 6: dropping attention removes 4·d² parameters per block and ratio 6 adds them back in the
    MLP, giving 21.92M params / 4.220 GMACs (paper: 22M / 4.2G). timm's ``MetaFormer`` fixes the MLP
    ratio at 4 and the stem at k7 s4, so the stem and (for a ratio other than 4) the MLPs are swapped
    after timm builds the model and initialised with timm's init.
    """

    def __init__(self, depth: int = 12, dim: int = 384, mlp_ratio: float = 6.0, stem: str = 'patch',
                 patch_size: int = 16, stem_widths: Optional[Sequence[int]] = None, in_chans: int = 3,
                 mlp_act: Type[nn.Module] = StarReLU, mlp_bias: bool = False, proj_drop_rate: float = 0.,
                 downsample_norm: Optional[Type[nn.Module]] = LayerNorm2dNoBias, device=None, dtype=None, **kwargs):
        super().__init__(in_chans=in_chans, depths=(depth,), dims=(dim,), mlp_act=mlp_act, mlp_bias=mlp_bias,
                         proj_drop_rate=proj_drop_rate, downsample_norm=downsample_norm, device=device,
                         dtype=dtype, **kwargs)
        dd = dict(device=device, dtype=dtype)
        if stem == 'patch':
            self.stem = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_chans, embed_dim=dim,
                                   norm_layer=downsample_norm, output_fmt='NCHW', **dd)
            reduction = patch_size
        elif stem == 'conv':
            self.stem = ConvStem(in_chans, dim, stem_widths, norm_layer=downsample_norm, **dd)
            reduction = 16
        else:
            raise ConfigError(f"stem must be 'patch' or 'conv', not {stem!r}")
        self.stem.apply(self._init_weights)
        self.mlp_ratio = mlp_ratio
        if mlp_ratio != 4:
            act = partial(mlp_act, **dd) if mlp_act is StarReLU else mlp_act
            for block in self.stages[0].blocks:
                block.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=act, bias=mlp_bias, drop=proj_drop_rate,
                                use_conv=True, **dd)
                block.mlp.apply(self._init_weights)
        self.feature_info = [dict(num_chs=dim, reduction=reduction, module='stages.0')]


# --------------------------------------------------------------------------------------
# Paper options (Table 8 switches, authors' head) for every MetaFormer model
# --------------------------------------------------------------------------------------

def apply_authors_head(model: nn.Module, head_dropout: float = 0.0,
                       norm_eps: Optional[float] = AUTHORS_HEAD_NORM_EPS) -> nn.Module:
    """Give a timm MetaFormer the authors' classifier head behaviour, in place.

    * MLP head (ConvFormer, CAFormer): dropout ``head_dropout`` between the head's norm and fc2
      (the authors' ``--head-dropout``; timm's ``drop_rate`` sits before the whole head instead),
      and the head LayerNorm eps ``norm_eps`` (the authors' 1e-5; timm's 1e-6).
    * Linear head: ``head_dropout`` is the dropout right before the linear layer (timm's ``drop_rate``
      position); ``norm_eps`` does not apply.

    timm's ``reset_classifier`` builds a fresh timm head: call this again after it.
    """
    head = getattr(model, 'head', None)
    fc = getattr(head, 'fc', None)
    if isinstance(fc, MlpHead):
        fc.head_drop.p = float(head_dropout)
        if norm_eps is not None:
            fc.norm.eps = float(norm_eps)
    elif isinstance(fc, nn.Linear):
        head.drop.p = float(head_dropout)
    return model


def _enable_block_biases(model: nn.Module) -> None:
    """Give every norm, fully-connected and conv layer inside the MetaFormer blocks a bias, zero
    initialised (the authors' init sets every bias to 0). timm's ConvFormer / CAFormer constructors
    fix their bias-free norm classes, so the biases are added after construction."""
    for block in model.modules():
        if not isinstance(block, MetaFormerBlock):
            continue
        for m in block.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)) and m.bias is None \
                    and m.weight is not None:
                if isinstance(m, nn.Linear):
                    n = m.out_features
                elif isinstance(m, nn.Conv2d):
                    n = m.out_channels
                else:
                    n = m.weight.shape[0]
                ref = m.weight
                m.bias = nn.Parameter(torch.zeros(n, device=ref.device, dtype=ref.dtype))


@dataclass
class MetaFormerOptions:
    """The paper's switches, accepted as keyword arguments by every MetaFormer model polynext offers
    (``None``: the model's own default, i.e. the paper's).

    act: activation of every MLP and SepConv, a name in ``ACTIVATIONS`` (default ``'starrelu'``).
    branch_scale: ``'res'`` (default) / ``'layer'`` / ``'branch'`` / ``'none'`` (``BRANCH_SCALES``), on
        the stages that carry ResScale by default (the last two; the single stage of an isotropic
        model, which has none by default as in the authors' class). For other placements pass timm's
        ``res_scale_init_values`` / ``layer_scale_init_values`` instead.
    layer_scale_init: LayerScale init for ``'layer'`` / ``'branch'`` (the paper's "like 1e-5").
    block_bias: ``True`` enables the biases of every norm, FC and conv in the blocks (Table 8, last row).
    head_dropout: dropout right before the classifier's last linear layer (MLP head: between its norm
        and fc2, the authors' position; Tables 14/15's "MLP head dropout").
    head_norm_eps: eps of the MLP head's LayerNorm (default: the authors' 1e-5; timm's is 1e-6).
    """
    act: Optional[str] = None
    branch_scale: Optional[str] = None
    layer_scale_init: float = 1e-5
    block_bias: bool = False
    head_dropout: Optional[float] = None
    head_norm_eps: Optional[float] = None

    @classmethod
    def pop(cls, kwargs: Dict[str, Any]) -> 'MetaFormerOptions':
        """Take the options out of a model's keyword arguments (validated)."""
        opts = cls(**{f.name: kwargs.pop(f.name) for f in fields(cls) if f.name in kwargs})
        if opts.act is not None and opts.act not in ACTIVATIONS:
            raise ConfigError(f"act={opts.act!r} is not one of: {', '.join(ACTIVATIONS)}")
        if opts.branch_scale is not None and opts.branch_scale not in BRANCH_SCALES:
            raise ConfigError(f"branch_scale={opts.branch_scale!r} is not one of: {', '.join(BRANCH_SCALES)}")
        if opts.head_dropout is not None and not 0.0 <= opts.head_dropout <= 1.0:
            raise ConfigError(f'head_dropout must be in [0, 1], got {opts.head_dropout}')
        if opts.act is not None and 'mlp_act' in kwargs:
            raise ConfigError("pass either act= (a name) or timm's mlp_act= (a class), not both")
        if opts.branch_scale is not None and {'res_scale_init_values', 'layer_scale_init_values'} & set(kwargs):
            raise ConfigError("pass either branch_scale= or timm's res_scale_init_values / layer_scale_init_values")
        return opts

    def constructor_kwargs(self, num_stages: int, scaled_stages: Sequence[int], has_sepconv: bool) -> Dict[str, Any]:
        """timm ``MetaFormer`` keyword arguments for the construction-time switches."""
        kw: Dict[str, Any] = {}
        if self.act is not None:
            kw['mlp_act'] = ACTIVATIONS[self.act]
            if has_sepconv:
                kw['act1_layer'] = ACTIVATIONS[self.act]
        if self.branch_scale is not None:
            res, layer = BRANCH_SCALES[self.branch_scale]
            kw['res_scale_init_values'] = [1.0 if res and i in scaled_stages else None for i in range(num_stages)]
            kw['layer_scale_init_values'] = [
                self.layer_scale_init if layer and i in scaled_stages else None for i in range(num_stages)]
        return kw

    def apply(self, model: nn.Module, name: str) -> None:
        """The switches applied to a built model: block biases and the authors' head."""
        if self.block_bias:
            _enable_block_biases(model)
        fc = getattr(getattr(model, 'head', None), 'fc', None)
        if self.head_norm_eps is not None and fc is not None and not isinstance(fc, MlpHead):
            raise ConfigError(f'{name} has a linear classifier; head_norm_eps applies to the MLP head of '
                              f'ConvFormer / CAFormer only')
        if isinstance(fc, MlpHead):
            eps = AUTHORS_HEAD_NORM_EPS if self.head_norm_eps is None else self.head_norm_eps
            apply_authors_head(model, self.head_dropout or 0.0, eps)
        elif self.head_dropout is not None:
            apply_authors_head(model, self.head_dropout, None)


# --------------------------------------------------------------------------------------
# Checkpoints: the authors' (sail-sg) layout
# --------------------------------------------------------------------------------------

def _is_authors_layout(state_dict: Dict[str, Any]) -> bool:
    return 'downsample_layers.0.conv.weight' in state_dict and 'stem.conv.weight' not in state_dict


def _resample_random_matrices(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    expected = model.state_dict()
    out = dict(state_dict)
    for k, v in state_dict.items():
        if not k.endswith('random_matrix') or k not in expected or v.shape == expected[k].shape:
            continue
        n_old, n_new = v.shape[0], expected[k].shape[0]
        module = model.get_submodule(k.rsplit('.', 1)[0])
        side = math.isqrt(n_old)
        if side * side != n_old:
            raise CheckpointError(f"'{k}' mixes {n_old} tokens, not a square grid; cannot resample it to "
                                  f"{module.grid_size[0]}x{module.grid_size[1]} = {n_new} tokens")
        out[k] = resample_random_matrix(v, (side, side), module.grid_size)
    return out


def _convert_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Authors' keys → timm's (timm's own converter; ``KeyError`` for a key the model lacks), then
    random matrices resampled to the model's token grids."""
    if _is_authors_layout(state_dict):
        state_dict = timm_metaformer.checkpoint_filter_fn(state_dict, model)
    return _resample_random_matrices(state_dict, model)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn`` / polynext ``load_weights`` filter for the models of this file.

    Authors' (sail-sg) key names are converted by timm's own ``metaformer.checkpoint_filter_fn``
    (renames, [o, i] → [o, i, 1, 1] reshapes). Random matrices of another token count than the model's
    (a 224 checkpoint into an ``img_size=384`` RandFormer) are resampled. polynext / timm layouts pass
    through.
    """
    from ..checkpoint import unwrap_state_dict
    state_dict = unwrap_state_dict(state_dict)
    try:
        return _convert_state_dict(state_dict, model)
    except KeyError as e:
        raise CheckpointError(_mismatch_message(model, state_dict, f'unexpected key {e}')) from None


# --------------------------------------------------------------------------------------
# Published configurations (one place) and registry
# --------------------------------------------------------------------------------------

class BaselineArch(NamedTuple):
    model_cls: type
    kwargs: Dict[str, Any]


_HIERARCHICAL_SIZES = {
    's12': dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512)),
    's24': dict(depths=(4, 4, 12, 4), dims=(64, 128, 320, 512)),
    's36': dict(depths=(6, 6, 18, 6), dims=(64, 128, 320, 512)),
    'm36': dict(depths=(6, 6, 18, 6), dims=(96, 192, 384, 768)),
    'm48': dict(depths=(8, 8, 24, 8), dims=(96, 192, 384, 768)),
}
# Identity / Rand / PoolFormerV2 blocks: GroupNorm(1) without bias, linear head (as timm's poolformerv2)
_BASIC = dict(norm_layers=GroupNorm1NoBias, use_mlp_head=False)

#: polynext's own MetaFormer baselines: name -> (model class, constructor arguments).
BASELINE_ARCHS: Dict[str, BaselineArch] = {}
for _size, _cfg_args in _HIERARCHICAL_SIZES.items():
    BASELINE_ARCHS[f'identityformer_{_size}'] = BaselineArch(
        MetaFormer, dict(_cfg_args, token_mixers=nn.Identity, **_BASIC))
for _size, _cfg_args in _HIERARCHICAL_SIZES.items():
    BASELINE_ARCHS[f'randformer_{_size}'] = BaselineArch(RandFormer, dict(_cfg_args, **_BASIC))
BASELINE_ARCHS['identityformer_s_iso'] = BaselineArch(IsotropicMetaFormer, dict(
    depth=12, dim=384, mlp_ratio=6.0, stem='patch', token_mixers=nn.Identity, **_BASIC))
BASELINE_ARCHS['identityformer_s_iso_convstem'] = BaselineArch(IsotropicMetaFormer, dict(
    depth=12, dim=384, mlp_ratio=6.0, stem='conv', token_mixers=nn.Identity, **_BASIC))

#: timm's own registered MetaFormer baselines, listed by polynext (paper order).
TIMM_ARCHS: Tuple[str, ...] = (
    *(f'poolformerv2_{s}' for s in _HIERARCHICAL_SIZES),
    *(f'convformer_{s}' for s in ('s18', 's36', 'm36', 'b36')),
    *(f'caformer_{s}' for s in ('s18', 's36', 'm36', 'b36')),
)
_SEPCONV_FAMILIES = ('convformer', 'caformer')

#: every MetaFormer baseline polynext offers, in the paper's order (Tables 3, 4, 5).
METAFORMER_MODELS: Tuple[str, ...] = (
    *(f'identityformer_{s}' for s in _HIERARCHICAL_SIZES),
    *(f'randformer_{s}' for s in _HIERARCHICAL_SIZES),
    *TIMM_ARCHS,
    'identityformer_s_iso', 'identityformer_s_iso_convstem',
)


def _scaled_stages(num_stages: int) -> Tuple[int, ...]:
    """Stages that carry ResScale by default (the last two), or the only one of an isotropic model."""
    return tuple(range(max(0, num_stages - 2), num_stages))


def _create_baseline(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    model_cls, arch_kwargs = BASELINE_ARCHS[variant]
    opts = MetaFormerOptions.pop(kwargs)
    num_stages = len(arch_kwargs.get('depths', (1,)))
    model_args = dict(arch_kwargs)
    model_args.update(opts.constructor_kwargs(num_stages, _scaled_stages(num_stages), has_sepconv=False))
    model_args.update(kwargs)
    model = build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(num_stages))),
        **model_args,
    )
    opts.apply(model, variant)
    img_size = model_args.get('img_size')
    if model_cls is RandFormer and img_size is not None:  # the input size this fixed-size model was built for
        model.pretrained_cfg = model.default_cfg = dict(model.pretrained_cfg, input_size=(3, *to_2tuple(img_size)))
    return model


def create_timm_baseline(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` for timm's PoolFormerV2 / ConvFormer / CAFormer, plus the paper's options
    (``MetaFormerOptions``: ``act``, ``branch_scale``, ``block_bias``, ``head_dropout``,
    ``head_norm_eps``). MLP heads get the authors' LayerNorm eps 1e-5 unless ``head_norm_eps`` says
    otherwise. ``polynext.create_model`` calls this for these models."""
    arch = name.split('.')[0]
    if arch not in TIMM_ARCHS:
        raise ConfigError(f'{name} is not one of timm\'s MetaFormer baselines ({", ".join(TIMM_ARCHS)})')
    opts = MetaFormerOptions.pop(kwargs)
    kwargs.update(opts.constructor_kwargs(4, _scaled_stages(4), has_sepconv=arch.startswith(_SEPCONV_FAMILIES)))
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    opts.apply(model, arch)
    # timm's own constructor cannot rebuild these options: polynext.save_pretrained records them
    model.polynext_options = {f.name: getattr(opts, f.name) for f in fields(opts) if getattr(opts, f.name) != f.default}
    return model


def _family(name: str) -> str:
    return name.split('_')[0]


def _checkpoint_family(state_dict: Dict[str, Any]) -> Tuple[str, ...]:
    """Model families whose weights have this checkpoint's token-mixer keys (either layout)."""
    keys = ' '.join(state_dict)
    if 'random_matrix' in keys:
        return ('randformer',)
    if '.qkv.' in keys:
        return ('caformer',)
    if '.pwconv1.' in keys:
        return ('convformer',)
    if 'token_mixer.' in keys:
        return ()
    return ('identityformer', 'poolformerv2')   # no mixer weights: identity and pooling look the same


def _num_classes(state_dict: Dict[str, Any]) -> int:
    for k in ('head.fc2.weight', 'head.weight', 'head.fc.fc2.weight', 'head.fc.weight'):
        if k in state_dict:
            return int(state_dict[k].shape[0])
    return 0


@functools.lru_cache(maxsize=64)
def _meta_model(name: str, num_classes: int) -> nn.Module:
    """``name`` built on the meta device (shapes only; cheap) for checkpoint matching."""
    with torch.device('meta'):
        return timm.create_model(name, num_classes=num_classes)


def match_checkpoint(state_dict: Dict[str, Any]) -> List[str]:
    """Names of the MetaFormer baselines whose state dict (keys and shapes) this checkpoint fits,
    in either layout (random matrices of any square token grid fit a RandFormer). IdentityFormer
    and PoolFormerV2 of one size always both fit: their weights are the same (pooling has none)."""
    from ..checkpoint import unwrap_state_dict
    state_dict = unwrap_state_dict(state_dict)
    families = _checkpoint_family(state_dict)
    num_classes = _num_classes(state_dict)
    matches = []
    for name in METAFORMER_MODELS:
        if _family(name) not in families:
            continue
        model = _meta_model(name, num_classes)
        try:
            sd = _convert_state_dict(dict(state_dict), model)
        except (KeyError, CheckpointError, RuntimeError, ValueError):
            continue
        expected = model.state_dict()
        if set(sd) == set(expected) and all(tuple(sd[k].shape) == tuple(v.shape) for k, v in expected.items()):
            matches.append(name)
    return matches


def _mismatch_message(model: nn.Module, state_dict: Dict[str, Any], problem: str) -> str:
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    fits = match_checkpoint(state_dict)
    hint = f" The checkpoint fits {' / '.join(fits)}." if fits else ''
    return f'checkpoint does not match {name}: {problem}.{hint}'


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 1.0, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'classifier': 'head.fc', 'first_conv': 'stem.conv', 'license': 'apache-2.0',
        'paper_ids': 'arXiv:2210.13452', 'paper_name': 'MetaFormer Baselines for Vision',
        'origin_url': 'https://github.com/sail-sg/metaformer', **kwargs,
    }


def _sail_url(name: str) -> str:
    """The authors' released ImageNet-1K weights (sail-sg layout, converted on load)."""
    return f'https://huggingface.co/sail/dl/resolve/main/{_family(name)}/{name}.pth'


default_cfgs = generate_default_cfgs({
    **{f'identityformer_{s}.sail_in1k': _cfg(_sail_url(f'identityformer_{s}')) for s in _HIERARCHICAL_SIZES},
    **{f'randformer_{s}.sail_in1k': _cfg(_sail_url(f'randformer_{s}'), fixed_input_size=True)
       for s in _HIERARCHICAL_SIZES},
    # Table 4's isotropic models: no released weights
    'identityformer_s_iso': _cfg(first_conv='stem.proj', pool_size=(14, 14)),
    'identityformer_s_iso_convstem': _cfg(first_conv='stem.conv1.conv', pool_size=(14, 14)),
})


@register_model
def identityformer_s12(pretrained: bool = False, **kwargs) -> MetaFormer:
    """IdentityFormer-S12: 11.89M params, 1.812 GMACs @224 (Table 3: 11.9M / 1.8G, 74.6%)."""
    return _create_baseline('identityformer_s12', pretrained, **kwargs)


@register_model
def identityformer_s24(pretrained: bool = False, **kwargs) -> MetaFormer:
    """IdentityFormer-S24: 21.34M params, 3.392 GMACs @224 (Table 3: 21.3M / 3.4G, 78.2%)."""
    return _create_baseline('identityformer_s24', pretrained, **kwargs)


@register_model
def identityformer_s36(pretrained: bool = False, **kwargs) -> MetaFormer:
    """IdentityFormer-S36: 30.79M params, 4.972 GMACs @224 (Table 3: 30.8M / 5.0G, 79.3%)."""
    return _create_baseline('identityformer_s36', pretrained, **kwargs)


@register_model
def identityformer_m36(pretrained: bool = False, **kwargs) -> MetaFormer:
    """IdentityFormer-M36: 56.08M params, 8.759 GMACs @224 (Table 3: 56.1M / 8.8G, 80.0%)."""
    return _create_baseline('identityformer_m36', pretrained, **kwargs)


@register_model
def identityformer_m48(pretrained: bool = False, **kwargs) -> MetaFormer:
    """IdentityFormer-M48: 73.35M params, 11.533 GMACs @224 (Table 3: 73.3M / 11.5G, 80.4%)."""
    return _create_baseline('identityformer_m48', pretrained, **kwargs)


@register_model
def randformer_s12(pretrained: bool = False, **kwargs) -> RandFormer:
    """RandFormer-S12: 11.89M params + 0.24M frozen, 1.888 GMACs @224 (Table 3: 11.9M + 0.2M / 1.9G, 76.6%)."""
    return _create_baseline('randformer_s12', pretrained, **kwargs)


@register_model
def randformer_s24(pretrained: bool = False, **kwargs) -> RandFormer:
    """RandFormer-S24: 21.34M params + 0.47M frozen, 3.545 GMACs @224 (Table 3: 21.3M + 0.5M / 3.5G, 78.8%)."""
    return _create_baseline('randformer_s24', pretrained, **kwargs)


@register_model
def randformer_s36(pretrained: bool = False, **kwargs) -> RandFormer:
    """RandFormer-S36: 30.79M params + 0.71M frozen, 5.201 GMACs @224 (Table 3: 30.8M + 0.7M / 5.2G, 79.5%)."""
    return _create_baseline('randformer_s36', pretrained, **kwargs)


@register_model
def randformer_m36(pretrained: bool = False, **kwargs) -> RandFormer:
    """RandFormer-M36: 56.08M params + 0.71M frozen, 9.035 GMACs @224 (Table 3: 56.1M + 0.7M / 9.0G, 81.2%)."""
    return _create_baseline('randformer_m36', pretrained, **kwargs)


@register_model
def randformer_m48(pretrained: bool = False, **kwargs) -> RandFormer:
    """RandFormer-M48: 73.35M params + 0.94M frozen, 11.902 GMACs @224 (Table 3: 73.3M + 0.9M / 11.9G, 81.4%)."""
    return _create_baseline('randformer_m48', pretrained, **kwargs)


@register_model
def identityformer_s_iso(pretrained: bool = False, **kwargs) -> IsotropicMetaFormer:
    """Isotropic IdentityFormer-S (patch 16, depth 12, width 384, MLP ratio 6): 21.92M params,
    4.220 GMACs @224 (Table 4: 22M / 4.2G, 68.2%)."""
    return _create_baseline('identityformer_s_iso', pretrained, **kwargs)


@register_model
def identityformer_s_iso_convstem(pretrained: bool = False, **kwargs) -> IsotropicMetaFormer:
    """Isotropic IdentityFormer-S with the 4-layer conv stem (k7/3/3/3, stride 2 each, 48-96-192):
    22.51M params, 4.641 GMACs @224 (Table 4: 23M / 4.6G, 75.4%)."""
    return _create_baseline('identityformer_s_iso_convstem', pretrained, **kwargs)
