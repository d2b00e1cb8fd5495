"""Encrypted inference (CKKS) for fully polynomial PolyNeXt models.

  polynext fhe analyze cpolynext_t_bn                  # levels, rotations, keys, ranges, bootstraps, time / memory
  polynext fhe analyze runs/x/best.safetensors --json a.json --plot a.png
  polynext fhe demo                                    # 64 encrypted digits at 128-bit (SEAL), checked vs plaintext
  polynext fhe demo --images 32 --workers 2 --json demo.json
  polynext fhe demo --insecure-ring 8192               # a toy ring in seconds (NOT secure, printed as such)
  polynext fhe openfhe --setup                         # a Python 3.10 venv with openfhe (bootstrapping backend)
  polynext fhe moonshot                                # a deeper model with bootstrapping under OpenFHE
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='action', metavar='ACTION')
    sub.required = True
    a = sub.add_parser('analyze', help='per-layer depth, levels, rotations, ranges; ring, modulus, bootstraps, cost')
    a.add_argument('model', metavar='MODEL|CHECKPOINT', help='a registered bn model name, or a .safetensors file')
    a.add_argument('--img-size', type=int, default=None, help='input size (default: the model\'s)')
    a.add_argument('--num-classes', type=int, default=None)
    a.add_argument('--calib', type=int, default=8, metavar='N',
                   help='calibration images (digits for the demo model, else random normal images)')
    a.add_argument('--backend', default='seal', choices=['seal', 'openfhe'], help='leveled SEAL or OpenFHE')
    a.add_argument('--bootstrap', action='store_true', help='plan with bootstrapping even if a leveled ring fits')
    a.add_argument('--insecure-ring', type=int, default=None, metavar='N', help='a toy ring (NOT secure)')
    a.add_argument('--no-bench', action='store_true', help='estimate from stored per-op costs, no micro-benchmark')
    a.add_argument('--json', default=None, metavar='FILE', help='write the report as JSON')
    a.add_argument('--plot', default=None, metavar='FILE.png', help='depth and range by layer')
    a.add_argument('--rows', type=int, default=60, help='table rows to print (the JSON has all)')
    d = sub.add_parser('demo', help='encrypt test digits, classify under CKKS (128-bit, SEAL), compare with plaintext')
    d.add_argument('--images', type=int, default=64, help='test images (default 64)')
    d.add_argument('--weights', default=None, metavar='FILE', help='weights (default: the shipped demo model)')
    d.add_argument('--train', action='store_true', help='train the demo model first (polynext train recipe '
                                                         'cpolynext_fhe_digits, about 3 minutes)')
    d.add_argument('--workers', type=int, default=None,
                   help='processes evaluating ciphertexts in parallel (default: one per CPU core, at most one per '
                        'ciphertext)')
    d.add_argument('--insecure-ring', type=int, default=None, metavar='N', help='a toy ring (NOT secure)')
    d.add_argument('--json', default=None, metavar='FILE', help='write the results as JSON')
    d.add_argument('--no-progress', action='store_true')
    o = sub.add_parser('openfhe', help='the OpenFHE (bootstrapping) backend: find or set up its Python 3.10 venv')
    o.add_argument('--setup', action='store_true', help='create the venv with openfhe (needs Python 3.10)')
    m = sub.add_parser('moonshot', help='a deeper multi-stage PolyNeXt with bootstrapping under OpenFHE')
    m.add_argument('--images', type=int, default=4)
    m.add_argument('--insecure-ring', type=int, default=None, metavar='N', help='a toy ring (NOT secure)')
    m.add_argument('--json', default=None, metavar='FILE')


def run(args: argparse.Namespace) -> int:
    return {'analyze': _analyze, 'demo': _demo, 'openfhe': _openfhe, 'moonshot': _moonshot}[args.action](args)


def _analyze(args) -> int:
    import numpy as np
    from ..errors import ConfigError
    from ..fhe.analyze import analyze, calibrate_norms, format_report, plot_report, write_json
    from ..models.folded import fold_for_inference
    src = args.model
    path = Path(src)
    calibrated_norms = False
    if path.suffix in ('.safetensors', '.pt', '.pth') or path.is_file():
        if not path.is_file():
            raise ConfigError(f'checkpoint not found: {path}')
        from ..fhe.demo import load_demo_model
        model, meta = load_demo_model(str(path))
        name = f"{meta.get('architecture')} ({path.name})"
    else:
        from ..factory import create_model
        kw = {}
        if args.img_size:
            kw['img_size'] = args.img_size
        if args.num_classes:
            kw['num_classes'] = args.num_classes
        model = create_model(src, **kw).eval()
        name = src
    img = tuple(model.img_size)
    rng = np.random.default_rng(0)
    if img == (8, 8):
        from ..fhe.demo import digits_arrays
        xtr = digits_arrays(8, (0.5,) * 3, (0.5,) * 3)[0]
        calib = xtr[:args.calib]
    else:
        calib = rng.standard_normal((args.calib, model.in_chans) + img).astype(np.float32)
        if not path.is_file():
            calibrate_norms(model, calib)      # random weights: norm statistics from the calibration images
            calibrated_norms = True
    folded = fold_for_inference(model.double() if img == (8, 8) else model)
    rep = analyze(folded, calib, backend=args.backend, bench=not args.no_bench, insecure_ring=args.insecure_ring,
                  bootstrap=True if args.bootstrap else None, name=name)
    rep['norm_statistics'] = 'from the calibration images (untrained weights)' if calibrated_norms else 'trained'
    print(format_report(rep, args.rows))
    if args.json:
        write_json(rep, Path(args.json))
        print(f'wrote {args.json}')
    if args.plot:
        plot_report(rep, Path(args.plot))
        print(f'wrote {args.plot}')
    return 0


def _demo(args) -> int:
    from ..fhe.analyze import write_json
    from ..fhe.demo import format_demo, run_demo
    res = run_demo(n_images=args.images, weights=args.weights, train=args.train, workers=args.workers,
                   insecure_ring=args.insecure_ring, show_progress=not args.no_progress)
    print(format_demo(res))
    if args.json:
        write_json(res, Path(args.json))
        print(f'wrote {args.json}')
    return 0 if res['argmax_agreement'] == 1.0 else 1


def _openfhe(args) -> int:
    from ..fhe.openfhe_backend import find_openfhe_python, setup_openfhe
    if args.setup:
        py = setup_openfhe(log=print)
        print(f'openfhe ready: {py}')
        return 0
    py = find_openfhe_python()
    if py is None:
        print('openfhe: not found. `polynext fhe openfhe --setup` creates a Python 3.10 venv with it '
              '(or set POLYNEXT_OPENFHE_PYTHON to a Python that imports openfhe).')
        return 1
    print(f'openfhe: {py}')
    return 0


def _moonshot(args) -> int:
    from ..fhe.analyze import write_json
    from ..fhe.moonshot import format_moonshot, run_moonshot
    res = run_moonshot(n_images=args.images, insecure_ring=args.insecure_ring)
    print(format_moonshot(res))
    if args.json:
        write_json(res, Path(args.json))
        print(f'wrote {args.json}')
    return 0
