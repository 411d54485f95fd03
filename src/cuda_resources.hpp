// Move-only RAII owners for the CUDA runtime resources the library holds. Destructors never
// throw; they log what fails.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstring>
#include <utility>

#include "check.hpp"

namespace epcomm {

// Makes `device` current for the scope and restores the previous device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    EPCOMM_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) EPCOMM_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int current = -1;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) {
      EPCOMM_CUDA_LOG(cudaSetDevice(previous_));
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// cudaMalloc'ed device memory.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  explicit DeviceMemory(size_t bytes) : bytes_(bytes) {
    if (bytes > 0) EPCOMM_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
  }
  DeviceMemory(DeviceMemory&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceMemory& operator=(DeviceMemory&& o) noexcept {
    if (this != &o) {
      reset();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() { reset(); }

  void reset() {
    if (ptr_ != nullptr) EPCOMM_CUDA_LOG(cudaFree(ptr_));
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* get() const { return ptr_; }
  template <typename T>
  T* as(size_t byte_offset = 0) const {
    return reinterpret_cast<T*>(static_cast<char*>(ptr_) + byte_offset);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Pinned host memory mapped into the device address space (cudaHostAllocMapped).
class MappedHostMemory {
 public:
  MappedHostMemory() = default;
  explicit MappedHostMemory(size_t bytes) {
    EPCOMM_CUDA_CHECK(cudaHostAlloc(&host_, bytes, cudaHostAllocMapped | cudaHostAllocPortable));
    std::memset(host_, 0, bytes);
    EPCOMM_CUDA_CHECK(cudaHostGetDevicePointer(&device_, host_, 0));
  }
  MappedHostMemory(MappedHostMemory&& o) noexcept
      : host_(std::exchange(o.host_, nullptr)), device_(std::exchange(o.device_, nullptr)) {}
  MappedHostMemory& operator=(MappedHostMemory&& o) noexcept {
    if (this != &o) {
      reset();
      host_ = std::exchange(o.host_, nullptr);
      device_ = std::exchange(o.device_, nullptr);
    }
    return *this;
  }
  MappedHostMemory(const MappedHostMemory&) = delete;
  MappedHostMemory& operator=(const MappedHostMemory&) = delete;
  ~MappedHostMemory() { reset(); }

  void reset() {
    if (host_ != nullptr) EPCOMM_CUDA_LOG(cudaFreeHost(host_));
    host_ = nullptr;
    device_ = nullptr;
  }
  template <typename T>
  T* host() const { return static_cast<T*>(host_); }
  template <typename T>
  T* device() const { return static_cast<T*>(device_); }

 private:
  void* host_ = nullptr;
  void* device_ = nullptr;
};

// A non-blocking stream owned by the library.
class OwnedStream {
 public:
  OwnedStream() = default;
  static OwnedStream create() {
    OwnedStream s;
    EPCOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream_, cudaStreamNonBlocking));
    return s;
  }
  OwnedStream(OwnedStream&& o) noexcept : stream_(std::exchange(o.stream_, nullptr)) {}
  OwnedStream& operator=(OwnedStream&& o) noexcept {
    if (this != &o) {
      reset();
      stream_ = std::exchange(o.stream_, nullptr);
    }
    return *this;
  }
  OwnedStream(const OwnedStream&) = delete;
  OwnedStream& operator=(const OwnedStream&) = delete;
  ~OwnedStream() { reset(); }
  void reset() {
    if (stream_ != nullptr) EPCOMM_CUDA_LOG(cudaStreamDestroy(stream_));
    stream_ = nullptr;
  }
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// A CUDA event without timing, for polling a stream position.
class OwnedEvent {
 public:
  OwnedEvent() = default;
  static OwnedEvent create() {
    OwnedEvent e;
    EPCOMM_CUDA_CHECK(cudaEventCreateWithFlags(&e.event_, cudaEventDisableTiming));
    return e;
  }
  OwnedEvent(OwnedEvent&& o) noexcept : event_(std::exchange(o.event_, nullptr)) {}
  OwnedEvent& operator=(OwnedEvent&& o) noexcept {
    if (this != &o) {
      reset();
      event_ = std::exchange(o.event_, nullptr);
    }
    return *this;
  }
  OwnedEvent(const OwnedEvent&) = delete;
  OwnedEvent& operator=(const OwnedEvent&) = delete;
  ~OwnedEvent() { reset(); }
  void reset() {
    if (event_ != nullptr) EPCOMM_CUDA_LOG(cudaEventDestroy(event_));
    event_ = nullptr;
  }
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

}  // namespace epcomm
