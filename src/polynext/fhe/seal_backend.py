"""Microsoft SEAL (``seal-python``) as a leveled CKKS backend for the packed-slot program.

The program's levels map one to one onto SEAL's modulus chain (depth d = d primes dropped). The
scale is managed exactly: a plaintext multiplier is encoded at Δ·q / scale(ct), where q is the prime
the next rescale drops, so that every linear map ends at exactly Δ = 2^scale_bits however the
ciphertext products before it drifted (SEAL's primes are only close to 2^scale_bits). Plaintext
vectors are encoded once per op for all ciphertexts of a batch (the batch runs in lockstep).
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import ConfigError
from .params import CKKSParams
from .program import Program

__all__ = ['SealBackend', 'seal_available']


def key_bytes(params: CKKSParams, n_galois: int) -> Dict[str, int]:
    one = (params.levels + 1) * 2 * (params.levels + 2) * params.ring_dim * 8
    return {'galois': n_galois * one, 'relin': one, 'per_key': one}


def seal_available() -> bool:
    try:
        import seal  # noqa: F401
        return True
    except ImportError:
        return False


def _import_seal():
    try:
        import seal
    except ImportError as e:
        raise ConfigError("the SEAL backend needs 'seal-python': pip install 'polynext[fhe]'") from e
    return seal


class SealBackend:
    """Keys and contexts for one parameter set and one program's rotations."""

    def __init__(self, params: CKKSParams, rotation_steps: Sequence[int], relin: bool = True):
        seal = _import_seal()
        self.seal = seal
        self.params = params.check()
        t0 = time.perf_counter()
        parms = seal.EncryptionParameters(seal.scheme_type.ckks)
        parms.set_poly_modulus_degree(params.ring_dim)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(params.ring_dim, params.modulus_bits))
        level = seal.sec_level_type.none if params.insecure else seal.sec_level_type.tc128
        self.context = seal.SEALContext(parms, True, level)
        if not self.context.parameters_set():
            raise ConfigError(f'SEAL refused the parameters: {self.context.parameter_error_message()}')
        keygen = seal.KeyGenerator(self.context)
        self.secret_key = keygen.secret_key()
        self.public_key = keygen.create_public_key()
        self.relin_keys = keygen.create_relin_keys() if relin else None
        self.galois_keys = seal.GaloisKeys()
        self.steps = sorted(set(int(s) for s in rotation_steps))
        if self.steps:
            keygen.create_galois_keys(self.steps, self.galois_keys)
        self.encoder = seal.CKKSEncoder(self.context)
        self.encryptor = seal.Encryptor(self.context, self.public_key)
        self.decryptor = seal.Decryptor(self.context, self.secret_key)
        self.evaluator = seal.Evaluator(self.context)
        self.scale = float(2 ** params.scale_bits)
        # parms_id and the prime dropped next, per depth (0 = fresh)
        self.parms_ids = []
        self.next_prime = []
        cd = self.context.first_context_data()
        while cd is not None:
            self.parms_ids.append(cd.parms_id())
            q = cd.parms().coeff_modulus()
            self.next_prime.append(float(q[-1].value()))
            cd = cd.next_context_data()
        self.keygen_seconds = time.perf_counter() - t0

    @property
    def slots(self) -> int:
        return self.encoder.slot_count()

    def key_bytes(self) -> Dict[str, int]:
        """Memory of the key-switching keys: per key (L+1) × 2 × (L+2) residue polynomials of N words."""
        return key_bytes(self.params, len(self.steps))

    # ---- client side ----------------------------------------------------------------
    def encrypt(self, values: np.ndarray):
        pt = self.encoder.encode(np.ascontiguousarray(values, dtype=np.float64), self.scale)
        return self.encryptor.encrypt(pt)

    def decrypt(self, ct) -> np.ndarray:
        return np.asarray(self.encoder.decode(self.decryptor.decrypt(ct)))[: self.slots]

    # ---- server side ------------------------------------------------------------------
    def _plain(self, vec: np.ndarray, reps: int, scale: float, depth: int):
        pt = self.encoder.encode(np.ascontiguousarray(np.tile(vec, reps)), scale)
        if depth:
            self.evaluator.mod_switch_to_inplace(pt, self.parms_ids[depth])
        return pt

    def run(self, prog: Program, inputs: List[List], progress=None) -> List[List]:
        """Execute ``prog`` on encrypted inputs (per input ciphertext, a list over the batch)."""
        if prog.bootstrap_depth is not None and any(op[0] == 'boot' for op in prog.ops):
            raise ConfigError('SEAL has no bootstrapping: compile a leveled program or use the OpenFHE backend')
        if prog.levels > self.params.levels:
            raise ConfigError(f'the program needs {prog.levels} levels, the parameters give {self.params.levels}')
        ev, enc = self.evaluator, self.encoder
        reps = prog.packing.images
        last = prog.last_use()
        regs: Dict[int, List] = {}
        outputs: List[Optional[List]] = [None] * prog.n_outputs
        n_ops = len(prog.ops)
        for k, op in enumerate(prog.ops):
            code = op[0]
            if code == 'in':
                regs[op[1]] = list(inputs[op[2]])
            elif code == 'rot':
                regs[op[1]] = [ev.rotate_vector(c, op[3], self.galois_keys) for c in regs[op[2]]]
            elif code == 'mulp':
                src = regs[op[2]]
                d = prog.depth[op[2]]
                target = self.scale * self.next_prime[d]
                vec = prog.consts[op[3]]
                # one encoding per distinct input scale (in lockstep all ciphertexts share it)
                cache = {}
                out = []
                for c in src:
                    s = c.scale()
                    if s not in cache:
                        cache[s] = self._plain(vec, reps, target / s, d)
                    out.append(ev.multiply_plain(c, cache[s]))
                regs[op[1]] = out
            elif code == 'addp':
                src = regs[op[2]]
                d = prog.depth[op[2]]
                out = []
                for c in src:
                    pt = self._plain(prog.consts[op[3]], reps, c.scale(), d)
                    out.append(ev.add_plain(c, pt))
                regs[op[1]] = out
            elif code == 'mul':
                out = []
                for a, b in zip(regs[op[2]], regs[op[3]]):
                    c = ev.multiply(a, b)
                    ev.relinearize_inplace(c, self.relin_keys)
                    out.append(c)
                regs[op[1]] = out
            elif code == 'add':
                out = []
                for a, b in zip(regs[op[2]], regs[op[3]]):
                    if a.scale() != b.scale():
                        b = self._copy(b)
                        b.scale(a.scale())       # equal up to float rounding of the exact bookkeeping
                    out.append(ev.add(a, b))
                regs[op[1]] = out
            elif code == 'rs':
                out = []
                for c in regs[op[2]]:
                    out.append(ev.rescale_to_next(c))
                regs[op[1]] = out
            elif code == 'drop':
                out = []
                for c in regs[op[2]]:
                    out.append(ev.mod_switch_to(c, self.parms_ids[op[3]]))
                regs[op[1]] = out
            elif code == 'boot':
                raise ConfigError('SEAL has no bootstrapping')
            elif code == 'out':
                outputs[op[3]] = regs[op[2]]
            for r in {op[2]} | ({op[3]} if code in ('mul', 'add') else set()):
                if code != 'in' and isinstance(r, int) and r >= 0 and last[r] == k:
                    regs.pop(r, None)
            if progress is not None and (k % 200 == 0 or k == n_ops - 1):
                progress(k + 1, n_ops)
        return outputs

    def _copy(self, c):
        out = self.seal.Ciphertext(c)
        return out
