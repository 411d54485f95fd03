// SPDX-License-Identifier: Apache-2.0
// epcomm_nccl on GPUs (skipped without one): rail communicators created through the epcomm
// Bootstrap, used, and finalized within deadlines. With EPCOMM_HOSTID per rank CTest also sets
// NCCL_HOSTID to the same value and NCCL_SOCKET_IFNAME=lo, so NCCL sees separate nodes and talks
// over loopback sockets: that way several "nodes" share one GPU (under MPS for speed).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>
#include <nccl.h>

#include <string>

#include "common/mp_fixture.hpp"
#include "core/topology.hpp"
#include "nccl/rail_comms.hpp"

namespace epcomm {
namespace {

constexpr double kTimeoutS = 120.0;

class NcclGpu : public test::MultiRankGpuTest {};

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

}  // namespace
}  // namespace epcomm
