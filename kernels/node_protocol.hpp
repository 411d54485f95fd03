// SPDX-License-Identifier: Apache-2.0
// What the hierarchical (scale-out) path's host code and its kernels (kernels/node_buckets.cu)
// agree on: the row one token carries to a rail peer, and where a global expert lives in the
// node-local buffer. Host and device; no CUDA runtime calls. docs/scale-out.md §3.
//
// Expert placement. Rank r owns experts [r*L, (r+1)*L), L = E / R, as on one node. Node m's
// intranode buffer has G ranks and E / M experts, its local rank j owning node experts
// [j*L, (j+1)*L). So global expert e, owned by rank r = e / L at (node_of[r], local_of[r]), is node
// expert local_of[r] * L + e % L of node node_of[r]. This holds for any rank placement
// (node-blocked or interleaved): nothing assumes node m owns a contiguous range of global ids.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EPCOMM_NODE_HD __host__ __device__ __forceinline__
#else
#define EPCOMM_NODE_HD inline
#endif

namespace epcomm::node {

// Nodes the hierarchical path supports (every node holds at least one rank, so at most
// kMaxRanks); sizes the combine reduction's per-token row table.
constexpr int kMaxNodes = 72;

// One bucket row (dispatch): the token's data, then (FP8) its scales, then max_topk global expert
// ids (int32; -1 = none, padding past the call's num_topk; an id outside [-1, E) travels as is,
// clamped to int32, so the forwarder's node dispatch rejects it), then max_topk float weights (0
// without weights). Rows are padded to 16 bytes so every row starts 16-byte aligned.
struct RowLayout {
  int64_t data_bytes = 0;    // hidden * element bytes
  int64_t scales_off = 0;    // FP8: hidden / 128 floats here; BF16: no scales (scales_bytes 0)
  int64_t scales_bytes = 0;  //
  int64_t ids_off = 0;       // max_topk int32
  int64_t weights_off = 0;   // max_topk float
  int64_t row_bytes = 0;     // multiple of 16
};

EPCOMM_NODE_HD int64_t alignUp16(int64_t v) {
  return (v + 15) / 16 * 16;
}

// element_bytes: 2 (BF16) or 1 (FP8, with one float scale per 128 columns).
EPCOMM_NODE_HD RowLayout rowLayout(int hidden, int element_bytes, int max_topk) {
  RowLayout l;
  l.data_bytes = static_cast<int64_t>(hidden) * element_bytes;
  l.scales_off = l.data_bytes;
  l.scales_bytes = element_bytes == 1 ? static_cast<int64_t>(hidden / 128) * 4 : 0;
  l.ids_off = l.scales_off + l.scales_bytes;
  l.weights_off = l.ids_off + static_cast<int64_t>(max_topk) * 4;
  l.row_bytes = alignUp16(l.weights_off + static_cast<int64_t>(max_topk) * 4);
  return l;
}

// True when global expert id e is a real expert (not -1, not out of range).
EPCOMM_NODE_HD bool validExpert(int64_t e, int num_experts) {
  return e >= 0 && e < num_experts;
}

// The node that owns valid global expert e.
EPCOMM_NODE_HD int nodeOfExpert(int64_t e, int experts_per_rank, const int32_t* node_of) {
  return node_of[e / experts_per_rank];
}

// The id node `node` gives global expert id e in its node-local buffer: the node expert for an
// expert it owns, -1 for -1 and for an expert of another node, and for an invalid id an id its
// node-local buffer rejects (the id itself clamped to int32; it is < -1 or >= E >= E / M).
EPCOMM_NODE_HD int64_t nodeLocalExpert(int64_t e, int node, int num_experts, int experts_per_rank,
                                       const int32_t* node_of, const int32_t* local_of) {
  if (e == -1) return -1;
  if (!validExpert(e, num_experts)) return e;
  const int64_t r = e / experts_per_rank;
  if (node_of[r] != node) return -1;
  return static_cast<int64_t>(local_of[r]) * experts_per_rank + e % experts_per_rank;
}

// An int64 id as it travels in a row (int32): unchanged when it fits, else the nearest int32
// (still invalid: every valid id fits).
EPCOMM_NODE_HD int32_t clampId(int64_t e) {
  return e > INT32_MAX ? INT32_MAX : (e < INT32_MIN ? INT32_MIN : static_cast<int32_t>(e));
}

}  // namespace epcomm::node
