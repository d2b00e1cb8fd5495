"""polynext's hand-written CPU kernels (``csrc/cpu_kernels.c``), compiled on first use and loaded with ctypes.

What they are and why each is written by hand: ``ops.channel_norm`` (the channel LayerNorm, with PolyMLP's
product and PolyConv's residual in the same pass; in float32 training with its backward) and
``ops.poly_attention`` (in float32 with AVX-512, and in bfloat16 with AVX-512 BF16, the whole attention forward
in one kernel and its training backward in another, the N x N scores kept in the caches; elsewhere the power and row
normalisation at bfloat16
inference and, in training, the power with the row sums, the backward's recomputation and dL/dS) and
``ops.flip_product`` (PolyConv's product with the channel-reversed fine branch, and its backward) and
``ops.polyconv_dw`` (PolyConv's three depthwise convolutions and its product at inference, in one pass over memory,
with AVX-512 or AVX2) and ``ops.attention_convs`` (PolyAttn's depthwise convolutions read and written in the
attention's head layout, with AVX-512 or AVX2). Each replaces several
passes of PyTorch's CPU operators over a tensor that does not fit in the caches by one. And ``ops.depthwise``'s
weight gradient of a depthwise convolution (dilated or not, 3x3 to 7x7), where oneDNN takes a generic kernel, and
``ops.narrow_pointwise``'s 1x1 convolutions at fp32 inference, register tiles of 72 or 48 outputs (faster than oneDNN's
at PolyNeXt's shapes, most of all its narrow first stages), and the same with the channel LayerNorm as their epilogue
(the convolution's output is normalised in the caches instead of written and read back).

The library is compiled with the system's C compiler (``$CC``, else ``cc`` / ``gcc``; ``-O3 -march=native``,
OpenMP when torch's own libgomp is loaded, so that it shares torch's thread pool) into the polynext cache
folder (``ops.cache``), one file per source, compiler, flags and CPU, written atomically; a later process
loads it. Where there is no compiler, or it fails, there is one warning and the callers use PyTorch's
operators. The kernels apply only to eager CPU work (``ops.fused.eager_cpu``: not compiling, exporting, tracing,
under a dispatch mode or a ``torch.func`` transform), so ``fusion(False)`` turns them off with the oneDNN fusions.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

from .fused import Switch

__all__ = ['library', 'kernels', 'kernel_available', 'kernel_fn', 'kernel_info', 'profiling', 'poly_rows_', 'poly_power_',
           'poly_prep_', 'poly_ds_', 'poly_attention_fused', 'poly_attention_backward_fused',
           'fused_attention_available', 'fused_attention', 'fused_polyconv', 'narrow_pointwise', 'pointwise_norm',
           'fused_mlp', 'heads_convs', 'norm_in_place', 'check_status']

_SOURCE = Path(__file__).with_name('csrc') / 'cpu_kernels.c'
#: -ffp-contract=off: GCC would otherwise fuse a product into the next addition differently in two passes over
#: the same values (channel_norm's statistics and normalisation), so that a value minus its own mean need not be 0
_FLAGS = ('-O3', '-march=native', '-fno-math-errno', '-ffp-contract=off', '-shared', '-fPIC')
#: the hand-written kernels on or off: ``with kernels(False): ...`` (A/B timing and tests), or for a whole process
#: ``POLYNEXT_CPU_KERNELS=0`` (A/B runs of the commands, ``polynext profile`` / ``bench``); off, the callers run
#: PyTorch's operators (the oneDNN fusions of ``ops.fused`` stay as they are)
kernels = Switch(os.environ.get('POLYNEXT_CPU_KERNELS', '1').strip() not in ('0', 'off', 'false', 'no'))

#: the fused attention kernels (6.-8. of the C source) on or off, the other kernels as they are:
#: ``with fused_attention(False): ...`` (A/B timing: ``benchmarks/poly_attention.py``)
fused_attention = Switch()

#: PolyConv's fused depthwise core (9. of the C source, ``ops.polyconv_dw``) on or off, the other kernels as they
#: are: ``with fused_polyconv(False): ...`` (A/B timing: ``benchmarks/polyconv_dw.py``)
fused_polyconv = Switch()

#: the narrow 1x1 convolution kernel (10. of the C source, ``ops.narrow_pointwise``) on or off, the other kernels as
#: they are: ``with narrow_pointwise(False): ...`` (A/B timing: ``benchmarks/narrow_pointwise.py``)
narrow_pointwise = Switch()

#: the channel LayerNorm as the narrow 1x1 kernel's epilogue (11. of the C source, ``ops.narrow_pointwise``:
#: PolyMLP's ``fc_in`` with its product and norm, PolyConv's ``pw_out`` with its norm and residual) on or off, the
#: 1x1 kernel itself as it is: ``with pointwise_norm(False): ...`` (A/B timing: ``benchmarks/narrow_pointwise.py``)
pointwise_norm = Switch()

#: PolyMLP's whole residual branch in one kernel (12. of the C source, ``ops.narrow_pointwise.poly_mlp_``) on or off,
#: the others as they are: ``with fused_mlp(False): ...`` (A/B timing: ``benchmarks/narrow_pointwise.py``)
fused_mlp = Switch()

#: PolyAttn's depthwise convolutions between the channels-last projections and the attention's heads (14. of the C
#: source, ``ops.attention_convs``) on or off, the others as they are: ``with heads_convs(False): ...`` (A/B timing:
#: ``benchmarks/attention_convs.py``)
heads_convs = Switch()

#: the norm epilogue of 11. writing into the residual stream it adds (a block's own stream) instead of a new tensor,
#: on or off: ``with norm_in_place(False): ...`` (A/B timing: ``benchmarks/switch_ab.py cpu_kernels.norm_in_place``)
norm_in_place = Switch()


#: whether the profiler is on: the callers then go through the dispatcher, so that it records their operators
profiling = getattr(torch._C._autograd, '_profiler_enabled', lambda: True)


def _torch_openmp() -> Optional[str]:
    """The OpenMP runtime torch has loaded, if it is GNU's under its own soname (``libgomp.so.1``, or the file
    it links to): linking the kernel with -fopenmp then resolves to that same library, so both share one
    thread pool. (Copies renamed by their wheels, such as scikit-learn's ``libgomp-<hash>.so``, do not count.)
    Another runtime, or none, and the kernel is built single-threaded rather than bring a second pool."""
    if 'OpenMP' not in torch.__config__.parallel_info():
        return None
    try:
        with open('/proc/self/maps') as f:
            paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
    except OSError:
        return None
    return next((p for p in sorted(paths) if os.path.basename(p).startswith('libgomp.so.1')), None)


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and instruction flags."""
    try:
        with open('/proc/cpuinfo') as f:
            lines = [line for line in f if line.startswith(('model name', 'flags', 'Features', 'CPU part'))]
        return ''.join(sorted(set(lines)))
    except OSError:
        import platform
        return f'{platform.machine()} {platform.processor()}'


def compiler() -> Optional[str]:
    return os.environ.get('CC') or shutil.which('cc') or shutil.which('gcc')


def build(compiler: str, openmp: bool, march: str = 'native', folder: Optional[Path] = None) -> Path:
    """Compile the kernel (once per source, compiler, flags and CPU) into ``folder`` (default: the cache
    folder) and return the library's path; the file appears whole or not at all."""
    from .cache import cache_dir
    flags = [f if f != '-march=native' else f'-march={march}' for f in _FLAGS]
    flags += ['-fopenmp'] if openmp else ['-fopenmp-simd']
    version = subprocess.run([compiler, '--version'], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256('\n'.join([_SOURCE.read_text(), compiler, version, ' '.join(flags), _cpu_id()]).encode())
    target = (folder or cache_dir() / 'kernels') / f'cpu_kernels-{key.hexdigest()[:16]}.so'
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(target.parent, os.W_OK):
            raise PermissionError(f'{target.parent} is not writable')
    except OSError:   # a read-only cache: built for this process only (a loaded library may be deleted)
        target = Path(tempfile.mkdtemp(prefix='polynext-kernels-')) / target.name
    fd, tmp = tempfile.mkstemp(prefix='.cpu_kernels-', suffix='.so', dir=target.parent)
    os.close(fd)
    try:
        r = subprocess.run([compiler, *flags, '-o', tmp, str(_SOURCE), '-lm'], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f'{compiler} failed: ' + (r.stderr.strip().splitlines() or ['(no message)'])[-1])
        os.replace(tmp, target)   # atomic: a concurrent process loads a whole file or builds its own
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(path: Path, openmp: bool) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.polynext_channel_norm_f32, lib.polynext_channel_norm_bf16, lib.polynext_channel_norm_bf16_w32):
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
    for fn in (lib.polynext_channel_norm_backward_f32, lib.polynext_channel_norm_backward_bf16):
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
    for fn in (lib.polynext_poly_rows_f32, lib.polynext_poly_rows_bf16):
        fn.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
    for fn in (lib.polynext_poly_prep_f32, lib.polynext_poly_prep_bf16):
        fn.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
    for fn in (lib.polynext_poly_ds_f32, lib.polynext_poly_ds_bf16):
        fn.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_int]
        fn.restype = ctypes.c_int
    for fn in (lib.polynext_flip_mul_f32, lib.polynext_flip_mul_bf16):
        fn.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_int]
        fn.restype = ctypes.c_int
    for fn in (lib.polynext_flip_mul_backward_f32, lib.polynext_flip_mul_backward_bf16):
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_int]
        fn.restype = ctypes.c_int
    for fn in (lib.polynext_dw_wgrad_f32, lib.polynext_dw_wgrad_bf16):
        fn.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
    for fn in (lib.polynext_poly_attention_f32, lib.polynext_poly_attention_bf16):
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ctypes.c_float, ctypes.c_int]
        fn.restype = ctypes.c_int
    for fn in (lib.polynext_poly_attention_backward_f32, lib.polynext_poly_attention_backward_bf16):
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
    for fn in (lib.polynext_polyconv_dw_f32, lib.polynext_polyconv_dw_bf16):
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
    lib.polynext_polyconv_dw_built.restype = ctypes.c_int
    for fn in (lib.polynext_heads_dw_f32, lib.polynext_heads_dw_bf16):
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
    lib.polynext_heads_dw_built.restype = ctypes.c_int
    lib.polynext_pointwise_f32.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int]
    lib.polynext_pointwise_f32.restype = ctypes.c_int
    lib.polynext_pointwise_norm_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_float,
                                                ctypes.c_int, ctypes.c_int]
    lib.polynext_pointwise_norm_f32.restype = ctypes.c_int
    lib.polynext_poly_mlp_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_float,
                                          ctypes.c_int]
    lib.polynext_poly_mlp_f32.restype = ctypes.c_int
    lib.polynext_pointwise_norm_bf16.argtypes = lib.polynext_pointwise_norm_f32.argtypes
    lib.polynext_pointwise_norm_bf16.restype = ctypes.c_int
    lib.polynext_poly_mlp_bf16.argtypes = lib.polynext_poly_mlp_f32.argtypes
    lib.polynext_poly_mlp_bf16.restype = ctypes.c_int
    lib.polynext_pointwise_bf16_built.restype = ctypes.c_int
    lib.polynext_pointwise_built.restype = ctypes.c_int
    lib.polynext_poly_attention_fused.restype = ctypes.c_int
    lib.polynext_poly_attention_fused_bf16.restype = ctypes.c_int
    lib.polynext_cpu_kernels_code.restype = ctypes.c_char_p
    lib.openmp = openmp
    # the dtypes the fused attention is built for (AVX-512; bf16: AVX-512 BF16), read once, not per call
    lib.attention_fused = frozenset([torch.float32] * bool(lib.polynext_poly_attention_fused()) +
                                    [torch.bfloat16] * bool(lib.polynext_poly_attention_fused_bf16()))
    lib.polyconv_dw = bool(lib.polynext_polyconv_dw_built())   # AVX-512 or AVX2
    lib.pointwise = bool(lib.polynext_pointwise_built())       # AVX-512 or AVX2
    lib.heads_dw = bool(lib.polynext_heads_dw_built())         # AVX-512 or AVX2
    lib.pointwise_bf16 = bool(lib.polynext_pointwise_bf16_built())   # AVX-512 BF16: pointwise_norm, poly_mlp_
    lib.polynext_pointwise_cols.restype = ctypes.c_int
    lib.pointwise_cols = lib.polynext_pointwise_cols()   # the f32 weight's packing (ops.narrow_pointwise._pack)
    return lib


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None (with one warning) where it cannot be built here."""
    cc = compiler()
    if cc is None:
        warnings.warn('polynext: no C compiler (cc / gcc, or $CC) found, so the CPU kernels are PyTorch\'s '
                      'slower CPU operators; install one to enable polynext.ops.cpu_kernels')
        return None
    openmp = _torch_openmp() is not None
    try:
        return load(build(cc, openmp), openmp)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f'polynext: the CPU kernels could not be built ({err}); using PyTorch\'s operators')
        return None


def kernel_available() -> bool:
    """Whether the kernels are on (:func:`kernels`) and built and loaded in this process (built on the first
    call)."""
    return kernels.on and library() is not None


def kernel_info() -> dict:
    """Which code the kernel runs ('avx512'; 'avx2': the depthwise and 1x1 kernels in AVX2, the norms and attention
    portable; or 'portable'), whether it is threaded, and its file."""
    lib = library()
    if lib is None:
        return dict(available=False)
    return dict(available=True, code=lib.polynext_cpu_kernels_code().decode(), openmp=lib.openmp,
                path=lib._name)


def kernel_fn(name: str, t: torch.Tensor, lib: Optional[ctypes.CDLL] = None):
    """The library's ``polynext_<name>_f32`` or ``_bf16`` entry point for ``t``'s dtype."""
    return getattr(lib or library(), f"polynext_{name}_{'f32' if t.dtype == torch.float32 else 'bf16'}")


def _poly_rows(s: torch.Tensor, power: int, eps: float) -> torch.Tensor:
    n = s.shape[-1]
    if kernel_fn('poly_rows', s)(s.data_ptr(), s.data_ptr(), None, s.numel() // n, n, power, eps, torch.get_num_threads(),
                           1) != 0:
        raise RuntimeError(f'polynext::poly_rows_: power {power} is not 2 or 4')
    return s


def _poly_power_(s: torch.Tensor, power: int, eps: float, normalise: bool) -> torch.Tensor:
    """s ← (s + 1)^power (divided by its row sum with ``normalise``); returns the clamped row sums (float32, the
    shape of s with a last dimension of 1)."""
    n = s.shape[-1]
    rowsum = torch.empty(s.shape[:-1] + (1,), dtype=torch.float32)
    if kernel_fn('poly_rows', s)(s.data_ptr(), s.data_ptr(), rowsum.data_ptr(), s.numel() // n, n, power, eps,
                           torch.get_num_threads(), int(normalise)) != 0:
        raise RuntimeError(f'polynext::poly_power_: power {power} is not 2 or 4')
    return rowsum


def _poly_prep_(s: torch.Tensor, power: int, rowsum: Optional[torch.Tensor]) -> torch.Tensor:
    """The attention backward's recomputation: s ← (s + 1)^power (÷ ``rowsum`` where given, a float32 tensor of
    one value per row); returns (s + 1)^(power - 1) in float32."""
    n = s.shape[-1]
    p3 = torch.empty(s.shape, dtype=torch.float32)
    r = None if rowsum is None else rowsum.contiguous()
    if kernel_fn('poly_prep', s)(s.data_ptr(), p3.data_ptr(), None if r is None else r.data_ptr(), s.numel() // n, n,
                           power, torch.get_num_threads()) != 0:
        raise RuntimeError(f'polynext::poly_prep_: power {power} is not 2 or 4')
    return p3


def _poly_ds_(da: torch.Tensor, p3: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """dL/dS = (dL/dA + d) ⊙ p3, written over ``da`` (d: float32, one value per row); returns ``da``."""
    n = da.shape[-1]
    d = d.contiguous()
    kernel_fn('poly_ds', da)(da.data_ptr(), p3.data_ptr(), d.data_ptr(), da.numel() // n, n, torch.get_num_threads())
    return da


def fused_attention_available(q: torch.Tensor, v: torch.Tensor, power: int, k: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`poly_attention_fused` serves these heads: the kernels on and built for their dtype (float32:
    AVX-512, the kernel's blocks are register tiles; bfloat16: AVX-512 BF16, its products are pair dot products;
    elsewhere PyTorch's path), Q, V (and K where given) of one dtype, head dimension 16 or 32, power 2 or 4. (K is a
    keyword: earlier versions of ``ops/poly_attention.py``, which ``benchmarks/poly_attention.py --baseline`` loads,
    call it without.)"""
    if not (power in (2, 4) and q.dtype == v.dtype == (q.dtype if k is None else k.dtype)
            and q.shape[-1] == v.shape[-1] in (16, 32)):
        return False
    return fused_attention.on and kernel_available() and q.dtype in library().attention_fused


def check_status(op: str, status: int, buffers: str, refused: str, check: str) -> None:
    """A kernel's status as an error, the convention of every entry point of the C source: 0 done, 1 a call it does
    not serve (``refused``: what; ``check``: the function that says where it serves), 2 a thread's ``buffers`` could
    not be allocated."""
    if status == 2:
        raise MemoryError(f"polynext::{op}: out of memory for {buffers}; free memory, or run with "
                          "POLYNEXT_CPU_KERNELS=0 (PyTorch's path)")
    if status != 0:
        raise RuntimeError(f'polynext::{op}: {refused} is not served here (check {check} first)')


def _check_fused(name: str, status: int, keys: int, dim: int, power: int) -> None:
    check_status(name, status, f"a thread's {keys}-key buffers", f'head dimension {dim} or power {power}',
                 'fused_attention_available')


def _check_dtypes(name: str, rowsum: Optional[torch.Tensor], *heads: torch.Tensor) -> None:
    """The fused kernels read every head tensor in one dtype (and the row sums in float32): anything else would be
    read as the wrong type, so it is refused before the call."""
    if len({t.dtype for t in heads}) != 1 or (rowsum is not None and rowsum.dtype != torch.float32):
        got = ', '.join(str(t.dtype) for t in heads + ((rowsum,) if rowsum is not None else ()))
        raise TypeError(f'polynext::{name}: the heads need one dtype and the row sums float32 (got {got}); cast them '
                        'first, or call ops.poly_attention.poly_attention, which checks fused_attention_available')


def _poly_attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, power: int,
                          eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_dtypes('poly_attention_fused', None, q, k, v)
    bh, n, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    rowsum = torch.empty(bh, n, 1, dtype=torch.float32)
    lib = library()
    fn = lib.polynext_poly_attention_bf16 if q.dtype == torch.bfloat16 else lib.polynext_poly_attention_f32
    status = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), rowsum.data_ptr(), bh, n, k.shape[1], d,
                power, eps, torch.get_num_threads())
    _check_fused('poly_attention_fused', status, k.shape[1], d, power)
    return out, rowsum


def _poly_attention_backward_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                   grad: torch.Tensor, rowsum: torch.Tensor,
                                   power: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_dtypes('poly_attention_backward_fused', rowsum, q, k, v, out, grad)
    bh, n, d = q.shape
    q, k, v, out, grad, rowsum = (t.contiguous() for t in (q, k, v, out, grad, rowsum))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lib = library()
    fn = lib.polynext_poly_attention_backward_bf16 if q.dtype == torch.bfloat16 else \
        lib.polynext_poly_attention_backward_f32
    status = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), grad.data_ptr(), rowsum.data_ptr(),
                dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), bh, n, k.shape[1], d, power, torch.get_num_threads())
    _check_fused('poly_attention_backward_fused', status, k.shape[1], d, power)
    return dq, dk, dv


# registered once, here: the operators' modules may be loaded twice (benchmarks/poly_attention.py loads a
# previous version of ops/poly_attention.py from a file)
_LIB = torch.library.Library('polynext', 'FRAGMENT')
_LIB.define('poly_rows_(Tensor(a!) s, int power, float eps) -> Tensor(a!)')
_LIB.define('poly_power_(Tensor(a!) s, int power, float eps, bool normalise) -> Tensor')
_LIB.define('poly_prep_(Tensor(a!) s, int power, Tensor? rowsum) -> Tensor')
_LIB.define('poly_ds_(Tensor(a!) da, Tensor p3, Tensor d) -> Tensor(a!)')
_LIB.define('poly_attention_fused(Tensor q, Tensor k, Tensor v, int power, float eps) -> (Tensor, Tensor)')
_LIB.impl('poly_attention_fused', _poly_attention_fused, 'CPU')
_LIB.define('poly_attention_backward_fused(Tensor q, Tensor k, Tensor v, Tensor out, Tensor grad, Tensor rowsum, '
            'int power) -> (Tensor, Tensor, Tensor)')
_LIB.impl('poly_attention_backward_fused', _poly_attention_backward_fused, 'CPU')
_LIB.impl('poly_rows_', _poly_rows, 'CPU')
_LIB.impl('poly_power_', _poly_power_, 'CPU')
_LIB.impl('poly_prep_', _poly_prep_, 'CPU')
_LIB.impl('poly_ds_', _poly_ds_, 'CPU')


def poly_rows_(s: torch.Tensor, power: int, eps: float) -> torch.Tensor:
    """The polynomial attention's weights from its scores, in place: s ← (s + 1)^power / max(row sum, eps)
    (power 2 or 4; a contiguous float32 or bfloat16 CPU tensor, rows along the last dimension); returns s.
    Through the dispatcher (``polynext::poly_rows_``) while the profiler runs."""
    return torch.ops.polynext.poly_rows_(s, power, eps) if profiling() else _poly_rows(s, power, eps)


def poly_power_(s: torch.Tensor, power: int, eps: float, normalise: bool) -> torch.Tensor:
    """The attention forward of training: s ← (s + 1)^power, divided by the row sums with ``normalise``; returns
    the row sums clamped at ``eps`` (float32). One pass (``polynext::poly_power_``)."""
    return torch.ops.polynext.poly_power_(s, power, eps, normalise) if profiling() else \
        _poly_power_(s, power, eps, normalise)


def poly_prep_(s: torch.Tensor, power: int, rowsum: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The attention backward's recomputation in one pass (``polynext::poly_prep_``): s ← (s + 1)^power (divided
    by ``rowsum``, one float32 value per row, where given); returns (s + 1)^(power - 1) in float32."""
    return torch.ops.polynext.poly_prep_(s, power, rowsum) if profiling() else _poly_prep_(s, power, rowsum)


def poly_ds_(da: torch.Tensor, p3: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """dL/dS = (dL/dA + d) ⊙ (S + 1)^(p - 1) over ``da`` in one pass (``polynext::poly_ds_``); returns ``da``."""
    return torch.ops.polynext.poly_ds_(da, p3, d) if profiling() else _poly_ds_(da, p3, d)


def poly_attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, power: int,
                         eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The whole polynomial attention in one kernel (``polynext::poly_attention_fused``; float32 on AVX-512,
    bfloat16 on AVX-512 BF16, O in the inputs' dtype): for
    (heads, N, d) queries and (heads, M, d) keys and values, O = (A / max(rowsum(A), eps)) V with
    A = (Q Kᵀ + 1)^power; returns O and the clamped row sums (float32, heads x N x 1). The N x M scores never
    leave the caches. Check :func:`fused_attention_available` first."""
    return torch.ops.polynext.poly_attention_fused(q, k, v, power, eps) if profiling() else \
        _poly_attention_fused(q, k, v, power, eps)


def poly_attention_backward_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                  grad: torch.Tensor, rowsum: torch.Tensor,
                                  power: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`poly_attention_fused` in one kernel (``polynext::poly_attention_backward_fused``):
    from the (heads, N, d) queries, (heads, M, d) keys and values, the forward's output and clamped row sums (heads x
    N x 1) and the output's gradient, the gradients of Q, K and V. The scores are recomputed; no N x M tensor is
    written. Check :func:`fused_attention_available` first."""
    if profiling():
        return torch.ops.polynext.poly_attention_backward_fused(q, k, v, out, grad, rowsum, power)
    return _poly_attention_backward_fused(q, k, v, out, grad, rowsum, power)
