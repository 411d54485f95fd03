// SPDX-License-Identifier: Apache-2.0
// epcomm across nodes (docs/scale-out.md): a buffer whose dispatch and combine take exactly the
// argument structs of EpBuffer (epcomm/ops.hpp) and run hierarchically when the job spans several
// nodes. Part of the optional epcomm_nccl library (link epcomm::epcomm_nccl); this header does not
// include nccl.h.
//
// How it works. Every token crosses the network once per destination node, to the rank with the
// same local index there (its rail peer, over the rail's NCCL communicator), which forwards it
// over NVLink through a node-local EpBuffer to the ranks that own its experts. Combine reduces
// inside the node first (the node-local combine, weighted there), sends one BF16 row per
// (token, node) back over the rail, and the source sums the node partials in float32.
//
// Two ways to use it, the same code underneath:
//  - epcomm::nccl::enableScaleOut() once per process, then plain EpBuffer: an EpBuffer whose ranks
//    span several nodes runs hierarchically (EpBuffer's constructor says when), one node stays
//    the intranode EpBuffer, unchanged. The same calls and argument structs; EpHandle as usual.
//  - ScaleOutBuffer directly (any node count; on one node it adds an NCCL self-copy per op).
// The differences from one node are listed per method of ScaleOutBuffer below; across nodes
// EpBuffer::layout and EpBuffer::barrier are ScaleOutBuffer's, and device(), memMode(),
// bytesPerRank(), the peer bases and the scratch are the node-local buffer's. EpHandle's layout
// views (numTokensPerRank, ...) are null across nodes.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>

#include "epcomm/bootstrap.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/config.hpp"
#include "epcomm/ops.hpp"

namespace epcomm::nccl {

// Makes every EpBuffer created afterwards in this process whose ranks span several nodes
// hierarchical (a ScaleOutBuffer underneath). Not collective; call it on every rank before
// creating the buffers (a rank that did not would fail creation with InvalidArgument while the
// others go on: the same call on every rank).
void enableScaleOut();

class ScaleOutBuffer;

// The routing of one HT dispatch (the bucket of each token per node, the rows this rank forwarded,
// the node-local EpHandle), for the combine with it and for cached dispatches. Allocated by
// ScaleOutBuffer::createHandle for the buffer's capacity.
class ScaleOutHandle {
 public:
  ScaleOutHandle(ScaleOutHandle&&) noexcept;
  ScaleOutHandle& operator=(ScaleOutHandle&&) noexcept;
  ~ScaleOutHandle();

  int numTokens() const;  // tokens of the last dispatch with this handle (-1 before any)
  // Rows this rank forwarded into its node in the last dispatch (the node-local batch).
  int numForwardedRows() const;

  struct Impl;

 private:
  friend class ScaleOutBuffer;
  explicit ScaleOutHandle(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class ScaleOutBuffer {
 public:
  // Collective over `bootstrap` (every rank of the job, which must outlive the buffer). Finds the
  // nodes (EPCOMM_HOSTID, else the host; core topology: the same number of ranks on every node,
  // any placement), creates one node-local EpBuffer per node over a sub-bootstrap of the node's
  // ranks (its all-gathers run over `bootstrap`, so every rank of the job takes part in every
  // step) and one NCCL communicator per rail. config is the job's: hidden, num_experts (rank r
  // owns experts [r*E/R, (r+1)*E/R) as on one node), max_topk, the capacities per rank. The
  // node-local buffer gets num_experts / nodes experts and nodes * max_tokens_per_rank (and
  // nodes * ll_max_tokens_per_rank, which must stay <= kMaxLlTokensPerRank) tokens per rank,
  // since a forwarder may bring every node's full batch. Bad configs throw InvalidArgument on
  // every rank. A failure of the node-local buffer's creation on some nodes only can leave the
  // other nodes waiting for the bootstrap's deadline.
  ScaleOutBuffer(Bootstrap& bootstrap, const BufferConfig& config);
  // Collective: finalizes the rail communicators (with the deadline) and destroys the node buffer
  // (EpBuffer's destructor). Never throws.
  ~ScaleOutBuffer();
  ScaleOutBuffer(const ScaleOutBuffer&) = delete;
  ScaleOutBuffer& operator=(const ScaleOutBuffer&) = delete;

  int rank() const;
  int numRanks() const;
  int numNodes() const;
  int node() const;             // this rank's node
  int localRank() const;        // its index in the node == its rail
  int numLocalExperts() const;  // num_experts / num_ranks, as EpBuffer
  // The node-local buffer (its rank() is localRank()); its results are what dispatch returns.
  EpBuffer& nodeBuffer();

  ScaleOutHandle createHandle() const;

  // As EpBuffer::layout: local, not collective; bad input throws InvalidArgument here only. The
  // buckets need the forwarders, so it only checks `topk` and keeps a copy of its ids (stream-
  // ordered on `stream`) in the handle; the next cached dispatch with the handle (no topk) routes
  // by them, as a top-k dispatch without weights whose result holds no top-k (recv_topk_idx /
  // recv_topk_weights null), and lays the routing out for combine and later cached dispatches.
  // Until that dispatch the handle holds no dispatched routing: combine with it is
  // InvalidArgument. EpHandle's layout views stay null across nodes.
  void layout(const TopkView& topk, ScaleOutHandle& handle, cudaStream_t stream);

  // --- HT ---------------------------------------------------------------------------------------
  // Collective over the job. As EpBuffer::dispatch, with these differences:
  //  - routing from topk, or a cached dispatch (topk.idx null and topk.num_topk 0, as on one
  //    node) that reuses the handle's routing: the rows go where that dispatch sent them, in the
  //    same order (the bucket slots, the rail exchange of the same exact counts, the forwarder's
  //    node-local cached dispatch); no top-k ids or weights travel, recv_topk_idx /
  //    recv_topk_weights are null. Across nodes every rank routes alike (all cached or none) and
  //    passes the handle of the same earlier dispatch, whose num_tokens it passes again (each
  //    checked on every rank: InvalidArgument everywhere, naming the ranks). A cached dispatch
  //    on a handle laid out by layout() routes by the ids layout() kept (a new routing, like a
  //    top-k dispatch; it may be mixed with other ranks' top-k dispatches);
  //  - DispatchArgs::layout only with topk, and only the routing topk gives (what
  //    EpBuffer::layout / DeepEP's get_dispatch_layout compute): rows go by topk, so the layout is
  //    checked against it on the device before the vote (a host sync) and any difference fails
  //    every rank (InvalidArgument naming the entry, its value and topk's); a layout without topk
  //    is InvalidArgument (not supported across nodes yet);
  //  - the host waits for the network leg (the rail exchange's exact mode): not graph-capturable;
  //  - the result is the node-local buffer's: rows are grouped by forwarder (the rank of this
  //    node on the source's rail), recv_rank_prefix has G + 1 entries (by node-local rank), and
  //    recv_src_idx is the row in that forwarder's batch, not the token on the source rank. The
  //    rows, scales, top-k ids (local experts, as EpBuffer) and weights are those of EpBuffer;
  //  - a bad expert id reaches every node and fails the node-local dispatch there (every rank
  //    fails; the message names a forwarder's batch row); the buffer is then unusable.
  // Arguments checked on the host are voted over the job (one small all-gather per call): bad
  // input throws InvalidArgument on the rank that passed it and kRemote on every other rank.
  DispatchResult dispatch(const DispatchArgs& args, ScaleOutHandle& handle, cudaStream_t stream);

  // Collective over the job. As EpBuffer::combine: BF16 out in token order, scale_weights and
  // bias as there. With scale_weights they first travel to the forwarders (one float row of
  // max_topk per (token, node)). Each node's partial crosses the network in BF16: one rounding
  // more per node than EpBuffer. recv_topk_weights / combined_topk_weights as on one node (both
  // or neither, on every rank or on none; this rank's recv_topk_weights are the rows its
  // dispatch result holds): the node-local combine sums each forwarded row's entries over the
  // node's ranks it went to, those float32 rows travel back (one more exact rail exchange of
  // num_topk floats per (token, node)) and the source sums them per token in node order, so
  // the float32 sum is grouped by node (it can differ from one node's rank-order sum in the last
  // bit). Not graph-capturable (exact rail exchanges).
  void combine(const CombineArgs& args, const ScaleOutHandle& handle, cudaStream_t stream);

  // --- LL ---------------------------------------------------------------------------------------
  // Collective over the job; graph-capturable (worst-case rail exchanges: fixed sizes, no host
  // sync); phase must be LlPhase::kBoth. As EpBuffer::lowLatencyDispatch, with these
  // differences: recv_src_info is forwarder-local rank * (nodes * ll_max_tokens_per_rank) + the
  // row in its batch; rows_per_expert is G * nodes * ll_max_tokens_per_rank; topk_weights must be
  // given by every rank that has tokens or by none (voted).
  LlDispatchResult lowLatencyDispatch(const LlDispatchArgs& args, cudaStream_t stream,
                                      LlPhase phase = LlPhase::kBoth);
  // As EpBuffer::lowLatencyCombine (phase kBoth). topk_weights given: they travel to the
  // forwarders first and replace the dispatch's; not given: the dispatch's are used (then the
  // dispatch must have had them).
  void lowLatencyCombine(const LlCombineArgs& args, cudaStream_t stream,
                         LlPhase phase = LlPhase::kBoth);

  // Collective, stream-ordered barrier across the job (EpBuffer::barrier): the node-local barrier,
  // then a rail exchange of no rows (fixed sizes, no host sync: graph-capturable). Once it has
  // run on `stream`, every rank of the job has reached it. Its deadlines are the node buffer's
  // and the rail's; a fault is reported by sync().
  void barrier(cudaStream_t stream);

  // Waits for `stream` (the node buffer's sync) and reports a fault of the last graph-capturable
  // rail exchange (a bad count) on every rail rank.
  void sync(cudaStream_t stream);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace epcomm::nccl
