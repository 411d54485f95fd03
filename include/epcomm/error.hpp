// SPDX-License-Identifier: Apache-2.0
// epcomm error hierarchy.
//
// Every failure the library reports is an epcomm::Error (a std::runtime_error) carrying an
// ErrorCode. Messages name the failing call or argument, the rank, file:line and what to do next.
#pragma once

#include <stdexcept>
#include <string>

#include "epcomm/export.hpp"

namespace epcomm {

// After an error thrown by an EpBuffer call, is the buffer still usable? (An EpBuffer whose
// constructor threw does not exist: creation fails on every rank together, see buffer.hpp.)
//   usable    the call did nothing (or was skipped on every rank); go on with the next call
//   broken    every later call throws kBroken; destroy the buffer (collective) and recreate it
enum class ErrorCode {
  kInternal = 1,     // a bug in epcomm or a broken invariant.                     broken
  kCuda,             // CUDA runtime API failure (launch, copy, memory).            broken
  kDriver,           // CUDA driver API failure (cu*); at creation only.            -
  kMpi,              // MPI failure; from the bootstrap, at creation only.         -
  kSystem,           // operating-system call failure (sockets, fds); creation.    -
  kTimeout,          // a deadline expired (device spin-wait or host wait).         broken
  kInvalidArgument,  // bad input. Found on the host before any launch: the call  usable
                     // is skipped on every rank (the others get kRemote). Found
                     // on the device (an expert id out of range, ranks that      broken
                     // pass different per-call parameters): the op stopped on
                     // every rank mid-way.
  kUnsupported,      // the machine cannot do what was asked (a forced memory mode, a GPU
                     // architecture that was not compiled, no P2P); at creation only.  -
  kRemote,           // another rank failed, this rank stopped instead of waiting. usable
                     // when the other rank rejected its input on the host (the
                     // message says "still usable"); broken when the other rank  broken
                     // found a fault on the device.
  kBroken,           // the EpBuffer is unusable after an earlier error.            broken
};

// Stable name such as "InvalidArgument".
EPCOMM_API const char* errorCodeName(ErrorCode code);

class EPCOMM_API Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message);
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

class EPCOMM_API CudaError : public Error {
 public:
  CudaError(int status, const std::string& message)
      : Error(ErrorCode::kCuda, message), status_(status) {}
  int status() const noexcept { return status_; }  // the cudaError_t value

 private:
  int status_;
};

class EPCOMM_API DriverError : public Error {
 public:
  DriverError(int status, const std::string& message)
      : Error(ErrorCode::kDriver, message), status_(status) {}
  int status() const noexcept { return status_; }  // the CUresult value

 private:
  int status_;
};

class EPCOMM_API MpiError : public Error {
 public:
  MpiError(int status, const std::string& message)
      : Error(ErrorCode::kMpi, message), status_(status) {}
  int status() const noexcept { return status_; }

 private:
  int status_;
};

class EPCOMM_API SystemError : public Error {
 public:
  SystemError(int err, const std::string& message)
      : Error(ErrorCode::kSystem, message), errno_(err) {}
  int errnoValue() const noexcept { return errno_; }

 private:
  int errno_;
};

// A wait that passed its deadline. peer() is the rank that never answered (-1 if unknown).
class EPCOMM_API TimeoutError : public Error {
 public:
  TimeoutError(int peer, const std::string& message)
      : Error(ErrorCode::kTimeout, message), peer_(peer) {}
  int peer() const noexcept { return peer_; }

 private:
  int peer_;
};

class EPCOMM_API InvalidArgument : public Error {
 public:
  explicit InvalidArgument(const std::string& message)
      : Error(ErrorCode::kInvalidArgument, message) {}
};

}  // namespace epcomm
