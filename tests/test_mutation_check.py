"""tools/mutation_check.py stays applicable: every planted bug still matches the source exactly once and
names tests that exist (the mutation run itself is a tool, not part of the suite: see the README)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location('mutation_check', ROOT / 'tools' / 'mutation_check.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules['mutation_check'] = module    # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_mutation_applies_to_the_current_source():
    mc = _tool()
    assert mc.stale(mc.MUTATIONS) == []
    names = [m.name for m in mc.MUTATIONS]
    assert len(names) == len(set(names))
    assert all(m.find != m.replace and m.tests for m in mc.MUTATIONS)
    # the audit's survivors are all planted (issue 17)
    for name in ('train-resume-restarts', 'seg-resume-restarts', 'ema-update-skipped', 'ema-state-dropped-on-resume',
                 'gate-init-L', 'rowsum-batch-sum', 'ablation-add-ignored', 'ln-eps', 'optimizer-state-not-restored',
                 'mce-divisor', 'polyconv-flip-removed', 'attn-power-2'):
        assert name in names, name


def test_a_mutation_is_written_and_undone_in_a_copy(tmp_path):
    mc = _tool()
    m = next(m for m in mc.MUTATIONS if m.name == 'ln-eps')
    (tmp_path / Path(m.path).parent).mkdir(parents=True)
    original = (ROOT / m.path).read_text()
    (tmp_path / m.path).write_text(original)
    assert mc.apply(tmp_path, m) == original
    mutated = (tmp_path / m.path).read_text()
    assert mutated.count(m.replace) == 1 and mutated.count(m.find) == 0
    assert (ROOT / m.path).read_text() == original           # the working tree is never touched


def test_list_and_unknown_names():
    out = subprocess.run([sys.executable, str(ROOT / 'tools' / 'mutation_check.py'), '--list'], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and 'polyconv-flip-removed' in out.stdout and 'tests/test_golden.py' in out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / 'tools' / 'mutation_check.py'), '--only', 'flip'],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown mutation 'flip'" in bad.stderr


def test_mutations_of_code_another_cpu_runs_are_not_run_here():
    """A mutation of AVX-512-only code cannot fail a test on a CPU without AVX-512 (the code is not built there): it
    is reported "n/a" with the flags it needs, not run, and not counted as a survivor. Every other kernel mutation
    touches code an AVX2 build runs too (the tests' x86-64-v3 variant), so it is caught on any x86-64 machine."""
    mc = _tool()
    m = next(m for m in mc.MUTATIONS if m.name == 'narrow-pw-half-vector-unsummed')
    assert mc.missing(m, frozenset({'avx2', 'fma'})) == ['avx512f', 'avx512bw']
    assert mc.missing(m, frozenset({'avx2', 'avx512f', 'avx512bw'})) == []
    assert all(not m.needs for m in mc.MUTATIONS if m.name.startswith(('polyconv-dw-', 'heads-dw-', 'pw-norm-',
                                                                       'poly-mlp-partial', 'narrow-pw-avx2')))
    assert all('avx512f' in m.needs for m in mc.MUTATIONS if m.needs)
    if 'avx512f' not in mc.cpu_flags():   # here none of them can run: each is reported, and nothing else happens
        only = [m.name for m in mc.MUTATIONS if m.needs]
        out = subprocess.run([sys.executable, str(ROOT / 'tools' / 'mutation_check.py'), '--only', *only],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and 'none of the selected mutations can run on this CPU' in out.stderr
        assert out.stdout.count('n/a ') == len(only)
