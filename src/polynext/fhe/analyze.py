"""``polynext fhe analyze``: what a fully polynomial PolyNeXt costs under CKKS, per layer and in total.

For a folded bn model it reports, per layer (a fused graph node) and in total:

* ciphertext × ciphertext products on the critical path (the polynomial degree is 2^that), and the
  level (multiplicative depth) at which each layer's output sits in the packed program;
* rotations, plaintext multiplies, ciphertext products, rescales, bootstraps and the Galois keys;
* the value range of every tensor over a calibration set and its *scale headroom*: CKKS keeps
  ``value·Δ`` below the first prime, so |value| must stay below 2^(first − scale − 1); a bootstrapped
  value must lie in [−1, 1] after its range scale;
* the ring dimension, the modulus chain, the security level and the bootstrap count;
* the estimated time and memory per image, from micro-benchmarks of the chosen backend on this
  machine (or, for a backend that is not installed, from stored measurements, labelled as such).

Output: a table, JSON and a PNG of depth and range by layer.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import ConfigError
from .graph import Graph, build_graph, evaluate
from .params import CKKSParams, choose_params
from .program import CompileOptions, Program, compile_graph

__all__ = ['Plan', 'plan_program', 'analyze', 'calibrate_norms', 'calibration_ranges', 'format_report', 'plot_report', 'STORED_COSTS', 'OPENFHE_BOOT', 'OPENFHE_BOOT_RUN',
           'measure_seal_costs', 'estimate']

#: Bootstrapping parameters of the OpenFHE backend (N = 2^16, 128-bit classic, uniform ternary secret, level
#: budget [2, 2], FLEXIBLEAUTO, 40-bit scale, 60-bit first prime): the total depth OpenFHE allows at 2^16 and
#: the levels one bootstrap consumes (OpenFHE's GetBootstrapDepth), so a bootstrapped ciphertext has
#: ``depth - boot_depth`` levels left.
#: Caveat (measured, /tmp probe in the README): OpenFHE's EvalBootstrap refuses this set at run time, since
#: first − scale = 20 exceeds its correction factor ("Degree [20] must be less than or equal to the correction
#: factor [11]" at N=2^12); the sets it accepts (gap ≤ 8) leave 2–8 levels per bootstrap at 128-bit, N=2^16
#: (see ``OPENFHE_BOOT_RUN``), so the bootstrap counts planned with this set are lower bounds.
OPENFHE_BOOT = dict(ring_dim=65536, depth=29, boot_depth=18, scale_bits=40, first_bits=60)
#: What the OpenFHE worker actually runs with bootstrapping: first − scale = 8 (accepted by EvalBootstrap's
#: correction factor at N=2^12 and 2^16), and at 128-bit the largest depth OpenFHE 1.6.1 accepts at N=2^16 for a
#: 52-bit scale: 23, i.e. 5 levels left after a bootstrap (measured with GenCryptoContext, HEStd_128_classic).
OPENFHE_BOOT_RUN = dict(ring_dim=65536, depth=23, boot_depth=18, scale_bits=52, first_bits=60, toy_depth=29)

#: Per-op seconds measured on this machine kind (2-core AMD EPYC Zen 4, one thread, quiet), at the top level of
#: the chain: SEAL at N=2^15 with 12 levels, OpenFHE at N=2^15 / 2^16 (shared/notes/fhe.md). Used when the
#: backend cannot be benchmarked here (not installed, or a ring SEAL does not support at 128-bit).
STORED_COSTS = {
    ('seal', 32768): dict(rot=0.095, mul=0.104, mulp=0.003, encode=0.012, add=0.0005, rs=0.012, boot=None),
    ('openfhe', 32768): dict(rot=0.158, mul=0.147, mulp=0.006, encode=0.012, add=0.0005, rs=0.012, boot=None),
    ('openfhe', 65536): dict(rot=0.35, mul=0.33, mulp=0.013, encode=0.026, add=0.001, rs=0.026, boot=48.5),
}
OPENFHE_BOOT_KEYS_BYTES = int(13.9e9)   # measured RSS of an N=2^16 bootstrapping setup (keys included)
#: OpenFHE's rotation key (HYBRID key switching, its default digit count) over a fresh ciphertext of the same
#: chain, serialised: 3.80 at depth 29 and 3.78 at depth 45 (openfhe 1.6.1, N=2^12; the ratio does not depend
#: on N). SEAL's keys have one component per prime instead: (L+1) x 2 x (L+2) residue polynomials.
OPENFHE_KEY_OVER_CT = 3.8


@dataclass
class Plan:
    graph: Graph
    program: Program
    params: CKKSParams
    backend: str                        # 'seal' | 'openfhe' | 'sim'
    ranges: Dict[int, float] = field(default_factory=dict)
    bootstrapping: bool = False
    #: the same graph compiled with no level limit (no bootstraps): its depth is the levels the whole network
    #: consumes, which a bootstrapped program spreads over its bootstraps
    leveled: Optional[Program] = None


def calibrate_norms(model, images: np.ndarray) -> None:
    """Set the bn variants' running statistics from ``images`` (:func:`calibrate_running_stats`): for the
    analysis of a model without trained weights."""
    import torch
    from ..models.polynext import calibrate_running_stats
    calibrate_running_stats(model, torch.as_tensor(np.asarray(images), dtype=next(model.parameters()).dtype))


def calibration_ranges(graph: Graph, images: np.ndarray, batch: int = 64) -> Dict[int, float]:
    """max |value| of every graph node over ``images`` (normalised, (B, C, H, W))."""
    out: Dict[int, float] = {}
    for k in range(0, len(images), batch):
        _, vals = evaluate(graph, images[k:k + batch], keep=True)
        for i, v in vals.items():
            out[i] = max(out.get(i, 0.0), float(np.abs(v).max()))
    return out


def plan_program(graph: Graph, ranges: Dict[int, float], backend: str = 'seal', numeric: bool = True,
                 insecure_ring: Optional[int] = None, images: Optional[int] = None,
                 bootstrap: Optional[bool] = None) -> Plan:
    """Choose the parameters and compile. Leveled (SEAL) when the depth fits a 128-bit ring, else (or with
    ``bootstrap``) OpenFHE's bootstrapping parameters."""
    probe_slots = max(2 ** 14, 1 << math.ceil(math.log2(graph.input_shape[1] * graph.input_shape[2])))
    probe = compile_graph(graph, CompileOptions(slots=probe_slots, max_depth=10 ** 6, numeric=False))
    levels = probe.levels
    finite = [v for v in ranges.values() if math.isfinite(v)]
    top = max(finite) if finite else 1.0
    headroom = min(max(8, int(math.ceil(math.log2(max(top, 1.0)))) + 3), 20)
    if bootstrap is None:
        bootstrap = False
        try:
            choose_params(levels, headroom_bits=headroom, ring_dim=insecure_ring, insecure=insecure_ring is not None)
        except ConfigError:
            bootstrap = True
    if not bootstrap:
        params = choose_params(levels, headroom_bits=headroom, ring_dim=insecure_ring,
                               insecure=insecure_ring is not None)
        prog = compile_graph(graph, CompileOptions(slots=params.slots, max_depth=params.levels, images=images,
                                                   numeric=numeric))
        return Plan(graph, prog, params, backend, ranges, False, probe)
    b = OPENFHE_BOOT
    ring = insecure_ring or b['ring_dim']
    params = CKKSParams(ring, b['depth'], b['scale_bits'], b['first_bits'], 60, insecure=insecure_ring is not None)
    prog = compile_graph(graph, CompileOptions(slots=ring // 2, max_depth=b['depth'], images=images,
                                               bootstrap_depth=b['boot_depth'], numeric=numeric, ranges=ranges))
    return Plan(graph, prog, params, 'openfhe' if backend == 'seal' else backend, ranges, True, probe)


# --------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------

def measure_seal_costs(params: CKKSParams, reps: int = 3) -> Dict[str, float]:
    """Seconds per op of SEAL at ``params`` (top level), one thread, on this machine."""
    from .seal_backend import SealBackend
    be = SealBackend(params, [1])
    v = np.random.default_rng(0).standard_normal(params.slots)
    ct = be.encrypt(v)
    ev = be.evaluator
    pt = be.encoder.encode(v, be.scale)

    def tm(f):
        t = time.perf_counter()
        for _ in range(reps):
            f()
        return (time.perf_counter() - t) / reps

    return dict(rot=tm(lambda: ev.rotate_vector(ct, 1, be.galois_keys)),
                mul=tm(lambda: ev.relinearize(ev.multiply(ct, ct), be.relin_keys)),
                mulp=tm(lambda: ev.multiply_plain(ct, pt)), encode=tm(lambda: be.encoder.encode(v, be.scale)),
                add=tm(lambda: ev.add(ct, ct)), rs=tm(lambda: ev.rescale_to_next(ct)), boot=None,
                keygen=be.keygen_seconds)


def estimate(plan: Plan, costs: Dict[str, float]) -> Dict[str, Any]:
    """Seconds and bytes per ciphertext set and per image (op counts × per-op costs, cost ∝ primes left)."""
    prog, params = plan.program, plan.params
    total_primes = params.levels + 1
    secs = 0.0
    for op in prog.ops:
        code = op[0]
        d = prog.depth[op[2]] if code not in ('in', 'out') else 0
        frac = max(total_primes - d, 1) / total_primes
        if code == 'rot':
            secs += costs['rot'] * frac
        elif code == 'mul':
            secs += costs['mul'] * frac
        elif code == 'mulp':
            secs += (costs['mulp'] + costs['encode']) * frac      # one encoding per op and ciphertext set
        elif code == 'addp':
            secs += (costs['add'] + costs['encode']) * frac
        elif code == 'add':
            secs += costs['add'] * frac
        elif code == 'rs':
            secs += costs['rs'] * frac
        elif code == 'boot':
            secs += costs['boot'] if costs.get('boot') else 0.0
    for _, code, n, d in prog.bulk:
        frac = max(total_primes - d, 1) / total_primes
        per = costs['mulp'] + costs['encode'] if code == 'mulp' else costs['add']
        secs += n * per * frac
    ct_bytes = 2 * total_primes * params.ring_dim * 8
    if plan.backend == 'openfhe':
        key_one = int(OPENFHE_KEY_OVER_CT * ct_bytes)
    else:
        key_one = (params.levels + 1) * 2 * (params.levels + 2) * params.ring_dim * 8
    keys = key_one * (len(prog.rotation_steps()) + 1)
    live = _peak_live(prog)
    boot_bytes = OPENFHE_BOOT_KEYS_BYTES if plan.bootstrapping else 0
    mem = keys + live * ct_bytes + boot_bytes
    return dict(seconds_per_ciphertext=secs, seconds_per_image=secs / prog.packing.images,
                images_per_ciphertext=prog.packing.images, bytes_keys=keys, bytes_bootstrap_setup=boot_bytes,
                peak_live_ciphertexts=live, bytes_ciphertext=ct_bytes, bytes_peak=mem)


def _peak_live(prog: Program) -> int:
    last = prog.last_use()
    live = 0
    peak = 0
    ends: Dict[int, int] = {}
    for k, op in enumerate(prog.ops):
        if op[1] >= 0:
            live += 1
            ends[last[op[1]]] = ends.get(last[op[1]], 0) + 1
        peak = max(peak, live)
        live -= ends.pop(k, 0)
    return peak


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------

def analyze(folded, calib_images: Optional[np.ndarray] = None, backend: str = 'seal', bench: bool = True,
            insecure_ring: Optional[int] = None, bootstrap: Optional[bool] = None, name: str = '') -> Dict[str, Any]:
    """The analysis report (a JSON-ready dict) of a folded fully polynomial PolyNeXt."""
    graph = build_graph(folded)
    if calib_images is None:
        rng = np.random.default_rng(0)
        calib_images = rng.standard_normal((8,) + graph.image_shape)
    ranges = calibration_ranges(graph, calib_images)
    plan = plan_program(graph, ranges, backend, numeric=False, insecure_ring=insecure_ring, bootstrap=bootstrap)
    prog, params = plan.program, plan.params
    pdepth = graph.product_depth()
    per_layer_ops = prog.per_layer()
    # level of each layer's output: the deepest register its ops wrote
    level = _layer_levels(prog)
    total_level = _layer_levels(plan.leveled) if plan.leveled is not None else level
    limit = 2.0 ** params.headroom_bits
    rows = []
    for n in graph.nodes:
        if n.kind in ('input', 'output'):
            continue
        ops = per_layer_ops.get(n.id, {})
        r = ranges.get(n.id, 0.0)
        kappa = prog.kappa.get(n.id, 1.0)
        head = (math.log2(limit / max(r * kappa, 1e-300)) if r > 0 else float('inf')) if math.isfinite(r) else -float('inf')
        boot_ok = None
        if n.id in prog.boot_nodes:
            boot_ok = r * kappa <= 1.0
        rows.append(dict(
            layer=n.name, kind=n.kind, shape=list(n.shape), ct_ct_depth=pdepth[n.id],
            degree_log2=pdepth[n.id], level=level.get(n.id, 0), levels_consumed=total_level.get(n.id, 0),
            rotations=ops.get('rot', 0),
            plaintext_mults=ops.get('mulp', 0), ct_mults=ops.get('mul', 0), rescales=ops.get('rs', 0),
            bootstraps=ops.get('boot', 0), max_abs=r, range_scale=kappa, headroom_bits=round(head, 2),
            in_range=bool(head >= 1.0) and (boot_ok is not False), bootstrapped=n.id in prog.boot_nodes))
    counts = prog.counts()
    report: Dict[str, Any] = dict(
        model=name or getattr(folded, 'architecture', None) or type(folded).__name__,
        image_size=list(graph.image_shape[1:]), num_classes=graph.num_classes,
        ct_ct_products=graph.ct_products(), ct_ct_depth=max(pdepth.values()),
        polynomial_degree_log2=max(pdepth.values()), levels=prog.levels,
        levels_consumed=plan.leveled.levels if plan.leveled is not None else prog.levels, params=params.as_dict(),
        params_text=params.describe(), backend=plan.backend, bootstrapping=plan.bootstrapping,
        bootstraps_per_ciphertext_set=counts.get('boot', 0), bootstrap_points=len(prog.boot_nodes),
        input_ciphertexts=prog.n_inputs,
        images_per_ciphertext=prog.packing.images, rotations=counts.get('rot', 0),
        plaintext_mults=counts.get('mulp', 0), ct_mults=counts.get('mul', 0), rescales=counts.get('rs', 0),
        additions=counts.get('add', 0), galois_keys=len(prog.rotation_steps()), rotation_steps=prog.rotation_steps(),
        out_of_range=[r['layer'] for r in rows if not r['in_range']], layers=rows,
        calibration_images=int(len(calib_images)))
    costs, source = None, None
    if plan.backend == 'seal' and bench and params.ring_dim <= 32768:
        try:
            costs, source = measure_seal_costs(params), 'measured now (SEAL micro-benchmarks, one thread)'
        except ConfigError:
            costs = None
    if costs is None:
        key = (plan.backend, params.ring_dim)
        if key not in STORED_COSTS:
            key = ('openfhe', 65536) if params.ring_dim >= 65536 else ('seal', 32768)
        costs = dict(STORED_COSTS[key])
        scale = params.ring_dim / key[1]
        costs = {k: (v * scale if v is not None and k != 'boot' else v) for k, v in costs.items()}
        source = f'stored measurements ({key[0]} at N={key[1]}, shared/notes/fhe.md), scaled to N={params.ring_dim}'
    if plan.bootstrapping:
        b = OPENFHE_BOOT_RUN
        report['bootstrap_caveat'] = (
            f"planned with a {params.scale_bits}-bit scale under a {params.first_bits}-bit first prime "
            f"({params.levels - OPENFHE_BOOT['boot_depth']} levels per bootstrap), which OpenFHE's EvalBootstrap "
            f"refuses (first - scale must be within its correction factor, about 8 bits); the sets it accepts leave "
            f"at most {b['depth'] - b['boot_depth']} levels at N=2^16 with a {b['scale_bits']}-bit scale, so the "
            f"bootstrap counts and the estimate are lower bounds")
    report['estimate'] = dict(estimate(plan, costs), cost_source=source,
                              per_op_seconds={k: v for k, v in costs.items() if v is not None})
    return report


def _layer_levels(prog: Program) -> Dict[int, int]:
    """The level of each layer's output (graph node id): the deepest register its ops wrote."""
    level: Dict[int, int] = {}
    for op, layer in zip(prog.ops, prog.op_layer):
        if op[1] >= 0:
            level[layer] = max(level.get(layer, 0), prog.depth[op[1]])
    return level


def format_report(rep: Dict[str, Any], max_rows: int = 60) -> str:
    lines = [f"HE analysis of {rep['model']} at {rep['image_size'][0]}x{rep['image_size'][1]}",
             f"  {rep['params_text']}",
             f"  ct×ct products: {rep['ct_ct_products']} (critical path {rep['ct_ct_depth']}, degree 2^{rep['polynomial_degree_log2']})"
             f"   levels: {rep.get('levels_consumed', rep['levels'])}",
             f"  program: at most {rep['levels']} levels between bootstraps; {rep['bootstrap_points']} bootstrap points on "
             f"the path (each live ciphertext is bootstrapped there), {rep['bootstraps_per_ciphertext_set']} "
             f"bootstraps per ciphertext set"
             if rep['bootstrapping'] else f"  program: leveled, {rep['levels']} levels, no bootstrapping",
             f"  packing: {rep['input_ciphertexts']} input ciphertext(s), {rep['images_per_ciphertext']} image(s) per ciphertext",
             f"  ops per ciphertext set: {rep['rotations']} rotations ({rep['galois_keys']} Galois keys), "
             f"{rep['plaintext_mults']} plaintext mults, {rep['ct_mults']} ct×ct mults, {rep['rescales']} rescales"]
    est = rep.get('estimate')
    if est:
        lines.append(f"  estimate: {est['seconds_per_ciphertext']:.1f} s per ciphertext set, "
                     f"{est['seconds_per_image']:.2f} s per image, peak memory ≈ {est['bytes_peak'] / 2 ** 30:.2f} GiB "
                     f"({est['cost_source']})")
    if rep.get('bootstrap_caveat'):
        lines.append(f"  caveat: {rep['bootstrap_caveat']}")
    if rep['out_of_range']:
        lines.append(f"  OUT OF RANGE: {', '.join(rep['out_of_range'][:8])}")
    lines.append('')
    hdr = f"{'layer':<42} {'kind':<6} {'C×H×W':>11} {'ct×ct':>5} {'level':>5} {'total':>5} {'rot':>5} {'ptmul':>6} {'boot':>4} {'max|x|':>10} {'headroom':>8}"
    lines.append(hdr)
    lines.append('-' * len(hdr))
    rows = rep['layers']
    show = rows if len(rows) <= max_rows else rows[:max_rows // 2] + [None] + rows[-max_rows // 2:]
    for r in show:
        if r is None:
            lines.append(f"  ... {len(rows) - max_rows} more layers (all in the JSON) ...")
            continue
        shape = 'x'.join(str(s) for s in r['shape'])
        flag = '' if r['in_range'] else '  OUT OF RANGE'
        lines.append(f"{r['layer'][:42]:<42} {r['kind']:<6} {shape:>11} {r['ct_ct_depth']:>5} {r['level']:>5} "
                     f"{r.get('levels_consumed', r['level']):>5} {r['rotations']:>5} {r['plaintext_mults']:>6} {r['bootstraps']:>4} {r['max_abs']:>10.3g} "
                     f"{r['headroom_bits']:>8.1f}{flag}")
    return '\n'.join(lines)


def plot_report(rep: Dict[str, Any], path: Path) -> Path:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from ..checkpoint import atomic_write
    rows = rep['layers']
    x = np.arange(len(rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(rows) * 0.12), 7), sharex=True)
    if rep['bootstrapping']:
        axes[0].step(x, [r['levels_consumed'] for r in rows], where='mid',
                     label='levels consumed (no bootstrapping)')
        axes[0].step(x, [r['level'] for r in rows], where='mid', label='level after bootstraps (red)')
    else:
        axes[0].step(x, [r['level'] for r in rows], where='mid', label='level (multiplicative depth)')
    axes[0].step(x, [r['ct_ct_depth'] for r in rows], where='mid', label='ct×ct products on the path')
    for i, r in enumerate(rows):
        if r['bootstrapped']:
            axes[0].axvline(i, color='tab:red', lw=0.8, alpha=0.6)
    axes[0].set_ylabel('depth')
    axes[0].legend(loc='upper left')
    axes[0].set_title(f"{rep['model']} at {rep['image_size'][0]}px: {rep['params_text']}", fontsize=9)
    vals = [max(r['max_abs'], 1e-12) for r in rows]
    axes[1].semilogy(x, vals, '.', label='max |value| (calibration)')
    axes[1].axhline(2.0 ** rep['params']['headroom_bits'], color='tab:red', ls='--', label='CKKS limit 2^(first−scale−1)')
    axes[1].set_ylabel('range')
    axes[1].set_xlabel('layer (graph order)')
    axes[1].legend(loc='upper left')
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format='png'))
    plt.close(fig)
    return path


def write_json(obj: Any, path: Path) -> Path:
    from ..checkpoint import atomic_write_json
    return atomic_write_json(path, obj, default=float)
