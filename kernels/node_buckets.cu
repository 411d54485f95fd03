// SPDX-License-Identifier: Apache-2.0
// The hierarchical path's small kernels (kernels/node_launch.hpp). None of them talks to a peer:
// the rail transport moves what they pack, the node-local EpBuffer forwards what they unpack.
#include <cuda_bf16.h>

#include <cub/block/block_scan.cuh>

#include "kernels/kernel_check.hpp"
#include "kernels/node_launch.hpp"

namespace epcomm::node {
namespace {

constexpr int kBucketThreads = 256;
constexpr int kWarpsPerBlock = 8;
constexpr int kRowThreads = kWarpsPerBlock * 32;
constexpr int kReduceThreads = 256;

__device__ __forceinline__ int64_t loadId(const void* idx, int32_t is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(idx)[i] : static_cast<const int32_t*>(idx)[i];
}

// First row of node m's bucket: worst-case m * max_rows, exact the counts of the nodes before.
__device__ __forceinline__ int64_t bucketBase(const int32_t* counts, int m, int max_rows) {
  if (max_rows > 0) return static_cast<int64_t>(m) * max_rows;
  int64_t base = 0;
  for (int n = 0; n < m; ++n) base += counts[n];
  return base;
}

// Block m scans the tokens in order, so a bucket keeps the token order (the combine relies only
// on the slots, but a fixed order makes runs reproducible).
__global__ void __launch_bounds__(kBucketThreads) nodeBucketsKernel(BucketParams p) {
  using Scan = cub::BlockScan<int, kBucketThreads>;
  __shared__ typename Scan::TempStorage scan;
  const int m = blockIdx.x;
  int base = 0;
  for (int first = 0; first < p.num_tokens; first += kBucketThreads) {
    const int t = first + static_cast<int>(threadIdx.x);
    int flag = 0;
    if (t < p.num_tokens) {
      for (int k = 0; k < p.num_topk; ++k) {
        const int64_t e = loadId(p.topk_idx, p.idx_is_64, static_cast<int64_t>(t) * p.num_topk + k);
        if (e == -1) continue;
        if (!validExpert(e, p.num_experts) || nodeOfExpert(e, p.experts_per_rank, p.node_of) == m) {
          flag = 1;
          break;
        }
      }
    }
    int prefix = 0, total = 0;
    Scan(scan).ExclusiveSum(flag, prefix, total);
    if (t < p.num_tokens)
      p.slot[static_cast<int64_t>(t) * p.num_nodes + m] = flag ? base + prefix : -1;
    base += total;
    __syncthreads();  // the scan storage is reused
  }
  if (threadIdx.x == 0) p.counts[m] = base;
}

// One warp per (token): for every node whose bucket holds it, one row.
__global__ void __launch_bounds__(kRowThreads) nodePackKernel(PackParams p) {
  const int lane = threadIdx.x % 32;
  const int t = blockIdx.x * kWarpsPerBlock + static_cast<int>(threadIdx.x) / 32;
  if (t >= p.num_tokens) return;
  const bool vec = (reinterpret_cast<uintptr_t>(p.x) % 16 == 0) && p.row.data_bytes % 16 == 0;
  for (int m = 0; m < p.num_nodes; ++m) {
    const int s = p.slot[static_cast<int64_t>(t) * p.num_nodes + m];
    if (s < 0) continue;
    uint8_t* row = p.send + (bucketBase(p.counts, m, p.max_rows) + s) * p.row.row_bytes;
    const uint8_t* src = p.x + static_cast<int64_t>(t) * p.row.data_bytes;
    if (vec) {
      const int64_t n = p.row.data_bytes / 16;
      for (int64_t i = lane; i < n; i += 32) {
        reinterpret_cast<int4*>(row)[i] = reinterpret_cast<const int4*>(src)[i];
      }
    } else {
      for (int64_t i = lane; i < p.row.data_bytes; i += 32) row[i] = src[i];
    }
    if (p.num_scales > 0) {
      float* scales = reinterpret_cast<float*>(row + p.row.scales_off);
      for (int c = lane; c < p.num_scales; c += 32) {
        scales[c] = p.x_scales[t * p.scales_token_stride + c * p.scales_col_stride];
      }
    }
    int32_t* ids = reinterpret_cast<int32_t*>(row + p.row.ids_off);
    float* weights = reinterpret_cast<float*>(row + p.row.weights_off);
    for (int k = lane; k < p.max_topk; k += 32) {
      const bool used = k < p.num_topk;
      const int64_t i = static_cast<int64_t>(t) * p.num_topk + k;
      ids[k] = used ? clampId(loadId(p.topk_idx, p.idx_is_64, i)) : -1;
      weights[k] = used && p.topk_weights != nullptr ? p.topk_weights[i] : 0.0f;
    }
  }
}

// One warp per received row.
__global__ void __launch_bounds__(kRowThreads) nodeUnpackKernel(UnpackParams p) {
  const int lane = threadIdx.x % 32;
  const int i = blockIdx.x * kWarpsPerBlock + static_cast<int>(threadIdx.x) / 32;
  if (i >= p.rows) return;
  bool valid = true;
  if (p.max_rows > 0) valid = i % p.max_rows < p.recv_counts[i / p.max_rows];
  const uint8_t* row = p.recv + static_cast<int64_t>(i) * p.row.row_bytes;
  if (valid) {
    uint8_t* dst = p.x + static_cast<int64_t>(i) * p.row.data_bytes;
    if (p.row.data_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0) {
      const int64_t n = p.row.data_bytes / 16;
      for (int64_t j = lane; j < n; j += 32) {
        reinterpret_cast<int4*>(dst)[j] = reinterpret_cast<const int4*>(row)[j];
      }
    } else {
      for (int64_t j = lane; j < p.row.data_bytes; j += 32) dst[j] = row[j];
    }
    if (p.x_scales != nullptr) {
      const int num_scales = static_cast<int>(p.row.scales_bytes / 4);
      const float* scales = reinterpret_cast<const float*>(row + p.row.scales_off);
      for (int c = lane; c < num_scales; c += 32) {
        p.x_scales[static_cast<int64_t>(i) * num_scales + c] = scales[c];
      }
    }
  }
  const int32_t* ids = reinterpret_cast<const int32_t*>(row + p.row.ids_off);
  const float* weights = reinterpret_cast<const float*>(row + p.row.weights_off);
  for (int k = lane; k < p.num_topk; k += 32) {
    const int64_t out = static_cast<int64_t>(i) * p.num_topk + k;
    const int64_t e = valid ? nodeLocalExpert(ids[k], p.node, p.num_experts, p.experts_per_rank,
                                              p.node_of, p.local_of)
                            : -1;
    if (p.idx_is_64) {
      static_cast<int64_t*>(p.topk_idx)[out] = e;
    } else {
      static_cast<int32_t*>(p.topk_idx)[out] = clampId(e);
    }
    p.topk_weights[out] = valid && e != -1 ? weights[k] : 0.0f;
  }
}

// One thread per (token, node) pair.
__global__ void __launch_bounds__(kRowThreads) nodeGatherKernel(GatherParams p) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x;
  if (pair >= static_cast<int64_t>(p.num_tokens) * p.num_nodes) return;
  const int t = static_cast<int>(pair / p.num_nodes);
  const int m = static_cast<int>(pair % p.num_nodes);
  const int s = p.slot[pair];
  if (s < 0) return;
  float* dst = p.dst + (bucketBase(p.counts, m, p.max_rows) + s) * p.row_floats;
  for (int c = 0; c < p.row_floats; ++c) {
    dst[c] = c < p.src_cols ? p.src[static_cast<int64_t>(t) * p.src_cols + c] : 0.0f;
  }
}

// One block per token, two columns per thread per step.
__global__ void __launch_bounds__(kReduceThreads) nodeReduceKernel(ReduceParams p) {
  const int t = blockIdx.x;
  const TokenRows& tr = p.tokens;
  __shared__ int64_t rows[kMaxNodes];
  if (threadIdx.x == 0) {
    for (int m = 0; m < tr.num_nodes; ++m) {
      const int s = tr.slot[static_cast<int64_t>(t) * tr.num_nodes + m];
      rows[m] = s < 0 ? -1 : bucketBase(tr.counts, m, tr.max_rows) + s;
    }
  }
  __syncthreads();
  const auto* partials = reinterpret_cast<const __nv_bfloat162*>(p.partials);
  const auto* bias = reinterpret_cast<const __nv_bfloat162*>(p.bias);
  auto* out = reinterpret_cast<__nv_bfloat162*>(p.out);
  const int pairs = p.hidden / 2;
  for (int c = threadIdx.x; c < pairs; c += kReduceThreads) {
    float2 acc = make_float2(0.0f, 0.0f);
    if (bias != nullptr) acc = __bfloat1622float2(bias[static_cast<int64_t>(t) * pairs + c]);
    for (int m = 0; m < tr.num_nodes; ++m) {
      if (rows[m] < 0) continue;
      const float2 v = __bfloat1622float2(partials[rows[m] * pairs + c]);
      acc.x += v.x;
      acc.y += v.y;
    }
    out[static_cast<int64_t>(t) * pairs + c] = __float22bfloat162_rn(acc);
  }
}

// One thread per (token, top-k column).
__global__ void __launch_bounds__(kRowThreads) nodeReduceWeightsKernel(ReduceWeightsParams p) {
  const TokenRows& tr = p.tokens;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x;
  if (i >= static_cast<int64_t>(tr.num_tokens) * p.num_topk) return;
  const int64_t t = i / p.num_topk;
  const int k = static_cast<int>(i % p.num_topk);
  float acc = 0.0f;
  for (int m = 0; m < tr.num_nodes; ++m) {
    const int s = tr.slot[t * tr.num_nodes + m];
    if (s < 0) continue;
    acc += p.partials[(bucketBase(tr.counts, m, tr.max_rows) + s) * p.num_topk + k];
  }
  p.out[i] = acc;
}

// Records the first fault found (any thread may be first; the others' are dropped).
__device__ void recordLayoutFault(int32_t* verdict, int32_t kind, int64_t index, int32_t given,
                                  int32_t expected) {
  if (atomicCAS(&verdict[0], kLayoutOk, -1) != kLayoutOk) return;
  verdict[1] = static_cast<int32_t>(index);
  verdict[2] = given;
  verdict[3] = expected;
  __threadfence();
  atomicExch(&verdict[0], kind);
}

// One thread per (token, rank): whether topk sends the token there, against is_token_in_rank;
// counts the rank's tokens and the (token, expert) pairs of its experts.
__global__ void __launch_bounds__(kRowThreads) nodeCheckLayoutPairsKernel(LayoutCheckParams p) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x;
  if (pair >= static_cast<int64_t>(p.num_tokens) * p.num_ranks) return;
  const int64_t t = pair / p.num_ranks;
  const int r = static_cast<int>(pair % p.num_ranks);
  const int64_t row = t * p.num_topk;
  bool goes = false;
  for (int k = 0; k < p.num_topk; ++k) {
    const int64_t e = loadId(p.topk_idx, p.idx_is_64, row + k);
    if (!validExpert(e, p.num_experts) || e / p.experts_per_rank != r) continue;
    bool repeated = false;
    for (int j = 0; j < k && !repeated; ++j)
      repeated = loadId(p.topk_idx, p.idx_is_64, row + j) == e;
    if (repeated) continue;
    goes = true;
    atomicAdd(&p.scratch[p.num_ranks + e], 1);
  }
  if (goes) atomicAdd(&p.scratch[r], 1);
  // Read as bytes: any non-zero byte is true (ops.hpp DispatchLayout).
  const bool given = reinterpret_cast<const uint8_t*>(p.in_rank)[pair] != 0;
  if (given != goes) recordLayoutFault(p.verdict, kLayoutInRank, pair, given, goes);
}

// One thread per rank count, then per expert count.
__global__ void __launch_bounds__(kRowThreads) nodeCheckLayoutCountsKernel(LayoutCheckParams p) {
  const int i = blockIdx.x * kRowThreads + static_cast<int>(threadIdx.x);
  if (i < p.num_ranks) {
    if (p.rank_counts[i] != p.scratch[i]) {
      recordLayoutFault(p.verdict, kLayoutRankCount, i, p.rank_counts[i], p.scratch[i]);
    }
  } else if (i < p.num_ranks + p.num_experts) {
    const int e = i - p.num_ranks;
    if (p.expert_counts[e] != p.scratch[i]) {
      recordLayoutFault(p.verdict, kLayoutExpertCount, e, p.expert_counts[e], p.scratch[i]);
    }
  }
}

int rowBlocks(int64_t rows) {
  return static_cast<int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace

void launchNodeBuckets(const BucketParams& p, cudaStream_t stream) {
  nodeBucketsKernel<<<p.num_nodes, kBucketThreads, 0, stream>>>(p);
  EPCOMM_KERNEL_LAUNCH_CHECK(nodeBucketsKernel);
}

void launchNodePack(const PackParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return;
  nodePackKernel<<<rowBlocks(p.num_tokens), kRowThreads, 0, stream>>>(p);
  EPCOMM_KERNEL_LAUNCH_CHECK(nodePackKernel);
}

void launchNodeUnpack(const UnpackParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  nodeUnpackKernel<<<rowBlocks(p.rows), kRowThreads, 0, stream>>>(p);
  EPCOMM_KERNEL_LAUNCH_CHECK(nodeUnpackKernel);
}

void launchNodeGather(const GatherParams& p, cudaStream_t stream) {
  const int64_t pairs = static_cast<int64_t>(p.num_tokens) * p.num_nodes;
  if (pairs == 0) return;
  nodeGatherKernel<<<static_cast<int>((pairs + kRowThreads - 1) / kRowThreads), kRowThreads, 0,
                     stream>>>(p);
  EPCOMM_KERNEL_LAUNCH_CHECK(nodeGatherKernel);
}

void launchNodeReduce(const ReduceParams& p, cudaStream_t stream) {
  if (p.tokens.num_tokens == 0) return;
  nodeReduceKernel<<<p.tokens.num_tokens, kReduceThreads, 0, stream>>>(p);
  EPCOMM_KERNEL_LAUNCH_CHECK(nodeReduceKernel);
}

void launchNodeCheckLayout(const LayoutCheckParams& p, cudaStream_t stream) {
  EPCOMM_KERNEL_CUDA_CHECK(cudaMemsetAsync(
      p.scratch, 0, sizeof(int32_t) * static_cast<size_t>(p.num_ranks + p.num_experts), stream));
  EPCOMM_KERNEL_CUDA_CHECK(
      cudaMemsetAsync(p.verdict, 0, sizeof(int32_t) * kLayoutVerdictWords, stream));
  const int64_t pairs = static_cast<int64_t>(p.num_tokens) * p.num_ranks;
  if (pairs > 0) {
    nodeCheckLayoutPairsKernel<<<static_cast<int>((pairs + kRowThreads - 1) / kRowThreads),
                                 kRowThreads, 0, stream>>>(p);
    EPCOMM_KERNEL_LAUNCH_CHECK(nodeCheckLayoutPairsKernel);
  }
  const int counts = p.num_ranks + p.num_experts;
  nodeCheckLayoutCountsKernel<<<(counts + kRowThreads - 1) / kRowThreads, kRowThreads, 0, stream>>>(
      p);
  EPCOMM_KERNEL_LAUNCH_CHECK(nodeCheckLayoutCountsKernel);
}

void launchNodeReduceWeights(const ReduceWeightsParams& p, cudaStream_t stream) {
  const int64_t entries = static_cast<int64_t>(p.tokens.num_tokens) * p.num_topk;
  if (entries == 0) return;
  nodeReduceWeightsKernel<<<static_cast<int>((entries + kRowThreads - 1) / kRowThreads),
                            kRowThreads, 0, stream>>>(p);
  EPCOMM_KERNEL_LAUNCH_CHECK(nodeReduceWeightsKernel);
}

}  // namespace epcomm::node
