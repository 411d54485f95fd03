// SPDX-License-Identifier: Apache-2.0
// The work a case moves: seeds, routing, who sends how many rows to whom, and the bytes that
// makes under both definitions (docs/benchmarks.md, Bytes and Inputs).
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "link_bench.hpp"
#include "nccl_baseline.hpp"
#include "ranks.hpp"
#include "timing.hpp"
#include "util/routing.hpp"
#include "util/seed.hpp"

namespace epcomm::bench {

// The routing shape and the seed every input is derived from (the options of the same names).
struct Workload {
  int topk = 0;
  int experts = 0;
  double skew = 0;
  uint64_t seed = 0;
};

// A seed for one purpose (rank, case, set, tensor), derived from `base` (--seed).
using util::seedFor;

// Per-rank routing of one input set (host side): top-k picks and the tokens sent to each rank.
using Routing = util::TokenRouting;

// Not collective. With probability skew a pick comes from rank 0's experts, else uniformly
// (util::drawRouting).
Routing makeRouting(const Workload& work, int num_ranks, int tokens, uint64_t seed);

// Who sends how many rows to whom, for one input set: matrix[src * ranks + dst] rows (tokens
// src sends to dst; LL uses the same (token, destination rank) pairs).
struct Traffic {
  std::vector<int> matrix;
  int64_t recv_rows = 0;       // rows this rank receives, itself included
  int64_t peer_send_rows = 0;  // rows of this rank's tokens held by other ranks
};

// Collective: gathers every rank's dest_tokens.
Traffic gatherTraffic(const Ranks& ranks, const std::vector<int>& dest_tokens);

// Forward exchange (dispatch): send[d] = my rows to d, recv[s] = s's rows to me. The backward
// exchange (combine) swaps the two.
Exchange makeExchange(const Ranks& ranks, const Traffic& t, size_t row_bytes, bool backward);

size_t bf16RowBytes(int hidden);
size_t fp8RowBytes(int hidden);  // the e4m3 row plus its float32 scales

constexpr int kMinInputSets = 3;
constexpr int kMaxInputSets = 32;

// Input sets rotated per size: at least kMinInputSets, and enough that their BF16 inputs together
// exceed twice the L2 (max over ranks), so a small case is not served from cache.
int numInputSets(size_t l2_bytes, size_t bytes_per_set);

// Per-call bytes of one rank, both definitions (docs/benchmarks.md).
struct Bytes {
  double logical = 0;
  double link = 0;
};

// The rows of one case averaged the way the timed iterations visit its input sets.
class CaseRows {
 public:
  CaseRows(const Iterations& loop, const std::vector<const Traffic*>& sets);
  // `factor` rows per received row: 2 for a dispatch + combine round trip.
  Bytes bytes(size_t row_bytes, double factor = 1.0) const;

 private:
  double mean_recv_ = 0;  // logical: received rows, self included
  double mean_peer_ = 0;  // link: this rank's rows held by other ranks
};

template <typename T>
DeviceMemory upload(const std::vector<T>& host) {
  DeviceMemory d(std::max<size_t>(host.size() * sizeof(T), 16));
  if (!host.empty()) {
    EPCOMM_CUDA_CHECK(
        cudaMemcpy(d.get(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  return d;
}

}  // namespace epcomm::bench
