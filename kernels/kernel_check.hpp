// SPDX-License-Identifier: Apache-2.0
// The kernels' own check macros (host side of the .cu files), so that kernels/ includes nothing
// from src/. A failed launch or call throws epcomm::CudaError with the call, file:line and rank,
// like the library's EPCOMM_CUDA_CHECK.
#pragma once

#include <cuda_runtime_api.h>

#include "epcomm/export.hpp"

namespace epcomm::detail {
// Defined in src/error.cpp (declared for the library in src/check.hpp).
[[noreturn]] EPCOMM_API void throwCuda(cudaError_t status, const char* call, const char* file,
                                       int line);
}  // namespace epcomm::detail

// After every <<<>>> launch: the error names the kernel ("launch of htDispatchKernel failed: ...").
#define EPCOMM_KERNEL_LAUNCH_CHECK(kernel_name)                                                   \
  do {                                                                                            \
    cudaError_t epcomm_status_ = cudaGetLastError();                                              \
    if (epcomm_status_ != cudaSuccess)                                                            \
      ::epcomm::detail::throwCuda(epcomm_status_, "launch of " #kernel_name, __FILE__, __LINE__); \
  } while (0)

#define EPCOMM_KERNEL_CUDA_CHECK(call)                                        \
  do {                                                                        \
    cudaError_t epcomm_status_ = (call);                                      \
    if (epcomm_status_ != cudaSuccess)                                        \
      ::epcomm::detail::throwCuda(epcomm_status_, #call, __FILE__, __LINE__); \
  } while (0)
