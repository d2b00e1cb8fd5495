"""``polynext fhe demo``: a fully polynomial PolyNeXt classifies encrypted digits (CKKS, 128-bit, SEAL).

The model is the ``cpolynext_fhe_digits`` recipe of ``polynext train`` (one stage, 2 cells of 1 block,
8 channels, bn norms, 8x8 digits), trained through the engine; its weights ship with polynext
(``data/fhe_digits_c8.safetensors``, 19 KB) so that the demo does not retrain (``--train`` does).

The client normalises and packs the test images (32 per ciphertext), encrypts them; the server runs
the compiled program on the ciphertexts only (it holds the weights in the clear and the evaluation
keys); the client decrypts the logits. The demo then compares them with the plaintext model.
"""
from __future__ import annotations

import math
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import ConfigError
from .analyze import calibration_ranges, plan_program
from .graph import build_graph, evaluate
from .program import pack_images, unpack_logits

__all__ = ['DEMO_WEIGHTS', 'DEMO_RECIPE', 'load_demo_model', 'digits_arrays', 'run_demo', 'format_demo']

DEMO_RECIPE = 'cpolynext_fhe_digits'
DEMO_WEIGHTS = Path(__file__).resolve().parent.parent / 'data' / 'fhe_digits_c8.safetensors'


def load_demo_model(weights: Optional[str] = None, train: bool = False, output: Optional[str] = None,
                    show_progress: bool = True) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The demo classifier (eval mode) and its safetensors metadata: shipped, given, or trained now."""
    from ..checkpoint import load_weights, read_safetensors_metadata
    from ..factory import create_model
    if train:
        from ..train import PRESETS, train as train_run
        name, cfg = PRESETS.resolve(DEMO_RECIPE, flags=dict(output=output or f'runs/{DEMO_RECIPE}'))
        train_run(cfg, name, show_progress=show_progress)
        weights = str(Path(cfg.output) / 'best.safetensors')
    path = Path(weights) if weights else DEMO_WEIGHTS
    if not path.is_file():
        raise ConfigError(f'weights not found: {path} (train them with `polynext fhe demo --train`)')
    meta = read_safetensors_metadata(path)
    if meta.get('architecture') is None or not isinstance(meta.get('model_kwargs'), dict):
        raise ConfigError(f'{path} has no polynext metadata (architecture / model_kwargs): pass a run folder\'s '
                          f'best.safetensors')
    model = create_model(meta['architecture'], num_classes=int(meta.get('num_classes', 10)), **meta['model_kwargs'])
    load_weights(model, path)
    return model.eval(), meta


def digits_arrays(img_size: int, mean, std) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, val images, val labels), normalised float64 (B, 3, H, W), the engine's split."""
    from ..train.data import load_digits_split
    train, val = load_digits_split(img_size)
    m = np.asarray(mean, np.float64).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float64).reshape(1, 3, 1, 1)

    def arr(ds):
        x = np.stack([np.asarray(img, np.float64).transpose(2, 0, 1) / 255.0 for img in ds.images])
        return (x - m) / s, np.asarray(ds.targets)
    return arr(train) + arr(val)


def _peak_rss_bytes() -> int:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return int(max(own, kids) * 1024)


def _cpu_seconds() -> float:
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def run_demo(n_images: int = 64, weights: Optional[str] = None, train: bool = False, workers: Optional[int] = None,
             insecure_ring: Optional[int] = None, backend: str = 'seal', show_progress: bool = True,
             log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Encrypt ``n_images`` test digits, classify them under CKKS, decrypt, compare with plaintext."""
    from ..models.folded import fold_for_inference
    if not 1 <= n_images <= 360:
        raise ConfigError(f'--images must be between 1 and 360 (the digits validation split), got {n_images}')
    if workers is not None and workers < 1:
        raise ConfigError(f'--workers must be at least 1, got {workers}')
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    model, meta = load_demo_model(weights, train, show_progress=show_progress)
    ev = meta.get('eval') or {}
    img = int(model.img_size[0])
    xtr, _, xva, yva = digits_arrays(img, ev.get('mean', (0.5,) * 3), ev.get('std', (0.5,) * 3))
    folded = fold_for_inference(model.double())
    graph = build_graph(folded)
    ranges = calibration_ranges(graph, xtr[:512])
    plan = plan_program(graph, ranges, backend, insecure_ring=insecure_ring)
    if plan.bootstrapping:
        raise ConfigError('this model needs bootstrapping: run it with the OpenFHE backend')
    prog, params = plan.program, plan.params
    log(f'model: {meta.get("architecture")} {meta.get("model_kwargs")} ({sum(p.numel() for p in model.parameters())} '
        f'params), {graph.ct_products()} ct×ct products, {prog.levels} levels')
    log(f'parameters: {params.describe()}')
    counts = prog.counts()
    log(f'program: {counts.get("rot", 0)} rotations ({len(prog.rotation_steps())} keys), {counts.get("mulp", 0)} '
        f'plaintext mults, {counts.get("mul", 0)} ct×ct mults per ciphertext; {prog.packing.images} images per ciphertext')

    x = xva[:n_images]
    y = yva[:n_images]
    with torch.no_grad():
        plain_torch = model.float()(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
        plain_all = model(torch.as_tensor(xva, dtype=torch.float32)).double().numpy()
    plain_graph = evaluate(graph, x)
    test_ranges = calibration_ranges(graph, x)
    limit = 2.0 ** params.headroom_bits
    worst = max(test_ranges.values())
    if worst >= limit:
        log(f'WARNING: a test value reaches {worst:.3g}, beyond the CKKS headroom {limit:.3g}')

    from .seal_backend import SealBackend, key_bytes
    t0 = time.perf_counter()
    be = SealBackend(params, prog.rotation_steps())
    t_keys = time.perf_counter() - t0
    log(f'keys: {t_keys:.1f} s ({len(be.steps)} Galois keys + relinearisation, '
        f'{sum(v for k, v in key_bytes(params, len(be.steps)).items() if k != "per_key") / 2 ** 30:.2f} GiB)')
    packed = pack_images(prog, x)
    n_sets = packed[0].shape[0]
    t0 = time.perf_counter()
    enc = [[be.encrypt(row) for row in arr] for arr in packed]
    t_enc = time.perf_counter() - t0
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    # default: one forked evaluator per CPU core, at most one per ciphertext (they share the keys copy-on-write)
    workers = min(workers or os.cpu_count() or 1, n_sets)
    outs, per_ct = _run_sets(be, prog, enc, workers, show_progress, log)
    t_eval = time.perf_counter() - t0
    cpu_eval = _cpu_seconds() - cpu0
    t0 = time.perf_counter()
    dec = [np.stack([be.decrypt(c) for c in lst]) for lst in outs]
    t_dec = time.perf_counter() - t0
    logits = unpack_logits(prog, dec, n_images)

    agree = float((logits.argmax(1) == plain_torch.argmax(1)).mean())
    res = dict(
        model=meta.get('architecture'), model_kwargs=meta.get('model_kwargs'), recipe=meta.get('recipe'),
        params=params.as_dict(), params_text=params.describe(), security=params.security, images=n_images,
        ciphertexts=n_sets, images_per_ciphertext=prog.packing.images, levels=prog.levels,
        rotations=counts.get('rot', 0), galois_keys=len(be.steps), plaintext_mults=counts.get('mulp', 0),
        ct_mults=counts.get('mul', 0), argmax_agreement=agree,
        max_abs_logit_diff_vs_torch=float(np.abs(logits - plain_torch).max()),
        max_abs_logit_diff_vs_float64_graph=float(np.abs(logits - plain_graph).max()),
        max_abs_logit=float(np.abs(plain_torch).max()),
        encrypted_accuracy=float((logits.argmax(1) == y).mean()),
        plaintext_accuracy=float((plain_torch.argmax(1) == y).mean()),
        plaintext_accuracy_full_val=float((plain_all.argmax(1) == yva).mean()), val_images=int(len(yva)),
        seconds_keygen=t_keys, seconds_encrypt=t_enc, seconds_eval_wall=t_eval, seconds_eval_cpu=cpu_eval,
        seconds_decrypt=t_dec, seconds_per_ciphertext=float(np.mean(per_ct)),
        seconds_per_image=t_eval / n_images, workers=workers, peak_rss_bytes=_peak_rss_bytes(),
        seconds_total=time.perf_counter() - t_start, max_abs_value=worst, headroom_limit=limit,
        cpu=_cpu_name(), threads=1,
        # timings taken on a shared machine are inflated: the 1-minute load average at the start and the end
        load_average=[round(load_start, 2), round(os.getloadavg()[0], 2)])
    return res


def _cpu_name() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip() + f' ({os.cpu_count()} cores)'
    except OSError:
        pass
    import platform
    return platform.processor() or 'unknown'


def _run_sets(be, prog, enc: List[List], workers: int, show_progress: bool, log) -> Tuple[List[List], List[float]]:
    """Run the ciphertext sets: in this process, or split over ``workers`` forked processes (each inherits the
    keys; the outputs come back as serialised ciphertexts)."""
    n_sets = len(enc[0])
    workers = min(workers, n_sets)
    if workers <= 1:
        per = []
        outs_all: List[List] = [[] for _ in range(prog.n_outputs)]
        for s in range(n_sets):
            t0 = time.perf_counter()
            bar = _bar(show_progress, f'ciphertext {s + 1}/{n_sets}')
            outs = be.run(prog, [[lst[s]] for lst in enc], progress=bar)
            per.append(time.perf_counter() - t0)
            for j, o in enumerate(outs):
                outs_all[j].extend(o)
        return outs_all, per
    import multiprocessing as mp
    ctx = mp.get_context('fork')
    with tempfile.TemporaryDirectory(prefix='polynext-fhe-') as tmp:
        def child(sets: List[int]) -> None:
            for s in sets:
                t0 = time.perf_counter()
                outs = be.run(prog, [[lst[s]] for lst in enc])
                for j, o in enumerate(outs):
                    o[0].save(os.path.join(tmp, f'out_{s}_{j}.ct'))
                Path(tmp, f'time_{s}.txt').write_text(str(time.perf_counter() - t0))
            os._exit(0)
        procs = []
        for w in range(workers):
            p = ctx.Process(target=child, args=(list(range(w, n_sets, workers)),))
            p.start()
            procs.append(p)
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f'an encrypted-evaluation worker failed (exit code {p.exitcode})')
        outs_all = [[] for _ in range(prog.n_outputs)]
        per = []
        for s in range(n_sets):
            for j in range(prog.n_outputs):
                ct = be.seal.Ciphertext()
                ct.load(be.context, os.path.join(tmp, f'out_{s}_{j}.ct'))
                outs_all[j].append(ct)
            per.append(float(Path(tmp, f'time_{s}.txt').read_text()))
        return outs_all, per


def _bar(show: bool, desc: str):
    if not show:
        return None
    from tqdm import tqdm
    state = {}

    def update(done: int, total: int) -> None:
        if 'bar' not in state:
            state['bar'] = tqdm(total=total, desc=desc, unit='op', leave=False)
        state['bar'].n = done
        state['bar'].refresh()
        if done >= total:
            state['bar'].close()
    return update


def format_demo(r: Dict[str, Any]) -> str:
    return '\n'.join([
        f"encrypted inference: {r['images']} digits in {r['ciphertexts']} ciphertext(s), {r['params_text']}",
        f"  argmax agreement with plaintext: {100 * r['argmax_agreement']:.1f} %",
        f"  max |Δ logit| vs the PyTorch model: {r['max_abs_logit_diff_vs_torch']:.2e} (logits up to "
        f"{r['max_abs_logit']:.2f}); vs the float64 graph: {r['max_abs_logit_diff_vs_float64_graph']:.2e}",
        f"  accuracy: encrypted {100 * r['encrypted_accuracy']:.2f} %, plaintext {100 * r['plaintext_accuracy']:.2f} % "
        f"(same {r['images']} images); plaintext on all {r['val_images']} validation digits "
        f"{100 * r['plaintext_accuracy_full_val']:.2f} %",
        f"  time: keys {r['seconds_keygen']:.1f} s, encrypt {r['seconds_encrypt']:.1f} s, evaluate "
        f"{r['seconds_eval_wall']:.1f} s wall / {r['seconds_eval_cpu']:.1f} s CPU ({r['workers']} worker(s)), "
        f"decrypt {r['seconds_decrypt']:.2f} s",
        f"  per ciphertext {r['seconds_per_ciphertext']:.1f} s ({r['images_per_ciphertext']} images), per image "
        f"{r['seconds_per_image']:.2f} s (wall); peak memory {r['peak_rss_bytes'] / 2 ** 30:.2f} GiB; {r['cpu']}, "
        f"load average {r['load_average'][0]:.1f} → {r['load_average'][1]:.1f}",
    ])
