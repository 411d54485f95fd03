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
#                      ht_counts_once,all)
#   PERF_RUN_SECONDS   limit of each run (default 150); ep_bench is built before, unbounded
#   PERF_RUNS          which runs, a subset of "1rank 2gpu mps2" (default all three)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/perf-out}
# shellcheck source=scripts/perf-lib.sh
source scripts/perf-lib.sh
perf_setup
variants=${PERF_VARIANTS:-off,ll_fused_dispatch,ll_fused_combine,ht_counts_once,all}
limit=${PERF_RUN_SECONDS:-150}
runs=${PERF_RUNS:-1rank 2gpu mps2}
log_prefix=bench
# NCCL is not what this measures, and it cannot run with 2 ranks on one GPU.
args=(--no-nccl --perf-variants "$variants" "$@")
perf_build

# run NAME RANKS: ep_bench through scripts/bench.sh, bounded.
run() { perf_run "$1" "$2" "${args[@]}"; }

for r in $runs; do
  case $r in
    1rank | 2gpu) perf_gpu_run "$r" "${args[@]}" ;;
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
