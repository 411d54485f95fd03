// SPDX-License-Identifier: Apache-2.0
// epcomm_nccl on GPUs (skipped without one): rail communicators created through the epcomm
// Bootstrap, used, and finalized within deadlines. With EPCOMM_HOSTID per rank CTest also sets
// NCCL_HOSTID to the same value and NCCL_SOCKET_IFNAME=lo, so NCCL sees separate nodes and talks
// over loopback sockets: that way several "nodes" share one GPU (under MPS for speed).
//
// The rail transport (nccl/rail_exchange.hpp): every rank of a rail generates every rail rank's
// counts from one seed, so each rank knows what it must receive; rows encode (source rank,
// destination node, row); receive buffers are poisoned with guard rows past their end; both modes
// (and a CUDA graph of the worst-case one), bad counts and a rail peer that never comes.
//
// Built twice: nccl_gpu runs the rail transport tests on the host-API backend; nccl_gin (only when
// epcomm_nccl has the GIN backend, EPCOMM_TEST_RAIL_GIN) runs the same tests through the GIN
// backend (worst-case calls as GIN puts, exact calls on the host API) plus a device-side timeout.
// Where NCCL reports no GIN (no RDMA NIC: every machine we have), nccl_gin prints
// EPCOMM_SKIPPED_NO_GIN, which CTest reports as Skipped.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>
#include <nccl.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/mp_fixture.hpp"
#include "core/topology.hpp"
#include "cuda_resources.hpp"
#include "nccl/rail_comms.hpp"
#include "nccl/rail_exchange.hpp"
#include "nccl/rail_transport.hpp"

namespace epcomm {
namespace {

constexpr double kTimeoutS = 120.0;

class NcclGpu : public test::MultiRankGpuTest {};

#if defined(EPCOMM_TEST_RAIL_GIN)
constexpr nccl::RailTransportKind kTransport = nccl::RailTransportKind::kGin;
#else
constexpr nccl::RailTransportKind kTransport = nccl::RailTransportKind::kHostApi;

// Each rail sums (global rank + 1) over its members: every rank gets its own rail's sum.
TEST_F(NcclGpu, RailAllReduce) {
  device();
  const core::Topology t = core::discoverTopology(bootstrap(), core::localNodeKey());
  nccl::RailComm rail = nccl::createRailComm(bootstrap(), t, kTimeoutS);
  EXPECT_EQ(rail.rail, t.local);
  EXPECT_EQ(rail.rail_rank, t.node);
  EXPECT_EQ(rail.rail_size, t.num_nodes);

  int* value = nullptr;
  ASSERT_EQ(cudaMalloc(&value, sizeof(int)), cudaSuccess);
  const int mine = rank() + 1;
  ASSERT_EQ(cudaMemcpy(value, &mine, sizeof(int), cudaMemcpyHostToDevice), cudaSuccess);
  const ncclResult_t launched =
      ncclAllReduce(value, value, 1, ncclInt32, ncclSum, rail.comm.get(), stream());
  EXPECT_TRUE(launched == ncclSuccess || launched == ncclInProgress)
      << nccl::describeResult(launched, rail.comm.get());
  nccl::waitReady(rail.comm, kTimeoutS, -1, "rail all-reduce launch");
  ASSERT_EQ(cudaStreamSynchronize(stream()), cudaSuccess);
  int sum = 0;
  ASSERT_EQ(cudaMemcpy(&sum, value, sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
  int expected = 0;
  for (int r : t.railRanks(t.local)) expected += r + 1;
  EXPECT_EQ(sum, expected) << "rank " << rank() << " rail " << t.local;
  cudaFree(value);
  rail.comm.finalize(kTimeoutS, "rail " + std::to_string(t.local));
}
#endif

// --- the rail transport ----------------------------------------------------------------------

constexpr double kFaultTimeoutS = 20.0;  // a bad count must fail well within this
constexpr uint8_t kPoison = 0xA5;
constexpr int64_t kGuardRows = 4;  // poisoned rows past every receive buffer's end

// Byte `b` of row `row` that rank `src_rank` sends to node `dst_node`: the first 12 bytes say who
// sent it (source rank, destination node, row) so a wrong row names its origin; the rest mixes
// all of them with the byte index.
uint8_t rowByte(int src_rank, int dst_node, int row, int64_t b) {
  const int32_t head[3] = {src_rank, dst_node, row};
  if (b < 12) {
    uint8_t bytes[12];
    std::memcpy(bytes, head, sizeof(head));
    return bytes[b];
  }
  uint64_t x = (static_cast<uint64_t>(src_rank) << 48) ^ (static_cast<uint64_t>(dst_node) << 32) ^
               (static_cast<uint64_t>(row) << 12) ^ static_cast<uint64_t>(b);
  x *= 0x9e3779b97f4a7c15ull;
  return static_cast<uint8_t>(x >> 56);
}

// One iteration's plan for one rail, the same on every rail rank: counts[s][d] = rows node s
// sends to node d (about a quarter zero), row bytes, max_rows, and each node's slack of exact
// receive capacity.
struct RailPlan {
  int64_t row_bytes = 0;
  int64_t max_rows = 0;
  std::vector<std::vector<int32_t>> counts;
  std::vector<int64_t> slack;

  int64_t recvRows(int node) const {
    int64_t rows = 0;
    for (const auto& from : counts) rows += from[node];
    return rows;
  }
};

RailPlan makePlan(int num_nodes, int rail, int iteration) {
  std::mt19937 rng(static_cast<uint32_t>(0x5eed + 1000 * iteration + 17 * rail));
  RailPlan p;
  p.row_bytes = 12 + static_cast<int64_t>(rng() % 300);  // odd sizes too
  p.max_rows = 1 + static_cast<int64_t>(rng() % 24);
  p.counts.assign(num_nodes, std::vector<int32_t>(num_nodes, 0));
  p.slack.assign(num_nodes, 0);
  for (int s = 0; s < num_nodes; ++s) {
    for (int d = 0; d < num_nodes; ++d) {
      p.counts[s][d] = rng() % 4 == 0 ? 0 : static_cast<int32_t>(1 + rng() % p.max_rows);
    }
    p.slack[s] = static_cast<int64_t>(rng() % 3);
  }
  return p;
}

class RailExchangeGpu : public NcclGpu {
 protected:
  // Creates the rail and the transport under test; false (the test skipped, saying why) when
  // the transport is GIN and NCCL reports none here.
  bool setUpRail(double timeout_s = kTimeoutS) {
    device();
    topology_ = core::discoverTopology(bootstrap(), core::localNodeKey());
    rail_ = nccl::createRailComm(bootstrap(), topology_, kTimeoutS);
    nccl::RailTransportLimits limits;
    limits.worst_case_slot_bytes = 312 * 24;  // makePlan: row_bytes <= 311, max_rows <= 24
    try {
      exchange_ = nccl::createRailTransport(kTransport, rail_, timeout_s, limits);
    } catch (const Error& e) {
      if (kTransport != nccl::RailTransportKind::kGin || e.code() != ErrorCode::kUnsupported) throw;
      std::printf("EPCOMM_SKIPPED_NO_GIN: rank %d: %s\n", rank(), e.what());
      std::fflush(stdout);
      return false;
    }
    return true;
  }
  void TearDown() override {
    exchange_.reset();
    if (rail_.comm) {
      try {
        rail_.comm.finalize(kTimeoutS, "rail " + std::to_string(topology_.local));
      } catch (const Error& e) {
        ADD_FAILURE() << "rank " << rank() << ": " << e.what();
      }
    }
    NcclGpu::TearDown();
  }

  int nodes() const { return topology_.num_nodes; }
  int me() const { return topology_.node; }
  int globalRank(int node) const { return rail_.rail_ranks[node]; }

  // This rank's send rows for `plan`, as bytes: exact (compact) or worst-case (slots, unused
  // rows filled with a pattern of their own so they are never mistaken for poison).
  std::vector<uint8_t> sendBytes(const RailPlan& plan, bool worst) const {
    const int64_t rb = plan.row_bytes;
    std::vector<uint8_t> out;
    for (int d = 0; d < nodes(); ++d) {
      const int rows = worst ? static_cast<int>(plan.max_rows) : plan.counts[me()][d];
      for (int r = 0; r < rows; ++r) {
        const bool used = r < plan.counts[me()][d];
        for (int64_t b = 0; b < rb; ++b) {
          out.push_back(used ? rowByte(rank(), d, r, b) : static_cast<uint8_t>(0x3c ^ b));
        }
      }
    }
    return out;
  }

  // Checks the received rows from node s at `offset` (rows), count rows. Returns "" or a message.
  std::string checkRows(const std::vector<uint8_t>& recv, const RailPlan& plan, int s,
                        int64_t offset, int count) const {
    for (int r = 0; r < count; ++r) {
      for (int64_t b = 0; b < plan.row_bytes; ++b) {
        const uint8_t got = recv[static_cast<size_t>((offset + r) * plan.row_bytes + b)];
        const uint8_t want = rowByte(globalRank(s), me(), r, b);
        if (got != want) {
          std::ostringstream os;
          int32_t head[3] = {0, 0, 0};
          std::memcpy(head, &recv[static_cast<size_t>((offset + r) * plan.row_bytes)],
                      static_cast<size_t>(std::min<int64_t>(12, plan.row_bytes)));
          os << "rank " << rank() << " (node " << me() << "): row " << r << " from node " << s
             << " (rank " << globalRank(s) << ") byte " << b << " is " << int(got) << ", want "
             << int(want) << "; the row's head says rank " << head[0] << ", node " << head[1]
             << ", row " << head[2];
          return os.str();
        }
      }
    }
    return "";
  }

  static std::string checkPoison(const std::vector<uint8_t>& recv, size_t from, const char* what) {
    for (size_t i = from; i < recv.size(); ++i) {
      if (recv[i] != kPoison) {
        return std::string(what) + ": byte " + std::to_string(i) + " was written (" +
               std::to_string(recv[i]) + ")";
      }
    }
    return "";
  }

  // This rank's buffers for `plan`: its send rows and counts uploaded, a receive buffer of the
  // mode's capacity plus kGuardRows, poisoned; and the arguments that name them.
  struct Buffers {
    test::DeviceArray<uint8_t> send, recv;
    test::DeviceArray<int32_t> counts;
    nccl::RailExchangeArgs args;
  };
  std::unique_ptr<Buffers> buffersFor(const RailPlan& plan, bool worst) const {
    auto b = std::make_unique<Buffers>();
    const int64_t capacity =
        worst ? nodes() * plan.max_rows : plan.recvRows(me()) + plan.slack[me()];
    const std::vector<uint8_t> send_host = sendBytes(plan, worst);
    b->send = test::DeviceArray<uint8_t>(std::max<size_t>(send_host.size(), 1));
    b->send.upload(send_host);
    b->counts = test::DeviceArray<int32_t>(plan.counts[me()]);
    b->recv =
        test::DeviceArray<uint8_t>(static_cast<size_t>((capacity + kGuardRows) * plan.row_bytes));
    EPCOMM_TEST_CUDA(cudaMemset(b->recv.get(), kPoison, b->recv.size()));
    b->args.mode = worst ? nccl::RailExchangeMode::kWorstCase : nccl::RailExchangeMode::kExact;
    b->args.row_bytes = plan.row_bytes;
    b->args.send = b->send.get();
    b->args.send_counts = b->counts.get();
    b->args.recv = b->recv.get();
    b->args.recv_capacity_rows = capacity;
    b->args.max_rows = plan.max_rows;
    return b;
  }

  // One exchange of `plan` in `mode`; checks every received row, the plan on the host (exact)
  // and on the device, and the poisoned rows past what was received.
  void runAndCheck(const RailPlan& plan, bool worst, int iteration) {
    const int m = nodes();
    const int64_t rb = plan.row_bytes;
    const auto buffers = buffersFor(plan, worst);
    const int64_t capacity = buffers->args.recv_capacity_rows;
    const nccl::RailExchangeResult result = exchange_->exchange(buffers->args, stream());
    exchange_->wait(stream());

    const std::string where = " (rank " + std::to_string(rank()) + ", iteration " +
                              std::to_string(iteration) + (worst ? ", worst-case)" : ", exact)");
    std::vector<int64_t> offsets(m);
    int64_t next = 0;
    for (int s = 0; s < m; ++s) {
      offsets[s] = worst ? s * plan.max_rows : next;
      next += plan.counts[s][me()];
    }
    if (!worst) {
      ASSERT_EQ(result.recv_counts.size(), static_cast<size_t>(m)) << where;
      EXPECT_EQ(result.recv_rows, plan.recvRows(me())) << where;
      for (int s = 0; s < m; ++s) {
        EXPECT_EQ(result.recv_counts[s], plan.counts[s][me()]) << "from node " << s << where;
        EXPECT_EQ(result.recv_offsets[s], offsets[s]) << "from node " << s << where;
      }
    }
    const auto dev_counts = test::DeviceArray<int32_t>::downloadFrom(exchange_->recvCountsDevice(),
                                                                     static_cast<size_t>(m));
    const auto dev_offsets = test::DeviceArray<int64_t>::downloadFrom(
        exchange_->recvOffsetsDevice(), static_cast<size_t>(m));
    const std::vector<uint8_t> got = buffers->recv.download(buffers->recv.size());
    for (int s = 0; s < m; ++s) {
      EXPECT_EQ(dev_counts[s], plan.counts[s][me()]) << "device count from node " << s << where;
      EXPECT_EQ(dev_offsets[s], offsets[s]) << "device offset from node " << s << where;
      const std::string bad = checkRows(got, plan, s, offsets[s], plan.counts[s][me()]);
      EXPECT_EQ(bad, "") << where;
    }
    // Past the receive rows: exact, the slack and the guard; worst-case, the guard (unused slot
    // rows carry the sender's filler).
    const size_t used = static_cast<size_t>((worst ? capacity : plan.recvRows(me())) * rb);
    EXPECT_EQ(checkPoison(got, used, "past the received rows"), "") << where;
  }

  core::Topology topology_;
  nccl::RailComm rail_;
  std::unique_ptr<nccl::RailTransport> exchange_;
};

TEST_F(RailExchangeGpu, ExactRandomCounts) {
  if (!setUpRail()) GTEST_SKIP() << "no GIN here (EPCOMM_SKIPPED_NO_GIN)";
  for (int it = 0; it < 6 && !HasFailure(); ++it) {
    runAndCheck(makePlan(nodes(), topology_.local, it), false, it);
  }
}

TEST_F(RailExchangeGpu, WorstCaseRandomCounts) {
  if (!setUpRail()) GTEST_SKIP() << "no GIN here (EPCOMM_SKIPPED_NO_GIN)";
  for (int it = 0; it < 6 && !HasFailure(); ++it) {
    runAndCheck(makePlan(nodes(), topology_.local, it), true, it);
  }
}

TEST_F(RailExchangeGpu, ModesInterleaved) {
  if (!setUpRail()) GTEST_SKIP() << "no GIN here (EPCOMM_SKIPPED_NO_GIN)";
  for (int it = 0; it < 6 && !HasFailure(); ++it) {
    runAndCheck(makePlan(nodes(), topology_.local, 100 + it), it % 2 == 1, it);
  }
}

// Worst-case mode captured once in a CUDA graph and replayed with new counts and rows: nothing
// the graph does depends on the host seeing the counts.
TEST_F(RailExchangeGpu, WorstCaseGraphReplays) {
  if (!setUpRail()) GTEST_SKIP() << "no GIN here (EPCOMM_SKIPPED_NO_GIN)";
  util::OwnedStream capture_stream = util::OwnedStream::create(cudaStreamNonBlocking);
  const int m = nodes();
  // The shape (row bytes, max_rows) is fixed by the first plan; later plans keep it.
  RailPlan plan = makePlan(m, topology_.local, 200);
  const auto buffers = buffersFor(plan, true);
  const int64_t rb = plan.row_bytes;
  const int64_t capacity = buffers->args.recv_capacity_rows;
  util::GraphExec graph = util::captureGraph(
      capture_stream.get(), [&] { exchange_->exchange(buffers->args, capture_stream.get()); });
  for (int replay = 0; replay < 3 && !HasFailure(); ++replay) {
    RailPlan next = makePlan(m, topology_.local, 300 + replay);
    for (auto& from : next.counts) {
      for (auto& c : from) c = static_cast<int32_t>(c % (plan.max_rows + 1));
    }
    next.row_bytes = rb;
    next.max_rows = plan.max_rows;
    buffers->send.upload(sendBytes(next, true));
    buffers->counts.upload(next.counts[me()]);
    EPCOMM_TEST_CUDA(cudaMemset(buffers->recv.get(), kPoison, buffers->recv.size()));
    // The capture stream is non-blocking: nothing orders it after the legacy-stream memset.
    EPCOMM_TEST_CUDA(cudaDeviceSynchronize());
    EPCOMM_TEST_CUDA(cudaGraphLaunch(graph.get(), capture_stream.get()));
    exchange_->wait(capture_stream.get());
    const auto dev_counts = test::DeviceArray<int32_t>::downloadFrom(exchange_->recvCountsDevice(),
                                                                     static_cast<size_t>(m));
    const std::vector<uint8_t> got = buffers->recv.download(buffers->recv.size());
    for (int s = 0; s < m; ++s) {
      EXPECT_EQ(dev_counts[s], next.counts[s][me()]) << "replay " << replay << " node " << s;
      EXPECT_EQ(checkRows(got, next, s, s * plan.max_rows, next.counts[s][me()]), "")
          << "replay " << replay;
    }
    EXPECT_EQ(checkPoison(got, static_cast<size_t>(capacity * rb), "guard"), "")
        << "replay " << replay;
  }
}

// The ranks of node 1 publish a count for node 0 far over its capacity (exact) or max_rows
// (worst-case). Every rank must fail, within the deadline, with the sender, receiver, value and
// limit named; nothing may land in node 0's receive buffer past its end; the rail stays usable.
void expectBadCountEverywhere(const test::RankOutcomes& all, int32_t value, double limit_s) {
  EXPECT_TRUE(all.allThrew()) << all.describe();
  for (const auto& o : all.ranks) {
    if (!o.threw) continue;
    EXPECT_TRUE(o.code == ErrorCode::kInvalidArgument || o.code == ErrorCode::kRemote)
        << all.describe();
    EXPECT_NE(o.what.find(std::to_string(value)), std::string::npos) << o.what;
    EXPECT_NE(o.what.find("node 1 (rank"), std::string::npos) << o.what;
    EXPECT_NE(o.what.find("node 0 (rank"), std::string::npos) << o.what;
    EXPECT_LT(o.seconds, limit_s) << o.what;
  }
}

TEST_F(RailExchangeGpu, BadCountFailsEveryRank) {
  if (!setUpRail(kFaultTimeoutS)) GTEST_SKIP() << "no GIN here (EPCOMM_SKIPPED_NO_GIN)";
  if (nodes() < 2) GTEST_SKIP() << "needs at least 2 nodes (EPCOMM_HOSTID per rank)";
  const int m = nodes();
  for (const bool worst : {false, true}) {
    SCOPED_TRACE(worst ? "worst-case" : "exact");
    const RailPlan plan = makePlan(m, topology_.local, worst ? 401 : 400);
    const auto buffers = buffersFor(plan, worst);
    const int64_t capacity = buffers->args.recv_capacity_rows;
    const int32_t bad = 1000000 + static_cast<int32_t>(worst);
    if (me() == 1) nccl::testing::corruptNextRailCount(0, bad);
    const test::RankOutcomes all = outcomesOf([&] {
      exchange_->exchange(buffers->args, stream());
      exchange_->wait(stream());
    });
    expectBadCountEverywhere(all, bad, kFaultTimeoutS);
    const std::vector<uint8_t> got = buffers->recv.download(buffers->recv.size());
    const auto dev_counts = test::DeviceArray<int32_t>::downloadFrom(exchange_->recvCountsDevice(),
                                                                     static_cast<size_t>(m));
    if (worst) {
      // The fixed-size payload moved; every count reads 0 and the guard is intact.
      for (int s = 0; s < m; ++s) EXPECT_EQ(dev_counts[s], 0) << "rank " << rank();
      EXPECT_EQ(checkPoison(got, static_cast<size_t>(capacity * plan.row_bytes), "guard"), "");
    } else {
      // Rejected before any payload was posted: the whole buffer is still poison.
      EXPECT_EQ(checkPoison(got, 0, "exact receive buffer after a rejected count"), "");
    }
    if (anyRankFailed()) return;
    // Still usable: a clean exchange of the same mode works.
    runAndCheck(makePlan(m, topology_.local, 500 + static_cast<int>(worst)), worst, 0);
  }
}

// The ranks of node 1 never call: the others' count exchange must end at the deadline with the
// communicator aborted and a TimeoutError naming a rank of node 1.
TEST_F(RailExchangeGpu, MissingPeerTimesOut) {
  constexpr double kShortS = 3.0;
  if (!setUpRail(kShortS)) GTEST_SKIP() << "no GIN here (EPCOMM_SKIPPED_NO_GIN)";
  if (nodes() < 2) GTEST_SKIP() << "needs at least 2 nodes (EPCOMM_HOSTID per rank)";
  const RailPlan plan = makePlan(nodes(), topology_.local, 600);
  const auto buffers = buffersFor(plan, false);
  const test::RankOutcomes all = outcomesOf([&] {
    if (me() != 1) exchange_->exchange(buffers->args, stream());
  });
  for (int r = 0; r < size(); ++r) {
    const auto& o = all.ranks[r];
    if (!o.threw) continue;
    EXPECT_EQ(o.code, ErrorCode::kTimeout) << all.describe();
    EXPECT_LT(o.seconds, kShortS + 10) << o.what;
  }
  if (me() != 1) {
    EXPECT_TRUE(all.ranks[rank()].threw) << all.describe();
    EXPECT_NE(all.ranks[rank()].what.find(std::to_string(globalRank(1))), std::string::npos)
        << all.ranks[rank()].what;
    EXPECT_FALSE(static_cast<bool>(rail_.comm)) << "the communicator must be aborted";
  }
  // The rail is gone on every rank: the skipped ranks abort theirs too (their peers aborted).
  EPCOMM_TEST_CUDA(cudaStreamSynchronize(stream()));
  exchange_.reset();
  rail_.comm.abort();
}

#if defined(EPCOMM_TEST_RAIL_GIN)
// GIN, worst-case: the ranks of node 1 never call. The others' kernels must give up at their
// device deadline (no hang), and wait() must throw TimeoutError naming a rank of node 1, with the
// communicator aborted.
TEST_F(RailExchangeGpu, GinMissingPeerTimesOutOnTheDevice) {
  constexpr double kShortS = 3.0;
  if (!setUpRail(kShortS)) GTEST_SKIP() << "no GIN here (EPCOMM_SKIPPED_NO_GIN)";
  if (nodes() < 2) GTEST_SKIP() << "needs at least 2 nodes (EPCOMM_HOSTID per rank)";
  const RailPlan plan = makePlan(nodes(), topology_.local, 700);
  const auto buffers = buffersFor(plan, true);
  const test::RankOutcomes all = outcomesOf([&] {
    if (me() == 1) return;
    exchange_->exchange(buffers->args, stream());
    exchange_->wait(stream());
  });
  if (me() != 1) {
    const auto& o = all.ranks[rank()];
    EXPECT_TRUE(o.threw) << all.describe();
    EXPECT_EQ(o.code, ErrorCode::kTimeout) << o.what;
    EXPECT_NE(o.what.find("rank " + std::to_string(globalRank(1))), std::string::npos) << o.what;
    EXPECT_LT(o.seconds, kShortS + 10) << o.what;
    EXPECT_FALSE(static_cast<bool>(rail_.comm)) << "the communicator must be aborted";
  }
  EPCOMM_TEST_CUDA(cudaStreamSynchronize(stream()));
  exchange_.reset();
  rail_.comm.abort();
}
#endif

}  // namespace
}  // namespace epcomm
