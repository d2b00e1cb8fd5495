"""List every model polynext offers, with parameters and MACs at the default input size.

MACs are counted with torch's FlopCounterMode (convolutions and matrix products, attention
included), as both papers count them. Counting builds each model, which takes a few
seconds per large model; ``--no-macs`` skips that. The MetaFormer baselines are built on
the meta device (shapes only, no memory or init cost; the counts are the same).
"""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('filter', nargs='?', default='', help='only names containing this text')
    parser.add_argument('--no-macs', action='store_true', help='skip the MAC count (much faster)')
    parser.add_argument('--json', default=None, help='also write the table to this JSON file')


def _build(name: str):
    import timm
    import torch

    from ..models import METAFORMER_MODELS
    if name in METAFORMER_MODELS:
        with torch.device('meta'):
            return timm.create_model(name)
    return timm.create_model(name)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..factory import list_models
    from ..models import model_source
    from ..profile import count_macs, count_params

    if args.json:
        from ..outputs import check_output_file
        check_output_file(args.json, '--json')
    names = list_models(args.filter)
    if not names:
        import difflib

        from ..errors import ConfigError
        close = difflib.get_close_matches(args.filter, list_models(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ''
        raise ConfigError(f"no model name contains '{args.filter}'.{hint} `polynext models` lists them all.")
    rows = []
    for name in tqdm(names, desc='counting', disable=len(names) < 4, leave=False):
        model = _build(name)
        cfg = model.pretrained_cfg
        size = cfg.get('input_size', (3, 224, 224))[-1]
        trainable = count_params(model, trainable_only=True)
        total = count_params(model)
        frozen = total - trainable
        frozen += sum(b.numel() for n, b in model.named_buffers() if n.endswith('random_matrix'))
        row = dict(model=name, params_m=round(trainable / 1e6, 3), frozen_m=round(frozen / 1e6, 3),
                   input=size, num_classes=cfg.get('num_classes'), source=model_source(name))
        if not args.no_macs:
            row['gmacs'] = round(count_macs(model) / 1e9, 3)
        rows.append(row)
        del model
    header = ['model', 'params (M)', 'frozen (M)', 'GMACs', 'input', 'classes', 'source']
    table = [[r['model'], f"{r['params_m']:.3f}", f"{r['frozen_m']:.3f}" if r['frozen_m'] else '',
              f"{r['gmacs']:.3f}" if 'gmacs' in r else '-', str(r['input']), str(r['num_classes']), r['source']]
             for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(header)]
    print('  '.join(h.ljust(w) for h, w in zip(header, widths)))
    print('  '.join('-' * w for w in widths))
    for t in table:
        print('  '.join(c.ljust(w) for c, w in zip(t, widths)))
    if args.json:
        from pathlib import Path

        from ..checkpoint import atomic_write
        text = json.dumps(rows, indent=2)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
    return 0
