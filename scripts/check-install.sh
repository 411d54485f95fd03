#!/usr/bin/env bash
# Installs the build tree into a temporary prefix and builds a tiny consumer project against it
# with find_package(epcomm), proving the package config works.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
cmake --install "$BUILD_DIR" --prefix "$prefix/install" >/dev/null
mkdir -p "$prefix/consumer"
cat > "$prefix/consumer/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.24)
project(epcomm_consumer LANGUAGES CXX)
find_package(epcomm REQUIRED)
add_executable(consumer main.cpp)
target_link_libraries(consumer PRIVATE epcomm::epcomm_mpi)
CMAKE
cat > "$prefix/consumer/main.cpp" <<'CPP'
#include <cstdio>
#include "epcomm/epcomm.hpp"
#include "epcomm/mpi_bootstrap.hpp"
int main() {
  epcomm::BufferConfig config;
  epcomm::ResolvedConfig resolved = epcomm::resolveConfig(config, 2);
  std::printf("epcomm %s: hidden %d, timeout %.1f s\n", epcomm::versionString(),
              resolved.config.hidden, resolved.config.timeout_s);
  return 0;
}
CPP
cmake -S "$prefix/consumer" -B "$prefix/consumer/build" -DCMAKE_PREFIX_PATH="$prefix/install" >/dev/null
cmake --build "$prefix/consumer/build" -j "$(nproc)" >/dev/null
"$prefix/consumer/build/consumer"
echo "check-install: find_package(epcomm) consumer built and ran"
