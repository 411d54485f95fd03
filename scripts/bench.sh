#!/usr/bin/env bash
# Builds ep_bench (Release) and runs it with one MPI rank per visible GPU.
#
#   scripts/bench.sh [ep_bench options...]      e.g. scripts/bench.sh --sms 24,32 --json out.json
#
# Environment:
#   BUILD_DIR                 build directory (default: <repo>/build)
#   CMAKE_CUDA_ARCHITECTURES  GPU targets to compile for (default: the project's)
#   EPCOMM_BENCH_NP           ranks to launch (default: the number of visible GPUs)
#   EPCOMM_COMMIT             printed in the setup block (default: git rev-parse --short HEAD)
# docs/benchmarks.md explains every option and every number.
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${BUILD_DIR:-${repo_dir}/build}"

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

# nvcc lives in /usr/local/cuda/bin on the usual installs; CMake needs it on PATH or CUDACXX.
if ! command -v nvcc > /dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:${PATH}"
fi

cmake_args=(-S "${repo_dir}" -B "${build_dir}" -DCMAKE_BUILD_TYPE=Release)
if [[ -n "${CMAKE_CUDA_ARCHITECTURES:-}" ]]; then
  cmake_args+=("-DCMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES}")
fi
cmake "${cmake_args[@]}"
cmake --build "${build_dir}" --target ep_bench -j"$(nproc)"

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
echo "scripts/bench.sh: mpirun ${mpi_args[*]} ${build_dir}/bench/ep_bench $*" >&2
exec mpirun "${mpi_args[@]}" "${build_dir}/bench/ep_bench" "$@"
