#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# One call on a GPU machine: build, run every test (GPU and multi-rank included), run a
# representative subset under compute-sanitizer (memcheck, racecheck, synccheck), run the
# benchmark, and print a short summary last. Logs go to $OUT (set by the device tool) or
# ./gpu-check-out: machine.log, test.log, ctest_full.log, sanitizer.log, mps.log, bench.log,
# bench.json.
#
#   scripts/gpu-check.sh [ep_bench arguments]
#
# Environment:
#   GPU_CHECK_TESTS             ctest -R regex (empty = all tests)
#   GPU_CHECK_TEST_SECONDS      wall-clock budget of the ctest phase, build included (default 520;
#                               the summary names the entries it left out and the GPU_CHECK_TESTS
#                               value that runs just them: on a fresh machine the build and all
#                               entries do not fit in one 600-s device call)
#   GPU_CHECK_BENCH=0           skip the benchmark (and do not build ep_bench)
#   GPU_CHECK_README=1          run the README's two commands exactly as written instead
#   GPU_CHECK_PYTHON=1          also run the Python tests (scripts/test.sh -> test-python.sh)
#   GPU_CHECK_MPS=0|1           run the tests under the CUDA MPS daemon (default 1 when fewer
#                               than 8 GPUs are visible: the tests put up to 8 ranks on them)
#   GPU_CHECK_PERF              an EPCOMM_PERF value (e.g. all): after the tests, run the tests
#                               matching GPU_CHECK_PERF_TESTS again with it set (the fast paths
#                               of issue 13; docs/perf-notes.md); log perf-tests.log
#   GPU_CHECK_PERF_TESTS        ctest -R regex of that run (default mp_ll|mp_ht|mp_soak|gpu_single)
#   GPU_CHECK_PERF_SECONDS      its wall-clock budget (default 300)
#   GPU_CHECK_SANITIZE=0        skip the compute-sanitizer phase
#   GPU_CHECK_SANITIZE_TOOLS    default "memcheck racecheck synccheck"
#   GPU_CHECK_SANITIZE_RUNS     regex over the sanitizer run names below (empty = all)
#   GPU_CHECK_SANITIZE_SECONDS  budget of the whole sanitizer phase (default 180); runs that
#                               would start after it are listed as not run
#   GPU_CHECK_SANITIZE_RUN_SECONDS  limit of one sanitizer run (default 150)
#
# Sanitizer errors are counted from each process's "ERROR SUMMARY". Two expected reports are
# filtered by name: CUDA_ERROR_NOT_PERMITTED from cuMemCreate called by the fabric-handle probe
# (probeFabric, inlined into SymmetricMemory::create), which fails on machines without an IMEX
# channel by design; and cudaErrorInvalidDevice in gpu_single's NvlinkDomainQueryAnswers, which
# asks about device 1 << 20 on purpose (and clears the error). Everything else counts.
set -uo pipefail
cd "$(dirname "$0")/.."
repo_dir=$PWD
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
export NCCL_NVLS_ENABLE=0
# Short device deadlines: a protocol bug fails in seconds, not in 30 s per wait.
export EPCOMM_TIMEOUT_S=${EPCOMM_TIMEOUT_S:-8}
# The first op of each family waits up to 600 s by default (ranks may start minutes apart);
# here they start together, so a hang in a first op shows in a minute instead of ten.
export EPCOMM_FIRST_OP_TIMEOUT_S=${EPCOMM_FIRST_OP_TIMEOUT_S:-60}
export BUILD_DIR=${BUILD_DIR:-build}
# scripts/test.sh runs the Python tests after CTest; here only when GPU_CHECK_PYTHON=1, because a
# GPU machine is often offline: then also set PYTHON (an interpreter that has torch; a venv's works),
# PY_SYSTEM_SITE=1 PY_NO_BUILD_ISOLATION=1 PIP_NO_INDEX=1 PIP_FIND_LINKS=<wheelhouse with
# scikit-build-core, nanobind, pytest> (docs/python.md).
export EPCOMM_TEST_PYTHON=${GPU_CHECK_PYTHON:-0}
export CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-90}
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain 2>/dev/null | grep -v '^??' | head -1)
[ -n "$dirty" ] && commit="$commit+dirty"
export EPCOMM_COMMIT=$commit
# -rdynamic: compute-sanitizer's host backtraces name our functions (the fabric-probe filter
# matches on them). ep_bench is only built when the benchmark runs.
bench_on=$([ "${GPU_CHECK_BENCH:-1}" != 0 ] && echo ON || echo OFF)
export EPCOMM_CMAKE_ARGS="${EPCOMM_CMAKE_ARGS:-} -DCMAKE_EXE_LINKER_FLAGS=-rdynamic \
-DEPCOMM_BUILD_BENCH=$bench_on"

num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
{
  echo "== machine"; date -u; nvidia-smi -L; nvidia-smi topo -m 2>/dev/null | head -8
  nvcc --version | tail -1; mpirun --version | head -1
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -1
} 2>&1 | tee "$OUT/machine.log"

# --- MPS -----------------------------------------------------------------------------------------
# Several ranks on one GPU time-slice without MPS (every op that waits on a peer costs ~4.5 ms);
# with the MPS daemon they run side by side. mpirun starts its ranks on this host with this
# environment, so the pipe directory below reaches every rank (ctest -> mpirun -> rank).
mps_state=off
mps_note=""
mps_root=${TMPDIR:-/tmp}/epcomm-mps-$$
probe_exe=$mps_root/cuda-probe
build_probe() {
  mkdir -p "$mps_root"
  cat > "$mps_root/probe.cu" <<'EOF'
#include <cstdio>
__global__ void touch(int* p) { p[threadIdx.x] = threadIdx.x; }
int main() {
  int* p = nullptr;
  cudaError_t e = cudaMalloc(&p, 256 * sizeof(int));
  if (e == cudaSuccess) { touch<<<1, 256>>>(p); e = cudaDeviceSynchronize(); }
  if (e == cudaSuccess) e = cudaFree(p);
  std::printf("cuda probe: %s\n", cudaGetErrorName(e));
  return e == cudaSuccess ? 0 : 1;
}
EOF
  nvcc -o "$probe_exe" "$mps_root/probe.cu" >"$mps_root/probe-build.log" 2>&1
}
mps_stop() {
  [ "$mps_state" = on ] || return 0
  local pid
  pid=$(cat "$CUDA_MPS_PIPE_DIRECTORY/nvidia-cuda-mps-control.pid" 2>/dev/null)
  echo quit | nvidia-cuda-mps-control >/dev/null 2>&1
  # The daemon (and its server) exit asynchronously; wait up to 10 s for ours.
  for _ in $(seq 100); do
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  mps_state=off
  {
    echo "== MPS logs ($CUDA_MPS_LOG_DIRECTORY)"
    for f in "$CUDA_MPS_LOG_DIRECTORY"/*; do [ -f "$f" ] && { echo "--- $f"; tail -200 "$f"; }; done
  } >> "$OUT/mps.log" 2>&1
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}
mps_start() {
  if ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    mps_note="nvidia-cuda-mps-control not found"; return 1
  fi
  export CUDA_MPS_PIPE_DIRECTORY=$mps_root/pipe CUDA_MPS_LOG_DIRECTORY=$mps_root/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if ! nvidia-cuda-mps-control -d >>"$OUT/mps.log" 2>&1; then
    mps_note="nvidia-cuda-mps-control -d failed"
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    return 1
  fi
  mps_state=on
  # A client must really get through (an MPS server that cannot start fails every CUDA call).
  if [ -x "$probe_exe" ] && ! "$probe_exe" >>"$OUT/mps.log" 2>&1; then
    mps_note="a CUDA program failed under MPS (see mps.log); running without MPS"
    mps_stop
    return 1
  fi
  return 0
}
trap 'mps_stop' EXIT
build_probe || echo "gpu-check: could not build the CUDA probe (see $mps_root/probe-build.log)"
mps_default=$([ "${num_gpus:-0}" -lt 8 ] && echo 1 || echo 0)
if [ "${GPU_CHECK_MPS:-$mps_default}" = 1 ]; then
  mps_start && echo "gpu-check: MPS daemon started (pipe $CUDA_MPS_PIPE_DIRECTORY)" |
    tee -a "$OUT/mps.log"
  [ -n "$mps_note" ] && echo "gpu-check: MPS not used: $mps_note" | tee -a "$OUT/mps.log"
fi
mps_tests=$mps_state

# --- tests ---------------------------------------------------------------------------------------
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
# The entries the test budget left out: a fresh machine's build and every entry do not fit in one
# device call (600 s). The summary names them and the GPU_CHECK_TESTS value that runs just them.
not_run=()
if [ "${GPU_CHECK_README:-0}" != 1 ]; then
  mapfile -t listed < <(ctest --test-dir "$BUILD_DIR" -N ${GPU_CHECK_TESTS:+-R "$GPU_CHECK_TESTS"} \
    2>/dev/null | sed -nE 's/^ *Test +#[0-9]+: //p')
  for name in "${listed[@]}"; do
    grep -qE "Test +#[0-9]+: $name " "$OUT/test.log" || not_run+=("$name")
  done
fi

# --- the same tests with the EPCOMM_PERF fast paths on -----------------------------------------
perf_rc=skipped
if [ -n "${GPU_CHECK_PERF:-}" ]; then
  start=$(date +%s)
  # CTest entries only: the Python suite (GPU_CHECK_PYTHON) ran with the tests above, and a second
  # run here took this phase's budget and ended it with rc 124 after its entries had passed.
  EPCOMM_TEST_PYTHON=0 EPCOMM_PERF=$GPU_CHECK_PERF \
    timeout "${GPU_CHECK_PERF_SECONDS:-300}" scripts/test.sh --timeout 300 \
    -R "${GPU_CHECK_PERF_TESTS:-mp_ll|mp_ht|mp_soak|gpu_single}" 2>&1 |
    tee "$OUT/perf-tests.log"
  perf_rc=${PIPESTATUS[0]}
  perf_s=$(( $(date +%s) - start ))
fi

# --- compute-sanitizer ---------------------------------------------------------------------------
# name|ranks (0 = no mpirun)|test binary|gtest filter|extra environment
sanitizer_runs=(
  "gpu_single|0|gpu_single|*|"
  "mp_buffer_np2|2|mp_buffer|SymmetricBuffer.PatternAuto:SymmetricBuffer.PatternPosixFd:SymmetricBuffer.PatternCudaIpc|"
  "mp_ht_np2|2|mp_ht|HtDispatchCombine.UniformBf16:HtDispatchCombine.RankWithZeroTokens:HtDispatchCombine.NegativeEntriesAndInt32Ids:HtDispatchCombine.GraphReplayEqualsEager:HtBadInput.ExpertIdOutOfRangeReportedFromDevice|"
  "mp_ll_np2|2|mp_ll|LlDispatchCombine.Bf16FullBatch:LlDispatchCombine.Fp8Cast:LlDispatchCombine.NegativeEntriesInt32:LlDispatchCombine.SplitSendReceiveWithWorkBetween:LlDispatchCombine.GraphReplay|"
  "mp_soak_np2|2|mp_soak|*|EPCOMM_SOAK_ROUNDS=50"
  "mp_soak_np4|4|mp_soak|*|EPCOMM_SOAK_ROUNDS=25"
)
san_log=$OUT/sanitizer.log
: > "$san_log"
san_dir=$mps_root/sanitizer
mkdir -p "$san_dir"
san_rows=()
san_total_unexpected=0
san_total_filtered=0
san_incomplete=0
san_mps_note=""

# Counts one run's logs: "<reported> <filtered> <complete logs> <logs>" and appends the logs
# (each cut at 400 lines) to sanitizer.log.
count_logs() {
  local tag=$1; shift
  local reported=0 filtered=0 complete=0 logs=0 f
  for f in "$@"; do
    [ -f "$f" ] || continue
    logs=$((logs + 1))
    local line
    line=$(awk '
      function flush() {
        if (inrec && hdr ~ /CUDA_ERROR_NOT_PERMITTED/ && hdr ~ /cuMemCreate/ &&
            body ~ /probeFabric|SymmetricMemory::create/) filtered++
        else if (inrec && hdr ~ /cudaErrorInvalidDevice/ &&
                 body ~ /GpuSingle_NvlinkDomainQueryAnswers/) filtered++
        inrec = 0; body = ""
      }
      /^========= [^ ]/ {
        flush()
        if ($0 ~ /ERROR SUMMARY: [0-9]+ error/) {
          n = $0; sub(/.*ERROR SUMMARY: /, "", n); sub(/ .*/, "", n); reported += n; done = 1
          next
        }
        # racecheck ends with "RACECHECK SUMMARY: H hazards displayed (E errors, W warnings)".
        if ($0 ~ /RACECHECK SUMMARY: .*\([0-9]+ error/) {
          n = $0; sub(/.*\(/, "", n); sub(/ .*/, "", n); reported += n; done = 1
          next
        }
        hdr = $0; inrec = 1; next
      }
      /^=========/ { if (inrec) body = body "\n" $0; next }
      END { flush(); printf "%d %d %d\n", reported, filtered, done }' "$f")
    reported=$((reported + ${line%% *}))
    line=${line#* }
    filtered=$((filtered + ${line%% *}))
    complete=$((complete + ${line#* }))
    { echo "### $tag: $(basename "$f")"; head -400 "$f"; } >> "$san_log"
  done
  echo "$reported $filtered $complete $logs"
}

# Runs one test binary under one tool; sets san_rows / totals.
sanitize_one() {
  local tool=$1 name=$2 ranks=$3 exe=$BUILD_DIR/tests/$4 filter=$5 env_extra=$6
  local tag="$tool $name"
  rm -f "$san_dir"/*.log
  if [ ! -x "$exe" ]; then
    san_rows+=("$(printf '%-10s %-14s %5s %8s %9s %10s %6s' "$tool" "$name" "-" "-" "-" "-" \
      "no binary")")
    return
  fi
  local cs=(compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 30
            --launch-timeout 120)
  local cmd
  if [ "$ranks" = 0 ]; then
    cmd=("${cs[@]}" --log-file "$san_dir/$name.p%p.log" "$exe" "--gtest_filter=$filter"
         --gtest_color=no)
  else
    local mpi=(mpirun -np "$ranks" --oversubscribe --bind-to none)
    [ "$(id -u)" = 0 ] && mpi+=(--allow-run-as-root)
    # Each rank's exit code 99 (the expected reports above count as errors) becomes 0: mpirun
    # kills the other ranks when one exits non-zero, before their sanitizers write their
    # summaries (the run then showed INCOMPLETE). Errors are counted from the logs either way.
    # shellcheck disable=SC2016  # $@ and $rc belong to the rank's shell
    cmd=("${mpi[@]}" bash -c '"$@"; rc=$?; [ "$rc" = 99 ] && rc=0; exit "$rc"' sanitized-rank
         "${cs[@]}" --log-file "$san_dir/$name.r%q{OMPI_COMM_WORLD_RANK}.p%p.log"
         "$exe" "--gtest_filter=$filter" --gtest_color=no)
  fi
  local t0 rc
  t0=$(date +%s)
  # Deadlines stretched for the instrumented kernels, still finite.
  env EPCOMM_TIMEOUT_S=60 $env_extra timeout "${GPU_CHECK_SANITIZE_RUN_SECONDS:-150}" "${cmd[@]}" \
    > "$san_dir/stdout.txt" 2>&1
  rc=$?
  local secs=$(( $(date +%s) - t0 ))
  local counts reported filtered complete logs
  counts=$(count_logs "$tag" "$san_dir"/*.log)
  read -r reported filtered complete logs <<< "$counts"
  local tests_line
  tests_line=$(grep -E "^\[  (PASSED|FAILED|SKIPPED) +\] [0-9]" "$san_dir/stdout.txt" | head -3 |
    tr '\n' ' ')
  { echo "### $tag: test output (rc $rc, ${secs}s)"; tail -60 "$san_dir/stdout.txt"; } >> "$san_log"
  local unexpected=$((reported - filtered))
  local status=ok
  # API errors are counted in ERROR SUMMARY; never let the filter hide more than it matched.
  if [ "$unexpected" -lt 0 ]; then unexpected=0; status="ok(filter>reported)"; fi
  # rc 99 (--error-exitcode) also follows the filtered report alone; test failures are read
  # from GoogleTest's output instead.
  if [ "$rc" = 124 ]; then status="TIMEOUT"
  elif [ "$logs" = 0 ] || [ "$complete" -lt "$logs" ]; then status="INCOMPLETE"
  elif [ "$unexpected" -gt 0 ]; then status="ERRORS"
  elif grep -qE "^\[  FAILED  \]|\] FAILED " "$san_dir/stdout.txt"; then status="TEST FAILED"
  elif [ "$rc" != 0 ] && [ "$rc" != 99 ]; then status="rc=$rc"
  elif grep -qE "EPCOMM_SKIPPED_NO_GPU|^\[  PASSED  \] 0 tests" "$san_dir/stdout.txt"; then
    status="SKIPPED (nothing checked)"
  fi
  [ "$status" = ok ] || san_incomplete=$((san_incomplete + 1))
  san_total_unexpected=$((san_total_unexpected + unexpected))
  san_total_filtered=$((san_total_filtered + filtered))
  san_rows+=("$(printf '%-10s %-14s %5s %8s %9s %10s %6s  %s %s' "$tool" "$name" \
    "$((ranks == 0 ? 1 : ranks))" "$reported" "$filtered" "$unexpected" "${secs}s" "$status" \
    "$tests_line")")
}

san_s=0
san_state=skipped
if [ "${GPU_CHECK_SANITIZE:-1}" != 0 ]; then
  san_state=run
  if ! command -v compute-sanitizer >/dev/null 2>&1; then
    san_state="skipped (compute-sanitizer not found)"
  else
    start=$(date +%s)
    # compute-sanitizer must work under MPS here, else run this phase without MPS.
    if [ "$mps_state" = on ] && [ -x "$probe_exe" ]; then
      if ! compute-sanitizer --tool memcheck --error-exitcode 99 "$probe_exe" \
          >> "$san_log" 2>&1; then
        san_mps_note="compute-sanitizer failed under MPS (see sanitizer.log): phase run without MPS"
        mps_stop
      fi
    fi
    budget=${GPU_CHECK_SANITIZE_SECONDS:-180}
    for tool in ${GPU_CHECK_SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
      for entry in "${sanitizer_runs[@]}"; do
        IFS='|' read -r name ranks exe filter env_extra <<< "$entry"
        if [ -n "${GPU_CHECK_SANITIZE_RUNS:-}" ] && ! [[ $name =~ ${GPU_CHECK_SANITIZE_RUNS} ]]; then
          continue
        fi
        if [ $(( $(date +%s) - start )) -ge "$budget" ]; then
          san_rows+=("$(printf '%-10s %-14s %5s %8s %9s %10s %6s  %s' "$tool" "$name" "-" "-" \
            "-" "-" "-" "NOT RUN (sanitizer budget ${budget}s spent)")")
          san_incomplete=$((san_incomplete + 1))
          continue
        fi
        sanitize_one "$tool" "$name" "$ranks" "$exe" "$filter" "$env_extra"
      done
    done
    san_s=$(( $(date +%s) - start ))
  fi
fi
mps_san=$mps_state
mps_clients=$(cat "$mps_root"/log/control.log 2>/dev/null | grep -ci "new client")
# The benchmark runs one rank per GPU: no MPS.
mps_stop

bench_rc=skipped
if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
  start=$(date +%s)
  scripts/bench.sh --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
  bench_rc=${PIPESTATUS[0]}
  bench_s=$(( $(date +%s) - start ))
fi

echo
echo "================ gpu-check summary (commit $commit) ================"
echo "MPS: tests ${mps_tests}, sanitizer ${mps_san}; client connections logged: ${mps_clients}" \
  "${mps_note:+($mps_note)}"
echo "-- ctest entries"
grep -E "^ *[0-9]+/[0-9]+ Test +#" "$OUT/test.log" | sed -E 's/^ *[0-9]+\/[0-9]+ Test +#[0-9]+: //' |
  sed -E 's/ \.+/ /' | head -80
grep -E "tests passed|tests failed|Total Test time" "$OUT/test.log" | tail -3
grep -E "SKIPPED \]|Skipped because|is not usable here|EPCOMM_SKIPPED_NO_GPU" "$OUT/test.log" |
  sort | uniq -c | head -10
echo "tests: rc=$test_rc (${test_s}s)"
if [ "${#not_run[@]}" -gt 0 ]; then
  echo "not run (the test budget, GPU_CHECK_TEST_SECONDS=${GPU_CHECK_TEST_SECONDS:-520}, ran out):" \
    "${#not_run[@]} entries; they alone:"
  echo "  GPU_CHECK_TESTS='^($(IFS='|'; echo "${not_run[*]}"))\$' GPU_CHECK_BENCH=0 scripts/gpu-check.sh"
fi
if [ "$perf_rc" != skipped ]; then
  echo "-- tests with EPCOMM_PERF=$GPU_CHECK_PERF"
  grep -E "tests passed|tests failed" "$OUT/perf-tests.log" | tail -2
  echo "perf tests: rc=$perf_rc (${perf_s}s)"
fi
echo "-- compute-sanitizer ($san_state, ${san_s}s${san_mps_note:+; $san_mps_note})"
if [ "$san_state" = run ]; then
  printf '%-10s %-14s %5s %8s %9s %10s %6s  %s\n' tool run ranks reported "expected(*)" unexpected \
    time status
  for row in "${san_rows[@]}"; do echo "$row"; done
  echo "(*) CUDA_ERROR_NOT_PERMITTED from cuMemCreate in the fabric probe, and the invalid" \
    "device that gpu_single's NvlinkDomainQueryAnswers asks about: expected, filtered"
  echo "sanitizer: ${san_total_unexpected} unexpected errors, ${san_total_filtered} filtered," \
    "${san_incomplete} runs not clean or not complete"
fi
echo "bench: rc=$bench_rc (${bench_s:-0}s)"
if [ "$bench_rc" != skipped ]; then
  sed -n '/^op /,$p' "$OUT/bench.log" | head -60
  echo "-- fixed cost per call"
  sed -n '/^Fit per op/,$p' "$OUT/bench.log" | head -40
fi
rm -rf "$mps_root"
final=0
[ "$test_rc" = 0 ] || final=1
[ "$perf_rc" = skipped ] || [ "$perf_rc" = 0 ] || final=1
if [ "$san_state" = run ] && { [ "$san_total_unexpected" != 0 ] || [ "$san_incomplete" != 0 ]; }; then
  final=1
fi
[ "$bench_rc" = skipped ] || [ "$bench_rc" = 0 ] || final=1
exit $final
