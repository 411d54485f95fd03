#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# shellcheck disable=SC2034,SC2154  # num_gpus/done_runs are the caller's; OUT, limit, log_prefix too
#
# What the one-GPU-call perf scripts (perf-fixed-cost.sh, perf-stages.sh) share; sourced, not run.
#   perf_setup            the environment of a run (PATH, deadlines, MPI as root) and num_gpus
#   perf_build            builds ep_bench (unbounded, log $OUT/build.log); exits on failure
#   perf_run NAME NP ...  ep_bench through scripts/bench.sh with NP ranks and the arguments,
#                         bounded by $limit; log $OUT/$log_prefix-NAME.log, JSON beside it; adds
#                         NAME to done_runs
#   perf_gpu_run RUN ...  RUN "1rank": 1 rank on GPU 0; "2gpu": 2 ranks on GPUs 0 and 1 when
#                         there are two (else a line saying it was skipped)
# The caller sets OUT, limit and log_prefix, and runs from the repository root.

perf_setup() {
  mkdir -p "$OUT"
  if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH=/usr/local/cuda/bin:$PATH
  fi
  export NCCL_NVLS_ENABLE=0
  # A path that hangs fails in seconds (as in gpu-check.sh), not after 30 s per wait.
  export EPCOMM_TIMEOUT_S=${EPCOMM_TIMEOUT_S:-8}
  export EPCOMM_FIRST_OP_TIMEOUT_S=${EPCOMM_FIRST_OP_TIMEOUT_S:-60}
  export CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-90}
  if [ "$(id -u)" = 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi
  num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  done_runs=()
}

# Build first, unbounded (a fresh machine needs minutes), with the arguments scripts/bench.sh
# uses, so that its own build step in each run finds nothing to do.
perf_build() {
  local build_dir=${BUILD_DIR:-$PWD/build} start build_rc
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
}

perf_run() {
  local name=$1 np=$2 start rc log
  shift 2
  log=$OUT/$log_prefix-$name.log
  start=$(date +%s)
  echo "== $name: $np rank(s), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all}" | tee "$log"
  EPCOMM_BENCH_NP=$np timeout "$limit" scripts/bench.sh --json "$OUT/$log_prefix-$name.json" \
    "$@" >> "$log" 2>&1
  rc=$?
  echo "$name: rc=$rc ($(( $(date +%s) - start ))s)" | tee -a "$log"
  done_runs+=("$name")
}

perf_gpu_run() {
  local run=$1
  shift
  if [ "$run" = 1rank ]; then
    CUDA_VISIBLE_DEVICES=0 perf_run 1rank 1 "$@"
  elif [ "${num_gpus:-0}" -ge 2 ]; then
    CUDA_VISIBLE_DEVICES=0,1 perf_run 2gpu 2 "$@"
  else
    echo "== 2gpu: skipped (${num_gpus:-0} GPU visible)"
  fi
}
