// SPDX-License-Identifier: Apache-2.0
// GPU-side helpers for tests: an RAII device array with upload/download, poisoning, and the
// pattern kernels the symmetric-buffer tests use. Errors throw (tests turn them into failures).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "util/check.hpp"
#include "util/cuda_resources.hpp"
#include "util/seed.hpp"

namespace epcomm::test {

// Test spelling of the library's check (util/check.hpp): throws epcomm::CudaError naming the call.
#define EPCOMM_TEST_CUDA(call) EPCOMM_CUDA_CHECK(call)

// The byte every output is filled with before a run: 0x7f7f... is NaN in FP8, a huge value in
// BF16/float and an invalid index in int32/int64, so an unwritten element always fails.
constexpr int kPoisonByte = 0x7f;

// `count` elements of T in device memory (util::DeviceMemory), with blocking host copies.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t count) : memory_(count * sizeof(T)), count_(count) {}
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }

  T* get() const { return memory_.as<T>(); }
  size_t size() const { return count_; }
  void upload(const std::vector<T>& host) {
    if (host.size() > count_) throw std::runtime_error("DeviceArray::upload: too many elements");
    if (!host.empty()) {
      EPCOMM_TEST_CUDA(
          cudaMemcpy(get(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
    }
  }
  std::vector<T> download(size_t count) const { return downloadFrom(get(), count); }
  void poison() const {
    if (count_ > 0) EPCOMM_TEST_CUDA(cudaMemset(get(), kPoisonByte, count_ * sizeof(T)));
  }

  static std::vector<T> downloadFrom(const void* device, size_t count) {
    std::vector<T> host(count);
    if (count > 0) {
      EPCOMM_TEST_CUDA(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost));
    }
    return host;
  }

 private:
  util::DeviceMemory memory_;
  size_t count_ = 0;
};

// A CUDA stream owned by a test. Blocking on purpose: DeviceArray uploads and poisons run on the
// legacy default stream (cudaMemcpy/cudaMemset), and a blocking stream is ordered after that work,
// so an op can never read inputs or outputs that are still being written.
class TestStream : public util::OwnedStream {
 public:
  TestStream() : OwnedStream(create(cudaStreamDefault)) {}
};

// Fills `bytes` at a device pointer with the poison byte (stream-ordered).
void poisonDevice(void* device, size_t bytes, cudaStream_t stream = nullptr);

// Word i of the slice that rank `src` writes into rank `dst`: encodes (src, dst, i).
EPCOMM_UTIL_HOST_DEVICE inline uint32_t patternWord(int src, int dst, uint64_t i) {
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
