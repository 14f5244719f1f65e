#!/usr/bin/env bash
# The main job (README.md): installs what is missing, builds, and fine-tunes the embedded base
# model with LoRA on the embedded instruction task (a few minutes on CPU), printing eval loss
# and exact-match accuracy before and after. Extra arguments go to llmopt-finetune
# (e.g. --optimizer trcg, --model DIR --data file.jsonl; see --help).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/bootstrap.sh" base
cd "$ROOT"
# One thread: the embedded model is 0.67M parameters, where OpenMP fork/join per op costs
# more than it saves (measured 37 ms/step with 1 thread on this 2-core machine).
# --overwrite: the main job's own directory holds the previous main run, replaced each time
# (llmopt-finetune refuses a directory with a previous run otherwise).
LLMOPT_REQUIRE_C=1 "$PYTHON" -m llmopt_ext.finetune --threads 1 --output-dir "${OUT_DIR:-runs/main}" \
  --overwrite "$@"
