#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# A/B of ep_bench across source trees in one GPU call: builds each tree's ep_bench (in parallel),
# runs them alternated (tree 1, tree 2, ..., then again) so that the machine's drift hits every
# build alike, and prints scripts/compare_bench.py's table last (each row's median over the runs,
# the other trees as a change against the first). Logs and JSON in $OUT (set by the device tool)
# or ./perf-out: <name>-<run>.log / .json, build-<name>.log; <name> is the tree's folder name.
#
#   scripts/perf-ab.sh TREE...        e.g. scripts/perf-ab.sh .device/main .device/candidate
#
# A tree is a source tree (a folder with this repository's CMakeLists.txt), e.g. one written by
# `git archive REF | tar -x -C .device/NAME` and carried to the GPU machine; the first is the
# base. The tree names must differ.
#
# Environment:
#   AB_RUNS     runs per tree (default 3)
#   AB_ARGS     ep_bench arguments (default: the main table without the NCCL baseline, the
#               expert-major rows, the TMA link rows and the fixed-cost sweep, about 2 s a run)
#   AB_NP       ranks (default: the number of GPUs, one rank per GPU)
#   AB_RUN_SECONDS  limit of one run (default 120)
set -uo pipefail
repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$#" -lt 1 ]; then
  sed -n '3,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
fi
OUT=${OUT:-$PWD/perf-out}
# shellcheck source=scripts/perf-lib.sh
source "$repo_dir/scripts/perf-lib.sh"
perf_setup  # OUT, PATH, deadlines, MPI as root, num_gpus
np=${AB_NP:-${num_gpus:-0}}
if [ "$np" -lt 1 ]; then
  echo "perf-ab.sh: no GPU visible (nvidia-smi -L lists none)" >&2
  exit 2
fi
read -r -a bench_args <<< "${AB_ARGS:---no-nccl --no-expert-major --no-link-bulk --no-fixed-cost}"

names=()
for tree in "$@"; do
  if [ ! -f "$tree/CMakeLists.txt" ]; then
    echo "perf-ab.sh: $tree is not a source tree (no CMakeLists.txt)" >&2
    exit 2
  fi
  name=$(basename "$(cd "$tree" && pwd)")
  for seen in "${names[@]}"; do
    if [ "$seen" = "$name" ]; then
      echo "perf-ab.sh: two trees are named $name" >&2
      exit 2
    fi
  done
  names+=("$name")
done

# Builds, all at once, the cores shared among them.
# shellcheck source=scripts/deps.sh
(source "$repo_dir/scripts/deps.sh" && deps_main core mpi bench) > "$OUT/deps.log" 2>&1
jobs_each=$(( $(nproc) / $# ))
[ "$jobs_each" -ge 1 ] || jobs_each=1
start=$(date +%s)
i=0
for tree in "$@"; do
  name=${names[$i]}
  (cmake -S "$tree" -B "$tree/build-ab" -DCMAKE_BUILD_TYPE=Release -DEPCOMM_BUILD_TESTS=OFF \
     -DEPCOMM_BUILD_BENCH=ON -DCMAKE_CUDA_ARCHITECTURES="$CMAKE_CUDA_ARCHITECTURES" &&
   cmake --build "$tree/build-ab" --target ep_bench -j "$jobs_each") > "$OUT/build-$name.log" 2>&1 &
  i=$((i + 1))
done
failed=0
for job in $(jobs -p); do wait "$job" || failed=1; done
echo "perf-ab.sh: built ${names[*]} in $(( $(date +%s) - start )) s"
if [ "$failed" != 0 ]; then
  echo "perf-ab.sh: a build failed (logs: $OUT/build-*.log)" >&2
  exit 1
fi

for run in $(seq "${AB_RUNS:-3}"); do
  i=0
  for tree in "$@"; do
    name=${names[$i]}
    timeout "${AB_RUN_SECONDS:-120}" mpirun --bind-to none --oversubscribe -np "$np" \
      "$tree/build-ab/bench/ep_bench" \
      "${bench_args[@]}" --json "$OUT/$name-$run.json" > "$OUT/$name-$run.log" 2>&1
    echo "perf-ab.sh: $name run $run rc=$?"
    i=$((i + 1))
  done
done
python3 "$repo_dir/scripts/compare_bench.py" "$OUT" "${names[@]}"
