#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Compile check of the GIN rail transport (docs/scale-out.md "Rail transport"): the NCCL on our
# machines (2.28.x) is too old for it, so this fetches NCCL's wheel (headers and libnccl.so.2;
# nvidia-nccl-cu13, 305 MB) into a temporary directory, configures a separate build directory
# against it with warnings as errors, checks the configure output lists the gin transport, and
# builds epcomm_nccl, unit_tests and the GIN test binary nccl_gin. Nothing runs on a GPU and no
# GIN code executes: GIN needs an RDMA NIC. Not part of .ci/run: a fresh build directory
# compiles the core again (about 10 minutes on 2 cores).
#
#   scripts/check-gin.sh
#
# Environment:
#   GIN_NCCL_VERSION          the wheel's version (default 2.32.3)
#   GIN_NCCL_ROOT             an unpacked NCCL (include/, lib/) to use instead of downloading
#   GIN_BUILD_DIR             build directory (default: build-gin, ignored by git)
#   CMAKE_CUDA_ARCHITECTURES  GPU targets (default 90)
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${GIN_BUILD_DIR:-build-gin}
version=${GIN_NCCL_VERSION:-2.32.3}
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi

root=${GIN_NCCL_ROOT:-}
if [ -z "$root" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "check-gin: downloading nvidia-nccl-cu13==$version"
  python3 -m pip download --quiet --no-deps "nvidia-nccl-cu13==$version" -d "$tmp/wheel"
  python3 -m zipfile -e "$tmp"/wheel/*.whl "$tmp/unpacked"
  root=$tmp/unpacked/nvidia/nccl
fi

# A fresh configure of the NCCL paths: they are cached (docs/scale-out.md "Finding NCCL"). With
# a downloaded wheel the build directory is for this check only (the wheel is deleted at exit).
mkdir -p "$build_dir"
log=$build_dir/check-gin-configure.log
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DEPCOMM_WERROR=ON \
  -DCMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-90}" -DEPCOMM_NCCL=ON \
  -DEPCOMM_NCCL_ROOT="$root" -UEPCOMM_NCCL_INCLUDE_DIR -UEPCOMM_NCCL_LIBRARY | tee "$log"
if ! grep -q "rail transports: nccl (host API, default), gin" "$log"; then
  echo "check-gin: FAILED: the configure did not build the GIN backend (see above)" >&2
  exit 1
fi
cmake --build "$build_dir" -j "$(nproc)" --target epcomm_nccl unit_tests nccl_gin
echo "check-gin: OK: the GIN backend compiles against NCCL $version (compile only; never run)"
