#!/usr/bin/env bash
# One call on a GPU machine: build, run every test (GPU and multi-rank included), run the
# benchmark, and print a short summary last. Logs go to $OUT (set by the device tool) or
# ./gpu-check-out.
#
#   scripts/gpu-check.sh [ep_bench arguments]
# Environment: GPU_CHECK_TESTS (ctest -R regex; empty = all), GPU_CHECK_BENCH=0 (skip the
# benchmark), GPU_CHECK_README=1 (run the README's two commands exactly as written instead).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0
# Short device deadlines: a protocol bug fails in seconds, not in 30 s per wait.
export EPCOMM_TIMEOUT_S=${EPCOMM_TIMEOUT_S:-8}
export BUILD_DIR=${BUILD_DIR:-build}
export CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-90}
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain 2>/dev/null | grep -v '^??' | head -1)
[ -n "$dirty" ] && commit="$commit+dirty"
export EPCOMM_COMMIT=$commit

{
  echo "== machine"; date -u; nvidia-smi -L; nvidia-smi topo -m 2>/dev/null | head -8
  nvcc --version | tail -1; mpirun --version | head -1
} 2>&1 | tee "$OUT/machine.log"

start=$(date +%s)
if [ "${GPU_CHECK_README:-0}" = 1 ]; then
  scripts/test.sh 2>&1 | tee "$OUT/test.log"
else
  timeout "${GPU_CHECK_TEST_SECONDS:-520}" scripts/test.sh --timeout 300 \
    --output-log "$OUT/ctest_full.log" \
    ${GPU_CHECK_TESTS:+-R "$GPU_CHECK_TESTS"} 2>&1 | tee "$OUT/test.log"
fi
test_rc=${PIPESTATUS[0]}
test_s=$(( $(date +%s) - start ))

bench_rc=skipped
if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
  start=$(date +%s)
  scripts/bench.sh --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
  bench_rc=${PIPESTATUS[0]}
  bench_s=$(( $(date +%s) - start ))
fi

echo
echo "================ gpu-check summary (commit $commit) ================"
grep -E "tests passed|tests failed|Total Test time" "$OUT/test.log" | tail -3
grep -E "\*\*\*(Failed|Timeout|Exception)|\(Failed\)|\(Timeout\)| Not Run" "$OUT/test.log" | head -20
grep -E "Skipped|\*\*\*Skipped" "$OUT/test.log" | head -10
grep -E "SKIPPED \]|Skipped because|GTEST_SKIP|is not usable here" "$OUT/test.log" | sort | uniq -c | head -10
echo "tests: rc=$test_rc (${test_s}s)   bench: rc=$bench_rc (${bench_s:-0}s)"
if [ "$bench_rc" != skipped ]; then
  sed -n '/^op /,$p' "$OUT/bench.log" | head -60
fi
