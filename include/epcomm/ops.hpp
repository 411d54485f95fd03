// Arguments and results of the dispatch and combine operations.
//
// All pointers are device pointers unless a field says otherwise. Shapes are row-major and
// written [rows, columns]. Nothing here allocates: outputs are views into memory the EpBuffer or
// the EpHandle owns, valid until the next op of the same kind on that buffer or handle.
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

// topk_idx [num_tokens, num_topk], int32 or int64; -1 means "no expert". Expert e lives on rank
// e / (num_experts / num_ranks).
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

  // Per-local-expert received counts are rounded up to a multiple of this.
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
  const void* recv_x = nullptr;            // [capacity, hidden] in the input dtype
  const float* recv_x_scales = nullptr;    // [capacity, hidden / 128] (FP8 only)
  const void* recv_topk_idx = nullptr;     // [capacity, num_topk] input index type, local
                                           // expert ids (-1 = expert on another rank)
  const float* recv_topk_weights = nullptr;  // [capacity, num_topk], 0 where the id is -1
  const int32_t* recv_src_idx = nullptr;   // [capacity] token index on the source rank

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
enum class LlPhase { kSend = 1, kRecv = 2, kBoth = 3 };

struct LlDispatchArgs {
  const void* x = nullptr;  // [num_tokens, hidden] BF16
  int num_tokens = 0;       // <= ll_max_tokens_per_rank
  TopkView topk;            // topk.num_tokens must equal num_tokens
  const float* topk_weights = nullptr;  // [num_tokens, num_topk] float32, required
  bool use_fp8 = false;     // cast to FP8 e4m3 with one float32 scale per 128 columns
  int num_sms = kAuto;
};

struct LlDispatchResult {
  // Expert-major: for local expert e, rows [0, num_recv_tokens_per_expert[e]) of
  // recv_x[e] are valid (row order within an expert is unspecified). Views into the
  // symmetric buffer, valid until the next LL dispatch starts.
  const void* recv_x = nullptr;          // [num_local_experts, num_ranks * max_tokens, hidden]
                                         // BF16, or FP8 when use_fp8
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
  // out [num_tokens, hidden] BF16 for the tokens of the matching dispatch: the sum over the
  // token's experts of topk_weight * expert output (weights as given to the dispatch). Each rank
  // first sums its own experts' weighted rows in float32 and sends that partial once, rounded to
  // BF16 (one row per token and rank, not per expert); the partials are summed in float32.
  void* out = nullptr;
  int num_sms = kAuto;
};

}  // namespace epcomm
