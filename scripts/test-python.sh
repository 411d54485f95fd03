#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the Python wheel (pip wheel .), installs it into a fresh virtual environment and runs
# the pytest suite (tests/python). Without a GPU the GPU tests are reported as skipped.
#
#   scripts/test-python.sh [extra pytest arguments, e.g. -k host]
#
# Environment:
#   PYTHON            interpreter for the venv (default python3)
#   PY_VENV           venv folder, recreated on every run (default build-python/venv)
#   PY_SYSTEM_SITE=1  the venv also sees the interpreter's packages, or its venv's when PYTHON is
#                     in a venv (torch, mpi4py, nanobind on a GPU machine); without it GPU tests
#                     that need torch are skipped
#   PY_NO_BUILD_ISOLATION=1  build with the venv's scikit-build-core and nanobind instead of an
#                     isolated build environment downloaded from PyPI (offline machines)
#   PIP_NO_INDEX=1 PIP_FIND_LINKS=<dir>  pip's own switches for a local wheelhouse (offline)
#   EPCOMM_CUDA_ARCHS CUDA architectures of the wheel (default: CMAKE_CUDA_ARCHITECTURES, else 90)
#   EPCOMM_WERROR=ON  warnings are errors in the module's build; CMAKE_ARGS extra CMake arguments
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PYTHON=${PYTHON:-python3}
PY_VENV=${PY_VENV:-$root/build-python/venv}
wheel_dir=$root/build-python/wheel
export EPCOMM_CUDA_ARCHS=${EPCOMM_CUDA_ARCHS:-${CMAKE_CUDA_ARCHITECTURES:-90}}

if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export NCCL_NVLS_ENABLE=0
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
if [ -z "${CMAKE_ARGS:-}" ] && command -v ccache > /dev/null; then
  export CMAKE_ARGS="-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"
fi
export CMAKE_ARGS="${CMAKE_ARGS:-} -DEPCOMM_WERROR=${EPCOMM_WERROR:-OFF}"

rm -rf "$PY_VENV" "$wheel_dir"
venv_args=()
if [ "${PY_SYSTEM_SITE:-0}" = 1 ]; then venv_args+=(--system-site-packages); fi
"$PYTHON" -m venv "${venv_args[@]}" "$PY_VENV"
py=$PY_VENV/bin/python
if [ "${PY_SYSTEM_SITE:-0}" = 1 ]; then
  # An interpreter that is itself a venv (torch in /opt/torch/.venv on the GPU machines): a venv
  # made from it sees its base interpreter's packages, not the venv's; a .pth file adds them.
  "$PYTHON" -c 'import site, sys; print("\n".join(site.getsitepackages()) if sys.prefix != sys.base_prefix else "")' \
    > "$("$py" -c 'import site; print(site.getsitepackages()[0])')/parent-venv.pth"
fi

# pip downloads nothing for a requirement the venv (or, with PY_SYSTEM_SITE=1, the system)
# already satisfies.
"$py" -m pip install -q pytest numpy
build_args=()
if [ "${PY_NO_BUILD_ISOLATION:-0}" = 1 ]; then
  "$py" -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.2"
  build_args+=(--no-build-isolation)
fi

"$py" -m pip wheel -q --no-deps "${build_args[@]}" -w "$wheel_dir" .
wheel=$(ls "$wheel_dir"/epcomm-*.whl)
"$py" -m pip install -q --no-deps --force-reinstall "$wheel"
echo "test-python.sh: installed $(basename "$wheel") into $PY_VENV"

# From outside the source tree, so the installed package is the one imported.
run_dir=$(mktemp -d)
trap 'rm -rf "$run_dir"' EXIT
cd "$run_dir"
"$py" -c "import epcomm, sys; print('test-python.sh: epcomm', epcomm.__version__, \
epcomm.git_describe, 'from', epcomm.__file__, '-', epcomm.device_count(), 'CUDA device(s)')"
set +e
"$py" -m pytest "$root/tests/python" -ra -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "test-python.sh: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
