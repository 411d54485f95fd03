#!/usr/bin/env bash
# Configures, builds and runs every epcomm test through CTest.
#
#   scripts/test.sh [extra ctest arguments, e.g. -R mp_ht]
#
# Without a GPU the GPU tests are reported as skipped (never as passed). Missing build
# dependencies are installed with apt-get when run as root on Debian/Ubuntu; otherwise the exact
# install command is printed. Environment: BUILD_DIR (default build), CMAKE_CUDA_ARCHITECTURES,
# CMAKE_BUILD_TYPE (default Release), EPCOMM_WERROR (ON/OFF), EPCOMM_CMAKE_ARGS (extra).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}

# nvcc lives in /usr/local/cuda/bin on the usual installs; CMake needs it on PATH or CUDACXX.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi

have_header() {
  local h
  for h in "$@"; do
    [ -f "/usr/include/$h" ] || [ -f "/usr/local/include/$h" ] && return 0
  done
  return 1
}

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
{ command -v mpirun >/dev/null 2>&1 && command -v mpicxx >/dev/null 2>&1; } ||
  missing+=(libopenmpi-dev openmpi-bin)
have_header gtest/gtest.h || missing+=(libgtest-dev)
have_header CLI/CLI.hpp || missing+=(libcli11-dev)
have_header nlohmann/json.hpp || missing+=(nlohmann-json3-dev)

if [ ${#missing[@]} -gt 0 ]; then
  cmd="apt-get install -y ${missing[*]}"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $cmd
  else
    echo "test.sh: missing build dependencies. Install them with:" >&2
    echo "  sudo apt-get update && sudo $cmd" >&2
    exit 1
  fi
fi
if ! command -v nvcc >/dev/null 2>&1; then
  echo "test.sh: the CUDA Toolkit (nvcc, 12.8 or newer) is required; install it from" >&2
  echo "  https://developer.nvidia.com/cuda-downloads and put its bin/ on PATH" >&2
  exit 1
fi

# Open MPI refuses root without these; tests and the benchmark also pass the flag.
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export NCCL_NVLS_ENABLE=0  # never use NVLink multicast

cmake_args=(-S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}"
            -DEPCOMM_WERROR="${EPCOMM_WERROR:-OFF}" ${EPCOMM_CMAKE_ARGS:-})
if [ -n "${CMAKE_CUDA_ARCHITECTURES:-}" ]; then
  cmake_args+=(-DCMAKE_CUDA_ARCHITECTURES="$CMAKE_CUDA_ARCHITECTURES")
fi
cmake "${cmake_args[@]}"
cmake --build "$BUILD_DIR" -j "$(nproc)"
cd "$BUILD_DIR"
# Serially: the multi-rank tests share the GPUs.
ctest --output-on-failure "$@"
