#!/usr/bin/env bash
# For a machine with an NVIDIA GPU (e.g. through the device tool): builds the CUDA extension,
# runs the whole test suite including the CUDA tests, runs every benchmark on the GPU and on
# the CPU, and leaves results under bench/results/<device>-<commit>/ (copied to $OUT when set).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export LLMOPT_WITH_CUDA=1
export MAX_JOBS=${MAX_JOBS:-16}
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
nvidia-smi || true
status=0
LLMOPT_REQUIRE_C=1 "$PYTHON" -m pytest tests -q -ra 2>&1 | tee /tmp/llmopt-gpu-tests.log || status=1
LLMOPT_REQUIRE_C=1 "$PYTHON" -m bench.run_all --device cuda || status=1
LLMOPT_REQUIRE_C=1 "$PYTHON" -m bench.run_all --device cpu || status=1
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results"
  cp -r bench/results/. "$OUT/results/"
  cp /tmp/llmopt-gpu-tests.log "$OUT/" || true
fi
exit $status
