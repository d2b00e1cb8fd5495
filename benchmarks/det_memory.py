"""Peak memory of detection backbones at 800x1333: CAFormer-S18 (sliding windows or global attention) and
APolyNeXt-S (global chunked polynomial attention or windows), one image, CPU, fp32.

    python benchmarks/det_memory.py                       # the table below, JSON to benchmarks/results/
    python benchmarks/det_memory.py --modes infer --size 800 1333 --json out.json

Each row runs in a fresh process (the process high-water mark never goes down), with glibc's mmap
threshold at 64 KiB so that freed blocks return to the OS and RSS is the memory in use (as
``polynext bench``'s memory probe): peak = VmHWM − RSS before building the backbone (weights,
input, activations; in train mode also what backward keeps and the gradients). ``infer``:
``inference_mode`` forward of the four stage outputs; ``train``: forward + backward of the sum of
their means (what a detector's backward asks of its backbone, without the heads).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

#: (model, windows per attention stage (0 = global), label, modes); CAFormer's global attention runs in inference
#: only here: its training backward would keep 9 layers of 4200² scores per head on a shared 24 GB machine
CASES = [
    ('caformer_s18', (14, 7), 'CAFormer-S18, windows 14 / 7 (the presets)', ('infer', 'train')),
    ('caformer_s18', (0, 0), 'CAFormer-S18, global softmax attention (SDPA)', ('infer',)),
    ('apolynext_s', (0, 0), 'APolyNeXt-S, global chunked polynomial attention (default)', ('infer', 'train')),
    ('apolynext_s', (14, 7), 'APolyNeXt-S, windows 14 / 7', ('infer', 'train')),
]
MARK = '@@det-memory@@'


def _status_kib(field: str) -> int:
    import re
    text = Path('/proc/self/status').read_text()
    return int(re.search(rf'^{field}:\s+(\d+) kB', text, re.M).group(1))


def child(request: dict) -> dict:
    import gc
    import torch
    import polynext
    from polynext.models.attention_window import set_attention_window
    torch.set_num_threads(request['threads'] or torch.get_num_threads())
    gc.collect()
    Path('/proc/self/clear_refs').write_text('5')          # VmHWM := VmRSS
    before = _status_kib('VmRSS') * 1024
    model = polynext.create_model(request['model'], features_only=True)
    set_attention_window(model, list(request['windows']))
    x = torch.randn(1, 3, *request['size'])
    t0 = time.time()
    if request['mode'] == 'infer':
        model.eval()
        with torch.inference_mode():
            feats = model(x)
    else:
        model.train()
        feats = model(x)
        sum(f.float().mean() for f in feats).backward()
    seconds = time.time() - t0
    return dict(peak_bytes=_status_kib('VmHWM') * 1024 - before, seconds=round(seconds, 2),
                shapes=[list(f.shape) for f in feats])


def measure(model: str, windows, mode: str, size, threads: int) -> dict:
    from polynext.bench import memory_probe_env
    request = dict(model=model, windows=list(windows), mode=mode, size=list(size), threads=threads)
    proc = subprocess.run([sys.executable, __file__, '--child', json.dumps(request)], env=memory_probe_env(),
                          capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']
        return dict(error=tail[0])
    return json.loads(line[len(MARK):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--size', type=int, nargs=2, default=(800, 1333), metavar=('H', 'W'))
    p.add_argument('--modes', nargs='+', default=['infer', 'train'], choices=['infer', 'train'])
    p.add_argument('--threads', type=int, default=0)
    p.add_argument('--cases', type=int, nargs='+', default=None, help='only these rows of CASES (0-based)')
    p.add_argument('--merge', action='store_true', help='replace these rows in an existing --json file')
    p.add_argument('--json', default='benchmarks/results/det_memory.json')
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(MARK + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    from polynext.bench import environment
    import torch
    rows = []
    print(f'{"backbone":<60} {"mode":<6} {"peak MiB":>10} {"s":>7}')
    for i, (model, windows, label, modes) in enumerate(CASES):
        if args.cases is not None and i not in args.cases:
            continue
        for mode in [m for m in args.modes if m in modes]:
            r = measure(model, windows, mode, args.size, args.threads)
            rows.append(dict(model=model, windows=list(windows), label=label, mode=mode, **r))
            peak = f'{r["peak_bytes"] / 2**20:,.0f}' if 'peak_bytes' in r else r['error'][:40]
            print(f'{label:<60} {mode:<6} {peak:>10} {r.get("seconds", ""):>7}', flush=True)
    if args.merge and Path(args.json).is_file():
        old = json.loads(Path(args.json).read_text())['rows']
        key = lambda r: (r['model'], tuple(r['windows']), r['mode'])  # noqa: E731
        new = {key(r): r for r in rows}
        rows = [new.pop(key(r), r) for r in old] + list(new.values())
    out = dict(size=list(args.size), environment=environment(torch.device('cpu')), rows=rows,
               method='fresh process per row; VmHWM - VmRSS before building, glibc mmap_threshold 64 KiB')
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + '\n')
    print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
