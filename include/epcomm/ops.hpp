// SPDX-License-Identifier: Apache-2.0
// Arguments and results of the dispatch and combine operations.
//
// All pointers are device pointers unless a field says otherwise. Shapes are row-major and
// written [rows, columns]. Nothing here allocates: outputs are views into memory the EpBuffer or
// the EpHandle owns, valid until the next op of the same kind on that buffer or handle.
//
// Routing policy (HT and LL alike). topk_idx row t lists token t's experts:
//   - -1 means "no expert" for that entry.
//   - An expert id repeated within one token's row counts once: every repetition after the first
//     behaves exactly like -1. It is not counted (numTokensPerExpert, num_recv_tokens_per_expert),
//     the token reaches that expert once, the entry arrives as -1 with weight 0 in
//     DispatchResult::recv_topk_idx / recv_topk_weights, and its weight is not used by combine
//     (the first occurrence's weight is). So {e, e} with weights {w0, w1} is {e, -1} with {w0, w1}.
//   - An id outside [-1, num_experts) (for int64, also values that do not fit int32, e.g. 2^32) is
//     bad input. It is found on the device and never used as an address: the op in which it is
//     found fails on every rank within milliseconds (InvalidArgument naming the token on the rank
//     that passed it, ErrorCode::kRemote naming that rank on the others), reported by the next
//     call or sync(). The buffer is then unusable on every rank (recreate it). A bad id found by
//     EpBuffer::layout() (local) fails the next collective op the same way.
//
// Per-call parameters that must match across ranks. Every rank's call of the same op carries a
// signature of these; a mismatch fails the op on every rank (InvalidArgument naming the rank and
// the field, reported by sync() or the next call; the buffer is then unusable):
//   HT dispatch: dtype; whether top-k is sent (topk.idx set or topk.num_topk > 0); and, when it
//                is, topk.num_topk and topk.idx_type; expert_alignment. (hidden and num_experts
//                come from the BufferConfig, agreed at creation.)
//   LL dispatch: use_fp8.
//   LL combine:  whether LlCombineArgs::topk_weights is given, among ranks that dispatched
//                tokens (a rank with 0 tokens may pass it or not).
// Everything else may differ per rank: num_tokens (0 included; a rank with 0 tokens may pass
// topk.idx == nullptr but passes the same topk.num_topk and idx_type as the others), the pointers,
// x_scales strides, LL topk.num_topk, exact_count, the recv_*_out copies, num_sms, and the combine
// arguments (weights, bias). Every rank must issue the same sequence of collective ops.
#pragma once

#include <cstdint>

#include "epcomm/config.hpp"

namespace epcomm {

enum class DType {
  kBF16,     // 2 bytes per element
  kFP8E4M3,  // 1 byte per element plus one float32 scale per 128 columns
};

enum class IndexType { kInt32, kInt64 };

// ---------------------------------------------------------------------------------------------
// High-throughput (HT) mode
// ---------------------------------------------------------------------------------------------

// topk_idx [num_tokens, num_topk], int32 or int64; -1 means "no expert", a repeated id counts once
// and an id outside [-1, num_experts) fails the op (see "Routing policy" above). Expert e lives on
// rank e / (num_experts / num_ranks). idx may be nullptr when num_tokens is 0.
struct TopkView {
  const void* idx = nullptr;
  IndexType idx_type = IndexType::kInt64;
  int num_tokens = 0;
  int num_topk = 0;
};

struct DispatchArgs {
  // x [num_tokens, hidden] in `dtype`. For kFP8E4M3 also x_scales [num_tokens, hidden / 128]
  // float32 with element (t, c) at x_scales[t * scales_token_stride + c * scales_col_stride];
  // a token stride of 0 means hidden / 128 (row-major). Column-major scales work too.
  const void* x = nullptr;
  DType dtype = DType::kBF16;
  int num_tokens = 0;
  const float* x_scales = nullptr;
  int64_t scales_token_stride = 0;
  int64_t scales_col_stride = 1;

  // Routing. With topk.idx set, dispatch lays the routing out into the handle first. With
  // topk.idx == nullptr this is a cached dispatch: the handle's routing is reused (the handle
  // must hold a layout for the same num_tokens) and no top-k data is sent.
  TopkView topk;
  // Optional topk_weights [num_tokens, num_topk] float32, sent along when topk.idx is set.
  const float* topk_weights = nullptr;

  // Per-local-expert received counts are rounded up to a multiple of this. Same on every rank.
  int expert_alignment = 1;

  // Exact mode: block the host until the received-row count is known and return it in
  // DispatchResult::num_recv_tokens_host. Not capturable in a CUDA graph.
  bool exact_count = false;

  // Optional: also copy the received rows to these caller buffers ([capacity, hidden] and
  // [capacity, hidden / 128]); the copy covers the received rows only.
  void* recv_x_out = nullptr;
  float* recv_scales_out = nullptr;

  int num_sms = kAuto;  // SM budget of this call; kAuto = the buffer's default
};

struct DispatchResult {
  // Received rows, rank-major (all rows from rank 0 in its token order, then rank 1, ...).
  // Zero-copy views into the symmetric buffer, valid until the next HT dispatch.
  const void* recv_x = nullptr;              // [capacity, hidden] in the input dtype
  const float* recv_x_scales = nullptr;      // [capacity, hidden / 128] (FP8 only)
  const void* recv_topk_idx = nullptr;       // [capacity, num_topk] input index type, local
                                             // expert ids (-1 = expert on another rank, no
                                             // expert, or a repetition within the token)
  const float* recv_topk_weights = nullptr;  // [capacity, num_topk], 0 where the id is -1
  const int32_t* recv_src_idx = nullptr;     // [capacity] token index on the source rank

  // Device scalars and arrays, owned by the handle.
  const int32_t* num_recv_tokens = nullptr;             // [1]
  const int32_t* recv_rank_prefix = nullptr;            // [num_ranks + 1] row offsets by source
  const int32_t* num_recv_tokens_per_expert = nullptr;  // [num_local_experts], aligned

  int64_t num_recv_tokens_host = -1;  // exact mode only, else -1
  int64_t capacity = 0;               // rows the views can hold (num_ranks * max_tokens)

  // Where combine reads its input without a copy: write the expert outputs here as
  // [capacity, hidden] BF16, row i matching recv_x row i (symmetric memory).
  void* combine_input = nullptr;
};

struct CombineArgs {
  // x [num_recv_tokens, hidden] BF16: one row per received row of the matching dispatch. If x
  // is DispatchResult::combine_input no copy is made; otherwise the rows are first copied there.
  const void* x = nullptr;
  // Optional topk_weights [num_tokens, num_topk] float32 of the source tokens: the row from
  // rank r is scaled by the sum of the weights of the token's experts on rank r. Without
  // weights rows are summed as they are.
  const float* topk_weights = nullptr;
  // Optional bias [num_tokens, hidden] BF16, added once per token.
  const void* bias = nullptr;
  // out [num_tokens, hidden] BF16, original token order.
  void* out = nullptr;
  int num_sms = kAuto;
};

// ---------------------------------------------------------------------------------------------
// Low-latency (LL) mode
// ---------------------------------------------------------------------------------------------

// Which halves of an LL op to run. kSend returns once the data is on its way; kRecv waits for
// the peers and finishes the op. Running kSend, then other work, then kRecv lets the caller
// overlap compute with the transfer.
//
// Which half returns the result: every lowLatencyDispatch call (kSend, kRecv or kBoth) returns
// the same LlDispatchResult views (fixed addresses in the buffer), but their contents are the
// op's result only once the kRecv half has run on the stream: after a kSend-only call the
// views still hold whatever they held before (num_recv_tokens_per_expert reads 0 once the send
// half has run). Likewise lowLatencyCombine writes LlCombineArgs::out in its kRecv half only;
// `out` must be passed to that call (a kSend-only call ignores it).
//
// CUDA graphs: the views returned while capturing are the views of every replay (the addresses
// never change for the buffer's lifetime); after each replayed dispatch they hold that replay's
// result, until the next LL dispatch (replayed or not) starts. Results are valid across graph
// replays in this sense only: a replay overwrites the previous replay's result.
enum class LlPhase { kSend = 1, kRecv = 2, kBoth = 3 };

struct LlDispatchArgs {
  const void* x = nullptr;  // [num_tokens, hidden] BF16
  int num_tokens = 0;       // <= ll_max_tokens_per_rank
  TopkView topk;            // topk.num_tokens must equal num_tokens
  // Optional [num_tokens, num_topk] float32 router weights. Without them, the matching
  // lowLatencyCombine must be given LlCombineArgs::topk_weights (DeepEP's convention: weights
  // at combine). With both, the combine's are used.
  const float* topk_weights = nullptr;
  // FP8 (use_fp8): the row is cast to FP8 e4m3 with one float32 scale per 128 columns, the same
  // on every rank (checked: InvalidArgument on every rank otherwise). Convention
  // x ~= float(fp8) * scale, per 128-column block:
  //   amax = max |x| over the block (x as float32),
  //   scale = max(amax, 1e-4f) / 448.0f   (float32 division, round to nearest; NOT rounded to
  //                                          a power of two: no UE8M0 / round_scale option),
  //   fp8 = e4m3(x * (1.0f / scale))       (float32 reciprocal then product, each rounded to
  //                                          nearest, no FMA; saturating, round to nearest even).
  // So |float(fp8) * scale - x| <= |x| / 16 + scale / 1024 (3 mantissa bits; subnormal step
  // 2^-9), and the largest element of a block maps to +-448 (within rounding).
  bool use_fp8 = false;
  // Optional device int32 [num_local_experts]: the receive half adds this call's received
  // (token, local expert) rows per local expert to it (DeepEP's
  // cumulative_local_expert_recv_stats, for load balancing). Taken from the call that runs the
  // receive half (kRecv or kBoth); stream-ordered, atomic adds, never reset by the library.
  int32_t* cumulative_recv_counts = nullptr;
  int num_sms = kAuto;  // SM budget; kAuto = BufferConfig::ll_num_sms, else kDefaultLlSms
};

struct LlDispatchResult {
  // Expert-major: for local expert e, rows [0, num_recv_tokens_per_expert[e]) of
  // recv_x[e] are valid (row order within an expert is unspecified). Views into the
  // symmetric buffer, valid (after the kRecv half, see LlPhase) until the next LL dispatch
  // starts.
  const void* recv_x = nullptr;          // [num_local_experts, num_ranks * max_tokens, hidden]
                                         // BF16, or FP8 when use_fp8 (see LlDispatchArgs)
  const float* recv_x_scales = nullptr;  // [num_local_experts, num_ranks * max_tokens, hidden/128]
  const int32_t* num_recv_tokens_per_expert = nullptr;  // [num_local_experts]
  // src_rank * ll_max_tokens_per_rank + src_token for every valid row, same shape as rows.
  const int32_t* recv_src_info = nullptr;
  int64_t rows_per_expert = 0;  // num_ranks * ll_max_tokens_per_rank
};

struct LlCombineArgs {
  // Expert outputs [num_local_experts, num_ranks * max_tokens, hidden] BF16 in the layout of
  // LlDispatchResult::recv_x (only valid rows are read). Any device memory.
  const void* x = nullptr;
  // Optional topk_weights [num_tokens, num_topk] float32 for this rank's tokens of the matching
  // dispatch (same num_tokens and num_topk), as DeepEP's low_latency_combine takes them. When
  // given they are used instead of the dispatch's weights; required when the dispatch had none
  // (InvalidArgument otherwise: a silent unweighted sum would hide a forgotten argument; pass
  // ones for an unweighted sum). Whether they are given must match on every rank that dispatched
  // tokens (checked on the device: InvalidArgument on a rank that passed them, kRemote on the
  // others). Read by the kSend half. Cost: before its send the rank writes each token's weight
  // row to the ranks holding its experts (num_tokens * ranks-per-token * num_topk * 4 bytes),
  // and each rank's combine send waits until every rank has done so (docs/design.md §6).
  const float* topk_weights = nullptr;
  // out [num_tokens, hidden] BF16 for the tokens of the matching dispatch: the sum over the
  // token's experts of topk_weight * expert output. Each rank first sums its own experts'
  // weighted rows in float32 and sends that partial once, rounded to BF16 (one row per token and
  // rank, not per expert); the partials are summed in float32. Every token's row is written,
  // zeros for a token routed nowhere (all top-k ids -1). Written by the kRecv half.
  void* out = nullptr;
  int num_sms = kAuto;
};

}  // namespace epcomm
