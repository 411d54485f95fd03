// SPDX-License-Identifier: Apache-2.0
// The CPU reference model of the dispatch and combine ops (docs/design.md §5, §6, §8).
//
// Written from the op semantics in include/epcomm/ops.hpp, independently of the kernels: plain
// loops over tokens, no shared code with src/ or kernels/. Experts are split evenly: rank r owns
// experts [r*L, (r+1)*L) with L = num_experts / num_ranks; expert id -1 means "no expert"; a token
// goes to a rank at most once however many of its experts live there. An expert id repeated in
// one token's top-k counts once: every repetition after the first behaves exactly like -1 (not
// counted, not sent, -1 with weight 0 in the received top-k, its weight unused by combine).
//
// Every function takes the inputs of ALL ranks (from generateProblem() or built by hand) and
// returns what ONE rank should see. All functions throw std::invalid_argument on inconsistent
// arguments (sizes, expert ids out of range).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "common/test_data.hpp"

namespace epcomm::test {

// The expert entry k of one token stands for under the routing policy: token_ids[k] itself, or -1
// when it is -1 or repeats an earlier entry token_ids[j], j < k.
int64_t effectiveExpert(const int64_t* token_ids, int k);

// ----- layout --------------------------------------------------------------------------------

struct LayoutRef {
  std::vector<int> tokens_per_rank;       // [R] tokens sent to each rank
  std::vector<int> tokens_per_expert;     // [E] (token, expert) pairs per expert
  std::vector<uint8_t> is_token_in_rank;  // [N*R] 1 if token t is sent to rank r
  std::vector<int> token_slot;            // [N*R] tokens t' < t sent to r, or -1 if t is not
};

LayoutRef referenceLayout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts,
                          int num_ranks);

// ----- HT dispatch / combine ----------------------------------------------------------------

// What destination rank d receives. Rows are rank-major: all rows of source 0 in increasing token
// order, then source 1, ...
struct HtDispatchRef {
  int num_recv = 0;
  std::vector<int> rank_prefix;          // [R+1] row offset of each source; [R] = num_recv
  std::vector<int> src_rank, src_token;  // [num_recv]
  std::vector<uint16_t> recv_x_bf16;     // [num_recv*H]
  std::vector<uint8_t> recv_x_fp8;       // [num_recv*H]
  std::vector<float> recv_scales;        // [num_recv*H/128]
  std::vector<int64_t> recv_topk_idx;    // [num_recv*K] e - d*L if expert e is on d, else -1
  std::vector<float> recv_topk_weights;  // [num_recv*K] the weight where local, else 0.0f
  std::vector<int> recv_src_idx;         // [num_recv] token index on the source rank
  // [L] (row, k) pairs naming each local expert, rounded up to a multiple of expert_alignment.
  std::vector<int> tokens_per_local_expert;
};

HtDispatchRef referenceHtDispatch(const std::vector<RankInputs>& all, int dst_rank, int hidden,
                                  int num_experts, int num_topk, int expert_alignment);

// Dispatch from a caller's layout (DispatchArgs::layout), one LayoutRef per source rank (only
// tokens_per_rank, is_token_in_rank and tokens_per_expert are read; build one by hand or take
// referenceLayout's). Rows go where is_token_in_rank says; the per-local-expert counts are the
// sums of the sources' tokens_per_expert, aligned. With with_topk the received top-k is the
// sources' topk_idx re-based as in referenceHtDispatch; without it recv_topk_idx and
// recv_topk_weights are empty. Throws std::invalid_argument if a layout is inconsistent (a
// tokens_per_rank entry that is not the column sum, a tokens_per_expert entry outside
// [0, tokens_per_rank of its rank], wrong sizes): the device must reject those.
HtDispatchRef referenceHtDispatchFromLayout(const std::vector<RankInputs>& all,
                                            const std::vector<LayoutRef>& layouts, int dst_rank,
                                            int hidden, int num_experts, int num_topk,
                                            bool with_topk, int expert_alignment);

// Static shapes (DispatchArgs::num_worst_tokens): appends rows [num_recv, num_worst_tokens) as
// the GPU fills them: zero x (bf16 and fp8), zero scales, src_rank/src_token/recv_src_idx -1,
// and, with num_topk > 0 (0: the dispatch sent no top-k), ids -1 with weight 0. num_recv and
// rank_prefix stay (the real rows). Throws std::invalid_argument if num_recv > num_worst_tokens.
void padToWorstTokens(HtDispatchRef& ref, int num_worst_tokens, int hidden, int num_topk);

// CombineArgs::combined_topk_weights of source rank s, [N_s * num_topk]:
//   combined[t][k] = sum over ranks d that token t was sent to, in increasing d, of
//                    recv_weights[d][(row of (s, t) on d) * num_topk + k]
// accumulated in float32 from 0.0f (the GPU's order, so compare exactly); 0 for a token sent
// nowhere. `layouts` is the routing of every source (referenceLayout's or a caller's layout);
// recv_weights[d] holds at least num_recv_d rows of num_topk floats.
std::vector<float> referenceCombinedTopkWeights(const std::vector<LayoutRef>& layouts, int src_rank,
                                                const std::vector<std::vector<float>>& recv_weights,
                                                int num_topk);

// Every source's layout as the ops compute it from topk_idx (referenceLayout per rank).
std::vector<LayoutRef> referenceLayouts(const std::vector<RankInputs>& all, int num_experts,
                                        int num_topk);

// What source rank s gets back from combine, [N_s*H] as float (the GPU writes bf16):
//   out[t][c] = sum over ranks d that token t was sent to of w_d(t) * y_d[row of (s, t) on d][c]
//               + bias[t][c]
// with w_d(t) = the sum of topk_weights[t][k] over the k whose expert lives on d when `weighted`,
// else 1. combine_inputs[d] holds d's expert outputs as bf16 rows in d's dispatch row order (at
// least num_recv_d rows; extra rows, e.g. a whole capacity-sized buffer, are ignored). bias is
// [N_s*H] bf16 or nullptr. Accumulated in double: this is the exact answer, compare with a
// tolerance (kCombineAtol / kCombineRtol).
// `routing`: the layouts the dispatch used (referenceHtDispatchFromLayout); nullptr = the routing
// of topk_idx. The weights (`weighted`) always come from topk_idx / topk_weights.
std::vector<float> referenceHtCombine(const std::vector<RankInputs>& all, int src_rank,
                                      const std::vector<std::vector<uint16_t>>& combine_inputs,
                                      int hidden, int num_experts, int num_topk, bool weighted,
                                      const uint16_t* bias,
                                      const std::vector<LayoutRef>* routing = nullptr);

// ----- HT expert-major dispatch / combine (DispatchArgs::expert_major) ----------------------

// What destination rank d receives in expert-major mode. Group l (local expert l) starts at
// expert_offsets[l] (a multiple of expert_alignment) and holds one row per (token, expert l)
// pair: the part of source 0, then of source 1, ..., then padding up to the aligned size. Within
// one source's part the op's row order is not defined; the reference lists it by increasing
// token. part_begin[l * (R + 1) + s] is the first row of source s's part of group l;
// part_begin[l * (R + 1) + R] is the first padding row of group l.
struct HtExpertMajorRef {
  int num_rows = 0;                          // padding included; == expert_offsets[L]
  std::vector<int> expert_offsets;           // [L + 1]
  std::vector<int> tokens_per_local_expert;  // [L] aligned group sizes
  std::vector<int> pairs_per_local_expert;   // [L] pairs (unaligned)
  std::vector<int> part_begin;               // [L * (R + 1)]
  // Per row, in the reference order: source rank, source token and top-k column k of the pair
  // (all -1 for padding rows).
  std::vector<int> src_rank, src_token, topk_col;
};

HtExpertMajorRef referenceHtDispatchExpertMajor(const std::vector<RankInputs>& all, int dst_rank,
                                                int num_experts, int num_topk,
                                                int expert_alignment);

// Host copies of an expert-major dispatch result on one rank (rows = the GPU's row count).
struct HtExpertMajorView {
  int num_rows = 0;                            // *num_recv_tokens
  const int32_t* expert_offsets = nullptr;     // [L + 1]
  const int32_t* tokens_per_expert = nullptr;  // [L] num_recv_tokens_per_expert
  const int32_t* src_idx = nullptr;            // [num_rows] recv_src_idx
  const uint16_t* x_bf16 = nullptr;            // [num_rows, hidden] BF16 dispatch, else nullptr
  const uint8_t* x_fp8 = nullptr;              // [num_rows, hidden] FP8 dispatch, else nullptr
  const float* scales = nullptr;               // [num_rows, hidden / 128] FP8 only
  const int64_t* topk_idx = nullptr;           // [num_rows, num_topk] (as int64) or nullptr
  const float* topk_weights = nullptr;         // [num_rows, num_topk] or nullptr
};

// Checks an expert-major dispatch on rank `dst_rank` against `ref`: offsets, sizes and row
// count; per (group, source) part the multiset of source tokens; every pair row's data (bit
// exact), scales, top-k row (its own column k: local id and weight, others -1 and 0) and source
// index; every padding row zero with src -1, ids -1, weights 0. On success, *row_origin (if not
// null) gets, per GPU row, the index of the matching reference row (-1 for padding), so a caller
// can name each GPU row's (source rank, token, k).
::testing::AssertionResult checkHtExpertMajorRows(const std::vector<RankInputs>& all,
                                                  const HtExpertMajorRef& ref,
                                                  const HtExpertMajorView& actual, int dst_rank,
                                                  int num_experts, int hidden, int num_topk,
                                                  std::vector<int>* row_origin = nullptr);

// What source rank s gets back from an expert-major combine, [N_s*hidden] as float:
//   out[t][c] = sum over k (valid entry under the routing policy, expert e_k) of
//               w * expert_output(e_k, s, t, c) + bias[t][c]
// with w = topk_weights[t][k] when `weighted`, else 1. Accumulated in double.
std::vector<float> referenceHtCombineExpertMajor(
    const std::vector<RankInputs>& all, int src_rank, int num_experts, int num_topk,
    const std::function<float(int global_expert, int src_rank, int src_token, int col)>&
        expert_output,
    int hidden, bool weighted, const uint16_t* bias);

// ----- LL dispatch / combine ----------------------------------------------------------------

// The rows one local expert receives. The row order within an expert is not defined, so this is
// a multiset; referenceLlDispatch() returns it sorted by (src_rank, src_token).
struct LlExpertRows {
  std::vector<int> src_rank, src_token;
};

struct LlDispatchRef {
  std::vector<LlExpertRows> per_local_expert;  // [L]
};

LlDispatchRef referenceLlDispatch(const std::vector<RankInputs>& all, int dst_rank, int num_experts,
                                  int num_topk);

// The BF16 -> FP8 cast that the LL dispatch kernel performs; the GPU must match it bit for bit.
// Per 128-column block: amax = max |x|; scale = fmaxf(amax, 1e-4f) / 448.0f; inv = 1.0f / scale;
// q[c] = floatToFp8E4m3(x[c] * inv). All float32, in that order, no fused multiply-add.
// q is [hidden], scales is [hidden / 128]; hidden must be a multiple of 128.
void referenceFp8Cast(const uint16_t* row_bf16, int hidden, uint8_t* q, float* scales);

using ExpertOutputFn =
    std::function<float(int global_expert, int src_rank, int src_token, int col)>;

// What source rank s gets back from LL combine, [N_s*hidden] as float:
//   out[t][c] = sum over ranks d holding at least one of t's experts, in increasing d, of
//               bf16round( sum over k (increasing) with expert e_k on d of
//                          w[t][k] * expert_output(e_k, s, t, c), in float32 )
// i.e. each rank's weighted partial is rounded to bf16 once (it travels as bf16), then the
// partials are summed in float32. Tokens without a valid expert give 0.
// w is all[src_rank].topk_weights (the dispatch's), or `combine_weights` ([N_s*K]) when given:
// LlCombineArgs::topk_weights, which replace the dispatch's.
std::vector<float> referenceLlCombine(const std::vector<RankInputs>& all, int src_rank,
                                      int num_experts, int num_topk,
                                      const ExpertOutputFn& expert_output, int hidden,
                                      const float* combine_weights = nullptr);

// The largest error the FP8 cast may make (ops.hpp, LlDispatchArgs::use_fp8): for a value x of
// a block with scale `scale`, |float(fp8) * scale - x| <= |x| / 16 + scale / 1024.
inline double fp8DequantBound(double x, double scale) {
  return (x < 0 ? -x : x) / 16.0 + scale / 1024.0;
}

// ----- comparison helpers -------------------------------------------------------------------

// Combine tolerance: |actual - expected| <= atol + rtol * |expected|. rtol is one bf16 ulp
// (the output is rounded to bf16 once, half an ulp, plus float32 accumulation in any order);
// atol covers cancellation to near zero.
inline constexpr double kCombineRtol = 1.0 / 128.0;
inline constexpr double kCombineAtol = 1e-3;

// "src_rank 1, token 300" for a generated row, else "untagged row (col0 .., col1 .., col2 ..)".
std::string describeRowOrigin(const uint16_t* row_bf16);

// Compares a bf16 result [rows, cols] against a float reference within atol + rtol * |expected|.
// NaN/inf in `actual` (e.g. poison left unwritten) always fails. The failure message names the
// number of bad elements and the first few as (token, column): expected vs actual.
::testing::AssertionResult compareBf16Near(const uint16_t* actual, const float* expected,
                                           int64_t rows, int64_t cols, double atol = kCombineAtol,
                                           double rtol = kCombineRtol);
::testing::AssertionResult compareBf16Near(const std::vector<uint16_t>& actual,
                                           const std::vector<float>& expected, int64_t cols,
                                           double atol = kCombineAtol, double rtol = kCombineRtol);

// Bitwise comparison of bf16 rows. With rows_have_origin, a failure also says which generated
// row (decodeRowOrigin) was expected and which one arrived, which makes misplaced rows obvious.
::testing::AssertionResult compareBf16Exact(const uint16_t* actual, const uint16_t* expected,
                                            int64_t rows, int64_t cols,
                                            bool rows_have_origin = false);

// Exact element comparison of integer or float arrays [rows, cols] (floats by value, so NaN never
// matches). `what` names the array in the message.
template <typename T>
::testing::AssertionResult compareExact(const T* actual, const T* expected, int64_t rows,
                                        int64_t cols, const std::string& what = "array") {
  static_assert(std::is_arithmetic<T>::value, "compareExact needs an arithmetic element type");
  // Print small integer types as numbers, not characters; floats with all their digits.
  using Printed = std::conditional_t<std::is_floating_point<T>::value, double, long long>;
  int64_t bad = 0;
  std::ostringstream first;
  first.precision(9);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      if (actual[i] == expected[i]) continue;
      if (bad < 4) {
        first << "\n  (row " << r << ", column " << c << "): expected "
              << static_cast<Printed>(expected[i]) << ", actual "
              << static_cast<Printed>(actual[i]);
      }
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": " << bad << " of " << rows * cols << " elements differ" << first.str();
}

template <typename T>
::testing::AssertionResult compareExact(const std::vector<T>& actual,
                                        const std::vector<T>& expected,
                                        const std::string& what = "array") {
  if (actual.size() != expected.size())
    return ::testing::AssertionFailure()
           << what << ": size " << actual.size() << ", expected " << expected.size();
  return compareExact(actual.data(), expected.data(), 1, static_cast<int64_t>(actual.size()), what);
}

// Host copies of one local expert's rows from an LL dispatch result.
struct LlExpertView {
  int count = 0;                      // num_recv_tokens_per_expert[e]
  const int32_t* src_info = nullptr;  // [count] src_rank * max_tokens_per_rank + src_token
  const uint16_t* x_bf16 = nullptr;   // [count, hidden] for BF16 dispatch, else nullptr
  const uint8_t* x_fp8 = nullptr;     // [count, hidden] for FP8 dispatch, else nullptr
  const float* scales = nullptr;      // [count, hidden / 128] for FP8 dispatch
};

// Checks one local expert of an LL dispatch: the count, the multiset of (src_rank, src_token)
// against `expected`, and every row's data against its source row (bf16 bit-exact, or FP8 bytes
// and scales equal to referenceFp8Cast of the source row).
::testing::AssertionResult checkLlExpertRows(const std::vector<RankInputs>& all,
                                             const LlExpertRows& expected,
                                             const LlExpertView& actual, int max_tokens_per_rank,
                                             int hidden);

}  // namespace epcomm::test
