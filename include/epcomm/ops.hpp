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
//                is, topk.num_topk and topk.idx_type; expert_alignment; expert_major. (hidden and
//                num_experts come from the BufferConfig, agreed at creation.)
//   LL dispatch: use_fp8.
//   HT combine: whether CombineArgs::recv_topk_weights is set (every rank pulls the others'
//               rows), and then the handle's num_topk.
//   LL combine:  whether LlCombineArgs::topk_weights is given, among ranks that dispatched
//                tokens (a rank with 0 tokens may pass it or not).
// Everything else may differ per rank: num_tokens (0 included; a rank with 0 tokens may pass
// topk.idx == nullptr but passes the same topk.num_topk and idx_type as the others), the pointers,
// x_scales strides, LL topk.num_topk, exact_count, the recv_*_out copies, num_sms, and the other
// combine arguments (scale_weights, bias). Also free per rank: where HT dispatch takes its
// routing from (topk, DispatchArgs::layout, or the handle of a cached dispatch: each rank routes
// its own tokens and only the counts travel) and DispatchArgs::num_worst_tokens (it shapes this
// rank's outputs only).
// Every rank must issue the same sequence of collective ops.
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

// A precomputed routing (DeepEP's get_dispatch_layout outputs), device arrays. R = num_ranks,
// E = num_experts, N = DispatchArgs::num_tokens. EpHandle::numTokensPerRank(), isTokenInRank()
// and numTokensPerExpert() after EpBuffer::layout() are such a layout.
struct DispatchLayout {
  // [R] tokens this rank sends to each rank. Must equal the column sums of is_token_in_rank.
  const int32_t* num_tokens_per_rank = nullptr;
  // [N, R] bool (one byte each, non-zero = true): token t goes to rank r. May be nullptr only
  // when N == 0.
  const bool* is_token_in_rank = nullptr;
  // [E] (token, expert) pairs of this rank's tokens per expert, each counted once per token.
  // Entry e must lie in [0, num_tokens_per_rank[rank of e]]; with topk.idx set it must equal
  // what topk.idx gives (EpBuffer::layout's numTokensPerExpert(): repeated ids count once).
  // The receivers' num_recv_tokens_per_expert are the sums of these entries.
  const int32_t* num_tokens_per_expert = nullptr;
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

  // Routing, one of three sources (each rank may use a different one):
  //  - `layout` set (any of its pointers; then num_tokens_per_rank and num_tokens_per_expert are
  //    required, and is_token_in_rank unless num_tokens == 0): rows go where
  //    layout.is_token_in_rank says, the receivers count layout.num_tokens_per_expert. With
  //    topk.idx set too, top-k ids (re-based) and weights are sent as below, and every expert a
  //    token names must live on a rank it goes to. The layout is checked on the device (the
  //    sums, every bound, and against topk.idx when set); an inconsistent layout fails the op on
  //    every rank like a bad expert id (InvalidArgument naming the field on this rank). The
  //    handle then holds this routing (for combine and cached dispatches).
  //  - topk.idx set, no layout: dispatch lays the routing out into the handle first.
  //  - neither: a cached dispatch. The handle's routing (from EpBuffer::layout(), or from the
  //    last dispatch that had a layout or top-k) is reused; the handle must hold a routing for
  //    the same num_tokens. No top-k data is sent; the handle's per-expert counts are sent again
  //    and aligned with this call's expert_alignment.
  TopkView topk;
  DispatchLayout layout;
  // Optional topk_weights [num_tokens, num_topk] float32, sent along when topk.idx is set.
  // Without them DispatchResult::recv_topk_weights holds 0.0f in every received entry.
  const float* topk_weights = nullptr;

  // Per-local-expert received counts are rounded up to a multiple of this. Same on every rank.
  int expert_alignment = 1;

  // Static shapes (DeepEP's num_worst_tokens), 0 = off. With n > 0 (n <= capacity, may differ
  // per rank) rows [num_recv_tokens, n) of every result view are written too: recv_x and
  // recv_x_scales 0, recv_topk_idx -1, recv_topk_weights 0, recv_src_idx -1; recv_x_out and
  // recv_scales_out get n rows. Receiving more than n rows fails the op on every rank
  // (InvalidArgument naming num_worst_tokens on the receiving rank, kRemote on the others; the
  // buffer is then unusable). Costs no host sync: graph-capturable. The counts
  // (num_recv_tokens, recv_rank_prefix, per-expert) still give the real rows.
  int num_worst_tokens = 0;

  // Expert-major output (same on every rank). The received rows are grouped by local expert so
  // a grouped GEMM runs on recv_x without a permute:
  //   - group e (local expert e) holds one row per (token, expert e) pair this rank receives: a
  //     token with two experts on this rank arrives twice here, once in each group;
  //   - group e starts at row DispatchResult::expert_offsets[e] (a multiple of expert_alignment)
  //     and spans num_recv_tokens_per_expert[e] rows (the pair count rounded up to
  //     expert_alignment); expert_offsets[num_local_experts] == *num_recv_tokens;
  //   - within a group, the rows of source rank 0 come first, then those of rank 1, ...; the
  //     order of one source's rows within a group is NOT defined: each dispatch call sets it on
  //     the device (atomics) and records it in the handle, so the combine with that handle reads
  //     the right rows; two calls with the same routing (a cached re-dispatch included) may order
  //     them differently (match rows by recv_src_idx, unique within one source's part); then the
  //     padding rows;
  //   - a padding row holds zero data (and zero scales), recv_src_idx -1, top-k ids -1 and
  //     weights 0;
  //   - recv_topk_idx / recv_topk_weights keep their [rows, num_topk] shape: a pair row holds its
  //     own entry k (the local expert id e, and that entry's weight) and -1 / 0 in every other
  //     column. So the row's weight is the sum of its weight row, and summing weight rows per
  //     token gives each k's weight exactly once (as rank-major does);
  //   - recv_rank_prefix is nullptr (rows are not grouped by source).
  // The routing must come from top-k (topk.idx set, or a cached dispatch on a handle laid out
  // from top-k). Rows needed = sum over local experts of the aligned pair counts; more than
  // BufferConfig::ht_recv_rows fails the call on every rank (see there; the buffer is then
  // unusable). Combine with a handle dispatched expert-major reads this layout (CombineArgs).
  // Dispatch from top-k only (it needs each token's experts); exact_count, recv_x_out and FP8
  // work as in rank-major.
  bool expert_major = false;

  // Exact mode: block the host until the received-row count is known and return it in
  // DispatchResult::num_recv_tokens_host (and the per-expert counts in
  // num_recv_tokens_per_expert_host). Not capturable in a CUDA graph. The wait is bounded by
  // the buffer's deadline (TimeoutError).
  bool exact_count = false;

  // Optional: also copy the received rows to these caller buffers ([capacity, hidden] and
  // [capacity, hidden / 128]); the copy covers the received rows only (num_worst_tokens rows
  // when that is set).
  void* recv_x_out = nullptr;
  float* recv_scales_out = nullptr;
  // Optional, with topk.idx only: likewise for the received top-k rows, [rows, num_topk] in
  // topk.idx's index type and float32, contiguous (what DispatchResult::recv_topk_idx /
  // recv_topk_weights hold, padding rows included with num_worst_tokens). All the caller copies
  // of one call are one kernel launch, queued after the dispatch on its stream.
  void* recv_topk_idx_out = nullptr;
  float* recv_topk_weights_out = nullptr;

  int num_sms = kAuto;  // SM budget of this call; kAuto = the buffer's default
};

// Validity of the views. Every pointer below is the same on every call with the same buffer and
// handle (zero-copy views into the symmetric buffer, or arrays the handle owns), so pointers
// taken from a dispatch that was captured in a CUDA graph stay right for every replay: after a
// replay they show that replay's results. The contents are valid from the dispatch (or replay)
// until the next HT dispatch on the buffer (recv_* views) or on the handle (counts). Combine
// does not change them.
struct DispatchResult {
  // Received rows, rank-major (all rows from rank 0 in its token order, then rank 1, ...).
  // Zero-copy views into the symmetric buffer. Rows [0, num_recv_tokens) are valid (and up to
  // num_worst_tokens with static shapes, see DispatchArgs).
  const void* recv_x = nullptr;              // [capacity, hidden] in the input dtype
  const float* recv_x_scales = nullptr;      // [capacity, hidden / 128] (FP8 only)
  const void* recv_topk_idx = nullptr;       // [capacity, num_topk] input index type, local
                                             // expert ids (-1 = expert on another rank, no
                                             // expert, or a repetition within the token);
                                             // nullptr when no top-k was sent
  const float* recv_topk_weights = nullptr;  // [capacity, num_topk], 0 where the id is -1, and
                                             // 0 everywhere when dispatch had no topk_weights
  const int32_t* recv_src_idx = nullptr;     // [capacity] token index on the source rank

  // Device scalars and arrays, owned by the handle.
  const int32_t* num_recv_tokens = nullptr;             // [1]
  const int32_t* recv_rank_prefix = nullptr;            // [num_ranks + 1] row offsets by source
  const int32_t* num_recv_tokens_per_expert = nullptr;  // [num_local_experts], aligned
  // expert_major only, else nullptr: [num_local_experts + 1] first row of each local expert's
  // group (multiples of expert_alignment); the last entry is the number of rows. Device, owned
  // by the handle.
  const int32_t* expert_offsets = nullptr;

  int64_t num_recv_tokens_host = -1;  // exact mode only, else -1
  // Exact mode only, else nullptr: host memory owned by the handle, [num_local_experts], the
  // same values as num_recv_tokens_per_expert (aligned). Valid until the next dispatch with the
  // handle.
  const int32_t* num_recv_tokens_per_expert_host = nullptr;
  // Rows the views can hold: BufferConfig::ht_recv_rows, by default exactly num_ranks *
  // max_tokens_per_rank (every rank sending all its tokens to one rank fits in rank-major).
  int64_t capacity = 0;

  // Where combine reads its input without a copy: write the expert outputs here as
  // [capacity, hidden] BF16, row i matching recv_x row i (symmetric memory).
  void* combine_input = nullptr;
};

struct CombineArgs {
  // x [num_recv_tokens, hidden] BF16: one row per received row of the matching dispatch. If x
  // is DispatchResult::combine_input (zero-copy) the token owners pull the rows from there.
  // Otherwise (copy-in: any other device memory, not a row inside the combine input) each
  // rank pushes the rows it holds into their owners' combine inputs (rank-major handles with
  // num_sms >= 2), or copies the rows the other ranks read into its own combine input first (an
  // expert-major handle, num_sms 1, EPCOMM_PERF without ht_push_combine). Every rank of a combine
  // passes x alike: all zero-copy or all copy-in (a mix fails on every rank, naming the field),
  // and a copy-in combine leaves this rank's combine input overwritten. x must stay unchanged
  // until the combine completes on its stream.
  const void* x = nullptr;
  // !!! Porting from DeepEP: leave scale_weights null. DeepEP's combine does NOT weight the
  // rows (the expert outputs arrive already weighted, or the caller weights after combine); set
  // this as well and the weights are applied twice. !!!
  // Optional scale_weights [num_tokens, num_topk] float32 of the source tokens (token side, as
  // given to dispatch's topk): the row from rank r is scaled by the sum of the weights of the
  // token's experts on rank r. Needs a handle laid out with top-k. Without it rows are summed as
  // they are.
  // Expert-major handle (DispatchArgs::expert_major): x holds one row per (token, local expert)
  // pair in the dispatch's row order (padding rows are never read); token t's output is the sum
  // over its top-k entries k with a valid expert of scale_weights[t][k] (1 without them) times
  // the row of (t, expert k), in float32, plus bias.
  const float* scale_weights = nullptr;
  // Optional bias [num_tokens, hidden] BF16, added once per token.
  const void* bias = nullptr;
  // out [num_tokens, hidden] BF16, original token order. Every token's row is written: a token
  // that went to no rank gets its bias row, or zeros without bias.
  void* out = nullptr;

  // Optional, both or neither (DeepEP's combined_topk_weights, the backward of
  // DispatchResult::recv_topk_weights; router-weight gradients need it):
  // recv_topk_weights [num_recv_tokens, num_topk] float32, one row per received row as
  // dispatch delivered them (any device memory; DispatchResult::recv_topk_weights itself is
  // read in place, other memory has the rows the other ranks read first copied into the
  // buffer), and combined_topk_weights [num_tokens, num_topk] float32 out: entry (t, k) = the
  // sum, over the ranks token t went to (in rank order, float32), of that rank's
  // recv_topk_weights entry (row of t, k). Written for every token (0 for a token that went
  // nowhere). num_topk is the handle's (the top-k of its layout); needs a handle laid out with
  // top-k. Set on every rank or on none (checked: a mismatch fails the combine on every rank),
  // since each rank reads the others' rows.
  const float* recv_topk_weights = nullptr;
  float* combined_topk_weights = nullptr;

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
  // SM budget; kAuto = BufferConfig::ll_num_sms, else sized to this rank's batch (a block per two
  // (token, top-k entry) pairs per rank, at least 32, at most every SM).
  int num_sms = kAuto;
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
  int num_sms = kAuto;  // as LlDispatchArgs::num_sms, for the matching dispatch's batch
};

}  // namespace epcomm
