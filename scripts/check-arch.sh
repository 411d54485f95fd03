#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Configure-only check of the CUDA architectures (no compilation, well under a minute):
#   1. the FIRST configure of a fresh build directory already compiles the documented default
#      (sm_90, plus sm_100 when nvcc is 12.8 or newer) -- a normal variable shadowing the cache
#      entry once made the first configure compile sm_90 only;
#   2. a second configure changes nothing;
#   3. a user's -DCMAKE_CUDA_ARCHITECTURES and the CUDAARCHS environment variable win.
# It reads the cache and the nvcc flags CMake generated for the core library.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
unset CMAKE_CUDA_ARCHITECTURES CUDAARCHS

nvcc_version=$(nvcc --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
expected="90"
if [ "$(printf '%s\n12.8\n' "$nvcc_version" | sort -V | head -1)" = "12.8" ]; then
  expected="90;100"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail=0

# The archs in the cache, and the sm_XX targets in the core library's generated nvcc flags.
configure() {  # configure <dir> [cmake args...]
  local dir=$1
  shift
  cmake -S . -B "$dir" -DEPCOMM_BUILD_TESTS=OFF -DEPCOMM_BUILD_BENCH=OFF -DEPCOMM_BUILD_MPI=OFF \
    "$@" > "$dir.log" 2>&1 || { cat "$dir.log" >&2; echo "check-arch: configure failed" >&2; exit 1; }
}
cache_archs() { sed -n 's/^CMAKE_CUDA_ARCHITECTURES:[A-Z]*=//p' "$1/CMakeCache.txt"; }
flag_archs() {
  # Makefile generator: flags.make; Ninja: build.ninja. sm_XX from --generate-code=...code=[...].
  cat "$1"/CMakeFiles/epcomm_objects.dir/flags.make "$1"/CMakeFiles/epcomm.dir/flags.make \
    "$1"/build.ninja 2>/dev/null | grep -E 'CUDA_FLAGS|FLAGS = ' |
    grep -o 'sm_[0-9]*[a-z]\?' | sort -u -V | sed 's/sm_//' | paste -sd ';' -
}
check() {  # check <what> <expected> <actual>
  if [ "$2" = "$3" ]; then
    echo "check-arch: ok   $1: $3"
  else
    echo "check-arch: FAIL $1: expected '$2', got '$3'" >&2
    fail=1
  fi
}

echo "check-arch: nvcc $nvcc_version, documented default '$expected'"
configure "$work/default"
check "first configure, cache" "$expected" "$(cache_archs "$work/default")"
check "first configure, nvcc flags" "$expected" "$(flag_archs "$work/default")"
configure "$work/default"
check "second configure, cache" "$expected" "$(cache_archs "$work/default")"
check "second configure, nvcc flags" "$expected" "$(flag_archs "$work/default")"

configure "$work/user" -DCMAKE_CUDA_ARCHITECTURES=90
check "-DCMAKE_CUDA_ARCHITECTURES=90, nvcc flags" "90" "$(flag_archs "$work/user")"

CUDAARCHS=90 configure "$work/env"
check "CUDAARCHS=90, nvcc flags" "90" "$(flag_archs "$work/env")"

# What the installed package tells consumers (epcomm_CUDA_ARCHITECTURES).
exported=$(sed -n 's/^set(epcomm_CUDA_ARCHITECTURES "\(.*\)")$/\1/p' "$work/default/epcommConfig.cmake")
check "epcomm_CUDA_ARCHITECTURES in epcommConfig.cmake" "$expected" "$exported"

# Code that depends on the architecture list compiles with the default list (CI builds sm_90
# only, so this is where several architectures meet the compiler): the one kernel file that
# reads __CUDA_ARCH_LIST__, a few seconds.
if make -C "$work/default" kernels/barrier.cu.o > "$work/default-compile.log" 2>&1; then
  echo "check-arch: ok   kernels/barrier.cu compiles for '$expected'"
else
  cat "$work/default-compile.log" >&2
  echo "check-arch: FAIL kernels/barrier.cu does not compile for '$expected'" >&2
  fail=1
fi

if [ "$fail" != 0 ]; then
  echo "check-arch: FAILED" >&2
  exit 1
fi
echo "check-arch: the CUDA architectures are right on the first configure"
