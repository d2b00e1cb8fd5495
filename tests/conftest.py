import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault('TIMM_FUSED_ATTN', '1')
# the 1x1 weight-gradient kernel choices (polynext.ops.pointwise) go to a folder of this test session,
# shared with its subprocesses, not to the user's ~/.cache
os.environ.setdefault('POLYNEXT_CACHE_DIR', tempfile.mkdtemp(prefix='polynext-test-cache-'))
# one intra-op thread per xdist worker (2 workers on 2 cores); 2 threads in a plain run
torch.set_num_threads(1 if os.environ.get('PYTEST_XDIST_WORKER') else min(2, os.cpu_count() or 1))

import polynext  # noqa: E402,F401  (registers the models)

GOLDEN = Path(__file__).parent / 'golden'
SRC = Path(__file__).resolve().parents[1] / 'src'


def subprocess_env() -> dict:
    """The environment of a polynext subprocess in a test: this checkout's ``src`` first on the path, one
    intra-op thread, and no rank inherited from an outer torchrun."""
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    env.pop('RANK', None)
    env.pop('WORLD_SIZE', None)
    return env


def run_metrics(run) -> list:
    """A run folder's metrics.json without its wall-clock fields (``*_time_s``), to compare two runs."""
    import json
    rows = json.loads((Path(run) / 'metrics.json').read_text())
    return [{k: v for k, v in r.items() if not k.endswith('_time_s')} for r in rows]

#: golden folder -> (our model name, extra kwargs of the mini model)
GOLDEN_MODELS = {
    'CPolyNeXt_T': ('cpolynext_t', {}),
    'APolyNeXt_T': ('apolynext_t', {}),
    'LowRes': ('cpolynext_lr', {}),
    'CPolyNeXt_T_bn': ('cpolynext_t_bn', {'img_size': 64}),
    'CPolyNeXt_S': ('cpolynext_s', {}),
    'CPolyNeXt_L': ('cpolynext_l', {}),
    'APolyNeXt_T_bn': ('apolynext_t_bn', {'img_size': 64}),
    'CPolyNeXt_S_bn': ('cpolynext_s_bn', {'img_size': 64}),
}


def mini_kwargs(name: str, **extra):
    """The golden 'mini' build of a published model: C0 = 16, 10 classes (bn at 64 px)."""
    kw = dict(init_channels=16, num_classes=10)
    if name.endswith('_bn'):
        kw['img_size'] = 64
    kw.update(extra)
    return kw


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the scripts are not a package), to call its ``main(argv)``."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / 'benchmarks'
                                                  / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_only_mount(monkeypatch, folder):
    """Make ``folder`` behave as a read-only mount does, for root too (tests run as root, where ``chmod`` does not
    stop a write): ``access(W_OK)`` is refused, ``statvfs`` reports ``ST_RDONLY``, and creating, opening for
    writing, renaming onto or making a folder under it fails with ``EROFS``."""
    import builtins
    import errno
    import tempfile

    folder = Path(folder).absolute()

    def inside(path) -> bool:
        try:
            return Path(os.fsdecode(path)).absolute().is_relative_to(folder)
        except TypeError:       # a file descriptor
            return False

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_access, real_statvfs, real_mkstemp = os.access, os.statvfs, tempfile.mkstemp
    real_open, real_mkdir, real_replace = builtins.open, os.mkdir, os.replace

    def access(path, mode, *a, **kw):
        return False if inside(path) and mode & os.W_OK else real_access(path, mode, *a, **kw)

    def statvfs(path):
        r = real_statvfs(path)
        return os.statvfs_result((*r[:8], r.f_flag | os.ST_RDONLY, r[9])) if inside(path) else r

    def mkstemp(*args, dir=None, **kw):
        return refuse(dir) if dir is not None and inside(dir) else real_mkstemp(*args, dir=dir, **kw)

    def open_(file, mode='r', *args, **kw):
        if isinstance(file, (str, bytes, os.PathLike)) and inside(file) and any(c in mode for c in 'wax+'):
            refuse(file)
        return real_open(file, mode, *args, **kw)

    def mkdir(path, *args, **kw):
        return refuse(path) if inside(path) else real_mkdir(path, *args, **kw)

    def replace(src, dst, *args, **kw):
        return refuse(dst) if inside(dst) else real_replace(src, dst, *args, **kw)

    monkeypatch.setattr(os, 'access', access)
    monkeypatch.setattr(os, 'statvfs', statvfs)
    monkeypatch.setattr(tempfile, 'mkstemp', mkstemp)
    monkeypatch.setattr(builtins, 'open', open_)
    monkeypatch.setattr(os, 'mkdir', mkdir)
    monkeypatch.setattr(os, 'replace', replace)
