// SPDX-License-Identifier: Apache-2.0
// Which ranks form a node, for epcomm across nodes (docs/scale-out.md). Internal; NCCL-free.
//
// A node is the set of ranks whose GPUs reach each other over NVLink through the symmetric
// buffer: a host (hostname + boot id), or, with the fabric memory mode, an NVLink domain
// (cluster UUID + clique id, e.g. one GB200 NVL72 rack). EPCOMM_HOSTID overrides both, so that
// tests can split one machine into several "nodes".
//
// This is not Bootstrap::localRanks(): that one is always the physical host and picks the GPU and
// the fd-passing peers; a node here may be smaller (EPCOMM_HOSTID) or larger (an NVLink domain).
//
// Exported (EPCOMM_API) only because epcomm_nccl uses it; not part of the public API.
//
// Every rank contributes one fixed-size record through Bootstrap::allGather and runs the same
// pure function over the same records, so every rank reaches the same Topology or throws the same
// InvalidArgument: no vote is needed and no rank can hang on another's error.
#pragma once

#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <vector>

#include "epcomm/bootstrap.hpp"
#include "epcomm/export.hpp"

namespace epcomm::core {

// Where a rank's node key came from. All ranks of a job must use the same source.
enum class NodeKeySource : int32_t {
  kHost = 1,          // hostname + boot id
  kFabricDomain = 2,  // NVLink domain: cluster UUID + clique id (fabric memory mode)
  kEnvHostId = 3,     // EPCOMM_HOSTID
};
EPCOMM_API const char* nodeKeySourceName(NodeKeySource source);

// The longest key text that travels (the record is 128 bytes).
constexpr size_t kMaxNodeKeyBytes = 119;

struct NodeKey {
  NodeKeySource source = NodeKeySource::kHost;
  std::string text;  // at most kMaxNodeKeyBytes bytes, no NUL
};

// EPCOMM_HOSTID, when set and non-empty (read in config.cpp, the one place the environment is
// read). Throws InvalidArgument naming EPCOMM_HOSTID if it is longer than kMaxNodeKeyBytes or
// holds a control character.
EPCOMM_API std::optional<std::string> hostIdOverride();

// "fabric:<32 hex digits of the cluster UUID>/<clique id>" (nvmlGpuFabricInfo_t's fields).
EPCOMM_API std::string fabricDomainKeyText(const unsigned char cluster_uuid[16],
                                           uint32_t clique_id);

// This process's key: EPCOMM_HOSTID if set, else the fabric domain if `fabric_domain` is given
// (the caller passes fabricDomainKeyText(...) when the buffer uses the fabric mode), else the host.
EPCOMM_API NodeKey localNodeKey(const std::optional<std::string>& fabric_domain = std::nullopt);

struct EPCOMM_API Topology {
  int rank = 0;  // global rank of this process
  int size = 1;  // ranks in the job
  int num_nodes = 1;
  int ranks_per_node = 1;  // the same on every node (checked)
  int node = 0;            // this rank's node index
  int local = 0;           // this rank's index inside its node == its rail
  NodeKeySource source = NodeKeySource::kHost;

  // Per global rank: node index and local index.
  std::vector<int> node_of;
  std::vector<int> local_of;
  // rank_at[node * ranks_per_node + local]: the global rank there.
  std::vector<int> rank_at;
  // Key text of each node, for messages.
  std::vector<std::string> node_names;

  // Nodes are numbered by their lowest global rank; locals by global rank inside the node.
  int rankAt(int node_index, int local_index) const {
    return rank_at[static_cast<size_t>(node_index) * ranks_per_node + local_index];
  }
  // Global ranks of one node (local order) and of one rail (node order).
  std::vector<int> nodeRanks(int node_index) const;
  std::vector<int> railRanks(int local_index) const;
  // True when node n holds ranks [n * ranks_per_node, (n + 1) * ranks_per_node) (the usual
  // mpirun --map-by node-blocked placement); the algorithms do not need it.
  bool blocked() const;
  // "2 nodes x 4 ranks (EPCOMM_HOSTID)"
  std::string describe() const;
};

// Pure: the topology seen by `rank` from every rank's key, in rank order. Throws InvalidArgument
// when the ranks used different key sources or the nodes have different rank counts (the
// message lists every node with its ranks and says what is supported).
EPCOMM_API Topology buildTopology(int rank, const std::vector<NodeKey>& keys);

// Collective: all-gathers this rank's key and builds the topology. Every rank gets the same
// result or the same error. A malformed record from a peer is InvalidArgument naming that rank.
EPCOMM_API Topology discoverTopology(Bootstrap& bootstrap, const NodeKey& mine);

// Collective: one opaque 128-byte id per rail (e.g. an ncclUniqueId), made by the rail's root
// (the rail's rank on node 0, which calls `make_id` once) and delivered to every rank of that
// rail in one all-gather. Returns this rank's rail id. Ranks that are not roots never call
// `make_id`. A root's failure in make_id throws there and is seen by the other ranks as
// InvalidArgument naming the root (their all-gather still completes: the root sends a
// "failed" record before rethrowing).
constexpr size_t kRailIdBytes = 128;
struct RailId {
  unsigned char bytes[kRailIdBytes];
};
template <typename MakeId>
RailId exchangeRailId(Bootstrap& bootstrap, const Topology& topology, MakeId&& make_id);

// The wire record of exchangeRailId and the pure choice it ends with (unit-tested).
struct RailIdRecord {
  uint32_t magic;
  int32_t ok;  // 1: bytes hold the id; 0: this rank is not a root; -1: its make_id failed
  RailId id;
};
EPCOMM_API RailId pickRailId(const Topology& topology, const std::vector<RailIdRecord>& all);
constexpr uint32_t kRailIdMagic = 0x52414944;  // "RAID"

template <typename MakeId>
RailId exchangeRailId(Bootstrap& bootstrap, const Topology& topology, MakeId&& make_id) {
  RailIdRecord mine{};
  mine.magic = kRailIdMagic;
  std::exception_ptr failure;
  if (topology.node == 0) {
    try {
      mine.id = make_id();
      mine.ok = 1;
    } catch (...) {
      failure = std::current_exception();
      mine.ok = -1;
    }
  }
  std::vector<RailIdRecord> all(static_cast<size_t>(topology.size));
  bootstrap.allGather(&mine, all.data(), sizeof(mine));
  if (failure) std::rethrow_exception(failure);
  return pickRailId(topology, all);
}

}  // namespace epcomm::core
