"""MetaFormer paper, Table 11: the speed of activations, plus PolyNeXt's product at equal shape.

The paper times 10K forward runs on a 1 x 1M input on an A100 (runs/s): GELU (PyTorch API)
145,067, GELU written out as its tanh formula (Equation 9) 20,273, StarReLU 35,257 (1.7x).
PolyNeXt has no activation: its nonlinearity is the Hadamard product a * b of two projections
(PolyMLP), so that product, on two inputs of the same shape, is the row to compare.

Rows (forward, and forward + backward):
  GELU (PyTorch)               torch.nn.functional.gelu (erf)
  GELU (PyTorch, tanh)         F.gelu(approximate='tanh'), the fused kernel of Equation 9
  GELU (Equation 9)            0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written out
  StarReLU                     timm's StarReLU, s * relu(x)^2 + b with learnable s, b
  PolyMLP product a*b          polynext.HadamardProduct on two inputs of the input's shape

All rows run interleaved in one process (every round times ``--inner`` calls of each row, order
reversed on alternate rounds); the table shows the median runs/s and the ratio to GELU
(Equation 9), as the paper does. The glibc allocator is pinned (the script re-runs itself with
GLIBC_TUNABLES set; --no-pin-allocator skips that).

  python benchmarks/table11_activations.py                   # CPU, fp32, 1 x 1M, like the paper's shape
  python benchmarks/table11_activations.py --device cuda --inner 1000
  python benchmarks/table11_activations.py --quick           # a few seconds, for smoke tests

Writes benchmarks/results/table11_activations.json (or --json PATH).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

try:
    import polynext  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'src'))

import torch
import torch.nn.functional as F
from timm.models.metaformer import StarReLU

from polynext import HadamardProduct
from polynext.bench import (DTYPES, busy_machine_warning, ensure_pinned_allocator, environment, format_table,
                            resolve_device, time_interleaved)
from polynext.checkpoint import atomic_write

RESULTS = Path(__file__).resolve().parent / 'results'

#: MetaFormer paper, Table 11 (A100, 10K forward runs of a 1 x 1M input), runs/s
PAPER_RUNS_PER_S = {
    'GELU (PyTorch)': 145_067,
    'GELU (Equation 9)': 20_273,
    'StarReLU': 35_257,
}
REFERENCE_ROW = 'GELU (Equation 9)'

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_equation9(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation written out as separate tensor operations (paper Equation 9)."""
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x.pow(3))))


def make_rows(shape: List[int], device: torch.device, dtype: torch.dtype) -> Dict[str, Dict[str, Callable]]:
    """{row: {'fwd': callable, 'fwd+bwd': callable}}; inputs and gradients are allocated once."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device, dtype)
    b = torch.randn(shape, generator=gen).to(device, dtype)
    grad = torch.ones_like(x)
    star = StarReLU().to(device, dtype)
    product = HadamardProduct()
    unary = {
        'GELU (PyTorch)': F.gelu,
        'GELU (PyTorch, tanh)': lambda t: F.gelu(t, approximate='tanh'),
        'GELU (Equation 9)': gelu_equation9,
        'StarReLU': star,
    }
    xg = x.detach().clone().requires_grad_(True)
    bg = b.detach().clone().requires_grad_(True)

    def forward(fn, *inputs):
        def run() -> None:
            with torch.inference_mode():
                fn(*inputs)
        return run

    def forward_backward(fn, *inputs):
        def run() -> None:
            for t in inputs:
                t.grad = None
            star.zero_grad(set_to_none=True)
            fn(*inputs).backward(grad)
        return run

    rows = {name: {'fwd': forward(fn, x), 'fwd+bwd': forward_backward(fn, xg)} for name, fn in unary.items()}
    rows['PolyMLP product a*b'] = {'fwd': forward(product, x, b), 'fwd+bwd': forward_backward(product, xg, bg)}
    return rows


def measure(rows: Dict[str, Dict[str, Callable]], pass_: str, inner: int, rounds: int, warmup: int,
            sync: Callable[[], None]) -> Dict[str, float]:
    """Median runs/s of every row for one pass ('fwd' or 'fwd+bwd'), rows interleaved."""
    steps = {name: fns[pass_] for name, fns in rows.items()}
    time_interleaved(steps, warmup, sync, inner=inner)
    times = time_interleaved(steps, rounds, sync, inner=inner)
    return {name: inner / statistics.median(t) for name, t in times.items()}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--shape', type=int, nargs='+', default=[1, 1_000_000], help='input shape (default 1 1000000)')
    p.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N')
    p.add_argument('--dtype', choices=tuple(DTYPES), default='fp32')
    p.add_argument('--inner', type=int, default=200, help='calls per timed sample (default 200)')
    p.add_argument('--rounds', type=int, default=7, help='timed samples per row (default 7)')
    p.add_argument('--warmup', type=int, default=1, help='untimed rounds first (default 1)')
    p.add_argument('--threads', type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument('--quick', action='store_true', help='tiny shape and few runs: a smoke test, not a measurement')
    p.add_argument('--json', default=None, help='output JSON (default benchmarks/results/table11_activations.json)')
    p.add_argument('--no-pin-allocator', action='store_true', help='do not re-run with the pinned glibc allocator')
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.inner, args.rounds, args.warmup = [1, 65536], 5, 3, 1
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not args.no_pin_allocator and argv is None:
        ensure_pinned_allocator('table11_activations')
    from polynext.errors import PolyNeXtError
    try:
        device = resolve_device(args.device)
    except PolyNeXtError as e:
        print(f'table11_activations: error: {e}', file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == 'cpu' and (warning := busy_machine_warning(args.threads)):
        print(f'table11_activations: warning: {warning}', file=sys.stderr)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    rows = make_rows(args.shape, device, DTYPES[args.dtype])
    speed = {p: measure(rows, p, args.inner, args.rounds, args.warmup, sync) for p in ('fwd', 'fwd+bwd')}

    env = environment(device)
    print(f"Table 11: activation speed, input {'x'.join(map(str, args.shape))} {args.dtype} on {device.type} "
          f"({env['device_name']}, threads {env['threads']}, allocator {env['allocator']}); runs/s = median of "
          f"{args.rounds} samples of {args.inner} calls, rows interleaved; ratio to {REFERENCE_ROW}")
    table, records = [], []
    for name in rows:
        fwd, both = speed['fwd'][name], speed['fwd+bwd'][name]
        paper = PAPER_RUNS_PER_S.get(name)
        paper_ratio = paper / PAPER_RUNS_PER_S[REFERENCE_ROW] if paper else None
        record = dict(row=name, fwd_runs_per_s=fwd, fwd_ratio=fwd / speed['fwd'][REFERENCE_ROW],
                      fwd_bwd_runs_per_s=both, fwd_bwd_ratio=both / speed['fwd+bwd'][REFERENCE_ROW],
                      paper_a100_fwd_runs_per_s=paper, paper_fwd_ratio=paper_ratio)
        records.append(record)
        table.append([name, f'{fwd:,.0f}', f"{record['fwd_ratio']:.2f}", f'{both:,.0f}',
                      f"{record['fwd_bwd_ratio']:.2f}", f'{paper:,}' if paper else 'n/a',
                      f'{paper_ratio:.2f}' if paper_ratio else 'n/a'])
    print(format_table(['activation', 'fwd runs/s', 'ratio', 'fwd+bwd runs/s', 'ratio', 'paper A100 fwd',
                        'paper ratio'], table))
    out = Path(args.json) if args.json else RESULTS / ('table11_activations_quick.json' if args.quick else 'table11_activations.json')
    data = dict(benchmark='MetaFormer Table 11 (activation speed)', settings=vars(args), environment=env,
                reference_row=REFERENCE_ROW, rows=records)
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + '\n'))
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
