"""`polynext export` at full size: parity of ONNX Runtime / torch.export against eager, and the op-set reports.

Each model is built at its published size with the published initialisation (bn variants: running
statistics from one train-mode pass over 16 random images, momentum 1), saved as a polynext
checkpoint, and exported with the command line, exactly as a user would:

  polynext export CKPT OUT.onnx [--fold] [--report | --polynomial-only] --json OUT.json

The table lists the export, its input (dynamic or fixed), the largest |Δ logit| of the check, the
report's verdict, the operators and the product depth. JSON: benchmarks/results/export_checks.json.

  python benchmarks/export_checks.py
  python benchmarks/export_checks.py --only cpolynext_t_bn_fold
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

try:
    import polynext  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'src'))

import timm
import torch

import polynext
from polynext.checkpoint import save_safetensors
from polynext.cli import main as cli
from polynext.models.polynext import calibrate_running_stats

#: label -> (model, export arguments after the checkpoint, output suffix)
EXPORTS = {
    'cpolynext_t_bn_fold': ('cpolynext_t_bn', ['--fold', '--polynomial-only'], '.onnx'),
    'apolynext_t_bn': ('apolynext_t_bn', ['--report'], '.onnx'),
    'apolynext_t_bn_fold': ('apolynext_t_bn', ['--fold', '--polynomial-only'], '.onnx'),
    'cpolynext_t': ('cpolynext_t', ['--report'], '.onnx'),
    'convformer_s18': ('convformer_s18', ['--report'], '.onnx'),
    'caformer_s18': ('caformer_s18', ['--report'], '.onnx'),
    'apolynext_t_program': ('apolynext_t', [], '.pt2'),
}


def checkpoint(name: str, folder: Path) -> Path:
    path = folder / f'{name}.safetensors'
    if path.exists():
        return path
    torch.manual_seed(0)
    model = polynext.create_model(name)
    if getattr(model, 'norm_kind', '') == 'bn':
        calibrate_running_stats(model, torch.randn(16, 3, *model.img_size, generator=torch.Generator().manual_seed(0)))
    save_safetensors(model.state_dict(), path, metadata=dict(architecture=name, model_kwargs={}))
    return path


def save(path: str, results: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path + '.tmp')
    tmp.write_text(json.dumps(dict(torch=torch.__version__, timm=timm.__version__, cpu=platform.processor() or
                                   platform.machine(), results=results), indent=1) + '\n')
    tmp.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', nargs='+', default=list(EXPORTS), choices=list(EXPORTS))
    parser.add_argument('--json', default=str(Path(__file__).parent / 'results' / 'export_checks.json'))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix='polynext-export-checks-') as tmp:
        tmp = Path(tmp)
        for label in args.only:
            name, extra, suffix = EXPORTS[label]
            ckpt = checkpoint(name, tmp)
            out = tmp / f'{label}{suffix}'
            argv = ['export', str(ckpt), str(out), *extra, '--json', str(out) + '.json']
            t0 = time.perf_counter()
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                code = cli(argv)
            print(buf.getvalue(), end='', flush=True)
            if code != 0:
                results[label] = dict(command=['polynext'] + argv, exit_code=code)
                save(args.json, results)
                continue
            res = json.loads(Path(str(out) + '.json').read_text())
            res.update(command=['polynext', *argv[:1], f'{name}.safetensors', out.name, *extra],
                       wall_seconds=time.perf_counter() - t0, file_mib=out.stat().st_size / 2 ** 20)
            results[label] = res
            save(args.json, results)
    save(args.json, results)
    rows = []
    for label, r in results.items():
        if 'exit_code' in r:
            rows.append(f'| {label} | failed ({r["exit_code"]}) | | | | |')
            continue
        rep = r.get('report') or {}
        verdict = '' if not rep else ('polynomial' if rep['polynomial'] else
                                      f"not polynomial ({rep['non_polynomial'][0]['op_type']})")
        ops = ', '.join(f'{k} {v}' for k, v in sorted(rep.get('histogram', {}).items(), key=lambda kv: -kv[1]))
        size = 'dynamic' if r['input']['dynamic_size'] else f"fixed {r['input']['height']}"
        rows.append(f"| {label} | {r['format']} | {size} | {r['max_abs_diff']:.1e} | {verdict} | "
                    f"{rep.get('product_depth') if rep else ''} | {ops} |")
    print('| export | format | input size | max \\|Δ logit\\| | report | product depth | operators |')
    print('|---|---|---|---|---|---|---|')
    print('\n'.join(rows))
    print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
