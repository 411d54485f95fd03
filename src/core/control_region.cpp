// SPDX-License-Identifier: Apache-2.0
#include "core/control_region.hpp"

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "check.hpp"
#include "cuda_resources.hpp"
#include "test_hooks.hpp"

namespace epcomm {

void clearControlRegion(void* region, cudaStream_t stream) {
  EPCOMM_CUDA_CHECK(cudaMemsetAsync(region, 0, sizeof(kernels::ControlRegion), stream));
}

uint64_t readCallsPassed(const void* region, kernels::EpochSlot family, cudaStream_t stream) {
  uint64_t words[2 * kernels::kNumEpochs] = {};  // LocalState::epoch, then ::skipped
  static_assert(sizeof(words) == kernels::kCallCountersBytes, "one copy of both arrays");
  const auto* source = static_cast<const uint8_t*>(region) + kernels::kCallCountersOffset;
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(words, source, sizeof(words), cudaMemcpyDeviceToHost, stream));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(stream));
  return std::max(words[family], words[kernels::kNumEpochs + family]);
}

void setCallCounters(kernels::ControlRegion& region, uint64_t calls) {
  const uint64_t tagged = kernels::tag(calls, 0);
  for (uint64_t& e : region.local.epoch) e = calls;
  for (int s = 0; s < kMaxRanks; ++s) {
    region.barrier[s] = calls;
    region.ht_dispatch_done[s] = calls;
    region.ht_combine_ready[s] = tagged;
    region.ht_combine_done[s] = calls;
    for (int parity = 0; parity < 2; ++parity) {
      for (uint64_t& w : region.ht_counts[parity][s]) w = tagged;
      for (uint64_t& w : region.ht_expert_counts[parity][s]) w = tagged;
      region.ll_dispatch_flag[parity][s] = tagged;
      region.ll_combine_flag[parity][s] = calls;
    }
  }
}

namespace testing {

void setCallCounterForTesting(EpBuffer& buffer, Bootstrap& bootstrap, uint64_t calls) {
  DeviceGuard guard(buffer.device());
  EPCOMM_CUDA_CHECK(cudaDeviceSynchronize());
  bootstrap.barrier();  // nobody runs an op or writes into a peer any more
  auto* device_region = static_cast<kernels::ControlRegion*>(buffer.peerBase(buffer.rank()));
  std::vector<uint8_t> bytes(sizeof(kernels::ControlRegion));
  EPCOMM_CUDA_CHECK(cudaMemcpy(bytes.data(), device_region, bytes.size(), cudaMemcpyDeviceToHost));
  // On the heap: the region is over a megabyte at kMaxRanks and kMaxExperts.
  auto region = std::make_unique<kernels::ControlRegion>();
  std::memcpy(region.get(), bytes.data(), bytes.size());
  setCallCounters(*region, calls);
  std::memcpy(bytes.data(), region.get(), bytes.size());
  EPCOMM_CUDA_CHECK(cudaMemcpy(device_region, bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
  EPCOMM_CUDA_CHECK(cudaDeviceSynchronize());
  bootstrap.barrier();
}

}  // namespace testing

}  // namespace epcomm
