#!/usr/bin/env bash
# The benchmark suite (README.md): installs what is missing, builds, and runs every
# bench/bench_*.py; the report lands in bench/results/<device>-<commit>/REPORT.md.
# Extra arguments go to `python -m bench.run_all` (e.g. --quick, --device cpu, --only bench_lora).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/bootstrap.sh" test
cd "$ROOT"
LLMOPT_REQUIRE_C=1 "$PYTHON" -m bench.run_all "$@"
