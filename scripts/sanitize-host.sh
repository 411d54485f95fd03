#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Host-code sanitizer run: builds the host-only tests with AddressSanitizer and
# UndefinedBehaviorSanitizer in a separate build directory and runs them through CTest
# (unit_tests, mp_bootstrap under mpirun at 1, 2 and 4 ranks, mp_topology with its simulated
# nodes). Any ASan or UBSan report fails the run: UBSan is built with -fno-sanitize-recover=all
# and both runtimes halt on the first error. Needs no GPU (device code is compiled but never launched here).
#
#   scripts/sanitize-host.sh [extra ctest arguments]
#
# Environment:
#   SANITIZE_BUILD_DIR        build directory (default: build-sanitize, ignored by git)
#   CMAKE_CUDA_ARCHITECTURES  GPU targets (default 90: the kernels are only compiled, not run)
#   SANITIZE_LEAKS            1 (default) runs LeakSanitizer at exit; 0 turns it off
#   SANITIZE_TESTS            ctest -R regex (default: the host-only tests named above)
#   SANITIZE_WERROR           ON/OFF (default OFF: warnings are policed by the normal build;
#                             -O1 plus instrumentation gives GCC false positives)
# The flags go through CMAKE_<LANG>_FLAGS, so CMakeLists.txt needs no sanitizer option.
set -euo pipefail
cd "$(dirname "$0")/.."
repo_dir=$PWD
build_dir=${SANITIZE_BUILD_DIR:-build-sanitize}

if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

sanitize="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
# nvcc splits -Xcompiler values at commas: one flag per sanitizer.
cuda_host="-Xcompiler=-fsanitize=address,-fsanitize=undefined,-fno-sanitize-recover=all"
cuda_host="$cuda_host,-fno-omit-frame-pointer"

launcher=()
if command -v ccache >/dev/null 2>&1; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi

# RelWithDebInfo with -O1 and without NDEBUG: readable stacks, asserts on, still quick.
cmake -S "$repo_dir" -B "$build_dir" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-90}" \
  -DEPCOMM_BUILD_BENCH=OFF -DEPCOMM_BUILD_TESTS=ON -DEPCOMM_WERROR="${SANITIZE_WERROR:-OFF}" \
  -DCMAKE_CXX_FLAGS="$sanitize" \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
  -DCMAKE_CUDA_FLAGS="$cuda_host" \
  -DCMAKE_CUDA_FLAGS_RELWITHDEBINFO="-O1 -g" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  "${launcher[@]}"
jobs=${SANITIZE_JOBS:-$(nproc)}
cmake --build "$build_dir" --target unit_tests mp_bootstrap mp_topology -j "$jobs"

# Allocations made inside Open MPI and its plugins (never freed before exit by design) are not
# ours; nor are the staging buffers and communicator slot that MpiBootstrap deliberately leaks
# when a collective times out (MPI may still write into them; see mpi_bootstrap.cpp). Every other
# leak fails the run.
cat > "$build_dir/lsan.supp" <<'EOF'
leak:epcomm::MpiBootstrap::allGather
leak:epcomm::MpiBootstrap::MpiBootstrap
leak:libmpi.so
leak:libopen-pal.so
leak:libopen-rte.so
leak:libpmix.so
leak:libhwloc.so
leak:libevent
leak:libucs.so
leak:libucp.so
leak:libuct.so
leak:mca_
EOF
# Open MPI unloads its plugins in MPI_Finalize, so LeakSanitizer (which symbolizes at exit) sees
# their frames as "<unknown module>" and no suppression can name them. A preloaded dlclose that
# keeps libraries loaded makes those frames resolvable; it changes nothing else.
cat > "$build_dir/keep_loaded.c" <<'EOF'
int dlclose(void* handle) { (void)handle; return 0; }
EOF
cc -shared -fPIC -O1 -o "$build_dir/libkeep_loaded.so" "$build_dir/keep_loaded.c"
leaks=${SANITIZE_LEAKS:-1}
# protect_shadow_gap=0: the CUDA driver maps memory where ASan keeps its shadow gap otherwise
# (harmless without a GPU, needed with one). fast_unwind_on_malloc=0: Open MPI and libc are
# built without frame pointers, and only the slow unwinder gets through them to a module the
# suppressions can name. mpirun children inherit these on one host.
export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:detect_leaks=${leaks}:protect_shadow_gap=0:\
detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1:\
exitcode=86:print_summary=1:verify_asan_link_order=0:fast_unwind_on_malloc=0"
export LSAN_OPTIONS="suppressions=$(cd "$build_dir" && pwd)/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:report_error_type=1:exitcode=87"

if [ "$leaks" = 1 ]; then
  export LD_PRELOAD="$(cd "$build_dir" && pwd)/libkeep_loaded.so${LD_PRELOAD:+:$LD_PRELOAD}"
fi
cd "$build_dir"
log=sanitize-ctest.log
set +e
ctest --output-on-failure --timeout 300 \
  -R "${SANITIZE_TESTS:-^(unit_tests|mp_bootstrap_np[124]|mp_topology_.*)\$}" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# A report inside a test that otherwise passed must still fail the run.
if grep -qE "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|SUMMARY: UndefinedBehavior" \
    "$log"; then
  echo "sanitize-host: a sanitizer reported an error (see $build_dir/$log)" >&2
  rc=${rc/#0/1}
fi
if [ "$rc" = 0 ]; then
  echo "sanitize-host: ASan+UBSan clean (leak check: $([ "$leaks" = 1 ] && echo on || echo off))"
fi
exit "$rc"
