#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Configures, builds and runs every epcomm test through CTest.
#
#   scripts/test.sh [extra ctest arguments, e.g. -R mp_ht]
#
# Without a GPU the GPU tests are reported as skipped (never as passed). Missing build
# dependencies are installed with apt-get when run as root on Debian/Ubuntu; otherwise the exact
# install command is printed. Environment: BUILD_DIR (default build), CMAKE_CUDA_ARCHITECTURES,
# CMAKE_BUILD_TYPE (default Release), EPCOMM_WERROR (ON/OFF), EPCOMM_CMAKE_ARGS (extra).
# After CTest it runs the Python tests (pytest, tests/python) through scripts/test-python.sh:
# wheel, fresh venv, pytest; EPCOMM_TEST_PYTHON=0 skips them (see that script's settings).
set -euo pipefail
cd "$(dirname "$0")/.."
repo_root=$PWD
BUILD_DIR=${BUILD_DIR:-build}

# Build dependencies: checked, and installed when run as root on Debian/Ubuntu (scripts/deps.sh).
# shellcheck source=scripts/deps.sh
source scripts/deps.sh
deps_main core mpi test bench

# Open MPI refuses root without these; tests and the benchmark also pass the flag.
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export NCCL_NVLS_ENABLE=0  # never use NVLink multicast

# Tests and ep_bench ON explicitly: scripts/bench.sh may have configured the same directory
# with the tests off.
cmake_args=(-S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}"
            -DEPCOMM_BUILD_TESTS=ON -DEPCOMM_BUILD_BENCH=ON
            -DEPCOMM_WERROR="${EPCOMM_WERROR:-OFF}" ${EPCOMM_CMAKE_ARGS:-})
if [ -n "${CMAKE_CUDA_ARCHITECTURES:-}" ]; then
  cmake_args+=(-DCMAKE_CUDA_ARCHITECTURES="$CMAKE_CUDA_ARCHITECTURES")
fi
cmake "${cmake_args[@]}"
cmake --build "$BUILD_DIR" -j "$(nproc)"
cd "$BUILD_DIR"
# Serially: the multi-rank tests share the GPUs.
ctest_out=$(mktemp)
trap 'rm -f "$ctest_out"' EXIT
set +e
ctest --output-on-failure "$@" 2>&1 | tee "$ctest_out"
ctest_rc=${PIPESTATUS[0]}
set -e

# One line on the skipped tests and why. CTest lists them as "(Skipped)"; the reason is what each
# GPU test binary printed (EPCOMM_SKIPPED_NO_GPU: <reason>, tests/common/test_env.cpp), which
# CTest keeps in Testing/Temporary/LastTest.log.
num_skipped=$(grep -cE '^[[:space:]]*[0-9]+ - .* \(Skipped\)' "$ctest_out" || true)
if [ "${num_skipped:-0}" -gt 0 ]; then
  reasons=$(sed -n 's/.*EPCOMM_SKIPPED_NO_GPU: \(.*\); every GPU test of this binary was skipped.*/\1/p' \
              Testing/Temporary/LastTest.log 2>/dev/null | sort -u | paste -sd ';' - || true)
  echo "test.sh: ${num_skipped} GPU test(s) skipped: no CUDA device visible (${reasons:-see Testing/Temporary/LastTest.log})"
else
  echo "test.sh: no test skipped"
fi

py_rc=0
if [ "${EPCOMM_TEST_PYTHON:-1}" != 0 ]; then
  cd "$repo_root"
  set +e
  scripts/test-python.sh
  py_rc=$?
  set -e
  echo "test.sh: Python tests (scripts/test-python.sh) exit code $py_rc"
fi
[ "$ctest_rc" = 0 ] || exit "$ctest_rc"
exit "$py_rc"
