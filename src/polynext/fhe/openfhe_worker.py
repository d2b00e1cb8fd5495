"""OpenFHE worker: runs a polynext packed-slot program with bootstrapping, in a Python that has openfhe.

This file is executed by a separate interpreter (openfhe's wheels exist for CPython 3.8 / 3.10 / 3.12,
not for polynext's 3.11), so it imports only numpy and openfhe:

    python openfhe_worker.py JOB_DIR

``JOB_DIR/job.json`` holds the parameters and the ops, ``JOB_DIR/consts.npy`` the plaintext vectors (one
per image block), ``JOB_DIR/inputs.npy`` the packed inputs (n_inputs, n_sets, slots). It writes
``JOB_DIR/outputs.npy`` (decrypted, n_outputs, n_sets, slots) and ``JOB_DIR/result.json`` (times, memory,
levels). Scale management is OpenFHE's FLEXIBLEAUTO: the program's ``rs`` / ``drop`` are done by the
library (same level accounting), ``boot`` is ``EvalBootstrap``.
"""
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def main(job_dir: str) -> int:
    import openfhe as fhe
    job_dir = Path(job_dir)
    job = json.loads((job_dir / 'job.json').read_text())
    consts = np.load(job_dir / 'consts.npy', mmap_mode='r')
    inputs = np.load(job_dir / 'inputs.npy')
    p = job['params']
    t0 = time.perf_counter()
    params = fhe.CCParamsCKKSRNS()
    params.SetSecretKeyDist(fhe.SecretKeyDist.UNIFORM_TERNARY)
    if p['insecure']:
        params.SetSecurityLevel(fhe.SecurityLevel.HEStd_NotSet)
        params.SetRingDim(p['ring_dim'])
    else:
        params.SetSecurityLevel(fhe.SecurityLevel.HEStd_128_classic)
        params.SetRingDim(p['ring_dim'])
    params.SetScalingModSize(p['scale_bits'])
    params.SetFirstModSize(p['first_bits'])
    params.SetScalingTechnique(fhe.ScalingTechnique.FLEXIBLEAUTO)
    budget = p['level_budget']
    boot_depth = fhe.FHECKKSRNS.GetBootstrapDepth(budget, fhe.SecretKeyDist.UNIFORM_TERNARY) \
        if hasattr(fhe, 'FHECKKSRNS') else fhe.CryptoContext.GetBootstrapDepth(budget, fhe.SecretKeyDist.UNIFORM_TERNARY)
    params.SetMultiplicativeDepth(p['depth'])
    slots = p['slots']
    params.SetBatchSize(slots)
    cc = fhe.GenCryptoContext(params)
    for feat in (fhe.PKESchemeFeature.PKE, fhe.PKESchemeFeature.KEYSWITCH, fhe.PKESchemeFeature.LEVELEDSHE,
                 fhe.PKESchemeFeature.ADVANCEDSHE, fhe.PKESchemeFeature.FHE):
        cc.Enable(feat)
    has_boot = any(op[0] == 'boot' for op in job['ops'])
    if has_boot:
        cc.EvalBootstrapSetup(budget, [0, 0], slots)
    keys = cc.KeyGen()
    cc.EvalMultKeyGen(keys.secretKey)
    if job['steps']:
        cc.EvalRotateKeyGen(keys.secretKey, job['steps'])
    if has_boot:
        cc.EvalBootstrapKeyGen(keys.secretKey, slots)
    t_keys = time.perf_counter() - t0
    reps = job['images']
    ops = job['ops']
    last = job['last_use']
    n_sets = inputs.shape[1]
    outputs = np.zeros((job['n_outputs'], n_sets, slots))
    t_eval = []
    n_boot = 0
    t_boot = 0.0
    for s in range(n_sets):
        t1 = time.perf_counter()
        regs = {}
        for k, op in enumerate(ops):
            code = op[0]
            if code == 'in':
                pt = cc.MakeCKKSPackedPlaintext(list(map(float, inputs[op[2], s])))
                regs[op[1]] = cc.Encrypt(keys.publicKey, pt)
            elif code == 'rot':
                regs[op[1]] = cc.EvalRotate(regs[op[2]], int(op[3]))
            elif code == 'mulp':
                ct = regs[op[2]]
                vec = np.tile(consts[op[3]], reps).tolist()
                pt = cc.MakeCKKSPackedPlaintext(vec, 1, ct.GetLevel())
                regs[op[1]] = cc.EvalMult(ct, pt)
            elif code == 'addp':
                ct = regs[op[2]]
                vec = np.tile(consts[op[3]], reps).tolist()
                pt = cc.MakeCKKSPackedPlaintext(vec, ct.GetNoiseScaleDeg(), ct.GetLevel())
                regs[op[1]] = cc.EvalAdd(ct, pt)
            elif code == 'mul':
                regs[op[1]] = cc.EvalMult(regs[op[2]], regs[op[3]])
            elif code == 'add':
                regs[op[1]] = cc.EvalAdd(regs[op[2]], regs[op[3]])
            elif code in ('rs', 'drop'):
                regs[op[1]] = regs[op[2]]            # FLEXIBLEAUTO rescales and aligns levels itself
            elif code == 'boot':
                tb = time.perf_counter()
                regs[op[1]] = cc.EvalBootstrap(regs[op[2]])
                t_boot += time.perf_counter() - tb
                n_boot += 1
            elif code == 'out':
                dec = cc.Decrypt(keys.secretKey, regs[op[2]])
                dec.SetLength(slots)
                outputs[op[3], s] = np.array(dec.GetRealPackedValue())[:slots]
            for r in ([op[2]] if code not in ('in',) else []) + ([op[3]] if code in ('mul', 'add') else []):
                if r >= 0 and last[r] == k:
                    regs.pop(r, None)
        t_eval.append(time.perf_counter() - t1)
    np.save(job_dir / 'outputs.npy', outputs)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    (job_dir / 'result.json').write_text(json.dumps(dict(
        seconds_keygen=t_keys, seconds_per_ciphertext=t_eval, bootstraps=n_boot, seconds_bootstrap_total=t_boot,
        peak_rss_bytes=ru.ru_maxrss * 1024, cpu_seconds=ru.ru_utime + ru.ru_stime, boot_depth=int(boot_depth),
        ring_dim=int(cc.GetRingDimension()), openfhe=getattr(fhe, '__version__', 'unknown'))))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1]))
