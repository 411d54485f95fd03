// SPDX-License-Identifier: Apache-2.0
// Cross-node topology through the MPI bootstrap, CPU only. CTest starts this binary several ways
// (tests/CMakeLists.txt): plainly (one node), and with EPCOMM_HOSTID set per rank to simulate
// 2 nodes x 1 rank, 2 x 2 (node-blocked and interleaved) and 4 x 1. EPCOMM_TEST_NODES and
// EPCOMM_TEST_RANKS_PER_NODE say what the launch simulated (1 x size when unset).
//
// Every rank runs every test and reaches every collective in the same order, also on failures.
#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "common/mp_fixture.hpp"
#include "core/topology.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/error.hpp"

namespace epcomm {
namespace {

using core::discoverTopology;
using core::localNodeKey;
using core::NodeKeySource;
using core::RailId;
using core::Topology;

int envInt(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return (value != nullptr && value[0] != '\0') ? std::atoi(value) : fallback;
}

class ScopedHostId {
 public:
  explicit ScopedHostId(const std::string& value) {
    if (const char* old = std::getenv("EPCOMM_HOSTID")) saved_ = old;
    setenv("EPCOMM_HOSTID", value.c_str(), 1);
  }
  ~ScopedHostId() {
    if (saved_) {
      setenv("EPCOMM_HOSTID", saved_->c_str(), 1);
    } else {
      unsetenv("EPCOMM_HOSTID");
    }
  }

 private:
  std::optional<std::string> saved_;
};

class TopologyMp : public test::MultiRankTest {};

// What the launch simulated: node and local index agree with the EPCOMM_HOSTID each rank got,
// every rank sees the same tables, rails hold one rank per node.
TEST_F(TopologyMp, MatchesTheLaunch) {
  const int nodes = envInt("EPCOMM_TEST_NODES", 1);
  const int per_node = envInt("EPCOMM_TEST_RANKS_PER_NODE", size());
  ASSERT_EQ(nodes * per_node, size()) << "the CTest entry and the launch disagree";

  const Topology t = discoverTopology(bootstrap(), localNodeKey());
  EXPECT_EQ(t.rank, rank());
  EXPECT_EQ(t.size, size());
  EXPECT_EQ(t.num_nodes, nodes);
  EXPECT_EQ(t.ranks_per_node, per_node);
  EXPECT_EQ(t.source,
            std::getenv("EPCOMM_HOSTID") ? NodeKeySource::kEnvHostId : NodeKeySource::kHost);
  if (const char* host_id = std::getenv("EPCOMM_HOSTID")) {
    EXPECT_EQ(t.node_names[t.node], host_id);
  }
  EXPECT_EQ(t.rankAt(t.node, t.local), rank());

  // Every rank holds the same tables: gather rank_at from all and compare with rank 0's.
  std::vector<int> all(static_cast<size_t>(size()) * size());
  bootstrap().allGather(t.rank_at.data(), all.data(), sizeof(int) * size());
  for (int r = 0; r < size(); ++r) {
    for (int i = 0; i < size(); ++i) {
      EXPECT_EQ(all[static_cast<size_t>(r) * size() + i], t.rank_at[i])
          << "rank " << r << " sees another rank at slot " << i;
    }
  }
  // Rails: one rank per node, all with my local index; my node: my local group.
  const std::vector<int> rail = t.railRanks(t.local);
  ASSERT_EQ(static_cast<int>(rail.size()), nodes);
  for (int n = 0; n < nodes; ++n) {
    EXPECT_EQ(t.node_of[rail[n]], n);
    EXPECT_EQ(t.local_of[rail[n]], t.local);
  }
  if (rank() == 0) std::printf("[topology] %s\n", t.describe().c_str());
}

// One 128-byte id per rail, made only by the rail's root on node 0, reaches exactly that rail.
TEST_F(TopologyMp, RailIdExchange) {
  const Topology t = discoverTopology(bootstrap(), localNodeKey());
  int made = 0;
  const RailId id = core::exchangeRailId(bootstrap(), t, [&] {
    ++made;
    RailId out{};
    for (size_t i = 0; i < core::kRailIdBytes; ++i) {
      out.bytes[i] = static_cast<unsigned char>(rank() * 31 + t.local * 7 + i);
    }
    return out;
  });
  EXPECT_EQ(made, t.node == 0 ? 1 : 0);
  const int root = t.rankAt(0, t.local);
  for (size_t i = 0; i < core::kRailIdBytes; ++i) {
    ASSERT_EQ(id.bytes[i], static_cast<unsigned char>(root * 31 + t.local * 7 + i))
        << "rank " << rank() << " byte " << i << ": not the id of rail " << t.local << "'s root "
        << root;
  }
}

// A failing root fails the exchange on every rank: its own error there, kRemote naming it
// elsewhere; nobody waits.
TEST_F(TopologyMp, RailRootFailureReachesEveryRank) {
  const Topology t = discoverTopology(bootstrap(), localNodeKey());
  const int failing_root = t.rankAt(0, t.ranks_per_node - 1);
  const test::RankOutcomes all = outcomesOf([&] {
    core::exchangeRailId(bootstrap(), t, [&]() -> RailId {
      if (rank() == failing_root) throw InvalidArgument("test: no unique id here");
      return RailId{};
    });
  });
  EXPECT_TRUE(all.allThrew()) << all.describe();
  if (rank() != failing_root) {
    EXPECT_NE(all.ranks[rank()].what.find("rank " + std::to_string(failing_root)),
              std::string::npos)
        << all.describe();
  }
}

// Uneven nodes (rank 0 alone, the others together): the same InvalidArgument on every rank.
TEST_F(TopologyMp, UnevenNodesFailOnEveryRank) {
  if (size() < 3) GTEST_SKIP() << "needs 3 ranks for uneven nodes";
  ScopedHostId env(rank() == 0 ? "lonely" : "crowd");
  const test::RankOutcomes all = outcomesOf([&] { discoverTopology(bootstrap(), localNodeKey()); });
  EXPECT_TRUE(all.allThrew()) << all.describe();
  for (const auto& outcome : all.ranks) {
    EXPECT_NE(outcome.what.find("different numbers of ranks"), std::string::npos) << all.describe();
  }
}

// Some ranks with EPCOMM_HOSTID, some without: every rank names the disagreement.
TEST_F(TopologyMp, MixedSourcesFailOnEveryRank) {
  if (size() < 2) GTEST_SKIP() << "needs 2 ranks";
  std::optional<ScopedHostId> env;
  std::optional<std::string> saved;
  if (const char* old = std::getenv("EPCOMM_HOSTID")) saved = old;
  if (rank() == 0) {
    env.emplace("only-rank-0");
  } else {
    unsetenv("EPCOMM_HOSTID");
  }
  const test::RankOutcomes all = outcomesOf([&] { discoverTopology(bootstrap(), localNodeKey()); });
  if (rank() != 0 && saved) setenv("EPCOMM_HOSTID", saved->c_str(), 1);
  EXPECT_TRUE(all.allThrew()) << all.describe();
  for (const auto& outcome : all.ranks) {
    EXPECT_NE(outcome.what.find("disagree on what a node is"), std::string::npos) << all.describe();
  }
}

// EpBuffer works inside one node: ranks that name two nodes (EPCOMM_HOSTID) fail its creation on
// every rank, before any GPU work (so this runs without a GPU), pointing at ScaleOutBuffer.
TEST_F(TopologyMp, EpBufferAcrossNodesFailsOnEveryRank) {
  if (size() < 2 || size() % 2 != 0) GTEST_SKIP() << "needs an even number of ranks";
  ScopedHostId env("ep-node-" + std::to_string(rank() % 2));
  BufferConfig config;
  config.hidden = 256;
  config.num_experts = 8;
  config.max_tokens_per_rank = 16;
  const test::RankOutcomes all = outcomesOf([&] { EpBuffer buffer(bootstrap(), config); });
  EXPECT_TRUE(all.allThrew()) << all.describe();
  for (const auto& outcome : all.ranks) {
    EXPECT_EQ(outcome.code, ErrorCode::kInvalidArgument) << all.describe();
    EXPECT_NE(outcome.what.find("2 nodes"), std::string::npos) << all.describe();
    EXPECT_NE(outcome.what.find("ScaleOutBuffer"), std::string::npos) << all.describe();
  }
}

}  // namespace
}  // namespace epcomm
