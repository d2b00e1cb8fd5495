"""bf16 against fp32 at CPU inference: how far a polynomial network's logits move under bf16 autocast.

Two measurements, each the model under ``torch.autocast('cpu', dtype=torch.bfloat16)`` against the
same model in fp32 (both eval mode, channels-last):

* the golden inputs: every golden set of ``tests/golden`` (the authors' weights of each published
  kind at base width 16, their input batch), max |Δ logit|, max |logit| and argmax agreement;
* the digits demo's validation set: ``polynext validate --dtype bf16`` on a digits demo checkpoint
  (``--digits-checkpoint``; by default the demo is trained first into a temporary folder, about 2
  minutes on 2 cores).

A polynomial of degree 2^depth can amplify rounding; bf16 keeps 8 bits of mantissa (relative
rounding 2^-9 ≈ 2e-3 per op). Prints a table and writes JSON.

    python benchmarks/bf16_agreement.py --json benchmarks/results/bf16_agreement.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def golden_rows():
    import timm
    from safetensors.torch import load_file
    from polynext import load_reference_state_dict
    sys.path.insert(0, str(ROOT / 'tests'))
    from conftest import GOLDEN, GOLDEN_MODELS
    rows = []
    for folder, (name, extra) in GOLDEN_MODELS.items():
        d = GOLDEN / folder
        model = timm.create_model(name, init_channels=16, num_classes=10, **extra)
        load_reference_state_dict(model, load_file(str(d / 'state_dict.safetensors')))
        model.eval().to(memory_format=torch.channels_last)
        x = load_file(str(d / 'input.safetensors'))['x'].contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ref = model(x).float()
            with torch.autocast('cpu', dtype=torch.bfloat16):
                low = model(x).float()
        rows.append(dict(set=f'golden {folder}', model=name, images=len(x),
                         max_abs_logit=float(ref.abs().max()), max_abs_logit_diff=float((low - ref).abs().max()),
                         argmax_agreement=100.0 * float((low.argmax(1) == ref.argmax(1)).float().mean())))
    return rows


def digits_row(checkpoint: str | None):
    from polynext.train.validate import validate_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint is None:
            from polynext.train import train
            from polynext.train.recipes import DEFAULT_RECIPE, PRESETS
            cfg = PRESETS.get(DEFAULT_RECIPE).config
            import dataclasses
            cfg = dataclasses.replace(cfg, output=str(Path(tmp) / 'demo'))
            print('training the digits demo for its checkpoint ...', flush=True)
            train(cfg, DEFAULT_RECIPE, show_progress=False, quiet=True)
            checkpoint = str(Path(tmp) / 'demo' / 'best.safetensors')
        res = validate_checkpoint(checkpoint, dataset='digits', dtype='bf16', output=Path(tmp) / 'val', workers=0)
    r = res.result
    return dict(set='digits demo validation', model=r['model'], images=r['images'], max_abs_logit=None,
                max_abs_logit_diff=r['vs_fp32']['max_abs_logit_diff'], argmax_agreement=r['vs_fp32']['argmax_agreement'],
                top1_bf16=r['top1'])


def main(argv=None) -> int:
    import polynext  # noqa: F401  (registers the models)
    from polynext.bench import environment, write_report
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--digits-checkpoint', default=None, metavar='PATH',
                        help='a digits demo checkpoint (default: train the demo first)')
    parser.add_argument('--no-digits', action='store_true', help='the golden inputs only')
    parser.add_argument('--json', default=None, metavar='PATH')
    args = parser.parse_args(argv)
    if args.json and Path(args.json).is_dir():
        parser.error(f'--json {args.json} is a folder; give a file path such as {args.json}/bf16.json')
    rows = golden_rows()
    if not args.no_digits:
        rows.append(digits_row(args.digits_checkpoint))
    print(f"{'set':34s} {'model':16s} {'images':>6s} {'max|logit|':>10s} {'max|Δ logit|':>12s} {'argmax agree':>12s}")
    for r in rows:
        ml = '' if r['max_abs_logit'] is None else f"{r['max_abs_logit']:.3g}"
        print(f"{r['set']:34s} {r['model']:16s} {r['images']:6d} {ml:>10s} {r['max_abs_logit_diff']:12.3g} "
              f"{r['argmax_agreement']:11.2f}%")
    out = dict(environment=environment(torch.device('cpu')), rows=rows)
    write_report(args.json, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
