"""Where results go: checks of output paths before anything is written, and write failures as one line.

Every command checks its output paths before it starts work (so that a typo does not cost an hour of
training or evaluation, and a failed check leaves nothing behind):

* ``check_output_folder(path, flag)``: ``path`` is a folder or can be created as one (no file in the
  way, no parent that is a file) and the nearest existing folder accepts files (``os.access``: the
  permission bits, and read-only file systems, which refuse root too); nothing is created, not even a
  probe file;
* ``check_output_file(path, flag)``: the same for a file that a command will write (``--json``, ``--plot``);
* ``free_space_problem(path, need)``: ``None``, or why ``need`` bytes do not fit on the disk of ``path``.

``write_failure(error, path, fix)`` turns an ``OSError`` raised while writing into a ``PolyNeXtError``
whose one line names the file, the cause (disk full, read-only, permission) and the fix.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Optional, Union

from .errors import ConfigError, PolyNeXtError

__all__ = ['OutputError', 'check_output_folder', 'check_output_file', 'free_space_problem', 'write_failure',
           'nearest_existing', 'format_bytes', 'WRITE_ERRNOS']

#: errors of the file system that the user fixes (space, permissions, paths), not bugs
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                errno.EEXIST, errno.ENAMETOOLONG, errno.ENOENT, errno.EFBIG)


class OutputError(PolyNeXtError, OSError):
    """An output path cannot be written (a file in the way, read-only, no space)."""


def format_bytes(n: float) -> str:
    for unit in ('bytes', 'kB', 'MB', 'GB'):
        if abs(n) < 1000 or unit == 'GB':
            return f'{n:.0f} {unit}' if unit == 'bytes' else f'{n:.1f} {unit}'
        n /= 1000.0
    return f'{n:.1f} GB'


def nearest_existing(path: Union[str, Path]) -> Path:
    """``path`` itself or its closest ancestor that exists."""
    p = Path(path).expanduser().absolute()
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _cause(e: OSError) -> str:
    return {errno.ENOSPC: 'no space left on the device', errno.EDQUOT: 'the disk quota is exhausted',
            errno.EROFS: 'the file system is read-only', errno.EACCES: 'permission denied',
            errno.EPERM: 'operation not permitted'}.get(e.errno, e.strerror or type(e).__name__)


def _not_writable(folder: Path) -> Optional[str]:
    """Why files cannot be created in ``folder``, or ``None``."""
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return 'the file system is read-only' if read_only else 'permission denied'


def check_output_folder(path: Union[str, Path], flag: str = '--output') -> Path:
    """``ConfigError`` / ``OutputError`` unless ``path`` is (or can become) a writable folder; creates nothing."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f'{flag} {p} is a file, not a folder; pass a folder path (it is created if missing)')
    base = nearest_existing(p)
    if not base.is_dir():
        raise ConfigError(f'{flag} {p} cannot be created: {base} is a file; pass a path whose parents are folders')
    problem = _not_writable(base)
    if problem is not None:
        raise OutputError(f'cannot write in {base} ({problem}); pass {flag} a writable folder')
    return p


def check_output_file(path: Union[str, Path], flag: str) -> Path:
    """The same as ``check_output_folder`` for a file that a command will write (``--json FILE``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f'{flag} {p} is a folder; pass a file path')
    base = nearest_existing(p.absolute().parent)
    if not base.is_dir():
        raise ConfigError(f'{flag} {p} cannot be written: {base} is a file, not a folder; pass a path whose '
                          f'parents are folders')
    problem = _not_writable(base)
    if problem is not None:
        raise OutputError(f'cannot write {flag} {p} in {base} ({problem}); pass a path in a writable folder')
    return p


def free_space_problem(path: Union[str, Path], need: int) -> Optional[str]:
    """Why ``need`` bytes do not fit on the disk that holds ``path`` (or would hold it), or ``None``."""
    base = nearest_existing(path)
    try:
        free = shutil.disk_usage(base).free
    except OSError:
        return None
    if free >= need:
        return None
    return (f'only {format_bytes(free)} free on the disk of {base}, and one checkpoint needs about '
            f'{format_bytes(need)}')


def write_failure(error: OSError, path: Union[str, Path], fix: str) -> PolyNeXtError:
    """One-line error for an ``OSError`` raised while writing ``path``: the file, the cause and ``fix``."""
    return OutputError(f'cannot write {path}: {_cause(error)}; {fix}')
