#!/usr/bin/env bash
# Every GPU check of this project in one run on a CUDA machine, so a short GPU lease is spent once:
#
#   bash tools/gpu_session.sh --wheels        # here, with the package registry: the pure-Python packages the
#                                             # GPU image may lack or hold in another version, into .whl/
#   bash tools/gpu_session.sh OUTDIR          # there: benchmarks/gpu_check.py, the tests marked gpu, then
#                                             # `polynext profile` of the S models on the GPU
#
# On the GPU machine polynext runs from src/ (no install, no network): PYTHONPATH=src, plus the wheels of
# .whl/ (timm and segmentation-models-pytorch at this project's pins) unpacked to a private folder. What it
# writes to OUTDIR (at most seven files, each written as it goes, so a run cut short still returns what it
# measured): env.txt (versions, the GPU), gpu_check.json / .log, tests.log, profile.json / .log, summary.txt.
# Time: gpu_check gets GPU_CHECK_S seconds (default 300, its own target), the tests TESTS_S (default 150), the
# profile PROFILE_S (default 60), so the whole run fits in 8.5 minutes (give the command a 540 s limit); the
# tests reuse the kernels gpu_check compiled (inductor's cache), and a cut-short gpu_check still leaves the JSON
# of its finished sections. PYTHON (default python3) is the interpreter; DRY=1 runs gpu_check at toy sizes and
# the profile on the CPU (to try this script on a CPU; the gpu tests then skip).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = "--wheels" ]; then
  pins=$(grep -E '^(timm|segmentation-models-pytorch)==' constraints.txt)
  [ -n "$pins" ] || { echo "gpu_session: no timm / segmentation-models-pytorch pins in constraints.txt" >&2; exit 2; }
  rm -rf .whl.tmp && mkdir -p .whl.tmp
  # shellcheck disable=SC2086
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
      -d .whl.tmp $pins || { rm -rf .whl.tmp; exit 1; }
  rm -rf .whl && mv .whl.tmp .whl && ls -l .whl
  echo "gpu_session: carry .whl with the run (it is git-ignored)"
  exit 0
fi

out=${1:?usage: bash tools/gpu_session.sh OUTDIR   (or --wheels)}
mkdir -p "$out" || exit 2
export PYTHONUNBUFFERED=1
if compgen -G '.whl/*.whl' >/dev/null; then
  site=$(mktemp -d /tmp/polynext-site.XXXXXX)
  trap 'rm -rf "$site"' EXIT
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

"$PYTHON" - > "$out/env.txt" 2>&1 <<'EOF'
import platform, torch, timm, polynext
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| timm', timm.__version__, '| polynext', polynext.__file__)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f'cuda:{i}', p.name, f'{p.total_memory / 2**30:.0f} GiB', f'sm_{p.major}{p.minor}', p.multi_processor_count, 'SMs')
try:
    import triton
    print('triton', triton.__version__)
except ImportError:
    print('triton: not installed (torch.compile and flex_attention need it on CUDA)')
EOF
status=$?
cat "$out/env.txt"
[ $status -eq 0 ] || { echo "gpu_session: polynext does not import here (env.txt)" >&2; exit 1; }

dry=()
[ "${DRY:-0}" = "1" ] && dry=(--dry-run)
start=$SECONDS
timeout "${GPU_CHECK_S:-300}" "$PYTHON" benchmarks/gpu_check.py "${dry[@]}" --json "$out/gpu_check.json" \
    2>&1 | tee "$out/gpu_check.log"
check=${PIPESTATUS[0]}
check_s=$((SECONDS - start))
start=$SECONDS
# only the files that hold gpu tests: the rest of the suite imports packages the GPU image may lack
timeout "${TESTS_S:-150}" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -o addopts=-ra \
    tests/test_cuda_vs_cpu.py tests/test_bench.py tests/test_train_run.py tests/test_speed.py 2>&1 \
    | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
tests_s=$((SECONDS - start))
start=$SECONDS
# where a GPU step's time goes, by op class (kernel time), for the README's GPU table
prof=(cpolynext_s apolynext_s --device cuda --dtype bf16 --batch-size 128 --runs 3 --top 10)
[ "${DRY:-0}" = "1" ] && prof=(cpolynext_t --device cpu --img-size 64 --batch-size 2 --runs 1 --warmup 1 --modes infer --top 3)
timeout "${PROFILE_S:-60}" "$PYTHON" -m polynext profile "${prof[@]}" --json "$out/profile.json" 2>&1 \
    | tee "$out/profile.log"
profile=${PIPESTATUS[0]}
profile_s=$((SECONDS - start))
{
  echo "gpu_check exit $check in ${check_s} s (124: cut at GPU_CHECK_S; its JSON holds the sections done)"
  echo "gpu tests exit $tests in ${tests_s} s (5: none collected)"
  echo "profile exit $profile in ${profile_s} s (124: cut at PROFILE_S)"
} | tee "$out/summary.txt"
[ $check -eq 0 ] && [ $tests -eq 0 ] && [ $profile -eq 0 ]
