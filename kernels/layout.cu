// SPDX-License-Identifier: Apache-2.0
// HT layout: from topk_idx [N, K], each token's destination-rank mask, its slot among the tokens
// sent to each rank, per-rank and per-expert counts, and an int32 copy of the routing for weighted
// combine. Tiles of 512 tokens, one block each: a CUB block scan gives slots within the tile and
// the tile's totals; with several tiles a second kernel adds the totals of the earlier tiles. One
// tile (<= 512 tokens) is one kernel that writes the final layout. No memset: every count is
// written, never accumulated into memory that would need zeroing first (each launch and each
// memset costs the host ~4 us in this VM, docs/perf-notes.md).
//
// Routing policy (documented in include/epcomm/ops.hpp): an expert id repeated within one token's
// top-k counts once; every repetition after the first is treated as -1 (not counted, not sent,
// -1 in the int32 copy, so its weight is not used by combine). An id outside [-1, num_experts) is
// never used as an address: it is recorded as bad input, this rank's next collective op stops
// before sending anything, and every peer is told (ControlRegion::peer_faulted), so that op fails
// on every rank at once instead of timing out.
//
// Layout input (DispatchArgs::layout, DeepEP-style): the masks come from the caller's
// is_token_in_rank instead, through the same scans; the caller's per-rank counts must equal the
// column sums and its per-expert counts are bounded (or, with top-k, must equal the histogram),
// each mismatch a fault of the same kind as a bad expert id.
#include <cub/block/block_scan.cuh>

#include "kernels/device_utils.cuh"
#include "kernels/kernel_check.hpp"
#include "kernels/launch.hpp"

namespace epcomm::kernels {
namespace {

using namespace device;

// Stage times (kernels/stage_times.hpp).
constexpr StageKernel kStages = StageKernel::kLayout;
namespace stage = layout_stage;

template <typename IdxT>
__device__ __forceinline__ RankMask routeToken(const LayoutParams& p, const IdxT* topk, int t,
                                               int experts_per_rank, int32_t* expert_hist) {
  RankMask mask = emptyRankMask();
  int64_t ids[kMaxTopk];
  int32_t kept[kMaxTopk];
  loadTopkRow(topk + static_cast<int64_t>(t) * p.num_topk, p.num_topk, ids);
  // A repetition of an earlier entry of this token counts as -1.
  dedupTopkRow(ids, p.num_experts, kept);
  int32_t* copy = p.topk_copy + static_cast<int64_t>(t) * p.num_topk;
#pragma unroll
  for (int k = 0; k < kMaxTopk; ++k) {
    if (k >= p.num_topk) break;
    if (kept[k] >= 0) {
      mask.set(kept[k] / experts_per_rank);
      atomicAdd(&expert_hist[kept[k]], 1);
    } else if (ids[k] != -1 && (ids[k] < 0 || ids[k] >= p.num_experts)) {
      recordFault(p.peers, FailKind::kBadExpertId, OpId::kLayout, WaitPhase::kNone, -1, t,
                  static_cast<uint64_t>(p.num_experts), static_cast<uint64_t>(ids[k]));
    }
    copy[k] = kept[k];
  }
  return mask;
}

// The block that finishes the layout (pass 2's last, or the only tile's), with a caller's layout:
// checks its counts against the routing just computed (`totals`, the column sums of
// is_token_in_rank) and, without top-k, adopts its per-expert counts. Every value is bounded before
// it is kept: they are sent to the peers.
__device__ void checkLayoutInput(const LayoutParams& p, const int32_t* totals) {
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
      // expert_counts holds topk's histogram (pass 1): the layout must agree with it.
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

// Pass 1, one block per tile of kLayoutThreads tokens: masks, slots within the tile (block scans,
// one per group of 8 ranks), the tile's per-rank totals and expert histogram. With one tile these
// are final: the block writes the whole layout (and checks a caller's), and there is no pass 2.
template <typename IdxT>
__global__ void __launch_bounds__(kLayoutThreads) layoutTileKernel(LayoutParams p) {
  using BlockScan = cub::BlockScan<RankCounts, kLayoutThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ int32_t expert_hist[kMaxExperts];
  __shared__ int32_t rank_totals[kMaxRanks];  // this tile's per-rank totals

  stageStart(p.peers, kStages);
  const int tid = threadIdx.x;
  const bool single_tile = gridDim.x == 1;
  for (int e = tid; e < p.num_experts; e += kLayoutThreads) expert_hist[e] = 0;
  __syncthreads();
  stageThread0(p.peers, kStages, stage::kHistZeroed);

  const int t = blockIdx.x * kLayoutThreads + tid;
  RankMask mask = emptyRankMask();
  if (t < p.num_tokens) {
    const RankMask topk_mask = p.topk_idx != nullptr
                                   ? routeToken(p, static_cast<const IdxT*>(p.topk_idx), t,
                                                p.num_experts / p.num_ranks, expert_hist)
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
    BlockScan(scan_storage)
        .ExclusiveScan(countsOfGroup(mask, g), prefix, RankCounts{0, 0}, AddRankCounts(),
                       aggregate);
    if (t < p.num_tokens) {
      for (int d = first; d < last; ++d) {
        p.token_slot[static_cast<int64_t>(t) * p.num_ranks + d] =
            mask.test(d) ? static_cast<int32_t>(prefix.get(d - first)) : -1;
      }
    }
    if (tid >= first && tid < last) {
      const int32_t total = static_cast<int32_t>(aggregate.get(tid - first));
      p.tile_counts[blockIdx.x * p.num_ranks + tid] = total;
      rank_totals[tid] = total;
    }
  }
  __syncthreads();
  stageThread0(p.peers, kStages, stage::kScanned);
  if (!single_tile) {
    // Pass 2's last block sums the tiles' histograms.
    int32_t* hist_out = p.tile_expert_counts + static_cast<int64_t>(blockIdx.x) * p.num_experts;
    for (int e = tid; e < p.num_experts; e += kLayoutThreads) hist_out[e] = expert_hist[e];
    stageBlock(p.peers, kStages, stage::kTileEnd);
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
}

// Pass 2 (two tiles or more): adds the totals of the earlier tiles to every slot; the last tile's
// block also writes the per-rank totals and the expert histogram summed over the tiles (and checks
// a caller's layout against them).
__global__ void __launch_bounds__(kLayoutThreads) layoutFinalizeKernel(LayoutParams p) {
  __shared__ int32_t base[kMaxRanks];
  __shared__ int32_t totals[kMaxRanks];
  stageThread0(p.peers, kStages, stage::kFinalizeStart);
  const int tid = threadIdx.x;
  const int tile = blockIdx.x;
  const bool last = tile == gridDim.x - 1;
  if (tid < p.num_ranks) {
    int32_t sum = 0;
    for (int earlier = 0; earlier < tile; ++earlier)
      sum += p.tile_counts[earlier * p.num_ranks + tid];
    base[tid] = sum;
    if (last) {
      totals[tid] = sum + p.tile_counts[tile * p.num_ranks + tid];
      p.rank_counts[tid] = totals[tid];
    }
  }
  if (last) {
    for (int e = tid; e < p.num_experts; e += kLayoutThreads) {
      int32_t sum = 0;
      for (int each = 0; each < static_cast<int>(gridDim.x); ++each)
        sum += p.tile_expert_counts[static_cast<int64_t>(each) * p.num_experts + e];
      p.expert_counts[e] = sum;
    }
  }
  __syncthreads();  // totals, base, and expert_counts for checkLayoutInput
  if (last && p.rank_counts_in != nullptr) checkLayoutInput(p, totals);
  const int t = tile * kLayoutThreads + tid;
  if (t < p.num_tokens) {
    for (int d = 0; d < p.num_ranks; ++d) {
      const int64_t i = static_cast<int64_t>(t) * p.num_ranks + d;
      const int32_t slot = p.token_slot[i];
      p.token_slot[i] = slot >= 0 ? slot + base[d] : -1;
      p.is_token_in_rank[i] = slot >= 0;
    }
  }
  stageBlock(p.peers, kStages, stage::kFinalizeEnd);
}

}  // namespace

void launchLayout(const LayoutParams& params, cudaStream_t stream) {
  const int tiles = layoutTiles(params.num_tokens);
  if (params.idx_is_64) {
    layoutTileKernel<int64_t><<<tiles, kLayoutThreads, 0, stream>>>(params);
  } else {
    layoutTileKernel<int32_t><<<tiles, kLayoutThreads, 0, stream>>>(params);
  }
  EPCOMM_KERNEL_LAUNCH_CHECK(layoutTileKernel);
  if (tiles == 1) return;
  layoutFinalizeKernel<<<tiles, kLayoutThreads, 0, stream>>>(params);
  EPCOMM_KERNEL_LAUNCH_CHECK(layoutFinalizeKernel);
}

}  // namespace epcomm::kernels
