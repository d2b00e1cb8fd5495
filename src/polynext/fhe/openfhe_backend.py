"""The OpenFHE backend (bootstrapping): a worker process in a Python that has ``openfhe``.

openfhe's PyPI wheels carry a binary for CPython 3.8 / 3.10 / 3.12 only, so the worker
(:mod:`polynext.fhe.openfhe_worker`, numpy + openfhe only) runs in its own interpreter:
``$POLYNEXT_OPENFHE_PYTHON``, else the venv ``polynext fhe openfhe --setup`` creates
(``~/.cache/polynext/openfhe-venv``, from pyenv's or the system's Python 3.10). Where there is
none, the backend is skipped with one message.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ..errors import ConfigError
from .params import CKKSParams
from .program import Program

__all__ = ['find_openfhe_python', 'setup_openfhe', 'run_openfhe', 'OPENFHE_VENV', 'OPENFHE_PIN']

OPENFHE_VENV = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'polynext' / 'openfhe-venv'
OPENFHE_PIN = 'openfhe==1.6.1.0.22.4'      # the cp310 build of OpenFHE 1.6.1
WORKER = Path(__file__).resolve().parent / 'openfhe_worker.py'


def _imports_openfhe(python: str) -> bool:
    try:
        r = subprocess.run([python, '-c', 'import openfhe, numpy'], capture_output=True, timeout=120)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def find_openfhe_python() -> Optional[str]:
    """A Python interpreter that imports openfhe and numpy, or None."""
    cands = [os.environ.get('POLYNEXT_OPENFHE_PYTHON'), str(OPENFHE_VENV / 'bin' / 'python')]
    for c in cands:
        if c and Path(c).exists() and _imports_openfhe(c):
            return c
    return None


def _python310() -> Optional[str]:
    for c in (os.environ.get('POLYNEXT_PYTHON310'), str(Path.home() / '.pyenv' / 'versions' / '3.10.13' / 'bin' / 'python'),
              shutil.which('python3.10')):
        if c and Path(c).exists():
            return c
    pyenv = Path.home() / '.pyenv' / 'versions'
    if pyenv.is_dir():
        for d in sorted(pyenv.glob('3.10*'), reverse=True):
            if (d / 'bin' / 'python').exists():
                return str(d / 'bin' / 'python')
    return None


def setup_openfhe(log: Callable[[str], None] = print) -> str:
    """Create ``OPENFHE_VENV`` with openfhe and numpy from a Python 3.10; returns its interpreter."""
    py = _python310()
    if py is None:
        raise ConfigError('no Python 3.10 found (openfhe\'s wheels need CPython 3.8/3.10/3.12): install one '
                          '(e.g. pyenv install 3.10) or set POLYNEXT_PYTHON310')
    log(f'creating {OPENFHE_VENV} with {py}')
    subprocess.run([py, '-m', 'venv', str(OPENFHE_VENV)], check=True)
    pip = str(OPENFHE_VENV / 'bin' / 'python')
    subprocess.run([pip, '-m', 'pip', 'install', '-q', OPENFHE_PIN, 'numpy'], check=True)
    if not _imports_openfhe(pip):
        raise ConfigError(f'openfhe was installed into {OPENFHE_VENV} but does not import')
    return pip


def run_openfhe(prog: Program, params: CKKSParams, inputs: List[np.ndarray], level_budget=(2, 2),
                python: Optional[str] = None, timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run ``prog`` in the OpenFHE worker on packed inputs; returns the decrypted outputs and measurements."""
    python = python or find_openfhe_python()
    if python is None:
        raise ConfigError('OpenFHE backend: no Python with openfhe found; run `polynext fhe openfhe --setup` '
                          '(needs Python 3.10) or set POLYNEXT_OPENFHE_PYTHON')
    with tempfile.TemporaryDirectory(prefix='polynext-openfhe-') as tmp:
        tmp = Path(tmp)
        consts = np.stack([c for c in prog.consts]) if prog.consts else np.zeros((0, prog.packing.img_block))
        np.save(tmp / 'consts.npy', consts)
        np.save(tmp / 'inputs.npy', np.stack(inputs))
        job = dict(params=dict(ring_dim=params.ring_dim, scale_bits=params.scale_bits, first_bits=params.first_bits,
                               depth=params.levels, insecure=params.insecure, slots=prog.packing.slots,
                               level_budget=list(level_budget)),
                   ops=[list(op) for op in prog.ops], last_use=prog.last_use(), images=prog.packing.images,
                   n_outputs=prog.n_outputs, steps=prog.rotation_steps())
        (tmp / 'job.json').write_text(json.dumps(job))
        t0 = time.perf_counter()
        r = subprocess.run([python, str(WORKER), str(tmp)], capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f'the OpenFHE worker failed (exit {r.returncode}): {" | ".join(tail)}')
        res = json.loads((tmp / 'result.json').read_text())
        out = np.load(tmp / 'outputs.npy')
    res['outputs'] = [out[k] for k in range(out.shape[0])]
    res['seconds_wall'] = wall
    return res
