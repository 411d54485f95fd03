// Internal check macros. Each one stringizes the failing call, adds file:line, this process's rank
// and the error name, and throws the matching epcomm::Error subclass. The *_LOG variants only
// print, for destructors and cleanup paths that must not throw.
#pragma once

#include <cuda_runtime_api.h>

#include <sstream>
#include <string>

#include "epcomm/error.hpp"

namespace epcomm::detail {

// The rank printed in messages; set by the bootstrap (-1 until known).
void setProcessRank(int rank);
int processRank();

// "[epcomm rank 3] <what> (src/buffer.cpp:120)".
std::string formatMessage(const std::string& what, const char* file, int line);

[[noreturn]] void throwCuda(cudaError_t status, const char* call, const char* file, int line);
[[noreturn]] void throwDriver(int status, const char* call, const char* file, int line);
[[noreturn]] void throwSystem(int err, const char* call, const char* file, int line);
[[noreturn]] void throwError(ErrorCode code, const std::string& what, const char* file, int line);
void logWarning(const std::string& what, const char* file, int line);

}  // namespace epcomm::detail

#define EPCOMM_CUDA_CHECK(call)                                                  \
  do {                                                                           \
    cudaError_t epcomm_status_ = (call);                                         \
    if (epcomm_status_ != cudaSuccess)                                           \
      ::epcomm::detail::throwCuda(epcomm_status_, #call, __FILE__, __LINE__);    \
  } while (0)

// Logs instead of throwing; clears the sticky error state of non-fatal errors.
#define EPCOMM_CUDA_LOG(call)                                                           \
  do {                                                                                  \
    cudaError_t epcomm_status_ = (call);                                                \
    if (epcomm_status_ != cudaSuccess) {                                                \
      ::epcomm::detail::logWarning(std::string(#call) + " failed: " +                   \
                                       cudaGetErrorName(epcomm_status_),                \
                                   __FILE__, __LINE__);                                 \
      (void)cudaGetLastError();                                                         \
    }                                                                                   \
  } while (0)

// After every <<<>>> launch.
#define EPCOMM_LAUNCH_CHECK(kernel_name) EPCOMM_CUDA_CHECK(cudaGetLastError())

// Throws `code` with a streamed message when `cond` is false.
#define EPCOMM_CHECK_CODE(cond, code, msg)                                      \
  do {                                                                          \
    if (!(cond)) {                                                              \
      std::ostringstream epcomm_os_;                                            \
      epcomm_os_ << msg;                                                        \
      ::epcomm::detail::throwError((code), epcomm_os_.str(), __FILE__, __LINE__); \
    }                                                                           \
  } while (0)

#define EPCOMM_CHECK(cond, msg) EPCOMM_CHECK_CODE(cond, ::epcomm::ErrorCode::kInternal, msg)

// Argument check: names the argument, its value and the limit.
#define EPCOMM_ARG_CHECK(cond, arg, value, limit)                                       \
  EPCOMM_CHECK_CODE(cond, ::epcomm::ErrorCode::kInvalidArgument,                        \
                    "invalid argument " << arg << " = " << value << ": must be " << limit)

#define EPCOMM_SYS_CHECK(call)                                                  \
  do {                                                                          \
    if ((call) < 0) ::epcomm::detail::throwSystem(errno, #call, __FILE__, __LINE__); \
  } while (0)
