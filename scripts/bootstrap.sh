#!/usr/bin/env bash
# Installs what is missing and builds llmopt_ext in place. Sourced by the other scripts.
#
# - torch: reused when importable (e.g. the GPU machine's CUDA build); otherwise the CPU
#   wheel torch==2.13.0 (an unpinned `torch` would pull several GB of CUDA packages).
# - the extension is built with --no-build-isolation: an isolated build would install
#   another torch into a throwaway environment and compile against its ABI.
set -euo pipefail
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "[bootstrap] no torch found: installing the CPU wheel torch==2.13.0"
  pip_install torch==2.13.0
fi
# Build and test tools; numpy/scipy are test oracles. Versions are whatever the index has
# that matches the installed torch (none of these depend on torch).
missing=$("$PYTHON" - <<'PY'
import importlib.util
need = {"ninja": "ninja", "pytest": "pytest", "numpy": "numpy", "scipy": "scipy",
        "setuptools": "setuptools", "wheel": "wheel"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  echo "[bootstrap] installing: $missing"
  pip_install $missing
fi
if ! command -v cmake >/dev/null 2>&1; then
  echo "[bootstrap] installing cmake from PyPI"
  pip_install cmake
fi

echo "[bootstrap] building llmopt_ext (LLMOPT_WITH_CUDA=${LLMOPT_WITH_CUDA:-auto})"
"$PYTHON" -m pip install --disable-pip-version-check -q --no-build-isolation -e . \
  || { echo "[bootstrap] build failed"; exit 1; }
"$PYTHON" -m llmopt_ext.info
