#!/usr/bin/env bash
# The test command (README.md; .ci/run calls exactly this):
#   1. pytest: CPU tests, Triton kernels under TRITON_INTERPRET=1, CUDA tests (skip without a GPU);
#      LLMOPT_REQUIRE_C=1 makes a missing compiled module an import error, so nothing passes
#      silently on the reference path;
#   2. ctest: C++ unit tests of the torch-free CPU kernels;
#   3. nvcc compile check of every csrc/kernels/*.cu (sm_80, sm_90a) and a syntax check of the
#      CUDA glue against torch's headers, when nvcc exists (no GPU needed);
#   4. a quick run of every benchmark, so they cannot rot;
#   5. peft's own LoRA test suite (from the sdist of the installed peft), plain and with the
#      fused layer swapped in: fails on any test that fails only with the fused layer.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/bootstrap.sh" test
cd "$ROOT"
start=$(date +%s)

echo "== [1/5] pytest"
LLMOPT_REQUIRE_C=1 LLMOPT_REQUIRE_REAL_MODEL=1 "$PYTHON" -m pytest tests -q -ra

echo "== [2/5] ctest (C++ kernel unit tests) and [3/5] nvcc compile check"
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure
bash scripts/check_cuda_glue.sh
bash scripts/gpu.sh --plan  # the GPU script parses and plans without a GPU

echo "== [4/5] benchmarks, quick sizes"
# bounded: a benchmark that slows down on some CPU (e.g. bf16 GEMMs without native bf16 units)
# fails here with a message instead of running into CI's own limit
timeout 1200 env LLMOPT_REQUIRE_C=1 "$PYTHON" -m bench.run_all --quick \
  || { echo "benchmarks (quick) failed or ran over 1200 s"; exit 1; }

echo "== [5/5] peft's own LoRA tests, plain vs fused layer"
PYTHON="$PYTHON" bash "$ROOT/scripts/peft_suite.sh"

echo "== all tests passed in $(( $(date +%s) - start )) s"
