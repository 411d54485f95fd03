// SPDX-License-Identifier: Apache-2.0
// LL combine: the send and receive kernels (the protocol is described in low_latency.cuh).
#include <algorithm>

#include "kernels/kernel_check.hpp"
#include "kernels/low_latency.cuh"

namespace epcomm::kernels {
namespace {

constexpr WaitPhase kPhaseCombineRows = WaitPhase::kLlCombineRows;
constexpr WaitPhase kPhaseCombineWeights = WaitPhase::kLlWeightsPost;
// Stage times (kernels/stage_times.hpp): recorded by the fused kernel's halves.
constexpr StageKernel kStages = StageKernel::kLlCombine;
// Top-k entries whose expert rows one warp loads together in the combine send (registers:
// kTopkBatch * kRoundsPerSegment 16-byte vectors per lane).
constexpr int kTopkBatch = 4;
// Small batches (llCombineFineItems: a four-warp group for every segment item; 1 token at EP=2
// is 14 items for 528 groups): a group's warps take a round (256 columns) of the item each, and
// each loads every top-8 entry's row at once, one memory latency per item instead of two.
constexpr int kFineTopkBatch = 8;
constexpr int kGroupsPerBlock = kWarpsPerBlock / kRoundsPerSegment;
// Polls of one rank's partial lines (combine receive) before the deadline wait takes over
// (each ~0.3-0.5 us with the backoff: about 100 us).
constexpr int kLineFastPolls = 256;
static_assert(kMaxTopk + kFineTopkBatch - 1 < kWarpSize, "a batch's entries are lanes of one warp");
static_assert(kGroupsPerBlock <= kMaxGroupBarriers, "a group barrier per group");
namespace stage = ll_combine_stage;

// Combine-time weights (LlCombineArgs::topk_weights). The expert side sums weighted rows before
// sending one partial per (token, rank), so the owner's weights must reach it first: one warp
// per token of this rank writes the token's whole weight row [num_topk] into the
// combine_weights[parity][me][token] slot of every rank one of its experts lives on (found from
// topk_copy, the ids dispatch send kept, not from a rank bitmask), then tags the row there
// (weights_tags[parity][me][token]), which llCombineSend waits for before it reads the row. No grid
// arrival and no post: the mode post (llCombineSend) carries no data.
// `fused`: the first part of llCombineFusedKernel, which checked rankFailed for the whole block;
// every return below is block-uniform, so all threads of a block go on to the send half together.
// `epoch`: the round's; `s_peer`: the peer table (loadPeerTable, ordered by a barrier).
__device__ __forceinline__ void llCombineWeightsPush(const LlParams& p, uint64_t epoch, bool fused,
                                                     uint8_t* const* s_peer) {
  const PeerContext& ctx = p.peers;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int me = ctx.rank;
  const int parity = static_cast<int>(epoch & 1);
  const LlRegions& r = p.regions;
  if (!fused && rankFailed(ctx)) return;
  const int32_t* topk_copy = reinterpret_cast<const int32_t*>(ctx.local_base + r.topk_copy);
  for (int t = blockIdx.x * kWarpsPerBlock + warp; t < p.num_tokens;
       t += gridDim.x * kWarpsPerBlock) {
    // Lane k < num_topk holds entry k and its weight (one load each, issued together); the first
    // lane naming a rank marks it, and the whole warp then stores the weight row there, lane k
    // entry k. (One thread copying the row was a chain of num_topk load-store pairs: the compiler
    // may not hoist a load of the caller's weights above a store that could alias them.)
    const bool entry = lane < p.num_topk;
    const int32_t e = entry ? topk_copy[int64_t{t} * p.max_topk + lane] : -1;
    const float weight = entry ? p.combine_weights[int64_t{t} * p.num_topk + lane] : 0.f;
    const int d = e >= 0 ? e / p.num_local_experts : -1;
    const uint64_t base = d >= 0 ? reinterpret_cast<uint64_t>(s_peer[d]) : 0;
    const unsigned same = __match_any_sync(kFullMask, d);
    const bool leader = d >= 0 && (same & ((1u << lane) - 1u)) == 0;
    for (unsigned leaders = __ballot_sync(kFullMask, leader); leaders != 0;
         leaders &= leaders - 1) {
      float* dst = reinterpret_cast<float*>(__shfl_sync(kFullMask, base, __ffs(leaders) - 1) +
                                            r.combine_weights[parity]) +
                   (int64_t{me} * r.max_tokens + t) * p.max_topk;
      if (entry) dst[lane] = weight;
    }
    // Then the row's tag at each of its ranks, by the lane that leads that rank: it fences, then
    // stores (a release pattern, cumulative over every lane's weight stores that __syncwarp
    // ordered before the fence).
    __syncwarp();
    if (leader) {
      fenceAcqRelSys();
      stRelaxedSys(reinterpret_cast<uint64_t*>(base + r.weights_tags[parity]) +
                       int64_t{me} * r.max_tokens + t,
                   tag(epoch, kLlWeightsTagged));
    }
  }
}

__global__ void __launch_bounds__(kBlockThreads) llCombineWeightsKernel(LlParams p) {
  __shared__ uint8_t* s_peer[kMaxRanks];
  const uint64_t epoch = callEpoch(controlOf(p.peers.local_base), kEpochLl);
  loadPeerTable(p.peers, s_peer);
  __syncthreads();
  llCombineWeightsPush(p, epoch, false, s_peer);
}

// The combine's epoch: the round's, set by its dispatch send (== callEpoch() in every normal
// round). Not callEpoch(): when the send half's weights wait finds that a peer rejected this
// combine it marks the call skipped, and a block of this grid starting after that must still use
// this call's epoch and parity.
__device__ __forceinline__ uint64_t roundEpoch(const LlParams& p) {
  return controlOf(p.peers.local_base)->ll_round_epoch;
}

// Thread s < num_ranks: the rows source s posted to this round's dispatch (peer data, bounded by
// the caller), which sets where s's items start in the send half's item table. Loaded at the
// kernel's start, beside the epoch: the words were acquired by this round's dispatch receive and
// stay until the round after next (its parity), so nothing before them needs to be waited for.
__device__ __forceinline__ uint32_t postedRows(const LlParams& p, uint64_t epoch) {
  const int tid = threadIdx.x;
  if (tid >= p.peers.num_ranks) return 0;
  return llPostRows(tagValue(controlOf(p.peers.local_base)->ll_dispatch_flag[epoch & 1][tid]));
}

// The send half. `fused`: called by llCombineFusedKernel, which checked rankFailed for the whole
// block; every return below is block-uniform, so all threads of a block go on to the receive
// half together. kFine: the item shape (chosen on the host, llCombineFineItems): segment items,
// a warp each, or at small batches a four-warp group per segment item, its warps a round each.
template <bool kFine>
__device__ __forceinline__ void llCombineSend(const LlParams& p, uint64_t epoch,
                                              uint32_t posted_rows, bool fused,
                                              uint8_t* const* s_peer) {
  const PeerContext& ctx = p.peers;
  ControlRegion* own = controlOf(ctx.local_base);
  const int tid = threadIdx.x;
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int num_ranks = ctx.num_ranks;
  const int me = ctx.rank;
  // `epoch`: the round's, set by its dispatch send (roundEpoch).
  const int parity = static_cast<int>(epoch & 1);
  const LlRegions& r = p.regions;
  const int num_segments = (p.hidden + kSegmentCols - 1) / kSegmentCols;
  const uint32_t line_flag = llLineFlag(epoch);

  __shared__ int32_t s_first_item[kMaxRanks + 1];
  __shared__ int32_t s_items_of[kMaxRanks];  // each source's items (postedRows, bounded)
  __shared__ bool s_lines[kMaxRanks];        // that source's partials go as lines (llLineFlag)
  // The dispatch receive failed (or anything before): nothing here is valid, send nothing.
  if (!fused && rankFailed(ctx)) return;
  // Combine-time weights (protocol in low_latency.cuh). Every rank posts its mode at once. Mode
  // kLlWeightsNone (this rank used its dispatch weights) never waits; the other modes wait for
  // every rank's post and take rank s's weights from the combine_weights region iff s pushed
  // them, once their row tags are in. A rank that pushed and hears "none" from a rank that has
  // tokens fails the op on every rank.
  __shared__ bool s_pushed[kMaxRanks];
  // Relaxed: the post carries only the mode (pushed weight rows have their own tags), and a
  // release would fence before it, delaying block 0's first rows.
  if (blockIdx.x == 0 && tid < num_ranks) {
    stRelaxedSys(&controlOf(s_peer[tid])->ll_weights_flag[parity][me],
                 tag(epoch, llWeightsPost(p.weights_mode)));
  }
  if (tid < num_ranks) {
    const int32_t rows = min(static_cast<int32_t>(posted_rows), static_cast<int32_t>(r.max_tokens));
    s_pushed[tid] = false;
    s_items_of[tid] = rows * num_segments;
    s_lines[tid] = rows <= r.line_tokens;
  }
  const WaitContext w{&ctx, OpId::kLlCombineSend, globalTimerNs()};
  if (p.weights_mode != kLlWeightsNone) {
    bool ok = true;
    if (tid < num_ranks) {
      uint64_t v = 0;
      ok = waitTagged(&own->ll_weights_flag[parity][tid], epoch, w, kPhaseCombineWeights, tid, &v);
      const uint32_t theirs = tagValue(v);
      if (ok && p.weights_mode == kLlWeightsPushed && theirs == kLlWeightsNone) {
        // Announced to every peer: ranks in mode "none" do not wait for this rank's post.
        recordFault(ctx, FailKind::kSignatureMismatch, OpId::kLlCombineSend, kPhaseCombineWeights,
                    tid, -1, 1, 0);
        ok = false;
      }
      s_pushed[tid] = ok && theirs == kLlWeightsPushed;
    }
    // A failure (timeout, abort, fault) ends the op. A peer that rejected this combine (the only
    // other way a wait ends unready) does not: this rank still sends its partials and posts, so
    // that no peer's combine receive waits on it until the deadline; rows from the rejecting
    // rank use its dispatch weights, and nobody reads them (it skipped the call).
    // (Fused: block-wide, every thread of the block must agree.)
    if (!__syncthreads_and(ok) && (fused ? __syncthreads_or(rankFailed(ctx)) : rankFailed(ctx))) {
      return;
    }
  }
  stageThread0(ctx, kStages, stage::kWeights);
  __syncthreads();  // s_items_of
  if (tid == 0) {
    // Slots each source may have staged a row in this call: its token count (the posts arrived
    // before dispatch recv ended, which checked them; bounded again since they are peer data).
    int32_t total = 0;
    for (int s = 0; s < num_ranks; ++s) {
      s_first_item[s] = total;
      total += s_items_of[s];
    }
    s_first_item[num_ranks] = total;
  }
  __syncthreads();
  if (p.weights_mode != kLlWeightsNone) {
    // Every pushed weight row this block may read: its tag, one poll per thread and row at once
    // (a wait per row inside the loop below put an acquire before each row's loads). The
    // barrier then orders every thread's reads after the acquires. A wait that ends unready
    // recorded why (timeout, abort, a peer's fault): the op fails.
    bool ok = true;
    for (int s = 0; s < num_ranks; ++s) {
      if (!s_pushed[s]) continue;
      const int rows = (s_first_item[s + 1] - s_first_item[s]) / num_segments;
      for (int row = tid; ok && row < rows; row += blockDim.x) {
        const int64_t at = int64_t{s} * r.max_tokens + row;
        const uint64_t row_tag =
            reinterpret_cast<const uint64_t*>(ctx.local_base + r.row_tags[parity])[at];
        // Loaded beside the row tag (one latency for both when the row is in; waitFor would
        // load it twice more).
        const uint64_t* weights_tag =
            reinterpret_cast<const uint64_t*>(ctx.local_base + r.weights_tags[parity]) + at;
        const uint64_t weights_tag_now = ldAcquireSys(weights_tag);
        if (!llRowStaged(row_tag, epoch)) continue;
        if (llRowTagReady(weights_tag_now, epoch)) continue;
        ok = waitFor(
            weights_tag, [epoch](uint64_t v) { return llRowTagReady(v, epoch); }, true, w,
            kPhaseCombineWeights, s, epoch);
      }
    }
    if (!__syncthreads_and(ok)) return;
  }
  stageThread0(ctx, kStages, stage::kItemTable);

  const int items = s_first_item[num_ranks];
  // Work item `item` (source-major, then slot, then segment): its source, slot, segment and the
  // slot's row tag. Slot `row` holds a row only if its tag says so (the dispatch receive acquired
  // it).
  struct SendItem {
    int source;
    int row;
    int seg;
    uint64_t row_tag;
  };
  auto sendItem = [&](int item) {
    int s = 0;
    while (item >= s_first_item[s + 1]) ++s;
    const int row = (item - s_first_item[s]) / num_segments;
    const uint64_t row_tag = reinterpret_cast<const uint64_t*>(
        ctx.local_base + r.row_tags[parity])[int64_t{s} * r.max_tokens + row];
    return SendItem{s, row, (item - s_first_item[s]) % num_segments, row_tag};
  };
  // Where this rank tags segment `seg` of source s's slot `row`: at the token's owner.
  auto partialTag = [&](int s, int row, int seg) {
    return reinterpret_cast<uint64_t*>(s_peer[s] + r.combine_tags[parity]) +
           (int64_t{me} * r.max_tokens + row) * num_segments + seg;
  };
  {
    constexpr int kRounds = kFine ? 1 : kRoundsPerSegment;
    constexpr int kBatch = kFine ? kFineTopkBatch : kTopkBatch;
    constexpr int kWarpsPerItem = kRoundsPerSegment / kRounds;
    constexpr int kItemsPerBlock = kWarpsPerBlock / kWarpsPerItem;
    const int first_round = warp % kWarpsPerItem * kRounds;
    for (int item = blockIdx.x * kItemsPerBlock + warp / kWarpsPerItem; item < items;
         item += gridDim.x * kItemsPerBlock) {
      const auto [s, row, seg, row_tag] = sendItem(item);
      const int32_t* meta = metaOf(p, parity, s, row);
      const int32_t* slot_of_row =
          reinterpret_cast<const int32_t*>(ctx.local_base + r.slot_of_row) +
          (int64_t{s} * r.max_tokens + row) * p.max_topk;
      // Lane k reads entry k's slot and weight (max_topk <= kMaxTopk < 32); the tag, the slots
      // and the dispatch's weights are independent loads: one memory latency for the three.
      int32_t lane_row = lane < p.max_topk ? slot_of_row[lane] : -1;
      const float dispatch_weight = !s_pushed[s] && lane < p.max_topk
                                        ? reinterpret_cast<const float*>(meta + p.max_topk)[lane]
                                        : 0.f;
      const int token = row;  // slot t holds token t (dispatch send)
      if (!llRowStaged(row_tag, epoch)) continue;
      // Combine-time weights (their row tags were acquired above), else the dispatch's from the
      // metadata. Pushed ones were written during this kernel: read them through L2 (__ldcg),
      // never from a stale L1 line.
      float lane_weight = 0.f;
      if (lane_row >= 0) {
        lane_weight = s_pushed[s] ? __ldcg(reinterpret_cast<const float*>(
                                               ctx.local_base + r.combine_weights[parity]) +
                                           (int64_t{s} * r.max_tokens + token) * p.max_topk + lane)
                                  : dispatch_weight;
      }
      float acc[kRounds][8];
#pragma unroll
      for (int u = 0; u < kRounds; ++u) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[u][j] = 0.f;
      }
      // kBatch entries' rows are loaded before any is summed: one memory latency per batch, not
      // per entry (the sum was a chain of max_topk dependent loads). Same order of additions
      // whatever kRounds and kBatch, so both item shapes give the same bits.
      for (int k0 = 0; k0 < p.max_topk; k0 += kBatch) {
        int4 loaded[kBatch][kRounds];
        int32_t out_row[kBatch];
        float weight[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int k = k0 + b;  // warp-uniform; k < max_topk + kBatch - 1 < 32
          out_row[b] = __shfl_sync(kFullMask, lane_row, k % kWarpSize);
          weight[b] = __shfl_sync(kFullMask, lane_weight, k % kWarpSize);
          if (k >= p.max_topk) out_row[b] = -1;
          const uint16_t* y = p.expert_out + int64_t{max(out_row[b], 0)} * p.hidden;
#pragma unroll
          for (int u = 0; u < kRounds; ++u) {
            const int col = seg * kSegmentCols + (first_round + u) * kColsPerRound + lane * 8;
            loaded[b][u] = out_row[b] >= 0 && col < p.hidden
                               ? ldInput(reinterpret_cast<const int4*>(y + col))
                               : make_int4(0, 0, 0, 0);
          }
        }
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          if (out_row[b] < 0) continue;
#pragma unroll
          for (int u = 0; u < kRounds; ++u) {
            const int col = seg * kSegmentCols + (first_round + u) * kColsPerRound + lane * 8;
            // Unfused: the partial is rounded to BF16 for transport, and a reproducible partial
            // keeps that rounding identical to the reference model's.
            if (col < p.hidden) accumulateBf16x8Unfused(acc[u], loaded[b][u], weight[b]);
          }
        }
      }
      // An owner with few tokens gets lines, which it polls (no fence, no tag); else the BF16
      // partial and, below, its tag. Item-uniform, so group-uniform too.
      const bool lines = s_lines[s];
      if (lines) {
        int4* dst = reinterpret_cast<int4*>(s_peer[s] + r.combine_lines[parity]) +
                    (int64_t{me} * r.line_tokens + token) * (p.hidden / 4);
#pragma unroll
        for (int u = 0; u < kRounds; ++u) {
          const int col = seg * kSegmentCols + (first_round + u) * kColsPerRound + lane * 8;
          if (col < p.hidden) stLines(dst + col / 4, packBf16x8(acc[u]), line_flag);
        }
      } else {
        uint16_t* dst = reinterpret_cast<uint16_t*>(s_peer[s] + r.combine_rows[parity]) +
                        (int64_t{me} * r.max_tokens + token) * p.hidden;
#pragma unroll
        for (int u = 0; u < kRounds; ++u) {
          const int col = seg * kSegmentCols + (first_round + u) * kColsPerRound + lane * 8;
          if (col < p.hidden) stNoAlloc(reinterpret_cast<int4*>(dst + col), packBf16x8(acc[u]));
        }
      }
      if constexpr (kFine) {
        // The group's four warps stored the item's rounds: after the group's barrier its first
        // thread fences (cumulative over the stores the barrier ordered before it) and tags the
        // segment. No block barrier, and the item's row tag is still in registers.
        if (!lines) {
          groupBarrier<kWarpsPerItem * kWarpSize>(warp / kWarpsPerItem);
          if (warp % kWarpsPerItem == 0 && lane == 0) {
            fenceAcqRelSys();
            stRelaxedSys(partialTag(s, row, seg), tag(epoch, kLlPartialTagged));
          }
        }
      }
    }
  }

  // The tags of segment items (the four-warp groups tagged theirs above), no grid-wide arrival.
  // Each warp fences once after its items (all lanes: the fence with the strong tag store after it
  // is a release pattern, cumulative over the lanes' partial stores that __syncwarp ordered before
  // it), then tags every segment it stored whose row was staged, at its token's owner, its lanes
  // a segment each: the row-tag loads of up to 32 items are one memory latency, not a chain (a
  // warp has several items at small SM budgets: 7 at 128 tokens on 16 SMs, EP=2).
  if constexpr (!kFine) {
    __syncwarp();
    fenceAcqRelSys();
    __syncwarp();
    const int grid_warps = gridDim.x * kWarpsPerBlock;
    for (int item = blockIdx.x * kWarpsPerBlock + warp + lane * grid_warps; item < items;
         item += kWarpSize * grid_warps) {
      const auto [s, row, seg, row_tag] = sendItem(item);
      if (!llRowStaged(row_tag, epoch) || s_lines[s]) continue;
      stRelaxedSys(partialTag(s, row, seg), tag(epoch, kLlPartialTagged));
    }
  }
  stageBlock(ctx, kStages, stage::kReduced);
}

// Where one lane of the combine receive finds its columns of a token segment's partial lines.
struct LinesAt {
  const int4* lines;  // LlRegions::combine_lines of this call's parity
  int line_tokens;
  int hidden;
  int token;
  int seg;
  int lane;
  uint32_t flag;  // llLineFlag(epoch)
  // Rank src's line pairs of this lane's columns: round u's at [u * kPairsPerRound], while
  // inRow(u).
  __device__ __forceinline__ const int4* pairs(int src) const {
    return lines + (int64_t{src} * line_tokens + token) * (hidden / 4) +
           (seg * kSegmentCols + lane * 8) / 4;
  }
  __device__ __forceinline__ bool inRow(int u) const {
    return seg * kSegmentCols + u * kColsPerRound + lane * 8 < hidden;
  }
  static constexpr int kPairsPerRound = kColsPerRound / 4;  // int4 lines per round of columns
  // Whether rank src's last line of this lane's columns carries the flag: one load, polled
  // before all of them (a rank stores its lines together, so the rest are in by then or soon).
  __device__ __forceinline__ bool lastLineIn(int src) const {
    int u = kRoundsPerSegment - 1;
    while (u > 0 && !inRow(u)) --u;
    const int4 line = ldLine(pairs(src) + u * kPairsPerRound + 1);
    return line.y == static_cast<int>(flag) && line.w == static_cast<int>(flag);
  }
};

// One poll of rank src's lines of this lane's columns: true when every line carries the call's
// flag; the payloads are in got either way. Every load first, then the checks: the volatile
// loads stay in program order, so a check between them would wait for its load before the next
// one was issued.
static __device__ __forceinline__ bool pollLines(const LinesAt& at, int src,
                                                 int4 (&got)[kRoundsPerSegment]) {
  const int4* pairs = at.pairs(src);
  int4 line[kRoundsPerSegment][2];
#pragma unroll
  for (int u = 0; u < kRoundsPerSegment; ++u) {
    if (!at.inRow(u)) continue;
    line[u][0] = ldLine(pairs + u * LinesAt::kPairsPerRound);
    line[u][1] = ldLine(pairs + u * LinesAt::kPairsPerRound + 1);
  }
  bool all = true;
#pragma unroll
  for (int u = 0; u < kRoundsPerSegment; ++u) {
    if (!at.inRow(u)) continue;
    got[u] = linesPayload(line[u][0], line[u][1]);
    all &= linesReady(line[u][0], line[u][1], at.flag);
  }
  return all;
}

// The receive half. `fused`: after the send half in the same grid. Its epoch is read here, after
// the send half, as the separate kernel reads it after the send kernel: if a wait of the send
// half found a peer's rejection of this combine, the call is marked skipped; the separate kernel
// then sees the next epoch (and returns below), the fused one still this call (callEpoch knows
// the launch that marked it), and its waits for the rejecting rank end on the rejection notice.
// `round_epoch_hint`: the fused kernel's epoch (roundEpoch, read at its start; the same as
// callEpoch's here), which lets block 0 load the weights posts of its end check (below) beside
// its first words instead of after the items; 0 in the separate kernel.
template <bool kLines>
__device__ __forceinline__ void llCombineRecv(const LlParams& p, bool fused,
                                              uint64_t round_epoch_hint) {
  const PeerContext& ctx = p.peers;
  ControlRegion* own = controlOf(ctx.local_base);
  const int tid = threadIdx.x;
  const int num_ranks = ctx.num_ranks;
  const LlRegions& r = p.regions;
  // The epoch, the round's epoch and the failure word are independent loads: one memory latency
  // for all (they were a chain of three with the token count's, on the tail of a block that had
  // sent the last partials). The token count is this rank's of the dispatch, from the host.
  const uint64_t epoch = callEpoch(own, kEpochLl);
  const uint64_t round_epoch = ldVolatileU64(&own->ll_round_epoch);
  const int n = p.num_tokens;
  __shared__ uint64_t s_early_post[kMaxRanks];  // block 0: each rank's weights post, or 0
  if (blockIdx.x == 0 && tid < num_ranks) {
    s_early_post[tid] =
        round_epoch_hint == 0 ? 0 : ldVolatileU64(&own->ll_weights_flag[round_epoch_hint & 1][tid]);
  }
  const int parity = static_cast<int>(epoch & 1);
  const WaitContext w{&ctx, OpId::kLlCombineRecv, globalTimerNs()};
  const int num_segments = (p.hidden + kSegmentCols - 1) / kSegmentCols;

  if (fused ? __syncthreads_or(rankFailed(ctx)) : rankFailed(ctx)) return;
  // A peer that rejected this combine stops this rank's combine send, which marks the call
  // skipped; this kernel, queued behind it, then computes the next epoch. The round's epoch
  // (set by its dispatch send) tells: nothing to wait for, the host reports the rejection.
  if (round_epoch != epoch) return;
  __shared__ bool s_stopped;  // a wait of the block ended unready: the op is over here
  if (tid == 0) s_stopped = false;
  __syncthreads();
  const uint64_t* tags = reinterpret_cast<const uint64_t*>(ctx.local_base + r.combine_tags[parity]);

  const uint32_t* token_masks = reinterpret_cast<const uint32_t*>(ctx.local_base + r.token_mask);
  const uint16_t* partials =
      reinterpret_cast<const uint16_t*>(ctx.local_base + r.combine_rows[parity]);
  const int items = n * num_segments;
  const int warp = tid / kWarpSize;  // one warp per (token, segment) item
  const int lane = tid % kWarpSize;
  // kLines: this rank has at most line_tokens tokens (llCombineLines), so its partials come as
  // lines (llLineFlag), else as BF16 rows with a tag per segment (what every rank decides from
  // this rank's token count). A template parameter: each kernel holds one receive path (both in
  // one kernel spilled its registers).
  const uint32_t line_flag = llLineFlag(epoch);
  const int4* partial_lines =
      reinterpret_cast<const int4*>(ctx.local_base + r.combine_lines[parity]);

  // The first items go to the last blocks: the send half gave its first items to the first
  // blocks, so at small batches the partials are summed by blocks that reached this half early
  // (their preamble done) instead of by the blocks still sending them.
  const int block = static_cast<int>(gridDim.x - 1 - blockIdx.x);
  for (int item = block * kWarpsPerBlock + warp; item < items; item += gridDim.x * kWarpsPerBlock) {
    const int token = item / num_segments;
    const int seg = item % num_segments;
    const RankMask mask = loadRankMask(token_masks, token, rankMaskWords(num_ranks));
    float acc[kRoundsPerSegment][8];
#pragma unroll
    for (int u = 0; u < kRoundsPerSegment; ++u) {
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[u][j] = 0.f;
    }
    // The token's ranks (at most num_topk <= kMaxTopk < 32), lane i holding the i-th.
    int lane_rank = -1, num_dest = 0;
    forEachRank(mask, [&](int d) {
      if (lane == num_dest) lane_rank = d;
      ++num_dest;
    });
    // The partials of the token's ranks, added into acc in rank order (the same bits either
    // way). A wait that ends unready (recorded) ends the block's items.
    if constexpr (kLines) {
      // Lines: the token's ranks one after another, every lane polling its own columns' lines
      // until all of them carry this call's flag; what the last poll loaded is the payload. Up
      // to kLineFastPolls polls keep the lines in registers (a poll of the last line first,
      // then of all of them); then waitUntil (its deadline and stop checks) polls the flags
      // alone and the lines are loaded once more (a wait holding them across its checks spilled
      // them).
      const LinesAt at{partial_lines, r.line_tokens, p.hidden, token, seg, lane, line_flag};
      bool ready = true;
      for (int i = 0; ready && i < num_dest; ++i) {
        const int src = __shfl_sync(kFullMask, lane_rank, i);
        int4 got[kRoundsPerSegment];
        bool in = pollLines(at, src, got);
#pragma unroll 1
        for (int poll = 0; !in && poll < kLineFastPolls; ++poll) {
          __nanosleep(kTagWaitBackoffNs);
          if (at.lastLineIn(src)) in = pollLines(at, src, got);
        }
        if (!in) {
          uint64_t observed = 0;
          auto flagsIn = [&] {
            for (int u = 0; u < kRoundsPerSegment && at.inRow(u); ++u) {
              const int4* pair = at.pairs(src) + u * LinesAt::kPairsPerRound;
              const int4 first = ldLine(pair);
              if (!linesReady(first, ldLine(pair + 1), at.flag)) {
                observed = static_cast<uint32_t>(first.y);
                return false;
              }
            }
            return true;
          };
          in = !*static_cast<volatile bool*>(&s_stopped) &&
               waitUntil(flagsIn, observed, false, w, kPhaseCombineRows, src, epoch,
                         kTagWaitBackoffNs) &&
               pollLines(at, src, got);  // ready once, ready for good: the flags are this call's
        }
        ready = __all_sync(kFullMask, in);
#pragma unroll
        for (int u = 0; u < kRoundsPerSegment; ++u) {
          if (ready && at.inRow(u)) accumulateBf16x8Unfused(acc[u], got[u], 1.f);
        }
      }
      if (!ready) {
        if (lane == 0) s_stopped = true;
        break;
      }
    } else {
      // Lane i waits for rank lane_rank's tag of this segment (stored after the partial), then
      // the partials are loaded kTopkBatch at a time before any is summed (as in the send half).
      bool ready = true;
      if (lane < num_dest) {
        ready = !*static_cast<volatile bool*>(&s_stopped) &&
                waitFor(
                    tags + (int64_t{lane_rank} * r.max_tokens + token) * num_segments + seg,
                    [epoch](uint64_t v) { return llRowTagReady(v, epoch); }, true, w,
                    kPhaseCombineRows, lane_rank, epoch, nullptr, kTagWaitBackoffNs);
      }
      if (!__all_sync(kFullMask, ready)) {
        if (lane == 0) s_stopped = true;
        break;
      }
      __syncwarp();  // each lane's acquire orders its rank's partial before every lane's loads
      for (int i0 = 0; i0 < num_dest; i0 += kTopkBatch) {
        int4 loaded[kTopkBatch][kRoundsPerSegment];
        int src[kTopkBatch];
#pragma unroll
        for (int b = 0; b < kTopkBatch; ++b) {
          src[b] = __shfl_sync(kFullMask, lane_rank, (i0 + b) % kWarpSize);
          if (i0 + b >= num_dest) src[b] = -1;
          const uint16_t* row =
              partials + (int64_t{max(src[b], 0)} * r.max_tokens + token) * p.hidden;
#pragma unroll
          for (int u = 0; u < kRoundsPerSegment; ++u) {
            const int col = seg * kSegmentCols + u * kColsPerRound + lane * 8;
            loaded[b][u] = src[b] >= 0 && col < p.hidden
                               ? ldPeer(reinterpret_cast<const int4*>(row + col))
                               : make_int4(0, 0, 0, 0);
          }
        }
#pragma unroll
        for (int b = 0; b < kTopkBatch; ++b) {
          if (src[b] < 0) continue;
#pragma unroll
          for (int u = 0; u < kRoundsPerSegment; ++u) {
            const int col = seg * kSegmentCols + u * kColsPerRound + lane * 8;
            if (col < p.hidden) accumulateBf16x8Unfused(acc[u], loaded[b][u], 1.f);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kRoundsPerSegment; ++u) {
      const int col = seg * kSegmentCols + u * kColsPerRound + lane * 8;
      if (col < p.hidden) {
        *reinterpret_cast<int4*>(p.out + int64_t{token} * p.hidden + col) = packBf16x8(acc[u]);
      }
    }
  }

  // This block's arrival for the round's close (at the end), by the last warp once its items are
  // done: the close needs only every block's epoch fixed, and at small batches that warp has no
  // items, so the atomic's round trip overlaps the other warps' receive instead of following a
  // block barrier on the kernel's tail.
  constexpr int kArrivalThread = kBlockThreads - kWarpSize;
  __shared__ uint32_t s_arrived_before;
  if (tid == kArrivalThread) {
    s_arrived_before = atomicAdd(&own->local.arrive[kArriveLlCombineRecv], 1);
  }
  stageBlock(ctx, kStages, stage::kSummed);
  // Every rank took part in this combine, whether or not its partials came here: block 0 waits
  // for each rank's weights post, which every rank stores at its combine's start. So a rank that
  // rejected the call (it never posts; the wait ends on its notice) or failed it (notice) stops the
  // op here too. A rank that pushed weights while this one used the dispatch's fails on hearing
  // this rank's "none" (llCombineSend): its fault notice ends it here. This rank's mode is its own
  // post (it posts to itself too): the receive kernel of a split combine does not get
  // LlParams::weights_mode, which only the send call sets.
  __shared__ uint32_t s_mode[kMaxRanks];  // each rank's weights post, kNoPost if none came
  constexpr uint32_t kNoPost = 0xffffffffu;
  __syncthreads();  // s_stopped
  const bool check = !s_stopped && blockIdx.x == 0;
  if (check && tid < num_ranks) {
    uint64_t v = s_early_post[tid];  // loaded at the start; a post not in then is waited for
    const bool posted =
        (round_epoch_hint == epoch && tagReached(v, epoch)) ||
        waitTagged(&own->ll_weights_flag[parity][tid], epoch, w, kPhaseCombineWeights, tid, &v);
    s_mode[tid] = posted ? tagValue(v) : kNoPost;
  }
  __syncthreads();
  if (check && tid < num_ranks && s_mode[ctx.rank] == kLlWeightsNone &&
      s_mode[tid] == kLlWeightsPushed) {
    (void)waitFor(
        &own->peer_faulted, [](uint64_t) { return false; }, false, w, kPhaseCombineWeights, tid,
        epoch);
  }
  // The last block to arrive closes the round: a counting arrival (nothing to publish, so no
  // fences), which every block makes, stopped or not, so the counter is back at 0 after every
  // launch. A stopped call closes too: the rank's failure is sticky, and a skip of this call
  // (callEpoch) names the same epoch.
  if (tid == kArrivalThread && s_arrived_before == gridDim.x - 1) {
    own->local.arrive[kArriveLlCombineRecv] = 0;
    own->local.epoch[kEpochLl] = epoch;
  }
}

template <bool kFine>
__global__ void __launch_bounds__(kBlockThreads) llCombineSendKernel(LlParams p) {
  __shared__ uint8_t* s_peer[kMaxRanks];
  const uint64_t epoch = roundEpoch(p);
  const uint32_t posted_rows = postedRows(p, epoch);
  loadPeerTable(p.peers, s_peer);
  __syncthreads();
  llCombineSend<kFine>(p, epoch, posted_rows, false, s_peer);
}

template <bool kLines>
__global__ void __launch_bounds__(kBlockThreads) llCombineRecvKernel(LlParams p) {
  llCombineRecv<kLines>(p, false, 0);
}

// Both halves in one grid (PerfFlags::ll_fused_combine), after the combine-time weights push when
// there is one (one launch instead of two: the host enqueue and the GPU gap of a kernel). The
// receive half waits for partial-row tags that other blocks' send halves store (this rank's and
// its peers'), and the send half for every rank's weights post, which the last block of the push
// makes: the grid (the SM budget, one block per SM) must be resident at once, as the two-kernel
// path already needs across ranks. kPushWeights is a template parameter so that the kernel
// without the push is the one measured before it (a runtime branch cost the combine without
// combine-time weights 0.3-0.6 us on 2x H200); kFine likewise, so that the segment items' kernel
// is the one measured before the one-round items.
template <bool kPushWeights, bool kFine, bool kLines>
__global__ void __launch_bounds__(kBlockThreads) llCombineFusedKernel(LlParams p) {
  stageStart(p.peers, kStages);
  // Loaded beside the failure word, before the barrier: one memory latency for both.
  const uint64_t epoch = roundEpoch(p);
  const uint32_t posted_rows = postedRows(p, epoch);
  __shared__ uint8_t* s_peer[kMaxRanks];
  loadPeerTable(p.peers, s_peer);
  if (__syncthreads_or(rankFailed(p.peers))) return;
  if constexpr (kPushWeights) llCombineWeightsPush(p, epoch, true, s_peer);
  llCombineSend<kFine>(p, epoch, posted_rows, true, s_peer);
  llCombineRecv<kLines>(p, true, epoch);
  stageThread0(p.peers, kStages, stage::kEnd);
}

// The send half's item shape for a grid of num_blocks: one-round items when every segment item
// of a batch like this rank's (every rank with as many tokens, each sending a row to every rank)
// has a four-warp group of its own. A guess only: any batch is summed right with either shape.
bool llCombineFineItems(const LlParams& p, int num_blocks) {
  const int64_t segments = (p.hidden + kSegmentCols - 1) / kSegmentCols;
  return int64_t{p.num_tokens} * p.peers.num_ranks * segments <=
         int64_t{num_blocks} * kGroupsPerBlock;
}

// This rank's partials come as lines (what its peers decide from its dispatch post).
bool llCombineLines(const LlParams& p, int num_tokens) {
  return num_tokens <= p.regions.line_tokens;
}

template <bool kPushWeights, bool kFine>
void launchFusedCombine(const LlParams& params, int num_blocks, bool lines, cudaStream_t stream) {
  if (lines) {
    llCombineFusedKernel<kPushWeights, kFine, true>
        <<<num_blocks, kBlockThreads, 0, stream>>>(params);
  } else {
    llCombineFusedKernel<kPushWeights, kFine, false>
        <<<num_blocks, kBlockThreads, 0, stream>>>(params);
  }
}

}  // namespace

void launchLlCombineFused(const LlParams& params, int sm_budget, cudaStream_t stream) {
  const int num_blocks = std::max(1, sm_budget);
  const bool fine = llCombineFineItems(params, num_blocks);
  const bool lines = llCombineLines(params, params.num_tokens);
  if (params.weights_mode == kLlWeightsPushed) {
    if (fine) {
      launchFusedCombine<true, true>(params, num_blocks, lines, stream);
    } else {
      launchFusedCombine<true, false>(params, num_blocks, lines, stream);
    }
  } else if (fine) {
    launchFusedCombine<false, true>(params, num_blocks, lines, stream);
  } else {
    launchFusedCombine<false, false>(params, num_blocks, lines, stream);
  }
  EPCOMM_KERNEL_LAUNCH_CHECK(llCombineFusedKernel);
}

void launchLlCombineWeights(const LlParams& params, int sm_budget, cudaStream_t stream) {
  const int work_blocks = (params.num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int num_blocks = std::max(1, std::min(sm_budget, work_blocks));
  llCombineWeightsKernel<<<num_blocks, kBlockThreads, 0, stream>>>(params);
  EPCOMM_KERNEL_LAUNCH_CHECK(llCombineWeightsKernel);
}

void launchLlCombineSend(const LlParams& params, int sm_budget, cudaStream_t stream) {
  const int num_blocks = sm_budget;
  if (llCombineFineItems(params, num_blocks)) {
    llCombineSendKernel<true><<<num_blocks, kBlockThreads, 0, stream>>>(params);
  } else {
    llCombineSendKernel<false><<<num_blocks, kBlockThreads, 0, stream>>>(params);
  }
  EPCOMM_KERNEL_LAUNCH_CHECK(llCombineSendKernel);
}

void launchLlCombineRecv(const LlParams& params, int num_tokens, int sm_budget,
                         cudaStream_t stream) {
  // One warp per (token, segment), kWarpsPerBlock per block.
  const int segments = (params.hidden + kSegmentCols - 1) / kSegmentCols;
  const int work_blocks =
      static_cast<int>((int64_t{num_tokens} * segments + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const int num_blocks = std::max(1, std::min(sm_budget, work_blocks));
  LlParams recv = params;
  recv.num_tokens = num_tokens;
  if (llCombineLines(params, num_tokens)) {
    llCombineRecvKernel<true><<<num_blocks, kBlockThreads, 0, stream>>>(recv);
  } else {
    llCombineRecvKernel<false><<<num_blocks, kBlockThreads, 0, stream>>>(recv);
  }
  EPCOMM_KERNEL_LAUNCH_CHECK(llCombineRecvKernel);
}

}  // namespace epcomm::kernels
