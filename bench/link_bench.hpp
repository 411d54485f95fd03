// SPDX-License-Identifier: Apache-2.0
// The benchmark's CUDA layer: the event timer shared by ep_bench's files, the kernels that
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
#include <vector>

#include "epcomm/buffer.hpp"
#include "util/check.hpp"
#include "util/cuda_resources.hpp"

namespace epcomm::bench {

// CUDA owners and checks come from the internal utility target (util/).
using util::DeviceMemory;
using util::endCaptureAndInstantiate;
using util::GraphExec;
using util::OwnedEvent;
using util::OwnedStream;

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
  std::vector<OwnedEvent> starts_;  // with timing
  std::vector<OwnedEvent> stops_;
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
