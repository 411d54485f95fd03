// SPDX-License-Identifier: Apache-2.0
// ScaleOutBuffer (epcomm/nccl.hpp): the hierarchical dispatch and combine of docs/scale-out.md §3,
// composed of pieces that work on their own: the bucket kernels (kernels/node_buckets.cu), the
// rail transport (nccl::RailExchange) and a node-local EpBuffer that does the NVLink leg.
//
// HT dispatch on rank (n, l), per call:
//   1. bucket: per destination node m, the tokens with an expert on m, in token order (slots);
//   2. pack: one row per (token, node): data, FP8 scales, global top-k ids, weights;
//   3. rail exchange (exact): bucket m to (m, l); rows arrive source-node-major;
//   4. unpack on the forwarder: the batch x / scales / node-local ids (-1 for other nodes) /
//      weights, in arrival order;
//   5. the node-local EpBuffer dispatches the batch: the receivers get their rows over NVLink.
// HT combine: the node-local combine (weighted with the forwarded or shipped weights) gives the
// forwarder one row per batch row: the node's partial; the batch goes back over the rail in the
// same order (its row counts per source node are the dispatch's), and the source sums, per token,
// the partials of the nodes it went to (slots say where) in float32.
// A cached HT dispatch (no top-k) moves only the rows: packed by the handle's slots, the same exact
// rail exchange, the forwarder's node-local cached dispatch. combined_topk_weights: the node-local
// combine sums them per forwarded row, they travel back like the partials and are summed per token.
// LL is the same with worst-case rail exchanges (fixed slots of ll_max_tokens_per_rank rows per
// node) and a fixed batch of nodes * ll_max_tokens_per_rank rows; unused rows route nowhere.
//
// Staging (per rank, device): send / recv rows for nodes * max(max_tokens, ll_max_tokens) BF16
// bucket rows (the largest row kind: partials and weight rows fit too), and the batch arrays.
#include "epcomm/nccl.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "check.hpp"
#include "core/arg_check.hpp"
#include "core/scale_out.hpp"
#include "core/topology.hpp"
#include "cuda_resources.hpp"
#include "epcomm/error.hpp"
#include "kernels/node_launch.hpp"
#include "nccl/rail_comms.hpp"
#include "nccl/rail_exchange.hpp"
#include "nccl/rail_transport.hpp"

namespace epcomm::nccl {
namespace {

constexpr size_t kReasonBytes = 400;

// One rank's verdict on its own arguments of a call, all-gathered so every rank decides alike.
struct CallVote {
  int32_t ok;
  int32_t code;
  int32_t flag;        // a per-call boolean the ranks compare (e.g. weights given)
  int32_t has_tokens;  //
  int32_t shape;       // what must be the same on every rank (a dtype, a top-k)
  int64_t routing;     // cached HT dispatch: the handle's routing (ScaleOutHandle::Impl::routing)
  char reason[kReasonBytes];
};

[[noreturn]] void reject(const std::string& message) {
  throw InvalidArgument(message);
}

// Collective over the job: runs `check` here, all-gathers every rank's verdict and throws on every
// rank if any rank rejected (its own error there, kRemote naming it elsewhere). Returns the votes.
std::vector<CallVote> voteCall(Bootstrap& bootstrap, const std::string& op, int32_t flag,
                               int32_t has_tokens, int32_t shape, int64_t routing,
                               const std::function<void()>& check) {
  CallVote mine;
  std::memset(&mine, 0, sizeof(mine));
  mine.flag = flag;
  mine.has_tokens = has_tokens;
  mine.shape = shape;
  mine.routing = routing;
  std::exception_ptr failure;
  try {
    check();
    mine.ok = 1;
  } catch (const Error& e) {
    failure = std::current_exception();
    mine.code = static_cast<int32_t>(e.code());
    std::strncpy(mine.reason, e.what(), kReasonBytes - 1);
  }
  std::vector<CallVote> all(static_cast<size_t>(bootstrap.size()));
  bootstrap.allGather(&mine, all.data(), sizeof(mine));
  for (int r = 0; r < bootstrap.size(); ++r) {
    const CallVote& v = all[static_cast<size_t>(r)];
    if (v.ok) continue;
    if (failure) std::rethrow_exception(failure);
    throw Error(ErrorCode::kRemote, "scale-out " + op + " rejected on rank " + std::to_string(r) +
                                        ", so every rank stops: " +
                                        std::string(v.reason, strnlen(v.reason, kReasonBytes)));
  }
  return all;
}

// Ranks on this rank's GPU (same host name and PCI bus id): of the whole job, and of `node` (the
// node's global ranks). Collective.
struct DeviceSharing {
  int job = 0;
  int node = 0;
};
DeviceSharing ranksOnDevice(Bootstrap& bootstrap, int device, const std::vector<int>& node) {
  struct Where {
    char host[128];
    char bus[32];
  };
  Where mine;
  std::memset(&mine, 0, sizeof(mine));
  gethostname(mine.host, sizeof(mine.host) - 1);
  EPCOMM_CUDA_CHECK(cudaDeviceGetPCIBusId(mine.bus, sizeof(mine.bus) - 1, device));
  std::vector<Where> all(static_cast<size_t>(bootstrap.size()));
  bootstrap.allGather(&mine, all.data(), sizeof(mine));
  DeviceSharing n;
  for (size_t r = 0; r < all.size(); ++r) {
    const bool same = std::strncmp(all[r].host, mine.host, sizeof(mine.host)) == 0 &&
                      std::strncmp(all[r].bus, mine.bus, sizeof(mine.bus)) == 0;
    if (!same) continue;
    ++n.job;
    if (std::find(node.begin(), node.end(), static_cast<int>(r)) != node.end()) ++n.node;
  }
  return n;
}

std::string onRank(int rank) {
  return " (rank " + std::to_string(rank) + ")";
}

std::string pointerOrNull(const void* p) {
  if (p == nullptr) return "nullptr";
  std::ostringstream os;
  os << p;
  return os.str();
}

// "0,2,3": the ranks whose vote satisfies `pred`.
std::string ranksWhere(const std::vector<CallVote>& votes,
                       const std::function<bool(const CallVote&)>& pred) {
  std::string list;
  for (size_t r = 0; r < votes.size(); ++r) {
    if (pred(votes[r])) list += (list.empty() ? "" : ",") + std::to_string(r);
  }
  return list;
}

// The votes' shape must be the same on every rank (it sizes the rail rows or the node op's
// signature): InvalidArgument on every rank otherwise, naming the first rank that differs.
void requireSameShape(const std::vector<CallVote>& votes, const std::string& what, int me) {
  for (size_t r = 1; r < votes.size(); ++r) {
    if (votes[r].shape != votes[0].shape) {
      reject(what + " differs between ranks: " + std::to_string(votes[0].shape) + " on rank 0, " +
             std::to_string(votes[r].shape) + " on rank " + std::to_string(r) + onRank(me));
    }
  }
}

// The votes' flag (topk_weights given) among the ranks with tokens: all set (true) or none
// (false); a mix is InvalidArgument on every rank (they all judge the same votes), naming the
// ranks without.
bool weightsOnEveryRankOrNone(const std::vector<CallVote>& votes, const std::string& op, int me) {
  std::string with, without;
  for (size_t r = 0; r < votes.size(); ++r) {
    if (!votes[r].has_tokens) continue;
    std::string& list = votes[r].flag ? with : without;
    list += (list.empty() ? "" : ",") + std::to_string(r);
  }
  if (!with.empty() && !without.empty()) {
    reject(op + ": topk_weights given on ranks " + with + " but not on ranks " + without +
           " (all ranks with tokens or none, across nodes)" + onRank(me));
  }
  return !with.empty();
}

}  // namespace

// --- handle -----------------------------------------------------------------------------------

// The routing of the last top-k dispatch with this handle, which combine and cached dispatches
// reuse: which bucket row each token took per node (slot, send_counts), what this rank forwarded
// (batch_counts per source node, rows in all; the node-local handle `node` holds the batch's
// routing inside the node). `routing` numbers that dispatch among the buffer's top-k dispatches
// (the same number on every rank, since every rank issues the same sequence of collective ops): a
// cached dispatch checks that every rank passes the handle of the same dispatch.
struct ScaleOutHandle::Impl {
  const void* owner = nullptr;
  EpHandle node;
  DeviceMemory slot;          // int32 [max_tokens, nodes]
  DeviceMemory send_counts;   // int32 [nodes]: bucket rows per node
  DeviceMemory batch_counts;  // int32 [nodes]: forwarded rows per source node
  std::vector<int32_t> batch_counts_host;
  int num_tokens = -1;  // -1: no routing (none yet, or the last top-k dispatch failed)
  int rows = 0;
  int num_topk = 0;
  int64_t routing = 0;
  // ScaleOutBuffer::layout: a copy of its top-k ids ([num_tokens, num_topk] in `laid_idx_type`),
  // which the next cached dispatch with this handle routes by (as a top-k dispatch without
  // weights). Cleared by every dispatch.
  DeviceMemory laid_idx;
  IndexType laid_idx_type = IndexType::kInt64;
  bool laid_out = false;
  Impl(const void* o, EpHandle&& h) : owner(o), node(std::move(h)) {}
};

ScaleOutHandle::ScaleOutHandle(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ScaleOutHandle::ScaleOutHandle(ScaleOutHandle&&) noexcept = default;
ScaleOutHandle& ScaleOutHandle::operator=(ScaleOutHandle&&) noexcept = default;
ScaleOutHandle::~ScaleOutHandle() = default;
int ScaleOutHandle::numTokens() const {
  return impl_->num_tokens;
}
int ScaleOutHandle::numForwardedRows() const {
  return impl_->rows;
}

// --- buffer -----------------------------------------------------------------------------------

struct ScaleOutBuffer::Impl {
  Bootstrap* bootstrap = nullptr;
  BufferConfig config;
  double timeout_s = 0;
  int device = 0;  // every op runs with it current (as EpBuffer's ops do)
  core::Topology topo;
  int R = 1, M = 1, G = 1, E = 1, L = 1, H = 0, max_topk = 0, N = 0, N_ll = 0;
  int64_t stage_rows = 0;
  node::RowLayout bf16_row;
  std::unique_ptr<CallbackBootstrap> node_bootstrap;
  std::unique_ptr<EpBuffer> node;
  RailComm rail;
  std::unique_ptr<RailTransport> exchange;  // EPCOMM_RAIL_TRANSPORT: host API (default) or GIN
  DeviceMemory maps;                        // int32 node_of [R], local_of [R]
  DeviceMemory send, recv;
  DeviceMemory batch_x, batch_scales, batch_ids, batch_weights;
  DeviceMemory batch_combined;  // float [stage_rows, max_topk]: the node's combined_topk_weights
  int64_t ht_routings = 0;      // top-k HT dispatches voted so far (ScaleOutHandle::Impl::routing)
  // barrier(): zero counts [nodes], then send and receive slots of one 16-byte row per node.
  DeviceMemory barrier_scratch;
  // dispatch with DispatchArgs::layout: the check's counts [R + E] and verdict.
  DeviceMemory layout_check;
  // LL routing kept from dispatch for combine.
  DeviceMemory ll_slot, ll_send_counts, ll_batch_counts;
  int ll_tokens = -1;
  int ll_topk = 0;
  bool ll_dispatched = false;  // an LL dispatch waits for its combine (they alternate)

  const int32_t* nodeOf() const { return maps.as<int32_t>(); }
  const int32_t* localOf() const { return maps.as<int32_t>(sizeof(int32_t) * R); }
};

ScaleOutBuffer::ScaleOutBuffer(Bootstrap& bootstrap, const BufferConfig& config)
    : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.bootstrap = &bootstrap;
  s.config = config;
  s.topo = core::discoverTopology(bootstrap, core::localNodeKey());
  s.R = s.topo.size;
  s.M = s.topo.num_nodes;
  s.G = s.topo.ranks_per_node;
  // The config, checked on every rank and compared across the job (the node buffers compare it
  // inside each node only; the rail rows are sized by it): bad or different values fail every
  // rank, naming the field and the ranks.
  ResolvedConfig resolved;
  voteCall(bootstrap, "creation (BufferConfig)", 0, 0, 0, 0,
           [&] { resolved = resolveConfig(config, s.R); });
  {
    constexpr int kFields = 5;
    constexpr const char* kNames[kFields] = {"hidden", "num_experts", "max_topk",
                                             "max_tokens_per_rank", "ll_max_tokens_per_rank"};
    struct Shape {
      int32_t v[kFields];
    };
    const Shape mine{{config.hidden, config.num_experts, config.max_topk,
                      config.max_tokens_per_rank, config.ll_max_tokens_per_rank}};
    std::vector<Shape> all(static_cast<size_t>(s.R));
    bootstrap.allGather(&mine, all.data(), sizeof(mine));
    for (size_t r = 1; r < all.size(); ++r) {
      for (int f = 0; f < kFields; ++f) {
        if (all[r].v[f] == all[0].v[f]) continue;
        reject("ScaleOutBuffer: BufferConfig::" + std::string(kNames[f]) + " is " +
               std::to_string(all[0].v[f]) + " on rank 0 but " + std::to_string(all[r].v[f]) +
               " on rank " + std::to_string(r) + " (it must be the same on every rank)" +
               onRank(s.topo.rank));
      }
    }
  }
  // Rail creation may wait for slow peers (first op deadline); every exchange has the op deadline
  // (each call starts with a host vote, so the ranks arrive together).
  const double create_timeout_s = static_cast<double>(resolved.first_op_timeout_ns) * 1e-9;
  s.timeout_s = static_cast<double>(resolved.timeout_ns) * 1e-9;
  s.E = config.num_experts;
  s.L = s.E / s.R;
  s.H = config.hidden;
  s.max_topk = config.max_topk;
  s.N = config.max_tokens_per_rank;
  s.N_ll = config.ll_max_tokens_per_rank;
  // Pure checks of the same values on every rank: they throw alike, no vote needed.
  if (s.M > node::kMaxNodes) {
    reject("ScaleOutBuffer: " + std::to_string(s.M) + " nodes, more than the supported " +
           std::to_string(node::kMaxNodes) + onRank(s.topo.rank));
  }
  if (static_cast<int64_t>(s.M) * s.N_ll > kMaxLlTokensPerRank) {
    reject("ScaleOutBuffer: ll_max_tokens_per_rank " + std::to_string(s.N_ll) + " x " +
           std::to_string(s.M) + " nodes = " + std::to_string(int64_t{s.M} * s.N_ll) +
           " tokens per forwarder, over kMaxLlTokensPerRank " +
           std::to_string(kMaxLlTokensPerRank) + " (the node-local LL batch)" +
           onRank(s.topo.rank));
  }
  if (static_cast<int64_t>(s.M) * s.N > kMaxTokensPerRank) {
    reject("ScaleOutBuffer: max_tokens_per_rank " + std::to_string(s.N) + " x " +
           std::to_string(s.M) + " nodes over kMaxTokensPerRank " +
           std::to_string(kMaxTokensPerRank) + " (the node-local HT batch)" + onRank(s.topo.rank));
  }

  // The rail transport: EPCOMM_RAIL_TRANSPORT, the same on every rank (a bad value, a mix, or a
  // backend this build lacks fails every rank before any GPU work, never falls back; a network
  // without GIN fails at the transport's creation below).
  RailTransportKind transport = RailTransportKind::kHostApi;
  voteCall(bootstrap, "creation (EPCOMM_RAIL_TRANSPORT)", 0, 0, 0, 0, [&] {
    transport = railTransportFromEnv();
    checkRailTransportBuilt(transport);
  });
  requireSameShape(voteCall(bootstrap, "creation (EPCOMM_RAIL_TRANSPORT)", 0, 0,
                            static_cast<int32_t>(transport), 0, [] {}),
                   "creation: EPCOMM_RAIL_TRANSPORT (0 nccl, 1 gin)", s.topo.rank);

  // The node's ranks as a bootstrap of their own: its all-gathers run over the job's bootstrap
  // (every rank of the job calls them, since every node creates its buffer at the same time) and
  // keep this node's rows.
  const std::vector<int> members = s.topo.nodeRanks(s.topo.node);
  Bootstrap* parent = &bootstrap;
  s.node_bootstrap = std::make_unique<CallbackBootstrap>(
      s.topo.local, s.G,
      [parent, members](const void* send, void* recv, size_t bytes) {
        std::vector<uint8_t> all(bytes * static_cast<size_t>(parent->size()));
        parent->allGather(send, all.data(), bytes);
        for (size_t j = 0; j < members.size(); ++j) {
          std::memcpy(static_cast<uint8_t*>(recv) + j * bytes,
                      all.data() + static_cast<size_t>(members[j]) * bytes, bytes);
        }
      },
      [parent] { parent->barrier(); });
  BufferConfig node_config = config;
  // The node buffer divides its default SM budgets among its own ranks on this GPU; when other
  // nodes' ranks share the GPU too (simulated nodes under MPS), their spinning kernels and the
  // rails' NCCL kernels must all fit at once: divide among every rank of the job on this GPU and
  // leave two SMs for NCCL. Explicit budgets are kept.
  int device = config.device;
  if (device == kAuto) EPCOMM_CUDA_CHECK(cudaGetDevice(&device));
  DeviceGuard guard(device);  // the rails, the staging and the node buffer live on it
  s.device = device;
  const DeviceSharing sharing = ranksOnDevice(bootstrap, device, members);
  if (sharing.job > sharing.node) {
    int sms = 0;
    EPCOMM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int budget = std::max(1, (sms - 2) / sharing.job);
    if (node_config.num_sms == kAuto) node_config.num_sms = budget;
    if (node_config.ll_num_sms == kAuto) node_config.ll_num_sms = budget;
  }
  node_config.num_experts = s.E / s.M;
  node_config.max_tokens_per_rank = s.M * s.N;
  node_config.ll_max_tokens_per_rank = s.M * s.N_ll;
  s.node = std::make_unique<EpBuffer>(*s.node_bootstrap, node_config);

  s.rail = createRailComm(bootstrap, s.topo, create_timeout_s);
  s.bf16_row = node::rowLayout(s.H, 2, s.max_topk);
  RailTransportLimits limits;
  // The largest worst-case call: LL rows (the bucket row; combine partials and weights are
  // smaller) in slots of ll_max_tokens_per_rank.
  limits.worst_case_slot_bytes = static_cast<int64_t>(std::max(s.N_ll, 1)) * s.bf16_row.row_bytes;
  voteCall(bootstrap, "creation (rail transport)", 0, 0, 0, 0,
           [&] { s.exchange = createRailTransport(transport, s.rail, s.timeout_s, limits); });

  s.stage_rows = static_cast<int64_t>(s.M) * std::max(s.N, s.N_ll);
  const int64_t rows = std::max<int64_t>(s.stage_rows, 1);
  s.send = DeviceMemory(static_cast<size_t>(rows * s.bf16_row.row_bytes));
  s.recv = DeviceMemory(static_cast<size_t>(rows * s.bf16_row.row_bytes));
  s.batch_x = DeviceMemory(static_cast<size_t>(rows * s.H * 2));
  s.batch_scales = DeviceMemory(static_cast<size_t>(rows * (s.H / 128) * 4));
  s.batch_ids = DeviceMemory(static_cast<size_t>(rows * s.max_topk * 8));
  s.batch_weights = DeviceMemory(static_cast<size_t>(rows * s.max_topk * 4));
  s.batch_combined = DeviceMemory(static_cast<size_t>(rows * s.max_topk * 4));
  std::vector<int32_t> maps(static_cast<size_t>(2 * s.R));
  for (int r = 0; r < s.R; ++r) {
    maps[static_cast<size_t>(r)] = s.topo.node_of[static_cast<size_t>(r)];
    maps[static_cast<size_t>(s.R + r)] = s.topo.local_of[static_cast<size_t>(r)];
  }
  s.maps = DeviceMemory(maps.size() * sizeof(int32_t));
  EPCOMM_CUDA_CHECK(
      cudaMemcpy(s.maps.get(), maps.data(), maps.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
  const int64_t ll_tokens = std::max(s.N_ll, 1);
  s.ll_slot = DeviceMemory(static_cast<size_t>(ll_tokens * s.M * 4));
  s.ll_send_counts = DeviceMemory(static_cast<size_t>(s.M * 4));
  s.ll_batch_counts = DeviceMemory(static_cast<size_t>(s.M * 4));
  s.layout_check =
      DeviceMemory(sizeof(int32_t) * static_cast<size_t>(s.R + s.E + node::kLayoutVerdictWords));
  s.barrier_scratch = DeviceMemory(static_cast<size_t>(s.M) * (4 + 2 * 16));
  EPCOMM_CUDA_CHECK(cudaMemset(s.barrier_scratch.get(), 0, s.barrier_scratch.bytes()));
}

ScaleOutBuffer::~ScaleOutBuffer() {
  if (!impl_) return;
  Impl& s = *impl_;
  s.exchange.reset();
  if (s.rail.comm) {
    try {
      s.rail.comm.finalize(s.timeout_s, "rail " + std::to_string(s.rail.rail));
    } catch (const std::exception& e) {
      EPCOMM_LOG_AT(::epcomm::LogLevel::kWarn,
                    "ScaleOutBuffer: rail finalize failed: " << e.what());
    }
  }
  s.node.reset();
}

int ScaleOutBuffer::rank() const {
  return impl_->topo.rank;
}
int ScaleOutBuffer::numRanks() const {
  return impl_->R;
}
int ScaleOutBuffer::numNodes() const {
  return impl_->M;
}
int ScaleOutBuffer::node() const {
  return impl_->topo.node;
}
int ScaleOutBuffer::localRank() const {
  return impl_->topo.local;
}
int ScaleOutBuffer::numLocalExperts() const {
  return impl_->L;
}
EpBuffer& ScaleOutBuffer::nodeBuffer() {
  return *impl_->node;
}

ScaleOutHandle ScaleOutBuffer::createHandle() const {
  const Impl& s = *impl_;
  auto h = std::make_unique<ScaleOutHandle::Impl>(this, s.node->createHandle());
  h->slot = DeviceMemory(static_cast<size_t>(std::max(s.N, 1)) * s.M * 4);
  h->send_counts = DeviceMemory(static_cast<size_t>(s.M) * 4);
  h->batch_counts = DeviceMemory(static_cast<size_t>(s.M) * 4);
  h->laid_idx = DeviceMemory(static_cast<size_t>(std::max(s.N, 1)) * s.max_topk * 8);
  return ScaleOutHandle(std::move(h));
}

void ScaleOutBuffer::layout(const TopkView& topk, ScaleOutHandle& handle, cudaStream_t stream) {
  Impl& s = *impl_;
  DeviceGuard guard(s.device);
  ScaleOutHandle::Impl& h = *handle.impl_;
  const std::string me = onRank(s.topo.rank);
  // Local, as on one node: bad input throws here only.
  if (h.owner != this) reject("layout: the handle belongs to another ScaleOutBuffer" + me);
  if (topk.num_tokens < 0 || topk.num_tokens > s.N) {
    reject("layout: topk.num_tokens " + std::to_string(topk.num_tokens) +
           " outside [0, max_tokens_per_rank " + std::to_string(s.N) + "]" + me);
  }
  if (topk.num_topk < 1 || topk.num_topk > s.max_topk) {
    reject("layout: topk.num_topk " + std::to_string(topk.num_topk) + " outside [1, max_topk " +
           std::to_string(s.max_topk) + "]" + me);
  }
  if (topk.num_tokens > 0 && topk.idx == nullptr) {
    reject("layout: topk.idx is null with topk.num_tokens " + std::to_string(topk.num_tokens) + me);
  }
  if (topk.idx_type != IndexType::kInt32 && topk.idx_type != IndexType::kInt64) {
    reject("layout: topk.idx_type " + std::to_string(static_cast<int>(topk.idx_type)) +
           " is neither kInt32 nor kInt64" + me);
  }
  // The buckets need the forwarders (a collective step), so the routing is laid out by the next
  // dispatch; the ids are kept until then (the caller's array may change meanwhile).
  const size_t bytes = static_cast<size_t>(topk.num_tokens) * static_cast<size_t>(topk.num_topk) *
                       (topk.idx_type == IndexType::kInt64 ? 8 : 4);
  if (bytes > 0) {
    EPCOMM_CUDA_CHECK(
        cudaMemcpyAsync(h.laid_idx.get(), topk.idx, bytes, cudaMemcpyDeviceToDevice, stream));
  }
  h.laid_idx_type = topk.idx_type;
  h.laid_out = true;
  h.num_tokens = topk.num_tokens;
  h.num_topk = topk.num_topk;
  h.routing = 0;
}

namespace {

// One rail exchange from the send staging to the receive staging: exact (max_rows 0; compact
// layouts) or worst-case (slots of max_rows rows per node).
RailExchangeResult moveRows(ScaleOutBuffer::Impl& s, int64_t row_bytes, const int32_t* counts,
                            int max_rows, cudaStream_t stream) {
  RailExchangeArgs a;
  a.mode = max_rows > 0 ? RailExchangeMode::kWorstCase : RailExchangeMode::kExact;
  a.row_bytes = row_bytes;
  a.send = s.send.get();
  a.send_counts = counts;
  a.recv = s.recv.get();
  a.recv_capacity_rows = s.stage_rows;
  a.max_rows = max_rows;
  return s.exchange->exchange(a, stream);
}

// Packs the rows of `num_tokens` tokens into `send` by the buckets `slot` / `counts` (with their
// top-k ids and weights when topk.num_topk > 0 and the row has room for them).
void packRows(const ScaleOutBuffer::Impl& s, const void* x, int element_bytes, const float* scales,
              int64_t scales_token_stride, int64_t scales_col_stride, const TopkView& topk,
              const float* weights, int num_tokens, const int32_t* slot, const int32_t* counts,
              int max_rows, const node::RowLayout& row, cudaStream_t stream) {
  node::PackParams p{};
  p.x = static_cast<const uint8_t*>(x);
  p.x_scales = scales;
  p.scales_token_stride = scales_token_stride;
  p.scales_col_stride = scales_col_stride;
  p.num_scales = element_bytes == 1 ? s.H / 128 : 0;
  p.topk_idx = topk.idx;
  p.idx_is_64 = topk.idx_type == IndexType::kInt64;
  p.topk_weights = weights;
  p.num_tokens = num_tokens;
  p.num_topk = topk.num_topk;
  p.max_topk = static_cast<int32_t>((row.weights_off - row.ids_off) / 4);
  p.row = row;
  p.slot = slot;
  p.counts = counts;
  p.num_nodes = s.M;
  p.max_rows = max_rows;
  p.send = s.send.as<uint8_t>();
  node::launchNodePack(p, stream);
}

// Buckets `topk` into `slot` / `counts` and packs the rows into `send`.
void bucketAndPack(const ScaleOutBuffer::Impl& s, const void* x, int element_bytes,
                   const float* scales, int64_t scales_token_stride, int64_t scales_col_stride,
                   const TopkView& topk, const float* weights, int32_t* slot, int32_t* counts,
                   int max_rows, const node::RowLayout& row, cudaStream_t stream) {
  node::BucketParams b{};
  b.topk_idx = topk.idx;
  b.idx_is_64 = topk.idx_type == IndexType::kInt64;
  b.num_tokens = topk.num_tokens;
  b.num_topk = topk.num_topk;
  b.num_experts = s.E;
  b.experts_per_rank = s.L;
  b.node_of = s.nodeOf();
  b.num_nodes = s.M;
  b.slot = slot;
  b.counts = counts;
  node::launchNodeBuckets(b, stream);
  packRows(s, x, element_bytes, scales, scales_token_stride, scales_col_stride, topk, weights,
           topk.num_tokens, slot, counts, max_rows, row, stream);
}

void unpack(const ScaleOutBuffer::Impl& s, const node::RowLayout& row, int rows, int max_rows,
            const int32_t* recv_counts, int num_topk, bool idx64, bool fp8, cudaStream_t stream) {
  node::UnpackParams u{};
  u.recv = s.recv.as<uint8_t>();
  u.row = row;
  u.rows = rows;
  u.max_rows = max_rows;
  u.recv_counts = recv_counts;
  u.num_topk = num_topk;
  u.node = s.topo.node;
  u.num_experts = s.E;
  u.experts_per_rank = s.L;
  u.node_of = s.nodeOf();
  u.local_of = s.localOf();
  u.x = s.batch_x.as<uint8_t>();
  u.x_scales = fp8 ? s.batch_scales.as<float>() : nullptr;
  u.topk_idx = s.batch_ids.get();
  u.idx_is_64 = idx64;
  u.topk_weights = s.batch_weights.as<float>();
  node::launchNodeUnpack(u, stream);
}

// Ships float rows (combine-time weights) to the forwarders; they land in recv as
// [rows, max_topk] (exact compact, or worst-case slots).
void shipWeights(ScaleOutBuffer::Impl& s, const float* weights, int num_tokens, int num_topk,
                 const int32_t* slot, const int32_t* counts, int max_rows, cudaStream_t stream) {
  node::GatherParams g{};
  g.src = weights;
  g.src_cols = num_topk;
  g.num_tokens = num_tokens;
  g.row_floats = s.max_topk;
  g.slot = slot;
  g.counts = counts;
  g.num_nodes = s.M;
  g.max_rows = max_rows;
  g.dst = s.send.as<float>();
  node::launchNodeGather(g, stream);
  moveRows(s, static_cast<int64_t>(s.max_topk) * 4, counts, max_rows, stream);
}

// Across nodes rows go by topk, so a caller's DispatchLayout must be the routing topk gives (what
// EpBuffer::layout and DeepEP's get_dispatch_layout compute). Checks it on the device and waits
// for the verdict (bounded by the op deadline); kLayoutOk, or the first difference found. Called
// with arguments that passed the host checks of the layout's shape only.
std::vector<int32_t> checkLayout(ScaleOutBuffer::Impl& s, const DispatchArgs& args,
                                 cudaStream_t stream) {
  node::LayoutCheckParams p{};
  p.topk_idx = args.topk.idx;
  p.idx_is_64 = args.topk.idx_type == IndexType::kInt64;
  p.num_tokens = args.num_tokens;
  p.num_topk = args.topk.num_topk;
  p.num_experts = s.E;
  p.experts_per_rank = s.L;
  p.num_ranks = s.R;
  p.in_rank = args.layout.is_token_in_rank;
  p.rank_counts = args.layout.num_tokens_per_rank;
  p.expert_counts = args.layout.num_tokens_per_expert;
  p.scratch = s.layout_check.as<int32_t>();
  p.verdict = s.layout_check.as<int32_t>(sizeof(int32_t) * static_cast<size_t>(s.R + s.E));
  node::launchNodeCheckLayout(p, stream);
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::duration<double>(s.timeout_s);
  while (true) {
    const cudaError_t status = cudaStreamQuery(stream);
    if (status == cudaSuccess) break;
    if (status != cudaErrorNotReady) EPCOMM_CUDA_CHECK(status);
    EPCOMM_CHECK_CODE(std::chrono::steady_clock::now() < deadline, ErrorCode::kTimeout,
                      "dispatch: the check of DispatchArgs::layout did not finish within "
                          << s.timeout_s << " s (rank " << s.topo.rank << ")");
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  std::vector<int32_t> verdict(node::kLayoutVerdictWords);
  EPCOMM_CUDA_CHECK(cudaMemcpy(verdict.data(), p.verdict, sizeof(int32_t) * verdict.size(),
                               cudaMemcpyDeviceToHost));
  return verdict;
}

// The message of a layout fault (checkLayout's verdict).
std::string layoutFaultText(const std::vector<int32_t>& v, int num_ranks) {
  std::string entry;
  if (v[0] == node::kLayoutInRank) {
    entry = "is_token_in_rank[" + std::to_string(v[1] / num_ranks) + "][" +
            std::to_string(v[1] % num_ranks) + "]";
  } else if (v[0] == node::kLayoutRankCount) {
    entry = "num_tokens_per_rank[" + std::to_string(v[1]) + "]";
  } else {
    entry = "num_tokens_per_expert[" + std::to_string(v[1]) + "]";
  }
  return "dispatch: DispatchArgs::layout." + entry + " = " + std::to_string(v[2]) +
         ", but topk.idx gives " + std::to_string(v[3]) +
         " (across nodes rows go by topk: a layout must be the routing topk gives, as "
         "EpBuffer::layout computes it)";
}

}  // namespace

DispatchResult ScaleOutBuffer::dispatch(const DispatchArgs& args, ScaleOutHandle& handle,
                                        cudaStream_t stream) {
  Impl& s = *impl_;
  DeviceGuard guard(s.device);
  ScaleOutHandle::Impl& h = *handle.impl_;
  const bool fp8 = args.dtype == DType::kFP8E4M3;
  // Routing: top-k (topk.idx set or topk.num_topk > 0, as on one node), else a cached dispatch:
  // after layout() (h.laid_out) by the ids it kept, as a top-k dispatch without weights whose
  // result holds no top-k; otherwise the row movement of the handle's dispatched routing.
  const DispatchLayout& layout = args.layout;
  const bool has_layout = layout.num_tokens_per_rank != nullptr ||
                          layout.is_token_in_rank != nullptr ||
                          layout.num_tokens_per_expert != nullptr;
  const bool has_topk = args.topk.idx != nullptr || args.topk.num_topk > 0;
  const bool cached = !has_topk && !has_layout;
  const bool from_layout = cached && h.owner == this && h.laid_out;
  const bool reuse = cached && !from_layout;
  TopkView topk = args.topk;
  const float* topk_weights = args.topk_weights;
  if (from_layout) {
    topk = TopkView{h.laid_idx.get(), h.laid_idx_type, h.num_tokens, h.num_topk};
    topk_weights = nullptr;
  }
  // dtype and num_topk size the rail rows: the same on every rank (as EpBuffer's signature).
  const int32_t shape = (fp8 ? 1000 : 0) + topk.num_topk;
  // A caller's layout (with topk, of a usable shape) is checked on the device before the vote, so
  // that a fault fails every rank before anything else is enqueued.
  std::vector<int32_t> layout_fault(node::kLayoutVerdictWords, node::kLayoutOk);
  if (has_layout && has_topk && args.num_tokens >= 0 && args.num_tokens <= s.N &&
      args.topk.num_tokens == args.num_tokens && args.topk.num_topk >= 1 &&
      args.topk.num_topk <= s.max_topk && layout.num_tokens_per_rank != nullptr &&
      layout.num_tokens_per_expert != nullptr &&
      (args.num_tokens == 0 || (args.topk.idx != nullptr && layout.is_token_in_rank != nullptr))) {
    layout_fault = checkLayout(s, args, stream);
  }
  const std::vector<CallVote> votes = voteCall(
      *s.bootstrap, "dispatch", reuse, args.num_tokens > 0, shape, reuse ? h.routing : 0, [&] {
        const std::string me = onRank(s.topo.rank);
        if (h.owner != this) reject("dispatch: the handle belongs to another ScaleOutBuffer" + me);
        if (args.dtype != DType::kBF16 && !fp8) {
          reject("dispatch: dtype " + std::to_string(static_cast<int>(args.dtype)) +
                 " is neither kBF16 nor kFP8E4M3" + me);
        }
        if (args.num_tokens < 0 || args.num_tokens > s.N) {
          reject("dispatch: num_tokens " + std::to_string(args.num_tokens) +
                 " outside [0, max_tokens_per_rank " + std::to_string(s.N) + "]" + me);
        }
        if (has_layout && !has_topk) {
          // Named before the top-k checks: a layout without topk is what the caller did.
          reject(
              "dispatch: DispatchArgs::layout without topk is not supported across nodes yet "
              "(pass topk.idx with it: rows go by topk, and the layout must be its routing)" +
              me);
        }
        if (cached) {
          // One node's rules for a cached dispatch (ops.hpp DispatchArgs::topk).
          if (h.num_tokens < 0) {
            reject(
                "dispatch: cached dispatch (topk.idx null, topk.num_topk 0) with a handle that "
                "holds no routing: dispatch with topk first" +
                me);
          }
          if (args.num_tokens != h.num_tokens) {
            reject("dispatch: num_tokens " + std::to_string(args.num_tokens) +
                   " differs from the handle's num_tokens " + std::to_string(h.num_tokens) +
                   " (a cached dispatch reuses the routing of that many tokens)" + me);
          }
          if (args.recv_topk_idx_out != nullptr || args.recv_topk_weights_out != nullptr) {
            reject(std::string("dispatch: ") +
                   (args.recv_topk_idx_out != nullptr
                        ? "recv_topk_idx_out " + pointerOrNull(args.recv_topk_idx_out)
                        : "recv_topk_weights_out " + pointerOrNull(args.recv_topk_weights_out)) +
                   " must be nullptr for a cached dispatch (no top-k is sent)" + me);
          }
        } else {
          if (args.topk.num_topk < 1 || args.topk.num_topk > s.max_topk) {
            reject("dispatch: topk.num_topk " + std::to_string(args.topk.num_topk) +
                   " outside [1, max_topk " + std::to_string(s.max_topk) + "]" + me);
          }
          if (args.topk.num_tokens != args.num_tokens) {
            reject("dispatch: topk.num_tokens " + std::to_string(args.topk.num_tokens) +
                   " != num_tokens " + std::to_string(args.num_tokens) + me);
          }
          if (args.num_tokens > 0 && args.topk.idx == nullptr) {
            reject("dispatch: topk.idx is null with num_tokens " + std::to_string(args.num_tokens) +
                   me);
          }
        }
        if (has_layout) {
          const char* missing = layout.num_tokens_per_rank == nullptr     ? "num_tokens_per_rank"
                                : layout.num_tokens_per_expert == nullptr ? "num_tokens_per_expert"
                                                                          : "is_token_in_rank";
          if (layout.num_tokens_per_rank == nullptr || layout.num_tokens_per_expert == nullptr ||
              (args.num_tokens > 0 && layout.is_token_in_rank == nullptr)) {
            reject(std::string("dispatch: DispatchArgs::layout.") + missing +
                   " is nullptr: must be non-null when any DispatchArgs::layout pointer is set "
                   "(is_token_in_rank may be null only with num_tokens 0)" +
                   me);
          }
          if (layout_fault[0] != node::kLayoutOk) reject(layoutFaultText(layout_fault, s.R) + me);
        }
        if (args.num_tokens > 0 && args.x == nullptr) {
          reject("dispatch: x is null with num_tokens " + std::to_string(args.num_tokens) + me);
        }
        if (fp8 && args.num_tokens > 0 && args.x_scales == nullptr) {
          reject("dispatch: x_scales is null with dtype FP8" + me);
        }
      });
  const int me = s.topo.rank;
  // The forwarder's node-local dispatch takes its routing from the batch it received, which mixes
  // every source node's rows: every rank routes alike (all reuse a dispatched routing, or none).
  const std::string cached_on = ranksWhere(votes, [](const CallVote& v) { return v.flag != 0; });
  const std::string topk_on = ranksWhere(votes, [](const CallVote& v) { return v.flag == 0; });
  if (!cached_on.empty() && !topk_on.empty()) {
    reject("dispatch: cached (no topk, the handle's dispatched routing) on ranks " + cached_on +
           " but a new routing (topk, or a handle laid out by layout()) on ranks " + topk_on +
           " (across nodes every rank routes alike: all cached or none)" + onRank(me));
  }
  if (reuse) {
    // Every rank's handle must hold the routing of the same dispatch: the forwarders route the
    // rows they receive with their own handles.
    for (size_t r = 1; r < votes.size(); ++r) {
      if (votes[r].routing == votes[0].routing) continue;
      reject(
          "dispatch: cached dispatch with handles of different dispatches: the routing of the "
          "buffer's top-k HT dispatch #" +
          std::to_string(votes[0].routing) + " on rank 0, #" + std::to_string(votes[r].routing) +
          " on rank " + std::to_string(r) +
          " (every rank passes the handle of the same earlier dispatch)" + onRank(me));
    }
  }
  requireSameShape(votes, "dispatch: dtype * 1000 + topk.num_topk", me);
  const int64_t token_stride = args.scales_token_stride != 0 ? args.scales_token_stride : s.H / 128;
  DispatchArgs n = args;
  // The caller's layout describes its own tokens; the node-local dispatch routes the forwarded
  // batch, whose layout it computes itself.
  n.layout = DispatchLayout{};
  n.scales_token_stride = s.H / 128;
  n.scales_col_stride = 1;
  n.x_scales = fp8 ? s.batch_scales.as<float>() : nullptr;
  n.x = s.batch_x.get();

  if (reuse) {
    // Only the rows move: bucketed by the stored slots, the same rail exchange (the exact counts
    // are the handle's), then the node-local cached dispatch of the forwarded batch.
    const node::RowLayout row = node::rowLayout(s.H, fp8 ? 1 : 2, 0);
    packRows(s, args.x, fp8 ? 1 : 2, args.x_scales, token_stride, args.scales_col_stride,
             TopkView{}, nullptr, h.num_tokens, h.slot.as<int32_t>(), h.send_counts.as<int32_t>(),
             0, row, stream);
    const RailExchangeResult got =
        moveRows(s, row.row_bytes, h.send_counts.as<int32_t>(), 0, stream);
    // Every rank passed the handle of the same dispatch (voted), so its rail peers send what they
    // sent then.
    EPCOMM_CHECK_CODE(got.recv_counts == h.batch_counts_host, ErrorCode::kInternal,
                      "cached dispatch: the rail delivered other row counts than the handle's "
                      "dispatch (rank "
                          << me << ")");
    unpack(s, row, h.rows, 0, nullptr, 0, false, fp8, stream);
    n.num_tokens = h.rows;
    n.topk = TopkView{};
    n.topk_weights = nullptr;
    return s.node->dispatch(n, h.node, stream);
  }

  // A new routing. The handle holds none until this one is in place (a failure below leaves it
  // empty, so a cached dispatch on it is rejected); the number is taken now, while every rank
  // agrees.
  const int64_t routing = ++s.ht_routings;
  h.num_tokens = -1;
  h.routing = 0;
  h.laid_out = false;  // `topk` may point at its ids: they are read by the kernels queued below
  const node::RowLayout row = node::rowLayout(s.H, fp8 ? 1 : 2, s.max_topk);
  bucketAndPack(s, args.x, fp8 ? 1 : 2, args.x_scales, token_stride, args.scales_col_stride, topk,
                topk_weights, h.slot.as<int32_t>(), h.send_counts.as<int32_t>(), 0, row, stream);
  const RailExchangeResult got = moveRows(s, row.row_bytes, h.send_counts.as<int32_t>(), 0, stream);
  h.rows = static_cast<int>(got.recv_rows);
  h.batch_counts_host = got.recv_counts;
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(h.batch_counts.get(), s.exchange->recvCountsDevice(),
                                    static_cast<size_t>(s.M) * 4, cudaMemcpyDeviceToDevice,
                                    stream));
  const bool idx64 = topk.idx_type == IndexType::kInt64;
  unpack(s, row, h.rows, 0, nullptr, topk.num_topk, idx64, fp8, stream);

  n.num_tokens = h.rows;
  n.topk = topk;
  n.topk.idx = s.batch_ids.get();
  n.topk.num_tokens = h.rows;
  n.topk_weights = s.batch_weights.as<float>();
  DispatchResult result = s.node->dispatch(n, h.node, stream);
  h.num_tokens = args.num_tokens;
  h.num_topk = topk.num_topk;
  h.routing = routing;
  if (from_layout) {
    // A cached dispatch sends no top-k (ops.hpp): its result has none, as on one node.
    result.recv_topk_idx = nullptr;
    result.recv_topk_weights = nullptr;
  }
  return result;
}

void ScaleOutBuffer::combine(const CombineArgs& args, const ScaleOutHandle& handle,
                             cudaStream_t stream) {
  Impl& s = *impl_;
  DeviceGuard guard(s.device);
  const ScaleOutHandle::Impl& h = *handle.impl_;
  const bool combined = args.recv_topk_weights != nullptr;
  const std::vector<CallVote> votes = voteCall(
      *s.bootstrap, "combine", args.scale_weights != nullptr, h.num_tokens > 0, combined, 0, [&] {
        const std::string me = onRank(s.topo.rank);
        if (h.owner != this) reject("combine: the handle belongs to another ScaleOutBuffer" + me);
        if (h.num_tokens < 0 || h.laid_out) {
          reject(std::string("combine: the handle ") +
                 (h.laid_out ? "was laid out by layout() and not dispatched since"
                             : "holds no dispatch yet") +
                 me);
        }
        if (combined != (args.combined_topk_weights != nullptr)) {
          reject("combine: combined_topk_weights is " + pointerOrNull(args.combined_topk_weights) +
                 " but recv_topk_weights is " + pointerOrNull(args.recv_topk_weights) +
                 " (both or neither)" + me);
        }
        if (reinterpret_cast<uintptr_t>(args.recv_topk_weights) % 4 != 0 ||
            reinterpret_cast<uintptr_t>(args.combined_topk_weights) % 4 != 0) {
          reject("combine: recv_topk_weights " + pointerOrNull(args.recv_topk_weights) +
                 " / combined_topk_weights " + pointerOrNull(args.combined_topk_weights) +
                 " must be 4-byte aligned (float32)" + me);
        }
        if (h.num_tokens > 0 && args.out == nullptr) reject("combine: out is null" + me);
      });
  // One node-local combine weighs every source's rows alike: scale_weights on every rank with
  // tokens or on none.
  const bool ship = weightsOnEveryRankOrNone(votes, "combine (scale_weights)", s.topo.rank);
  // Every rank reads the others' recv_topk_weights (inside its node, then across the rail): set on
  // every rank or on none, as on one node.
  {
    const std::string with = ranksWhere(votes, [](const CallVote& v) { return v.shape != 0; });
    const std::string without = ranksWhere(votes, [](const CallVote& v) { return v.shape == 0; });
    if (!with.empty() && !without.empty()) {
      reject("combine: recv_topk_weights / combined_topk_weights set on ranks " + with +
             " but not on ranks " + without + " (every rank or none)" + onRank(s.topo.rank));
    }
  }
  const float* node_weights = nullptr;
  if (ship) {
    shipWeights(s, args.scale_weights, h.num_tokens, h.num_topk, h.slot.as<int32_t>(),
                h.send_counts.as<int32_t>(), 0, stream);
    node_weights = s.recv.as<float>();
  }
  // scale_weights is [rows, num_topk] for the node-local handle: the shipped rows hold max_topk
  // floats, so pack them down when num_topk < max_topk.
  if (node_weights != nullptr && h.num_topk != s.max_topk && h.rows > 0) {
    EPCOMM_CUDA_CHECK(
        cudaMemcpy2DAsync(s.batch_weights.get(), static_cast<size_t>(h.num_topk) * 4, node_weights,
                          static_cast<size_t>(s.max_topk) * 4, static_cast<size_t>(h.num_topk) * 4,
                          static_cast<size_t>(h.rows), cudaMemcpyDeviceToDevice, stream));
    node_weights = s.batch_weights.as<float>();
  }
  CombineArgs n;
  n.x = args.x;
  n.scale_weights = node_weights;
  n.out = s.send.get();
  n.num_sms = args.num_sms;
  // combined_topk_weights: the node-local combine sums, per batch row, the entries of the node's
  // ranks the row went to (its recv_topk_weights rows are this rank's received rows, as the
  // node-local dispatch delivered them); the node sums travel back like the partials.
  n.recv_topk_weights = args.recv_topk_weights;
  n.combined_topk_weights = combined ? s.batch_combined.as<float>() : nullptr;
  s.node->combine(n, h.node, stream);

  moveRows(s, static_cast<int64_t>(s.H) * 2, h.batch_counts.as<int32_t>(), 0, stream);

  const node::TokenRows tokens{h.slot.as<int32_t>(), h.send_counts.as<int32_t>(), s.M, 0,
                               h.num_tokens};
  node::ReduceParams r{};
  r.partials = s.recv.as<uint16_t>();
  r.tokens = tokens;
  r.hidden = s.H;
  r.bias = static_cast<const uint16_t*>(args.bias);
  r.out = static_cast<uint16_t*>(args.out);
  node::launchNodeReduce(r, stream);
  if (!combined) return;

  // The node sums of the weights, [rows, num_topk] float32, back over the rail in the same order
  // (the reduce above has read the partials: the receive staging is free again), then summed per
  // token over its nodes in node order.
  const int64_t weight_row = static_cast<int64_t>(h.num_topk) * 4;
  if (h.rows > 0) {
    EPCOMM_CUDA_CHECK(cudaMemcpyAsync(s.send.get(), s.batch_combined.get(),
                                      static_cast<size_t>(h.rows * weight_row),
                                      cudaMemcpyDeviceToDevice, stream));
  }
  moveRows(s, weight_row, h.batch_counts.as<int32_t>(), 0, stream);
  node::ReduceWeightsParams w{};
  w.partials = s.recv.as<float>();
  w.tokens = tokens;
  w.num_topk = h.num_topk;
  w.out = args.combined_topk_weights;
  node::launchNodeReduceWeights(w, stream);
}

LlDispatchResult ScaleOutBuffer::lowLatencyDispatch(const LlDispatchArgs& args, cudaStream_t stream,
                                                    LlPhase phase) {
  Impl& s = *impl_;
  DeviceGuard guard(s.device);
  const bool weights = args.topk_weights != nullptr;
  const std::vector<CallVote> votes =
      voteCall(*s.bootstrap, "LL dispatch", weights, args.num_tokens > 0, args.use_fp8, 0, [&] {
        const std::string me = onRank(s.topo.rank);
        if (phase != LlPhase::kBoth) reject("LL dispatch: only LlPhase::kBoth across nodes" + me);
        if (s.ll_dispatched) {
          reject(
              "LL dispatch: the previous LL dispatch has no combine yet (dispatch and combine "
              "must alternate)" +
              me);
        }
        if (s.N_ll == 0) reject("LL dispatch: ll_max_tokens_per_rank is 0" + me);
        if (args.num_tokens < 0 || args.num_tokens > s.N_ll) {
          reject("LL dispatch: num_tokens " + std::to_string(args.num_tokens) +
                 " outside [0, ll_max_tokens_per_rank " + std::to_string(s.N_ll) + "]" + me);
        }
        if (args.topk.num_tokens != args.num_tokens) {
          reject("LL dispatch: topk.num_tokens " + std::to_string(args.topk.num_tokens) +
                 " != num_tokens " + std::to_string(args.num_tokens) + me);
        }
        if (args.num_tokens > 0 && (args.topk.num_topk < 1 || args.topk.num_topk > s.max_topk)) {
          reject("LL dispatch: topk.num_topk " + std::to_string(args.topk.num_topk) +
                 " outside [1, max_topk " + std::to_string(s.max_topk) + "]" + me);
        }
        if (args.num_tokens > 0 && (args.x == nullptr || args.topk.idx == nullptr)) {
          reject(std::string("LL dispatch: ") + (args.x == nullptr ? "x" : "topk.idx") +
                 " is null" + me);
        }
      });
  // Weights at dispatch: every rank with tokens or none (the forwarders' batches mix sources).
  const bool any_weights = weightsOnEveryRankOrNone(votes, "LL dispatch", s.topo.rank);
  requireSameShape(votes, "LL dispatch: use_fp8", s.topo.rank);
  s.ll_dispatched = true;
  s.ll_tokens = args.num_tokens;
  s.ll_topk = args.num_tokens > 0 ? args.topk.num_topk : 0;
  const node::RowLayout row = node::rowLayout(s.H, 2, s.max_topk);
  TopkView topk = args.topk;
  if (args.num_tokens == 0) topk.num_topk = 0;
  bucketAndPack(s, args.x, 2, nullptr, 0, 1, topk, args.topk_weights, s.ll_slot.as<int32_t>(),
                s.ll_send_counts.as<int32_t>(), s.N_ll, row, stream);
  moveRows(s, row.row_bytes, s.ll_send_counts.as<int32_t>(), s.N_ll, stream);
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(s.ll_batch_counts.get(), s.exchange->recvCountsDevice(),
                                    static_cast<size_t>(s.M) * 4, cudaMemcpyDeviceToDevice,
                                    stream));
  const int rows = s.M * s.N_ll;
  unpack(s, row, rows, s.N_ll, s.ll_batch_counts.as<int32_t>(), s.max_topk, false, false, stream);

  LlDispatchArgs n = args;
  n.x = s.batch_x.get();
  n.num_tokens = rows;
  n.topk.idx = s.batch_ids.get();
  n.topk.idx_type = IndexType::kInt32;
  n.topk.num_tokens = rows;
  n.topk.num_topk = s.max_topk;
  n.topk_weights = any_weights ? s.batch_weights.as<float>() : nullptr;
  return s.node->lowLatencyDispatch(n, stream, LlPhase::kBoth);
}

void ScaleOutBuffer::lowLatencyCombine(const LlCombineArgs& args, cudaStream_t stream,
                                       LlPhase phase) {
  Impl& s = *impl_;
  DeviceGuard guard(s.device);
  const bool weights = args.topk_weights != nullptr;
  const std::vector<CallVote> votes =
      voteCall(*s.bootstrap, "LL combine", weights, s.ll_tokens > 0, 0, 0, [&] {
        const std::string me = onRank(s.topo.rank);
        if (phase != LlPhase::kBoth) reject("LL combine: only LlPhase::kBoth across nodes" + me);
        if (!s.ll_dispatched) {
          reject("LL combine: no LL dispatch before it (dispatch and combine must alternate)" + me);
        }
        if (s.ll_tokens > 0 && args.out == nullptr) reject("LL combine: out is null" + me);
      });
  const bool ship = weightsOnEveryRankOrNone(votes, "LL combine", s.topo.rank);
  s.ll_dispatched = false;
  const float* node_weights = nullptr;
  if (ship) {
    // A rank without tokens ships nothing; its rows are all empty (slots -1).
    shipWeights(s, args.topk_weights, s.ll_tokens, s.ll_topk, s.ll_slot.as<int32_t>(),
                s.ll_send_counts.as<int32_t>(), s.N_ll, stream);
    node_weights = s.recv.as<float>();
  }
  LlCombineArgs n;
  n.x = args.x;
  n.topk_weights = node_weights;
  n.out = s.send.get();
  n.num_sms = args.num_sms;
  s.node->lowLatencyCombine(n, stream, LlPhase::kBoth);

  moveRows(s, static_cast<int64_t>(s.H) * 2, s.ll_batch_counts.as<int32_t>(), s.N_ll, stream);

  node::ReduceParams r{};
  r.partials = s.recv.as<uint16_t>();
  r.tokens = node::TokenRows{s.ll_slot.as<int32_t>(), s.ll_send_counts.as<int32_t>(), s.M, s.N_ll,
                             s.ll_tokens};
  r.hidden = s.H;
  r.bias = nullptr;
  r.out = static_cast<uint16_t*>(args.out);
  node::launchNodeReduce(r, stream);
}

void ScaleOutBuffer::barrier(cudaStream_t stream) {
  Impl& s = *impl_;
  DeviceGuard guard(s.device);
  s.node->barrier(stream);
  // Rank (n, l) passes its node's barrier once every rank of node n has reached it; the rail
  // exchange after it completes once the rank (m, l) of every node m has passed its own node's
  // barrier: then every rank of the job has reached this barrier. Worst-case mode: no rows, fixed
  // sizes, no host sync (graph-capturable); a fault is reported by sync().
  const size_t counts_bytes = static_cast<size_t>(s.M) * 4;
  RailExchangeArgs a;
  a.mode = RailExchangeMode::kWorstCase;
  a.row_bytes = 16;
  a.send_counts = s.barrier_scratch.as<int32_t>();
  a.send = s.barrier_scratch.as<uint8_t>(counts_bytes);
  a.recv = s.barrier_scratch.as<uint8_t>(counts_bytes + static_cast<size_t>(s.M) * 16);
  a.recv_capacity_rows = s.M;
  a.max_rows = 1;
  s.exchange->exchange(a, stream);
}

void ScaleOutBuffer::sync(cudaStream_t stream) {
  DeviceGuard guard(impl_->device);
  impl_->node->sync(stream);
  impl_->exchange->wait(stream);
}

// --- EpBuffer across nodes (core/scale_out.hpp) --------------------------------------------------

namespace {

// What EpBuffer delegates to when its ranks span several nodes: a ScaleOutBuffer.
class ScaleOutAdapter final : public core::ScaleOutOps {
 public:
  ScaleOutAdapter(Bootstrap& bootstrap, const BufferConfig& config)
      : buffer_(bootstrap, config), resolved_(resolveConfig(config, buffer_.numRanks())) {}

  int rank() const override { return buffer_.rank(); }
  int numRanks() const override { return buffer_.numRanks(); }
  int numLocalExperts() const override { return buffer_.numLocalExperts(); }
  const ResolvedConfig& config() const override { return resolved_; }
  EpBuffer& nodeBuffer() override { return buffer_.nodeBuffer(); }
  std::shared_ptr<void> createHandle() const override {
    return std::make_shared<ScaleOutHandle>(buffer_.createHandle());
  }
  void layout(const TopkView& topk, void* handle, cudaStream_t stream) override {
    buffer_.layout(topk, *static_cast<ScaleOutHandle*>(handle), stream);
  }
  DispatchResult dispatch(const DispatchArgs& args, void* handle, cudaStream_t stream) override {
    return buffer_.dispatch(args, *static_cast<ScaleOutHandle*>(handle), stream);
  }
  void combine(const CombineArgs& args, const void* handle, cudaStream_t stream) override {
    buffer_.combine(args, *static_cast<const ScaleOutHandle*>(handle), stream);
  }
  LlDispatchResult lowLatencyDispatch(const LlDispatchArgs& args, cudaStream_t stream,
                                      LlPhase phase) override {
    return buffer_.lowLatencyDispatch(args, stream, phase);
  }
  void lowLatencyCombine(const LlCombineArgs& args, cudaStream_t stream, LlPhase phase) override {
    buffer_.lowLatencyCombine(args, stream, phase);
  }
  void barrier(cudaStream_t stream) override { buffer_.barrier(stream); }
  void sync(cudaStream_t stream) override { buffer_.sync(stream); }

 private:
  ScaleOutBuffer buffer_;
  ResolvedConfig resolved_;
};

}  // namespace

void enableScaleOut() {
  core::setScaleOutFactory([](Bootstrap& bootstrap, const BufferConfig& config) {
    return std::unique_ptr<core::ScaleOutOps>(new ScaleOutAdapter(bootstrap, config));
  });
}

}  // namespace epcomm::nccl
