"""Every PolyNeXt model through ``torch.compile(fullgraph=True)``: inference and a training step.

fullgraph=True makes any graph break an error, so a model that compiles here runs as one graph.
Each model is compiled twice (eval + inference_mode; train: forward + cross-entropy + backward),
and the compiled outputs (and gradients) are compared with eager. Writes JSON.

    python benchmarks/compile_check.py --json compile_check.json                 # all models, inductor
    python benchmarks/compile_check.py cpolynext_t --backend aot_eager --img-size 64

Default: every registered PolyNeXt model at its own input size (bn variants at their img_size),
batch 2, the inductor backend. The compile time of each is reported. The bn variants' running
statistics are first set from the input batch (``calibrate_running_stats``), as for a trained model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


def check(name: str, backend: str, img_size: int, batch: int) -> dict:
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name)
    size = img_size or model.pretrained_cfg['input_size'][-1]
    if img_size and name.endswith('_bn'):
        model = timm.create_model(name, img_size=img_size)
    x = torch.randn(batch, 3, size, size)
    if name.endswith('_bn'):
        # untrained bn variants keep their initial statistics (mean 0, variance 1, row sums 1), which
        # normalise nothing: in eval their logits overflow to inf / NaN in eager and compiled alike
        from polynext.models.polynext import calibrate_running_stats
        calibrate_running_stats(model, x)
    row = dict(model=name, img_size=size, backend=backend)
    torch._dynamo.reset()
    model.eval()
    with torch.inference_mode():
        ref = model(x)
        t0 = time.perf_counter()
        out = torch.compile(model, fullgraph=True, backend=backend)(x)
    row.update(infer_compile_s=time.perf_counter() - t0, infer_max_abs_diff=(out - ref).abs().max().item())
    model.train()
    y = torch.arange(batch) % ref.shape[-1]
    F.cross_entropy(model(x), y).backward()
    ref_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    F.cross_entropy(torch.compile(model, fullgraph=True, backend=backend)(x), y).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    row.update(train_compile_s=time.perf_counter() - t0,
               train_max_rel_grad_diff=max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                                           for a, b in zip(grads, ref_grads)))
    row['ok'] = row['infer_max_abs_diff'] < 1e-4 and row['train_max_rel_grad_diff'] < 1e-3
    return row


def main(argv=None) -> int:
    import polynext  # noqa: F401  (registers the models)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='*', help='default: every PolyNeXt model')
    parser.add_argument('--backend', default='inductor', help='torch.compile backend (default inductor)')
    parser.add_argument('--img-size', type=int, default=0, help='input size (default: each model\'s own)')
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--json', default=None, metavar='PATH')
    args = parser.parse_args(argv)
    import timm
    names = args.models or sorted(timm.list_models('*polynext*'))
    rows = []
    for name in names:
        try:
            row = check(name, args.backend, args.img_size, args.batch_size)
        except Exception as e:   # a graph break under fullgraph=True is an exception: report it, go on
            row = dict(model=name, ok=False, error=f'{type(e).__name__}: {str(e).splitlines()[0][:300]}')
        rows.append(row)
        print(json.dumps(row), flush=True)
    from polynext.bench import environment
    result = dict(command=['python', 'benchmarks/compile_check.py'] + list(argv or sys.argv[1:]),
                  environment=environment(torch.device('cpu')), rows=rows, ok=all(r['ok'] for r in rows))
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} models compile with fullgraph=True and match eager")
    if args.json:
        from polynext.checkpoint import atomic_write_json
        atomic_write_json(args.json, result)
    return 0 if result['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
