// SPDX-License-Identifier: Apache-2.0
// The hierarchical path's host/device protocol (kernels/node_protocol.hpp): the bucket row layout
// and where a global expert lives in its node's buffer, for node-blocked and interleaved ranks.
#include <gtest/gtest.h>

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "core/topology.hpp"
#include "kernels/node_protocol.hpp"

namespace epcomm {
namespace {

using core::NodeKey;
using core::NodeKeySource;

core::Topology topologyOf(const std::vector<std::string>& hosts) {
  std::vector<NodeKey> keys;
  for (const std::string& h : hosts) keys.push_back(NodeKey{NodeKeySource::kEnvHostId, h});
  return core::buildTopology(0, keys);
}

TEST(NodeProtocol, RowLayout) {
  // DeepSeek-V3 shape: BF16 row 14336 bytes + 8 ids + 8 weights = 14400 (16-byte multiple).
  node::RowLayout bf16 = node::rowLayout(7168, 2, 8);
  EXPECT_EQ(bf16.data_bytes, 14336);
  EXPECT_EQ(bf16.scales_bytes, 0);
  EXPECT_EQ(bf16.ids_off, 14336);
  EXPECT_EQ(bf16.weights_off, 14336 + 32);
  EXPECT_EQ(bf16.row_bytes, 14400);
  // FP8: 7168 data + 56 float scales, then ids and weights; padded to 16 bytes.
  node::RowLayout fp8 = node::rowLayout(7168, 1, 8);
  EXPECT_EQ(fp8.data_bytes, 7168);
  EXPECT_EQ(fp8.scales_off, 7168);
  EXPECT_EQ(fp8.scales_bytes, 224);
  EXPECT_EQ(fp8.ids_off, 7392);
  EXPECT_EQ(fp8.row_bytes, 7456);
  // Odd top-k: the row is padded.
  node::RowLayout odd = node::rowLayout(128, 2, 3);
  EXPECT_EQ(odd.weights_off, 256 + 12);
  EXPECT_EQ(odd.row_bytes, 288);
  EXPECT_EQ(odd.row_bytes % 16, 0);
}

// Every node's experts map one to one onto its buffer's [0, E / M), each onto the node-local
// rank that owns it (local id / L == local index of the owner), in any placement.
void checkMapping(const std::vector<std::string>& hosts, int num_experts) {
  const core::Topology t = topologyOf(hosts);
  const int R = t.size, M = t.num_nodes, L = num_experts / R;
  for (int m = 0; m < M; ++m) {
    std::set<int64_t> seen;
    for (int64_t e = 0; e < num_experts; ++e) {
      const int owner = static_cast<int>(e / L);
      const int64_t local =
          node::nodeLocalExpert(e, m, num_experts, L, t.node_of.data(), t.local_of.data());
      if (t.node_of[owner] != m) {
        EXPECT_EQ(local, -1) << "expert " << e << " is not on node " << m;
        continue;
      }
      EXPECT_EQ(node::nodeOfExpert(e, L, t.node_of.data()), m);
      ASSERT_GE(local, 0);
      ASSERT_LT(local, num_experts / M) << "expert " << e << " node " << m;
      EXPECT_EQ(local / L, t.local_of[owner]) << "expert " << e;
      EXPECT_EQ(local % L, e % L) << "the receiver's local expert id is the same as on one node";
      EXPECT_TRUE(seen.insert(local).second) << "node expert " << local << " twice";
    }
    EXPECT_EQ(static_cast<int>(seen.size()), num_experts / M);
    // -1 stays -1; invalid ids stay invalid in the node's buffer (it rejects them).
    EXPECT_EQ(node::nodeLocalExpert(-1, m, num_experts, L, t.node_of.data(), t.local_of.data()),
              -1);
    for (int64_t bad : {int64_t{-2}, int64_t{num_experts}, int64_t{1} << 32}) {
      const int64_t got =
          node::nodeLocalExpert(bad, m, num_experts, L, t.node_of.data(), t.local_of.data());
      EXPECT_TRUE(got < -1 || got >= num_experts / M) << bad << " became " << got;
      const int32_t travelled = node::clampId(bad);
      EXPECT_FALSE(node::validExpert(travelled, num_experts)) << bad;
    }
  }
}

TEST(NodeProtocol, ExpertMappingNodeBlocked) {
  checkMapping({"a", "a", "b", "b"}, 16);
  checkMapping({"a", "b"}, 8);
  checkMapping({"a", "b", "c", "d"}, 32);
}

TEST(NodeProtocol, ExpertMappingInterleaved) {
  checkMapping({"a", "b", "a", "b"}, 16);
  checkMapping({"x", "y", "z", "x", "y", "z"}, 12);
}

}  // namespace
}  // namespace epcomm
