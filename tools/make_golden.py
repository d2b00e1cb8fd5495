#!/usr/bin/env python3
"""Regenerate the golden test data in ``tests/golden/`` from the authors' PolyNeXt code.

The golden sets are tensors produced by the reference implementation (github.com/jjwang8/PolyNeXt,
commit be990cb) on small ("mini") models; ``tests/test_golden.py`` checks polynext against them.
This script is their provenance: it imports the authors' ``model.py`` from a checkout given on
the command line (nothing of the reference is copied into polynext) and writes, per folder,

    state_dict.safetensors   every parameter and buffer, the authors' key names
    input.safetensors        x = torch.randn(4, 3, H, W) from a generator seeded 1234
    output.safetensors       eval-mode logits of x
    output_train.safetensors (bn only) train-mode logits of x and every running buffer after it
    meta.json                configuration, counts, full-size key list, MACs, reproducibility figures

Protocol (tests/golden/README.md, spec §13): the authors' config dict and layer count, base width
C0 = 16, 10 classes, dropout 0, drop path 0, ``torch.manual_seed(0)`` right before construction,
64 px input (LowRes 32 px), float32, CPU. bn variants: the lazily created per-position tensors
are materialised by one eval forward of a zero image at the mini size, then 200 train-mode
no-grad passes over a fixed 8-image batch (x, then 4 images from a generator seeded 4321)
calibrate the running statistics.

    git -C /tmp clone https://github.com/jjwang8/PolyNeXt && git -C /tmp/PolyNeXt checkout be990cb
    python tools/make_golden.py --reference-dir /tmp/PolyNeXt                 # every folder, into tests/golden
    python tools/make_golden.py --reference-dir /tmp/PolyNeXt --check         # regenerate into a temporary
                                                                              # folder and compare byte for byte
    python tools/make_golden.py --reference-dir /tmp/PolyNeXt --sets APolyNeXt_L --out /tmp/golden

The sail-sg MetaFormer baselines' key list (``metaformer_authors_keys.json``: every state-dict key, shape
and dtype of five full-size models, one per token mixer) comes from the authors' ``metaformer_baselines.py``:

    git -C /tmp clone https://github.com/sail-sg/metaformer
    python tools/make_golden.py --metaformer-dir /tmp/metaformer [--check]

The reference runs on two intra-op threads (``--threads 2``), as when the committed files were made:
regenerating is then bit-identical to them (one thread moves logits by rounding only, ≤ 3.6e-7, and the
calibrated bn running variances by ≤ 8e-5).
"""
from __future__ import annotations

import argparse
import filecmp
import importlib
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / 'tests' / 'golden'
REFERENCE_COMMIT = 'be990cb'

#: folder -> (the authors' config name, their norm flag). LowRes uses the low-resolution network.
SETS: Dict[str, Tuple[str, str]] = {
    'CPolyNeXt_T': ('CPolyNeXt_T', 'ln'),
    'APolyNeXt_T': ('APolyNeXt_T', 'ln'),
    'LowRes': ('LowRes', 'ln'),
    'CPolyNeXt_T_bn': ('CPolyNeXt_T', 'bn'),
    'CPolyNeXt_S': ('CPolyNeXt_S', 'ln'),
    'CPolyNeXt_B': ('CPolyNeXt_B', 'ln'),
    'CPolyNeXt_L': ('CPolyNeXt_L', 'ln'),
    'APolyNeXt_S': ('APolyNeXt_S', 'ln'),
    'APolyNeXt_B': ('APolyNeXt_B', 'ln'),
    'APolyNeXt_L': ('APolyNeXt_L', 'ln'),
    'APolyNeXt_T_bn': ('APolyNeXt_T', 'bn'),
    'CPolyNeXt_S_bn': ('CPolyNeXt_S', 'bn'),
}
#: the folders committed in tests/golden (the others can be written to another --out for a local check)
COMMITTED = ('CPolyNeXt_T', 'APolyNeXt_T', 'LowRes', 'CPolyNeXt_T_bn',
             'CPolyNeXt_S', 'CPolyNeXt_L', 'APolyNeXt_T_bn', 'CPolyNeXt_S_bn')

MINI_C0 = 16
MINI_CLASSES = 10
SEED_INIT, SEED_X, SEED_EXTRA = 0, 1234, 4321
CALIBRATION_PASSES = 200
FULL_C0 = {'LowRes': 72, 'T': 48, 'S': 72, 'B': 84, 'L': 96}

FILES = {
    'state_dict.safetensors': 'model state dict with the reference key names; float32 tensors, integer counters '
                              '(num_batches_tracked) stay int64; includes buffers (head.2.p and, for bn, running '
                              'statistics and lazily created tensors)',
    'input.safetensors': "key 'x': float32 input batch [4,3,H,W]",
    'output.safetensors': "key 'logits': float32 [4,num_classes], eval mode (model.eval(), no grad)",
    'output_train.safetensors': "key 'logits': train-mode logits for the same input starting from the saved state "
                                '(batch statistics, dropout 0, drop path 0); other keys: every running buffer '
                                '(running_mean, running_var, running_denom, num_batches_tracked) after that single '
                                'train-mode forward',
}
MACS_NOTE = ('torch.utils.flop_counter.FlopCounterMode total FLOPs / 2, batch 1; counts convolution, '
             'mm/addmm/bmm only')


def import_reference(reference_dir: Path):
    """Import the authors' ``model`` module from their checkout (it imports ``operations`` and
    ``utils`` as top-level modules, so the checkout goes first on ``sys.path``)."""
    reference_dir = reference_dir.resolve()
    if not (reference_dir / 'model.py').is_file() or not (reference_dir / 'operations.py').is_file():
        raise SystemExit(f'error: {reference_dir} is not a PolyNeXt checkout (no model.py / operations.py); '
                         f'clone https://github.com/jjwang8/PolyNeXt and pass its folder to --reference-dir')
    sys.path.insert(0, str(reference_dir))
    for name in ('model', 'operations', 'utils'):
        sys.modules.pop(name, None)
    module = importlib.import_module('model')
    if Path(module.__file__).resolve().parent != reference_dir:
        raise SystemExit(f'error: imported {module.__file__}, not the reference in {reference_dir}')
    try:
        head = subprocess.run(['git', '-C', str(reference_dir), 'rev-parse', 'HEAD'], capture_output=True,
                              text=True, check=True).stdout.strip()
        if not head.startswith(REFERENCE_COMMIT):
            print(f'warning: the reference checkout is at {head[:7]}, the golden data come from {REFERENCE_COMMIT}',
                  file=sys.stderr)
    except (OSError, subprocess.CalledProcessError):
        pass
    return module


class Builder:
    """Builds the authors' networks for one golden folder."""

    def __init__(self, ref, folder: str):
        self.ref = ref
        self.folder = folder
        self.config_name, self.norm = SETS[folder]
        self.config = getattr(ref, self.config_name)
        self.lowres = self.config_name == 'LowRes'
        self.layers = len(self.config['nodes'])
        self.mini_size = 32 if self.lowres else 64

    def build(self, channels: int, num_classes: int):
        cfg = dict(self.config)
        if self.norm == 'bn':
            cfg['norm'] = 'bn'
        net = self.ref.NetworkPoly if self.lowres else self.ref.NetworkPolyImageNet
        return net(channels, num_classes, self.layers, cfg, 0.0, 0.0)

    def mini(self, seed: Optional[int] = SEED_INIT):
        import torch
        if seed is not None:
            torch.manual_seed(seed)
        return self.build(MINI_C0, MINI_CLASSES)

    def materialise(self, model, size: int) -> None:
        if self.norm == 'bn':
            self.ref.materialize_lazy_params(model, size)

    @property
    def model_class(self) -> str:
        return 'NetworkPoly (low-res, 3x3 stride-1 stem)' if self.lowres else 'NetworkPolyImageNet (7x7 stride-4 stem)'

    def full_c0(self) -> int:
        return FULL_C0['LowRes' if self.lowres else self.config_name.rsplit('_', 1)[1]]


def _stages(config: Dict[str, Any], layers: int) -> List[int]:
    stage, out = 0, []
    for i in range(layers):
        if i in config['downsizes']:
            stage += 1
        out.append(stage)
    return out


def cell_table(ref, model, config: Dict[str, Any], layers: int) -> List[Dict[str, Any]]:
    """Per-cell geometry of a reference network (widths, kernels, heads), read off its modules."""
    rows = []
    for i, (cell, stage) in enumerate(zip(model.cells, _stages(config, layers))):
        attn = isinstance(cell, ref.Atten_Cell_Imagenet)
        row = dict(index=i, stage=stage, kind='attn' if attn else 'polyconv', C=cell.C, nodes=cell.nodes,
                   blocks=cell.nodes // 2, mlp_expand_out=cell.C_inner2, mlp_hidden=cell.C_inner2 // 2,
                   skip_weight_len=int(cell.skip_weight.numel()))
        if attn:
            a = cell.ops[0][1]
            row.update(num_heads=a.num_heads, head_dim=a.head_dim, attn_dim=a.attention_dim)
        else:
            row.update(conv_inner=cell.ops[0].out_channels, coarse_kernel=list(cell.ops[1].kernel_size),
                       coarse_dilation=list(cell.ops[1].dilation), coarse_padding=list(cell.ops[1].padding))
        rows.append(row)
    return rows


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _state(model) -> Dict[str, Any]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _running(state: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in state.items() if k.rsplit('.', 1)[-1] in ('running_mean', 'running_var',
                                                                          'running_denom', 'num_batches_tracked')}


def _maxdiff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def full_model_facts(b: Builder) -> Dict[str, Any]:
    """Full-size (published width, 1000 classes; LowRes 10) counts, MACs and key list."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    c0 = b.full_c0()
    classes = 10 if b.lowres else 1000
    res = 32 if b.lowres else 224
    torch.manual_seed(SEED_INIT)
    model = b.build(c0, classes)
    before = _params(model)
    b.materialise(model, res)
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, res, res))
    flops = counter.get_total_flops()
    ops = {str(k): int(v) for k, v in counter.get_flop_counts()['Global'].items()}
    macs = flops / 2
    return dict(init_channels=c0, layers=b.layers, num_classes=classes, input_res=res, param_count=_params(model),
                param_count_before_lazy=before, macs=float(macs), macs_G=round(macs / 1e9, 4), flop_counter_ops=ops,
                macs_note=MACS_NOTE,
                state_dict=[[k, list(v.shape), str(v.dtype).replace('torch.', '')] for k, v in model.state_dict().items()],
                cells=cell_table(b.ref, model, b.config, b.layers))


def generate(ref, folder: str, out: Path) -> Dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    b = Builder(ref, folder)
    size = b.mini_size
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(SEED_X))
    model = b.mini()
    before = _params(model)
    calibration = None
    if b.norm == 'bn':
        b.materialise(model, size)
        extra = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(SEED_EXTRA))
        batch = torch.cat([x, extra])
        model.train()
        with torch.no_grad():
            for _ in range(CALIBRATION_PASSES):
                model(batch)
        calibration = dict(passes=CALIBRATION_PASSES, batch='concat(x, extra) along batch dim -> 8 images; x first',
                           extra_seed=SEED_EXTRA, mode='train, torch.no_grad',
                           three_random_batch_passes_eval_result=_few_random_passes(b, x))
    state = _state(model)
    model.eval()
    with torch.no_grad():
        logits = model(x)

    # reproducibility: a fresh reference model loading the saved state; float64 forward
    fresh = b.mini(seed=None)
    b.materialise(fresh, size)
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    f64 = b.mini(seed=None)
    b.materialise(f64, size)
    f64.load_state_dict(state, strict=True)
    f64.double().eval()
    with torch.no_grad():
        reload_logits = fresh(x)
        logits64 = f64(x.double())
    max_abs = logits.abs().max().item()
    f64_diff = _maxdiff(logits64, logits)
    repro = dict(reload_maxdiff=_maxdiff(reload_logits, logits), f64_maxdiff=f64_diff,
                 f64_rel=f64_diff / logits64.abs().max().item(), max_abs=max_abs)

    train_out = None
    train_summary = None
    if b.norm == 'bn':
        model.load_state_dict(state, strict=True)
        model.train()
        fresh.load_state_dict(state, strict=True)
        fresh.train()
        f64.load_state_dict(state, strict=True)
        f64.double().train()
        with torch.no_grad():
            train_logits = model(x)
            train_reload = fresh(x)
            train_logits64 = f64(x.double())
        buffers = _running(_state(model))
        buffers_reload = _running(_state(fresh))
        train_out = dict(logits=train_logits.contiguous(), **buffers)
        train_summary = dict(logits_mean=train_logits.mean().item(), logits_std=train_logits.std().item(),
                             finite=bool(torch.isfinite(train_logits).all()),
                             max_abs_diff_train_vs_eval=(train_logits - logits).abs().max().item())
        repro.update(train_reload_maxdiff=_maxdiff(train_reload, train_logits),
                     train_f64_maxdiff=_maxdiff(train_logits64, train_logits),
                     train_buffers_maxdiff=max(_maxdiff(buffers[k], buffers_reload[k]) for k in buffers))

    config = {k: ({str(i): c for i, c in v.items()} if k == 'channels' else v) for k, v in b.config.items()}
    meta = dict(
        name=folder, official_config_name=b.config_name, official_config=config, norm=b.norm,
        model_class=b.model_class, init_channels=MINI_C0, layers=b.layers, num_classes=MINI_CLASSES,
        input_size=list(x.shape), dropout=0.0, drop_path=0.0,
        seeds=dict(init=SEED_INIT, x=SEED_X, extra=SEED_EXTRA,
                   x_recipe='torch.randn(4,3,H,W, generator=torch.Generator().manual_seed(1234))'),
        param_count=_params(model), param_count_before_lazy=before, state_dict_entries=len(state),
        logits_shape=list(logits.shape), logits_mean=logits.mean().item(), logits_std=logits.std().item(),
        logits_max_abs=max_abs, logits_finite=bool(torch.isfinite(logits).all()),
        bn_calibration=calibration, train_mode_output=train_summary,
        mini_cells=cell_table(ref, model, b.config, b.layers), full_model=full_model_facts(b),
        files={k: v for k, v in FILES.items() if k != 'output_train.safetensors' or b.norm == 'bn'},
        reproducibility=repro,
    )

    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / 'state_dict.safetensors'))
    save_file({'x': x}, str(out / 'input.safetensors'))
    save_file({'logits': logits.contiguous()}, str(out / 'output.safetensors'))
    if train_out is not None:
        save_file(train_out, str(out / 'output_train.safetensors'))
    (out / 'meta.json').write_text(json.dumps(meta, indent=1))
    return meta


def _few_random_passes(b: Builder, x) -> Dict[str, Any]:
    """Why the bn folders are calibrated: 3 train passes on unrelated random batches leave the eval
    logits of the reference non-finite (or astronomically large)."""
    import torch
    model = b.mini()
    b.materialise(model, b.mini_size)
    g = torch.Generator().manual_seed(SEED_EXTRA)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, b.mini_size, b.mini_size, generator=g))
        y = model.eval()(x)
    finite = bool(torch.isfinite(y).all())
    m = y.abs().max().item()
    return dict(finite=finite, max_abs=m if math.isfinite(m) else str(m))


#: one full-size MetaFormer baseline per token mixer (identity, random, pooling, SepConv, SepConv + attention)
METAFORMER_KEY_MODELS = ('identityformer_s12', 'randformer_s12', 'poolformerv2_s12', 'convformer_s18', 'caformer_s18')
METAFORMER_KEYS = 'metaformer_authors_keys.json'


def metaformer_key_list(metaformer_dir: Path) -> Dict[str, Any]:
    """Key, shape and dtype of every state-dict entry of the authors' (sail-sg) full-size models.

    ``metaformer_baselines.py`` imports ``timm.models.layers.helpers.to_2tuple``, which timm 1.x moved
    to ``timm.layers``: a stand-in module provides it. The random init is skipped (names and shapes only)."""
    import types
    import timm.layers
    import torch
    metaformer_dir = metaformer_dir.resolve()
    if not (metaformer_dir / 'metaformer_baselines.py').is_file():
        raise SystemExit(f'error: {metaformer_dir} has no metaformer_baselines.py; clone '
                         f'https://github.com/sail-sg/metaformer and pass its folder to --metaformer-dir')
    sys.modules.setdefault('timm.models.layers.helpers', types.SimpleNamespace(to_2tuple=timm.layers.to_2tuple))
    sys.path.insert(0, str(metaformer_dir))
    sys.modules.pop('metaformer_baselines', None)
    mb = importlib.import_module('metaformer_baselines')
    mb.trunc_normal_ = lambda t, *args, **kwargs: t
    models = {}
    for name in METAFORMER_KEY_MODELS:
        model = getattr(mb, name)()
        models[name] = dict(param_count=sum(p.numel() for p in model.parameters()),
                            state_dict=[[k, list(v.shape), str(v.dtype).replace('torch.', '')]
                                        for k, v in model.state_dict().items()])
    return dict(source="sail-sg/metaformer metaformer_baselines.py, the model functions' defaults (224 px, "
                       "1000 classes)", models=models)


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + '\n')


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--reference-dir', type=Path, help="the authors' PolyNeXt checkout (commit be990cb)")
    p.add_argument('--metaformer-dir', type=Path,
                   help=f"the authors' MetaFormer checkout (sail-sg/metaformer): writes {METAFORMER_KEYS}")
    p.add_argument('--sets', nargs='+', default=list(COMMITTED), metavar='FOLDER',
                   help=f'golden folders to write (default: the committed ones). Known: {", ".join(SETS)}')
    p.add_argument('--out', type=Path, default=GOLDEN, help='parent folder (default: tests/golden)')
    p.add_argument('--check', action='store_true',
                   help='write into a temporary folder and compare every file with --out byte for byte')
    p.add_argument('--threads', type=int, default=2, help='torch intra-op threads (default 2, as the committed files)')
    args = p.parse_args(argv)
    unknown = [s for s in args.sets if s not in SETS]
    if unknown:
        p.error(f'unknown golden folder {unknown[0]!r}; known: {", ".join(SETS)}')

    if args.reference_dir is None and args.metaformer_dir is None:
        p.error('pass --reference-dir (PolyNeXt golden sets) and / or --metaformer-dir (MetaFormer key list)')

    import torch
    torch.set_num_threads(args.threads)
    bad = 0
    if args.metaformer_dir is not None:
        keys = metaformer_key_list(args.metaformer_dir)
        if not args.check:
            _write_json(args.out / METAFORMER_KEYS, keys)
            print(f'{METAFORMER_KEYS}: {len(keys["models"])} models -> {args.out / METAFORMER_KEYS}')
        else:
            with tempfile.TemporaryDirectory() as tmp:
                _write_json(Path(tmp) / METAFORMER_KEYS, keys)
                same = (args.out / METAFORMER_KEYS).is_file() and filecmp.cmp(
                    Path(tmp) / METAFORMER_KEYS, args.out / METAFORMER_KEYS, shallow=False)
            bad += not same
            print(f'{METAFORMER_KEYS} {"identical" if same else "DIFFERS"}')
    if args.reference_dir is None:
        return 1 if bad else 0
    ref = import_reference(args.reference_dir)
    if not args.check:
        for folder in args.sets:
            meta = generate(ref, folder, args.out / folder)
            print(f'{folder:16s} {meta["param_count"]:>9,d} params  {meta["state_dict_entries"]:>5d} entries  '
                  f'logits mean {meta["logits_mean"]:+.4f} std {meta["logits_std"]:.4f}  '
                  f'fp64 vs fp32 {meta["reproducibility"]["f64_maxdiff"]:.1e}  -> {args.out / folder}')
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for folder in args.sets:
            generate(ref, folder, Path(tmp) / folder)
            names = sorted(f.name for f in (Path(tmp) / folder).iterdir())
            committed = sorted(f.name for f in (args.out / folder).iterdir()) if (args.out / folder).is_dir() else []
            same = [n for n in names if n in committed and filecmp.cmp(Path(tmp) / folder / n, args.out / folder / n,
                                                                       shallow=False)]
            differ = sorted((set(names) | set(committed)) - set(same))
            bad += bool(differ)
            print(f'{folder:16s} {"identical" if not differ else "DIFFERS: " + ", ".join(differ)}')
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
