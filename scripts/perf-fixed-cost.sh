#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Issue 13 (fixed cost per call) in one GPU call: ep_bench with its fixed-cost sweep on the main
# buffer and on one extra buffer per EPCOMM_PERF variant (old and new paths side by side), run
#   1. with 1 rank on GPU 0,
#   2. with 2 ranks on 2 GPUs, when the machine has 2 or more,
#   3. with 2 ranks on GPU 0 under the CUDA MPS daemon (without MPS the GPU time-slices between
#      the processes and every op takes milliseconds).
# Logs in $OUT (set by the device tool) or ./perf-out: bench-<run>.log and bench-<run>.json, and a
# summary last (the fit per op of each run, then the issue's rows of the main table).
#
#   scripts/perf-fixed-cost.sh [extra ep_bench arguments]
#
# Environment:
#   PERF_VARIANTS      --perf-variants (default off,ll_fused_dispatch,ll_fused_combine,
#                      ll_parallel_posts,ht_counts_once,all)
#   PERF_RUN_SECONDS   limit of each run (default 150); ep_bench is built before, unbounded
#   PERF_RUNS          which runs, a subset of "1rank 2gpu mps2" (default all three)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/perf-out}
mkdir -p "$OUT"
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
export NCCL_NVLS_ENABLE=0
# A fast path that hangs fails in seconds (as in gpu-check.sh), not after 30 s per wait.
export EPCOMM_TIMEOUT_S=${EPCOMM_TIMEOUT_S:-8}
export EPCOMM_FIRST_OP_TIMEOUT_S=${EPCOMM_FIRST_OP_TIMEOUT_S:-60}
export CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-90}
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
variants=${PERF_VARIANTS:-off,ll_fused_dispatch,ll_fused_combine,ll_parallel_posts,ht_counts_once,all}
limit=${PERF_RUN_SECONDS:-150}
runs=${PERF_RUNS:-1rank 2gpu mps2}
num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
# NCCL is not what this measures, and it cannot run with 2 ranks on one GPU.
args=(--no-nccl --perf-variants "$variants" "$@")
done_runs=()

# Build first, unbounded (a fresh machine needs minutes), with the arguments scripts/bench.sh
# uses, so that its own build step in each run below finds nothing to do.
build_dir=${BUILD_DIR:-$PWD/build}
start=$(date +%s)
(
  # shellcheck source=scripts/deps.sh
  source scripts/deps.sh
  deps_main core mpi bench
  # shellcheck disable=SC2086
  cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DEPCOMM_BUILD_TESTS=OFF \
    -DEPCOMM_BUILD_BENCH=ON "-DCMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES}" \
    ${EPCOMM_CMAKE_ARGS:-} &&
    cmake --build "$build_dir" --target ep_bench -j"$(nproc)"
) > "$OUT/build.log" 2>&1
build_rc=$?
echo "build: rc=$build_rc ($(( $(date +%s) - start ))s; log build.log)"
if [ "$build_rc" != 0 ]; then
  tail -30 "$OUT/build.log"
  exit 1
fi

# run NAME RANKS: ep_bench through scripts/bench.sh, bounded.
run() {
  local name=$1 np=$2 start rc
  start=$(date +%s)
  echo "== $name: $np rank(s), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all}" |
    tee "$OUT/bench-$name.log"
  EPCOMM_BENCH_NP=$np timeout "$limit" scripts/bench.sh --json "$OUT/bench-$name.json" \
    "${args[@]}" >> "$OUT/bench-$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc ($(( $(date +%s) - start ))s)" | tee -a "$OUT/bench-$name.log"
  done_runs+=("$name")
}

for r in $runs; do
  case $r in
    1rank) CUDA_VISIBLE_DEVICES=0 run 1rank 1 ;;
    2gpu)
      if [ "${num_gpus:-0}" -ge 2 ]; then
        CUDA_VISIBLE_DEVICES=0,1 run 2gpu 2
      else
        echo "== 2gpu: skipped (${num_gpus:-0} GPU visible)"
      fi
      ;;
    mps2)
      if ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
        echo "== mps2: skipped (nvidia-cuda-mps-control not found)"
        continue
      fi
      mps_root=${TMPDIR:-/tmp}/epcomm-perf-mps-$$
      export CUDA_MPS_PIPE_DIRECTORY=$mps_root/pipe CUDA_MPS_LOG_DIRECTORY=$mps_root/log
      mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
      if CUDA_VISIBLE_DEVICES=0 nvidia-cuda-mps-control -d; then
        CUDA_VISIBLE_DEVICES=0 run mps2 2
        echo quit | nvidia-cuda-mps-control
        sleep 2
      else
        echo "== mps2: skipped (nvidia-cuda-mps-control -d failed)"
      fi
      unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
      ;;
    *) echo "perf-fixed-cost.sh: unknown run '$r' (PERF_RUNS: 1rank 2gpu mps2)" >&2 ;;
  esac
done

echo
echo "================ perf-fixed-cost summary (commit $(git rev-parse --short HEAD 2>/dev/null)) ================"
for name in "${done_runs[@]}"; do
  log=$OUT/bench-$name.log
  echo "-- $name: $(tail -1 "$log")"
  sed -n '/^Fit per op/,/^$/p' "$log" | head -40
  grep -E "^(ll dispatch|ll combine|ll graph d\+c|d\+c 0 tokens|layout) " "$log" | head -20
done
