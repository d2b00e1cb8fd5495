"""CKKS parameters, checked against the Homomorphic Encryption Standard's 128-bit table.

The standard (homomorphicencryption.org, 2018; Table 1, classical attacks, ternary secret) bounds the
total bit count of the modulus log2(QP) for each ring dimension N at 128-bit security. SEAL enforces
the same table up to N = 2^15; OpenFHE extends it to N = 2^16 (1772 bits). A parameter set whose
modulus exceeds the bound is refused unless ``insecure=True`` (tests and toys, printed as INSECURE).

SEAL's modulus chain here is ``[first] + [scale] × levels + [special]``: the first prime holds the
decrypted result (its bits above the scale are the headroom for |values|), one ``scale``-bit prime
per level, and a special prime for key switching.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

from ..errors import ConfigError

__all__ = ['HE_STANDARD_128', 'CKKSParams', 'choose_params']

#: max log2(QP) at 128-bit security (classical), ternary secret, by ring dimension
HE_STANDARD_128: Dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881, 65536: 1772}

MAX_PRIME_BITS = 60


@dataclass(frozen=True)
class CKKSParams:
    ring_dim: int
    levels: int                 # rescaling primes: the depth budget of a leveled program
    scale_bits: int
    first_bits: int = 60
    special_bits: int = 60
    insecure: bool = False

    @property
    def slots(self) -> int:
        return self.ring_dim // 2

    @property
    def modulus_bits(self) -> List[int]:
        return [self.first_bits] + [self.scale_bits] * self.levels + [self.special_bits]

    @property
    def total_bits(self) -> int:
        return sum(self.modulus_bits)

    @property
    def headroom_bits(self) -> int:
        """|value| < 2^headroom_bits keeps a decrypted value inside the first prime."""
        return self.first_bits - self.scale_bits - 1

    @property
    def security(self) -> str:
        bound = HE_STANDARD_128.get(self.ring_dim)
        if bound is not None and self.total_bits <= bound:
            return '128-bit'
        return 'INSECURE'

    def check(self) -> 'CKKSParams':
        if self.ring_dim & (self.ring_dim - 1) or self.ring_dim < 1024:
            raise ConfigError(f'the ring dimension must be a power of two ≥ 1024, got {self.ring_dim}')
        if not 20 <= self.scale_bits <= MAX_PRIME_BITS or not self.scale_bits < self.first_bits <= MAX_PRIME_BITS:
            raise ConfigError(f'scale bits {self.scale_bits} / first prime bits {self.first_bits}: need '
                              f'20 ≤ scale < first ≤ {MAX_PRIME_BITS}')
        bound = HE_STANDARD_128.get(self.ring_dim)
        if not self.insecure and (bound is None or self.total_bits > bound):
            allowed = 'no entry' if bound is None else f'at most {bound} bits'
            raise ConfigError(f'N={self.ring_dim} with a {self.total_bits}-bit modulus is below 128-bit security '
                              f'(the HE standard allows {allowed} for this ring); use a larger ring, fewer levels, '
                              f'or --insecure for a toy run')
        return self

    def describe(self) -> str:
        chain = f'[{self.first_bits}] + [{self.scale_bits}]x{self.levels} + [{self.special_bits}]'
        bound = HE_STANDARD_128.get(self.ring_dim)
        sec = (f'128-bit (HE standard: ≤ {bound} bits at N={self.ring_dim})' if self.security == '128-bit'
               else 'INSECURE (toy parameters: not secure)')
        return f'CKKS N=2^{int(math.log2(self.ring_dim))}, modulus {chain} = {self.total_bits} bits, {sec}'

    def as_dict(self) -> Dict:
        d = asdict(self)
        d.update(slots=self.slots, total_bits=self.total_bits, security=self.security, headroom_bits=self.headroom_bits,
                 modulus_bits=self.modulus_bits)
        return d


def choose_params(levels: int, headroom_bits: int = 12, min_scale_bits: int = 30, max_scale_bits: int = 50,
                  min_ring: int = 1024, ring_dim: Optional[int] = None, insecure: bool = False) -> CKKSParams:
    """The smallest 128-bit ring that holds ``levels`` rescaling primes of at least ``min_scale_bits``,
    with the largest scale that fits (up to ``max_scale_bits``) and a first prime ``headroom_bits`` above it."""
    rings = [ring_dim] if ring_dim else [n for n in sorted(HE_STANDARD_128) if n >= min_ring]
    for n in rings:
        bound = HE_STANDARD_128.get(n, 10 ** 9) if not insecure else 10 ** 9
        for first in (MAX_PRIME_BITS,):
            budget = bound - first - MAX_PRIME_BITS
            scale = min(max_scale_bits, first - headroom_bits - 1, budget // max(levels, 1))
            if scale >= min_scale_bits:
                return CKKSParams(n, levels, scale, first, MAX_PRIME_BITS, insecure).check()
    raise ConfigError(f'{levels} levels do not fit any ring up to N=2^16 at 128-bit security with a '
                      f'{min_scale_bits}-bit scale; this program needs bootstrapping (OpenFHE backend) or a '
                      f'shallower model')
