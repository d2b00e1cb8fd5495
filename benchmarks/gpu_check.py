"""The GPU path in one run (at most about 5 minutes on one GPU): correctness, throughput, segmentation memory.

    python benchmarks/gpu_check.py --json gpu_check.json          # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run --json dry.json       # anywhere: tiny shapes, same code

It reports, and writes as JSON:

1. correctness
   * a bf16 (autocast) training step of every PolyNeXt family (C, A, bn, low-res) and the two
     MetaFormer baselines, channels-last, with fused AdamW: the loss is finite, every gradient is
     finite, and the loss after three steps on one batch is below the first;
   * the attention kernel (``polynext.ops.poly_attention``: on CUDA the flex_attention kernel) in
     fp32 and bf16 against the plain fp32 expression of the paper (``poly_attention_reference``,
     fp64 on CPU), output and gradients, max relative error;
2. throughput, inference at batch 128 in bf16, interleaved: cpolynext_s against convformer_s18 and
   apolynext_s against caformer_s18 (the MetaFormer paper's A100 figures: ConvFormer-S18 2213 img/s,
   CAFormer-S18 2093 img/s);
3. the peak memory of one UperNet + APolyNeXt-S training step at 512x2048 (bf16 autocast, batch 2,
   the ADE20K recipe's per-GPU batch, the segmentation trainer's loss; measured on the second step;
   target at most 8 GB, reported as ``within_target``, not a failure of the run), and of the same step
   with the backbone checkpointed (``grad_checkpointing``).

``--dry-run`` runs every section at toy sizes (64 px, batch 2, one block per stage, narrow widths, a
64x256 segmentation input) on whatever device is there, so the logic is tested on a CPU (tests/test_speed.py); its
figures mean nothing. No figure of this script has been measured on a GPU yet (see the README).
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F

PAPER_A100 = {'convformer_s18': 2213.0, 'caformer_s18': 2093.0}
FAMILIES = ('cpolynext_t', 'apolynext_t', 'cpolynext_t_bn', 'cpolynext_lr', 'convformer_s18', 'caformer_s18')
PAIRS = (('convformer_s18', 'cpolynext_s'), ('caformer_s18', 'apolynext_s'))


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _model(name: str, dry: bool, **kw: Any) -> torch.nn.Module:
    import timm
    import polynext  # noqa: F401  (registers the models)
    if dry and 'polynext' in name:      # toy: base width 16, one cell per stage
        kw.setdefault('init_channels', 16)
        kw.setdefault('cells', (1, 1, 1, 1) if name != 'cpolynext_lr' else (1, 1, 1))
    elif dry:                           # toy MetaFormer of the same kind: one block per stage, narrow
        from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv
        if name.startswith('caformer'):
            kw.update(token_mixers=(SepConv, SepConv, Attention, Attention),
                      norm_layers=(LayerNorm2dNoBias,) * 2 + (LayerNormNoBias,) * 2)
        else:
            kw.update(token_mixers=SepConv, norm_layers=LayerNorm2dNoBias)
        return MetaFormer(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), **kw)
    if dry and name.endswith('_bn'):
        kw.setdefault('img_size', 64)
    return timm.create_model(name, **kw)


def _failure(exc: BaseException, **fields: Any) -> Dict[str, Any]:
    """A check that raised: recorded with its error, so the rest of the one GPU run still happens."""
    return dict(fields, ok=False, error=f'{type(exc).__name__}: {exc}', traceback=traceback.format_exc())


def _training_step_row(name: str, device: torch.device, dry: bool) -> Dict[str, Any]:
    torch.manual_seed(0)
    size = 32 if name == 'cpolynext_lr' else (64 if dry else 224)
    model = _model(name, dry, num_classes=10).to(device, memory_format=torch.channels_last).train()
    x = torch.randn(2 if dry else 16, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.arange(x.shape[0], device=device) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    losses, finite = [], True
    for _ in range(3):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        finite &= all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    ok = finite and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    return dict(model=name, losses=losses, grads_finite=finite, ok=ok)


def check_training_steps(device: torch.device, dry: bool) -> List[Dict[str, Any]]:
    rows = []
    for name in FAMILIES:
        try:
            row = _training_step_row(name, device, dry)
            detail = f"losses {', '.join(f'{v:.4f}' for v in row['losses'])}"
        except Exception as exc:   # one family's failure must not hide the others'
            row = _failure(exc, model=name)
            detail = row['error'].splitlines()[0][:200]
        rows.append(row)
        print(f"  {name:16s} bf16 step, fused AdamW, channels-last: {detail}  {'ok' if row['ok'] else 'FAILED'}",
              flush=True)
    return rows


def check_attention(device: torch.device, dry: bool) -> List[Dict[str, Any]]:
    from polynext.ops.poly_attention import poly_attention, poly_attention_reference
    rows = []
    ref_dtype = torch.float64 if device.type == 'cpu' else torch.float32
    b, h, n, d = (2, 3, 49, 32) if dry else (8, 5, 784, 32)
    gen = torch.Generator(device='cpu').manual_seed(0)
    base = [(0.2 * torch.randn(b, h, n, d, generator=gen)).to(device) for _ in range(3)]
    g = torch.randn(b, h, n, d, generator=gen).to(device)
    ref_in = [t.to(ref_dtype).requires_grad_() for t in base]
    ref = poly_attention_reference(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, g.to(ref_dtype))
    for dtype in (torch.float32, torch.bfloat16):
        inp = [t.to(dtype).requires_grad_() for t in base]
        out = poly_attention(*inp)
        grads = torch.autograd.grad(out, inp, g.to(dtype))

        def rel(a: torch.Tensor, r: torch.Tensor) -> float:
            return ((a.to(ref_dtype) - r).abs().max() / r.abs().max()).item()
        row = dict(dtype=str(dtype).replace('torch.', ''), shape=[b, h, n, d], out_rel=rel(out, ref),
                   grad_rel=max(rel(a, r) for a, r in zip(grads, ref_grads)))
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        row['ok'] = row['out_rel'] < tol and row['grad_rel'] < tol
        rows.append(row)
        print(f"  attention {row['dtype']:8s} vs fp{64 if ref_dtype == torch.float64 else 32} reference: "
              f"out {row['out_rel']:.2e}, grads {row['grad_rel']:.2e} (max rel)  {'ok' if row['ok'] else 'FAILED'}",
              flush=True)
    return rows


def throughput(device: torch.device, dry: bool, runs: int) -> List[Dict[str, Any]]:
    batch, size = (2, 64) if dry else (128, 224)
    x = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    steps: Dict[str, Callable[[], None]] = {}
    for pair in PAIRS:
        for name in pair:
            model = _model(name, dry).to(device, torch.bfloat16, memory_format=torch.channels_last).eval()

            def step(model=model) -> None:
                with torch.inference_mode():
                    model(x)
            for _ in range(2):
                step()
            steps[name] = step
    times: Dict[str, List[float]] = {k: [] for k in steps}
    order = list(steps)
    for r in range(runs):
        for name in (order if r % 2 == 0 else order[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    ips = {k: batch / statistics.median(v) for k, v in times.items()}
    rows = []
    for ref, ours in PAIRS:
        row = dict(model=ours, baseline=ref, img_per_s=ips[ours], baseline_img_per_s=ips[ref],
                   ratio=ips[ours] / ips[ref], paper_a100_baseline=PAPER_A100[ref], batch=batch)
        rows.append(row)
        print(f"  {ours} {ips[ours]:,.1f} img/s, {ref} {ips[ref]:,.1f} img/s: x{row['ratio']:.2f} "
              f"(paper A100 {ref}: {PAPER_A100[ref]:,.0f})", flush=True)
    return rows


def seg_memory(device: torch.device, dry: bool) -> Dict[str, Any]:
    """Peak memory of a training step (forward, the trainer's loss, backward, AdamW) measured on the second
    step: the first one also holds cuDNN's algorithm trials and compiles the attention kernel."""
    from polynext.seg.segmentor import SegmentorSpec, build_segmentor
    from polynext.seg.trainer import seg_loss
    spec = SegmentorSpec(backbone='apolynext_t' if dry else 'apolynext_s', num_classes=150,
                         backbone_kwargs=dict(init_channels=16, cells=(1, 1, 1, 1)) if dry else {}, channels=32 if dry else 512,
                         aux_channels=16 if dry else 256)
    model = build_segmentor(spec).to(device, memory_format=torch.channels_last).train()
    h, w = (64, 256) if dry else (512, 2048)
    batch = 2                           # the ADE20K recipe's per-GPU batch (BatchNorm in the head needs 2)
    x = torch.randn(batch, 3, h, w, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 150, (batch, h, w), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x)
        loss, _ = seg_loss(out, y)      # the trainer's loss: float32, decode + 0.4 aux, no full-size logits kept
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def measured(label: str) -> Dict[str, Any]:
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        m = dict(step_s=time.perf_counter() - t0, loss=loss, ok=math.isfinite(loss))
        if device.type == 'cuda':
            peak = torch.cuda.max_memory_allocated(device)
            m.update(peak_gb=peak / 1e9, peak_gib=peak / 2 ** 30, within_target=peak / 1e9 <= 8.0)
            print(f"  UperNet + {spec.backbone} training step at {h}x{w}, batch {batch}, {label}: peak "
                  f"{m['peak_gb']:.2f} GB (target <= 8 GB: {'met' if m['within_target'] else 'OVER'}), "
                  f"{m['step_s']:.2f} s", flush=True)
        else:
            m.update(peak_gb=None, peak_gib=None, within_target=None)
            print(f"  UperNet + {spec.backbone} training step at {h}x{w}, {label}: loss {loss:.3f} "
                  f"(peak memory: CUDA only)", flush=True)
        return m

    t0 = time.perf_counter()
    step()
    _sync(device)
    first_s = time.perf_counter() - t0
    row = dict(model=f'UperNet + {spec.backbone}', input=[batch, 3, h, w], first_step_s=first_s, target_gb=8.0,
               **measured('second step'))
    model.set_grad_checkpointing()      # the same step with the backbone recomputed in backward (--set grad_checkpointing)
    row['grad_checkpointing'] = measured('backbone checkpointed')
    row['ok'] = row['ok'] and row['grad_checkpointing']['ok']
    return row


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default=None, help='default: cuda if available (else an error without --dry-run)')
    parser.add_argument('--dry-run', action='store_true', help='toy sizes on any device (tests the script)')
    parser.add_argument('--runs', type=int, default=10, help='timed rounds of the throughput section (default 10)')
    parser.add_argument('--json', default=None, metavar='PATH', help='write the results as JSON')
    args = parser.parse_args(argv)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type != 'cuda' and not args.dry_run:
        print('gpu_check: no CUDA device here; run it on a GPU machine, or add --dry-run to test the script',
              file=sys.stderr)
        return 2
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'
    print(f"gpu_check on {device} ({name}), torch {torch.__version__}{', DRY RUN (toy sizes)' if args.dry_run else ''}",
          flush=True)
    t0 = time.perf_counter()
    result: Dict[str, Any] = dict(command=['python', 'benchmarks/gpu_check.py'] + list(argv or sys.argv[1:]),
                                  device=str(device), device_name=name, torch=torch.__version__,
                                  dry_run=args.dry_run)
    path = Path(args.json) if args.json else None

    def write() -> None:   # after every section, so a run cut short still leaves what it measured
        if path is not None:
            from polynext.checkpoint import atomic_write_json
            atomic_write_json(path, result)

    sections = (('1. correctness: training steps', 'training_steps', lambda: check_training_steps(device, args.dry_run)),
                ('   correctness: attention kernel', 'attention', lambda: check_attention(device, args.dry_run)),
                ('2. throughput, inference, bf16', 'throughput',
                 lambda: throughput(device, args.dry_run, 1 if args.dry_run else args.runs)),
                ('3. segmentation training memory', 'segmentation', lambda: seg_memory(device, args.dry_run)))
    failed = []
    for title, key, section in sections:
        start = time.perf_counter()
        print(f'{title} (at {start - t0:.0f} s)', flush=True)
        try:
            result[key] = section()
        except Exception as exc:   # one GPU run is precious: record the failure and go on with the next section
            traceback.print_exc()
            result[key] = _failure(exc)
            if device.type == 'cuda':
                torch.cuda.empty_cache()
        rows = result[key] if isinstance(result[key], list) else [result[key]]
        if not all(r.get('ok', True) for r in rows):   # (throughput rows are measurements, not checks)
            failed.append(key)
        result.setdefault('section_seconds', {})[key] = time.perf_counter() - start
        write()
    result['seconds'] = time.perf_counter() - t0
    result['ok'] = not failed
    result['failed_sections'] = failed
    print(f"{'all checks passed' if result['ok'] else 'SOME CHECKS FAILED'} in {result['seconds']:.0f} s", flush=True)
    write()
    if path is not None:
        print(f'wrote {args.json}')
    return 0 if result['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
