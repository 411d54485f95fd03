// SPDX-License-Identifier: Apache-2.0
#include "traffic.hpp"

#include <random>

#include "epcomm/config.hpp"

namespace epcomm::bench {

namespace {

uint64_t mixSeed(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace

uint64_t seedFor(uint64_t base, std::initializer_list<uint64_t> parts) {
  uint64_t s = mixSeed(base);
  for (uint64_t p : parts) s = mixSeed(s ^ p);
  return s;
}

Routing makeRouting(const Workload& work, int num_ranks, int tokens, uint64_t seed) {
  const int per_rank = work.experts / num_ranks;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> any_expert(0, work.experts - 1);
  std::uniform_int_distribution<int> rank0_expert(0, per_rank - 1);
  std::uniform_real_distribution<double> coin(0.0, 1.0);
  std::uniform_real_distribution<float> weight(0.05f, 1.0f);
  Routing r;
  r.idx.resize(static_cast<size_t>(tokens) * work.topk);
  r.weights.resize(r.idx.size());
  r.dest_tokens.assign(static_cast<size_t>(num_ranks), 0);
  std::vector<char> taken(static_cast<size_t>(work.experts), 0);
  std::vector<char> to_rank(static_cast<size_t>(num_ranks), 0);
  for (int t = 0; t < tokens; ++t) {
    std::fill(taken.begin(), taken.end(), 0);
    std::fill(to_rank.begin(), to_rank.end(), 0);
    int taken_on_rank0 = 0;
    for (int k = 0; k < work.topk; ++k) {
      // With probability skew the pick comes from rank 0's experts (while any is left there);
      // otherwise uniformly from all experts. Rejection keeps the picks distinct.
      const bool skewed = work.skew > 0.0 && coin(rng) < work.skew && taken_on_rank0 < per_rank;
      int e = 0;
      do {
        e = skewed ? rank0_expert(rng) : any_expert(rng);
      } while (taken[static_cast<size_t>(e)]);
      taken[static_cast<size_t>(e)] = 1;
      if (e < per_rank) ++taken_on_rank0;
      const size_t i = static_cast<size_t>(t) * work.topk + k;
      r.idx[i] = e;
      r.weights[i] = weight(rng);
      to_rank[static_cast<size_t>(e / per_rank)] = 1;
    }
    for (int d = 0; d < num_ranks; ++d) r.dest_tokens[static_cast<size_t>(d)] += to_rank[d];
  }
  return r;
}

Traffic gatherTraffic(const Ranks& ranks, const std::vector<int>& dest_tokens) {
  const int n = ranks.size;
  Traffic t;
  t.matrix.resize(static_cast<size_t>(n) * n);
  EPCOMM_BENCH_MPI_CHECK(
      MPI_Allgather(dest_tokens.data(), n, MPI_INT, t.matrix.data(), n, MPI_INT, ranks.comm));
  for (int s = 0; s < n; ++s) t.recv_rows += t.matrix[static_cast<size_t>(s) * n + ranks.rank];
  for (int d = 0; d < n; ++d) {
    if (d != ranks.rank) t.peer_send_rows += t.matrix[static_cast<size_t>(ranks.rank) * n + d];
  }
  return t;
}

Exchange makeExchange(const Ranks& ranks, const Traffic& t, size_t row_bytes, bool backward) {
  const int n = ranks.size;
  Exchange e;
  e.send_bytes.resize(static_cast<size_t>(n));
  e.recv_bytes.resize(static_cast<size_t>(n));
  for (int p = 0; p < n; ++p) {
    const size_t to_p = static_cast<size_t>(t.matrix[static_cast<size_t>(ranks.rank) * n + p]);
    const size_t from_p = static_cast<size_t>(t.matrix[static_cast<size_t>(p) * n + ranks.rank]);
    e.send_bytes[static_cast<size_t>(p)] = (backward ? from_p : to_p) * row_bytes;
    e.recv_bytes[static_cast<size_t>(p)] = (backward ? to_p : from_p) * row_bytes;
  }
  return e;
}

size_t bf16RowBytes(int hidden) {
  return static_cast<size_t>(hidden) * 2;
}

size_t fp8RowBytes(int hidden) {
  return static_cast<size_t>(hidden) + static_cast<size_t>(hidden / kFp8BlockSize) * 4;
}

int numInputSets(size_t l2_bytes, size_t bytes_per_set) {
  const size_t needed = (2 * l2_bytes + bytes_per_set - 1) / std::max<size_t>(bytes_per_set, 1);
  return static_cast<int>(
      std::clamp<size_t>(needed, kMinInputSets, static_cast<size_t>(kMaxInputSets)));
}

CaseRows::CaseRows(const Iterations& loop, const std::vector<const Traffic*>& sets) {
  std::vector<double> recv_rows;
  std::vector<double> peer_rows;
  for (const Traffic* t : sets) {
    recv_rows.push_back(static_cast<double>(t->recv_rows));
    peer_rows.push_back(static_cast<double>(t->peer_send_rows));
  }
  mean_recv_ = meanOverTimed(loop, recv_rows);
  mean_peer_ = meanOverTimed(loop, peer_rows);
}

Bytes CaseRows::bytes(size_t row_bytes, double factor) const {
  return Bytes{mean_recv_ * row_bytes * factor, mean_peer_ * row_bytes * factor};
}

}  // namespace epcomm::bench
