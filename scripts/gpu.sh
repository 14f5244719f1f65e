#!/usr/bin/env bash
# One command for a short GPU slot (e.g. one device-tool call of <= 10 minutes on an H100/H200):
#   bash scripts/gpu.sh           # build + CUDA tests + GPU benchmarks at the headline shapes
#   bash scripts/gpu.sh --quick   # the same with the benchmarks' quick (CI) sizes
#   bash scripts/gpu.sh --plan    # print the stages and their expected times; needs no GPU
# Stages:
#   1. build in place for THIS device only (TORCH_CUDA_ARCH_LIST from
#      torch.cuda.get_device_capability(), "a" suffix on sm_90+, MAX_JOBS = all cores); no pip
#      (the GPU machine has no network: bootstrap.sh's installs would only time out);
#   2. the CUDA tests only (pytest -m cuda);
#   3. the kernel benchmarks on the GPU only (bench_lora, bench_multi_tensor,
#      bench_optim_update, bench_stiefel; no CPU runs, no end-to-end fine-tuning);
#   4. a bundle in $OUT when set: REPORT.md, gpu-tests.log, and results.tar.gz (every log and
#      the benchmark JSON/markdown/plots).
# Each stage has a time limit so the whole run stays under ~8 minutes; a stage that fails or
# times out is recorded and the next one still runs (exit status 1 at the end).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# the Python bootstrap.sh picks ($PYTHON, the active venv, or the checkout's .venv/); no
# installs here: the GPU machine has no network
source "$ROOT/scripts/bootstrap.sh" --venv-only
cd "$ROOT"
mode=headline
case "${1:-}" in
  --plan) mode=plan ;;
  --quick) mode=quick ;;
  "") ;;
  *) echo "usage: bash scripts/gpu.sh [--quick|--plan]" >&2; exit 2 ;;
esac

BENCHES="bench_lora bench_multi_tensor bench_optim_update bench_stiefel"
# stage name, time limit (s), expected time (s) on an H100/H200 with 16 cores: the build is
# ~10 TUs of which 4 .cu files for one architecture; the CUDA tests are the cuda-marked
# parametrisations; the benchmarks' headline shapes at do_bench's 0.3 s per measurement.
STAGES=("build 180 120" "tests 120 60" "bench 180 120")
if [ "$mode" = plan ]; then
  echo "scripts/gpu.sh stages (limit / expected seconds, estimates: no GPU measured them yet; total limit 480 = 8 min):"
  for s in "${STAGES[@]}"; do
    set -- $s
    echo "  $1: limit ${2}s, expected ~${3}s"
  done
  echo "  benchmarks: $BENCHES (--device cuda; --quick: the quick sizes)"
  echo "  bundle: \$OUT/REPORT.md, \$OUT/gpu-tests.log, \$OUT/results.tar.gz"
  exit 0
fi

LOG=$(mktemp -d /tmp/llmopt-gpu.XXXXXX)
status=0
limit_of() { for s in "${STAGES[@]}"; do set -- $s; if [ "$1" = "$want" ]; then echo "$2"; fi; done; }
run_stage() {  # run_stage NAME CMD...: time-limited, logged, status recorded
  local want=$1; shift
  local limit; limit=$(limit_of)
  local t0=$SECONDS
  echo "== $want (limit ${limit}s)"
  timeout "$limit" "$@" > "$LOG/$want.log" 2>&1
  local rc=$?
  tail -n 25 "$LOG/$want.log"
  echo "$want: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG/stages.txt"
  [ $rc -eq 0 ] || status=1
  return $rc
}

bundle() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  local results
  results=$(ls -dt bench/results/*/ 2>/dev/null | head -n 1)
  {
    echo "# GPU run $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo nogit)"
    echo
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    echo
    echo '```'; cat "$LOG/stages.txt" 2>/dev/null; echo '```'
    echo
    grep -E "passed|failed|error" "$LOG/tests.log" 2>/dev/null | tail -n 3
    echo
    [ -n "$results" ] && [ -f "$results/REPORT.md" ] && cat "$results/REPORT.md"
  } > "$OUT/REPORT.md"
  cp "$LOG/tests.log" "$OUT/gpu-tests.log" 2>/dev/null || true
  tar -czf "$OUT/results.tar.gz" -C "$LOG" . ${results:+-C "$ROOT" "$results"} 2>/dev/null || true
}
trap bundle EXIT

arch=$("$PYTHON" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}.{m}' + ('a' if M >= 9 else ''))") \
  || { echo "no CUDA device visible to torch"; exit 1; }
export TORCH_CUDA_ARCH_LIST=$arch LLMOPT_WITH_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "device arch $arch, MAX_JOBS=$MAX_JOBS"
run_stage build "$PYTHON" setup.py build_ext --inplace \
  && "$PYTHON" -c "import llmopt_ext, sys; sys.exit(0 if llmopt_ext.backends()['cuda'] else 1)" \
  || { echo "CUDA kernels did not build or load"; exit 1; }
LLMOPT_REQUIRE_C=1 run_stage tests "$PYTHON" -m pytest tests -q -ra -m cuda
LLMOPT_REQUIRE_C=1 run_stage bench "$PYTHON" -m bench.run_all --device cuda --only $BENCHES \
  $([ "$mode" = quick ] && echo --quick)
exit $status
