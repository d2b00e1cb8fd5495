"""Run the robustness protocols for one or several models, resumably.

The work is a list of *cells*: the clean val set, each ImageNet-C (corruption, severity)
folder, ImageNet-A, ImageNet-R and Sketch. Every model still missing a cell is run on the
same decoded batches (a comparison of M models reads and decodes each image once, not M
times), and each finished cell's results are written at once, atomically, to
``OUTPUT/state.json``, keyed by

    model label + architecture + weights fingerprint (a hash of the state dict) + normalisation
    | dataset | cell | folder | protocol

so a run that is killed continues from the finished cells, and a changed checkpoint, folder
or protocol is evaluated afresh instead of reusing stale numbers.

``evaluate()`` of ``polynext.train.validate`` scores one model per pass over a loader; the
loop here is written out because it scores all pending models per batch (see above). It keeps
``evaluate``'s conventions: eval mode, fp32, channels-last input, unreadable images skipped
and counted (``Samples``), sums all-reduced over ranks (``ShardSampler`` shards, no padding).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..checkpoint import atomic_write, remove_stale_temporary_files
from ..engine.data import readable_batches
from ..engine.distributed import all_reduce_sums, is_main, rank, world_size
from ..engine.run import progress
from ..errors import ConfigError, DataError
from .class_maps import subset_map
from .datasets import expected_classes, missing_cells_message, open_cell_dataset, resolve_class_root, scan_imagenet_c
from .protocols import DATASETS, PROTOCOLS, Protocol, alexnet_reference, score_imagenet_c

__all__ = ['ModelEntry', 'RobustnessData', 'Cell', 'ProtocolHead', 'ResultStore', 'weights_fingerprint',
           'plan_cells', 'run_robustness', 'RobustnessReport']

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 1000
STATE_FORMAT = 'polynext.robustness.state/1'
REPORT_FORMAT = 'polynext.robustness/1'


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of every tensor of the state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f'{name}|{t.dtype}|{tuple(t.shape)}|'.encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class ModelEntry:
    """A 1000-way ImageNet classifier to evaluate, with where its weights came from."""
    label: str
    model: nn.Module
    source: str = ''
    architecture: str = ''
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    fingerprint: str = ''

    def __post_init__(self):
        if not self.fingerprint:
            self.fingerprint = weights_fingerprint(self.model)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)

    @classmethod
    def from_model(cls, label: str, model: nn.Module, source: str = '', architecture: str = '') -> 'ModelEntry':
        """Normalisation from the model's timm ``pretrained_cfg`` (ImageNet mean / std without one)."""
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        return cls(label=label, model=model, source=source, architecture=architecture or label,
                   mean=tuple(cfg.get('mean') or IMAGENET_MEAN), std=tuple(cfg.get('std') or IMAGENET_STD))

    def key(self) -> str:
        """What a cell result depends on from the model: label and architecture (two models can share
        a state dict and still compute differently), weights, normalisation."""
        norm = ','.join(f'{v:.6g}' for v in self.mean + self.std)
        return f'{self.label}|{self.architecture}|{self.fingerprint}|{norm}'


class ProtocolHead(nn.Module):
    """Normalise with the model's mean / std, run it, keep the protocol's logit columns."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 indices: Optional[Sequence[int]] = None):
        super().__init__()
        self.model = model
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        idx = torch.tensor(list(indices), dtype=torch.long) if indices is not None else None
        self.register_buffer('indices', idx, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model((x - self.mean) / self.std)
        if logits.dim() != 2 or logits.shape[1] != NUM_CLASSES:
            raise ConfigError(f'the model returns logits of shape {tuple(logits.shape)}; the robustness protocols '
                              f'need a 1000-way ImageNet-1k classifier')
        return logits.float() if self.indices is None else logits.index_select(1, self.indices).float()


@dataclass
class RobustnessData:
    """The dataset folders to evaluate (any subset)."""
    val: Optional[Path] = None
    imagenet_c: Optional[Path] = None
    imagenet_a: Optional[Path] = None
    imagenet_r: Optional[Path] = None
    sketch: Optional[Path] = None

    def requested(self) -> List[str]:
        return [d for d in DATASETS if self.path(d) is not None]

    def path(self, dataset: str) -> Optional[Path]:
        value = getattr(self, 'val' if dataset == 'clean' else dataset)
        return Path(value).expanduser() if value is not None else None


@dataclass(frozen=True)
class Cell:
    """One folder of wnid folders evaluated under one protocol."""
    dataset: str
    root: Path
    corruption: Optional[str] = None
    severity: Optional[int] = None

    @property
    def protocol(self) -> Protocol:
        return PROTOCOLS[self.dataset]

    @property
    def name(self) -> str:
        return f'{self.corruption}/{self.severity}' if self.corruption else ''

    @property
    def label(self) -> str:
        return f'{self.protocol.title} {self.name}'.strip()

    def key(self, entry: ModelEntry) -> str:
        return '|'.join([entry.key(), self.dataset, self.name, str(self.root.resolve()), self.protocol.signature()])


def plan_cells(data: RobustnessData, allow_partial: bool = False) -> Tuple[List[Cell], Dict[str, dict]]:
    """The cells to evaluate and what is known about each dataset folder (checked before any work)."""
    cells: List[Cell] = []
    info: Dict[str, dict] = {}
    requested = data.requested()
    if not requested:
        raise ConfigError('nothing to evaluate: pass at least one of --imagenet-c, --imagenet-a, --imagenet-r, '
                          '--sketch, --val')
    for dataset in requested:
        path = data.path(dataset)
        protocol = PROTOCOLS[dataset]
        if dataset == 'imagenet_c':
            layout = scan_imagenet_c(path)
            if layout.missing and not allow_partial:
                raise DataError(f'ImageNet-C at {layout.root} is incomplete: missing {missing_cells_message(layout)}. '
                                f'The mCE needs all 15 corruptions × 5 severities; pass --allow-partial to evaluate '
                                f'what is there (the mCE is then reported as partial, with the missing cells listed)')
            cells += [Cell(dataset, p, c, s) for (c, s), p in layout.cells.items()]
            info[dataset] = dict(path=str(layout.root), protocol=protocol.describe(), cells=len(layout.cells),
                                 complete=layout.complete, missing=list(layout.missing),
                                 ignored_folders=list(layout.ignored))
        else:
            root = resolve_class_root(path, dataset)
            cells.append(Cell(dataset, root))
            info[dataset] = dict(path=str(root), protocol=protocol.describe())
    return cells, info


class ResultStore:
    """Finished cells, ``OUTPUT/state.json``, rewritten atomically after every cell."""

    FILE = 'state.json'

    def __init__(self, folder: Path, writable: bool = True):
        self.path = Path(folder) / self.FILE
        self.writable = writable
        self.cells: Dict[str, dict] = {}
        if writable:          # a write killed before its rename left its temporary file: nothing else removes it
            remove_stale_temporary_files(self.path.parent)
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError as e:
                raise DataError(f'{self.path} is not valid JSON ({e}); delete it to start the evaluation afresh') from None
            if not isinstance(data, dict) or data.get('format') != STATE_FORMAT:
                raise DataError(f'{self.path} is not a polynext robustness state file; use another --output folder')
            self.cells = dict(data.get('cells') or {})

    def get(self, key: str) -> Optional[dict]:
        return self.cells.get(key)

    def put_many(self, items: Dict[str, dict]) -> None:
        self.cells.update(items)
        if self.writable:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(dict(format=STATE_FORMAT, cells=self.cells), indent=1) + '\n'
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))


@torch.no_grad()
def score_cell(heads: Sequence[nn.Module], loader, device: torch.device, show_progress: bool = False,
               desc: str = '') -> Tuple[List[Dict[str, float]], int, List[int]]:
    """Top-1 / top-5 (%) of every head over the loader (all ranks); unreadable count; this rank's
    unreadable indices. Hits are counted on the device (no host sync per batch)."""
    hits = torch.zeros(len(heads), 2, dtype=torch.long, device=device)      # (top-1, top-5) per head
    n = 0
    skipped: List[int] = []
    for h in heads:
        h.eval()
    for x, y in readable_batches(progress(loader, total=len(loader), desc=desc, enabled=show_progress), skipped):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        for i, head in enumerate(heads):
            topk = head(x).topk(5, dim=1).indices
            hits[i, 0] += (topk[:, 0] == y).sum()
            hits[i, 1] += (topk == y[:, None]).any(dim=1).sum()
        n += len(y)
    sums = {'n': float(n), 'unreadable': float(len(skipped))}
    for i, (h1, h5) in enumerate(hits.tolist()):
        sums[f'top1/{i}'], sums[f'top5/{i}'] = float(h1), float(h5)
    total = all_reduce_sums(sums)
    images = max(total['n'], 1.0)
    results = [dict(top1=100.0 * total[f'top1/{i}'] / images, top5=100.0 * total[f'top5/{i}'] / images,
                    images=int(total['n'])) for i in range(len(heads))]
    return results, int(total['unreadable']), skipped


def _transform(protocol: Protocol):
    """The protocol's resize / crop and ToTensor; normalisation happens per model on the device."""
    from ..train.data import build_eval_transform
    return build_eval_transform(protocol.resize, protocol.crop, protocol.interpolation, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _indices(protocol: Protocol) -> Optional[Tuple[int, ...]]:
    return subset_map(protocol.subset).in1k_indices if protocol.subset else None


@dataclass
class RobustnessReport:
    """Results of every model (``models``, in input order) and what was evaluated (``datasets``)."""
    models: List[Dict[str, Any]]
    datasets: Dict[str, dict]
    relative_mce: bool = False
    notes: List[str] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        ref = alexnet_reference()
        return dict(format=REPORT_FORMAT, datasets=self.datasets, notes=self.notes,
                    alexnet=dict(mce_errors=dict(ref.mce_errors), clean_error=ref.clean_error,
                                 severity_errors={c: list(v) for c, v in ref.severity_errors.items()}
                                 if self.relative_mce else None),
                    models=self.models)


def _round(v: Optional[float], nd: int = 4) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else round(float(v), nd)


def _model_result(entry: ModelEntry, cells: List[Cell], store: ResultStore, relative: bool) -> Dict[str, Any]:
    out: Dict[str, Any] = dict(model=entry.label, architecture=entry.architecture, weights=entry.source,
                               fingerprint=entry.fingerprint, mean=list(entry.mean), std=list(entry.std))
    c_cells: Dict[str, dict] = {}
    top1: Dict[str, Dict[int, float]] = {}
    for cell in cells:
        r = store.get(cell.key(entry))
        if r is None:       # not evaluated (cannot happen after a full run)
            continue
        r = {k: (_round(v) if isinstance(v, float) else v) for k, v in r.items()}
        if cell.dataset == 'imagenet_c':
            c_cells[cell.name] = r
            top1.setdefault(cell.corruption, {})[cell.severity] = r['top1']
        else:
            out[cell.dataset] = r
    if any(c.dataset == 'imagenet_c' for c in cells):
        clean = out.get('clean', {}).get('top1') if relative else None
        score = score_imagenet_c(top1, clean_top1=clean).as_dict()
        for c, s in score['corruptions'].items():
            s.update({k: _round(v) for k, v in s.items() if isinstance(v, float)})
        score.update(mce=_round(score['mce']), relative_mce=_round(score['relative_mce']), cells=c_cells)
        out['imagenet_c'] = score
    return out


def _coverage_notes(cells: List[Cell], store: ResultStore, entry: ModelEntry) -> List[str]:
    notes = []
    c_min = None
    for cell in cells:
        r = store.get(cell.key(entry)) or {}
        found, expected = r.get('classes'), r.get('expected_classes')
        if found is None or expected is None or found >= expected:
            continue
        if cell.dataset == 'imagenet_c':
            c_min = found if c_min is None else min(c_min, found)
        else:
            notes.append(f'{cell.label}: {found} of the {expected} class folders are present; its accuracy covers '
                         f'those classes only')
    if c_min is not None:
        notes.append(f'ImageNet-C: some cells hold fewer than 1000 class folders (as few as {c_min})')
    return notes


def run_robustness(entries: Sequence[ModelEntry], data: RobustnessData, output: Path, *, allow_partial: bool = False,
                   relative_mce: bool = False, batch_size: int = 128, workers: int = 4,
                   device: Optional[torch.device] = None, show_progress: bool = True,
                   log: Optional[Callable[[str], None]] = None) -> RobustnessReport:
    """Evaluate every model on every requested dataset (finished cells in ``output`` are reused)."""
    from torch.utils.data import DataLoader

    from ..engine.determinism import ShardSampler

    main = is_main()
    say = (log or print) if main else (lambda _m: None)
    if not entries:
        raise ConfigError('no model to evaluate')
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f'model labels must be unique, got {labels}')
    if relative_mce and data.imagenet_c is None:
        raise ConfigError('--relative-mce is an ImageNet-C score: pass --imagenet-c DIR too')
    if relative_mce and data.val is None:
        raise ConfigError('the relative mCE needs the clean top-1 of each model: pass --val DIR (the ImageNet-1k val '
                          'folder) with --relative-mce')
    cells, info = plan_cells(data, allow_partial=allow_partial)
    device = device or torch.device('cpu')
    output = Path(output)
    store = ResultStore(output, writable=main)

    todo = [(cell, [e for e in entries if store.get(cell.key(e)) is None]) for cell in cells]
    total = len(cells) * len(entries)
    pending_total = sum(len(p) for _, p in todo)
    if pending_total < total:
        say(f'resuming from {store.path}: {total - pending_total} of {total} evaluations (cells × models) are done, '
            f'{pending_total} to go')
    if 'imagenet_c' in info and not info['imagenet_c']['complete']:
        say(f"ImageNet-C is partial (--allow-partial): missing {', '.join(info['imagenet_c']['missing'])}")

    for entry in entries:
        entry.model.to(device, memory_format=torch.channels_last).eval()
    step = 0
    n_steps = sum(1 for _, p in todo if p)
    for cell, pending in todo:
        if not pending:
            continue
        step += 1
        protocol = cell.protocol
        dataset, n_classes = open_cell_dataset(cell.root, protocol, cell.dataset, _transform(protocol))
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                            sampler=ShardSampler(len(dataset), world_size(), rank()),
                            pin_memory=device.type == 'cuda')
        heads = [ProtocolHead(e.model, e.mean, e.std, _indices(protocol)).to(device) for e in pending]
        t0 = time.perf_counter()
        results, unreadable, skipped = score_cell(heads, loader, device, show_progress=show_progress and main,
                                                  desc=f'[{step}/{n_steps}] {cell.label}')
        seconds = time.perf_counter() - t0
        extra = dict(classes=n_classes, expected_classes=expected_classes(protocol), unreadable=unreadable,
                     seconds=round(seconds, 2))
        if skipped:
            extra['unreadable_examples'] = [dataset.path_of(i) for i in skipped[:5]]
        store.put_many({cell.key(e): dict(r, **extra) for e, r in zip(pending, results)})
        scores = ', '.join(f'{e.label} {r["top1"]:.2f}%' for e, r in zip(pending, results))
        images = results[0]['images']
        say(f'[{step}/{n_steps}] {cell.label}: top-1 {scores} ({images} images, {seconds:.1f} s, '
            f'{images / max(seconds, 1e-9):.0f} img/s)')
        if unreadable:
            say(f'  warning: {unreadable} unreadable image(s) in {cell.root} were left out, e.g. '
                f'{", ".join(extra.get("unreadable_examples", []))}')

    models = [_model_result(e, cells, store, relative_mce) for e in entries]
    notes = _coverage_notes(cells, store, entries[0])
    return RobustnessReport(models=models, datasets=info, relative_mce=relative_mce, notes=notes)
