// SPDX-License-Identifier: Apache-2.0
// The benchmark's CUDA layer: checked CUDA helpers shared by ep_bench's files, the kernels that
// fill inputs with random non-zero values, and the link-limit measurement (SM store kernel, SM
// load kernel and copy engine through the peer mappings of an EpBuffer).
//
// Nothing here includes MPI: the collective parts synchronize through EpBuffer::barrier, and
// ep_bench reduces the per-rank results over MPI itself.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "epcomm/buffer.hpp"

namespace epcomm::bench {

// Throws epcomm::CudaError naming the call, the place and the CUDA error.
[[noreturn]] void throwCudaError(cudaError_t status, const char* call, const char* file, int line);
// Destructor variant: prints to stderr, never throws.
void logCudaError(cudaError_t status, const char* call, const char* file, int line);

#define EPCOMM_BENCH_CUDA_CHECK(call)                                                   \
  do {                                                                                  \
    const cudaError_t epcomm_bench_status_ = (call);                                    \
    if (epcomm_bench_status_ != cudaSuccess) {                                          \
      ::epcomm::bench::throwCudaError(epcomm_bench_status_, #call, __FILE__, __LINE__); \
    }                                                                                   \
  } while (0)

#define EPCOMM_BENCH_CUDA_LOG(call)                                                   \
  do {                                                                                \
    const cudaError_t epcomm_bench_status_ = (call);                                  \
    if (epcomm_bench_status_ != cudaSuccess) {                                        \
      ::epcomm::bench::logCudaError(epcomm_bench_status_, #call, __FILE__, __LINE__); \
    }                                                                                 \
  } while (0)

// --- RAII owners (move-only; destructors never throw) --------------------------------------------

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes);  // cudaMalloc on the current device; 0 bytes = empty
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// A move-only owner of one CUDA runtime handle, released with Destroy (a failure is logged;
// never throws).
template <typename Handle, cudaError_t (*Destroy)(Handle)>
class CudaOwner {
 public:
  CudaOwner(CudaOwner&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  CudaOwner& operator=(CudaOwner&& other) noexcept {
    if (this != &other) {
      release();
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }
  CudaOwner(const CudaOwner&) = delete;
  CudaOwner& operator=(const CudaOwner&) = delete;
  ~CudaOwner() { release(); }
  Handle get() const { return handle_; }

 protected:
  CudaOwner() = default;
  explicit CudaOwner(Handle handle) : handle_(handle) {}
  Handle handle_ = nullptr;

 private:
  void release() noexcept {
    if (handle_ != nullptr) EPCOMM_BENCH_CUDA_LOG(Destroy(handle_));
    handle_ = nullptr;
  }
};

class CudaStream : public CudaOwner<cudaStream_t, cudaStreamDestroy> {
 public:
  CudaStream();  // non-blocking, on the current device
};

class CudaEvent : public CudaOwner<cudaEvent_t, cudaEventDestroy> {
 public:
  explicit CudaEvent(unsigned flags = cudaEventDefault);  // default: with timing
};

// An instantiated CUDA graph captured from one stream.
class GraphExec : public CudaOwner<cudaGraphExec_t, cudaGraphExecDestroy> {
 public:
  GraphExec() = default;
  // Takes ownership of an instantiated graph.
  explicit GraphExec(cudaGraphExec_t exec) : CudaOwner(exec) {}
  void launch(cudaStream_t stream) const;
};

// Ends the capture running on `stream` and instantiates the graph (the graph itself is freed).
GraphExec endCaptureAndInstantiate(cudaStream_t stream);

// Pairs of timing events: sample i is the GPU time between start(i) and stop(i).
class EventTimer {
 public:
  explicit EventTimer(int samples);
  void start(int i, cudaStream_t stream);
  void stop(int i, cudaStream_t stream);
  // Microseconds of samples [0, count). The stream must have been synchronized.
  std::vector<float> microseconds(int count) const;
  int capacity() const { return static_cast<int>(starts_.size()); }

 private:
  std::vector<CudaEvent> starts_;
  std::vector<CudaEvent> stops_;
};

// --- Input fills (random, non-zero, finite; deterministic in `seed`) -----------------------------

// BF16 with magnitudes in [1/8, 4) and random signs.
void fillRandomBf16(void* dst, size_t elements, uint64_t seed, cudaStream_t stream);
// FP8 e4m3 with magnitudes in [1/8, 30] and random signs (never zero, never NaN).
void fillRandomFp8(void* dst, size_t elements, uint64_t seed, cudaStream_t stream);
// float32 in [0.5, 2): FP8 block scales.
void fillRandomScales(float* dst, size_t elements, uint64_t seed, cudaStream_t stream);

// --- Link limit ----------------------------------------------------------------------------------

struct LinkBenchConfig {
  std::vector<int> sm_counts;  // blocks of the SM kernels to try (one row each)
  size_t bytes_per_rank = 0;   // target bytes every rank moves per measurement, over all peers
  int warmup = 3;
  int reps = 20;
};

// One measurement on this rank. `bytes` is what this rank sent to (store, copy engine) or read
// from (load) its peers in one repetition; the median is over the repetitions.
struct LinkSample {
  std::string method;  // "SM store", "SM load", "copy engine"
  int sms = 0;         // blocks of the SM kernel; 0 for the copy engine
  size_t bytes = 0;
  float median_us = 0;
};

// Collective over the buffer's ranks (every rank must call it with the same config). Moves data
// between this rank and every other rank at the same time through the mapped peer pointers
// (EpBuffer::peerBase(r) + scratchOffset()), in chunks of up to scratchBytes() / numRanks() per
// peer. Every repetition starts after an EpBuffer::barrier on `stream`, so all ranks transfer
// simultaneously. Returns nothing with a single rank.
std::vector<LinkSample> runLinkBench(EpBuffer& buffer, const LinkBenchConfig& config,
                                     cudaStream_t stream);

}  // namespace epcomm::bench
