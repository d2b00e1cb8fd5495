"""``polynext det eval`` as a library function: box and mask AP of a trained detector, or of results files.

* ``evaluate_checkpoint(checkpoint, data=None, ...)``: a run folder, ``best`` / ``last`` ``.safetensors``
  or ``.state.pt`` written by ``polynext det train`` (the architecture and the category ids come from
  the file; the data from ``data`` or the training config), run over the validation images (sharded
  under ``torchrun``), scored with pycocotools; with ``output`` it also writes
  ``results_bbox.json`` / ``results_segm.json`` (the official results format) and ``metrics.json``.
* ``score_results(results, data=None, ...)``: the same scores from results files alone (those
  files, or any other detector's in the official format).

Every problem is found before anything is written: a missing checkpoint, data folder or results
file, a checkpoint whose categories are not the data's (``category ids``), a results file that is
not a COCO results list.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..errors import CheckpointError, ConfigError, DataError

__all__ = ['DetEvaluation', 'evaluate_checkpoint', 'score_results', 'checkpoint_config']


@dataclass
class DetEvaluation:
    metrics: Dict[str, Dict[str, float]]
    source: str
    data: str
    images: int
    is_main: bool = True
    written: Sequence[str] = ()

    def summary(self) -> str:
        from .evaluate import format_metrics
        return f'{self.source} on {self.data} ({self.images} images)\n{format_metrics(self.metrics)}'

    def as_dict(self) -> Dict[str, Any]:
        return dict(source=self.source, data=self.data, images=self.images, metrics=self.metrics)


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in ('best.safetensors', 'last.safetensors', 'last.state.pt'):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f'no best.safetensors, last.safetensors or last.state.pt in {path}; pass a checkpoint '
                              f'written by polynext det train')
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    return path


def checkpoint_config(path: Union[str, Path]):
    """The training config and category ids stored with a detector checkpoint."""
    from ..checkpoint import read_checkpoint, read_safetensors_metadata
    from ..engine.config import apply_overrides
    from .recipes import DetConfig
    path = _weights_file(Path(path))
    if path.suffix == '.safetensors':
        meta = read_safetensors_metadata(path)
        saved, cat_ids = meta.get('polynext_det_config'), meta.get('category_ids')
    else:
        state = read_checkpoint(path)
        saved = state.get('config') if isinstance(state, dict) else None
        cat_ids = state.get('category_ids') if isinstance(state, dict) else None
    if isinstance(saved, str):
        saved = json.loads(saved)
    if isinstance(cat_ids, str):
        cat_ids = json.loads(cat_ids)
    if not isinstance(saved, dict):
        raise CheckpointError(f'{path} holds no detection config; it is not a checkpoint written by polynext det train')
    known = {f.name for f in dataclasses.fields(DetConfig)}
    cfg = apply_overrides(DetConfig(), {k: v for k, v in saved.items() if k in known}, source=str(path))
    return cfg, list(cat_ids or []), path


def _val_source(cfg, data: Optional[str]):
    from .trainer import build_sources
    if data:
        cfg = dataclasses.replace(cfg, data=data, dataset='coco')
    if cfg.dataset == 'coco' and not cfg.data:
        raise ConfigError('pass --data PATH/COCO (the checkpoint does not name its dataset folder)')
    return build_sources(cfg, need_train=False)[1]


def _write(output: Optional[Union[str, Path]], bbox: List[dict], segm: List[dict],
           result: 'DetEvaluation') -> List[str]:
    if output is None:
        return []
    from ..checkpoint import atomic_write
    from .evaluate import write_results
    out = Path(output)
    paths = [write_results(out / 'results_bbox.json', bbox), write_results(out / 'results_segm.json', segm)]
    text = json.dumps(result.as_dict(), indent=1) + '\n'
    paths.append(atomic_write(out / 'metrics.json', lambda tmp: Path(tmp).write_text(text)))
    return [str(p) for p in paths]


def evaluate_checkpoint(checkpoint: Union[str, Path], data: Optional[str] = None, device: str = 'auto',
                        workers: int = 4, limit: Optional[int] = None, output: Optional[Union[str, Path]] = None,
                        show_progress: bool = False) -> DetEvaluation:
    """Box and mask AP of a trained detector (see the module doc)."""
    from torch.utils.data import Subset
    from ..engine.data import make_loader
    from ..engine.determinism import ShardSampler
    from ..engine.distributed import all_gather_objects, cleanup_distributed, init_distributed
    from .data import DetSamples, collate, require_pycocotools
    from .detector import load_detector
    from .evaluate import coco_evaluate, run_inference
    from .trainer import evaluate_sources
    from .transforms import EvalTransform
    require_pycocotools()
    cfg, cat_ids, path = checkpoint_config(checkpoint)
    source = _val_source(cfg, data)
    if cat_ids and list(cat_ids) != list(source.cat_ids):
        raise DataError(f'the checkpoint was trained on {len(cat_ids)} categories (ids {cat_ids[:5]}...) but '
                        f'{source.description} has {len(source.cat_ids)} (ids {list(source.cat_ids)[:5]}...); '
                        f'evaluate on the dataset it was trained on')
    env = init_distributed(device)
    try:
        model = load_detector(path).to(env.device)
        ds = DetSamples(source, EvalTransform(cfg.test_scale, cfg.max_size), train=False)
        if limit:
            ds = Subset(ds, range(min(limit, len(ds))))
        sampler = ShardSampler(len(ds), env.world_size, env.rank)
        loader = make_loader(ds, sampler, 1, workers, seed=0, collate_fn=collate)
        parts = all_gather_objects(run_inference(model, loader, env.device, source.cat_ids,
                                                 show_progress=env.is_main and show_progress, total=len(sampler)))
        names = sorted({source.name_of(i) for p in parts for i in p[3]})
        if names:
            raise DataError(f'{len(names)} image(s) cannot be read, e.g. {", ".join(names[:3])}; fix or remove them')
        bbox = [r for p in parts for r in p[0]]
        segm = [r for p in parts for r in p[1]]
        ids = [i for p in parts for i in p[2]]
        result = DetEvaluation({}, str(path), source.description, len(ids), is_main=env.is_main)
        if env.is_main:
            result.metrics = coco_evaluate(evaluate_sources(source), dict(bbox=bbox, segm=segm), ids)
            result.written = _write(output, bbox, segm, result)
    finally:
        cleanup_distributed()
    return result


def score_results(results: Sequence[Union[str, Path]], data: Optional[str] = None, dataset: str = 'coco',
                  output: Optional[Union[str, Path]] = None) -> DetEvaluation:
    """Box / mask AP of results files in the official format (box results: entries with ``bbox``; mask
    results: entries with ``segmentation``) against the validation annotations of ``data``."""
    from .evaluate import coco_evaluate, load_results
    from .recipes import DetConfig
    from .trainer import evaluate_sources
    loaded = {str(p): load_results(p) for p in results}      # every file checked before anything runs
    source = _val_source(dataclasses.replace(DetConfig(), dataset=dataset), data)
    by_type: Dict[str, List[dict]] = {}
    for p, res in loaded.items():
        kind = 'segm' if res and 'segmentation' in res[0] else 'bbox'
        if kind in by_type:
            raise DataError(f'two {kind} results files given ({p}); pass one box and / or one mask results file')
        by_type[kind] = res
    unknown = sorted({r['category_id'] for res in by_type.values() for r in res} - set(source.cat_ids))
    if unknown:
        raise DataError(f'the results use category ids {unknown[:5]} that {source.description} does not have; they '
                        f'belong to another dataset')
    result = DetEvaluation(coco_evaluate(evaluate_sources(source), by_type), ', '.join(loaded), source.description,
                           len(source))
    if output is not None:
        from ..checkpoint import atomic_write
        text = json.dumps(result.as_dict(), indent=1) + '\n'
        result.written = [str(atomic_write(Path(output) / 'metrics.json', lambda tmp: Path(tmp).write_text(text)))]
    return result
