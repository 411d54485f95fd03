// HT layout: from topk_idx [N, K], each token's destination-rank mask, its slot among the tokens
// sent to each rank (a CUB block scan over tokens), per-rank and per-expert counts, and an int32
// copy of the routing for weighted combine. One block walks the tokens in tiles; the counts carry
// over from tile to tile. Expert ids outside [-1, num_experts) are reported through the error
// record and treated as -1, so they are never used as an address; the ops go on, so the peers
// finish normally and the host reports the bad id at its next check.
#include <cub/block/block_scan.cuh>

#include "check.hpp"
#include "kernels/device_utils.cuh"
#include "kernels/launch.hpp"

namespace epcomm::kernels {
namespace {

using namespace device;

constexpr int kLayoutThreads = 512;

// Per-rank token counts of one tile, packed as 16-bit lanes (ranks 0-3 in lo, 4-7 in hi) so the
// block scan moves two words instead of eight. A lane never exceeds the tile size, so adding the
// packed words never carries between lanes.
static_assert(kMaxRanks <= 8, "RankCounts packs at most 8 ranks");
struct RankCounts {
  uint64_t lo;
  uint64_t hi;
  __device__ __forceinline__ uint32_t get(int d) const {
    return static_cast<uint32_t>(((d < 4 ? lo : hi) >> (16 * (d & 3))) & 0xffffu);
  }
};

struct AddRankCounts {
  __device__ __forceinline__ RankCounts operator()(const RankCounts& a, const RankCounts& b) const {
    return RankCounts{a.lo + b.lo, a.hi + b.hi};
  }
};

// Each thread owns kItemsPerThread consecutive tokens of a tile, so one block scan covers up to
// 4096 tokens and all their top-k ids are loaded before anything waits on them.
constexpr int kItemsPerThread = 8;
constexpr int kTileTokens = kLayoutThreads * kItemsPerThread;
static_assert(kTileTokens < 65536, "per-tile counts must fit the 16-bit lanes of RankCounts");

template <typename IdxT>
__device__ __forceinline__ uint32_t routeToken(const LayoutParams& p, const IdxT* topk, int t,
                                               int experts_per_rank, int32_t* expert_hist) {
  uint32_t mask = 0;
  for (int k = 0; k < p.num_topk; ++k) {
    const int64_t e = static_cast<int64_t>(topk[static_cast<int64_t>(t) * p.num_topk + k]);
    int32_t kept = -1;
    if (e >= 0 && e < p.num_experts) {
      kept = static_cast<int32_t>(e);
      mask |= 1u << (kept / experts_per_rank);
      atomicAdd(&expert_hist[kept], 1);
    } else if (e != -1) {
      recordFailure(p.error, p.local, false, FailKind::kBadExpertId, OpId::kLayout, 0, p.rank, -1,
                    t, static_cast<uint64_t>(p.num_experts), static_cast<uint64_t>(e));
    }
    p.topk_copy[static_cast<int64_t>(t) * p.num_topk + k] = kept;
  }
  return mask;
}

template <typename IdxT>
__global__ void __launch_bounds__(kLayoutThreads) layoutKernel(LayoutParams p) {
  using BlockScan = cub::BlockScan<RankCounts, kLayoutThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ int32_t expert_hist[kMaxExperts];
  __shared__ int32_t running[kMaxRanks];

  const int tid = threadIdx.x;
  for (int e = tid; e < p.num_experts; e += kLayoutThreads) expert_hist[e] = 0;
  if (tid < kMaxRanks) running[tid] = 0;
  __syncthreads();

  const int experts_per_rank = p.num_experts / p.num_ranks;
  const IdxT* topk = static_cast<const IdxT*>(p.topk_idx);
  for (int base = 0; base < p.num_tokens; base += kTileTokens) {
    uint32_t mask[kItemsPerThread];
    RankCounts mine[kItemsPerThread];
#pragma unroll
    for (int i = 0; i < kItemsPerThread; ++i) {
      const int t = base + tid * kItemsPerThread + i;
      mask[i] = t < p.num_tokens ? routeToken(p, topk, t, experts_per_rank, expert_hist) : 0u;
      mine[i] = RankCounts{0, 0};
      for (int d = 0; d < kMaxRanks; ++d) {
        if ((mask[i] >> d) & 1u) {
          if (d < 4) mine[i].lo += 1ull << (16 * d);
          else mine[i].hi += 1ull << (16 * (d - 4));
        }
      }
    }
    RankCounts prefix[kItemsPerThread];
    RankCounts aggregate;
    BlockScan(scan_storage).ExclusiveScan(mine, prefix, RankCounts{0, 0}, AddRankCounts(),
                                          aggregate);
#pragma unroll
    for (int i = 0; i < kItemsPerThread; ++i) {
      const int t = base + tid * kItemsPerThread + i;
      if (t >= p.num_tokens) continue;
      p.token_mask[t] = mask[i];
      for (int d = 0; d < p.num_ranks; ++d) {
        const bool in_rank = (mask[i] >> d) & 1u;
        p.token_slot[static_cast<int64_t>(t) * p.num_ranks + d] =
            in_rank ? running[d] + static_cast<int32_t>(prefix[i].get(d)) : -1;
        p.is_token_in_rank[static_cast<int64_t>(t) * p.num_ranks + d] = in_rank;
      }
    }
    __syncthreads();  // everyone read `running` and the scan storage before they change
    if (tid < kMaxRanks) running[tid] += static_cast<int32_t>(aggregate.get(tid));
    __syncthreads();
  }

  if (tid < p.num_ranks) p.rank_counts[tid] = running[tid];
  for (int e = tid; e < p.num_experts; e += kLayoutThreads) p.expert_counts[e] = expert_hist[e];
}

}  // namespace

void launchLayout(const LayoutParams& params, cudaStream_t stream) {
  if (params.idx_is_64) {
    layoutKernel<int64_t><<<1, kLayoutThreads, 0, stream>>>(params);
  } else {
    layoutKernel<int32_t><<<1, kLayoutThreads, 0, stream>>>(params);
  }
  EPCOMM_LAUNCH_CHECK(layoutKernel);
}

}  // namespace epcomm::kernels
