"""A change to the C kernels, measured: the kernels built from a git revision's source against the working tree's.

    python benchmarks/kernel_source_ab.py --rev HEAD cpolynext_t cpolynext_s --runs 7

``ops.cpu_kernels`` compiles ``csrc/cpu_kernels.c`` on first use, so a process can hold two builds: the source at
``--rev`` (``git show REV:src/polynext/ops/csrc/cpu_kernels.c``) and the working tree's. Each model's ``polynext
bench`` step (inference) runs with one library and then the other, interleaved in one process (order reversed every
other round, medians), and the largest logit difference between them is reported: a change meant to keep the
values (a faster loop in the same order of sums) shows 0 there. A kernel the older source lacks is a stub there that
says it is not built, so the models take PyTorch's path for it with the old library; ``--off SWITCH`` turns one of
``ops.cpu_kernels``' switches off for both (to isolate a change to another kernel). Prints a table and writes JSON;
speed ratios depend on the CPU: the JSON names it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_SOURCE = 'src/polynext/ops/csrc/cpu_kernels.c'


def _old_source(rev: str, folder: Path):
    """The source at ``rev`` (written into ``folder``), with a stub for each entry point the working tree's loader
    binds that it lacks; and the commit ``rev`` names."""
    root = Path(__file__).resolve().parents[1]
    git = dict(cwd=root, capture_output=True, text=True, check=True)
    commit = subprocess.run(['git', 'rev-parse', '--verify', f'{rev}^{{commit}}'], **git).stdout.strip()
    text = subprocess.run(['git', 'show', f'{commit}:{_SOURCE}'], **git).stdout
    path = folder / 'cpu_kernels.c'
    path.write_text(with_stubs(text, (root / 'src/polynext/ops/cpu_kernels.py').read_text()))
    return path, commit


def with_stubs(source: str, loader: str) -> str:
    """``source`` with a stub for every ``polynext_*`` entry point ``loader`` binds that it lacks: ``*_built`` ones
    return 0 (not built: the Python side never calls the kernel), as do ``*_cols`` ones (the weight packing the older
    source had: one column a chunk), the others 1 (the kernels' "not served")."""
    for name in sorted(set(re.findall(r'lib\.(polynext_\w+)', loader))):
        if not re.search(rf'\b{name}\b', source):   # (defined, often through a macro)
            source += f'\nint {name}(void) {{ return {0 if name.endswith(("_built", "_cols")) else 1}; }}\n'
    return source


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='*', default=['cpolynext_t', 'apolynext_t', 'cpolynext_s', 'apolynext_s'])
    parser.add_argument('--rev', default='HEAD', help='the git revision whose kernel source is "old" (default HEAD)')
    parser.add_argument('--off', default=None, metavar='SWITCH',
                        help="an ops.cpu_kernels switch to turn off in both runs (e.g. heads_convs)")
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--runs', type=int, default=7)
    parser.add_argument('--dtype', choices=('fp32', 'bf16'), default='fp32')
    parser.add_argument('--json', default=None, metavar='PATH')
    args = parser.parse_args(argv)
    from polynext.bench import check_script_args
    check_script_args(parser, args, 'kernel_source_ab', argv)
    import polynext.ops as ops
    from polynext.ops import cpu_kernels as ck
    from polynext.ops.fused import Switch
    if args.off is not None and not isinstance(getattr(ck, args.off, None), Switch):
        switches = sorted(k for k, v in vars(ck).items() if isinstance(v, Switch))
        parser.error(f'--off {args.off}: not a switch of ops.cpu_kernels; use one of {", ".join(switches)}')
    new = ck.library()
    if not ck.kernel_available():
        parser.error('the CPU kernels are not built here (a C compiler and the kernels on are needed): nothing to '
                     'compare')
    try:
        folder = Path(tempfile.mkdtemp(prefix='polynext-kernels-ab-'))
        source, commit = _old_source(args.rev, folder)
    except (OSError, subprocess.CalledProcessError) as err:
        why = (getattr(err, 'stderr', None) or str(err)).strip().splitlines()[-1]
        parser.error(f'--rev {args.rev}: git cannot show {_SOURCE} there ({why}); pass a revision of this '
                     'repository')
    here, ck._SOURCE = ck._SOURCE, source
    try:
        old = ck.load(ck.build(ck.compiler(), new.openmp, folder=folder), new.openmp)
    finally:
        ck._SOURCE = here
    modules = [importlib.import_module(f'polynext.ops.{m.name}') for m in pkgutil.iter_modules(ops.__path__)]
    modules = [m for m in modules if hasattr(m, 'library')]

    @contextlib.contextmanager
    def newer(on: bool):
        """every ops module's ``library()`` the working tree's build (on) or the revision's (off)"""
        saved = [m.library for m in modules]
        for m in modules:
            m.library = (lambda lib=new if on else old: lib)
        try:
            yield
        finally:
            for m, f in zip(modules, saved):
                m.library = f

    from polynext.bench import BenchSettings, allocator_status, environment, switch_ab_rows, write_report
    env = environment(ck.torch.device('cpu'))
    off = getattr(ck, args.off)(False) if args.off else contextlib.nullcontext()
    print(f"{env['device_name']}, {ck.torch.get_num_threads()} threads, allocator {allocator_status()}, {args.dtype}, "
          f"batch {args.batch_size}, {args.img_size} px; kernels at {args.rev} against the working tree"
          + (f', {args.off} off' if args.off else '') + f', img/s (median of {args.runs}):', flush=True)
    settings = BenchSettings(mode='infer', dtype=args.dtype, batch_size=args.batch_size, img_size=args.img_size,
                             channels_last=True)
    with off:
        rows = switch_ab_rows(args.models, settings, newer, args.runs, labels=('old', 'new'),
                              names=(args.rev, 'working tree'))
    out = dict(command=['python', 'benchmarks/kernel_source_ab.py'] + list(argv if argv is not None else sys.argv[1:]),
               environment=env, allocator=allocator_status(), rev=args.rev, commit=commit, off=args.off, batch_size=args.batch_size,
               img_size=args.img_size, dtype=args.dtype, rows=rows)
    write_report(args.json, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
