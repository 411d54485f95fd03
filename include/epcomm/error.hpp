// epcomm error hierarchy.
//
// Every failure the library reports is an epcomm::Error (a std::runtime_error) carrying an
// ErrorCode. Messages name the failing call or argument, the rank, file:line and what to do next.
#pragma once

#include <stdexcept>
#include <string>

namespace epcomm {

enum class ErrorCode {
  kInternal = 1,     // a bug in epcomm or a broken invariant
  kCuda,             // CUDA runtime API failure
  kDriver,           // CUDA driver API failure (cu*)
  kMpi,              // MPI failure
  kSystem,           // operating-system call failure (sockets, fds)
  kTimeout,          // a deadline expired (device spin-wait or host wait)
  kInvalidArgument,  // bad input, rejected before any kernel ran
  kUnsupported,      // the machine cannot do what was asked (e.g. a forced memory mode)
  kRemote,           // another rank failed; this rank stopped to avoid a hang
  kBroken,           // the EpBuffer is unusable after an earlier error; recreate it
};

// Stable name such as "InvalidArgument".
const char* errorCodeName(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message);
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

class CudaError : public Error {
 public:
  CudaError(int status, const std::string& message)
      : Error(ErrorCode::kCuda, message), status_(status) {}
  int status() const noexcept { return status_; }  // the cudaError_t value

 private:
  int status_;
};

class DriverError : public Error {
 public:
  DriverError(int status, const std::string& message)
      : Error(ErrorCode::kDriver, message), status_(status) {}
  int status() const noexcept { return status_; }  // the CUresult value

 private:
  int status_;
};

class MpiError : public Error {
 public:
  MpiError(int status, const std::string& message)
      : Error(ErrorCode::kMpi, message), status_(status) {}
  int status() const noexcept { return status_; }

 private:
  int status_;
};

class SystemError : public Error {
 public:
  SystemError(int err, const std::string& message)
      : Error(ErrorCode::kSystem, message), errno_(err) {}
  int errnoValue() const noexcept { return errno_; }

 private:
  int errno_;
};

// A wait that passed its deadline. peer() is the rank that never answered (-1 if unknown).
class TimeoutError : public Error {
 public:
  TimeoutError(int peer, const std::string& message)
      : Error(ErrorCode::kTimeout, message), peer_(peer) {}
  int peer() const noexcept { return peer_; }

 private:
  int peer_;
};

class InvalidArgument : public Error {
 public:
  explicit InvalidArgument(const std::string& message)
      : Error(ErrorCode::kInvalidArgument, message) {}
};

}  // namespace epcomm
