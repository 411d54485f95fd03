// SPDX-License-Identifier: Apache-2.0
// The benchmark's CUDA layer: the event timer shared by ep_bench's files, the kernels that
// fill inputs with random non-zero values, and the link-limit measurement (SM store kernel, SM
// load kernel, copy engine, and the TMA bulk-copy kernels, through the peer mappings of an
// EpBuffer).
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
  // Also the TMA bulk-copy rows ("SM bulk store", "SM bulk load") at every SM count and every
  // chunk of kBulkChunkBytes; measured after the other rows, so they cannot change them.
  bool bulk = true;
};

// Bytes one block moves per pipeline stage in the bulk-copy rows (one row each), and the stages
// (shared-memory buffers) every block cycles through.
inline constexpr int kBulkChunkBytes[] = {4096, 8192, 16384};
inline constexpr int kBulkStages = 4;

// What the check after a bulk-copy row found. Rows without a check (SM store, SM load, copy
// engine) read kUnchecked.
enum class LinkCheck {
  kUnchecked = 0,
  kOk = 1,
  kUnsupported = 2,  // not built for sm_90+ or not an sm_90+ GPU: the row is "n/a"
  kMismatch = 3,     // the destination does not hold the source after the timed copies: "bad"
  kTimeout = 4,      // a block's wait for a bulk load passed its deadline: "timeout"
};
const char* linkCheckName(LinkCheck check);

// One measurement on this rank. `bytes` is what this rank sent to (store, copy engine) or read
// from (load) its peers in one repetition; the median is over the repetitions.
struct LinkSample {
  std::string method;  // "SM store", "SM load", "copy engine", "SM bulk store", "SM bulk load"
  int sms = 0;         // blocks of the SM kernel; 0 for the copy engine
  size_t bytes = 0;
  float median_us = 0;
  int chunk_bytes = 0;  // bulk rows: bytes per stage (0 otherwise)
  int stages = 0;       // bulk rows: stages per block (0 otherwise)
  LinkCheck check = LinkCheck::kUnchecked;
  std::string detail;  // what the check found when it failed, for the error line
};

// Collective over the buffer's ranks (every rank must call it with the same config). Moves data
// between this rank and every other rank at the same time through the mapped peer pointers
// (EpBuffer::peerBase(r) + scratchOffset()), in chunks of up to scratchBytes() / numRanks() per
// peer. Every repetition starts after an EpBuffer::barrier on `stream`, so all ranks transfer
// simultaneously. The bulk rows are checked after their timed repetitions (the destination
// must hold the source, which is refilled with a new pattern and its destination zeroed before
// each row). Returns nothing with a single rank.
std::vector<LinkSample> runLinkBench(EpBuffer& buffer, const LinkBenchConfig& config,
                                     cudaStream_t stream);

}  // namespace epcomm::bench
