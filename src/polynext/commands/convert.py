"""Convert a checkpoint to polynext's own format (safetensors + metadata).

Accepts the authors' released PolyNeXt ``.pt`` files (reference key names) and, for the
MetaFormer baselines (IdentityFormer, RandFormer, PoolFormerV2, ConvFormer, CAFormer), the
authors' sail-sg ``.pth`` files, with the usual wrappers (``state_dict``, ``model``, EMA
entries, ``module.``). The model is inferred from the file when only one fits; IdentityFormer
and PoolFormerV2 files are identical in shape (pooling has no weights), so those need ``--model``. Loading is strict: a file that does not match the
model is refused with the first bad key named. The result loads with
``polynext.create_model(NAME, checkpoint=OUT)`` or timm's
``create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=OUT))``.

Examples:
  polynext convert cpolynext_s.pt cpolynext_s.safetensors --model cpolynext_s
  polynext convert cpolynext_lr_tiny_imagenet.pt lr_tiny.safetensors     # model inferred
  polynext convert caformer_s18.pth caformer_s18.safetensors              # sail-sg file, model inferred
  polynext convert identityformer_s12.pth idf_s12.safetensors --model identityformer_s12
  polynext convert convformer_s18_384.pth cf_s18_384.safetensors --model convformer_s18.sail_in1k_384
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('input', type=Path, help='checkpoint to convert (.pt / .pth / .safetensors)')
    parser.add_argument('output', type=Path, help='output file (.safetensors)')
    parser.add_argument('--model', default=None,
                        help='model name, e.g. cpolynext_s (inferred for authors\' PolyNeXt files when omitted)')
    parser.add_argument('--init-channels', type=int, default=None,
                        help='PolyNeXt base width C0 when it differs from the published one')
    parser.add_argument('--img-size', type=int, default=None,
                        help='input size of a bn (fully polynomial) model or of a RandFormer (matrices resampled)')
    parser.add_argument('--no-ema', action='store_true', help='take the raw weights even if an EMA entry exists')


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import read_checkpoint, save_safetensors, unwrap_state_dict
    from ..errors import ConfigError
    from ..factory import create_model
    from ..models.metaformer_baselines import match_checkpoint
    from ..models.polynext import infer_reference_arch
    from ..profile import count_params

    if args.output.suffix != '.safetensors':
        raise ConfigError(f'output must end in .safetensors (got {args.output})')
    obj = read_checkpoint(args.input)
    sd = unwrap_state_dict(obj, prefer_ema=not args.no_ema)
    name = args.model
    kwargs = {}
    guess = infer_reference_arch(sd)
    if name is None and guess is not None:
        name = guess['name']
        print(f"inferred model: {name} (init_channels={guess['init_channels']})")
    elif name is None:
        fits = match_checkpoint(sd)
        if len(fits) != 1:
            which = f"it fits {' and '.join(fits)}" if fits else 'it fits no model polynext offers'
            raise ConfigError(f'cannot infer the model from this checkpoint ({which}); pass --model NAME')
        name = fits[0]
        print(f'inferred model: {name}')
    if args.init_channels is not None:
        kwargs['init_channels'] = args.init_channels
    elif guess is not None and name.startswith(('cpolynext', 'apolynext')):
        kwargs['init_channels'] = guess['init_channels']
    if args.img_size is not None:
        kwargs['img_size'] = args.img_size
    model = create_model(name, checkpoint=sd, **kwargs)
    meta = {
        'format': 'polynext', 'architecture': name, 'num_classes': getattr(model, 'num_classes', None),
        'source': args.input.name, 'model_kwargs': kwargs,
    }
    save_safetensors(model.state_dict(), args.output, metadata=meta)
    print(f'wrote {args.output} ({name}, {count_params(model):,} parameters, '
          f'{len(model.state_dict())} tensors, num_classes={meta["num_classes"]})')
    return 0
