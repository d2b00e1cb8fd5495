"""``polynext fhe moonshot``: a deeper, multi-stage fully polynomial PolyNeXt with bootstrapping (OpenFHE).

The model is the ``cpolynext_fhe_digits_deep`` recipe (the low-resolution CPolyNeXt-LR scaled to this
machine: 3 stages of 2 cells, stride-2 reductions, bn norms; 8x8 digits), trained through the engine
(weights shipped). Its folded program needs far more levels than any leveled 128-bit ring holds, so
the compiler places bootstraps (OpenFHE ``EvalBootstrap``, level budget [2, 2], 18 levels each) at
block / merge boundaries where the budget runs out, and scales each bootstrapped residual stream into
[−0.25, 0.25] from calibration ranges (folded into the neighbouring linear maps: no extra level).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..errors import ConfigError
from .analyze import OPENFHE_BOOT_RUN, calibration_ranges
from .graph import build_graph, evaluate
from .params import CKKSParams
from .program import CompileOptions, LevelBudgetError, compile_graph, pack_images, unpack_logits

__all__ = ['DEEP_WEIGHTS', 'run_moonshot', 'format_moonshot']

DEEP_WEIGHTS = Path(__file__).resolve().parent.parent / 'data' / 'fhe_digits_deep.safetensors'


def run_moonshot(n_images: int = 4, insecure_ring: Optional[int] = None, weights: Optional[str] = None, log=print) -> Dict[str, Any]:
    from ..models.folded import fold_for_inference
    from .demo import _cpu_name, digits_arrays, load_demo_model
    from .openfhe_backend import find_openfhe_python, run_openfhe
    python = find_openfhe_python()
    if python is None:
        raise ConfigError('the moonshot needs the OpenFHE backend: `polynext fhe openfhe --setup` (Python 3.10)')
    model, meta = load_demo_model(weights or str(DEEP_WEIGHTS))
    ev = meta.get('eval') or {}
    xtr, _, xva, yva = digits_arrays(int(model.img_size[0]), ev.get('mean', (0.5,) * 3), ev.get('std', (0.5,) * 3))
    folded = fold_for_inference(model.double())
    graph = build_graph(folded)
    ranges = calibration_ranges(graph, xtr[:512])
    b = dict(OPENFHE_BOOT_RUN)
    if insecure_ring is not None:       # a toy ring has no security bound on the modulus: more levels per bootstrap
        b['depth'] = b['toy_depth']
    ring = insecure_ring or b['ring_dim']
    params = CKKSParams(ring, b['depth'], b['scale_bits'], b['first_bits'], 60, insecure=insecure_ring is not None)
    try:
        prog = compile_graph(graph, CompileOptions(slots=ring // 2, max_depth=b['depth'] - 1,
                                                   bootstrap_depth=b['boot_depth'], ranges=ranges))
    except LevelBudgetError as e:
        raise ConfigError(f"the moonshot does not fit OpenFHE's bootstrapping at N=2^{ring.bit_length() - 1}: depth "
                          f"{b['depth']}, {b['boot_depth']} per bootstrap, so {b['depth'] - 1 - b['boot_depth']} "
                          f"levels between bootstraps ({e})") from e
    counts = prog.counts()
    log(f"model: {meta.get('architecture')} {meta.get('model_kwargs')}: {graph.ct_products()} ct×ct products, "
        f"{len([s for s in graph.segments if s.kind == 'block'])} blocks")
    log(f"parameters: N=2^{ring.bit_length() - 1}, depth {b['depth']} ({b['boot_depth']} per bootstrap), "
        f"{'INSECURE toy ring' if params.insecure else '128-bit (HE standard)'}; program: {counts.get('boot', 0)} "
        f"bootstraps, {counts.get('rot', 0)} rotations, {counts.get('mulp', 0)} plaintext mults per ciphertext, "
        f"{prog.packing.images} images per ciphertext")
    x = xva[:n_images]
    with torch.no_grad():
        ref = model.float()(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    load_start = os.getloadavg()[0]
    res = run_openfhe(prog, params, pack_images(prog, x), python=python)
    logits = unpack_logits(prog, res['outputs'], n_images)
    at_128 = fit_128bit(graph, ranges)
    out = dict(model=meta.get('architecture'), model_kwargs=meta.get('model_kwargs'), images=n_images,
               ring_dim=ring, security='INSECURE' if params.insecure else '128-bit', depth=b['depth'],
               boot_depth=b['boot_depth'], levels=prog.levels, bootstraps_per_ciphertext=counts.get('boot', 0),
               rotations=counts.get('rot', 0), plaintext_mults=counts.get('mulp', 0),
               ct_ct_products=graph.ct_products(), images_per_ciphertext=prog.packing.images,
               argmax_agreement=float((logits.argmax(1) == ref.argmax(1)).mean()),
               max_abs_logit_diff=float(np.abs(logits - ref).max()), max_abs_logit=float(np.abs(ref).max()),
               encrypted_accuracy=float((logits.argmax(1) == yva[:n_images]).mean()),
               plaintext_accuracy=float((ref.argmax(1) == yva[:n_images]).mean()),
               seconds_keygen=res['seconds_keygen'], seconds_per_ciphertext=res['seconds_per_ciphertext'],
               seconds_bootstrap_mean=res['seconds_bootstrap_total'] / max(res['bootstraps'], 1),
               peak_rss_bytes=res['peak_rss_bytes'], cpu_seconds=res['cpu_seconds'], seconds_wall=res['seconds_wall'],
               at_128bit=at_128,
               openfhe_boot_depth_measured=res['boot_depth'], scale_bits=b['scale_bits'], first_bits=b['first_bits'],
               cpu=_cpu_name(), load_average=[round(load_start, 2), round(os.getloadavg()[0], 2)])
    return out


def fit_128bit(graph, ranges) -> str:
    """Whether the model's program fits OpenFHE's bootstrapping at 128-bit, N=2^16 (``OPENFHE_BOOT_RUN``), in words."""
    b = OPENFHE_BOOT_RUN
    left = b['depth'] - 1 - b['boot_depth']
    try:
        prog = compile_graph(graph, CompileOptions(slots=b['ring_dim'] // 2, max_depth=b['depth'] - 1,
                                                   bootstrap_depth=b['boot_depth'], ranges=ranges, numeric=False))
    except LevelBudgetError as e:
        return (f"does not fit N=2^16 (depth {b['depth']} with a {b['scale_bits']}-bit scale is OpenFHE's maximum, "
                f"{b['boot_depth']} per bootstrap: {left} levels between bootstraps; {e}); it needs N=2^17")
    return f"fits N=2^16 with {prog.counts().get('boot', 0)} bootstraps per ciphertext"


def format_moonshot(r: Dict[str, Any]) -> str:
    return '\n'.join([
        f"moonshot: {r['images']} digits, N={r['ring_dim']} ({r['security']}), {r['levels']} levels used of "
        f"{r['depth']}, {r['bootstraps_per_ciphertext']} bootstraps per ciphertext",
        f"  argmax agreement {100 * r['argmax_agreement']:.1f} %, max |Δ logit| {r['max_abs_logit_diff']:.2e} "
        f"(logits up to {r['max_abs_logit']:.2f}); accuracy encrypted {100 * r['encrypted_accuracy']:.1f} % / "
        f"plaintext {100 * r['plaintext_accuracy']:.1f} %",
        f"  keys {r['seconds_keygen']:.1f} s, per ciphertext {np.mean(r['seconds_per_ciphertext']):.1f} s "
        f"(bootstrap {r['seconds_bootstrap_mean']:.2f} s each), worker peak memory {r['peak_rss_bytes'] / 2 ** 30:.2f} GiB",
        f"  at 128-bit: {r['at_128bit']}",
    ])
