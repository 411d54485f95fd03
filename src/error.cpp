// SPDX-License-Identifier: Apache-2.0
#include <atomic>
#include <cstdio>
#include <cstring>

#include "check.hpp"
#include "memory/driver_api.hpp"

namespace epcomm {

const char* errorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInternal:
      return "Internal";
    case ErrorCode::kCuda:
      return "Cuda";
    case ErrorCode::kDriver:
      return "Driver";
    case ErrorCode::kMpi:
      return "Mpi";
    case ErrorCode::kSystem:
      return "System";
    case ErrorCode::kTimeout:
      return "Timeout";
    case ErrorCode::kInvalidArgument:
      return "InvalidArgument";
    case ErrorCode::kUnsupported:
      return "Unsupported";
    case ErrorCode::kRemote:
      return "Remote";
    case ErrorCode::kBroken:
      return "Broken";
  }
  return "Unknown";
}

Error::Error(ErrorCode code, const std::string& message)
    : std::runtime_error(message), code_(code) {}

namespace detail {
namespace {
std::atomic<int> g_process_rank{-1};
}  // namespace

void setProcessRank(int rank) {
  g_process_rank.store(rank);
}
int processRank() {
  return g_process_rank.load();
}

std::string formatMessage(const std::string& what, const char* file, int line) {
  std::string prefix = "[epcomm";
  int rank = processRank();
  if (rank >= 0) prefix += " rank " + std::to_string(rank);
  prefix += "] ";
  // Keep the last folder so "src/buffer.cpp" and "kernels/intranode.cu" stay distinguishable.
  std::string where = file;
  size_t last = where.rfind('/');
  if (last != std::string::npos && last > 0) {
    size_t prev = where.rfind('/', last - 1);
    if (prev != std::string::npos) where = where.substr(prev + 1);
  }
  return prefix + what + " (" + where + ":" + std::to_string(line) + ")";
}

void throwCuda(cudaError_t status, const char* call, const char* file, int line) {
  std::string what = std::string(call) + " failed: " + cudaGetErrorName(status) + " (" +
                     cudaGetErrorString(status) + ")";
  if (status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver) {
    what += ". Is a CUDA GPU visible (nvidia-smi, CUDA_VISIBLE_DEVICES)?";
  } else if (status == cudaErrorNoKernelImageForDevice) {
    what +=
        ". The library was not compiled for this GPU's architecture: rebuild with its "
        "compute capability in CMAKE_CUDA_ARCHITECTURES";
  }
  (void)cudaGetLastError();  // clear non-sticky errors so the caller may continue
  throw CudaError(static_cast<int>(status), formatMessage(what, file, line));
}

void throwDriver(int status, const char* call, const char* file, int line) {
  std::string what = std::string(call) + " failed: " + driverErrorName(status);
  throw DriverError(status, formatMessage(what, file, line));
}

void throwSystem(int err, const char* call, const char* file, int line) {
  std::string what =
      std::string(call) + " failed: " + std::strerror(err) + " (errno " + std::to_string(err) + ")";
  throw SystemError(err, formatMessage(what, file, line));
}

void throwError(ErrorCode code, const std::string& what, const char* file, int line) {
  std::string message = formatMessage(what, file, line);
  switch (code) {
    case ErrorCode::kInvalidArgument:
      throw InvalidArgument(message);
    case ErrorCode::kTimeout:
      throw TimeoutError(-1, message);
    default:
      throw Error(code, message);
  }
}

void logWarning(const std::string& what, const char* file, int line) {
  logMessage(LogLevel::kWarn, what, file, line);
}

}  // namespace detail
}  // namespace epcomm
