"""What OpenFHE's CKKS bootstrapping allows at 128-bit, measured: the facts behind ``OPENFHE_BOOT_RUN`` and
``OPENFHE_KEY_OVER_CT`` in ``polynext.fhe.analyze``. Runs in the OpenFHE worker's interpreter (openfhe + numpy
only; ``polynext fhe openfhe --setup`` creates it):

    ~/.cache/polynext/openfhe-venv/bin/python benchmarks/fhe_openfhe_params.py   # JSON to benchmarks/results/

1. The levels one bootstrap consumes (``GetBootstrapDepth``, level budget [2, 2], uniform ternary secret).
2. For (scale, first prime) pairs: the largest multiplicative depth ``GenCryptoContext`` accepts at
   ``HEStd_128_classic`` and N = 2^16 (a context only: no keys, seconds), and so the levels left between
   bootstraps. EvalBootstrap with FLEXIBLEAUTO also needs first − scale ≤ its correction factor (it refused 20
   with "Degree [20] must be less than or equal to the correction factor [11]" at N = 2^12; the shared notes
   record [8] at N = 2^16), so only small gaps are usable.
3. A rotation key's serialised size over a fresh ciphertext's of the same chain (HYBRID key switching, OpenFHE's
   default digits), on a toy ring: the ratio does not depend on N.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import openfhe as fhe

PAIRS = [(40, 60), (45, 53), (50, 58), (52, 60), (59, 60)]


def _params(ring: int, depth: int, scale: int, first: int, secure: bool):
    p = fhe.CCParamsCKKSRNS()
    p.SetSecurityLevel(fhe.SecurityLevel.HEStd_128_classic if secure else fhe.SecurityLevel.HEStd_NotSet)
    p.SetRingDim(ring)
    p.SetSecretKeyDist(fhe.SecretKeyDist.UNIFORM_TERNARY)
    p.SetScalingTechnique(fhe.ScalingTechnique.FLEXIBLEAUTO)
    p.SetScalingModSize(scale)
    p.SetFirstModSize(first)
    p.SetMultiplicativeDepth(depth)
    return p


def max_depth_128(scale: int, first: int, ring: int = 65536) -> int | None:
    for depth in range(40, 4, -1):
        try:
            fhe.GenCryptoContext(_params(ring, depth, scale, first, True))
            return depth
        except Exception:       # OpenFHE: "ring dimension ... does not comply with HE standards recommendation"
            continue
    return None


def key_over_ciphertext(depth: int, ring: int = 4096) -> float:
    fhe.CryptoContext.ClearEvalAutomorphismKeys()      # the key map is global: serialise this context's key only
    cc = fhe.GenCryptoContext(_params(ring, depth, 40, 60, False))
    for feat in (fhe.PKESchemeFeature.PKE, fhe.PKESchemeFeature.KEYSWITCH, fhe.PKESchemeFeature.LEVELEDSHE):
        cc.Enable(feat)
    keys = cc.KeyGen()
    cc.EvalRotateKeyGen(keys.secretKey, [1])
    with tempfile.TemporaryDirectory() as d:
        cc.SerializeEvalAutomorphismKey(os.path.join(d, 'rot.bin'), fhe.BINARY)
        ct = cc.Encrypt(keys.publicKey, cc.MakeCKKSPackedPlaintext([1.0] * 4))
        fhe.SerializeToFile(os.path.join(d, 'ct.bin'), ct, fhe.BINARY)
        return os.path.getsize(os.path.join(d, 'rot.bin')) / os.path.getsize(os.path.join(d, 'ct.bin'))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--json', default='benchmarks/results/fhe_openfhe_params.json')
    args = ap.parse_args()
    t0 = time.perf_counter()
    boot = fhe.CryptoContext.GetBootstrapDepth([2, 2], fhe.SecretKeyDist.UNIFORM_TERNARY)
    rows = []
    print(f'bootstrap depth (level budget [2, 2], uniform ternary): {boot}')
    print(f"{'scale':>5} {'first':>5} {'gap':>4} {'max depth (128-bit, N=2^16)':>28} {'levels between bootstraps':>26}")
    for scale, first in PAIRS:
        d = max_depth_128(scale, first)
        left = None if d is None else d - boot
        rows.append(dict(scale_bits=scale, first_bits=first, gap=first - scale, max_depth=d, levels_left=left))
        print(f'{scale:>5} {first:>5} {first - scale:>4} {str(d):>28} {str(left):>26}')
    ratios = {depth: key_over_ciphertext(depth) for depth in (29, 45)}
    for depth, r in ratios.items():
        print(f'rotation key / ciphertext (serialised, depth {depth}): {r:.2f}')
    out = dict(openfhe=getattr(fhe, '__version__', 'unknown'), bootstrap_depth_2_2=boot, ring_dim=65536,
               security='HEStd_128_classic', pairs=rows, key_over_ciphertext={str(k): v for k, v in ratios.items()},
               seconds=time.perf_counter() - t0, load_average=os.getloadavg()[0])
    path = Path(args.json)
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)
    print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
