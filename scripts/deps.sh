#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Checks (and, as root on Debian/Ubuntu, installs) what building epcomm needs. Shared by
# scripts/test.sh and scripts/bench.sh.
#
#   scripts/deps.sh [core] [mpi] [test] [bench]     (default: everything)
#
#   core   cmake, a C++17 compiler, make, the CUDA Toolkit (nvcc 12.8+; never installed here)
#   mpi    Open MPI (mpirun, mpicxx, headers)           the MPI bootstrap, tests and ep_bench
#   test   GoogleTest                                   scripts/test.sh only
#   bench  CLI11, nlohmann-json (NCCL optional)         ep_bench only
#
# Nothing is downloaded when everything is already there, so the script works on machines
# without network access. Exit status: 0 when everything asked for is present (or was installed),
# 1 otherwise, with the exact install command on stderr.
#
# When sourced it also leaves nvcc on PATH (from /usr/local/cuda/bin if needed).
set -euo pipefail

deps_main() {
  local want=("$@")
  [ ${#want[@]} -eq 0 ] && want=(core mpi test bench)
  local need_mpi=0 need_test=0 need_bench=0 w
  for w in "${want[@]}"; do
    case "$w" in
      core) ;;
      mpi) need_mpi=1 ;;
      test) need_test=1; need_mpi=1 ;;
      bench) need_bench=1; need_mpi=1 ;;
      *) echo "deps.sh: unknown group '$w' (core, mpi, test, bench)" >&2; return 2 ;;
    esac
  done

  # nvcc lives in /usr/local/cuda/bin on the usual installs; CMake needs it on PATH or CUDACXX.
  if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH=/usr/local/cuda/bin:$PATH
  fi

  local missing=()
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || missing+=(g++)
  command -v make >/dev/null 2>&1 || command -v ninja >/dev/null 2>&1 || missing+=(make)
  if [ $need_mpi = 1 ]; then
    { command -v mpirun >/dev/null 2>&1 && command -v mpicxx >/dev/null 2>&1; } ||
      missing+=(libopenmpi-dev openmpi-bin)
  fi
  [ $need_test = 1 ] && ! deps_have_header gtest/gtest.h && missing+=(libgtest-dev)
  if [ $need_bench = 1 ]; then
    deps_have_header CLI/CLI.hpp || missing+=(libcli11-dev)
    deps_have_header nlohmann/json.hpp || missing+=(nlohmann-json3-dev)
  fi

  if [ ${#missing[@]} -gt 0 ]; then
    local cmd="apt-get install -y --no-install-recommends ${missing[*]}"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "deps.sh: installing ${missing[*]}" >&2
      # A stale or missing package list is refreshed first; a machine without network fails
      # here with apt's own message, and only because something really is missing.
      apt-get update -qq || echo "deps.sh: apt-get update failed; trying the cached lists" >&2
      if ! DEBIAN_FRONTEND=noninteractive $cmd; then
        echo "deps.sh: could not install ${missing[*]}" >&2
        return 1
      fi
    else
      echo "deps.sh: missing build dependencies (${missing[*]}). Install them with:" >&2
      echo "  sudo apt-get update && sudo $cmd" >&2
      return 1
    fi
  fi
  if ! command -v nvcc >/dev/null 2>&1; then
    echo "deps.sh: the CUDA Toolkit (nvcc, 12.8 or newer) is required; install it from" >&2
    echo "  https://developer.nvidia.com/cuda-downloads and put its bin/ on PATH" >&2
    return 1
  fi
  return 0
}

deps_have_header() {
  local h dir
  for h in "$@"; do
    for dir in /usr/include /usr/local/include ${CPATH:+${CPATH//:/ }}; do
      [ -f "$dir/$h" ] && return 0
    done
  done
  return 1
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  deps_main "$@"
fi
