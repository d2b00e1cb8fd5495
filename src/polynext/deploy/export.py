"""Export a model to ONNX (torch's dynamo exporter) or a ``torch.export`` program (``.pt2``).

Every export is checked before it is kept: the exported graph (in ONNX Runtime, or the loaded
program) runs on random inputs next to the eager model and must agree within ``atol`` (1e-4);
the file is written to a temporary name and renamed only after the check (and, for
``polynomial_only``, the op-set check) passed, so a failed export leaves nothing behind.

Input sizes: the batch is always dynamic. Height and width are dynamic where the model allows it
(any PolyNeXt LN model, IdentityFormer / PoolFormerV2 / ConvFormer / CAFormer, RandFormer built
with ``dynamic_img_size``), from one more than the network's total stride up (smaller inputs
would give 1-pixel maps, which ``torch.export`` specialises). The bn variants and a plain
RandFormer are fixed to the size they were built for (their norms / mixing matrices hold
per-position constants), and the export says so.

ONNX files carry polynext's metadata (``metadata_props``): the format tag, the architecture and
its arguments, the class count (and names, from a checkpoint), the input description, the
preprocessing (``pretrained_cfg`` and a checkpoint's eval transform), whether it was folded, and
the measured parity. ``polynext validate --runtime onnxruntime`` and ``polynext bench`` read it.
"""
from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import ConfigError, PolyNeXtError

__all__ = ['ExportError', 'InputSpec', 'ParityCheck', 'ExportResult', 'input_spec', 'export_onnx', 'export_program',
           'export_metadata', 'ONNX_FORMAT_TAG', 'ONNX_INPUT', 'ONNX_OUTPUT', 'DEFAULT_ATOL']

ONNX_FORMAT_TAG = 'polynext-onnx/1'
PROGRAM_FORMAT_TAG = 'polynext-torch-export/1'
ONNX_INPUT, ONNX_OUTPUT = 'image', 'logits'
DEFAULT_ATOL = 1e-4


class ExportError(PolyNeXtError, RuntimeError):
    """An export failed its check (parity or op set); nothing was written."""


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------

@dataclass
class InputSpec:
    """What the exported graph takes: (batch, channels, height, width), batch always dynamic."""
    channels: int
    height: int
    width: int
    dynamic_size: bool
    min_size: int = 1
    fixed_reason: str = ''

    def describe(self) -> str:
        if self.dynamic_size:
            return (f'input (batch, {self.channels}, height, width): batch, height and width dynamic '
                    f'(height, width >= {self.min_size}); traced at {self.height}x{self.width}')
        return (f'input (batch, {self.channels}, {self.height}, {self.width}): batch dynamic, size fixed '
                f'({self.fixed_reason})')

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _total_stride(model: nn.Module) -> int:
    info = getattr(model, 'feature_info', None)
    try:
        last = info[-1] if isinstance(info, list) else info.info[-1]
        return int(last['reduction'])
    except (TypeError, AttributeError, IndexError, KeyError):
        return 32


def _fixed_size(model: nn.Module) -> Optional[Tuple[Tuple[int, int], str]]:
    """(size, why) for a model that only runs at the size it was built for, else None."""
    from ..models.folded import FoldedPolyNeXt
    from ..models.metaformer_baselines import RandFormer
    from ..models.polynext import PolyNeXt
    if isinstance(model, (PolyNeXt, FoldedPolyNeXt)) and model.norm_kind == 'bn':
        h, w = model.img_size
        return (h, w), (f'a bn variant: its norms hold per-position statistics for {h}x{w} inputs; build the model '
                        f'with img_size=N for another size')
    if isinstance(model, RandFormer) and not model.dynamic_img_size:
        h, w = model.img_size
        return (h, w), (f'RandFormer: its random mixing matrices are built for {h}x{w} inputs (build it with '
                        f'dynamic_img_size=True for any size)')
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if cfg.get('fixed_input_size'):
        h, w = cfg['input_size'][-2:]
        return (h, w), f"the model's pretrained_cfg fixes the input size to {h}x{w}"
    return None


def _channels(model: nn.Module) -> int:
    if hasattr(model, 'in_chans'):
        return int(model.in_chans)
    stem = getattr(model, 'stem', None)
    if isinstance(stem, nn.Conv2d):
        return stem.in_channels
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return int(cfg.get('input_size', (3,))[0])


def _default_size(model: nn.Module) -> Tuple[int, int]:
    size = getattr(model, 'img_size', None)
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    h, w = cfg.get('input_size', (3, 224, 224))[-2:]
    return int(h), int(w)


def input_spec(model: nn.Module, img_size: Optional[int] = None, name: str = 'the model') -> InputSpec:
    """The export's input description. ``img_size`` picks the traced (or, fixed, the only) size;
    a fixed-size model asked for another size is an error naming the way out."""
    channels = _channels(model)
    fixed = _fixed_size(model)
    if fixed is not None:
        (h, w), why = fixed
        if img_size is not None and (img_size, img_size) != (h, w):
            raise ConfigError(f'{name} was built for {h}x{w} inputs and cannot be exported at {img_size}x{img_size} '
                              f'({why.split(":")[0]}); drop --img-size, or export a model built and trained at '
                              f'{img_size} (img_size={img_size})')
        return InputSpec(channels, h, w, dynamic_size=False, fixed_reason=why)
    h, w = (img_size, img_size) if img_size else _default_size(model)
    stride = _total_stride(model)
    if min(h, w) <= stride:
        raise ConfigError(f'--img-size {min(h, w)} is too small to trace {name}: its total stride is {stride}, so '
                          f'use at least {stride + 1}')
    return InputSpec(channels, h, w, dynamic_size=True, min_size=stride + 1)


def _dynamic_shapes(spec: InputSpec):
    from torch.export import Dim
    dims: Dict[int, Any] = {0: Dim('batch', min=1, max=1 << 20)}
    if spec.dynamic_size:
        dims[2] = Dim('height', min=spec.min_size, max=1 << 16)
        dims[3] = Dim('width', min=spec.min_size, max=1 << 16)
    return (dims,)


def check_shapes(spec: InputSpec) -> List[Tuple[int, int, int, int]]:
    """The shapes the parity check runs: the traced size at batch 2 and 1; for a dynamic size also
    batch 3 at a larger, non-square size."""
    c, h, w = spec.channels, spec.height, spec.width
    shapes = [(2, c, h, w), (1, c, h, w)]
    if spec.dynamic_size:
        step = max(8, spec.min_size - 1)
        shapes.append((3, c, h + step, w + 2 * step))
    return shapes


# --------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------

@dataclass
class ParityCheck:
    shape: Tuple[int, ...]
    max_abs_diff: float
    max_abs_logit: float


@dataclass
class ExportResult:
    path: Path
    format: str
    spec: InputSpec
    checks: List[ParityCheck] = field(default_factory=list)
    seconds: float = 0.0
    report: Any = None
    atol: float = DEFAULT_ATOL

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.checks), default=float('nan'))

    def parity_lines(self, runtime: str) -> List[str]:
        return [f'  {runtime} vs eager, input {tuple(c.shape)}: max |Δ logit| {c.max_abs_diff:.2e} '
                f'(logits up to {c.max_abs_logit:.3g}; tolerance {self.atol:g})' for c in self.checks]


def _parity(eager: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], shapes: Sequence[Tuple[int, ...]],
            atol: float, what: str) -> List[ParityCheck]:
    gen = torch.Generator().manual_seed(0)
    checks = []
    for shape in shapes:
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            ref = eager(x).float()
            out = run(x).float()
        if not torch.isfinite(ref).all():
            raise ExportError(f'the eager model gives non-finite logits on random inputs {shape}, so the export cannot '
                              f'be checked (a bn variant with untrained running statistics does this); export trained '
                              f'weights (--checkpoint), or pass --no-check; nothing was written')
        if out.shape != ref.shape:
            raise ExportError(f'the {what} gives logits of shape {tuple(out.shape)} for input {shape}, eager '
                              f'{tuple(ref.shape)}; nothing was written')
        diff = float((out - ref).abs().max())
        checks.append(ParityCheck(tuple(shape), diff, float(ref.abs().max())))
        if not diff <= atol:
            raise ExportError(f'the {what} differs from the eager model by {diff:.3g} (tolerance {atol:g}) on input '
                              f'{shape}; nothing was written. Report this with the model name and options')
    return checks


# --------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------

def _json_clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def export_metadata(model: nn.Module, architecture: str, model_args: Optional[Dict[str, Any]] = None,
                    checkpoint_meta: Optional[Dict[str, Any]] = None, folded: Optional[str] = None) -> Dict[str, Any]:
    """What an export records about its model (JSON-clean values)."""
    from .. import __version__
    meta = checkpoint_meta or {}
    cfg = {k: v for k, v in (getattr(model, 'pretrained_cfg', None) or {}).items()
           if k in ('input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'num_classes', 'crop_mode')}
    out = dict(polynext_version=__version__, architecture=architecture, model_args=_json_clean(model_args or {}),
               num_classes=int(getattr(model, 'num_classes', 0) or 0), pretrained_cfg=_json_clean(cfg),
               folded=folded or '')
    if isinstance(meta.get('classes'), list):
        out['classes'] = [str(c) for c in meta['classes']]
    if isinstance(meta.get('eval'), dict):
        out['eval'] = _json_clean(meta['eval'])
    return out


# --------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """torch.onnx prints its progress and warns about every dynamic-shape detail; keep ours."""
    import logging
    import warnings
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ('torch.onnx', 'onnxscript', 'torch.export', 'torch._dynamo',
                                             'torch.fx.experimental.symbolic_shapes', 'onnx_ir')]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with contextlib.redirect_stdout(buf):
                yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_error(e: Exception, what: str) -> ConfigError:
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return ConfigError(f'{what} failed: {type(e).__name__}: {first[:300]}')


def onnx_session(path: str, threads: Optional[int] = None):
    """An ONNX Runtime CPU session with polynext's settings (quiet, ``threads`` intra-op threads)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3          # errors only (dynamic shapes make it warn about buffer reuse)
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=['CPUExecutionProvider'])


def export_onnx(model: nn.Module, path, *, spec: InputSpec, metadata: Dict[str, Any], opset: Optional[int] = None,
                check: bool = True, atol: float = DEFAULT_ATOL, report: bool = False, polynomial_only: bool = False,
                threads: Optional[int] = None) -> ExportResult:
    """Export ``model`` to ONNX at ``path`` (see the module docstring). With ``report`` (or
    ``polynomial_only``) the result carries the op-set report; ``polynomial_only`` refuses a
    graph with a non-polynomial operator (naming the first) and writes nothing.

    (timm's ``timm.utils.onnx.onnx_export`` calls the same exporter but writes the file directly,
    checks one input at 1e-3 and has no metadata; here the ``ONNXProgram`` is kept in memory until
    the metadata is added and every check passed.)"""
    from ..checkpoint import atomic_write
    from .op_report import op_set_report
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError(f'ONNX export needs onnx, onnxscript and onnxruntime ({e.name} is missing); install them '
                          f'with pip install "polynext[export]"') from None
    model = model.eval()
    t0 = time.perf_counter()
    x = torch.randn(2, spec.channels, spec.height, spec.width)
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=_dynamic_shapes(spec),
                                        input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT], opset_version=opset,
                                        optimize=True, verbose=False)
    except Exception as e:  # noqa: BLE001  (torch.export raises many types; one line for the user)
        raise _export_error(e, 'the ONNX export') from None
    props = dict(polynext_format=ONNX_FORMAT_TAG, input=json.dumps(spec.to_dict()))
    props.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    result = ExportResult(Path(path), 'onnx', spec, atol=atol)

    def write_and_check(tmp: str) -> None:
        import onnx
        with _quiet():
            program.save(tmp, external_data=False)
        onnx.checker.check_model(tmp, full_check=True)
        proto = onnx.load(tmp)
        if report or polynomial_only:
            result.report = op_set_report(proto)
            if polynomial_only and not result.report.polynomial:
                first = result.report.non_polynomial[0]
                raise ExportError(f'the graph is not polynomial: {first.describe()} is its first non-polynomial '
                                  f'operator ({len(result.report.non_polynomial)} in all); export a bn variant with '
                                  f'--fold (for example cpolynext_t_bn), or drop --polynomial-only; nothing was '
                                  f'written')
        if check:
            session = onnx_session(tmp, threads)
            result.checks = _parity(model, lambda t: torch.from_numpy(
                session.run(None, {ONNX_INPUT: t.contiguous().numpy()})[0]), check_shapes(spec), atol,
                'ONNX Runtime graph')
            props['parity_max_abs_diff'] = f'{result.max_abs_diff:.3e}'
        del proto.metadata_props[:]
        for k, v in props.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, tmp)

    atomic_write(path, write_and_check)
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------------------
# torch.export
# --------------------------------------------------------------------------------------

def export_program(model: nn.Module, path, *, spec: InputSpec, metadata: Dict[str, Any], check: bool = True,
                   atol: float = DEFAULT_ATOL) -> ExportResult:
    """``torch.export`` the model and save the program (``.pt2``) with polynext's metadata as the
    extra file ``polynext.json``; checked by loading it back and running it next to eager."""
    from ..checkpoint import atomic_write
    model = model.eval()
    t0 = time.perf_counter()
    x = torch.randn(2, spec.channels, spec.height, spec.width)
    try:
        with _quiet(), torch.no_grad():
            program = torch.export.export(model, (x,), dynamic_shapes=_dynamic_shapes(spec))
    except Exception as e:  # noqa: BLE001
        raise _export_error(e, 'torch.export') from None
    extra = dict(metadata, polynext_format=PROGRAM_FORMAT_TAG, input=spec.to_dict())
    result = ExportResult(Path(path), 'torch-export', spec, atol=atol)

    def write_and_check(tmp: str) -> None:
        buf = io.BytesIO()      # torch.export wants a name ending in .pt2 or a buffer; the file is a temp name
        torch.export.save(program, buf, extra_files={'polynext.json': json.dumps(extra)})
        Path(tmp).write_bytes(buf.getvalue())
        if check:
            loaded = torch.export.load(io.BytesIO(Path(tmp).read_bytes())).module()
            result.checks = _parity(model, loaded, check_shapes(spec), atol, 'exported program')

    atomic_write(path, write_and_check)
    result.seconds = time.perf_counter() - t0
    return result
