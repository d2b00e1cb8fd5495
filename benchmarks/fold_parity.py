"""Logits of polynext.fold_for_inference(model) against the model, every registered PolyNeXt, full size.

For each published configuration at its own input size (224; cpolynext_lr at 32), with the
published initialisation (the bn variants' running statistics from one train-mode pass over
``--calib`` random images, momentum 1): the largest |Δ logit| between the folded model and the
model in fp32, for both ways of folding PolyConv's channel flip, and the parameter and MAC counts
of the three. Also the fp32 model against itself in float64 for the T models (the rounding noise
the fold is compared with).

  python benchmarks/fold_parity.py                      # all 12, writes benchmarks/results/fold_parity.json
  python benchmarks/fold_parity.py --models cpolynext_t cpolynext_t_bn --no-float64
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

try:
    import polynext  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'src'))

import timm
import torch

import polynext
from polynext.models import PUBLISHED_ARCHS
from polynext.models.polynext import calibrate_running_stats
from polynext.profile import count_macs



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(PUBLISHED_ARCHS))
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--calib', type=int, default=8, help='images for the bn running statistics')
    parser.add_argument('--no-float64', action='store_true', help='skip the float64 reference of the T models')
    parser.add_argument('--json', default=str(Path(__file__).parent / 'results' / 'fold_parity.json'))
    args = parser.parse_args()
    rows = []
    print(f"{'model':<16} {'|Δ| fold':>9} {'|Δ| fold-ch':>11} {'|Δ| fp32-f64':>12} {'max|logit|':>10} "
          f"{'params':>11} {'+ fold':>9} {'GMACs':>7} {'+ fold':>7}")
    for name in args.models:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        size = model.img_size
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(max(args.batch, args.calib), 3, *size, generator=gen)
        if model.norm_kind == 'bn':
            calibrate_running_stats(model, x)
        x = x[:args.batch]
        folded = polynext.fold_for_inference(model)
        folded_ch = polynext.fold_for_inference(model, flip='channels')
        with torch.no_grad():
            ref = model(x)
            d_w = float((folded(x) - ref).abs().max())
            d_c = float((folded_ch(x) - ref).abs().max())
            d_64 = None
            if not args.no_float64 and name.endswith(('_t', '_t_bn', '_lr')):
                d_64 = float((copy.deepcopy(model).double()(x.double()) - ref.double()).abs().max())
        params = [sum(p.numel() for p in m.parameters()) for m in (model, folded, folded_ch)]
        macs = [count_macs(m, input_size=size) for m in (model, folded, folded_ch)]
        row = dict(model=name, img_size=list(size), max_abs_diff_fold=d_w, max_abs_diff_fold_channels=d_c,
                   max_abs_diff_fp32_vs_float64=d_64, max_abs_logit=float(ref.abs().max()), params=params[0],
                   params_fold=params[1], params_fold_channels=params[2], macs=macs[0], macs_fold=macs[1],
                   macs_fold_channels=macs[2], seconds=time.perf_counter() - t0)
        rows.append(row)
        f64 = '-' if d_64 is None else f'{d_64:.1e}'
        print(f'{name:<16} {d_w:>9.1e} {d_c:>11.1e} {f64:>12} {row["max_abs_logit"]:>10.3f} {params[0]:>11,} '
              f'{params[1] - params[0]:>+9,} {macs[0] / 1e9:>7.3f} {(macs[1] - macs[0]) / 1e9:>+7.3f}', flush=True)
    out = dict(command=['python', 'benchmarks/fold_parity.py'] + sys.argv[1:], torch=torch.__version__,
               timm=timm.__version__, python=platform.python_version(), batch=args.batch, calib=args.calib,
               rows=rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + '\n')
    print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
