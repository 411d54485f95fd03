// SPDX-License-Identifier: Apache-2.0
// The HT layout's device code (kernels/layout.cu describes the algorithm and the routing policy),
// shared by the layout kernel and by the HT dispatch kernel that runs the layout as its first
// phase (PerfFlags::ht_fused_layout): one launch per dispatch instead of two.
#pragma once

#include <cub/block/block_scan.cuh>

#include "kernels/device_utils.cuh"
#include "kernels/launch.hpp"

namespace epcomm::kernels::layout_tile {

using namespace device;

using LayoutBlockScan = cub::BlockScan<RankCounts, kLayoutThreads>;

// A tile's shared memory (a union member in the dispatch kernel: used before its own arrays).
struct LayoutShared {
  typename LayoutBlockScan::TempStorage scan;
  int32_t expert_hist[kMaxExperts];
  int32_t rank_totals[kMaxRanks];  // this tile's per-rank totals
  int32_t base[kMaxRanks];         // the earlier tiles' totals (finishTiles)
  int32_t totals[kMaxRanks];       // every tile's totals (the last block of finishTiles)
  bool last;
};

// Thread 0 of the block that finished the layout, after every output: the outputs are ordered
// before the store (fence, then a strong store: a release pattern) for whoever acquires it.
__device__ __forceinline__ void signalLayoutDone(uint64_t* done, uint64_t value) {
  if (done == nullptr || threadIdx.x != 0) return;
  __threadfence();
  *reinterpret_cast<volatile uint64_t*>(done) = value;
}

// Stage times (kernels/stage_times.hpp).
constexpr StageKernel kStages = StageKernel::kLayout;
namespace stage = layout_stage;

// kTopk > 0: the top-k width known at compile time (layoutTileKernel's top-8 instance): kTopk
// register slots and no run-time bound; 0: any width up to kMaxTopk.
template <typename IdxT, int kTopk>
__device__ __forceinline__ RankMask routeToken(const LayoutParams& p, const IdxT* topk, int t,
                                               SmallDivisor experts_per_rank,
                                               int32_t* expert_hist) {
  constexpr int kSlots = kTopk > 0 ? kTopk : kMaxTopk;
  const int num_topk = kTopk > 0 ? kTopk : p.num_topk;
  RankMask mask = emptyRankMask();
  int64_t ids[kSlots];
  int32_t kept[kSlots];
  loadTopkRow<kSlots>(topk + static_cast<int64_t>(t) * num_topk, num_topk, ids);
  // A repetition of an earlier entry of this token counts as -1.
  dedupTopkRow<kSlots>(ids, num_topk, p.num_experts, kept);
  int32_t* copy = p.topk_copy + static_cast<int64_t>(t) * num_topk;
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    if (k >= num_topk) break;
    if (kept[k] >= 0) {
      mask.set(experts_per_rank.divide(kept[k]));
      atomicAdd(&expert_hist[kept[k]], 1);
    } else if (ids[k] != -1 && (ids[k] < 0 || ids[k] >= p.num_experts)) {
      recordFault(p.peers, FailKind::kBadExpertId, OpId::kLayout, WaitPhase::kNone, -1, t,
                  static_cast<uint64_t>(p.num_experts), static_cast<uint64_t>(ids[k]));
    }
    copy[k] = kept[k];
  }
  return mask;
}

// The block that finishes the layout (the last tile's to finish, or the only tile's), with a
// caller's layout: checks its counts against the routing just computed (`totals`, the column sums
// of is_token_in_rank) and, without top-k, adopts its per-expert counts. Every value is bounded
// before it is kept: they are sent to the peers.
__device__ inline void checkLayoutInput(const LayoutParams& p, const int32_t* totals) {
  const int tid = threadIdx.x;
  if (tid < p.num_ranks) {
    const int32_t given = p.rank_counts_in[tid];
    if (given != totals[tid]) {
      recordFault(p.peers, FailKind::kLayoutRankCount, OpId::kLayout, WaitPhase::kNone, -1, tid,
                  static_cast<uint64_t>(totals[tid]), static_cast<uint64_t>(int64_t{given}));
    }
  }
  const int experts_per_rank = p.num_experts / p.num_ranks;
  for (int e = tid; e < p.num_experts; e += kLayoutThreads) {
    const int32_t given = p.expert_counts_in[e];
    if (p.topk_idx != nullptr) {
      // expert_counts holds topk's histogram (summed over the tiles): the layout must agree.
      const int32_t counted = p.expert_counts[e];
      if (given != counted) {
        recordFault(p.peers, FailKind::kLayoutExpertVsTopk, OpId::kLayout, WaitPhase::kNone, -1, e,
                    static_cast<uint64_t>(counted), static_cast<uint64_t>(int64_t{given}));
      }
    } else {
      const int32_t limit = totals[e / experts_per_rank];
      if (given < 0 || given > limit) {
        recordFault(p.peers, FailKind::kLayoutExpertCount, OpId::kLayout, WaitPhase::kNone, -1, e,
                    static_cast<uint64_t>(limit), static_cast<uint64_t>(int64_t{given}));
      } else {
        p.expert_counts[e] = given;
      }
    }
  }
}

// Two tiles or more, in the same kernel (a second kernel cost a launch gap of ~2 us): every tile
// publishes its per-rank totals, adds those of the earlier tiles to its slots (blocks start in
// index order, so an earlier tile is running or done: the wait is short and bounded), publishes
// its histogram and arrives; the last block to arrive writes the totals and the summed histogram
// (and checks a caller's layout), then zeroes the scratch for the next call.
// Returns true in the block that finished the layout.
__device__ inline bool finishTiles(const LayoutParams& p, int tile, int num_tiles, LayoutShared& sm,
                                   const RankMask& mask, int t) {
  int32_t* base = sm.base;
  int32_t* totals = sm.totals;
  const int32_t* rank_totals = sm.rank_totals;
  const int32_t* expert_hist = sm.expert_hist;
  const int tid = threadIdx.x;
  const int num_ranks = p.num_ranks;
  int32_t* hist_out = p.tile_expert_counts + static_cast<int64_t>(tile) * p.num_experts;
  for (int e = tid; e < p.num_experts; e += kLayoutThreads) hist_out[e] = expert_hist[e];
  if (tid < num_ranks) {
    base[tid] = 0;
    // + 1: zero means "not yet published".
    atomicExch(&p.tile_counts[tile * num_ranks + tid], rank_totals[tid] + 1);
  }
  __syncthreads();
  const uint64_t start_ns = globalTimerNs();
  for (int i = tid; i < tile * num_ranks; i += kLayoutThreads) {
    int32_t v;
    while ((v = ldVolatileI32(&p.tile_counts[i])) == 0) {
      if (globalTimerNs() - start_ns > p.peers.timeout_ns) {
        recordOpFailure(p.peers, FailKind::kTimeout, OpId::kLayout, WaitPhase::kLayoutTiles,
                        p.peers.rank, 1, 0);
        v = 1;
        break;
      }
    }
    atomicAdd(&base[i % num_ranks], v - 1);
  }
  __syncthreads();
  stageThread0(p.peers, kStages, stage::kLookBack);
  if (t < p.num_tokens) {
    for (int d = 0; d < num_ranks; ++d) {
      const int64_t i = static_cast<int64_t>(t) * num_ranks + d;
      if (mask.test(d)) p.token_slot[i] += base[d];
      p.is_token_in_rank[i] = mask.test(d);
    }
  }
  // Arrive: this block's histogram and look-back are done.
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    sm.last = atomicAdd(p.tiles_done, 1u) == static_cast<uint32_t>(num_tiles - 1);
    if (sm.last) __threadfence();
  }
  __syncthreads();
  if (!sm.last) {
    stageBlock(p.peers, kStages, stage::kTileEnd);
    return false;
  }
  const int tiles = num_tiles;
  if (tid < num_ranks) {
    int32_t sum = 0;
    for (int each = 0; each < tiles; ++each)
      sum += __ldcg(&p.tile_counts[each * num_ranks + tid]) - 1;
    totals[tid] = sum;
    p.rank_counts[tid] = sum;
  }
  for (int e = tid; e < p.num_experts; e += kLayoutThreads) {
    int32_t sum = 0;
    for (int each = 0; each < tiles; ++each)
      sum += __ldcg(&p.tile_expert_counts[static_cast<int64_t>(each) * p.num_experts + e]);
    p.expert_counts[e] = sum;
  }
  __syncthreads();  // totals and expert_counts for checkLayoutInput; every tile_counts read
  if (p.rank_counts_in != nullptr) checkLayoutInput(p, totals);
  for (int i = tid; i < tiles * num_ranks; i += kLayoutThreads) p.tile_counts[i] = 0;
  if (tid == 0) *p.tiles_done = 0;
  stageBlock(p.peers, kStages, stage::kLastBlockEnd);
  return true;
}

// One tile of kLayoutThreads tokens, by one block of kLayoutThreads threads: masks, slots within
// the tile (block scans, one per group of 8 ranks), the tile's per-rank totals and expert
// histogram. With one tile these are final: the block writes the whole layout (and checks a
// caller's); with more, finishTiles. `tile` of `num_tiles` (the layout kernel: its block index;
// a dispatch kernel that runs the layout first: any block, several tiles each). `done`, when not
// null: the block that finishes the layout then stores `done_value` there (release, GPU scope),
// after every output. Returns after __syncthreads (the shared storage may be reused).
template <typename IdxT, int kTopk = 0>
__device__ inline void layoutTile(const LayoutParams& p, int tile, int num_tiles, LayoutShared& sm,
                                  uint64_t* done, uint64_t done_value) {
  int32_t* expert_hist = sm.expert_hist;
  int32_t* rank_totals = sm.rank_totals;  // this tile's per-rank totals
  const int tid = threadIdx.x;
  const bool single_tile = num_tiles == 1;
  for (int e = tid; e < p.num_experts; e += kLayoutThreads) expert_hist[e] = 0;
  __syncthreads();
  stageThread0(p.peers, kStages, stage::kHistZeroed);

  const int t = tile * kLayoutThreads + tid;
  RankMask mask = emptyRankMask();
  if (t < p.num_tokens) {
    const RankMask topk_mask =
        p.topk_idx != nullptr
            ? routeToken<IdxT, kTopk>(p, static_cast<const IdxT*>(p.topk_idx), t,
                                      SmallDivisor(p.num_experts / p.num_ranks), expert_hist)
            : emptyRankMask();
    mask = topk_mask;
    if (p.in_rank != nullptr) {
      // The caller's layout decides where the token goes; its experts must be among those ranks
      // (else they would be counted on a rank the row never reaches).
      mask = emptyRankMask();
      const uint8_t* row =
          reinterpret_cast<const uint8_t*>(p.in_rank) + static_cast<int64_t>(t) * p.num_ranks;
      for (int d = 0; d < p.num_ranks; ++d) {
        if (row[d] != 0) mask.set(d);
      }
      const int d = firstRankOfAndNot(topk_mask, mask);
      if (d >= 0) {
        recordFault(p.peers, FailKind::kLayoutTokenVsTopk, OpId::kLayout, WaitPhase::kNone, -1, t,
                    static_cast<uint64_t>(d), 0);
      }
    }
    storeRankMask(p.token_mask, t, rankMaskWords(p.num_ranks), mask);
  }
  stageBlock(p.peers, kStages, stage::kRouted);
  for (int g = 0; g < rankScanGroups(p.num_ranks); ++g) {
    const int first = g * kRanksPerScan;
    const int last = min(p.num_ranks, first + kRanksPerScan);
    if (g > 0) __syncthreads();  // scan_storage is reused
    RankCounts prefix, aggregate;
    LayoutBlockScan(sm.scan).ExclusiveScan(countsOfGroup(mask, g), prefix, RankCounts{0, 0},
                                           AddRankCounts(), aggregate);
    if (t < p.num_tokens) {
      for (int d = first; d < last; ++d) {
        p.token_slot[static_cast<int64_t>(t) * p.num_ranks + d] =
            mask.test(d) ? static_cast<int32_t>(prefix.get(d - first)) : -1;
      }
    }
    if (tid >= first && tid < last) {
      rank_totals[tid] = static_cast<int32_t>(aggregate.get(tid - first));
    }
  }
  __syncthreads();
  stageThread0(p.peers, kStages, stage::kScanned);
  if (!single_tile) {
    if (finishTiles(p, tile, num_tiles, sm, mask, t)) signalLayoutDone(done, done_value);
    __syncthreads();
    return;
  }
  // One tile: the slots above are final (no earlier tile), so write the rest of the layout.
  if (t < p.num_tokens) {
    for (int d = 0; d < p.num_ranks; ++d)
      p.is_token_in_rank[static_cast<int64_t>(t) * p.num_ranks + d] = mask.test(d);
  }
  if (tid < p.num_ranks) p.rank_counts[tid] = rank_totals[tid];
  for (int e = tid; e < p.num_experts; e += kLayoutThreads) p.expert_counts[e] = expert_hist[e];
  __syncthreads();  // checkLayoutInput reads expert_counts
  if (p.rank_counts_in != nullptr) checkLayoutInput(p, rank_totals);
  stageBlock(p.peers, kStages, stage::kTileEnd);
  signalLayoutDone(done, done_value);
  __syncthreads();
}

}  // namespace epcomm::kernels::layout_tile
