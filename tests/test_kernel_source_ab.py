"""benchmarks/kernel_source_ab.py: the kernels built from a git revision's source against the working tree's, in one
process; an older source lacking an entry point gets a stub that says "not built"."""
import json
import subprocess
from pathlib import Path

import pytest

from conftest import load_benchmark
from test_cpu_kernels import needs_cc

ROOT = Path(__file__).resolve().parents[1]


def test_missing_entry_points_become_not_built_stubs():
    """Only what the loader binds and the source lacks is stubbed; a name defined through a macro counts as there."""
    script = load_benchmark('kernel_source_ab')
    loader = ('lib.polynext_a_f32.argtypes = []\nlib.polynext_b_built.restype = int\nlib.polynext_c_f32(1)\n'
              'lib.pointwise_cols = lib.polynext_d_cols()\n')
    source = 'KERNEL(polynext_c_f32, float)\n'
    out = script.with_stubs(source, loader)
    assert out.startswith(source)
    assert 'int polynext_a_f32(void) { return 1; }' in out and 'int polynext_b_built(void) { return 0; }' in out
    assert 'int polynext_d_cols(void) { return 0; }' in out   # the older packing: one column a chunk
    assert out.count('polynext_c_f32') == 1


def _in_git_checkout() -> bool:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True).returncode == 0


@needs_cc
@pytest.mark.skipif(not _in_git_checkout(), reason='needs the git history of this repository')
def test_the_benchmark_at_a_tiny_size(tmp_path, capsys):
    """The committed source (HEAD) against the working tree at 2 images of 32 px: both builds timed, the commit
    named, the logit difference reported."""
    out = tmp_path / 'ab.json'
    assert load_benchmark('kernel_source_ab').main(['cpolynext_t', '--rev', 'HEAD', '--batch-size', '2',
                                                    '--img-size', '32', '--runs', '1', '--json', str(out)]) == 0
    data = json.loads(out.read_text())
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert data['commit'] == head and data['rev'] == 'HEAD'
    (row,) = data['rows']
    assert row['model'] == 'cpolynext_t' and row['old_img_s'] > 0 and row['new_img_s'] > 0
    assert row['max_abs_logit_diff'] >= 0
    assert 'working tree' in capsys.readouterr().out
