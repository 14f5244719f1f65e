#!/usr/bin/env bash
# Syntax-checks the CUDA glue (csrc/torch/*_cuda.cpp) against torch's headers on a machine
# whose torch has no CUDA (the kernels themselves are compiled by CMake with nvcc). With a
# CUDA torch the real build already compiled them, so there is nothing to do.
set -euo pipefail
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if ! command -v nvcc >/dev/null 2>&1; then
  echo "[cuda-glue] nvcc not found: skipped"; exit 0
fi
if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then
  echo "[cuda-glue] torch has CUDA: the glue was compiled by the extension build"; exit 0
fi
cuda_home=${CUDA_HOME:-}
for c in "$cuda_home" /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc)")")"; do
  if [ -n "$c" ] && [ -f "$c/include/cuda_runtime.h" ]; then cuda_home=$c; break; fi
done
cuda_inc=$cuda_home/include
torch_inc=$("$PYTHON" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
for f in csrc/torch/*_cuda.cpp; do
  # C10_CUDA_NO_CMAKE_CONFIGURE_FILE: the CPU wheel lacks c10/cuda's generated config header.
  g++ -std=c++20 -fsyntax-only -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DLLMOPT_WITH_CUDA=1 \
      $torch_inc -I"$cuda_inc" -Icsrc "$f"
  echo "[cuda-glue] $f: ok"
done
