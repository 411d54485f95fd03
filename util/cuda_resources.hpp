// SPDX-License-Identifier: Apache-2.0
// Move-only RAII owners of CUDA runtime resources, for the library, the tests and ep_bench:
// streams, events, instantiated graphs, device memory, mapped pinned host memory, and a device
// guard. Constructors and create() throw epcomm::CudaError; destructors never throw, they log
// what fails (EPCOMM_CUDA_LOG).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstring>
#include <utility>

#include "util/check.hpp"

namespace epcomm::util {

// A move-only owner of one CUDA runtime handle, released with Destroy.
template <typename Handle, cudaError_t (*Destroy)(Handle)>
class CudaHandle {
 public:
  CudaHandle() = default;
  // Takes ownership of `handle` (may be null).
  explicit CudaHandle(Handle handle) : handle_(handle) {}
  CudaHandle(CudaHandle&& o) noexcept : handle_(std::exchange(o.handle_, nullptr)) {}
  CudaHandle& operator=(CudaHandle&& o) noexcept {
    if (this != &o) {
      reset();
      handle_ = std::exchange(o.handle_, nullptr);
    }
    return *this;
  }
  CudaHandle(const CudaHandle&) = delete;
  CudaHandle& operator=(const CudaHandle&) = delete;
  ~CudaHandle() { reset(); }

  void reset() noexcept {
    if (handle_ != nullptr) EPCOMM_CUDA_LOG(Destroy(handle_));
    handle_ = nullptr;
  }
  Handle get() const { return handle_; }

 private:
  Handle handle_ = nullptr;
};

// A stream on the current device; non-blocking unless other flags are asked for.
class OwnedStream : public CudaHandle<cudaStream_t, cudaStreamDestroy> {
 public:
  using CudaHandle::CudaHandle;
  static OwnedStream create(unsigned flags = cudaStreamNonBlocking) {
    cudaStream_t stream = nullptr;
    EPCOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, flags));
    return OwnedStream(stream);
  }
};

// An event; without timing (for polling a stream position) unless other flags are asked for.
class OwnedEvent : public CudaHandle<cudaEvent_t, cudaEventDestroy> {
 public:
  using CudaHandle::CudaHandle;
  static OwnedEvent create(unsigned flags = cudaEventDisableTiming) {
    cudaEvent_t event = nullptr;
    EPCOMM_CUDA_CHECK(cudaEventCreateWithFlags(&event, flags));
    return OwnedEvent(event);
  }
};

// An instantiated CUDA graph.
class GraphExec : public CudaHandle<cudaGraphExec_t, cudaGraphExecDestroy> {
 public:
  using CudaHandle::CudaHandle;
  void launch(cudaStream_t stream) const { EPCOMM_CUDA_CHECK(cudaGraphLaunch(get(), stream)); }
};

// Ends the capture running on `stream` and instantiates the graph (the graph itself is freed).
inline GraphExec endCaptureAndInstantiate(cudaStream_t stream) {
  cudaGraph_t graph = nullptr;
  EPCOMM_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t status = cudaGraphInstantiateWithFlags(&exec, graph, 0);
  EPCOMM_CUDA_LOG(cudaGraphDestroy(graph));
  EPCOMM_CUDA_CHECK(status);
  return GraphExec(exec);
}

// Captures body() on `stream` into an instantiated graph; ends the capture when body throws.
template <typename Body>
GraphExec captureGraph(cudaStream_t stream, Body&& body) {
  EPCOMM_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  try {
    body();
  } catch (...) {
    cudaGraph_t graph = nullptr;
    if (cudaStreamEndCapture(stream, &graph) == cudaSuccess && graph != nullptr) {
      EPCOMM_CUDA_LOG(cudaGraphDestroy(graph));
    }
    throw;
  }
  return endCaptureAndInstantiate(stream);
}

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

// cudaMalloc'ed device memory on the current device; 0 bytes = empty.
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

  void reset() noexcept {
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

// Pinned host memory mapped into the device address space (cudaHostAllocMapped), zeroed.
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

  void reset() noexcept {
    if (host_ != nullptr) EPCOMM_CUDA_LOG(cudaFreeHost(host_));
    host_ = nullptr;
    device_ = nullptr;
  }
  template <typename T>
  T* host() const {
    return static_cast<T*>(host_);
  }
  template <typename T>
  T* device() const {
    return static_cast<T*>(device_);
  }

 private:
  void* host_ = nullptr;
  void* device_ = nullptr;
};

}  // namespace epcomm::util
