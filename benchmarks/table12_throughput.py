"""MetaFormer paper, Table 12: inference throughput of ConvFormer/CAFormer S18-B36, against PolyNeXt T/S/B/L.

The paper measures img/s at batch 128, 224 px, TF32, on an NVIDIA A100, "replacing StarReLU in
ConvFormer and CAFormer with GELU for fair comparison". This script does the same by default
(``--starrelu`` keeps the released activation) and prints the paper's numbers beside ours: the
A100 img/s and, more comparable across machines, the paper's ratio to ConvFormer-S18 next to ours.
The PolyNeXt paper reports no throughput, so those cells are 'n/a'; its params/MACs are taken
from the paper where it gives them.

All models run interleaved in one process (``polynext.bench.run_bench``; order reversed on
alternate rounds), medians of ``--runs`` batches after ``--warmup``; the glibc allocator is pinned
(the script re-runs itself with GLIBC_TUNABLES set). Peak memory is off by default here (on CPU it
repeats each model's warm-up in a fresh process); ``--memory`` turns it on.

  python benchmarks/table12_throughput.py --device cuda                       # the paper's setting
  python benchmarks/table12_throughput.py --batch-size 32 --runs 5 \\
      --models convformer_s18 caformer_s18 cpolynext_t cpolynext_s apolynext_t apolynext_s   # 2-core CPU
  python benchmarks/table12_throughput.py --quick                             # smoke test, seconds

On a 2-core CPU the full table at batch 128 takes hours (a B36 batch is ~20 s); use a subset or a
smaller batch. Writes benchmarks/results/table12_throughput.json (or --json PATH).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

try:
    import polynext  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'src'))

import torch.nn as nn

from polynext.bench import (BenchSettings, ModelSpec, busy_machine_warning, ensure_pinned_allocator, format_table,
                            run_bench)
from polynext.errors import PolyNeXtError

RESULTS = Path(__file__).resolve().parent / 'results'

#: (params M, MACs G, top-1 %, A100 img/s at batch 128 TF32); None where the paper gives nothing
PaperRow = Tuple[Optional[float], Optional[float], Optional[float], Optional[float]]

#: MetaFormer paper, Table 12
PAPER_METAFORMER: Dict[str, PaperRow] = {
    'convformer_s18': (27, 3.9, 83.0, 2213),
    'caformer_s18': (26, 4.1, 83.6, 2093),
    'convformer_s36': (40, 7.6, 84.1, 1205),
    'caformer_s36': (39, 8.0, 84.5, 1138),
    'convformer_m36': (57, 12.8, 84.5, 899),
    'caformer_m36': (56, 13.2, 85.2, 852),
    'convformer_b36': (100, 22.6, 84.8, 677),
    'caformer_b36': (99, 23.2, 85.5, 644),
}
#: PolyNeXt paper (main table and ablation baselines); it reports no throughput
PAPER_POLYNEXT: Dict[str, PaperRow] = {
    'cpolynext_t': (6.4, 1.2, 80.2, None),
    'cpolynext_s': (26, 4.8, 83.9, None),
    'cpolynext_b': (40, 8.5, 84.7, None),
    'cpolynext_l': (None, None, None, None),
    'apolynext_t': (None, None, 80.9, None),
    'apolynext_s': (26, 5.3, 84.3, None),
    'apolynext_b': (None, None, None, None),
    'apolynext_l': (57, 13.3, 85.2, None),
}
PAPER = {**PAPER_METAFORMER, **PAPER_POLYNEXT}
DEFAULT_MODELS = list(PAPER)
QUICK_MODELS = ['convformer_s18', 'caformer_s18', 'cpolynext_t', 'apolynext_t']


def _is_metaformer(name: str) -> bool:
    return name.startswith(('convformer_', 'caformer_'))


def specs_for(models: List[str], starrelu: bool) -> List[ModelSpec]:
    # the paper's protocol: GELU in the MLPs (mlp_act) and in the separable convs (act1_layer)
    gelu = {} if starrelu else dict(mlp_act=nn.GELU, act1_layer=nn.GELU)
    return [ModelSpec(name, name, dict(gelu) if _is_metaformer(name) else {}) for name in models]


def _cell(value: Optional[float], fmt: str) -> str:
    return 'n/a' if value is None else format(value, fmt)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=DEFAULT_MODELS, help='subset (default: all 16, paper order)')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--runs', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--device', default='cpu')
    p.add_argument('--dtype', choices=('fp32', 'bf16', 'fp16'), default='fp32')
    p.add_argument('--no-tf32', action='store_true', help='CUDA: no TF32 (the paper used TF32)')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--starrelu', action='store_true', help='keep the released StarReLU (paper: GELU)')
    p.add_argument('--memory', action='store_true', help='also measure peak memory')
    p.add_argument('--quick', action='store_true', help='4 small models at 64 px, batch 2, 1 run: a smoke test')
    p.add_argument('--json', default=None, help='output JSON (default benchmarks/results/table12_throughput.json)')
    p.add_argument('--no-pin-allocator', action='store_true', help='do not re-run with the pinned glibc allocator')
    args = p.parse_args(argv)
    if args.quick:
        args.models = [m for m in args.models if m in QUICK_MODELS] or QUICK_MODELS
        args.batch_size, args.img_size, args.runs, args.warmup = 2, 64, 1, 1
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not args.no_pin_allocator and argv is None:
        ensure_pinned_allocator('table12_throughput')
    settings = BenchSettings(img_size=args.img_size, batch_size=args.batch_size, device=args.device, mode='infer',
                             dtype=args.dtype, channels_last=args.channels_last, compile=args.compile,
                             runs=args.runs, warmup=args.warmup, memory=args.memory, tf32=not args.no_tf32,
                             threads=args.threads)
    if args.device == 'cpu' and (warning := busy_machine_warning(args.threads)):
        print(f'table12_throughput: warning: {warning}', file=sys.stderr)
    try:
        report = run_bench(specs_for(args.models, args.starrelu), settings)
    except PolyNeXtError as e:
        print(f'table12_throughput: error: {e}', file=sys.stderr)
        return 2

    first = report.results[0]
    paper_first = PAPER.get(first.model, (None,) * 4)[3]
    rows: List[List[str]] = []
    records: List[Dict[str, Any]] = []
    for r in report.results:
        p_params, p_macs, p_top1, p_tput = PAPER.get(r.model, (None,) * 4)
        p_ratio = p_tput / paper_first if p_tput and paper_first else None
        records.append(dict(r.to_dict(), paper_params_m=p_params, paper_gmacs=p_macs, paper_top1=p_top1,
                            paper_a100_img_per_s=p_tput, paper_ratio=p_ratio))
        rows.append([r.label, f'{r.params / 1e6:.1f}', _cell(p_params, 'g'), f'{r.macs / 1e9:.2f}',
                     _cell(p_macs, 'g'), f'{r.img_per_s:,.1f}', f'{r.ms_per_batch:,.0f}', f'{r.ratio:.2f}',
                     _cell(p_tput, ',.0f'), _cell(p_ratio, '.2f'), _cell(p_top1, '.1f')])
    act = 'StarReLU (as released)' if args.starrelu else 'GELU in ConvFormer/CAFormer (paper protocol)'
    print(f'Table 12: {report.header()}; {act}')
    print(format_table(['model', 'params M', 'paper', 'GMACs', 'paper', 'img/s', 'ms/batch', 'ratio',
                        'paper A100 img/s', 'paper ratio', 'paper top-1'], rows))
    print(f'ratio = img/s relative to {first.label} (paper ratio: the same from the paper\'s A100 column)')
    out = Path(args.json) if args.json else RESULTS / ('table12_throughput_quick.json' if args.quick else 'table12_throughput.json')
    extra = dict(benchmark='MetaFormer Table 12 (inference throughput)', activation=act,
                 command=sys.argv if argv is None else None, rows=records)
    report.write_json(str(out), extra=extra)
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
