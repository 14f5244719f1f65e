#!/usr/bin/env bash
# The main job (README.md): installs what is missing, builds, and runs the benchmark suite
# on its embedded defaults; the report lands in bench/results/<device>-<commit>/REPORT.md.
# Extra arguments go to `python -m bench.run_all` (e.g. --quick, --device cpu).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
LLMOPT_REQUIRE_C=1 "$PYTHON" -m bench.run_all "$@"
