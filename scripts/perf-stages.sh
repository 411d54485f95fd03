#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Stage times in one GPU call (issue 13: where the fixed ~20 us of an LL call goes): builds
# ep_bench and runs it with --stage-times (per-stage %globaltimer stamps inside the LL fused
# dispatch/combine, HT layout, dispatch and combine kernels; EPCOMM_STAGE_TIMES, docs/perf-notes.md
# "Stage times"), each run bounded:
#   1. with 1 rank on GPU 0,
#   2. with 2 ranks on 2 GPUs, when the machine has 2 or more.
# The other ep_bench rows run too, shortened (no NCCL, no graphs, no fixed-cost sweep, the quick
# link test); the stage tables are printed last. Logs in $OUT (set by the device tool) or
# ./perf-out: build.log, stages-<run>.log and stages-<run>.json.
#
#   scripts/perf-stages.sh [extra ep_bench arguments]
#
# Environment:
#   STAGE_ITERS        calls per stage table (default 200; warm-up 20)
#   PERF_RUN_SECONDS   limit of each run (default 100); ep_bench is built before, unbounded
#   PERF_RUNS          which runs, a subset of "1rank 2gpu" (default both)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/perf-out}
# shellcheck source=scripts/perf-lib.sh
source scripts/perf-lib.sh
perf_setup
iters=${STAGE_ITERS:-200}
limit=${PERF_RUN_SECONDS:-100}
runs=${PERF_RUNS:-1rank 2gpu}
log_prefix=stages
args=(--no-nccl --no-graph --no-fixed-cost --no-expert-major --quick --iters "$iters"
  --warmup 20 --stage-times "$@")
perf_build

for r in $runs; do
  case $r in
    1rank | 2gpu) perf_gpu_run "$r" "${args[@]}" ;;
    *) echo "perf-stages.sh: unknown run '$r' (PERF_RUNS: 1rank 2gpu)" >&2 ;;
  esac
done

echo
echo "================ perf-stages summary (commit $(git rev-parse --short HEAD 2>/dev/null)) ================"
for name in "${done_runs[@]}"; do
  log=$OUT/stages-$name.log
  echo "-- $name: $(tail -1 "$log")"
  # The LL and HT rows of the main table, then every stage table (from its heading to the end of
  # the last table: the footer line starts with "logical GB/s").
  grep -E "^(ll dispatch|ll combine|d\+c 0 tokens|layout) " "$log" | head -12
  sed -n '/^Stage times/,/^logical GB\/s/p' "$log" | grep -v '^logical GB/s'
done
