// SPDX-License-Identifier: Apache-2.0
// Cross-node topology (src/core/topology.hpp), host only: node and local indices, rails, the
// errors for mixed key sources and uneven nodes, EPCOMM_HOSTID, the rail-id choice.
#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "core/topology.hpp"
#include "epcomm/error.hpp"

namespace epcomm::core {
namespace {

std::vector<NodeKey> keysOf(const std::vector<std::string>& names,
                            NodeKeySource source = NodeKeySource::kEnvHostId) {
  std::vector<NodeKey> keys;
  for (const auto& name : names) keys.push_back({source, name});
  return keys;
}

// The error text of buildTopology, or "" if it did not throw InvalidArgument.
std::string errorOf(int rank, const std::vector<NodeKey>& keys) {
  try {
    buildTopology(rank, keys);
  } catch (const Error& e) {
    if (e.code() == ErrorCode::kInvalidArgument) return e.what();
    return std::string("wrong code: ") + e.what();
  }
  return "";
}

TEST(Topology, OneNode) {
  const Topology t = buildTopology(2, keysOf({"a", "a", "a", "a"}, NodeKeySource::kHost));
  EXPECT_EQ(t.num_nodes, 1);
  EXPECT_EQ(t.ranks_per_node, 4);
  EXPECT_EQ(t.node, 0);
  EXPECT_EQ(t.local, 2);
  EXPECT_TRUE(t.blocked());
  EXPECT_EQ(t.railRanks(2), std::vector<int>({2}));
  EXPECT_EQ(t.describe(), "1 node x 4 ranks (nodes from the host name)");
}

// Every shape the mp tests simulate, seen from every rank.
TEST(Topology, BlockedShapes) {
  struct Shape {
    int nodes, per_node;
  };
  for (Shape s : {Shape{2, 1}, Shape{2, 2}, Shape{4, 1}, Shape{2, 4}, Shape{3, 8}}) {
    std::vector<std::string> names;
    for (int r = 0; r < s.nodes * s.per_node; ++r)
      names.push_back("n" + std::to_string(r / s.per_node));
    for (int r = 0; r < s.nodes * s.per_node; ++r) {
      const Topology t = buildTopology(r, keysOf(names));
      SCOPED_TRACE(t.describe() + " rank " + std::to_string(r));
      EXPECT_EQ(t.num_nodes, s.nodes);
      EXPECT_EQ(t.ranks_per_node, s.per_node);
      EXPECT_EQ(t.node, r / s.per_node);
      EXPECT_EQ(t.local, r % s.per_node);
      EXPECT_TRUE(t.blocked());
      for (int n = 0; n < s.nodes; ++n) {
        for (int l = 0; l < s.per_node; ++l) EXPECT_EQ(t.rankAt(n, l), n * s.per_node + l);
      }
      std::vector<int> rail;
      for (int n = 0; n < s.nodes; ++n) rail.push_back(n * s.per_node + t.local);
      EXPECT_EQ(t.railRanks(t.local), rail);
    }
  }
}

// Round-robin placement (mpirun --map-by node): nodes by lowest rank, locals by rank order.
TEST(Topology, InterleavedPlacement) {
  const auto keys = keysOf({"x", "y", "x", "y", "x", "y"});
  const Topology t = buildTopology(3, keys);
  EXPECT_EQ(t.num_nodes, 2);
  EXPECT_EQ(t.ranks_per_node, 3);
  EXPECT_EQ(t.node, 1);
  EXPECT_EQ(t.local, 1);
  EXPECT_FALSE(t.blocked());
  EXPECT_EQ(t.nodeRanks(0), std::vector<int>({0, 2, 4}));
  EXPECT_EQ(t.nodeRanks(1), std::vector<int>({1, 3, 5}));
  EXPECT_EQ(t.railRanks(2), std::vector<int>({4, 5}));
  EXPECT_EQ(t.node_names, std::vector<std::string>({"x", "y"}));
  EXPECT_NE(t.describe().find("not node-blocked"), std::string::npos);
}

TEST(Topology, UnevenNodesAreAnErrorThatSaysWhatIsSupported) {
  const std::string what = errorOf(0, keysOf({"a", "a", "b"}));
  EXPECT_NE(what.find("node 0 ('a') has 2 (ranks 0,1)"), std::string::npos) << what;
  EXPECT_NE(what.find("node 1 ('b') has 1 (ranks 2)"), std::string::npos) << what;
  EXPECT_NE(what.find("same number of ranks on every node"), std::string::npos) << what;
  EXPECT_NE(what.find("EPCOMM_HOSTID"), std::string::npos) << what;
  // Every rank gets the same error.
  EXPECT_EQ(errorOf(2, keysOf({"a", "a", "b"})).substr(0, 200), what.substr(0, 200));
}

TEST(Topology, MixedSourcesAreAnError) {
  std::vector<NodeKey> keys = keysOf({"a", "b"});
  keys[1].source = NodeKeySource::kHost;
  const std::string what = errorOf(0, keys);
  EXPECT_NE(what.find("rank 1 from the host name"), std::string::npos) << what;
  EXPECT_NE(what.find("on every rank or on none"), std::string::npos) << what;
}

TEST(Topology, FabricDomainKey) {
  unsigned char uuid[16];
  for (int i = 0; i < 16; ++i) uuid[i] = static_cast<unsigned char>(i * 17);
  EXPECT_EQ(fabricDomainKeyText(uuid, 7), "fabric:00112233445566778899aabbccddeeff/7");
}

class ScopedHostId {
 public:
  explicit ScopedHostId(const char* value) {
    if (const char* old = std::getenv("EPCOMM_HOSTID")) saved_ = old;
    if (value) {
      setenv("EPCOMM_HOSTID", value, 1);
    } else {
      unsetenv("EPCOMM_HOSTID");
    }
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

TEST(Topology, LocalNodeKeySources) {
  {
    ScopedHostId env(nullptr);
    const NodeKey host = localNodeKey();
    EXPECT_EQ(host.source, NodeKeySource::kHost);
    EXPECT_FALSE(host.text.empty());
    const NodeKey fabric = localNodeKey(std::string("fabric:ab/1"));
    EXPECT_EQ(fabric.source, NodeKeySource::kFabricDomain);
    EXPECT_EQ(fabric.text, "fabric:ab/1");
  }
  {
    ScopedHostId env("");  // empty counts as unset
    EXPECT_EQ(localNodeKey().source, NodeKeySource::kHost);
  }
  {
    ScopedHostId env("node7");  // wins over the fabric domain too
    const NodeKey key = localNodeKey(std::string("fabric:ab/1"));
    EXPECT_EQ(key.source, NodeKeySource::kEnvHostId);
    EXPECT_EQ(key.text, "node7");
  }
  {
    ScopedHostId env(std::string(kMaxNodeKeyBytes + 1, 'x').c_str());
    try {
      localNodeKey();
      ADD_FAILURE() << "a long EPCOMM_HOSTID was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find("EPCOMM_HOSTID"), std::string::npos) << e.what();
    }
  }
  {
    ScopedHostId env("a\tb");
    EXPECT_THROW(localNodeKey(), InvalidArgument);
  }
}

TEST(Topology, RailIdComesFromTheRailRootOnNodeZero) {
  // 2 nodes x 2 ranks, interleaved: node 0 = {0, 2}, node 1 = {1, 3}.
  const auto keys = keysOf({"x", "y", "x", "y"});
  std::vector<RailIdRecord> all(4);
  for (int r = 0; r < 4; ++r) {
    all[r] = {};
    all[r].magic = kRailIdMagic;
    all[r].ok = (r == 0 || r == 2) ? 1 : 0;
    all[r].id.bytes[0] = static_cast<unsigned char>(100 + r);
  }
  for (int r = 0; r < 4; ++r) {
    const Topology t = buildTopology(r, keys);
    const RailId id = pickRailId(t, all);
    EXPECT_EQ(id.bytes[0], t.local == 0 ? 100 : 102) << "rank " << r;
  }
  all[2].ok = -1;  // the root of rail 1 failed: every rank, of every rail, fails naming it
  for (int r = 0; r < 4; ++r) {
    try {
      pickRailId(buildTopology(r, keys), all);
      ADD_FAILURE() << "rank " << r << " took a rail id from a failed root";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kRemote);
      EXPECT_NE(std::string(e.what()).find("rank 2 (root of rail 1)"), std::string::npos);
    }
  }
  all[2].ok = 1;
  all[2].magic = 0;
  EXPECT_THROW(pickRailId(buildTopology(1, keys), all), InvalidArgument);
}

}  // namespace
}  // namespace epcomm::core
