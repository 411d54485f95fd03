// SPDX-License-Identifier: Apache-2.0
// LL combine: the send and receive kernels (the protocol is described in low_latency.cuh).
#include <algorithm>

#include "kernels/kernel_check.hpp"
#include "kernels/low_latency.cuh"

namespace epcomm::kernels {
namespace {

constexpr WaitPhase kPhaseCombinePost = WaitPhase::kLlCombinePost;

__global__ void __launch_bounds__(kBlockThreads) llCombineSendKernel(LlParams p) {
  const PeerContext& ctx = p.peers;
  ControlRegion* own = controlOf(ctx.local_base);
  const int tid = threadIdx.x;
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int num_ranks = ctx.num_ranks;
  const int me = ctx.rank;
  const uint64_t epoch = callEpoch(own, kEpochLl);
  const int parity = static_cast<int>(epoch & 1);
  const LlRegions& r = p.regions;
  const int num_segments = (p.hidden + kSegmentCols - 1) / kSegmentCols;

  __shared__ int32_t s_first_item[kMaxRanks + 1];
  __shared__ uint8_t* s_peer[kMaxRanks];
  // The dispatch receive failed (or anything before): nothing here is valid, send nothing.
  if (rankFailed(ctx)) return;
  if (tid == 0) {
    // Rows staged from each source in this call (the posts arrived before dispatch recv ended,
    // which checked them; bounded again since they are peer data).
    int32_t total = 0;
    for (int s = 0; s < num_ranks; ++s) {
      s_first_item[s] = total;
      const uint32_t rows = llPostRows(tagValue(own->ll_dispatch_flag[parity][s]));
      total += min(static_cast<int32_t>(rows), static_cast<int32_t>(r.max_tokens)) * num_segments;
    }
    s_first_item[num_ranks] = total;
  }
  if (tid < num_ranks) s_peer[tid] = ctx.peer_bases[tid];
  __syncthreads();

  const int items = s_first_item[num_ranks];
  for (int item = blockIdx.x * kWarpsPerBlock + warp; item < items;
       item += gridDim.x * kWarpsPerBlock) {
    int s = 0;
    while (item >= s_first_item[s + 1]) ++s;
    const int row = (item - s_first_item[s]) / num_segments;
    const int seg = (item - s_first_item[s]) % num_segments;
    const int32_t* meta = metaOf(p, parity, s, row);
    const int token = meta[0] & 0xffffff;
    if (token >= r.max_tokens) continue;  // rejected by dispatch recv already
    const int32_t* slot_of_row = reinterpret_cast<const int32_t*>(ctx.local_base + r.slot_of_row) +
                                 (int64_t{s} * r.max_tokens + row) * p.max_topk;
    const float* weights = reinterpret_cast<const float*>(meta + 1 + p.max_topk);
    float acc[kRoundsPerSegment][8];
#pragma unroll
    for (int u = 0; u < kRoundsPerSegment; ++u) {
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[u][j] = 0.f;
    }
    for (int k = 0; k < p.max_topk; ++k) {
      const int32_t out_row = slot_of_row[k];
      if (out_row < 0) continue;
      const float weight = weights[k];
      const uint16_t* y = p.expert_out + int64_t{out_row} * p.hidden;
#pragma unroll
      for (int u = 0; u < kRoundsPerSegment; ++u) {
        const int col = seg * kSegmentCols + u * kColsPerRound + lane * 8;
        if (col < p.hidden) {
          // Unfused: the partial is rounded to BF16 for transport, and a reproducible partial
          // keeps that rounding identical to the reference model's.
          accumulateBf16x8Unfused(acc[u], ldNcNoAlloc(reinterpret_cast<const int4*>(y + col)),
                                  weight);
        }
      }
    }
    uint16_t* dst = reinterpret_cast<uint16_t*>(s_peer[s] + r.combine_rows[parity]) +
                    (int64_t{me} * r.max_tokens + token) * p.hidden;
#pragma unroll
    for (int u = 0; u < kRoundsPerSegment; ++u) {
      const int col = seg * kSegmentCols + u * kColsPerRound + lane * 8;
      if (col < p.hidden) stNoAlloc(reinterpret_cast<int4*>(dst + col), packBf16x8(acc[u]));
    }
  }

  if (!arriveLastBlock(&own->local.arrive[kArriveLlCombineSend])) return;
  if (tid == 0) {
    for (int s = 0; s < num_ranks; ++s) {
      stReleaseSys(&controlOf(s_peer[s])->ll_combine_flag[parity][me], epoch);
    }
  }
}

__global__ void __launch_bounds__(kBlockThreads) llCombineRecvKernel(LlParams p) {
  const PeerContext& ctx = p.peers;
  ControlRegion* own = controlOf(ctx.local_base);
  const int tid = threadIdx.x;
  const int num_ranks = ctx.num_ranks;
  const uint64_t epoch = callEpoch(own, kEpochLl);
  const int parity = static_cast<int>(epoch & 1);
  const LlRegions& r = p.regions;
  const WaitContext w{&ctx, OpId::kLlCombineRecv, globalTimerNs()};
  const int num_segments = (p.hidden + kSegmentCols - 1) / kSegmentCols;

  if (rankFailed(ctx)) return;
  bool ok = true;
  if (tid < num_ranks) {
    ok = waitEpoch(&own->ll_combine_flag[parity][tid], epoch, w, kPhaseCombinePost, tid);
  }
  if (!__syncthreads_and(ok)) return;

  const int n = *reinterpret_cast<const int32_t*>(ctx.local_base + r.num_tokens);
  const uint32_t* token_masks = reinterpret_cast<const uint32_t*>(ctx.local_base + r.token_mask);
  const uint16_t* partials =
      reinterpret_cast<const uint16_t*>(ctx.local_base + r.combine_rows[parity]);
  const int items = n * num_segments;
  const int warp = tid / kWarpSize;  // one warp per (token, segment) item
  const int lane = tid % kWarpSize;
  for (int item = blockIdx.x * kWarpsPerBlock + warp; item < items;
       item += gridDim.x * kWarpsPerBlock) {
    const int token = item / num_segments;
    const int seg = item % num_segments;
    const RankMask mask = loadRankMask(token_masks, token, rankMaskWords(num_ranks));
    float acc[kRoundsPerSegment][8];
#pragma unroll
    for (int u = 0; u < kRoundsPerSegment; ++u) {
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[u][j] = 0.f;
    }
    forEachRank(mask, [&](int d) {
      const uint16_t* row = partials + (int64_t{d} * r.max_tokens + token) * p.hidden;
#pragma unroll
      for (int u = 0; u < kRoundsPerSegment; ++u) {
        const int col = seg * kSegmentCols + u * kColsPerRound + lane * 8;
        if (col < p.hidden) {
          accumulateBf16x8Unfused(acc[u], ldNoAlloc(reinterpret_cast<const int4*>(row + col)), 1.f);
        }
      }
    });
#pragma unroll
    for (int u = 0; u < kRoundsPerSegment; ++u) {
      const int col = seg * kSegmentCols + u * kColsPerRound + lane * 8;
      if (col < p.hidden) {
        *reinterpret_cast<int4*>(p.out + int64_t{token} * p.hidden + col) = packBf16x8(acc[u]);
      }
    }
  }

  if (!arriveLastBlock(&own->local.arrive[kArriveLlCombineRecv])) return;
  if (tid == 0) own->local.epoch[kEpochLl] = epoch;
}

}  // namespace

void launchLlCombineSend(const LlParams& params, int sm_budget, cudaStream_t stream) {
  const int num_blocks = sm_budget;
  llCombineSendKernel<<<num_blocks, kBlockThreads, 0, stream>>>(params);
  EPCOMM_KERNEL_LAUNCH_CHECK(llCombineSendKernel);
}

void launchLlCombineRecv(const LlParams& params, int num_tokens, int sm_budget,
                         cudaStream_t stream) {
  // One warp per (token, segment), kWarpsPerBlock per block.
  const int segments = (params.hidden + kSegmentCols - 1) / kSegmentCols;
  const int work_blocks =
      static_cast<int>((int64_t{num_tokens} * segments + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const int num_blocks = std::max(1, std::min(sm_budget, work_blocks));
  llCombineRecvKernel<<<num_blocks, kBlockThreads, 0, stream>>>(params);
  EPCOMM_KERNEL_LAUNCH_CHECK(llCombineRecvKernel);
}

}  // namespace epcomm::kernels
