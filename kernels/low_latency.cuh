// SPDX-License-Identifier: Apache-2.0
// Low-latency (LL) dispatch and combine for small decode batches. No count round trip: every
// region has a fixed worst-case size, so a sender knows where to write before hearing from
// anyone, and each op is a send kernel plus a receive kernel the caller may split.
//
//   dispatch send  (rank s): the last block first posts (epoch, token count | call signature << 16)
//   to
//                  every rank d. Token t's row goes once (BF16, or cast to FP8 + scales) into
//                  slot t of d's staging area [parity][s][t] for every rank d holding one of its
//                  experts, with its top-k ids (a repeated id sent as -1) and weights; each
//                  block then fences once and tags its tokens' slots in every rank, present or
//                  absent (no grid-wide arrival, no prefix over the tokens). An id outside
//                  [-1, num_experts) stops the op on every rank (fault notice; the token is
//                  tagged nowhere, so every receiver waits on it until the notice stops it).
//                  At small batches the routing also sends each entry's local expert ahead of
//                  the row (entry tags, protocol.hpp).
//   dispatch recv  (rank d): per source, wait for its post, check its signature and bound its
//                  token count; then per slot, wait for its tag and copy a present row into the
//                  expert-major output of every local expert it selected (positions taken with
//                  atomics and bounded by the slab; at small batches as soon as the entry tag
//                  is in), remembering where each copy went.
//   combine weights (rank s, only with LlCombineArgs::topk_weights): the weights live with the
//                  token owner but the expert side needs them (it sends one weighted partial per
//                  (token, rank), not one row per expert), so s first writes each token's weight
//                  row into combine_weights[parity][s][token] of every rank the token went to
//                  (ranks found from the ids dispatch send kept in topk_copy), and after each
//                  row its tag in weights_tags[parity][s][token] there (one fence per warp, no
//                  grid arrival). Cost: N * (ranks per token) * (K * 4 + 8) bytes of NVLink
//                  writes (40 KiB for 128 tokens, top-8 on 8 ranks, against 14 MiB of rows at
//                  hidden 7168), and the combine send waits for every rank's mode post.
//   combine send   (rank d): every rank posts its weights mode at once to every rank's
//                  ll_weights_flag[parity][d]: kLlWeightsPushed, kLlWeightsNone (it uses its
//                  dispatch weights) or kLlWeightsNoTokens. A rank in mode "none" does not wait;
//                  a rank that pushed, or has no tokens, waits for every rank's post and takes
//                  rank s's weights from combine_weights iff s pushed, each row once its tag is
//                  in (a pusher hearing "none" fails the op on every rank: the choice must
//                  match). Then, for each slot tagged present, sum weight * expert output over
//                  the row's local experts in float32 and store that BF16 partial row into the
//                  token owner's combine staging [parity][d][token], one 1024-column segment per
//                  warp item; each warp then fences once and tags every segment it stored
//                  (combine_tags; no arrival). At small batches an item is a four-warp group's,
//                  whose first thread fences and tags it after the group's barrier. An owner
//                  with at most line_tokens tokens (its dispatch post says how many) gets the
//                  partial as lines instead (combine_lines, protocol.hpp llLineFlag): the flag
//                  travels in every 8 bytes, so no fence and no tag.
//   combine recv   (rank s): per (token, segment), wait for the tags of the ranks the token went
//                  to (or, with at most line_tokens tokens, poll their lines), sum their
//                  partials (float32) and write BF16; every token's row is written (zeros for a
//                  token routed nowhere). Block 0 then waits for every rank's weights post, so
//                  that a rank that rejected or failed the call stops it here.
// Parity: consecutive calls alternate between two copies of every region peers write into, so a
// rank may start call e+1 while a peer still reads call e. Call e+2 reuses call e's copy; by then
// every peer has finished call e: a rank's dispatch of call e+1 waits for every rank's count post
// of e+1, which a rank makes only after its combine of call e (stream order).
// Regions only this rank touches (outputs, bookkeeping) have one copy: its own stream orders them.
//
// This header holds what both halves share (constants, the staged metadata record); the kernels
// are in ll_dispatch.cu and ll_combine.cu. Included by those two files only.
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/launch.hpp"

namespace epcomm::kernels {
namespace {

using namespace device;

constexpr int kSegmentCols = kLlSegmentCols;  // columns one warp moves per work item
// A sleep between reads of a row tag that is not in yet: the receive's warps poll their tags while
// the rows land beside them (the HT push combine's reducers slowed the landing pushes up to 10x
// without one; kPushWaitBackoffNs).
constexpr uint32_t kTagWaitBackoffNs = 100;
constexpr int kColsPerRound = kWarpSize * 8;  // 8 BF16 (one 16-byte vector) per lane
constexpr int kRoundsPerSegment = kSegmentCols / kColsPerRound;

// Staged row metadata: max_topk ids (this token's, deduplicated), then max_topk weights. The
// row's token is its slot; which entries are the receiver's, its tag says (protocol.hpp).
__device__ __forceinline__ int32_t* metaOf(const LlParams& p, int parity, int src, int row) {
  return reinterpret_cast<int32_t*>(p.peers.local_base + p.regions.meta[parity] +
                                    (int64_t{src} * p.regions.max_tokens + row) *
                                        p.regions.meta_bytes);
}

// The peer table into shared memory, before the kernel's first barrier (which orders it): loaded
// beside the kernel's other first words, one memory latency for all, instead of a dependent load
// of ctx.peer_bases wherever a peer is first addressed.
__device__ __forceinline__ void loadPeerTable(const PeerContext& ctx, uint8_t** s_peer) {
  if (static_cast<int>(threadIdx.x) < ctx.num_ranks) {
    s_peer[threadIdx.x] = ctx.peer_bases[threadIdx.x];
  }
}

}  // namespace
}  // namespace epcomm::kernels
