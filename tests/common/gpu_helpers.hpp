// GPU-side helpers for tests: an RAII device array with upload/download, poisoning, and the
// pattern kernels the symmetric-buffer tests use. Errors throw (tests turn them into failures).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace epcomm::test {

void cudaOrThrow(cudaError_t status, const char* what);
#define EPCOMM_TEST_CUDA(call) ::epcomm::test::cudaOrThrow((call), #call)

// The byte every output is filled with before a run: 0x7f7f... is NaN in FP8, a huge value in
// BF16/float and an invalid index in int32/int64, so an unwritten element always fails.
constexpr int kPoisonByte = 0x7f;

template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t count) : count_(count) {
    if (count > 0) EPCOMM_TEST_CUDA(cudaMalloc(reinterpret_cast<void**>(&ptr_), count * sizeof(T)));
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
  DeviceArray(DeviceArray&& o) noexcept : ptr_(o.ptr_), count_(o.count_) {
    o.ptr_ = nullptr;
    o.count_ = 0;
  }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) {
      if (ptr_) cudaFree(ptr_);
      ptr_ = o.ptr_;
      count_ = o.count_;
      o.ptr_ = nullptr;
      o.count_ = 0;
    }
    return *this;
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() {
    if (ptr_) cudaFree(ptr_);
  }

  T* get() const { return ptr_; }
  size_t size() const { return count_; }
  void upload(const std::vector<T>& host) {
    if (host.size() > count_) throw std::runtime_error("DeviceArray::upload: too many elements");
    if (!host.empty()) {
      EPCOMM_TEST_CUDA(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T),
                                  cudaMemcpyHostToDevice));
    }
  }
  std::vector<T> download(size_t count) const { return downloadFrom(ptr_, count); }
  void poison() const {
    if (count_ > 0) EPCOMM_TEST_CUDA(cudaMemset(ptr_, kPoisonByte, count_ * sizeof(T)));
  }

  static std::vector<T> downloadFrom(const void* device, size_t count) {
    std::vector<T> host(count);
    if (count > 0) {
      EPCOMM_TEST_CUDA(cudaMemcpy(host.data(), device, count * sizeof(T),
                                  cudaMemcpyDeviceToHost));
    }
    return host;
  }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

// A CUDA stream owned by a test. Blocking on purpose: DeviceArray uploads and poisons run on the
// legacy default stream (cudaMemcpy/cudaMemset), and a blocking stream is ordered after that work,
// so an op can never read inputs or outputs that are still being written.
class TestStream {
 public:
  TestStream() { EPCOMM_TEST_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamDefault)); }
  ~TestStream() { cudaStreamDestroy(stream_); }
  TestStream(const TestStream&) = delete;
  TestStream& operator=(const TestStream&) = delete;
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// Fills `bytes` at a device pointer with the poison byte (stream-ordered).
void poisonDevice(void* device, size_t bytes, cudaStream_t stream = nullptr);

#ifdef __CUDACC__
#define EPCOMM_TEST_HOST_DEVICE __host__ __device__
#else
#define EPCOMM_TEST_HOST_DEVICE
#endif

// Word i of the slice that rank `src` writes into rank `dst`: encodes (src, dst, i).
EPCOMM_TEST_HOST_DEVICE inline uint32_t patternWord(int src, int dst, uint64_t i) {
  return (static_cast<uint32_t>(src) << 28) ^ (static_cast<uint32_t>(dst) << 24) ^
         static_cast<uint32_t>(i * 2654435761u + 0x9e3779b9u) ^ 0x5a5a5a5au;
}

// Every rank writes slice `rank` (words_per_slice 32-bit words at
// byte offset + rank * words_per_slice * 4) of every peer's buffer through the device array of
// peer bases, with patternWord(rank, peer, i).
void launchWritePattern(void* const* peer_bases, size_t offset, int rank, int num_ranks,
                        size_t words_per_slice, cudaStream_t stream);

// A kernel that spins for about `ns` nanoseconds (work between split LL halves).
void launchSpin(uint64_t ns, cudaStream_t stream);

// Number of open file descriptors of this process.
int openFdCount();

}  // namespace epcomm::test
