"""Export a model for deployment: ONNX, a torch.export program (.pt2), or a Hugging Face Hub folder.

  polynext export cpolynext_s model.onnx --checkpoint cpolynext_s.pt          # the authors' weights
  polynext export runs/cpolynext_lr_digits/best.safetensors digits.onnx       # a polynext checkpoint
  polynext export cpolynext_t_bn t_bn.onnx --fold --report --polynomial-only  # folded, op set checked
  polynext export apolynext_t model.pt2                                        # torch.export program
  polynext export convformer_s18 hub/convformer_s18 --format hub --checkpoint convformer_s18.pth

MODEL is a model name (random weights unless --checkpoint or --pretrained) or a checkpoint file
(polynext .safetensors / .state.pt, the authors' .pt / .pth), whose metadata names the model. The
format comes from --format or OUTPUT's suffix (.onnx, .pt2). Every export is checked before it
is kept: ONNX Runtime (or the loaded program, or the model rebuilt from the Hub folder) against
the eager model on random inputs; the differences are printed and must stay within --atol
(1e-4). Files are written under a temporary name and renamed after the checks, so a failed
export writes nothing. The batch is dynamic; height and width too where the model allows it
(the bn variants and RandFormer are fixed to the size they were built for, and say so).
--fold exports polynext.fold_for_inference(model) (PolyNeXt only). --report prints the
graph's operator histogram and its non-polynomial nodes; --polynomial-only refuses a graph that
has one, naming the first.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FORMATS = ('onnx', 'torch-export', 'hub')
_SUFFIXES = {'.onnx': 'onnx', '.pt2': 'torch-export'}
_CHECKPOINT_SUFFIXES = ('.safetensors', '.pt', '.pth', '.tar', '.bin')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('model', metavar='MODEL', help='a model name, or a checkpoint file whose metadata names it')
    parser.add_argument('output', metavar='OUTPUT', help='the .onnx / .pt2 file, or the Hub folder')
    parser.add_argument('--format', default=None, metavar='FORMAT',
                        help="onnx, torch-export or hub (default: from OUTPUT's suffix: .onnx, .pt2)")
    parser.add_argument('--checkpoint', default=None, metavar='PATH', help='weights for a MODEL given by name')
    parser.add_argument('--pretrained', action='store_true', help="timm's pretrained weights of MODEL (downloaded)")
    parser.add_argument('--model-kwargs', default=None, metavar='YAML',
                        help="extra model arguments, e.g. '{init_channels: 16}'")
    parser.add_argument('--no-ema', action='store_true', help='take the raw weights even if an EMA entry exists')
    parser.add_argument('--fold', action='store_true', help='export polynext.fold_for_inference(model) (PolyNeXt)')
    parser.add_argument('--fold-flip', default='weights', choices=('weights', 'channels'),
                        help="PolyConv's channel flip: folded into the weights (default) or kept as a data copy")
    parser.add_argument('--img-size', type=int, default=None,
                        help='traced input size (default: the model\'s); fixed-size models only take their own')
    parser.add_argument('--opset', type=int, default=None, help="ONNX opset (default: torch's)")
    parser.add_argument('--report', action='store_true', help='print the ONNX operator histogram and flag '
                                                              'non-polynomial operators')
    parser.add_argument('--polynomial-only', action='store_true',
                        help='refuse a graph with a non-polynomial operator (implies --report)')
    parser.add_argument('--atol', type=float, default=1e-4, help='largest accepted |Δ logit| of the check')
    parser.add_argument('--no-check', action='store_true', help='skip the runtime-vs-eager check')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing Hub folder')
    parser.add_argument('--json', default=None, metavar='PATH', help='also write the result (and report) as JSON')


def _format(args) -> str:
    from ..errors import ConfigError
    out = Path(args.output)
    if args.format is not None:
        fmt = args.format.lower()
        if fmt not in FORMATS:
            raise ConfigError(f"unknown format '{args.format}'; use --format onnx, torch-export or hub")
        suffix_fmt = _SUFFIXES.get(out.suffix)
        if fmt == 'hub' and suffix_fmt or fmt != 'hub' and suffix_fmt and suffix_fmt != fmt:
            raise ConfigError(f"OUTPUT {out} has the suffix of the {suffix_fmt} format but --format is {fmt}; "
                              f"name it {out.with_suffix({'onnx': '.onnx', 'torch-export': '.pt2'}.get(fmt, ''))}")
        return fmt
    if out.suffix in _SUFFIXES:
        return _SUFFIXES[out.suffix]
    raise ConfigError(f"cannot tell the format from OUTPUT '{out}'; name it .onnx or .pt2, or pass --format onnx, "
                      f"torch-export or hub")


def _load(args):
    """(model, architecture, constructor kwargs, checkpoint metadata)."""
    import yaml

    from ..checkpoint import read_checkpoint, read_safetensors_metadata, unwrap_state_dict
    from ..errors import ConfigError
    from ..factory import check_model_name, create_model
    source = Path(args.model)
    ckpt = args.checkpoint
    name, meta = None, {}
    if source.suffix in _CHECKPOINT_SUFFIXES or source.exists():
        if ckpt:
            raise ConfigError('MODEL is a checkpoint file already; drop --checkpoint (or give MODEL as a name)')
        ckpt = str(source)
    else:
        name = check_model_name(args.model)
    kwargs = {}
    obj = None
    if ckpt:
        meta = read_safetensors_metadata(ckpt)
        obj = read_checkpoint(ckpt)
        if isinstance(obj, dict) and str(obj.get('format', '')).startswith('polynext.train') and \
                isinstance(obj.get('config'), dict):
            meta = dict(architecture=obj['config'].get('model'), model_kwargs=obj['config'].get('model_kwargs'),
                        classes=obj.get('classes'))
            use_ema = not args.no_ema and obj.get('ema_updates') and obj.get('ema_state') is not None
            obj = obj['ema_state'] if use_ema else obj['model']
        if name is None:
            name = meta.get('architecture')
            if not name:
                raise ConfigError(f'{ckpt} does not say which model it holds; pass the name: polynext export NAME '
                                  f'{args.output} --checkpoint {ckpt}')
        if name == meta.get('architecture'):
            kwargs.update(meta.get('model_kwargs') or {})
        else:
            meta = {}
    if args.model_kwargs:
        extra = yaml.safe_load(args.model_kwargs)
        if not isinstance(extra, dict):
            raise ConfigError(f"--model-kwargs must be a mapping like '{{init_channels: 16}}', got {args.model_kwargs!r}")
        kwargs.update(extra)
    if obj is not None:
        model = create_model(name, checkpoint=unwrap_state_dict(obj, prefer_ema=not args.no_ema), **kwargs)
    else:
        model = create_model(name, pretrained=args.pretrained, **kwargs)
    return model.eval(), name.split('.')[0], kwargs, meta, bool(ckpt or args.pretrained)


def run(args: argparse.Namespace) -> int:
    from ..deploy.export import export_metadata, export_onnx, export_program, input_spec
    from ..errors import ConfigError
    fmt = _format(args)
    out = Path(args.output)
    if fmt != 'hub' and out.is_dir():
        raise ConfigError(f'OUTPUT {out} is a folder; give a file name such as {out / "model.onnx"}')
    if (args.report or args.polynomial_only) and fmt != 'onnx':
        raise ConfigError('--report / --polynomial-only read an ONNX graph; use --format onnx')
    if fmt == 'hub' and (args.fold or args.img_size):
        raise ConfigError('the Hub format stores the model timm builds: drop --fold / --img-size (fold after '
                          'loading with polynext.fold_for_inference)')
    if fmt == 'hub' and out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f'{out} exists and is not empty; choose a new folder or pass --overwrite')

    model, arch, kwargs, meta, has_weights = _load(args)
    if not has_weights:
        print(f'note: {arch} has random weights (pass --checkpoint PATH or --pretrained to export trained ones)')

    if fmt == 'hub':
        from ..deploy.hub import save_pretrained
        classes = meta.get('classes') if isinstance(meta.get('classes'), list) else None
        path = save_pretrained(model, out, classes=classes, check=not args.no_check, overwrite=args.overwrite)
        print(f'wrote {path}/ (config.json, model.safetensors, README.md); rebuilt with timm from the folder: '
              f'equal logits')
        print(f'load it with: import polynext, timm; timm.create_model("local-dir:{path}", pretrained=True); '
              f'upload it with: polynext push {path} USER/NAME')
        return 0

    folded = ''
    if args.fold:
        from ..models.folded import fold_for_inference
        model = fold_for_inference(model, flip=args.fold_flip)
        folded = args.fold_flip
    spec = input_spec(model, args.img_size, name=arch)
    metadata = export_metadata(model, arch, kwargs, meta, folded=folded)
    what = f"{arch}{' (folded)' if folded else ''}"
    print(f'exporting {what} to {out} ({fmt}); {spec.describe()}', flush=True)
    if fmt == 'onnx':
        result = export_onnx(model, out, spec=spec, metadata=metadata, opset=args.opset, check=not args.no_check,
                             atol=args.atol, report=args.report or args.polynomial_only,
                             polynomial_only=args.polynomial_only)
        runtime = 'ONNX Runtime'
    else:
        result = export_program(model, out, spec=spec, metadata=metadata, check=not args.no_check, atol=args.atol)
        runtime = 'exported program'
    for line in result.parity_lines(runtime):
        print(line)
    if result.report is not None:
        print(result.report.table())
        print(result.report.summary())
    size = out.stat().st_size / 2 ** 20
    print(f'wrote {out} ({size:,.1f} MiB) in {result.seconds:.1f} s')
    if args.json:
        from ..checkpoint import atomic_write
        data = dict(output=str(out), format=fmt, architecture=arch, model_args=metadata['model_args'],
                    folded=folded, input=spec.to_dict(), max_abs_diff=result.max_abs_diff,
                    checks=[vars(c) for c in result.checks], seconds=result.seconds,
                    report=None if result.report is None else result.report.to_dict(),
                    command=['polynext', 'export'] + sys.argv[2:] if sys.argv[1:2] == ['export'] else None)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + '\n'))
        print(f'wrote {args.json}')
    return 0
