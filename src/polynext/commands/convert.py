"""Convert a checkpoint to polynext's own format (safetensors + metadata).

Accepts the authors' released PolyNeXt ``.pt`` files (reference key names) and, for the
MetaFormer baselines (IdentityFormer, RandFormer, PoolFormerV2, ConvFormer, CAFormer), the
authors' sail-sg ``.pth`` files, with the usual wrappers (``state_dict``, ``model``, EMA
entries, ``module.``). The model is inferred from the file when only one fits; IdentityFormer
and PoolFormerV2 files are identical in shape (pooling has no weights), so those need ``--model``. Loading is strict: a file that does not match the
model is refused with the first bad key named. The result loads with
``polynext.create_model(NAME, checkpoint=OUT)`` or timm's
``create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=OUT))``.

A polynext checkpoint (a run's ``.safetensors`` or ``.state.pt``) keeps its metadata: the model and
its arguments, the classes, the eval transform, the recipe and the epoch, so that ``polynext validate``
on the converted file measures what it measured on the original. The output is never the input.

Examples:
  polynext convert cpolynext_s.pt cpolynext_s.safetensors --model cpolynext_s
  polynext convert cpolynext_lr_tiny_imagenet.pt lr_tiny.safetensors     # model inferred
  polynext convert caformer_s18.pth caformer_s18.safetensors              # sail-sg file, model inferred
  polynext convert identityformer_s12.pth idf_s12.safetensors --model identityformer_s12
  polynext convert convformer_s18_384.pth cf_s18_384.safetensors --model convformer_s18.sail_in1k_384
  polynext convert narrow_cf.pth narrow_cf.safetensors --model convformer_s18 --model-kwargs '{dims: [32, 64, 128, 256]}'
  polynext convert runs/cpolynext_lr_digits/last.state.pt digits.safetensors   # a training state's weights
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
    parser.add_argument('--model-kwargs', default=None, metavar='YAML',
                        help="other model arguments, e.g. '{dims: [32, 64, 128, 256]}' for a narrow MetaFormer")


def run(args: argparse.Namespace) -> int:
    import os

    import yaml
    from ..checkpoint import save_safetensors, unwrap_state_dict
    from ..errors import ConfigError
    from ..factory import create_model
    from ..models.metaformer_baselines import match_checkpoint
    from ..models.polynext import infer_reference_arch
    from ..outputs import OutputError, check_output_file, free_space_problem
    from ..profile import count_params
    from ..train.validate import read_weights_and_metadata

    # every check before the (possibly large) input is read, and nothing written before the model loads
    if args.output.suffix != '.safetensors':
        raise ConfigError(f'output must end in .safetensors (got {args.output}); name it '
                          f'{args.output.with_suffix(".safetensors")}')
    if args.output.resolve() == args.input.resolve() or (
            args.output.exists() and args.input.exists() and os.path.samefile(args.output, args.input)):
        raise ConfigError(f'the output {args.output} is the input file; pass another output path (convert never '
                          f'overwrites its input)')
    check_output_file(args.output, 'output')
    extra = {}
    if args.model_kwargs:
        try:
            extra = yaml.safe_load(args.model_kwargs)
        except yaml.YAMLError:
            extra = None
        if not isinstance(extra, dict):
            raise ConfigError(f"--model-kwargs must be a mapping like '{{dims: [32, 64, 128, 256]}}', got "
                              f"{args.model_kwargs!r}")
    obj, meta = read_weights_and_metadata(args.input, prefer_ema=not args.no_ema)
    sd = unwrap_state_dict(obj, prefer_ema=not args.no_ema)
    name = args.model or meta.get('architecture')
    if args.model and meta.get('architecture') and args.model.split('.')[0] != str(meta['architecture']).split('.')[0]:
        meta = {}           # another model than the file says: its metadata does not apply
    kwargs = dict(meta.get('model_kwargs') or {})
    note = None
    guess = infer_reference_arch(sd) if not meta else None
    if name is None and guess is not None:
        name = guess['name']
        note = f"inferred model: {name} (init_channels={guess['init_channels']})"
    elif name is None:
        fits = match_checkpoint(sd)
        if len(fits) != 1:
            which = f"it fits {' and '.join(fits)}" if fits else 'it fits no model polynext offers'
            raise ConfigError(f'cannot infer the model from this checkpoint ({which}); pass --model NAME')
        name = fits[0]
        note = f'inferred model: {name}'
    if args.init_channels is not None:
        kwargs['init_channels'] = args.init_channels
    elif guess is not None and name.startswith(('cpolynext', 'apolynext')):
        kwargs['init_channels'] = guess['init_channels']
    if args.img_size is not None:
        kwargs['img_size'] = args.img_size
    kwargs.update(extra)
    model = create_model(name, checkpoint=sd, **kwargs)
    out_meta = dict(meta)
    out_meta.update(format='polynext', architecture=name, num_classes=getattr(model, 'num_classes', None),
                    model_kwargs=kwargs, source=args.input.name)
    state = model.state_dict()
    problem = free_space_problem(args.output, sum(t.numel() * t.element_size() for t in state.values()))
    if problem is not None:
        raise OutputError(f'not enough disk space for {args.output}: {problem}; free some space or pass an output '
                          f'path on another disk')
    save_safetensors(state, args.output, metadata=out_meta)
    if note:
        print(note)
    kept = [k for k in ('classes', 'eval', 'recipe', 'epoch') if k in meta]
    print(f'wrote {args.output} ({name}, {count_params(model):,} parameters, '
          f'{len(model.state_dict())} tensors, num_classes={out_meta["num_classes"]}'
          + (f'; kept {", ".join(kept)}' if kept else '') + ')')
    return 0
