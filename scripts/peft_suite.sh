#!/usr/bin/env bash
# peft's own LoRA tests, run twice: plain peft, and with llmopt_ext's fused LoRA layer in every
# LoraConfig (tests/peft_suite/peft_suite_plugin.py, through use_fused_lora). Fails when a test
# fails only with the fused layer (tests/peft_suite/compare.py); writes
# build/peft-suite/summary.{json,md} with both passes' counts and the fused-path coverage.
#
# The tests come from the peft sdist matching the installed peft version (cached in
# build/peft-sdist). The selection (tests/peft_suite/select.txt) is sized for CI: the two
# passes run side by side, one per core, one thread each; network-needing tests are
# deselected (tests/peft_suite/deselect.txt, each with its reason; HF_HUB_OFFLINE=1).
#   PYTHON=...              interpreter (default python3)
#   PEFT_SUITE_SERIAL=1     run the passes one after the other
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
SUITE=$ROOT/tests/peft_suite
CACHE=$ROOT/build/peft-sdist
WORK=$ROOT/build/peft-suite
start=$(date +%s)

ver=$("$PYTHON" -c "import peft; print(peft.__version__)")
sdist=$CACHE/peft-$ver.tar.gz
if [ ! -f "$sdist" ]; then
  mkdir -p "$CACHE"
  "$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: "peft==$ver" -d "$CACHE"
fi
src=$WORK/peft-$ver
if [ ! -d "$src/tests" ]; then
  mkdir -p "$WORK"
  tar xzf "$sdist" -C "$WORK" "peft-$ver/tests" "peft-$ver/pyproject.toml"
  touch "$src/tests/__init__.py"  # peft's tests import each other relatively (from .testing_utils)
fi
# what peft's test modules import at the top (its [test] extra, without the GPU/quantization parts)
missing=$("$PYTHON" - <<'PY'
import importlib.util
need = {"parameterized": "parameterized==0.9.0", "datasets": "datasets==5.2.0",
        "diffusers": "diffusers==0.42.1", "attr": "attrs==26.1.0", "scipy": "scipy",
        "yaml": "pyyaml==6.0.4", "accelerate": "accelerate==1.15.0"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  echo "[peft-suite] installing peft's test dependencies: $missing"
  constraints=$(mktemp)  # nothing may pull another torch
  "$PYTHON" -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
  "$PYTHON" -m pip install --disable-pip-version-check -q -c "$constraints" $missing
  rm -f "$constraints"
fi

run_pass() {  # $1 = plain | fused
  local fused=0
  [ "$1" = fused ] && fused=1
  (cd "$src" && HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false \
     PYTHONPATH="$ROOT:$SUITE${PYTHONPATH:+:$PYTHONPATH}" LLMOPT_REQUIRE_C=1 \
     LLMOPT_PEFT_SUITE_FUSED=$fused LLMOPT_PEFT_SUITE_SELECT="$SUITE/select.txt" \
     LLMOPT_PEFT_SUITE_DESELECT="$SUITE/deselect.txt" LLMOPT_PEFT_SUITE_COVERAGE="$WORK/coverage.json" \
     "$PYTHON" -m pytest -o addopts="" -p peft_suite_plugin -p no:cacheprovider -q -W ignore::DeprecationWarning \
       --junitxml="$WORK/$1.xml" tests/test_custom_models.py tests/test_mixed.py \
       tests/test_initialization.py tests/test_tuners_utils.py >"$WORK/$1.log" 2>&1) || true
  tail -n 1 "$WORK/$1.log"
}

rm -f "$WORK/plain.xml" "$WORK/fused.xml" "$WORK/coverage.json"
if [ "${PEFT_SUITE_SERIAL:-0}" = 1 ]; then
  run_pass plain
  run_pass fused
else
  run_pass plain &
  plain_pid=$!
  run_pass fused
  wait "$plain_pid"
fi
for p in plain fused; do
  [ -s "$WORK/$p.xml" ] || { echo "[peft-suite] the $p pass wrote no results:"; tail -n 30 "$WORK/$p.log"; exit 1; }
done
"$PYTHON" "$SUITE/compare.py" "$WORK/plain.xml" "$WORK/fused.xml" "$WORK/coverage.json" \
  "$WORK/summary" "$SUITE/expected_differences.txt"
echo "[peft-suite] peft $ver, both passes in $(( $(date +%s) - start )) s (logs: $WORK/{plain,fused}.log)"
