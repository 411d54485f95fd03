// SPDX-License-Identifier: Apache-2.0
// epcomm_nccl without a GPU (registered only when epcomm_nccl is built): the loaded NCCL's
// version, and real ncclUniqueIds travelling through the epcomm Bootstrap, one per rail. CTest
// runs it plainly and with EPCOMM_HOSTID per rank (2x1, 2x2, 4x1), like mp_topology.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/mp_fixture.hpp"
#include "core/scale_out.hpp"
#include "core/topology.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/error.hpp"
#include "epcomm/nccl.hpp"
#include "nccl/rail_comms.hpp"
#include "nccl/rail_transport.hpp"

namespace epcomm {
namespace {

class NcclCpu : public test::MultiRankTest {};

TEST_F(NcclCpu, RuntimeVersionIsSupported) {
  const std::string version = nccl::runtimeVersion();
  int major = 0, minor = 0;
  ASSERT_EQ(std::sscanf(version.c_str(), "%d.%d", &major, &minor), 2) << version;
  EXPECT_TRUE(major > 2 || (major == 2 && minor >= 28))
      << "NCCL " << version << " loaded; epcomm_nccl needs 2.28 or newer";
  if (rank() == 0) {
    std::printf("[nccl] built against %s, running %s\n", nccl::buildVersion(), version.c_str());
  }
}

// Every rank of a rail holds its root's id; the rails' ids differ.
TEST_F(NcclCpu, OneUniqueIdPerRail) {
  const core::Topology t = core::discoverTopology(bootstrap(), core::localNodeKey());
  const core::RailId mine = core::exchangeRailId(bootstrap(), t, nccl::newRailUniqueId);
  std::vector<core::RailId> all(static_cast<size_t>(size()));
  bootstrap().allGather(&mine, all.data(), sizeof(mine));
  for (int a = 0; a < size(); ++a) {
    for (int b = a + 1; b < size(); ++b) {
      const bool same_rail = t.local_of[a] == t.local_of[b];
      const bool same_id = std::memcmp(&all[a], &all[b], sizeof(core::RailId)) == 0;
      EXPECT_EQ(same_id, same_rail) << "ranks " << a << " and " << b << " (rails " << t.local_of[a]
                                    << " and " << t.local_of[b] << ")";
    }
  }
}

// EpBuffer across nodes with epcomm::nccl::enableScaleOut() on some ranks only: creation fails on
// every rank, naming a rank without, before any GPU work (so this runs without a GPU).
TEST_F(NcclCpu, ScaleOutEnabledOnSomeRanksOnlyFailsEveryRank) {
  const core::Topology t = core::discoverTopology(bootstrap(), core::localNodeKey());
  if (t.num_nodes < 2) GTEST_SKIP() << "needs several nodes (EPCOMM_HOSTID per rank)";
  if (rank() == 0) nccl::enableScaleOut();
  BufferConfig config;
  config.hidden = 256;
  config.num_experts = 8;
  config.max_tokens_per_rank = 16;
  const test::RankOutcomes all = outcomesOf([&] { EpBuffer buffer(bootstrap(), config); });
  core::setScaleOutFactory({});
  EXPECT_TRUE(all.allThrew()) << all.describe();
  for (const auto& outcome : all.ranks) {
    EXPECT_EQ(outcome.code, ErrorCode::kInvalidArgument) << all.describe();
    EXPECT_NE(outcome.what.find("enableScaleOut() was called on some ranks but not on rank 1"),
              std::string::npos)
        << all.describe();
  }
}

// ScaleOutBuffer's creation checks, before any GPU work (so these run without a GPU): a config
// that differs between ranks, and an LL capacity the node-local batch cannot hold, fail every rank.
TEST_F(NcclCpu, ScaleOutBufferConfigMismatchFailsEveryRank) {
  if (size() < 2) GTEST_SKIP() << "needs 2 ranks";
  BufferConfig config;
  config.hidden = 256;
  config.num_experts = 8;
  config.max_tokens_per_rank = rank() == 1 ? 32 : 16;
  const test::RankOutcomes all =
      outcomesOf([&] { nccl::ScaleOutBuffer buffer(bootstrap(), config); });
  EXPECT_TRUE(all.allThrew()) << all.describe();
  for (const auto& outcome : all.ranks) {
    EXPECT_EQ(outcome.code, ErrorCode::kInvalidArgument) << all.describe();
    EXPECT_NE(outcome.what.find("max_tokens_per_rank is 16 on rank 0 but 32 on rank 1"),
              std::string::npos)
        << all.describe();
  }
}

TEST_F(NcclCpu, ScaleOutBufferLlBatchTooLargeFailsEveryRank) {
  const core::Topology t = core::discoverTopology(bootstrap(), core::localNodeKey());
  if (t.num_nodes < 2) GTEST_SKIP() << "needs several nodes (EPCOMM_HOSTID per rank)";
  BufferConfig config;
  config.hidden = 256;
  config.num_experts = 8;
  config.max_tokens_per_rank = 16;
  config.ll_max_tokens_per_rank = kMaxLlTokensPerRank;  // x nodes > kMaxLlTokensPerRank
  const test::RankOutcomes all =
      outcomesOf([&] { nccl::ScaleOutBuffer buffer(bootstrap(), config); });
  EXPECT_TRUE(all.allThrew()) << all.describe();
  for (const auto& outcome : all.ranks) {
    EXPECT_EQ(outcome.code, ErrorCode::kInvalidArgument) << all.describe();
    EXPECT_NE(outcome.what.find("over kMaxLlTokensPerRank"), std::string::npos) << all.describe();
  }
}

// EPCOMM_RAIL_TRANSPORT (docs/scale-out.md "Rail transport"), checked at ScaleOutBuffer creation
// before any GPU work: a bad value on one rank, GIN asked of a build without it, and a mix of
// backends fail every rank; nothing falls back silently.
class RailTransportEnv : public NcclCpu {
 protected:
  void TearDown() override {
    unsetenv("EPCOMM_RAIL_TRANSPORT");
    NcclCpu::TearDown();
  }
  static BufferConfig config() {
    BufferConfig c;
    c.hidden = 256;
    c.num_experts = 8;
    c.max_tokens_per_rank = 16;
    return c;
  }
};

TEST_F(RailTransportEnv, BadValueFailsEveryRank) {
  const int bad = size() - 1;
  if (rank() == bad) setenv("EPCOMM_RAIL_TRANSPORT", "rdma", 1);
  const test::RankOutcomes all =
      outcomesOf([&] { nccl::ScaleOutBuffer buffer(bootstrap(), config()); });
  EXPECT_TRUE(all.allThrew()) << all.describe();
  for (int r = 0; r < size(); ++r) {
    const auto& o = all.ranks[r];
    EXPECT_EQ(o.code, r == bad ? ErrorCode::kInvalidArgument : ErrorCode::kRemote)
        << all.describe();
    EXPECT_NE(o.what.find("EPCOMM_RAIL_TRANSPORT = 'rdma'"), std::string::npos) << o.what;
    EXPECT_NE(o.what.find("gin"), std::string::npos) << o.what;  // names the accepted values
  }
}

TEST_F(RailTransportEnv, GinWithoutTheBackendFailsEveryRank) {
  if (nccl::ginBackendBuilt()) {
    GTEST_SKIP() << "this epcomm_nccl has the GIN backend (its creation needs a GPU: nccl_gin)";
  }
  setenv("EPCOMM_RAIL_TRANSPORT", "gin", 1);
  const test::RankOutcomes all =
      outcomesOf([&] { nccl::ScaleOutBuffer buffer(bootstrap(), config()); });
  EXPECT_TRUE(all.allThrew()) << all.describe();
  for (const auto& o : all.ranks) {
    EXPECT_EQ(o.code, ErrorCode::kUnsupported) << all.describe();
    EXPECT_NE(o.what.find("built without the GIN backend"), std::string::npos) << o.what;
    EXPECT_NE(o.what.find(nccl::buildVersion()), std::string::npos) << o.what;
  }
}

TEST_F(RailTransportEnv, MixedBackendsFailEveryRank) {
  if (!nccl::ginBackendBuilt()) GTEST_SKIP() << "needs the GIN backend in this build";
  if (size() < 2) GTEST_SKIP() << "needs 2 ranks";
  setenv("EPCOMM_RAIL_TRANSPORT", rank() == 0 ? "gin" : "nccl", 1);
  const test::RankOutcomes all =
      outcomesOf([&] { nccl::ScaleOutBuffer buffer(bootstrap(), config()); });
  EXPECT_TRUE(all.allThrew()) << all.describe();
  for (const auto& o : all.ranks) {
    EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << all.describe();
    EXPECT_NE(o.what.find("EPCOMM_RAIL_TRANSPORT"), std::string::npos) << o.what;
    EXPECT_NE(o.what.find("differs between ranks"), std::string::npos) << o.what;
  }
}

}  // namespace
}  // namespace epcomm
