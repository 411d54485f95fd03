// SPDX-License-Identifier: Apache-2.0
// Launchers of the hierarchical path's small kernels (kernels/node_buckets.cu), compiled into
// epcomm_nccl only: bucket the tokens by destination node, pack and unpack bucket rows, gather
// weight rows in bucket order, and sum the node partials of combine. Host code; the row layout and
// the expert mapping they share with the host are in kernels/node_protocol.hpp.
//
// Bucket layouts (the rail transport's, nccl/rail_exchange.hpp): exact, node-major compact (the
// rows for node m start at the sum of the counts of nodes < m); worst-case, node m's rows start
// at m * max_rows. Within a bucket the tokens keep their order (slot = tokens before it in it).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/node_protocol.hpp"

namespace epcomm::node {

struct BucketParams {
  const void* topk_idx;  // [num_tokens, num_topk] int32 or int64; may be nullptr if num_tokens 0
  int32_t idx_is_64;
  int32_t num_tokens;
  int32_t num_topk;
  int32_t num_experts;
  int32_t experts_per_rank;
  const int32_t* node_of;  // device [num_ranks]
  int32_t num_nodes;
  int32_t* slot;    // out [num_tokens, num_nodes]: row of the token in node m's bucket, or -1
  int32_t* counts;  // out [num_nodes]: rows per bucket
};
// A token goes to node m when one of its ids is an expert of m; a token with an invalid id goes
// to every node (so every node's dispatch rejects it). One block per node.
void launchNodeBuckets(const BucketParams& p, cudaStream_t stream);

struct PackParams {
  const uint8_t* x;       // [num_tokens, hidden] BF16 or FP8
  const float* x_scales;  // FP8: element (t, c) at t * scales_token_stride + c * scales_col_stride
  int64_t scales_token_stride;
  int64_t scales_col_stride;
  int32_t num_scales;  // hidden / 128 for FP8, else 0
  const void* topk_idx;
  int32_t idx_is_64;
  const float* topk_weights;  // may be nullptr (weights travel as 0)
  int32_t num_tokens;
  int32_t num_topk;
  int32_t max_topk;  // ids / weights slots in the row; past num_topk: -1 / 0
  RowLayout row;
  const int32_t* slot;    // [num_tokens, num_nodes]
  const int32_t* counts;  // [num_nodes]
  int32_t num_nodes;
  int32_t max_rows;  // > 0: worst-case layout (node m at m * max_rows); 0: exact
  uint8_t* send;     // out: bucket rows
};
void launchNodePack(const PackParams& p, cudaStream_t stream);

struct UnpackParams {
  const uint8_t* recv;  // rows from every source node (either layout: row i at i * row_bytes)
  RowLayout row;
  int32_t rows;      // exact: rows received; worst-case: num_nodes * max_rows
  int32_t max_rows;  // > 0: worst-case, row i valid iff i % max_rows < recv_counts[i / max_rows]
  const int32_t* recv_counts;  // worst-case only: device [num_nodes]
  int32_t num_topk;            // ids / weights columns written
  int32_t node;                // this forwarder's node
  int32_t num_experts;
  int32_t experts_per_rank;
  const int32_t* node_of;
  const int32_t* local_of;
  // outputs, [rows, ...]
  uint8_t* x;       // [rows, hidden] (data_bytes per row)
  float* x_scales;  // [rows, num_scales] FP8 only, else nullptr
  void* topk_idx;   // [rows, num_topk] node-local ids (nodeLocalExpert), int32 or int64
  int32_t idx_is_64;
  float* topk_weights;  // [rows, num_topk]
};
// Invalid (worst-case, unused) rows get ids -1 and weights 0; their data is left as it was.
void launchNodeUnpack(const UnpackParams& p, cudaStream_t stream);

struct GatherParams {
  const float* src;  // [num_tokens, src_cols] float32 (e.g. combine-time top-k weights)
  int32_t src_cols;
  int32_t num_tokens;
  int32_t row_floats;  // floats per bucket row (>= src_cols; the rest are written 0)
  const int32_t* slot;
  const int32_t* counts;
  int32_t num_nodes;
  int32_t max_rows;  // as PackParams
  float* dst;
};
// Bucket rows of float32 weights, in the buckets' order (for combine-time weights).
void launchNodeGather(const GatherParams& p, cudaStream_t stream);

// Where the tokens of one dispatch sit in its bucket layout (what combine reads back).
struct TokenRows {
  const int32_t* slot;    // [num_tokens, num_nodes]
  const int32_t* counts;  // [num_nodes] bucket counts (exact layout offsets)
  int32_t num_nodes;
  int32_t max_rows;  // as PackParams
  int32_t num_tokens;
};

struct ReduceParams {
  const uint16_t* partials;  // BF16 [rows, hidden]: node m's partial of its bucket row j at
                             // (first row of node m) + j, in the bucket layout
  TokenRows tokens;
  int32_t hidden;
  const uint16_t* bias;  // BF16 [num_tokens, hidden] or nullptr
  uint16_t* out;         // BF16 [num_tokens, hidden]
};
// out[t] = bias[t] + sum over the nodes t went to (in node order) of its node partial, in
// float32, rounded to BF16 once. A token that went nowhere gets its bias, or zeros.
void launchNodeReduce(const ReduceParams& p, cudaStream_t stream);

struct LayoutCheckParams {
  const void* topk_idx;  // [num_tokens, num_topk] int32 or int64
  int32_t idx_is_64;
  int32_t num_tokens;
  int32_t num_topk;
  int32_t num_experts;
  int32_t experts_per_rank;
  int32_t num_ranks;
  const bool* in_rank;           // DispatchLayout::is_token_in_rank [num_tokens, num_ranks]
  const int32_t* rank_counts;    // DispatchLayout::num_tokens_per_rank [num_ranks]
  const int32_t* expert_counts;  // DispatchLayout::num_tokens_per_expert [num_experts]
  int32_t* scratch;              // [num_ranks + num_experts], zeroed by the launcher
  int32_t* verdict;              // [kLayoutVerdictWords], zeroed by the launcher
};
// The verdict of launchNodeCheckLayout: kind (0 = the layout is the routing topk gives), the index
// of the first differing entry found, its value in the layout and the value topk gives.
enum LayoutFault : int32_t {
  kLayoutOk = 0,
  kLayoutInRank = 1,       // index = token * num_ranks + rank
  kLayoutRankCount = 2,    // index = rank
  kLayoutExpertCount = 3,  // index = expert
};
constexpr int kLayoutVerdictWords = 4;
// Checks a caller's DispatchLayout against the routing of `topk_idx` (a token goes to the ranks of
// its effective experts: -1 and repeated ids do not count; invalid ids are left to the dispatch,
// which rejects them). Two launches on `stream`; the verdict is valid after them.
void launchNodeCheckLayout(const LayoutCheckParams& p, cudaStream_t stream);

struct ReduceWeightsParams {
  const float* partials;  // float32 [rows, num_topk]: node m's sum for its bucket row j at
                          // (first row of node m) + j, in the bucket layout
  TokenRows tokens;
  int32_t num_topk;
  float* out;  // float32 [num_tokens, num_topk]
};
// out[t][k] = sum over the nodes t went to (in node order, float32) of its node's entry k; 0 for
// a token that went nowhere (combine's combined_topk_weights across nodes).
void launchNodeReduceWeights(const ReduceWeightsParams& p, cudaStream_t stream);

}  // namespace epcomm::node
