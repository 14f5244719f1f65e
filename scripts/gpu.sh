#!/usr/bin/env bash
# For a machine with an NVIDIA GPU (e.g. through the device tool, whose calls are limited to
# 10 minutes each: run the stages as separate calls):
#   bash scripts/gpu.sh build   # builds the CUDA extension in place (LLMOPT_WITH_CUDA=1)
#   bash scripts/gpu.sh test    # the whole test suite, CUDA tests included
#   bash scripts/gpu.sh bench   # every benchmark on the GPU, then on the CPU
#   bash scripts/gpu.sh         # all three
# Results land under bench/results/<device>-<commit>/ and, when $OUT is set, are copied there
# with the test log.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export LLMOPT_WITH_CUDA=1
export MAX_JOBS=${MAX_JOBS:-16}
# the Python bootstrap.sh picks ($PYTHON, the active venv, or the checkout's .venv/)
source "$ROOT/scripts/bootstrap.sh" --venv-only
export PYTHON
cd "$ROOT"
stage=${1:-all}
status=0

copy_out() {
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results"
    cp -r bench/results/. "$OUT/results/" 2>/dev/null || true
    cp /tmp/llmopt-gpu-*.log "$OUT/" 2>/dev/null || true
  fi
}
trap copy_out EXIT

if [ "$stage" = build ] || [ "$stage" = all ]; then
  nvidia-smi || true
  bash "$ROOT/scripts/bootstrap.sh" test 2>&1 | tee /tmp/llmopt-gpu-build.log
  "$PYTHON" -c "import llmopt_ext, sys; sys.exit(0 if llmopt_ext.backends()['cuda'] else 1)" \
    || { echo "CUDA kernels did not load"; exit 1; }
fi
if [ "$stage" = test ] || [ "$stage" = all ]; then
  LLMOPT_REQUIRE_C=1 "$PYTHON" -m pytest tests -q -ra 2>&1 | tee /tmp/llmopt-gpu-tests.log \
    || status=1
fi
if [ "$stage" = bench ] || [ "$stage" = all ]; then
  LLMOPT_REQUIRE_C=1 "$PYTHON" -m bench.run_all --device cuda 2>&1 | tee /tmp/llmopt-gpu-bench.log \
    || status=1
  LLMOPT_REQUIRE_C=1 "$PYTHON" -m bench.run_all --device cpu || status=1
fi
exit $status
