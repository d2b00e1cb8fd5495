"""A NumPy executor of the packed-slot program: exactly the encrypted backends' rotations, plaintext
vectors and level accounting, in float64, optionally with CKKS-sized noise.

Each register holds an array (n_sets, slots): one row per ciphertext of a batch (``images`` images
each). ``noise`` adds Gaussian errors where CKKS adds them (encryption, rescale, key switching of
rotations and relinearisation), of the size a ring of dimension N with scale Δ gives:
encryption ≈ 3.2·√(N)/Δ, rescale rounding ≈ √(N/12)/Δ, key switching ≈ √N/Δ (fresh-scale units).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from .program import Program

__all__ = ['simulate', 'SimulationResult']


class SimulationResult:
    def __init__(self, outputs: List[np.ndarray], max_abs: Dict[int, float]):
        self.outputs = outputs
        self.max_abs = max_abs        # per graph node (layer): the largest |slot| its ops produced


def simulate(prog: Program, inputs: List[np.ndarray], noise: Optional[Dict[str, float]] = None,
             seed: int = 0, track_ranges: bool = False) -> SimulationResult:
    """Run ``prog`` on packed inputs (``pack_images``); returns the output ciphertexts' slots."""
    if not prog.numeric:
        raise ValueError('a structural program (numeric=False) has no plaintext vectors to execute')
    pk = prog.packing
    rng = np.random.default_rng(seed)
    reps = pk.images
    last = prog.last_use()
    regs: Dict[int, np.ndarray] = {}
    outputs: List[Optional[np.ndarray]] = [None] * prog.n_outputs
    max_abs: Dict[int, float] = {}

    def err(x, kind):
        if noise and noise.get(kind):
            return x + rng.normal(0.0, noise[kind], size=x.shape)
        return x

    for k, op in enumerate(prog.ops):
        code = op[0]
        if code == 'in':
            regs[op[1]] = err(np.array(inputs[op[2]], dtype=np.float64), 'encrypt')
        elif code == 'rot':
            regs[op[1]] = err(np.roll(regs[op[2]], -op[3], axis=-1), 'keyswitch')
        elif code == 'mulp':
            regs[op[1]] = regs[op[2]] * np.tile(prog.consts[op[3]], reps)
        elif code == 'addp':
            regs[op[1]] = regs[op[2]] + np.tile(prog.consts[op[3]], reps)
        elif code == 'mul':
            regs[op[1]] = err(regs[op[2]] * regs[op[3]], 'keyswitch')
        elif code == 'add':
            regs[op[1]] = regs[op[2]] + regs[op[3]]
        elif code == 'rs':
            regs[op[1]] = err(regs[op[2]], 'rescale')
        elif code == 'drop':
            regs[op[1]] = regs[op[2]]
        elif code == 'boot':
            regs[op[1]] = err(regs[op[2]], 'bootstrap')
        elif code == 'out':
            outputs[op[3]] = regs[op[2]]
        else:
            raise AssertionError(code)
        if track_ranges and op[1] >= 0 and code != 'mulp':
            layer = prog.op_layer[k]
            m = float(np.abs(regs[op[1]]).max())
            if m > max_abs.get(layer, 0.0):
                max_abs[layer] = m
        for r in set(_reads_of(op)):
            if last[r] == k:
                regs.pop(r, None)
    return SimulationResult(outputs, max_abs)


def _reads_of(op):
    code = op[0]
    if code in ('rot', 'mulp', 'addp', 'rs', 'drop', 'boot', 'out'):
        return (op[2],)
    if code in ('mul', 'add'):
        return (op[2], op[3])
    return ()


def ckks_noise(ring_dim: int, scale_bits: int, bootstrap_error: float = 0.0) -> Dict[str, float]:
    """Standard deviations (in value units) of CKKS's errors for ring dimension N and scale 2^scale_bits."""
    d = float(2 ** scale_bits)
    n = float(ring_dim)
    return dict(encrypt=3.2 * np.sqrt(n) / d, rescale=np.sqrt(n / 12.0) / d, keyswitch=np.sqrt(n) / d,
                bootstrap=bootstrap_error)
