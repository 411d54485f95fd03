# SPDX-License-Identifier: Apache-2.0
# Finds NCCL for epcomm_nccl (and ep_bench's NCCL baseline) without making it a dependency of the
# core. Sets, all in the cache or as plain variables of the including scope:
#   EPCOMM_NCCL_INCLUDE_DIR, EPCOMM_NCCL_LIBRARY   the header directory and the library beside it
#   EPCOMM_NCCL_VERSION                             "2.28.9", read from nccl.h ("" if not found)
#   EPCOMM_NCCL_FOUND_WHY                           one line: where it was found, or why not
#
# Where it looks, first hit wins:
#   1. EPCOMM_NCCL_ROOT (CMake variable or environment), NCCL_HOME, NCCL_ROOT
#   2. the NCCL Python wheel (nvidia-nccl-cu13 / -cu12: site-packages/nvidia/nccl/{include,lib})
#      of the Python interpreter on PATH, if there is one
#   3. next to the CUDA toolkit, then the system paths (libnccl-dev)
# The wheel ships only libnccl.so.2 (no libnccl.so link), so that name is searched too. The
# library is taken from beside the header found, so two different installs are never mixed.

set(EPCOMM_NCCL_ROOT "$ENV{EPCOMM_NCCL_ROOT}" CACHE PATH
    "An NCCL install or an unpacked NCCL wheel's nvidia/nccl directory (include/, lib/)")

set(_epcomm_nccl_hints "")
foreach(_root IN ITEMS "${EPCOMM_NCCL_ROOT}" "$ENV{NCCL_HOME}" "$ENV{NCCL_ROOT}")
  if(_root)
    list(APPEND _epcomm_nccl_hints "${_root}" "${_root}/nvidia/nccl")
  endif()
endforeach()

# The wheel of the Python on PATH (no error if there is no Python or no wheel).
if(NOT EPCOMM_NCCL_INCLUDE_DIR)
  find_program(EPCOMM_PYTHON_FOR_NCCL NAMES python3 python)
  mark_as_advanced(EPCOMM_PYTHON_FOR_NCCL)
  if(EPCOMM_PYTHON_FOR_NCCL)
    execute_process(
      COMMAND "${EPCOMM_PYTHON_FOR_NCCL}" -c
        "import importlib.util as u; s = u.find_spec('nvidia.nccl'); print(list(s.submodule_search_locations)[0] if s else '')"
      OUTPUT_VARIABLE _epcomm_nccl_wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET
      TIMEOUT 20)
    if(_epcomm_nccl_wheel)
      list(APPEND _epcomm_nccl_hints "${_epcomm_nccl_wheel}")
    endif()
  endif()
endif()

find_path(EPCOMM_NCCL_INCLUDE_DIR nccl.h
  HINTS ${_epcomm_nccl_hints} ${CUDAToolkit_INCLUDE_DIRS}
  PATH_SUFFIXES include)
if(EPCOMM_NCCL_INCLUDE_DIR)
  find_library(EPCOMM_NCCL_LIBRARY NAMES nccl libnccl.so.2
    HINTS "${EPCOMM_NCCL_INCLUDE_DIR}/../lib" "${EPCOMM_NCCL_INCLUDE_DIR}/../lib64"
    NO_DEFAULT_PATH)
  if(NOT EPCOMM_NCCL_LIBRARY)
    find_library(EPCOMM_NCCL_LIBRARY NAMES nccl libnccl.so.2
      HINTS ${_epcomm_nccl_hints} ${CUDAToolkit_LIBRARY_DIR}
      PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu)
  endif()
endif()

set(EPCOMM_NCCL_VERSION "")
if(EPCOMM_NCCL_INCLUDE_DIR AND EXISTS "${EPCOMM_NCCL_INCLUDE_DIR}/nccl.h")
  file(STRINGS "${EPCOMM_NCCL_INCLUDE_DIR}/nccl.h" _epcomm_nccl_defs
    REGEX "^#define NCCL_(MAJOR|MINOR|PATCH) +[0-9]+")
  foreach(_part MAJOR MINOR PATCH)
    set(_epcomm_nccl_${_part} "")
    foreach(_def IN LISTS _epcomm_nccl_defs)
      if(_def MATCHES "^#define NCCL_${_part} +([0-9]+)")
        set(_epcomm_nccl_${_part} "${CMAKE_MATCH_1}")
      endif()
    endforeach()
  endforeach()
  if(NOT _epcomm_nccl_MAJOR STREQUAL "" AND NOT _epcomm_nccl_MINOR STREQUAL "")
    set(EPCOMM_NCCL_VERSION "${_epcomm_nccl_MAJOR}.${_epcomm_nccl_MINOR}.${_epcomm_nccl_PATCH}")
  endif()
endif()

if(NOT EPCOMM_NCCL_INCLUDE_DIR)
  set(EPCOMM_NCCL_FOUND_WHY "no nccl.h (set EPCOMM_NCCL_ROOT to an NCCL install or an unpacked "
                            "nvidia-nccl-cu13 wheel, or install libnccl-dev)")
elseif(NOT EPCOMM_NCCL_LIBRARY)
  set(EPCOMM_NCCL_FOUND_WHY "nccl.h in ${EPCOMM_NCCL_INCLUDE_DIR} but no libnccl beside it")
elseif(EPCOMM_NCCL_VERSION STREQUAL "")
  set(EPCOMM_NCCL_FOUND_WHY "cannot read the version from ${EPCOMM_NCCL_INCLUDE_DIR}/nccl.h")
else()
  set(EPCOMM_NCCL_FOUND_WHY "NCCL ${EPCOMM_NCCL_VERSION}: ${EPCOMM_NCCL_LIBRARY}")
endif()
string(REPLACE ";" "" EPCOMM_NCCL_FOUND_WHY "${EPCOMM_NCCL_FOUND_WHY}")  # the two-part message above
