// SPDX-License-Identifier: Apache-2.0
// Cross-node topology (core/topology.hpp): node keys, the all-gathered records, and the checks
// that every rank runs on the same data.
#include "core/topology.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <sstream>

#include "bootstrap/host_identity.hpp"
#include "check.hpp"

namespace epcomm::core {

namespace {

constexpr uint32_t kTopologyMagic = 0x45505450;  // "EPTP"

// One rank's record on the wire: fixed size, zero padded, so equal keys compare equal.
struct TopologyRecord {
  uint32_t magic;
  int32_t source;  // NodeKeySource
  char key[kMaxNodeKeyBytes + 1];
};
static_assert(sizeof(TopologyRecord) == 128, "one 128-byte record per rank");

// At most `limit` ranks of a list, "0,1,2,...(8 ranks)".
std::string rankList(const std::vector<int>& ranks, size_t limit = 8) {
  std::ostringstream os;
  for (size_t i = 0; i < ranks.size() && i < limit; ++i) os << (i ? "," : "") << ranks[i];
  if (ranks.size() > limit) os << ",... (" << ranks.size() << " ranks)";
  return os.str();
}

}  // namespace

const char* nodeKeySourceName(NodeKeySource source) {
  switch (source) {
    case NodeKeySource::kHost:
      return "host name";
    case NodeKeySource::kFabricDomain:
      return "NVLink fabric domain";
    case NodeKeySource::kEnvHostId:
      return "EPCOMM_HOSTID";
  }
  return "unknown";
}

std::string fabricDomainKeyText(const unsigned char cluster_uuid[16], uint32_t clique_id) {
  std::string text = "fabric:";
  char hex[3];
  for (int i = 0; i < 16; ++i) {
    std::snprintf(hex, sizeof(hex), "%02x", cluster_uuid[i]);
    text += hex;
  }
  return text + "/" + std::to_string(clique_id);
}

NodeKey localNodeKey(const std::optional<std::string>& fabric_domain) {
  if (std::optional<std::string> env = hostIdOverride()) {
    return {NodeKeySource::kEnvHostId, *env};
  }
  if (fabric_domain) {
    EPCOMM_CHECK(fabric_domain->size() <= kMaxNodeKeyBytes,
                 "fabric domain key longer than " << kMaxNodeKeyBytes << " bytes");
    return {NodeKeySource::kFabricDomain, *fabric_domain};
  }
  // hostname (<= 64) + '|' + boot id (36): fits; cut defensively (both ends of a cut compare
  // the same way on every rank).
  std::string host = epcomm::detail::hostIdentityText();
  if (host.size() > kMaxNodeKeyBytes) host.resize(kMaxNodeKeyBytes);
  return {NodeKeySource::kHost, host};
}

std::vector<int> Topology::nodeRanks(int node_index) const {
  std::vector<int> ranks;
  for (int l = 0; l < ranks_per_node; ++l) ranks.push_back(rankAt(node_index, l));
  return ranks;
}

std::vector<int> Topology::railRanks(int local_index) const {
  std::vector<int> ranks;
  for (int n = 0; n < num_nodes; ++n) ranks.push_back(rankAt(n, local_index));
  return ranks;
}

bool Topology::blocked() const {
  for (int r = 0; r < size; ++r) {
    if (node_of[r] != r / ranks_per_node || local_of[r] != r % ranks_per_node) return false;
  }
  return true;
}

std::string Topology::describe() const {
  std::ostringstream os;
  os << num_nodes << (num_nodes == 1 ? " node x " : " nodes x ") << ranks_per_node
     << (ranks_per_node == 1 ? " rank" : " ranks") << " (nodes from the "
     << nodeKeySourceName(source) << (blocked() ? "" : "; ranks not node-blocked") << ")";
  return os.str();
}

Topology buildTopology(int rank, const std::vector<NodeKey>& keys) {
  const int size = static_cast<int>(keys.size());
  EPCOMM_ARG_CHECK(size >= 1 && rank >= 0 && rank < size, "topology rank", rank,
                   "in [0, " << size << ")");
  for (int r = 1; r < size; ++r) {
    EPCOMM_CHECK_CODE(keys[r].source == keys[0].source, ErrorCode::kInvalidArgument,
                      "ranks disagree on what a node is: rank 0 takes its node from the "
                          << nodeKeySourceName(keys[0].source) << ", rank " << r << " from the "
                          << nodeKeySourceName(keys[r].source)
                          << ". Set EPCOMM_HOSTID on every rank or on none (and the same "
                             "memory mode everywhere)");
  }

  Topology t;
  t.rank = rank;
  t.size = size;
  t.source = keys[0].source;
  t.node_of.assign(size, -1);
  t.local_of.assign(size, -1);

  // Nodes numbered in order of their lowest rank; members in rank order.
  std::map<std::string, int> index_of;
  std::vector<std::vector<int>> members;
  for (int r = 0; r < size; ++r) {
    auto [it, inserted] = index_of.emplace(keys[r].text, static_cast<int>(members.size()));
    if (inserted) {
      members.emplace_back();
      t.node_names.push_back(keys[r].text);
    }
    t.node_of[r] = it->second;
    t.local_of[r] = static_cast<int>(members[it->second].size());
    members[it->second].push_back(r);
  }
  t.num_nodes = static_cast<int>(members.size());
  t.ranks_per_node = static_cast<int>(members[0].size());

  bool uniform = true;
  for (const auto& m : members) uniform = uniform && static_cast<int>(m.size()) == t.ranks_per_node;
  if (!uniform) {
    std::ostringstream os;
    os << "nodes have different numbers of ranks:";
    for (int n = 0; n < t.num_nodes; ++n) {
      os << (n ? ";" : "") << " node " << n << " ('" << t.node_names[n] << "') has "
         << members[n].size() << " (ranks " << rankList(members[n]) << ")";
    }
    os << ". epcomm across nodes needs the same number of ranks on every node (one rank per GPU "
          "and the same number of GPUs per node), because rail i links the i-th rank of every "
          "node; nodes are told apart by the "
       << nodeKeySourceName(t.source) << " (EPCOMM_HOSTID overrides it)";
    EPCOMM_CHECK_CODE(false, ErrorCode::kInvalidArgument, os.str());
  }

  t.rank_at.assign(static_cast<size_t>(size), -1);
  for (int n = 0; n < t.num_nodes; ++n) {
    for (int l = 0; l < t.ranks_per_node; ++l) {
      t.rank_at[static_cast<size_t>(n) * t.ranks_per_node + l] = members[n][l];
    }
  }
  t.node = t.node_of[rank];
  t.local = t.local_of[rank];
  return t;
}

Topology discoverTopology(Bootstrap& bootstrap, const NodeKey& mine) {
  EPCOMM_CHECK(mine.text.size() <= kMaxNodeKeyBytes && mine.text.find('\0') == std::string::npos,
               "node key of " << mine.text.size() << " bytes");
  TopologyRecord record;
  std::memset(&record, 0, sizeof(record));
  record.magic = kTopologyMagic;
  record.source = static_cast<int32_t>(mine.source);
  std::memcpy(record.key, mine.text.data(), mine.text.size());

  const int size = bootstrap.size();
  std::vector<TopologyRecord> all(static_cast<size_t>(size));
  bootstrap.allGather(&record, all.data(), sizeof(record));

  // Peer data is untrusted (CONVENTIONS 20): every rank checks every record the same way, so a
  // bad one fails on every rank with the same message.
  std::vector<NodeKey> keys(static_cast<size_t>(size));
  for (int r = 0; r < size; ++r) {
    const TopologyRecord& peer = all[r];
    const bool known_source = peer.source >= static_cast<int32_t>(NodeKeySource::kHost) &&
                              peer.source <= static_cast<int32_t>(NodeKeySource::kEnvHostId);
    EPCOMM_CHECK_CODE(
        peer.magic == kTopologyMagic && known_source && peer.key[kMaxNodeKeyBytes] == '\0',
        ErrorCode::kInvalidArgument,
        "rank " << r << " sent a malformed topology record (magic 0x" << std::hex << peer.magic
                << std::dec << ", source " << peer.source
                << "): a different epcomm version on that rank?");
    keys[r].source = static_cast<NodeKeySource>(peer.source);
    keys[r].text.assign(peer.key, strnlen(peer.key, kMaxNodeKeyBytes));
  }
  return buildTopology(bootstrap.rank(), keys);
}

RailId pickRailId(const Topology& topology, const std::vector<RailIdRecord>& all) {
  EPCOMM_CHECK(static_cast<int>(all.size()) == topology.size,
               "rail id records: " << all.size() << " for " << topology.size << " ranks");
  // Every root's record is checked, not only this rail's, so every rank fails the same way.
  for (int l = 0; l < topology.ranks_per_node; ++l) {
    const int root = topology.rankAt(0, l);
    const RailIdRecord& record = all[root];
    EPCOMM_CHECK_CODE(
        record.magic == kRailIdMagic, ErrorCode::kInvalidArgument,
        "rank " << root << " (root of rail " << l << ") sent a malformed rail id record");
    EPCOMM_CHECK_CODE(record.ok == 1, ErrorCode::kRemote,
                      "rank " << root << " (root of rail " << l
                              << ") could not make the rail's unique id; see its error");
  }
  return all[topology.rankAt(0, topology.local)].id;
}

}  // namespace epcomm::core
