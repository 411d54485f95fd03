#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs a build tree into a temporary prefix and builds consumer projects against it:
#   1. CMake, core only: find_package(epcomm) with MPI made unfindable
#      (-DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON), linking epcomm::epcomm;
#   2. CMake, find_package(epcomm COMPONENTS mpi), linking epcomm::epcomm_mpi;
#   3. pkg-config: epcomm and epcomm-mpi;
#   4. for a shared build (BUILD_SHARED_LIBS=ON): the SONAME, and that libepcomm.so /
#      libepcomm_mpi.so export the public API and nothing internal (nm -D).
#
#   BUILD_DIR=build scripts/check-install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prefix="$work/install"
cmake --install "$BUILD_DIR" --prefix "$prefix" >/dev/null
libdir=$(sed -n 's/^CMAKE_INSTALL_LIBDIR:[A-Z]*=//p' "$BUILD_DIR/CMakeCache.txt")
libdir="$prefix/${libdir:-lib}"

# --- 1 + 2: CMake consumers ------------------------------------------------------------------
mkdir -p "$work/core" "$work/mpi"
cat > "$work/core/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.24)
project(epcomm_core_consumer LANGUAGES CXX)
find_package(epcomm 0.1 REQUIRED)
if(TARGET epcomm::epcomm_mpi)
  message(FATAL_ERROR "the core-only consumer got epcomm::epcomm_mpi")
endif()
message(STATUS "epcomm ${epcomm_VERSION}: CUDA architectures ${epcomm_CUDA_ARCHITECTURES}")
add_executable(consumer main.cpp)
target_link_libraries(consumer PRIVATE epcomm::epcomm)
CMAKE
cat > "$work/core/main.cpp" <<'CPP'
#include <cstdio>
#include <string>

#include "epcomm/epcomm.hpp"

int main() {
  epcomm::BufferConfig config;
  epcomm::ResolvedConfig resolved = epcomm::resolveConfig(config, 2);
  std::string logged;
  epcomm::setLogCallback([&](epcomm::LogLevel, const std::string& line) { logged = line; });
  try {
    epcomm::BufferConfig bad;
    bad.hidden = 100;
    epcomm::resolveConfig(bad, 2);
    return 1;
  } catch (const epcomm::InvalidArgument& e) {  // type info crosses the library boundary
    std::printf("InvalidArgument caught: %.40s...\n", e.what());
  }
  epcomm::clearLogCallback();
  std::printf("epcomm %s (headers %s): hidden %d, timeout %.1f s\n", epcomm::versionString(),
              EPCOMM_VERSION_STRING, resolved.config.hidden, resolved.config.timeout_s);
  return std::string(epcomm::versionString()) == EPCOMM_VERSION_STRING ? 0 : 1;
}
CPP
cat > "$work/mpi/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.24)
project(epcomm_mpi_consumer LANGUAGES CXX)
find_package(epcomm 0.1 REQUIRED COMPONENTS mpi)
add_executable(consumer main.cpp)
target_link_libraries(consumer PRIVATE epcomm::epcomm_mpi)
CMAKE
cat > "$work/mpi/main.cpp" <<'CPP'
#include <cstdio>

#include "epcomm/epcomm.hpp"
#include "epcomm/mpi_bootstrap.hpp"

int main(int argc, char** argv) {
  // Links MpiBootstrap without running MPI (CI may run as root without mpirun).
  if (argc > 1) {
    MPI_Init(&argc, &argv);
    {
      epcomm::MpiBootstrap bootstrap(MPI_COMM_WORLD);
      std::printf("rank %d of %d\n", bootstrap.rank(), bootstrap.size());
    }
    MPI_Finalize();
  }
  std::printf("epcomm %s with the MPI bootstrap\n", epcomm::versionString());
  return 0;
}
CPP

cmake -S "$work/core" -B "$work/core/build" -DCMAKE_PREFIX_PATH="$prefix" \
  -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON > "$work/core.log" 2>&1 ||
  { cat "$work/core.log"; echo "check-install: core-only consumer failed to configure" >&2; exit 1; }
grep "CUDA architectures" "$work/core.log" | sed 's/^-- /check-install: /'
cmake --build "$work/core/build" > "$work/core-build.log" 2>&1 ||
  { cat "$work/core-build.log"; exit 1; }
LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$work/core/build/consumer"
echo "check-install: core-only consumer (find_package(epcomm), MPI not findable) built and ran"

cmake -S "$work/mpi" -B "$work/mpi/build" -DCMAKE_PREFIX_PATH="$prefix" > "$work/mpi.log" 2>&1 ||
  { cat "$work/mpi.log"; echo "check-install: mpi consumer failed to configure" >&2; exit 1; }
cmake --build "$work/mpi/build" > "$work/mpi-build.log" 2>&1 || { cat "$work/mpi-build.log"; exit 1; }
LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$work/mpi/build/consumer"
echo "check-install: find_package(epcomm COMPONENTS mpi) consumer built and ran"

# An unknown component is refused.
mkdir -p "$work/bad"
printf 'cmake_minimum_required(VERSION 3.24)\nproject(bad LANGUAGES CXX)\nfind_package(epcomm REQUIRED COMPONENTS nosuch)\n' \
  > "$work/bad/CMakeLists.txt"
if cmake -S "$work/bad" -B "$work/bad/build" -DCMAKE_PREFIX_PATH="$prefix" > "$work/bad.log" 2>&1; then
  echo "check-install: find_package(epcomm COMPONENTS nosuch) succeeded" >&2
  exit 1
fi

# --- 3: pkg-config ---------------------------------------------------------------------------
if command -v pkg-config >/dev/null 2>&1; then
  export PKG_CONFIG_PATH="$libdir/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
  echo "check-install: pkg-config epcomm $(pkg-config --modversion epcomm)," \
       "cuda_architectures=$(pkg-config --variable=cuda_architectures epcomm)"
  # shellcheck disable=SC2046
  c++ -std=c++17 "$work/core/main.cpp" -o "$work/pc-core" $(pkg-config --cflags --libs epcomm)
  LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$work/pc-core" > /dev/null
  if [ -f "$libdir/pkgconfig/epcomm-mpi.pc" ]; then
    # shellcheck disable=SC2046
    c++ -std=c++17 "$work/mpi/main.cpp" -o "$work/pc-mpi" $(pkg-config --cflags --libs epcomm-mpi)
    LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$work/pc-mpi" > /dev/null
  fi
  echo "check-install: pkg-config consumers (epcomm, epcomm-mpi) built and ran"
else
  echo "check-install: pkg-config not installed; pkg-config consumers not checked"
fi

# --- 4: shared libraries: SONAME and exported symbols ----------------------------------------
if ls "$libdir"/libepcomm.so* > /dev/null 2>&1; then
  for lib in epcomm epcomm_mpi; do
    so="$libdir/lib$lib.so"
    [ -e "$so" ] || continue
    soname=$(objdump -p "$so" | awk '/SONAME/ {print $2}')
    echo "check-install: lib$lib.so SONAME $soname"
    case "$soname" in
      "lib$lib.so."[0-9]*) ;;
      *) echo "check-install: lib$lib.so has no versioned SONAME" >&2; exit 1 ;;
    esac
    # Defined dynamic symbols, demangled. Everything of epcomm must be public API: no internal
    # namespaces, no anonymous namespaces, of epcomm::detail only the helpers that
    # libepcomm_mpi needs (src/check.hpp, src/log_internal.hpp), and of epcomm::core only the
    # cross-node topology and the scale-out factory that libepcomm_nccl needs
    # (src/core/topology.hpp, src/core/scale_out.hpp).
    nm -D --defined-only -C "$so" | awk '{ $1 = ""; $2 = ""; sub(/^  /, ""); print }' > "$work/$lib.syms"
    bad=$(grep -E 'epcomm::' "$work/$lib.syms" |
          grep -E 'epcomm::(memory|kernels|bench|test)::|anonymous namespace|::Impl::|DriverApi|SymmetricMemory|computeBufferLayout|launch[A-Z]' |
          grep -vE '^(typeinfo|vtable|VTT)' || true)
    detail=$(grep -E '(^|[ :])epcomm::detail::' "$work/$lib.syms" |
             grep -vE 'epcomm::detail::(setProcessRank|processRank|formatMessage|throwCuda|throwDriver|throwSystem|throwError|logWarning|logEnabled|logMessage)\(' || true)
    detail+=$(grep -E '(^|[ :])epcomm::core::' "$work/$lib.syms" |
              grep -vE 'epcomm::core::(Topology::|nodeKeySourceName|hostIdOverride|fabricDomainKeyText|localNodeKey|buildTopology|discoverTopology|pickRailId|setScaleOutFactory|hasScaleOutFactory|createScaleOut)' || true)
    if [ -n "$bad$detail" ]; then
      echo "check-install: lib$lib.so exports internal symbols:" >&2
      printf '%s\n%s\n' "$bad" "$detail" | sed '/^$/d' | head -20 >&2
      exit 1
    fi
    public=$(grep -cE 'epcomm::' "$work/$lib.syms" || true)
    echo "check-install: lib$lib.so exports $public epcomm symbols, none internal"
  done
  grep -q 'epcomm::EpBuffer::EpBuffer' "$work/epcomm.syms" ||
    { echo "check-install: libepcomm.so does not export EpBuffer" >&2; exit 1; }
fi
echo "check-install: OK"
