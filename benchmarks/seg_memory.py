"""Peak CPU memory of one segmentation training step: the trainer's loss against the plain up-sample + cross-entropy.

    python benchmarks/seg_memory.py --json benchmarks/results/seg_memory.json                  # 512x2048, APolyNeXt-S
    python benchmarks/seg_memory.py --backbone cpolynext_t --size 64 256 --backbone-kwargs '{"init_channels": 8}'
    python benchmarks/seg_memory.py --grad-checkpointing --variants polynext     # + the backbone recomputed in backward

One step = forward under bf16 autocast, the decode + 0.4 · auxiliary loss, backward (UperNet, 150 classes,
batch 2: the ADE20K recipe's per-GPU batch). Each loss runs in a fresh process whose allocator maps every
block of 64 KiB or more on its own and returns it when freed (``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=65536``),
so the process's peak resident memory follows the peak of live tensors; the table gives it above the process's
size before the step (torch, the model and its input). ``plain`` is mmseg's form,
``F.cross_entropy(F.interpolate(logits.float(), size), label)``, which keeps the float32 log-softmax of the
full-resolution logits from the forward to the backward; ``polynext`` is ``seg.trainer.seg_loss``
(``seg/loss.py``). The CPU figure is not a GPU figure (CPU autocast keeps other tensors in float32), but the
loss's share is the same tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

VARIANTS = ('plain', 'polynext')


def child(variant: str, backbone: str, kwargs: Dict[str, Any], size: List[int], batch: int,
          grad_checkpointing: bool, head_channels: int = 512) -> Dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from polynext.seg.segmentor import SegmentorSpec, build_segmentor
    from polynext.seg.trainer import seg_loss
    torch.manual_seed(0)
    h, w = size
    spec = SegmentorSpec(backbone=backbone, num_classes=150, backbone_kwargs=kwargs, channels=head_channels,
                         aux_channels=head_channels // 2)
    model = build_segmentor(spec).to(memory_format=torch.channels_last).train()
    model.set_grad_checkpointing(grad_checkpointing)
    x = torch.randn(batch, 3, h, w).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 150, (batch, h, w))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    if variant == 'plain':
        def ce(z):
            return F.cross_entropy(F.interpolate(z.float(), size=(h, w), mode='bilinear'), y)
        loss = ce(out['out']) + 0.4 * ce(out['aux'])
    else:
        loss, _ = seg_loss(out, y)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(variant=variant, grad_checkpointing=grad_checkpointing, base_bytes=base, peak_bytes=peak, step_bytes=peak - base,
                step_s=time.perf_counter() - t0, loss=loss.item())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--backbone', default='apolynext_s')
    parser.add_argument('--backbone-kwargs', default='{}', type=json.loads, help='JSON, e.g. {"init_channels": 8}')
    parser.add_argument('--size', nargs=2, type=int, default=[512, 2048], metavar=('H', 'W'))
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--grad-checkpointing', action='store_true', help='recompute the backbone in backward')
    parser.add_argument('--head-channels', type=int, default=512,
                        help="UPerHead's width (the auxiliary FCNHead's is half; default 512: the ADE20K recipe's)")
    parser.add_argument('--variants', nargs='+', choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument('--json', default=None, metavar='PATH')
    parser.add_argument('--child', choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.head_channels < 2:
        parser.error(f'--head-channels {args.head_channels}: the head needs at least 2 channels (its auxiliary head '
                     'takes half); give e.g. --head-channels 512, the recipe\'s')
    if args.child:
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child, args.backbone, args.backbone_kwargs, args.size, args.batch,
                               args.grad_checkpointing, args.head_channels)))
        return 0
    import torch
    from polynext.bench import environment
    machine = environment(torch.device('cpu'))
    env = dict(os.environ, GLIBC_TUNABLES='glibc.malloc.mmap_threshold=65536')
    src = str(Path(__file__).resolve().parents[1] / 'src')
    env['PYTHONPATH'] = src + os.pathsep + env.get('PYTHONPATH', '')
    rows = []
    print(f'UperNet + {args.backbone}, {args.batch} x {args.size[0]}x{args.size[1]}, 150 classes, bf16 autocast, '
          f'{args.threads} threads on {machine["device_name"]}'
          f'{", backbone checkpointed" if args.grad_checkpointing else ""}', flush=True)
    for variant in args.variants:
        cmd = [sys.executable, __file__, '--child', variant, '--backbone', args.backbone, '--backbone-kwargs',
               json.dumps(args.backbone_kwargs), '--size', *map(str, args.size), '--batch', str(args.batch),
               '--threads', str(args.threads), '--head-channels', str(args.head_channels)] + (
                   ['--grad-checkpointing'] if args.grad_checkpointing else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  {variant:9s} step {row['step_bytes'] / 2**30:6.2f} GiB above {row['base_bytes'] / 2**30:.2f} GiB "
              f"(peak {row['peak_bytes'] / 2**30:.2f}), {row['step_s']:.0f} s, loss {row['loss']:.4f}", flush=True)
    saved = rows[0]['step_bytes'] - rows[1]['step_bytes'] if len(rows) == 2 else None
    if saved is not None:
        print(f'  the trainer\'s loss: {saved / 2**30:.2f} GiB less ({100 * saved / rows[0]["step_bytes"]:.0f} % of '
              f'the step), same loss to {abs(rows[0]["loss"] - rows[1]["loss"]):.1e}', flush=True)
    if args.json:
        result = dict(command=['python', 'benchmarks/seg_memory.py'] + list(argv if argv is not None else sys.argv[1:]),
                      backbone=args.backbone, backbone_kwargs=args.backbone_kwargs, size=args.size, batch=args.batch,
                      threads=args.threads, grad_checkpointing=args.grad_checkpointing,
                      head_channels=args.head_channels, environment=machine, rows=rows,
                      saved_bytes=saved)
        from polynext.bench import write_report
        write_report(args.json, result)
    return 0


if __name__ == '__main__':
    sys.exit(main())
