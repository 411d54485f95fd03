// SPDX-License-Identifier: Apache-2.0
// Expert-major HT dispatch and combine (DispatchArgs::expert_major; docs/design.md §5).
//
// Receive layout on rank d: one group per local expert, group l at expert_offsets[l] (aligned),
// holding one row per (token, expert) pair received for that expert, sources in rank order, then
// the padding up to expert_alignment. A source can only write its rows at their final place if
// it knows, before any row moves, every source's per-expert pair counts of this call; so, unlike
// rank-major (which sums them at the end), the counts go first:
//
//   0. pairs (own kernel, before dispatch): pair_pos[t, k] = rank of the pair (t, k) among this
//      rank's pairs of its expert (an atomic cursor per expert: the order within one source's
//      part of a group is per call, and the handle keeps it, so combine reads the same rows).
//   1. notify: every block writes this rank's count row + call signature (as rank-major: the
//      ht_counts words) and its whole per-expert count row [E] into every peer's
//      ht_expert_counts[parity][me][*] (tagged; every block writes the same values, so no block
//      waits for another block of its own grid to be scheduled).
//   2. every block waits for the signatures (a rank-major peer is found here, before anything
//      else is awaited), then for the [R, E] expert-count matrix, bounds every entry (peer data),
//      scans the aligned totals over all experts (global expert order = rank order, then local
//      order) and gets, for each expert e, the first row of this rank's pairs in e's group:
//        group_start(e) + sum over sources s < me of count[s][e].
//      A destination whose rows exceed the capacity fails the call on every rank (every rank sees
//      the same matrix, so each finds it by itself).
//   3. warps stream each token's row to every (rank, local expert) of its top-k, plus scales,
//      top-k (a pair row holds its own entry only) and source index; every rank writes the
//      padding rows of its own groups (zero data, src -1, ids -1, weights 0).
//   4. the last block signals "rows written" to every destination and waits for every source,
//      as rank-major.
// Combine pulls, for each token and each valid top-k entry, the row of (token, expert) from that
// expert's rank (send_base[e] + pair_pos[t, k]) and sums them in float32, weighted, plus bias.
#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "kernels/device_utils.cuh"
#include "kernels/kernel_check.hpp"
#include "kernels/launch.hpp"

namespace epcomm::kernels {
namespace {

using namespace device;

// Experts scanned per thread: the block scan covers every expert of the call in one pass.
constexpr int kExpertsPerThread = (kMaxExperts + kBlockThreads - 1) / kBlockThreads;
static_assert(kMaxTopk <= kWarpSize, "one lane per top-k entry");

// Copies one row of `num_vecs` 16-byte vectors from `src` to every destination row dst[k] with
// bit k set in `mask` (the same loop as the rank-major copy, over top-k entries instead of ranks:
// a token may have several rows on one rank here).
__device__ __forceinline__ void copyRowToRows(const int4* src, int4* const* dst, uint32_t mask,
                                              int num_vecs, int lane) {
  for (int base = 0; base < num_vecs; base += kWarpSize * kDispatchUnroll) {
    int4 v[kDispatchUnroll];
#pragma unroll
    for (int u = 0; u < kDispatchUnroll; ++u) {
      const int i = base + u * kWarpSize + lane;
      if (i < num_vecs) v[u] = ldNcNoAlloc(src + i);
    }
    for (uint32_t m = mask; m != 0; m &= m - 1) {
      const int k = __ffs(m) - 1;
#pragma unroll
      for (int u = 0; u < kDispatchUnroll; ++u) {
        const int i = base + u * kWarpSize + lane;
        if (i < num_vecs) stNoAlloc(dst[k] + i, v[u]);
      }
    }
  }
}

__global__ void __launch_bounds__(kBlockThreads) pairsKernel(HtExpertMajorPairsParams p) {
  const int64_t total = int64_t{p.num_tokens} * p.num_topk;
  for (int64_t i = blockIdx.x * int64_t{kBlockThreads} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * kBlockThreads) {
    const int32_t e = p.topk_copy[i];  // the layout's copy: in range or -1
    p.pair_pos[i] = e >= 0 && e < p.num_experts ? atomicAdd(&p.cursor[e], 1) : -1;
  }
}

template <typename IdxT>
__global__ void __launch_bounds__(kBlockThreads) emDispatchKernel(HtExpertMajorParams p) {
  using BlockScan = cub::BlockScan<int64_t, kBlockThreads>;
  const PeerContext& ctx = p.peers;
  ControlRegion* own = controlOf(ctx.local_base);
  const int num_ranks = ctx.num_ranks;
  const int me = ctx.rank;
  const int tid = threadIdx.x;
  const uint64_t epoch = callEpoch(own, kEpochHtDispatch);
  const int parity = static_cast<int>(epoch & 1);
  const bool has_topk = p.has_topk != 0;
  const int64_t capacity = p.regions.capacity;
  const int num_experts = p.num_experts;
  const int local_experts = p.num_local_experts;
  const int64_t align = p.expert_alignment;
  const WaitContext w{&ctx, OpId::kHtDispatch, globalTimerNs()};

  if (rankFailed(ctx)) return;

  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ uint8_t* s_peer[kMaxRanks];
  __shared__ int64_t s_start[kMaxExperts + 1];  // exclusive scan of aligned totals, all experts
  __shared__ int32_t s_base[kMaxExperts];       // my first row in expert e's group on its rank
  __shared__ int32_t s_total[kMaxExperts];      // pairs of expert e from all sources (unaligned)
  __shared__ int4* s_dst[kWarpsPerBlock][kMaxTopk];  // the current token's rows, per warp
  __shared__ int32_t s_dst_row[kWarpsPerBlock][kMaxTopk];

  if (tid < num_ranks) s_peer[tid] = ctx.peer_bases[tid];

  // 1. notify: count row + signature (ht_counts, as rank-major) and my per-expert counts
  const int row_words = num_ranks + kHtSignatureWords;
  for (int i = tid; i < num_ranks * row_words; i += kBlockThreads) {
    const int d = i / row_words;
    const int j = i % row_words;
    const uint32_t value = j < num_ranks    ? static_cast<uint32_t>(p.rank_counts[j])
                           : j == num_ranks ? static_cast<uint32_t>(p.signature)
                                            : static_cast<uint32_t>(p.signature >> 32);
    stRelaxedSys(&controlOf(ctx.peer_bases[d])->ht_counts[parity][me][j], tag(epoch, value));
  }
  // Each tagged word carries its own epoch and orders no other data: plain 64-bit stores do.
  for (int i = tid; i < num_ranks * num_experts; i += kBlockThreads) {
    const int d = i / num_experts;
    const int e = i % num_experts;
    *reinterpret_cast<volatile uint64_t*>(
        &controlOf(ctx.peer_bases[d])->ht_expert_counts[parity][me][e]) =
        tag(epoch, static_cast<uint32_t>(p.expert_counts[e]));
  }

  // 2a. signatures first: a peer that called the other mode never sends what is awaited below
  bool ok = true;
  uint64_t theirs = p.signature;
  if (tid < num_ranks) {
    uint64_t lo = 0, hi = 0;
    ok = waitTagged(&own->ht_counts[parity][tid][num_ranks], epoch, w, WaitPhase::kHtCounts, tid,
                    &lo) &&
         waitTagged(&own->ht_counts[parity][tid][num_ranks + 1], epoch, w, WaitPhase::kHtCounts,
                    tid, &hi);
    if (ok) theirs = uint64_t{tagValue(lo)} | uint64_t{tagValue(hi)} << 32;
  }
  if (!__syncthreads_and(ok)) return;
  bool bad = false;
  if (tid < num_ranks && theirs != p.signature) {
    recordOpFailure(ctx, FailKind::kSignatureMismatch, OpId::kHtDispatch, WaitPhase::kHtCounts, tid,
                    p.signature, theirs);
    bad = true;
  }
  if (__syncthreads_or(bad)) return;
  for (int i = tid; blockIdx.x == 0 && ok && i < num_ranks * num_ranks; i += kBlockThreads) {
    // The rank-major count matrix, kept in the handle for symmetry (combine does not need it).
    const int s = i / num_ranks;
    uint64_t v = 0;
    ok = waitTagged(&own->ht_counts[parity][s][i % num_ranks], epoch, w, WaitPhase::kHtCounts, s,
                    &v);
    if (ok) p.count_matrix[i] = static_cast<int32_t>(tagValue(v));
  }

  // 2b. the expert-count matrix [R, E]: totals, my prefix, aligned totals
  int64_t aligned[kExpertsPerThread];
  int64_t my_prefix[kExpertsPerThread];
#pragma unroll
  for (int i = 0; i < kExpertsPerThread; ++i) {
    const int e = tid * kExpertsPerThread + i;
    int64_t total = 0, prefix = 0;
    for (int s = 0; s < num_ranks && ok && e < num_experts; ++s) {
      uint64_t v = 0;
      ok = waitTagged(&own->ht_expert_counts[parity][s][e], epoch, w, WaitPhase::kHtExpertCounts, s,
                      &v);
      const uint32_t count = tagValue(v);
      if (ok && count > static_cast<uint32_t>(p.max_tokens)) {  // a source has <= max_tokens
        recordFault(ctx, FailKind::kBadPeerData, OpId::kHtDispatch, WaitPhase::kHtExpertCounts, s,
                    e, static_cast<uint64_t>(p.max_tokens), count);
        ok = false;
      }
      total += count;
      if (s < me) prefix += count;
    }
    aligned[i] = e < num_experts ? (total + align - 1) / align * align : 0;
    my_prefix[i] = prefix;
    if (e < num_experts) s_total[e] = static_cast<int32_t>(total);  // <= R * 65536
  }
  if (!__syncthreads_and(ok)) return;
  int64_t start[kExpertsPerThread];
  int64_t all_rows = 0;
  BlockScan(scan_storage).ExclusiveSum(aligned, start, all_rows);
#pragma unroll
  for (int i = 0; i < kExpertsPerThread; ++i) {
    const int e = tid * kExpertsPerThread + i;
    if (e < num_experts) s_start[e] = start[i];
  }
  if (tid == 0) s_start[num_experts] = all_rows;
  __syncthreads();
  if (tid < num_ranks) {
    const int64_t rows = s_start[(tid + 1) * local_experts] - s_start[tid * local_experts];
    if (rows > capacity) {
      recordFault(ctx, FailKind::kOverCapacity, OpId::kHtDispatch, WaitPhase::kHtExpertCounts, tid,
                  -1, static_cast<uint64_t>(capacity), static_cast<uint64_t>(rows));
      bad = true;
    }
  }
  if (__syncthreads_or(bad)) return;
#pragma unroll
  for (int i = 0; i < kExpertsPerThread; ++i) {
    const int e = tid * kExpertsPerThread + i;
    if (e < num_experts) {
      // < capacity <= 2^31 - 1: checked above for the rank that owns e
      s_base[e] = static_cast<int32_t>(start[i] - s_start[e / local_experts * local_experts] +
                                       my_prefix[i]);
    }
  }
  __syncthreads();

  const int64_t my_first = s_start[me * local_experts];
  if (blockIdx.x == 0) {
    for (int e = tid; e < num_experts; e += kBlockThreads) p.send_base[e] = s_base[e];
    for (int l = tid; l <= local_experts; l += kBlockThreads) {
      const int e = me * local_experts + l;
      p.expert_offsets[l] = static_cast<int32_t>(s_start[e] - my_first);
      if (l < local_experts) {
        p.recv_expert_counts[l] = static_cast<int32_t>(s_start[e + 1] - s_start[e]);
      }
    }
    if (tid == 0) {
      const int64_t rows = s_start[(me + 1) * local_experts] - my_first;
      *p.num_recv = static_cast<int32_t>(rows);
      if (p.host_count != nullptr) {
        *reinterpret_cast<volatile uint64_t*>(p.host_count) =
            hostCount(static_cast<uint32_t>(rows));
        __threadfence_system();
      }
    }
  }

  // 3. move the rows: one warp per token, one destination row per valid top-k entry
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int num_vecs = static_cast<int>(p.x_row_bytes / 16);
  const int route_topk = p.route_topk;
  const int num_topk = p.num_topk;
  for (int t = blockIdx.x * kWarpsPerBlock + warp; t < p.num_tokens;
       t += gridDim.x * kWarpsPerBlock) {
    int4** dst = s_dst[warp];
    int32_t* dst_row = s_dst_row[warp];
    int32_t e = -1;
    if (lane < route_topk) e = p.topk_copy[int64_t{t} * route_topk + lane];
    const uint32_t valid = __ballot_sync(kFullMask, e >= 0);
    int d = 0;
    if (e >= 0) {
      d = e / local_experts;
      const int32_t row = s_base[e] + p.pair_pos[int64_t{t} * route_topk + lane];
      dst_row[lane] = row;
      dst[lane] = reinterpret_cast<int4*>(s_peer[d] + p.regions.recv_x + row * p.x_row_bytes);
    }
    __syncwarp();
    copyRowToRows(reinterpret_cast<const int4*>(p.x + t * p.x_row_bytes), dst, valid, num_vecs,
                  lane);

    for (int c = lane; c < p.num_scales; c += kWarpSize) {
      const float scale = p.x_scales[t * p.scales_token_stride + c * p.scales_col_stride];
      for (uint32_t m = valid; m != 0; m &= m - 1) {
        const int k = __ffs(m) - 1;
        const int dk = p.topk_copy[int64_t{t} * route_topk + k] / local_experts;
        reinterpret_cast<float*>(
            s_peer[dk] +
            p.regions.recv_scales)[static_cast<int64_t>(dst_row[k]) * p.num_scales + c] = scale;
      }
    }
    if (has_topk) {
      // Row of pair k: column k holds its local id and weight, every other column -1 and 0.
      const float weight = lane < route_topk && p.topk_weights
                               ? p.topk_weights[int64_t{t} * route_topk + lane]
                               : 0.f;
      for (uint32_t m = valid; m != 0; m &= m - 1) {
        const int k = __ffs(m) - 1;
        const int32_t ek = __shfl_sync(kFullMask, e, k);
        const float wk = __shfl_sync(kFullMask, weight, k);
        const int dk = ek / local_experts;
        if (lane < num_topk) {
          const int64_t slot = static_cast<int64_t>(dst_row[k]) * num_topk + lane;
          reinterpret_cast<IdxT*>(s_peer[dk] + p.regions.recv_topk_idx)[slot] =
              static_cast<IdxT>(lane == k ? ek - dk * local_experts : -1);
          reinterpret_cast<float*>(s_peer[dk] + p.regions.recv_topk_weights)[slot] =
              lane == k ? wk : 0.f;
        }
      }
    }
    if (e >= 0) reinterpret_cast<int32_t*>(s_peer[d] + p.regions.recv_src_idx)[dst_row[lane]] = t;
    __syncwarp();  // the next token rewrites this warp's tables
  }

  // 3b. padding rows of my own groups, one warp per row (nobody else writes them)
  const int global_warp = blockIdx.x * kWarpsPerBlock + warp;
  const int num_warps = gridDim.x * kWarpsPerBlock;
  uint8_t* local = ctx.local_base;
  for (int l = 0; l < local_experts && align > 1; ++l) {  // alignment 1: no padding
    const int e = me * local_experts + l;
    const int64_t first = s_start[e] - my_first + s_total[e];
    const int64_t pad = s_start[e + 1] - s_start[e] - s_total[e];
    for (int64_t r = global_warp; r < pad; r += num_warps) {
      const int64_t row = first + r;
      int4* x_row = reinterpret_cast<int4*>(local + p.regions.recv_x + row * p.x_row_bytes);
      for (int i = lane; i < num_vecs; i += kWarpSize) x_row[i] = make_int4(0, 0, 0, 0);
      for (int c = lane; c < p.num_scales; c += kWarpSize) {
        reinterpret_cast<float*>(local + p.regions.recv_scales)[row * p.num_scales + c] = 0.f;
      }
      if (has_topk && lane < num_topk) {
        reinterpret_cast<IdxT*>(local + p.regions.recv_topk_idx)[row * num_topk + lane] =
            static_cast<IdxT>(-1);
        reinterpret_cast<float*>(local + p.regions.recv_topk_weights)[row * num_topk + lane] = 0.f;
      }
      if (lane == 0) reinterpret_cast<int32_t*>(local + p.regions.recv_src_idx)[row] = -1;
    }
  }

  // 4. the last block signals every destination and collects every source's signal
  if (!arriveLastBlock(&own->local.arrive[kArriveHtDispatch])) return;
  if (tid == 0) {
    // Thread 0 fenced in arriveLastBlock after every block's arrival: these are release patterns.
    for (int dd = 0; dd < num_ranks; ++dd) {
      stRelaxedSys(&controlOf(s_peer[dd])->ht_dispatch_done[me], epoch);
    }
  }
  ok = true;
  if (tid < num_ranks) {
    ok = waitEpoch(&own->ht_dispatch_done[tid], epoch, w, WaitPhase::kHtRowsWritten, tid);
  }
  if (__syncthreads_and(ok) && tid == 0) own->local.epoch[kEpochHtDispatch] = epoch;
}

__global__ void __launch_bounds__(kBlockThreads) emCombineKernel(HtExpertMajorCombineParams p) {
  const PeerContext& ctx = p.peers;
  ControlRegion* own = controlOf(ctx.local_base);
  const int num_ranks = ctx.num_ranks;
  const int me = ctx.rank;
  const int tid = threadIdx.x;
  const uint64_t epoch = callEpoch(own, kEpochHtCombine);
  const WaitContext w{&ctx, OpId::kHtCombine, globalTimerNs()};
  if (rankFailed(ctx)) return;  // e.g. the matching dispatch failed: its handle is not valid

  __shared__ uint8_t* s_peer[kMaxRanks];
  __shared__ const int4* s_row[kWarpsPerBlock][kMaxTopk];  // the current token's rows, per warp
  __shared__ float s_weight[kWarpsPerBlock][kMaxTopk];

  // 1. my combine input is in place (stream order): tell everyone, then wait for everyone.
  // Tagged as the rank-major combine's (the word and the epoch family are shared): a plain epoch
  // here would read as long reached to a later tagged wait, and vice versa never.
  (void)postCombineReady(ctx, epoch, p.signature);
  bool ok = true;
  if (tid < num_ranks) {
    uint64_t v = 0;
    ok = waitTagged(&own->ht_combine_ready[tid], epoch, w, WaitPhase::kHtCombineReady, tid, &v);
    if (ok && tagValue(v) != p.signature) {
      recordOpFailure(ctx, FailKind::kSignatureMismatch, OpId::kHtCombine,
                      WaitPhase::kHtCombineReady, tid, p.signature, tagValue(v));
      ok = false;
    }
    s_peer[tid] = ctx.peer_bases[tid];
  }
  if (!__syncthreads_and(ok)) return;

  // 2. one warp per token: pull the row of each (token, expert), weight, sum in float32
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int num_vecs = static_cast<int>(p.row_bytes / 16);
  const int local_experts = p.num_local_experts;
  for (int t = blockIdx.x * kWarpsPerBlock + warp; t < p.num_tokens;
       t += gridDim.x * kWarpsPerBlock) {
    const int4** src = s_row[warp];
    float* weight = s_weight[warp];
    int32_t e = -1;
    if (lane < p.num_topk) e = p.topk_copy[int64_t{t} * p.num_topk + lane];
    const uint32_t valid = __ballot_sync(kFullMask, e >= 0);
    if (e >= 0) {
      const int64_t i = int64_t{t} * p.num_topk + lane;
      // send_base was bounded by the dispatch (rows inside the capacity of e's rank)
      const int64_t row = int64_t{p.send_base[e]} + p.pair_pos[i];
      src[lane] = reinterpret_cast<const int4*>(s_peer[e / local_experts] + p.regions.combine_in +
                                                row * p.row_bytes);
      weight[lane] = p.topk_weights ? p.topk_weights[i] : 1.f;
    }
    __syncwarp();
    int4* out = reinterpret_cast<int4*>(p.out + int64_t{t} * p.hidden);
    const int4* bias =
        p.bias ? reinterpret_cast<const int4*>(p.bias + int64_t{t} * p.hidden) : nullptr;
    // The entries' rows in top-k order, two in flight at a time.
    sumTokenRows(
        out, bias, src, weight,
        [&](auto&& f) {
          for (uint32_t m = valid; m != 0; m &= m - 1) f(__ffs(m) - 1);
        },
        num_vecs, lane, [](const int4* q) { return ldNoAlloc(q); });
    __syncwarp();  // the next token rewrites this warp's tables
  }

  // 3. done pulling: tell every rank; leave once every rank is done pulling from me
  if (!arriveLastBlock(&own->local.arrive[kArriveHtCombine])) return;
  if (tid == 0) {
    // Thread 0 fenced in arriveLastBlock after every block's arrival: these are release patterns.
    for (int d = 0; d < num_ranks; ++d) {
      stRelaxedSys(&controlOf(s_peer[d])->ht_combine_done[me], epoch);
    }
  }
  ok = true;
  if (tid < num_ranks) {
    ok = waitEpoch(&own->ht_combine_done[tid], epoch, w, WaitPhase::kHtCombineDone, tid);
  }
  if (__syncthreads_and(ok) && tid == 0) own->local.epoch[kEpochHtCombine] = epoch;
}

}  // namespace

void launchHtExpertMajorPairs(const HtExpertMajorPairsParams& params, cudaStream_t stream) {
  EPCOMM_KERNEL_CUDA_CHECK(cudaMemsetAsync(
      params.cursor, 0, sizeof(int32_t) * static_cast<size_t>(params.num_experts), stream));
  const int64_t entries = int64_t{params.num_tokens} * params.num_topk;
  if (entries == 0) return;
  const int blocks =
      static_cast<int>(std::min<int64_t>((entries + kBlockThreads - 1) / kBlockThreads, 1024));
  pairsKernel<<<blocks, kBlockThreads, 0, stream>>>(params);
  EPCOMM_KERNEL_LAUNCH_CHECK(pairsKernel);
}

void launchHtExpertMajorDispatch(const HtExpertMajorParams& params, int sm_budget,
                                 cudaStream_t stream) {
  const int num_blocks = sm_budget;
  if (params.idx_is_64) {
    emDispatchKernel<int64_t><<<num_blocks, kBlockThreads, 0, stream>>>(params);
  } else {
    emDispatchKernel<int32_t><<<num_blocks, kBlockThreads, 0, stream>>>(params);
  }
  EPCOMM_KERNEL_LAUNCH_CHECK(emDispatchKernel);
}

void launchHtExpertMajorCombine(const HtExpertMajorCombineParams& params, int sm_budget,
                                cudaStream_t stream) {
  const int num_blocks = sm_budget;
  emCombineKernel<<<num_blocks, kBlockThreads, 0, stream>>>(params);
  EPCOMM_KERNEL_LAUNCH_CHECK(emCombineKernel);
}

}  // namespace epcomm::kernels
