// SPDX-License-Identifier: Apache-2.0
// High-throughput intranode dispatch and combine over NVLink loads and stores.
//
// Dispatch (one kernel, every block does all phases):
//   1. notify: every block writes this rank's count row M[me][*] and its call signature into
//      every peer's control region (tagged with the call's epoch). Every block writes the same
//      values, so no block ever waits for another block of its own grid to be scheduled.
//   2. every block waits for all rows of M and checks them (signatures equal, every count and
//      every offset inside the capacity: M comes from other ranks); from M it knows where this
//      rank's rows start in each destination (rows are rank-major there: sources in rank order).
//   3. warps stream token rows from x straight into the destinations' receive regions at their
//      final offset — one pass over NVLink, no staging — plus scales, re-based top-k and source
//      index. A token crosses to a rank once however many of its experts live there. The warps
//      take pieces of rows from a per-rank counter (load balance), not a fixed share.
//   4. every block adds its arrival share to every destination ("my rows are written": the
//      shares of one rank's blocks sum to a constant whatever its grid); block 0 waits until
//      every source's shares are in here.
// A peer's count row for call e also means "I have finished with my receive region of call
// e-1" (it is written by a kernel stream-ordered after that rank's earlier work), so writing into
// a peer only after seeing its row never overwrites data it still reads.
//
// Combine (pull): every rank's expert outputs sit in its symmetric combine-input region in
// received-row order. After a readiness handshake each rank reads, for each of its tokens, the
// rows from every rank the token went to, sums them in float32 (weighted, plus bias) and writes
// BF16 in token order; with combined top-k weights, the token's received-weight rows the same way
// (lane k sums entry k). A final handshake ("done pulling") makes the combine input reusable as
// soon as the kernel completes.
#include "kernels/dependent_launch.cuh"
#include "kernels/device_utils.cuh"
#include "kernels/kernel_check.hpp"
#include "kernels/launch.hpp"
#include "kernels/layout_tile.cuh"

namespace epcomm::kernels {
namespace {

using namespace device;

constexpr WaitPhase kPhaseCounts = WaitPhase::kHtCounts;
constexpr WaitPhase kPhaseRowsShares = WaitPhase::kHtRowsShares;
constexpr WaitPhase kPhaseExpertCounts = WaitPhase::kHtExpertCounts;
constexpr WaitPhase kPhaseReady = WaitPhase::kHtCombineReady;
constexpr WaitPhase kPhasePullShares = WaitPhase::kHtPullShares;

// Stage times (kernels/stage_times.hpp).
constexpr StageKernel kDispatchStages = StageKernel::kHtDispatch;
constexpr StageKernel kCombineStages = StageKernel::kHtCombine;
namespace dstage = ht_dispatch_stage;
namespace cstage = ht_combine_stage;

// Copies vectors [first_vec, num_vecs) of a row of 16-byte vectors from `src` to the `num_dst`
// destination rows in `dst`, the warp's lanes striding over them.
__device__ __forceinline__ void copyRowToRanks(const int4* src, int4* const* dst, int num_dst,
                                               int first_vec, int num_vecs, int lane) {
  for (int base = first_vec; base < num_vecs; base += kWarpSize * kDispatchUnroll) {
    int4 v[kDispatchUnroll];
#pragma unroll
    for (int u = 0; u < kDispatchUnroll; ++u) {
      const int i = base + u * kWarpSize + lane;
      if (i < num_vecs) v[u] = ldNcNoAlloc(src + i);
    }
    for (int j = 0; j < num_dst; ++j) {
#pragma unroll
      for (int u = 0; u < kDispatchUnroll; ++u) {
        const int i = base + u * kWarpSize + lane;
        if (i < num_vecs) stNoAlloc(dst[j] + i, v[u]);
      }
    }
  }
}

template <typename IdxT, bool kFusedLayout>
__global__ void __launch_bounds__(kBlockThreads) htDispatchKernel(HtDispatchParams p) {
  const PeerContext& ctx = p.peers;
  waitPriorGrids();
  stageStart(ctx, kDispatchStages);
  ControlRegion* own = controlOf(ctx.local_base);
  const int num_ranks = ctx.num_ranks;
  const int me = ctx.rank;
  const int tid = threadIdx.x;
  const uint64_t epoch = callEpoch(own, kEpochHtDispatch);
  const int parity = static_cast<int>(epoch & 1);
  const bool has_topk = p.has_topk != 0;
  const int64_t capacity = p.regions.capacity;
  const WaitContext w{&ctx, OpId::kHtDispatch, globalTimerNs()};

  // A rank that failed (its layout found a bad expert id, or an earlier fault) sends nothing;
  // its peers stop on the fault notice it broadcast.
  if (rankFailed(ctx)) return;

  // The layout's shared memory (ht_fused_layout) is used before the count matrix: one union.
  __shared__ union {
    layout_tile::LayoutShared layout;
    uint32_t matrix[kMaxRanks][kMaxRanks + kHtSignatureWords];
  } s_union;
  auto& s_matrix = s_union.matrix;
  __shared__ int32_t s_offset[kMaxRanks];  // first row of this rank's rows in each destination
  __shared__ uint8_t* s_peer[kMaxRanks];
  // The current token's destinations, per warp, as a compact list: j-th rank, row and row address.
  __shared__ int4* s_dst[kWarpsPerBlock][kMaxRanks];
  __shared__ int32_t s_dst_row[kWarpsPerBlock][kMaxRanks];
  __shared__ uint8_t s_dst_rank[kWarpsPerBlock][kMaxRanks];
  static_assert(kMaxRanks <= 0xff, "s_dst_rank holds a rank in 8 bits");

  if (tid < num_ranks) s_peer[tid] = ctx.peer_bases[tid];

  // 0. PerfFlags::ht_fused_layout: the layout first, tiles spread over the blocks (all resident,
  //    as the waits below already need); the block that finishes it stores this call's epoch in
  //    layout_done after every output, and every block waits for that before it reads any of them
  //    (counts, masks, slots). A bad expert id found there stops the op before anything is sent.
  //    A template parameter: the default kernel's code (and register count) stays as it was.
  if constexpr (kFusedLayout) {
    stageStart(p.layout.peers, StageKernel::kLayout);
    const int tiles = layoutTiles(p.layout.num_tokens);
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      // IdxT is the top-k ids' type here too (one TopkView gives both).
      layout_tile::layoutTile<IdxT>(p.layout, tile, tiles, s_union.layout, p.layout_done, epoch);
    }
    bool ok = true;
    if (tid == 0) ok = waitEpoch(p.layout_done, epoch, w, WaitPhase::kLayoutTiles, -1);
    if (!__syncthreads_and(ok)) return;
    if (__syncthreads_or(rankFailed(ctx))) return;
  }

  // 1. notify: my count row and the call signature, into every peer
  // (R * (R + 2) words: more than the block's threads beyond 21 ranks)
  // (ht_counts_once: block 0 alone; the words are the same from every block, and what a block
  // waits for below is only that they arrived: block 0 of rank s posting them tells as much as
  // every block of s posting them, since all of them run at once.)
  const int row_words = num_ranks + kHtSignatureWords;
  const int post_words = p.counts_once && blockIdx.x != 0 ? 0 : num_ranks * row_words;
  for (int i = tid; i < post_words; i += kBlockThreads) {
    const int d = i / row_words;
    const int j = i % row_words;
    const uint32_t value = j < num_ranks    ? static_cast<uint32_t>(p.rank_counts[j])
                           : j == num_ranks ? static_cast<uint32_t>(p.signature)
                                            : static_cast<uint32_t>(p.signature >> 32);
    // Tagged words that publish no other data (the rows follow under the "done" post): no fence.
    stRelaxedSys(&controlOf(ctx.peer_bases[d])->ht_counts[parity][me][j], tag(epoch, value));
  }
  // Every dispatch sends the per-expert counts of its routing, cached ones too (the handle keeps
  // them): the receivers' counts always belong to this call, aligned with this call's alignment.
  if (blockIdx.x == 0) {
    const int local_experts = p.num_local_experts;
    for (int i = tid; i < num_ranks * local_experts; i += kBlockThreads) {
      const int d = i / local_experts;
      const int e = i % local_experts;
      stRelaxedSys(&controlOf(ctx.peer_bases[d])->ht_expert_counts[parity][me][e],
                   tag(epoch, static_cast<uint32_t>(p.expert_counts[i])));
    }
  }

  stageBlock(ctx, kDispatchStages, dstage::kCountsPosted);

  // 2. wait for the whole count matrix
  bool ok = true;
  for (int i = tid; i < num_ranks * row_words && ok; i += kBlockThreads) {
    const int s = i / row_words;
    const int j = i % row_words;
    uint64_t v = 0;
    ok = waitTagged(&own->ht_counts[parity][s][j], epoch, w, kPhaseCounts, s, &v);
    if (ok) s_matrix[s][j] = tagValue(v);
  }
  if (!__syncthreads_and(ok)) return;
  stageThread0(ctx, kDispatchStages, dstage::kCountsWaited);

  // Everything in the matrix came from other ranks: check it before it becomes an address.
  // Every rank compares every signature with its own, so each rank finds a mismatch by itself.
  __shared__ int32_t s_num_recv;
  bool bad = false;
  if (tid == 0) {
    for (int s = 0; s < num_ranks && !bad; ++s) {
      const uint64_t theirs =
          uint64_t{s_matrix[s][num_ranks]} | uint64_t{s_matrix[s][num_ranks + 1]} << 32;
      if (theirs != p.signature) {
        recordOpFailure(ctx, FailKind::kSignatureMismatch, OpId::kHtDispatch, kPhaseCounts, s,
                        p.signature, theirs);
        bad = true;
      }
    }
    int64_t total = 0;  // at most kMaxRanks * (2^32 - 1): no overflow
    for (int s = 0; s < num_ranks; ++s) total += s_matrix[s][me];
    if (!bad && total > capacity) {
      recordFault(ctx, FailKind::kOverCapacity, OpId::kHtDispatch, kPhaseCounts, -1, -1,
                  static_cast<uint64_t>(capacity), static_cast<uint64_t>(total));
      bad = true;
    }
    if (!bad && p.num_worst_tokens > 0 && total > p.num_worst_tokens) {
      recordFault(ctx, FailKind::kOverWorstTokens, OpId::kHtDispatch, kPhaseCounts, -1, -1,
                  static_cast<uint64_t>(p.num_worst_tokens), static_cast<uint64_t>(total));
      bad = true;
    }
    s_num_recv = static_cast<int32_t>(total);  // <= capacity when used
  }
  if (tid < num_ranks) {
    // My rows land in rank tid at [offset, offset + my count): both ends inside its capacity.
    int64_t offset = 0;
    for (int s = 0; s < me; ++s) offset += s_matrix[s][tid];
    const int64_t end = offset + s_matrix[me][tid];
    if (end > capacity) {
      recordFault(ctx, FailKind::kBadPeerData, OpId::kHtDispatch, kPhaseCounts, tid, -1,
                  static_cast<uint64_t>(capacity), static_cast<uint64_t>(end));
      bad = true;
    }
    s_offset[tid] = static_cast<int32_t>(offset);
  }
  if (__syncthreads_or(bad)) return;
  stageThread0(ctx, kDispatchStages, dstage::kChecked);

  if (blockIdx.x == 0) {
    for (int i = tid; i < num_ranks * num_ranks; i += kBlockThreads) {
      p.count_matrix[i] = static_cast<int32_t>(s_matrix[i / num_ranks][i % num_ranks]);
    }
    if (tid == 0) {
      int32_t prefix = 0;
      for (int s = 0; s < num_ranks; ++s) {
        p.recv_rank_prefix[s] = prefix;
        prefix += static_cast<int32_t>(s_matrix[s][me]);
      }
      p.recv_rank_prefix[num_ranks] = prefix;
      *p.num_recv = prefix;
    }
    // The per-expert counts: every source's block 0 sent them with its count row, so they are
    // (about) here already. Collected before any row moves so that exact mode can return them.
    ok = true;
    for (int e = tid; e < p.num_local_experts && ok; e += kBlockThreads) {
      int64_t count = 0;
      for (int s = 0; s < num_ranks && ok; ++s) {
        uint64_t v = 0;
        ok = waitTagged(&own->ht_expert_counts[parity][s][e], epoch, w, kPhaseExpertCounts, s, &v);
        count += tagValue(v);
      }
      if (ok && count > capacity) {  // peer data: a count no source can have sent
        recordFault(ctx, FailKind::kBadPeerData, OpId::kHtDispatch, kPhaseExpertCounts, -1, e,
                    static_cast<uint64_t>(capacity), static_cast<uint64_t>(count));
        ok = false;
      }
      const int64_t align = p.expert_alignment;
      const int32_t aligned = static_cast<int32_t>((count + align - 1) / align * align);
      if (ok) p.recv_expert_counts[e] = aligned;
      if (ok && p.host_expert_counts != nullptr) {
        reinterpret_cast<volatile int32_t*>(p.host_expert_counts)[e] = aligned;
      }
    }
    if (!__syncthreads_and(ok)) return;
    if (tid == 0 && p.host_count != nullptr) {
      // Exact mode: the host polls this while the rows are still moving; the per-expert counts
      // written above are ordered before it.
      __threadfence_system();
      *reinterpret_cast<volatile uint64_t*>(p.host_count) =
          hostCount(static_cast<uint32_t>(s_num_recv));
      __threadfence_system();
    }
    stageThread0(ctx, kDispatchStages, dstage::kExpertCounts);
  }

  // 3. move the rows: one warp per token, tokens strided over every warp of the grid
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int num_vecs = static_cast<int>(p.x_row_bytes / 16);
  const int num_topk = p.num_topk;
  const int local_experts = p.num_local_experts;
  const int mask_words = rankMaskWords(num_ranks);
  // Units of work: a row cut into `parts` pieces of unit_vecs vectors (at most kDispatchUnroll per
  // lane), handed out in token order from a counter to whichever warp asks next, so that the
  // warps finish within a piece of each other. With a static share of whole rows (every warp the
  // same number at 32 SMs) the copy phase ran at 320 GB/s, its warps' rates differing; static
  // shares of pieces were no better, the counter with whole rows 8-14 % faster and with pieces
  // 10-16 % (2x H200, 4096 tokens, session 17). The counter's next value is fetched while the
  // current piece moves.
  const int parts = (num_vecs + kWarpSize * kDispatchUnroll - 1) / (kWarpSize * kDispatchUnroll);
  const int unit_vecs = ((num_vecs + parts - 1) / parts + kWarpSize - 1) / kWarpSize * kWarpSize;
  const uint32_t num_units = static_cast<uint32_t>(p.num_tokens) * static_cast<uint32_t>(parts);
  uint32_t* unit_counter = &own->local.arrive[kUnitsHtDispatch];
  uint32_t grabbed = lane == 0 ? atomicAdd(unit_counter, 1u) : 0u;
  for (uint32_t unit = __shfl_sync(kFullMask, grabbed, 0); unit < num_units;
       unit = __shfl_sync(kFullMask, grabbed, 0)) {
    grabbed = lane == 0 ? atomicAdd(unit_counter, 1u) : 0u;
    const int t = static_cast<int>(unit / parts);
    const int part = static_cast<int>(unit % parts);
    const RankMask mask = loadRankMask(p.token_mask, t, mask_words);
    // Shared (not local arrays): the loops below index the lists with a run-time value.
    int4** dst = s_dst[warp];
    int32_t* dst_row = s_dst_row[warp];
    uint8_t* dst_rank = s_dst_rank[warp];
    // Compact list of destinations (the copy loop then costs nothing per absent rank at 72).
    int num_dst = 0;
    for (int first = 0; first < num_ranks; first += kWarpSize) {  // warp-uniform
      const int d = first + lane;
      const bool in = d < num_ranks && mask.test(d);
      const unsigned ballot = __ballot_sync(kFullMask, in);
      if (in) {
        const int32_t row = s_offset[d] + p.token_slot[static_cast<int64_t>(t) * num_ranks + d];
        const int j = num_dst + __popc(ballot & ((1u << lane) - 1u));
        dst_row[j] = row;
        dst_rank[j] = static_cast<uint8_t>(d);
        dst[j] = reinterpret_cast<int4*>(s_peer[d] + p.regions.recv_x + row * p.x_row_bytes);
      }
      num_dst += __popc(ballot);
    }
    __syncwarp();
    copyRowToRanks(reinterpret_cast<const int4*>(p.x + t * p.x_row_bytes), dst, num_dst,
                   part * unit_vecs, min(num_vecs, (part + 1) * unit_vecs), lane);
    if (part != 0) {
      __syncwarp();  // the next unit rewrites this warp's table
      continue;      // the token's metadata goes with its first piece
    }

    // Scales (FP8), top-k (re-based to the destination's local ids) and the source index.
    for (int c = lane; c < p.num_scales; c += kWarpSize) {
      const float scale = p.x_scales[t * p.scales_token_stride + c * p.scales_col_stride];
      for (int j = 0; j < num_dst; ++j) {
        reinterpret_cast<float*>(
            s_peer[dst_rank[j]] +
            p.regions.recv_scales)[static_cast<int64_t>(dst_row[j]) * p.num_scales + c] = scale;
      }
    }
    if (has_topk && lane < num_topk) {
      // The layout's copy: ids in range, -1 for none and for repetitions within the token.
      const int32_t e = p.topk_copy[int64_t{t} * num_topk + lane];
      const float weight = p.topk_weights ? p.topk_weights[int64_t{t} * num_topk + lane] : 0.f;
      for (int j = 0; j < num_dst; ++j) {
        const int d = dst_rank[j];
        const bool local = e >= d * local_experts && e < (d + 1) * local_experts;
        const int64_t slot = static_cast<int64_t>(dst_row[j]) * num_topk + lane;
        reinterpret_cast<IdxT*>(s_peer[d] + p.regions.recv_topk_idx)[slot] =
            static_cast<IdxT>(local ? e - d * local_experts : -1);
        reinterpret_cast<float*>(s_peer[d] + p.regions.recv_topk_weights)[slot] =
            local ? weight : 0.f;
      }
    }
    if (lane == 0) {
      for (int j = 0; j < num_dst; ++j) {
        reinterpret_cast<int32_t*>(s_peer[dst_rank[j]] + p.regions.recv_src_idx)[dst_row[j]] = t;
      }
    }
    __syncwarp();  // the next token rewrites this warp's table
  }

  // Static shapes: rows [num_recv, num_worst_tokens) of my views hold zeros / -1. No peer writes
  // there in this call (their rows end at num_recv, checked above).
  if (p.num_worst_tokens > 0) {
    const int64_t first = s_num_recv;
    const int64_t pad_rows = p.num_worst_tokens - first;
    const int64_t stride = int64_t{gridDim.x} * kBlockThreads;
    const int64_t start = int64_t{blockIdx.x} * kBlockThreads + tid;
    uint8_t* own_base = ctx.local_base;
    int4* x_pad = reinterpret_cast<int4*>(own_base + p.regions.recv_x + first * p.x_row_bytes);
    for (int64_t i = start; i < pad_rows * num_vecs; i += stride) x_pad[i] = make_int4(0, 0, 0, 0);
    float* scales_pad =
        reinterpret_cast<float*>(own_base + p.regions.recv_scales) + first * p.num_scales;
    for (int64_t i = start; i < pad_rows * p.num_scales; i += stride) scales_pad[i] = 0.f;
    if (has_topk) {
      IdxT* idx_pad =
          reinterpret_cast<IdxT*>(own_base + p.regions.recv_topk_idx) + first * num_topk;
      float* weight_pad =
          reinterpret_cast<float*>(own_base + p.regions.recv_topk_weights) + first * num_topk;
      for (int64_t i = start; i < pad_rows * num_topk; i += stride) {
        idx_pad[i] = static_cast<IdxT>(-1);
        weight_pad[i] = 0.f;
      }
    }
    int32_t* src_pad = reinterpret_cast<int32_t*>(own_base + p.regions.recv_src_idx) + first;
    for (int64_t i = start; i < pad_rows; i += stride) src_pad[i] = -1;
  }

  // 4. every block releases its rows to every destination (its arrival share); block 0 waits
  //    until every source's blocks have released theirs here
  stageBlock(ctx, kDispatchStages, dstage::kRowsCopied);
  releaseArrivalShare(s_peer, num_ranks, me, &ControlRegion::ht_rows_in);
  stageThread0(ctx, kDispatchStages, dstage::kDonePosted);
  if (blockIdx.x != 0) {
    stageThread0(ctx, kDispatchStages, dstage::kEnd);
    return;
  }
  // (The per-expert counts were collected by block 0 in step 2.) This rank's own shares are in
  // too, so every block took its last unit of work: the counter is reset for the next call.
  if (waitArrivalShares(w, &ControlRegion::ht_rows_in, kPhaseRowsShares, epoch) && tid == 0) {
    own->local.arrive[kUnitsHtDispatch] = 0;
    own->local.epoch[kEpochHtDispatch] = epoch;
  }
  stageThread0(ctx, kDispatchStages, dstage::kDoneWaited);
  stageThread0(ctx, kDispatchStages, dstage::kEnd);
}

// Token t's weight per rank d of its mask, in weight[d] (lane 0 stores it): the sum of the
// token's top-k weights whose expert lives on d, or 1 without scale weights. Only the mask's
// ranks (the mask is the same in every lane: no divergence).
__device__ __forceinline__ void tokenRankWeights(const HtCombineParams& p, int t,
                                                 const RankMask& mask, int lane, float* weight) {
  if (p.scale_weights == nullptr) {
    for (int d = lane; d < p.peers.num_ranks; d += kWarpSize) weight[d] = 1.f;
    return;
  }
  int my_rank_of_k = -1;
  float my_weight = 0.f;
  if (lane < p.num_topk) {
    const int32_t e = p.topk_copy[int64_t{t} * p.num_topk + lane];
    if (e >= 0) {
      my_rank_of_k = e / p.num_local_experts;
      my_weight = p.scale_weights[int64_t{t} * p.num_topk + lane];
    }
  }
  forEachRank(mask, [&](int d) {
    float v = my_rank_of_k == d ? my_weight : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
    if (lane == 0) weight[d] = v;
  });
}

// Token t's row of combined_weights, if asked for: lane k pulls entry k of the token's row from
// every rank it went to (the backward of dispatch's recv_topk_weights), summed in rank order in
// float32, 0 if it went nowhere. Only the mask's ranks: no slot loads for the others at 72 ranks.
// recv_weights[d]: this rank's rows of rank d's received weights (written before this kernel or
// acquired: read through L2).
__device__ __forceinline__ void tokenCombinedWeights(const HtCombineParams& p, int t,
                                                     const RankMask& mask, int lane,
                                                     const float* const* recv_weights) {
  if (p.combined_weights == nullptr || lane >= p.num_topk) return;
  float sum = 0.f;
  forEachRank(mask, [&](int d) {
    const int32_t slot = p.token_slot[int64_t{t} * p.peers.num_ranks + d];
    if (slot >= 0) sum += __ldcg(recv_weights[d] + int64_t{slot} * p.num_topk + lane);
  });
  p.combined_weights[int64_t{t} * p.num_topk + lane] = sum;
}

__global__ void __launch_bounds__(kBlockThreads) htCombineKernel(HtCombineParams p) {
  const PeerContext& ctx = p.peers;
  waitPriorGrids();
  stageStart(ctx, kCombineStages);
  ControlRegion* own = controlOf(ctx.local_base);
  const int num_ranks = ctx.num_ranks;
  const int me = ctx.rank;
  const int tid = threadIdx.x;
  const uint64_t epoch = callEpoch(own, kEpochHtCombine);
  const WaitContext w{&ctx, OpId::kHtCombine, globalTimerNs()};
  if (rankFailed(ctx)) return;  // e.g. the matching dispatch failed: its handle is not valid

  __shared__ const uint8_t* s_src[kMaxRanks];  // my rows in each rank's combine input
  __shared__ uint8_t* s_peer[kMaxRanks];
  __shared__ const int4* s_row[kWarpsPerBlock][kMaxRanks];  // the current token's rows, per warp
  __shared__ float s_weight[kWarpsPerBlock][kMaxRanks];
  __shared__ const float* s_recv_weights[kMaxRanks];  // my rows of each rank's received weights

  // 1. my combine input is in place (stream order): tell everyone, then wait for everyone.
  if (postCombineReady(ctx, epoch, p.signature)) {
    stageThread(ctx, kCombineStages, cstage::kReadyPosted);
  }
  bool ok = true;
  if (tid < num_ranks) {
    uint64_t v = 0;
    ok = waitTagged(&own->ht_combine_ready[tid], epoch, w, kPhaseReady, tid, &v);
    if (ok && tagValue(v) != p.signature) {
      // Every rank compares every peer's with its own, so each finds a mismatch by itself.
      recordOpFailure(ctx, FailKind::kSignatureMismatch, OpId::kHtCombine, kPhaseReady, tid,
                      p.signature, tagValue(v));
      ok = false;
    }
    s_peer[tid] = ctx.peer_bases[tid];
    int64_t first_row = 0;  // rows of lower-ranked sources come first in rank tid's region
    for (int s = 0; s < me; ++s) first_row += p.count_matrix[s * num_ranks + tid];
    // My own rows (sent to myself) are read where the caller has them: nobody else reads them,
    // so a copy-in combine stages only the rows its peers pull (the host's copy skips these).
    const bool own = tid == me;
    s_src[tid] = (own ? p.x : ctx.peer_bases[tid] + p.regions.combine_in) + first_row * p.row_bytes;
    s_recv_weights[tid] =
        (own ? p.own_recv_weights
             : reinterpret_cast<const float*>(ctx.peer_bases[tid] + p.recv_weights_offset)) +
        first_row * p.num_topk;
  }
  if (!__syncthreads_and(ok)) return;
  stageThread0(ctx, kCombineStages, cstage::kReadyWaited);

  // 2. one warp per token: pull, weight, sum in float32, write BF16
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int num_vecs = static_cast<int>(p.row_bytes / 16);
  const int mask_words = rankMaskWords(num_ranks);
  // Tokens from a per-rank counter, in order, to whichever warp asks next (as the dispatch's
  // pieces; whole tokens here: pieces of tokens repeat each token's weights and row pointers and
  // were 8-26 % slower, docs/perf-notes.md). The index is fetched a token ahead. Block 0 resets
  // the counter at the end (step 3).
  uint32_t* token_counter = &own->local.arrive[kUnitsHtCombine];
  uint32_t fetched = lane == 0 ? atomicAdd(token_counter, 1u) : 0u;
  for (int t = static_cast<int>(__shfl_sync(kFullMask, fetched, 0)); t < p.num_tokens;
       t = static_cast<int>(__shfl_sync(kFullMask, fetched, 0))) {
    fetched = lane == 0 ? atomicAdd(token_counter, 1u) : 0u;
    const RankMask mask = loadRankMask(p.token_mask, t, mask_words);
    float* weight = s_weight[warp];
    const int4** src = s_row[warp];
    tokenRankWeights(p, t, mask, lane, weight);
    for (int d = lane; d < num_ranks; d += kWarpSize) {
      if (!mask.test(d)) continue;
      src[d] = reinterpret_cast<const int4*>(
          s_src[d] + int64_t{p.token_slot[int64_t{t} * num_ranks + d]} * p.row_bytes);
    }
    __syncwarp();
    tokenCombinedWeights(p, t, mask, lane, s_recv_weights);
    int4* out = reinterpret_cast<int4*>(p.out + int64_t{t} * p.hidden);
    const int4* bias =
        p.bias ? reinterpret_cast<const int4*>(p.bias + int64_t{t} * p.hidden) : nullptr;
    sumTokenRows(
        out, bias, src, weight, [&](auto&& f) { forEachRank(mask, f); }, num_vecs, lane,
        [](const int4* q) { return ldNoAlloc(q); });
    __syncwarp();  // the next token rewrites this warp's tables
  }

  // 3. done pulling: every block tells every rank (its arrival share); block 0 leaves once every
  //    rank's blocks are done pulling from me (only then may the next call overwrite the rows
  //    they read here)
  stageBlock(ctx, kCombineStages, cstage::kPulled);
  releaseArrivalShare(s_peer, num_ranks, me, &ControlRegion::ht_pulls_done);
  stageThread0(ctx, kCombineStages, cstage::kDonePosted);
  if (blockIdx.x != 0) {
    stageThread0(ctx, kCombineStages, cstage::kEnd);
    return;
  }
  // This rank's own shares are in too, so every block took its last token: reset the counter.
  if (waitArrivalShares(w, &ControlRegion::ht_pulls_done, kPhasePullShares, epoch) && tid == 0) {
    own->local.arrive[kUnitsHtCombine] = 0;
    own->local.epoch[kEpochHtCombine] = epoch;
  }
  stageThread0(ctx, kCombineStages, cstage::kDoneWaited);
  stageThread0(ctx, kCombineStages, cstage::kEnd);
}

// The reducers' flag waits sleep this long after each read that finds a chunk missing: spinning,
// they slowed the pushes landing beside them (2x H200, 4096 tokens, 32 SMs, 8 pushing blocks:
// 555 -> 237 us with the sleep; 16 SMs, 5 pushing blocks: 390 -> 348). The sleep doubles up to
// kPushWaitMaxBackoffNs: with a fixed 100 ns, fewer pushing blocks than the default fell off a
// cliff (the slower the pushes, the more polls, the slower the pushes: 20 % of 32 SMs pushing,
// 7519 us; 25 % of 24 SMs, 2389 us); doubling to 800 ns made those 300 and 300 us, and the
// default split 220.6 -> 218.6 us at 32 SMs (24 / 16 SMs unchanged; session 15).
constexpr uint32_t kPushWaitBackoffNs = 100;
constexpr uint32_t kPushWaitMaxBackoffNs = 800;

// The push combine (copy-in combines; HtRegions::combine_flags): blocks [0, pushers) store the
// rows this rank holds for each token owner s (its block of s's rows, in s's token order) into
// s's combine_in region (every rank is copy-in: the signature says so), kPushChunkRows at a time,
// each chunk released by an epoch flag in s's combine_flags; blocks [pushers, grid) reduce this
// rank's tokens, a warp per token, each row read locally once its chunk's flag is in (own rows
// straight from the caller's x). Stores cross NVLink at the link's two-way rate where pulls stop at
// ~91 % of it ("Probes (session 6)"), and the caller's x needs no staging copy, which is why the
// host uses it for copy-in combines only (with x already in the buffer the pull is faster;
// measured in core/perf_flags.hpp). The ready and done handshakes are the pull kernel's: a rank
// pushes only into an owner that posted "ready" for this call (its previous combine is over, and
// with it every peer's pull from its combine_in), and leaves only when every rank is done (they
// pull its received top-k weights). An owner's kernel ends only after every chunk pushed to it is
// in (each holds a row one of its tokens waits for), so no push lands in its combine_in after the
// call.
__global__ void __launch_bounds__(kBlockThreads) htPushCombineKernel(HtCombineParams p) {
  const PeerContext& ctx = p.peers;
  waitPriorGrids();
  stageStart(ctx, kCombineStages);
  ControlRegion* own = controlOf(ctx.local_base);
  const int num_ranks = ctx.num_ranks;
  const int me = ctx.rank;
  const int tid = threadIdx.x;
  const uint64_t epoch = callEpoch(own, kEpochHtCombine);
  const WaitContext w{&ctx, OpId::kHtCombine, globalTimerNs()};
  if (rankFailed(ctx)) return;

  __shared__ uint8_t* s_peer[kMaxRanks];
  __shared__ int64_t s_first_row[kMaxRanks];   // first row of source s's block in my x
  __shared__ int32_t s_held[kMaxRanks];        // rows I hold of source s (I push them back to s)
  __shared__ const uint8_t* s_src[kMaxRanks];  // my tokens' rows from rank d, by d's slot
  __shared__ const int4* s_row[kWarpsPerBlock][kMaxRanks];
  __shared__ float s_weight[kWarpsPerBlock][kMaxRanks];
  __shared__ const float* s_recv_weights[kMaxRanks];

  // 1. ready: this rank's combine_in is free (its previous combine is over) and its x is in
  //    place; wait for every rank's.
  if (postCombineReady(ctx, epoch, p.signature)) {
    stageThread(ctx, kCombineStages, cstage::kReadyPosted);
  }
  bool ok = true;
  const int64_t row_bytes = p.row_bytes;
  const uint8_t* pushed_in = ctx.local_base + p.regions.combine_in;
  if (tid < num_ranks) {
    uint64_t v = 0;
    ok = waitTagged(&own->ht_combine_ready[tid], epoch, w, kPhaseReady, tid, &v);
    if (ok && tagValue(v) != p.signature) {
      recordOpFailure(ctx, FailKind::kSignatureMismatch, OpId::kHtCombine, kPhaseReady, tid,
                      p.signature, tagValue(v));
      ok = false;
    }
    s_peer[tid] = ctx.peer_bases[tid];
    int64_t first = 0;
    for (int s = 0; s < tid; ++s) first += p.count_matrix[s * num_ranks + me];
    s_first_row[tid] = first;
    s_held[tid] = p.count_matrix[tid * num_ranks + me];
    int64_t first_at_tid = 0;  // my rows within rank tid's block (for its received weights)
    for (int s = 0; s < me; ++s) first_at_tid += p.count_matrix[s * num_ranks + tid];
    s_recv_weights[tid] =
        reinterpret_cast<const float*>(ctx.peer_bases[tid] + p.recv_weights_offset) +
        first_at_tid * p.num_topk;
  }
  __syncthreads();
  if (tid < num_ranks) {
    // Rank tid's rows of my tokens: my own from x, the others from where they push them.
    const int64_t own_first = s_first_row[me];
    const int block_index = tid < me ? tid : tid - 1;
    s_src[tid] = tid == me ? p.x + own_first * row_bytes
                           : pushed_in + int64_t{block_index} * p.regions.max_tokens * row_bytes;
  }
  if (!__syncthreads_and(ok)) return;
  stageThread0(ctx, kCombineStages, cstage::kReadyWaited);

  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int num_vecs = static_cast<int>(row_bytes / 16);
  if (static_cast<int>(blockIdx.x) < p.pushers) {
    // 2a. push: work items (owner s != me, chunk c), dealt round-robin over the pushing blocks.
    int item = 0;
    for (int s = 0; s < num_ranks; ++s) {
      if (s == me) continue;
      // The owner's block holds max_tokens rows: a count beyond it (a peer's corrupt count row)
      // is cut there, never written past.
      const int rows = min(s_held[s], p.regions.max_tokens);
      const int chunks = (rows + kPushChunkRows - 1) / kPushChunkRows;
      const int index_at_s = me < s ? me : me - 1;
      uint8_t* dst_block =
          s_peer[s] + p.regions.combine_in + int64_t{index_at_s} * p.regions.max_tokens * row_bytes;
      const uint8_t* src_block = p.x + s_first_row[s] * row_bytes;
      for (int c = 0; c < chunks; ++c, ++item) {
        if (item % p.pushers != static_cast<int>(blockIdx.x)) continue;
        const int end = min(rows, (c + 1) * kPushChunkRows);
        for (int r = c * kPushChunkRows + warp; r < end; r += kWarpsPerBlock) {
          warpCopyRow<8>(reinterpret_cast<int4*>(dst_block + int64_t{r} * row_bytes),
                         reinterpret_cast<const int4*>(src_block + int64_t{r} * row_bytes),
                         num_vecs, lane, [](const int4* q) { return ldNcNoAlloc(q); });
        }
        __syncthreads();  // every warp's rows of the chunk are written
        if (tid == 0) {
          fenceAcqRelSys();  // then a release pattern: the chunk's rows before its flag
          stRelaxedSys(reinterpret_cast<uint64_t*>(s_peer[s] + p.regions.combine_flags) +
                           int64_t{me} * p.regions.push_chunks + c,
                       epoch);
        }
      }
    }
  } else {
    // 2b. reduce: one warp per token, rows of other ranks read once their chunk is flagged.
    const int reducers = static_cast<int>(gridDim.x) - p.pushers;
    const int mask_words = rankMaskWords(num_ranks);
    const uint64_t* flags =
        reinterpret_cast<const uint64_t*>(ctx.local_base + p.regions.combine_flags);
    bool warp_ok = true;
    for (int t = (static_cast<int>(blockIdx.x) - p.pushers) * kWarpsPerBlock + warp;
         warp_ok && t < p.num_tokens; t += reducers * kWarpsPerBlock) {
      const RankMask mask = loadRankMask(p.token_mask, t, mask_words);
      float* weight = s_weight[warp];
      const int4** src = s_row[warp];
      tokenRankWeights(p, t, mask, lane, weight);
      bool arrived = true;
      for (int d = lane; d < num_ranks; d += kWarpSize) {
        if (!mask.test(d)) continue;
        const int32_t slot = p.token_slot[int64_t{t} * num_ranks + d];
        src[d] = reinterpret_cast<const int4*>(s_src[d] + int64_t{slot} * row_bytes);
        if (d != me) {
          const uint64_t* flag = flags + int64_t{d} * p.regions.push_chunks + slot / kPushChunkRows;
          arrived = arrived && waitEpoch(flag, epoch, w, WaitPhase::kHtCombinePushed, d,
                                         kPushWaitBackoffNs, kPushWaitMaxBackoffNs);
        }
      }
      // The lanes that waited acquired their rank's rows; the warp barrier orders the other
      // lanes' loads after those acquires.
      warp_ok = __all_sync(kFullMask, arrived);
      __syncwarp();
      if (!warp_ok) break;
      tokenCombinedWeights(p, t, mask, lane, s_recv_weights);
      int4* out = reinterpret_cast<int4*>(p.out + int64_t{t} * p.hidden);
      const int4* bias =
          p.bias ? reinterpret_cast<const int4*>(p.bias + int64_t{t} * p.hidden) : nullptr;
      // L2 loads (__ldcg): rows another rank stored, never a stale L1 line.
      sumTokenRows(
          out, bias, src, weight, [&](auto&& f) { forEachRank(mask, f); }, num_vecs, lane,
          [](const int4* q) { return __ldcg(q); });
      __syncwarp();  // the next token rewrites this warp's tables
    }
    // A warp that timed out recorded the failure; the op fails on the host (the done handshake
    // below still runs so the peers are not left waiting for this rank).
  }

  // 3. done: tell every rank; leave once every rank is done (they pull my received weights).
  //    Without combined weights no rank reads this rank's memory, so nobody waits: a peer's next
  //    push into my combine input waits for my next "ready", and its next dispatch into my
  //    receive regions for my next count row, both posted only after this kernel (stream order).
  //    The signature makes every rank agree on combined weights, so all skip or none does.
  stageBlock(ctx, kCombineStages, cstage::kPulled);
  if (p.combined_weights == nullptr) {
    // A counting arrival (nothing to publish: no fences); the last block records the call.
    __syncthreads();
    if (tid == 0 && atomicAdd(&own->local.arrive[kArriveHtCombine], 1u) == gridDim.x - 1) {
      own->local.arrive[kArriveHtCombine] = 0;
      if (!rankFailed(ctx)) own->local.epoch[kEpochHtCombine] = epoch;
    }
    stageThread0(ctx, kCombineStages, cstage::kEnd);
    return;
  }
  // The pull combine's end: arrival shares, block 0 waits for every rank's.
  releaseArrivalShare(s_peer, num_ranks, me, &ControlRegion::ht_pulls_done);
  stageThread0(ctx, kCombineStages, cstage::kDonePosted);
  if (blockIdx.x != 0) {
    stageThread0(ctx, kCombineStages, cstage::kEnd);
    return;
  }
  if (waitArrivalShares(w, &ControlRegion::ht_pulls_done, kPhasePullShares, epoch) && tid == 0) {
    own->local.epoch[kEpochHtCombine] = epoch;
  }
  stageThread0(ctx, kCombineStages, cstage::kDoneWaited);
  stageThread0(ctx, kCombineStages, cstage::kEnd);
}

// Vec is int4 when rows are 16-byte multiples (and pointers 16-byte aligned), else int32_t. One
// warp per row (warpCopyRow): the old form (one vector per thread and a 64-bit division per
// vector) staged a combine input at ~440 GB/s on 32 SMs. The copy is bound by the bytes each SM
// keeps in flight: 8 vectors per lane, not kUnroll's 4, took the copy-in combine (4096 tokens,
// 2x H200, 32 SMs) 293 -> 280 us (session 8); 16 (116 registers, no spill) 241.1 -> 238.6
// (24 / 16 SMs -0.6 %; session 14).
constexpr int kCopyRowsInFlight = 16;

// Rows [skip_begin, skip_begin + skipped) are left out; the warps stride over the others only.
template <typename Vec>
__device__ void copySegmentRows(const CopyRowsSegment& s, int64_t rows, int64_t skip_begin,
                                int64_t skipped) {
  const int vecs = static_cast<int>(s.row_bytes / static_cast<int64_t>(sizeof(Vec)));
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = int64_t{gridDim.x} * kWarpsPerBlock;
  for (int64_t i = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarpSize;
       i < rows - skipped; i += warps) {
    const int64_t row = i < skip_begin ? i : i + skipped;
    warpCopyRow<kCopyRowsInFlight>(reinterpret_cast<Vec*>(s.dst + row * s.dst_stride),
                                   reinterpret_cast<const Vec*>(s.src + row * s.src_stride), vecs,
                                   lane, [](const Vec* p) { return *p; });
  }
}

// blockIdx.y picks the segment; the blocks of one segment stride over its rows.
__global__ void __launch_bounds__(kBlockThreads) copyRowsKernel(CopyRowsParams p) {
  const int64_t rows =
      p.fixed_rows > 0 ? p.fixed_rows : min(static_cast<int64_t>(*p.count), p.max_rows);
  // The skipped range, clamped into [0, rows) (it comes from a dispatch of this rank).
  int64_t skip_begin = 0;
  int64_t skipped = 0;
  if (p.skip != nullptr) {
    skip_begin = min(max(int64_t{p.skip[0]}, int64_t{0}), rows);
    skipped = min(max(int64_t{p.skip[1]}, skip_begin), rows) - skip_begin;
  }
  const CopyRowsSegment& s = p.seg[blockIdx.y];
  const bool vec16 = ((s.row_bytes | s.dst_stride | s.src_stride |
                       reinterpret_cast<uintptr_t>(s.dst) | reinterpret_cast<uintptr_t>(s.src)) %
                      16) == 0;
  if (vec16) {
    copySegmentRows<int4>(s, rows, skip_begin, skipped);
  } else {
    copySegmentRows<int32_t>(s, rows, skip_begin, skipped);
  }
}

}  // namespace

void launchHtDispatch(const HtDispatchParams& params, int sm_budget, cudaStream_t stream,
                      bool dependent_launch) {
  const int num_blocks = sm_budget;
  const bool fused = params.fused_layout != 0;
  if (params.idx_is_64) {
    if (fused) {
      launchDependent(htDispatchKernel<int64_t, true>, num_blocks, kBlockThreads, stream, params,
                      dependent_launch);
    } else {
      launchDependent(htDispatchKernel<int64_t, false>, num_blocks, kBlockThreads, stream, params,
                      dependent_launch);
    }
  } else if (fused) {
    launchDependent(htDispatchKernel<int32_t, true>, num_blocks, kBlockThreads, stream, params,
                    dependent_launch);
  } else {
    launchDependent(htDispatchKernel<int32_t, false>, num_blocks, kBlockThreads, stream, params,
                    dependent_launch);
  }
  EPCOMM_KERNEL_LAUNCH_CHECK(htDispatchKernel);
}

void launchHtCombine(const HtCombineParams& params, int sm_budget, cudaStream_t stream,
                     bool dependent_launch) {
  launchDependent(htCombineKernel, sm_budget, kBlockThreads, stream, params, dependent_launch);
  EPCOMM_KERNEL_LAUNCH_CHECK(htCombineKernel);
}

void launchHtPushCombine(const HtCombineParams& params, int sm_budget, cudaStream_t stream,
                         bool dependent_launch) {
  launchDependent(htPushCombineKernel, sm_budget, kBlockThreads, stream, params, dependent_launch);
  EPCOMM_KERNEL_LAUNCH_CHECK(htPushCombineKernel);
}

void launchCopyRows(const CopyRowsParams& params, int sm_budget, cudaStream_t stream) {
  if (params.num_segments <= 0) return;
  const dim3 grid(static_cast<unsigned>(sm_budget), static_cast<unsigned>(params.num_segments));
  copyRowsKernel<<<grid, kBlockThreads, 0, stream>>>(params);
  EPCOMM_KERNEL_LAUNCH_CHECK(copyRowsKernel);
}

}  // namespace epcomm::kernels
