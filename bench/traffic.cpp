// SPDX-License-Identifier: Apache-2.0
#include "traffic.hpp"

#include "epcomm/config.hpp"

namespace epcomm::bench {

Routing makeRouting(const Workload& work, int num_ranks, int tokens, uint64_t seed) {
  return util::drawRouting(work.experts, num_ranks, work.topk, work.skew, tokens, seed);
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
