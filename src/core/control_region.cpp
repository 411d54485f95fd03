// SPDX-License-Identifier: Apache-2.0
#include "core/control_region.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <vector>

#include "check.hpp"
#include "cuda_resources.hpp"
#include "test_hooks.hpp"

namespace epcomm {

namespace {
std::atomic<bool> g_poison_new_buffers{false};
}  // namespace

void clearSignals(uint8_t* base, size_t bytes, const kernels::HtRegions& ht,
                  const kernels::LlRegions& ll, int num_ranks, cudaStream_t stream) {
  if (g_poison_new_buffers.load()) EPCOMM_CUDA_CHECK(cudaMemsetAsync(base, 0xFF, bytes, stream));
  EPCOMM_CUDA_CHECK(cudaMemsetAsync(base, 0, sizeof(kernels::ControlRegion), stream));
  if (ht.combine_flags != 0) {
    const size_t flag_bytes = sizeof(uint64_t) * static_cast<size_t>(num_ranks) * ht.push_chunks;
    EPCOMM_CUDA_CHECK(cudaMemsetAsync(base + ht.combine_flags, 0, flag_bytes, stream));
  }
  const size_t tag_bytes =
      sizeof(uint64_t) * static_cast<size_t>(num_ranks) * static_cast<size_t>(ll.max_tokens);
  for (const uint64_t* offsets : {ll.row_tags, ll.weights_tags}) {
    for (int parity = 0; parity < 2; ++parity) {
      if (tag_bytes != 0) {
        EPCOMM_CUDA_CHECK(cudaMemsetAsync(base + offsets[parity], 0, tag_bytes, stream));
      }
    }
  }
  for (const uint64_t offset : ll.entry_tags) {
    const size_t bytes = tag_bytes * static_cast<size_t>(ll.entry_tags_per_slot);
    if (bytes != 0) EPCOMM_CUDA_CHECK(cudaMemsetAsync(base + offset, 0, bytes, stream));
  }
  for (const uint64_t offset : ll.combine_tags) {
    const size_t bytes = tag_bytes * static_cast<size_t>(ll.combine_tag_segments);
    if (bytes != 0) EPCOMM_CUDA_CHECK(cudaMemsetAsync(base + offset, 0, bytes, stream));
  }
  // Partial lines carry their flags in the data: a cleared line is never ready (llLineFlag).
  const size_t line_bytes = static_cast<size_t>(num_ranks) * static_cast<size_t>(ll.line_tokens) *
                            static_cast<size_t>(ll.combine_tag_segments) * kernels::kLlSegmentCols *
                            4;
  for (const uint64_t offset : ll.combine_lines) {
    if (line_bytes != 0) EPCOMM_CUDA_CHECK(cudaMemsetAsync(base + offset, 0, line_bytes, stream));
  }
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
  // No skip pending: the marker's call is the completed one (callEpoch).
  for (uint64_t& m : region.local.skip_marker) m = kernels::skipMarker(0, calls);
  for (int s = 0; s < kMaxRanks; ++s) {
    region.barrier[s] = calls;
    region.ht_dispatch_done[s] = calls;
    region.ht_combine_ready[s] = tagged;
    region.ht_combine_done[s] = calls;
    region.ht_rows_in[s] = 0;
    region.ht_pulls_done[s] = 0;
    for (int parity = 0; parity < 2; ++parity) {
      for (uint64_t& w : region.ht_counts[parity][s]) w = tagged;
      for (uint64_t& w : region.ht_expert_counts[parity][s]) w = tagged;
      region.ll_dispatch_flag[parity][s] = tagged;
    }
  }
}

namespace testing {

void setPoisonNewBuffersForTesting(bool on) {
  g_poison_new_buffers.store(on);
}

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
