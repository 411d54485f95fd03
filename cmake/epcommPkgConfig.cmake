# SPDX-License-Identifier: Apache-2.0
# pkg-config files: epcomm.pc (core) and epcomm-mpi.pc (MPI bootstrap). They are relocatable
# (prefix from ${pcfiledir}); the CUDA runtime and MPI flags are the absolute paths this build used.

file(RELATIVE_PATH EPCOMM_PC_PREFIX_FROM_PCDIR
  "/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/")
string(REGEX REPLACE "/$" "" EPCOMM_PC_PREFIX_FROM_PCDIR "${EPCOMM_PC_PREFIX_FROM_PCDIR}")

set(EPCOMM_PC_CUDA_CFLAGS "")
foreach(dir IN LISTS CUDAToolkit_INCLUDE_DIRS)
  string(APPEND EPCOMM_PC_CUDA_CFLAGS " -I${dir}")
endforeach()
set(EPCOMM_PC_CUDA_LIBS "-L${CUDAToolkit_LIBRARY_DIR} -lcudart")
string(REPLACE ";" " " EPCOMM_PC_CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}")
if(BUILD_SHARED_LIBS)
  # The shared library records its own dependency on libcudart.so.
  set(EPCOMM_PC_LIBS "-L\${libdir} -lepcomm")
  set(EPCOMM_PC_LIBS_PRIVATE "${EPCOMM_PC_CUDA_LIBS}")
else()
  set(EPCOMM_PC_LIBS "-L\${libdir} -lepcomm ${EPCOMM_PC_CUDA_LIBS}")
  set(EPCOMM_PC_LIBS_PRIVATE "-lstdc++ -lpthread -ldl -lrt")
endif()
configure_file(${CMAKE_CURRENT_LIST_DIR}/epcomm.pc.in
  ${PROJECT_BINARY_DIR}/pkgconfig/epcomm.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/pkgconfig/epcomm.pc
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)

if(EPCOMM_BUILD_MPI)
  set(EPCOMM_PC_MPI_CFLAGS "")
  foreach(dir IN LISTS MPI_CXX_INCLUDE_DIRS)
    string(APPEND EPCOMM_PC_MPI_CFLAGS " -I${dir}")
  endforeach()
  foreach(flag IN LISTS MPI_CXX_COMPILE_OPTIONS)
    string(APPEND EPCOMM_PC_MPI_CFLAGS " ${flag}")
  endforeach()
  set(EPCOMM_PC_MPI_LIBS "")
  foreach(lib IN LISTS MPI_CXX_LIBRARIES)
    string(APPEND EPCOMM_PC_MPI_LIBS " ${lib}")
  endforeach()
  configure_file(${CMAKE_CURRENT_LIST_DIR}/epcomm-mpi.pc.in
    ${PROJECT_BINARY_DIR}/pkgconfig/epcomm-mpi.pc @ONLY)
  install(FILES ${PROJECT_BINARY_DIR}/pkgconfig/epcomm-mpi.pc
    DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
endif()
