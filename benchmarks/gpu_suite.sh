#!/usr/bin/env bash
# The GPU suite, one command for an H100/H200 machine with CUDA, PyTorch and Triton preinstalled
# (no TensorRT, no network): builds the CUDA extension against that machine's torch, runs the GPU
# tests, then the end-to-end timings (benchmarks/gpu_suite.py), within 10 minutes in all. On a machine
# with more than one GPU the timings include `bsldm-fast suppress` under torchrun on every GPU
# against one GPU (benchmarks/ranks.py: same images checked, then images/s).
#
#   bash benchmarks/gpu_suite.sh            # writes benchmarks/results/gpu-<device>-<date>.json
#   bash benchmarks/gpu_suite.sh --quick    # dry run of the plumbing (tiny model; also on the CPU)
#
# Logs and the JSON are copied into $OUT when it is set. Each step is time-limited and a failing
# step is recorded in the JSON; the script carries on. PYTHON picks the interpreter (default python3).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
START=$(date +%s)
TOTAL=${BSLDM_SUITE_SECONDS:-570}   # the device machine's 600 s per command, less a margin
QUICK=""
if [ "${1:-}" = "--quick" ]; then QUICK="--quick"; shift; fi
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/bsldm-gpu-suite.XXXXXX")
left() { echo $(( TOTAL - ($(date +%s) - START) )); }

echo "== bsldm_fast GPU suite $(date -u +%FT%TZ) in $(pwd), $($PY -c 'import sys; print(sys.version.split()[0])')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"

# 1. The extension, against this machine's torch (no dependency installs: there is no network).
BUILD_STATUS=skipped
if [ -z "$QUICK" ] || [ "${BSLDM_SUITE_BUILD:-0}" = "1" ]; then
  echo "== build bsldm_fast._C ($(left) s left)"
  export MAX_JOBS=${MAX_JOBS:-16}
  # Only the GPU at hand (sm_90 on Hopper): a fraction of the all-architectures build time.
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    ARCH=$($PY -c 'import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f"{c[0]}.{c[1]}" if c else "")' 2>/dev/null)
    [ -n "$ARCH" ] && export TORCH_CUDA_ARCH_LIST=$ARCH
  fi
  timeout 240 $PY setup.py build_ext --inplace >"$LOGS/build.log" 2>&1
  BUILD_STATUS=$?
  tail -n 5 "$LOGS/build.log"
  echo "build exit status $BUILD_STATUS"
fi
$PY -c 'from bsldm_fast import _ext; print("extension:", "loaded" if _ext.C is not None else _ext.load_error, "| CUDA ops:", _ext.C is not None and _ext.has_cuda_ops())'

# 2. The GPU tests: the CUDA/Triton kernels, the engines and the graph pipeline run for real here.
# The graph-pipeline test first: it is the one the suite exists for, should the time run out.
TESTS="tests/engines/test_gpu_pipeline.py tests/kernels $(ls tests/engines/test_*.py | grep -v test_gpu_pipeline.py | tr '\n' ' ') tests/test_pipeline.py"
if [ -n "$QUICK" ]; then TESTS="tests/engines/test_gpu_pipeline.py"; fi
TEST_TIME=$(( $(left) - 330 ))   # the timings need ~330 s (torch.compile of the paper U-Net)
[ "$TEST_TIME" -gt 150 ] && TEST_TIME=150
[ -n "$QUICK" ] && TEST_TIME=120
if [ "$TEST_TIME" -gt 30 ]; then
  echo "== pytest $TESTS (${TEST_TIME} s at most)"
  timeout "$TEST_TIME" $PY -m pytest -q -p no:cacheprovider -o addopts="" -rs $TESTS \
      --junitxml="$LOGS/tests.xml" >"$LOGS/tests.log" 2>&1
  echo "pytest exit status $?"
  tail -n 25 "$LOGS/tests.log"
else
  echo "== no time left for the tests"
fi

# 3. The end-to-end timings, in the time that is left.
BUDGET=$(( $(left) - 25 ))
echo "== timings (${BUDGET} s budget)"
timeout $(( BUDGET + 20 )) $PY benchmarks/gpu_suite.py $QUICK --budget-s "$BUDGET" \
    --tests-xml "$LOGS/tests.xml" --tests-log "$LOGS/tests.log" --build-log "$LOGS/build.log" --build-status "$BUILD_STATUS" "$@" \
    2>&1 | tee "$LOGS/timings.log"
STATUS=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
  for f in build.log tests.log tests.xml timings.log; do [ -f "$LOGS/$f" ] && cp "$LOGS/$f" "$OUT/suite-$f"; done
fi
echo "== done in $(( $(date +%s) - START )) s, timings exit status $STATUS"
exit "$STATUS"
