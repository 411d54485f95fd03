#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds ep_bench (Release; the benchmark only, no tests) and runs it with one MPI rank per
# visible GPU. Works as the first command on a fresh machine: missing build dependencies are
# installed as root on Debian/Ubuntu (scripts/deps.sh), and nothing is downloaded when they are
# already there.
#
#   scripts/bench.sh [ep_bench options...]      e.g. scripts/bench.sh --sms 24,32 --json out.json
#   scripts/bench.sh --help                     this text and ep_bench's options (no GPU needed)
#
# Environment:
#   BUILD_DIR                 build directory (default: <repo>/build, shared with test.sh)
#   CMAKE_CUDA_ARCHITECTURES  GPU targets to compile for (default: the project's, 90;100)
#   EPCOMM_CMAKE_ARGS         extra CMake arguments
#   EPCOMM_BENCH_NP           ranks to launch (default: the number of visible GPUs)
#   EPCOMM_COMMIT             printed in the setup block (default: git rev-parse --short HEAD)
# docs/benchmarks.md explains every option and every number.
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${BUILD_DIR:-${repo_dir}/build}"
bench_bin="${build_dir}/bench/ep_bench"

usage() {
  sed -n '3,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

build_bench() {
  # shellcheck source=scripts/deps.sh
  source "${repo_dir}/scripts/deps.sh"
  deps_main core mpi bench
  local cmake_args=(-S "${repo_dir}" -B "${build_dir}" -DCMAKE_BUILD_TYPE=Release
                    -DEPCOMM_BUILD_TESTS=OFF -DEPCOMM_BUILD_BENCH=ON)
  if [[ -n "${CMAKE_CUDA_ARCHITECTURES:-}" ]]; then
    cmake_args+=("-DCMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES}")
  fi
  # shellcheck disable=SC2206
  cmake_args+=(${EPCOMM_CMAKE_ARGS:-})
  cmake "${cmake_args[@]}"
  cmake --build "${build_dir}" --target ep_bench -j"$(nproc)"
}

# --help: the script's usage, then ep_bench's own options. ep_bench parses its command line before
# it touches MPI or a GPU, so this works on any machine; without a build, ep_bench is built first
# (the benchmark target only, a few minutes).
for arg in "$@"; do
  if [[ "${arg}" == "-h" || "${arg}" == "--help" ]]; then
    usage
    echo
    if [[ ! -x "${bench_bin}" ]]; then
      echo "scripts/bench.sh: building ep_bench to show its options (no GPU needed)..." >&2
      mkdir -p "${build_dir}"
      if ! build_bench > "${build_dir}/help-build.log" 2>&1; then
        echo "scripts/bench.sh: could not build ep_bench (log: ${build_dir}/help-build.log);" \
             "its options are described in docs/benchmarks.md" >&2
        exit 0
      fi
    fi
    exec "${bench_bin}" --help
  fi
done

# Count the GPUs first: no point building on a machine that cannot run the benchmark.
if ! command -v nvidia-smi > /dev/null 2>&1; then
  echo "scripts/bench.sh: nvidia-smi not found; ep_bench needs NVIDIA GPUs (one rank per GPU)" >&2
  exit 2
fi
num_gpus="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU ' || true)"
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  # nvidia-smi lists every GPU; CUDA only sees the ones named here.
  IFS=',' read -r -a visible <<< "${CUDA_VISIBLE_DEVICES}"
  if (( ${#visible[@]} < num_gpus )); then num_gpus=${#visible[@]}; fi
fi
if [[ -z "${num_gpus}" || "${num_gpus}" -eq 0 ]]; then
  echo "scripts/bench.sh: no GPU visible (nvidia-smi -L lists none); ep_bench needs one GPU per" \
       "rank" >&2
  exit 2
fi
num_ranks="${EPCOMM_BENCH_NP:-${num_gpus}}"

build_bench

if [[ -z "${EPCOMM_COMMIT:-}" ]]; then
  EPCOMM_COMMIT="$(git -C "${repo_dir}" rev-parse --short HEAD 2> /dev/null || true)"
fi
export EPCOMM_COMMIT
# Never enable NVLink SHARP / multicast for the NCCL baseline (ep_bench also forces it off).
export NCCL_NVLS_ENABLE=0

mpi_args=(-np "${num_ranks}" --bind-to none --oversubscribe
          -x EPCOMM_COMMIT -x NCCL_NVLS_ENABLE)
if [[ "$(id -u)" -eq 0 ]]; then
  mpi_args+=(--allow-run-as-root)
fi
echo "scripts/bench.sh: mpirun ${mpi_args[*]} ${bench_bin} $*" >&2
exec mpirun "${mpi_args[@]}" "${bench_bin}" "$@"
