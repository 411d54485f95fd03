// SPDX-License-Identifier: Apache-2.0
// Internal check macros. Each one stringizes the failing call, adds file:line, this process's rank
// and the error name, and throws the matching epcomm::Error subclass. The *_LOG variants only
// print, for destructors and cleanup paths that must not throw.
//
// The thrower functions are defined in libepcomm (src/error.cpp); code outside the library that
// uses these macros (tests, ep_bench) links epcomm.
#pragma once

#include <cuda_runtime_api.h>

#include <cerrno>
#include <sstream>
#include <string>

#include "epcomm/error.hpp"
#include "epcomm/export.hpp"

namespace epcomm::detail {

// These helpers are exported (EPCOMM_API) only because libepcomm_mpi, the tests and ep_bench use
// them too; they are not part of the public API.

// The rank printed in messages; set by the bootstrap (-1 until known).
EPCOMM_API void setProcessRank(int rank);
EPCOMM_API int processRank();

// "[epcomm rank 3] <what> (src/buffer.cpp:120)".
EPCOMM_API std::string formatMessage(const std::string& what, const char* file, int line);

[[noreturn]] EPCOMM_API void throwCuda(cudaError_t status, const char* call, const char* file,
                                       int line);
[[noreturn]] EPCOMM_API void throwDriver(int status, const char* call, const char* file, int line);
[[noreturn]] EPCOMM_API void throwSystem(int err, const char* call, const char* file, int line);
[[noreturn]] EPCOMM_API void throwError(ErrorCode code, const std::string& what, const char* file,
                                        int line);
// A warning through the logger (epcomm/log.hpp): "[epcomm rank 3] warning: <what> (file:line)".
EPCOMM_API void logWarning(const std::string& what, const char* file, int line);

}  // namespace epcomm::detail

#define EPCOMM_CUDA_CHECK(call)                                               \
  do {                                                                        \
    cudaError_t epcomm_status_ = (call);                                      \
    if (epcomm_status_ != cudaSuccess)                                        \
      ::epcomm::detail::throwCuda(epcomm_status_, #call, __FILE__, __LINE__); \
  } while (0)

// Logs instead of throwing; clears the sticky error state of non-fatal errors.
#define EPCOMM_CUDA_LOG(call)                                                            \
  do {                                                                                   \
    cudaError_t epcomm_status_ = (call);                                                 \
    if (epcomm_status_ != cudaSuccess) {                                                 \
      ::epcomm::detail::logWarning(                                                      \
          std::string(#call) + " failed: " + cudaGetErrorName(epcomm_status_), __FILE__, \
          __LINE__);                                                                     \
      (void)cudaGetLastError();                                                          \
    }                                                                                    \
  } while (0)

// After every <<<>>> launch: the error names the kernel ("launch of htDispatchKernel failed: ...").
#define EPCOMM_LAUNCH_CHECK(kernel_name)                                                          \
  do {                                                                                            \
    cudaError_t epcomm_status_ = cudaGetLastError();                                              \
    if (epcomm_status_ != cudaSuccess)                                                            \
      ::epcomm::detail::throwCuda(epcomm_status_, "launch of " #kernel_name, __FILE__, __LINE__); \
  } while (0)

// Throws `code` with a streamed message when `cond` is false.
#define EPCOMM_CHECK_CODE(cond, code, msg)                                        \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::ostringstream epcomm_os_;                                              \
      epcomm_os_ << msg;                                                          \
      ::epcomm::detail::throwError((code), epcomm_os_.str(), __FILE__, __LINE__); \
    }                                                                             \
  } while (0)

#define EPCOMM_CHECK(cond, msg) EPCOMM_CHECK_CODE(cond, ::epcomm::ErrorCode::kInternal, msg)

// Argument check: names the argument, its value and the limit.
#define EPCOMM_ARG_CHECK(cond, arg, value, limit)                \
  EPCOMM_CHECK_CODE(cond, ::epcomm::ErrorCode::kInvalidArgument, \
                    "invalid argument " << arg << " = " << value << ": must be " << limit)

#define EPCOMM_SYS_CHECK(call)                                                       \
  do {                                                                               \
    if ((call) < 0) ::epcomm::detail::throwSystem(errno, #call, __FILE__, __LINE__); \
  } while (0)
