// SPDX-License-Identifier: Apache-2.0
#include "common/reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <map>
#include <stdexcept>
#include <utility>

// The FP8 cast and the LL partial sums must round exactly like the GPU: no contraction of a
// multiply and an add into an FMA. clang honours the pragma; GCC ignores it (and warns), so the
// code also routes every product through a volatile temporary, which forces the float rounding.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

namespace epcomm::test {

namespace {

[[noreturn]] void fail(const char* fn, const std::string& what) {
  throw std::invalid_argument(std::string(fn) + ": " + what);
}

void checkShape(const char* fn, int num_experts, int num_ranks, int num_topk) {
  if (num_ranks < 1) fail(fn, "num_ranks must be >= 1");
  if (num_experts < 1 || num_experts % num_ranks != 0)
    fail(fn, "num_experts (" + std::to_string(num_experts) + ") must be a positive multiple of " +
                 "num_ranks (" + std::to_string(num_ranks) + ")");
  if (num_topk < 1) fail(fn, "num_topk must be >= 1");
}

// Checks that every rank's inputs are consistent with the shape. With hidden > 0 also the x rows.
void checkInputs(const char* fn, const std::vector<RankInputs>& all, int hidden, int num_experts,
                 int num_topk) {
  const int num_ranks = static_cast<int>(all.size());
  checkShape(fn, num_experts, num_ranks, num_topk);
  if (hidden > 0 && hidden % kFp8BlockSize != 0)
    fail(fn, "hidden must be a multiple of 128, got " + std::to_string(hidden));
  for (int r = 0; r < num_ranks; ++r) {
    const RankInputs& in = all[r];
    const size_t n = static_cast<size_t>(in.num_tokens);
    const std::string who = "rank " + std::to_string(r) + ": ";
    if (in.rank != r) fail(fn, who + "RankInputs::rank is " + std::to_string(in.rank));
    if (in.num_tokens < 0) fail(fn, who + "negative num_tokens");
    if (in.topk_idx.size() != n * num_topk || in.topk_weights.size() != n * num_topk)
      fail(fn, who + "topk_idx/topk_weights must have num_tokens * num_topk entries");
    for (size_t i = 0; i < in.topk_idx.size(); ++i)
      if (in.topk_idx[i] < -1 || in.topk_idx[i] >= num_experts)
        fail(fn, who + "expert id " + std::to_string(in.topk_idx[i]) + " out of range at token " +
                     std::to_string(i / num_topk));
    if (hidden > 0) {
      if (in.x_bf16.size() != n * hidden) fail(fn, who + "x_bf16 must have num_tokens * hidden");
      if (in.x_fp8.size() != n * hidden) fail(fn, who + "x_fp8 must have num_tokens * hidden");
      if (in.x_scales.size() != n * (hidden / kFp8BlockSize))
        fail(fn, who + "x_scales must have num_tokens * hidden / 128");
    }
  }
}

// Row offset of every source in destination d's rank-major receive order.
std::vector<int> rankPrefixOn(const std::vector<LayoutRef>& layouts, int dst_rank) {
  std::vector<int> prefix(layouts.size() + 1, 0);
  for (size_t s = 0; s < layouts.size(); ++s)
    prefix[s + 1] = prefix[s] + layouts[s].tokens_per_rank[dst_rank];
  return prefix;
}

std::vector<LayoutRef> allLayouts(const std::vector<RankInputs>& all, int num_experts,
                                  int num_topk) {
  std::vector<LayoutRef> layouts;
  layouts.reserve(all.size());
  for (const RankInputs& in : all)
    layouts.push_back(referenceLayout(in.topk_idx.data(), in.num_tokens, num_topk, num_experts,
                                      static_cast<int>(all.size())));
  return layouts;
}

void checkRank(const char* fn, int rank, size_t num_ranks) {
  if (rank < 0 || static_cast<size_t>(rank) >= num_ranks)
    fail(fn,
         "rank " + std::to_string(rank) + " out of range [0, " + std::to_string(num_ranks) + ")");
}

std::string formatFloat(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  return buf;
}

std::string formatBf16(uint16_t bits) {
  char buf[80];
  std::snprintf(buf, sizeof(buf), "%.9g (0x%04x)", static_cast<double>(bf16ToFloat(bits)), bits);
  return buf;
}

}  // namespace

int64_t effectiveExpert(const int64_t* token_ids, int k) {
  const int64_t e = token_ids[k];
  if (e < 0) return -1;
  for (int j = 0; j < k; ++j)
    if (token_ids[j] == e) return -1;
  return e;
}

// ----- layout --------------------------------------------------------------------------------

LayoutRef referenceLayout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts,
                          int num_ranks) {
  checkShape("referenceLayout", num_experts, num_ranks, num_topk);
  if (num_tokens < 0) fail("referenceLayout", "negative num_tokens");
  const int local = num_experts / num_ranks;
  LayoutRef ref;
  ref.tokens_per_rank.assign(num_ranks, 0);
  ref.tokens_per_expert.assign(num_experts, 0);
  ref.is_token_in_rank.assign(static_cast<size_t>(num_tokens) * num_ranks, 0);
  ref.token_slot.assign(static_cast<size_t>(num_tokens) * num_ranks, -1);
  for (int t = 0; t < num_tokens; ++t) {
    for (int k = 0; k < num_topk; ++k) {
      const int64_t e = topk_idx[static_cast<size_t>(t) * num_topk + k];
      if (e == -1) continue;
      if (e < -1 || e >= num_experts)
        fail("referenceLayout", "expert id " + std::to_string(e) + " out of range at token " +
                                    std::to_string(t) + ", k " + std::to_string(k));
      if (effectiveExpert(topk_idx + static_cast<size_t>(t) * num_topk, k) < 0) continue;
      ++ref.tokens_per_expert[e];
      ref.is_token_in_rank[static_cast<size_t>(t) * num_ranks + e / local] = 1;
    }
    // Slots after the token's whole expert list, so a rank named twice counts once.
    for (int r = 0; r < num_ranks; ++r) {
      const size_t i = static_cast<size_t>(t) * num_ranks + r;
      if (ref.is_token_in_rank[i]) ref.token_slot[i] = ref.tokens_per_rank[r]++;
    }
  }
  return ref;
}

// ----- HT dispatch / combine ----------------------------------------------------------------

namespace {

// Checks a caller's layout of source `s` (N tokens) and returns it with token_slot filled in from
// is_token_in_rank (slot = tokens t' < t sent to the same rank).
LayoutRef checkedLayout(const char* fn, const LayoutRef& given, int s, int num_tokens,
                        int num_ranks, int num_experts) {
  const std::string who = "layout of rank " + std::to_string(s) + ": ";
  const size_t n = static_cast<size_t>(num_tokens);
  if (given.tokens_per_rank.size() != static_cast<size_t>(num_ranks))
    fail(fn, who + "tokens_per_rank must have num_ranks entries");
  if (given.is_token_in_rank.size() != n * num_ranks)
    fail(fn, who + "is_token_in_rank must have num_tokens * num_ranks entries");
  if (given.tokens_per_expert.size() != static_cast<size_t>(num_experts))
    fail(fn, who + "tokens_per_expert must have num_experts entries");
  LayoutRef out = given;
  out.token_slot.assign(n * num_ranks, -1);
  std::vector<int> sums(num_ranks, 0);
  for (size_t t = 0; t < n; ++t)
    for (int d = 0; d < num_ranks; ++d)
      if (given.is_token_in_rank[t * num_ranks + d]) out.token_slot[t * num_ranks + d] = sums[d]++;
  for (int d = 0; d < num_ranks; ++d)
    if (sums[d] != given.tokens_per_rank[d])
      fail(fn, who + "tokens_per_rank[" + std::to_string(d) +
                   "] = " + std::to_string(given.tokens_per_rank[d]) +
                   " but is_token_in_rank sends " + std::to_string(sums[d]) + " tokens there");
  const int local = num_experts / num_ranks;
  for (int e = 0; e < num_experts; ++e)
    if (given.tokens_per_expert[e] < 0 || given.tokens_per_expert[e] > sums[e / local])
      fail(fn, who + "tokens_per_expert[" + std::to_string(e) +
                   "] = " + std::to_string(given.tokens_per_expert[e]) + " outside [0, " +
                   std::to_string(sums[e / local]) + "]");
  return out;
}

std::vector<LayoutRef> checkedLayouts(const char* fn, const std::vector<RankInputs>& all,
                                      const std::vector<LayoutRef>& layouts, int num_experts) {
  if (layouts.size() != all.size())
    fail(fn, "layouts must have one entry per rank, got " + std::to_string(layouts.size()));
  std::vector<LayoutRef> out;
  out.reserve(layouts.size());
  for (size_t s = 0; s < layouts.size(); ++s)
    out.push_back(checkedLayout(fn, layouts[s], static_cast<int>(s), all[s].num_tokens,
                                static_cast<int>(all.size()), num_experts));
  return out;
}

}  // namespace

std::vector<LayoutRef> referenceLayouts(const std::vector<RankInputs>& all, int num_experts,
                                        int num_topk) {
  checkInputs("referenceLayouts", all, 0, num_experts, num_topk);
  return allLayouts(all, num_experts, num_topk);
}

HtDispatchRef referenceHtDispatch(const std::vector<RankInputs>& all, int dst_rank, int hidden,
                                  int num_experts, int num_topk, int expert_alignment) {
  checkInputs("referenceHtDispatch", all, hidden, num_experts, num_topk);
  return referenceHtDispatchFromLayout(all, allLayouts(all, num_experts, num_topk), dst_rank,
                                       hidden, num_experts, num_topk, true, expert_alignment);
}

HtDispatchRef referenceHtDispatchFromLayout(const std::vector<RankInputs>& all,
                                            const std::vector<LayoutRef>& given_layouts,
                                            int dst_rank, int hidden, int num_experts, int num_topk,
                                            bool with_topk, int expert_alignment) {
  const char* fn = "referenceHtDispatchFromLayout";
  checkInputs(fn, all, hidden, num_experts, num_topk);
  checkRank(fn, dst_rank, all.size());
  if (expert_alignment < 1) fail(fn, "expert_alignment must be >= 1");
  const int num_ranks = static_cast<int>(all.size());
  const int local = num_experts / num_ranks;
  const int blocks = hidden / kFp8BlockSize;
  const std::vector<LayoutRef> layouts = checkedLayouts(fn, all, given_layouts, num_experts);

  HtDispatchRef ref;
  ref.rank_prefix = rankPrefixOn(layouts, dst_rank);
  ref.num_recv = ref.rank_prefix[num_ranks];
  const size_t rows = static_cast<size_t>(ref.num_recv);
  ref.src_rank.reserve(rows);
  ref.src_token.reserve(rows);
  ref.recv_src_idx.reserve(rows);
  ref.recv_x_bf16.reserve(rows * hidden);
  ref.recv_x_fp8.reserve(rows * hidden);
  ref.recv_scales.reserve(rows * blocks);
  if (with_topk) {
    ref.recv_topk_idx.reserve(rows * num_topk);
    ref.recv_topk_weights.reserve(rows * num_topk);
  }

  for (int s = 0; s < num_ranks; ++s) {
    const RankInputs& in = all[s];
    for (int t = 0; t < in.num_tokens; ++t) {
      if (!layouts[s].is_token_in_rank[static_cast<size_t>(t) * num_ranks + dst_rank]) continue;
      ref.src_rank.push_back(s);
      ref.src_token.push_back(t);
      ref.recv_src_idx.push_back(t);
      const size_t x0 = static_cast<size_t>(t) * hidden;
      ref.recv_x_bf16.insert(ref.recv_x_bf16.end(), in.x_bf16.begin() + x0,
                             in.x_bf16.begin() + x0 + hidden);
      ref.recv_x_fp8.insert(ref.recv_x_fp8.end(), in.x_fp8.begin() + x0,
                            in.x_fp8.begin() + x0 + hidden);
      const size_t s0 = static_cast<size_t>(t) * blocks;
      ref.recv_scales.insert(ref.recv_scales.end(), in.x_scales.begin() + s0,
                             in.x_scales.begin() + s0 + blocks);
      if (!with_topk) continue;
      for (int k = 0; k < num_topk; ++k) {
        const size_t i = static_cast<size_t>(t) * num_topk + k;
        const int64_t e =
            effectiveExpert(in.topk_idx.data() + static_cast<size_t>(t) * num_topk, k);
        if (e >= 0 && e / local == dst_rank) {
          ref.recv_topk_idx.push_back(e - static_cast<int64_t>(dst_rank) * local);
          ref.recv_topk_weights.push_back(in.topk_weights[i]);
        } else {
          ref.recv_topk_idx.push_back(-1);
          ref.recv_topk_weights.push_back(0.0f);
        }
      }
    }
  }
  // The receivers count what the sources' layouts say (for referenceLayout's layouts: the
  // (row, k) pairs naming each local expert).
  ref.tokens_per_local_expert.assign(local, 0);
  for (int l = 0; l < local; ++l) {
    int pairs = 0;
    for (int s = 0; s < num_ranks; ++s) pairs += layouts[s].tokens_per_expert[dst_rank * local + l];
    ref.tokens_per_local_expert[l] =
        (pairs + expert_alignment - 1) / expert_alignment * expert_alignment;
  }
  return ref;
}

void padToWorstTokens(HtDispatchRef& ref, int num_worst_tokens, int hidden, int num_topk) {
  const char* fn = "padToWorstTokens";
  if (ref.num_recv > num_worst_tokens)
    fail(fn, "num_recv " + std::to_string(ref.num_recv) + " > num_worst_tokens " +
                 std::to_string(num_worst_tokens) + " (the GPU must fail this dispatch)");
  const size_t pad = static_cast<size_t>(num_worst_tokens - ref.num_recv);
  const bool with_topk = num_topk > 0;
  ref.src_rank.insert(ref.src_rank.end(), pad, -1);
  ref.src_token.insert(ref.src_token.end(), pad, -1);
  ref.recv_src_idx.insert(ref.recv_src_idx.end(), pad, -1);
  ref.recv_x_bf16.insert(ref.recv_x_bf16.end(), pad * hidden, uint16_t{0});
  ref.recv_x_fp8.insert(ref.recv_x_fp8.end(), pad * hidden, uint8_t{0});
  ref.recv_scales.insert(ref.recv_scales.end(), pad * (hidden / kFp8BlockSize), 0.0f);
  if (with_topk) {
    ref.recv_topk_idx.insert(ref.recv_topk_idx.end(), pad * num_topk, int64_t{-1});
    ref.recv_topk_weights.insert(ref.recv_topk_weights.end(), pad * num_topk, 0.0f);
  }
}

std::vector<float> referenceCombinedTopkWeights(const std::vector<LayoutRef>& given_layouts,
                                                int src_rank,
                                                const std::vector<std::vector<float>>& recv_weights,
                                                int num_topk) {
  const char* fn = "referenceCombinedTopkWeights";
  const int num_ranks = static_cast<int>(given_layouts.size());
  checkRank(fn, src_rank, given_layouts.size());
  if (num_topk < 1) fail(fn, "num_topk must be >= 1");
  if (recv_weights.size() != given_layouts.size())
    fail(fn, "recv_weights must have one entry per rank");
  std::vector<LayoutRef> layouts;
  for (int s = 0; s < num_ranks; ++s) {
    const LayoutRef& g = given_layouts[s];
    if (g.tokens_per_rank.size() != static_cast<size_t>(num_ranks) ||
        g.is_token_in_rank.size() % num_ranks != 0)
      fail(fn, "layout of rank " + std::to_string(s) + " has wrong sizes");
    const int n = static_cast<int>(g.is_token_in_rank.size() / num_ranks);
    layouts.push_back(
        checkedLayout(fn, g, s, n, num_ranks, static_cast<int>(g.tokens_per_expert.size())));
  }
  std::vector<int> first_row(num_ranks);
  for (int d = 0; d < num_ranks; ++d) {
    const std::vector<int> prefix = rankPrefixOn(layouts, d);
    if (recv_weights[d].size() < static_cast<size_t>(prefix[num_ranks]) * num_topk)
      fail(fn, "recv_weights[" + std::to_string(d) + "] has fewer than " +
                   std::to_string(prefix[num_ranks]) + " rows");
    first_row[d] = prefix[src_rank];
  }
  const LayoutRef& layout = layouts[src_rank];
  const int n = static_cast<int>(layout.is_token_in_rank.size() / num_ranks);
  std::vector<float> out(static_cast<size_t>(n) * num_topk, 0.0f);
  for (int t = 0; t < n; ++t) {
    for (int k = 0; k < num_topk; ++k) {
      float sum = 0.0f;
      for (int d = 0; d < num_ranks; ++d) {
        const int slot = layout.token_slot[static_cast<size_t>(t) * num_ranks + d];
        if (slot < 0) continue;
        sum += recv_weights[d][static_cast<size_t>(first_row[d] + slot) * num_topk + k];
      }
      out[static_cast<size_t>(t) * num_topk + k] = sum;
    }
  }
  return out;
}

std::vector<float> referenceHtCombine(const std::vector<RankInputs>& all, int src_rank,
                                      const std::vector<std::vector<uint16_t>>& combine_inputs,
                                      int hidden, int num_experts, int num_topk, bool weighted,
                                      const uint16_t* bias, const std::vector<LayoutRef>* routing) {
  const char* fn = "referenceHtCombine";
  checkInputs(fn, all, 0, num_experts, num_topk);
  checkRank(fn, src_rank, all.size());
  if (hidden < 1) fail(fn, "hidden must be >= 1");
  const int num_ranks = static_cast<int>(all.size());
  if (combine_inputs.size() != all.size())
    fail(fn, "combine_inputs must have one entry per rank, got " +
                 std::to_string(combine_inputs.size()));
  const int local = num_experts / num_ranks;
  const std::vector<LayoutRef> layouts = routing != nullptr
                                             ? checkedLayouts(fn, all, *routing, num_experts)
                                             : allLayouts(all, num_experts, num_topk);
  std::vector<int> first_row(num_ranks);  // where source s's rows start on each destination
  for (int d = 0; d < num_ranks; ++d) {
    const std::vector<int> prefix = rankPrefixOn(layouts, d);
    if (combine_inputs[d].size() < static_cast<size_t>(prefix[num_ranks]) * hidden)
      fail(fn, "combine_inputs[" + std::to_string(d) + "] has " +
                   std::to_string(combine_inputs[d].size()) + " elements, need " +
                   std::to_string(prefix[num_ranks]) + " rows of " + std::to_string(hidden));
    first_row[d] = prefix[src_rank];
  }

  const RankInputs& in = all[src_rank];
  const LayoutRef& layout = layouts[src_rank];
  std::vector<float> out(static_cast<size_t>(in.num_tokens) * hidden);
  std::vector<double> acc(hidden);
  for (int t = 0; t < in.num_tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int d = 0; d < num_ranks; ++d) {
      const int slot = layout.token_slot[static_cast<size_t>(t) * num_ranks + d];
      if (slot < 0) continue;
      double w = 1.0;
      if (weighted) {
        w = 0.0;
        for (int k = 0; k < num_topk; ++k) {
          const size_t i = static_cast<size_t>(t) * num_topk + k;
          const int64_t e =
              effectiveExpert(in.topk_idx.data() + static_cast<size_t>(t) * num_topk, k);
          if (e >= 0 && e / local == d) w += in.topk_weights[i];
        }
      }
      const uint16_t* y =
          combine_inputs[d].data() + static_cast<size_t>(first_row[d] + slot) * hidden;
      for (int c = 0; c < hidden; ++c) acc[c] += w * static_cast<double>(bf16ToFloat(y[c]));
    }
    for (int c = 0; c < hidden; ++c) {
      const size_t i = static_cast<size_t>(t) * hidden + c;
      if (bias) acc[c] += static_cast<double>(bf16ToFloat(bias[i]));
      out[i] = static_cast<float>(acc[c]);
    }
  }
  return out;
}

// ----- HT expert-major -----------------------------------------------------------------------

HtExpertMajorRef referenceHtDispatchExpertMajor(const std::vector<RankInputs>& all, int dst_rank,
                                                int num_experts, int num_topk,
                                                int expert_alignment) {
  const char* fn = "referenceHtDispatchExpertMajor";
  checkInputs(fn, all, 0, num_experts, num_topk);
  checkRank(fn, dst_rank, all.size());
  if (expert_alignment < 1) fail(fn, "expert_alignment must be >= 1");
  const int num_ranks = static_cast<int>(all.size());
  const int local = num_experts / num_ranks;

  HtExpertMajorRef ref;
  ref.expert_offsets.assign(local + 1, 0);
  ref.tokens_per_local_expert.assign(local, 0);
  ref.pairs_per_local_expert.assign(local, 0);
  ref.part_begin.assign(static_cast<size_t>(local) * (num_ranks + 1), 0);
  for (int l = 0; l < local; ++l) {
    const int64_t expert = static_cast<int64_t>(dst_rank) * local + l;
    ref.expert_offsets[l] = ref.num_rows;
    for (int s = 0; s < num_ranks; ++s) {
      ref.part_begin[static_cast<size_t>(l) * (num_ranks + 1) + s] =
          static_cast<int>(ref.src_rank.size());
      const RankInputs& in = all[s];
      for (int t = 0; t < in.num_tokens; ++t) {
        const int64_t* ids = in.topk_idx.data() + static_cast<size_t>(t) * num_topk;
        for (int k = 0; k < num_topk; ++k) {
          if (effectiveExpert(ids, k) != expert) continue;
          ref.src_rank.push_back(s);
          ref.src_token.push_back(t);
          ref.topk_col.push_back(k);
        }
      }
    }
    const int pairs = static_cast<int>(ref.src_rank.size()) - ref.num_rows;
    const int aligned = (pairs + expert_alignment - 1) / expert_alignment * expert_alignment;
    ref.part_begin[static_cast<size_t>(l) * (num_ranks + 1) + num_ranks] =
        static_cast<int>(ref.src_rank.size());
    ref.pairs_per_local_expert[l] = pairs;
    ref.tokens_per_local_expert[l] = aligned;
    ref.src_rank.resize(ref.num_rows + aligned, -1);
    ref.src_token.resize(ref.num_rows + aligned, -1);
    ref.topk_col.resize(ref.num_rows + aligned, -1);
    ref.num_rows += aligned;
  }
  ref.expert_offsets[local] = ref.num_rows;
  return ref;
}

::testing::AssertionResult checkHtExpertMajorRows(const std::vector<RankInputs>& all,
                                                  const HtExpertMajorRef& ref,
                                                  const HtExpertMajorView& actual, int dst_rank,
                                                  int num_experts, int hidden, int num_topk,
                                                  std::vector<int>* row_origin) {
  const int num_ranks = static_cast<int>(all.size());
  const int local = num_experts / num_ranks;
  const int blocks = hidden / kFp8BlockSize;
  if (actual.num_rows != ref.num_rows)
    return ::testing::AssertionFailure()
           << "rank " << dst_rank << ": " << actual.num_rows << " rows, expected " << ref.num_rows;
  ::testing::AssertionResult r = compareExact(actual.expert_offsets, ref.expert_offsets.data(), 1,
                                              local + 1, "expert_offsets");
  if (!r) return r;
  r = compareExact(actual.tokens_per_expert, ref.tokens_per_local_expert.data(), 1, local,
                   "num_recv_tokens_per_expert");
  if (!r) return r;

  std::vector<int> origin(ref.num_rows, -1);
  for (int l = 0; l < local; ++l) {
    for (int s = 0; s < num_ranks; ++s) {
      const int begin = ref.part_begin[static_cast<size_t>(l) * (num_ranks + 1) + s];
      const int end = ref.part_begin[static_cast<size_t>(l) * (num_ranks + 1) + s + 1];
      // A token has at most one pair per expert: its source index identifies the row.
      std::map<int, int> want;  // token -> reference row
      for (int i = begin; i < end; ++i) want[ref.src_token[i]] = i;
      for (int i = begin; i < end; ++i) {
        const int t = actual.src_idx[i];
        auto it = want.find(t);
        if (it == want.end())
          return ::testing::AssertionFailure()
                 << "rank " << dst_rank << ", local expert " << l << ", source " << s << ": row "
                 << i << " has recv_src_idx " << t
                 << ", which is not (or twice) a token of that source with that expert";
        origin[i] = it->second;
        want.erase(it);
      }
    }
  }
  for (int i = 0; i < ref.num_rows; ++i) {
    const std::string where = "rank " + std::to_string(dst_rank) + ", row " + std::to_string(i);
    const int o = origin[i];
    if (o < 0) {  // padding
      if (actual.src_idx[i] != -1)
        return ::testing::AssertionFailure()
               << where << " (padding): recv_src_idx " << actual.src_idx[i] << ", expected -1";
      for (int c = 0; c < hidden; ++c) {
        const bool zero = actual.x_bf16 ? actual.x_bf16[static_cast<size_t>(i) * hidden + c] == 0
                                        : actual.x_fp8[static_cast<size_t>(i) * hidden + c] == 0;
        if (!zero)
          return ::testing::AssertionFailure()
                 << where << " (padding): column " << c << " is not zero";
      }
      for (int b = 0; actual.scales && b < blocks; ++b) {
        if (actual.scales[static_cast<size_t>(i) * blocks + b] != 0.0f)
          return ::testing::AssertionFailure()
                 << where << " (padding): scale " << b << " is not zero";
      }
      for (int k = 0; actual.topk_idx && k < num_topk; ++k) {
        const size_t j = static_cast<size_t>(i) * num_topk + k;
        if (actual.topk_idx[j] != -1 || actual.topk_weights[j] != 0.0f)
          return ::testing::AssertionFailure()
                 << where << " (padding): top-k column " << k << " holds id " << actual.topk_idx[j]
                 << " weight " << actual.topk_weights[j] << ", expected -1 and 0";
      }
      continue;
    }
    const int s = ref.src_rank[o], t = ref.src_token[o], kk = ref.topk_col[o];
    const std::string pair = where + " (rank " + std::to_string(s) + ", token " +
                             std::to_string(t) + ", k " + std::to_string(kk) + ")";
    const size_t x0 = static_cast<size_t>(t) * hidden;
    if (actual.x_bf16) {
      r = compareBf16Exact(actual.x_bf16 + static_cast<size_t>(i) * hidden,
                           all[s].x_bf16.data() + x0, 1, hidden, true);
      if (!r) return ::testing::AssertionFailure() << pair << ": " << r.message();
    } else {
      r = compareExact(actual.x_fp8 + static_cast<size_t>(i) * hidden, all[s].x_fp8.data() + x0, 1,
                       hidden, "FP8 row");
      if (!r) return ::testing::AssertionFailure() << pair << ": " << r.message();
      r = compareExact(actual.scales + static_cast<size_t>(i) * blocks,
                       all[s].x_scales.data() + static_cast<size_t>(t) * blocks, 1, blocks,
                       "scales");
      if (!r) return ::testing::AssertionFailure() << pair << ": " << r.message();
    }
    if (actual.topk_idx) {
      const int64_t* ids = all[s].topk_idx.data() + static_cast<size_t>(t) * num_topk;
      for (int k = 0; k < num_topk; ++k) {
        const size_t j = static_cast<size_t>(i) * num_topk + k;
        const int64_t want_id = k == kk ? ids[k] - static_cast<int64_t>(dst_rank) * local : -1;
        const float want_w =
            k == kk ? all[s].topk_weights[static_cast<size_t>(t) * num_topk + k] : 0.0f;
        if (actual.topk_idx[j] != want_id || actual.topk_weights[j] != want_w)
          return ::testing::AssertionFailure()
                 << pair << ": top-k column " << k << " holds id " << actual.topk_idx[j]
                 << " weight " << formatFloat(actual.topk_weights[j]) << ", expected " << want_id
                 << " and " << formatFloat(want_w);
      }
    }
  }
  if (row_origin) *row_origin = origin;
  return ::testing::AssertionSuccess();
}

std::vector<float> referenceHtCombineExpertMajor(
    const std::vector<RankInputs>& all, int src_rank, int num_experts, int num_topk,
    const std::function<float(int global_expert, int src_rank, int src_token, int col)>&
        expert_output,
    int hidden, bool weighted, const uint16_t* bias) {
  const char* fn = "referenceHtCombineExpertMajor";
  checkInputs(fn, all, 0, num_experts, num_topk);
  checkRank(fn, src_rank, all.size());
  if (hidden < 1) fail(fn, "hidden must be >= 1");
  const RankInputs& in = all[src_rank];
  std::vector<float> out(static_cast<size_t>(in.num_tokens) * hidden);
  std::vector<double> acc(hidden);
  for (int t = 0; t < in.num_tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0);
    const int64_t* ids = in.topk_idx.data() + static_cast<size_t>(t) * num_topk;
    for (int k = 0; k < num_topk; ++k) {
      const int64_t e = effectiveExpert(ids, k);
      if (e < 0) continue;
      const double w = weighted ? in.topk_weights[static_cast<size_t>(t) * num_topk + k] : 1.0;
      for (int c = 0; c < hidden; ++c)
        acc[c] += w * expert_output(static_cast<int>(e), src_rank, t, c);
    }
    for (int c = 0; c < hidden; ++c) {
      const size_t i = static_cast<size_t>(t) * hidden + c;
      if (bias) acc[c] += static_cast<double>(bf16ToFloat(bias[i]));
      out[i] = static_cast<float>(acc[c]);
    }
  }
  return out;
}

// ----- LL dispatch / combine ----------------------------------------------------------------

LlDispatchRef referenceLlDispatch(const std::vector<RankInputs>& all, int dst_rank, int num_experts,
                                  int num_topk) {
  const char* fn = "referenceLlDispatch";
  checkInputs(fn, all, 0, num_experts, num_topk);
  checkRank(fn, dst_rank, all.size());
  const int num_ranks = static_cast<int>(all.size());
  const int local = num_experts / num_ranks;
  LlDispatchRef ref;
  ref.per_local_expert.resize(local);
  // Sources in rank order, tokens in order: the lists come out sorted by (src_rank, src_token).
  for (int s = 0; s < num_ranks; ++s) {
    const RankInputs& in = all[s];
    for (int t = 0; t < in.num_tokens; ++t) {
      for (int k = 0; k < num_topk; ++k) {
        const int64_t e =
            effectiveExpert(in.topk_idx.data() + static_cast<size_t>(t) * num_topk, k);
        if (e < 0 || e / local != dst_rank) continue;
        LlExpertRows& rows = ref.per_local_expert[e - dst_rank * local];
        rows.src_rank.push_back(s);
        rows.src_token.push_back(t);
      }
    }
  }
  return ref;
}

void referenceFp8Cast(const uint16_t* row_bf16, int hidden, uint8_t* q, float* scales) {
  if (hidden < 0 || hidden % kFp8BlockSize != 0)
    fail("referenceFp8Cast", "hidden must be a multiple of 128, got " + std::to_string(hidden));
  for (int b = 0; b < hidden / kFp8BlockSize; ++b) {
    const int c0 = b * kFp8BlockSize;
    float amax = 0.0f;
    for (int c = c0; c < c0 + kFp8BlockSize; ++c)
      amax = std::fmax(amax, std::fabs(bf16ToFloat(row_bf16[c])));
    // volatile: each value is rounded to float exactly where the GPU rounds it.
    volatile float scale = std::fmax(amax, 1e-4f) / kFp8E4m3Max;
    volatile float inv = 1.0f / scale;
    scales[b] = scale;
    for (int c = c0; c < c0 + kFp8BlockSize; ++c) {
      volatile float scaled = bf16ToFloat(row_bf16[c]) * inv;
      q[c] = floatToFp8E4m3(scaled);
    }
  }
}

std::vector<float> referenceLlCombine(const std::vector<RankInputs>& all, int src_rank,
                                      int num_experts, int num_topk,
                                      const ExpertOutputFn& expert_output, int hidden,
                                      const float* combine_weights) {
  const char* fn = "referenceLlCombine";
  checkInputs(fn, all, 0, num_experts, num_topk);
  checkRank(fn, src_rank, all.size());
  if (hidden < 1) fail(fn, "hidden must be >= 1");
  if (!expert_output) fail(fn, "expert_output is empty");
  const int num_ranks = static_cast<int>(all.size());
  const int local = num_experts / num_ranks;
  const RankInputs& in = all[src_rank];
  std::vector<float> out(static_cast<size_t>(in.num_tokens) * hidden, 0.0f);
  std::vector<float> total(hidden);
  std::vector<float> partial(hidden);
  for (int t = 0; t < in.num_tokens; ++t) {
    const int64_t* ids = in.topk_idx.data() + static_cast<size_t>(t) * num_topk;
    const float* weights = (combine_weights != nullptr ? combine_weights : in.topk_weights.data()) +
                           static_cast<size_t>(t) * num_topk;
    std::fill(total.begin(), total.end(), 0.0f);
    for (int d = 0; d < num_ranks; ++d) {
      bool any = false;
      std::fill(partial.begin(), partial.end(), 0.0f);
      for (int k = 0; k < num_topk; ++k) {
        const int64_t id = effectiveExpert(ids, k);
        if (id < 0 || id / local != d) continue;
        any = true;
        const int e = static_cast<int>(id);
        for (int c = 0; c < hidden; ++c) {
          volatile float product = weights[k] * expert_output(e, src_rank, t, c);
          partial[c] = partial[c] + product;
        }
      }
      if (!any) continue;
      for (int c = 0; c < hidden; ++c) total[c] = total[c] + roundToBf16(partial[c]);
    }
    std::copy(total.begin(), total.end(), out.begin() + static_cast<size_t>(t) * hidden);
  }
  return out;
}

// ----- comparison helpers -------------------------------------------------------------------

std::string describeRowOrigin(const uint16_t* row_bf16) {
  int rank = 0, token = 0;
  if (decodeRowOrigin(row_bf16, &rank, &token))
    return "src_rank " + std::to_string(rank) + ", token " + std::to_string(token);
  return "untagged row (col0 " + formatFloat(bf16ToFloat(row_bf16[0])) + ", col1 " +
         formatFloat(bf16ToFloat(row_bf16[1])) + ", col2 " + formatFloat(bf16ToFloat(row_bf16[2])) +
         ")";
}

::testing::AssertionResult compareBf16Near(const uint16_t* actual, const float* expected,
                                           int64_t rows, int64_t cols, double atol, double rtol) {
  int64_t bad = 0;
  std::string first;
  double worst = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      const double a = bf16ToFloat(actual[i]);
      const double e = expected[i];
      const double diff = std::fabs(a - e);
      // Written so that NaN in either side fails; inf in actual fails as diff is inf.
      if (diff <= atol + rtol * std::fabs(e)) continue;
      if (bad < 4)
        first += "\n  (token " + std::to_string(r) + ", column " + std::to_string(c) +
                 "): expected " + formatFloat(e) + ", actual " + formatBf16(actual[i]);
      if (!(diff <= worst)) worst = diff;
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " of " << rows * cols << " elements differ beyond atol " << atol << " + rtol "
         << rtol << " * |expected| (largest difference " << formatFloat(worst) << ")" << first;
}

::testing::AssertionResult compareBf16Near(const std::vector<uint16_t>& actual,
                                           const std::vector<float>& expected, int64_t cols,
                                           double atol, double rtol) {
  if (actual.size() != expected.size() || cols <= 0 ||
      actual.size() % static_cast<size_t>(cols) != 0)
    return ::testing::AssertionFailure()
           << "size mismatch: actual " << actual.size() << ", expected " << expected.size()
           << ", columns " << cols;
  return compareBf16Near(actual.data(), expected.data(), static_cast<int64_t>(actual.size()) / cols,
                         cols, atol, rtol);
}

::testing::AssertionResult compareBf16Exact(const uint16_t* actual, const uint16_t* expected,
                                            int64_t rows, int64_t cols, bool rows_have_origin) {
  int64_t bad = 0;
  int64_t bad_rows = 0;
  std::string first;
  for (int64_t r = 0; r < rows; ++r) {
    bool row_bad = false;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      if (actual[i] == expected[i]) continue;
      if (bad < 4) {
        first += "\n  (token " + std::to_string(r) + ", column " + std::to_string(c) +
                 "): expected " + formatBf16(expected[i]) + ", actual " + formatBf16(actual[i]);
        if (rows_have_origin && cols >= 3 && !row_bad)
          first += "; expected row " + describeRowOrigin(expected + r * cols) + ", actual row " +
                   describeRowOrigin(actual + r * cols);
      }
      row_bad = true;
      ++bad;
    }
    if (row_bad) ++bad_rows;
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << rows * cols << " bf16 elements differ"
                                       << " in " << bad_rows << " of " << rows << " rows" << first;
}

::testing::AssertionResult checkLlExpertRows(const std::vector<RankInputs>& all,
                                             const LlExpertRows& expected,
                                             const LlExpertView& actual, int max_tokens_per_rank,
                                             int hidden) {
  const int expected_count = static_cast<int>(expected.src_rank.size());
  if (actual.count != expected_count)
    return ::testing::AssertionFailure()
           << "received " << actual.count << " rows, expected " << expected_count;
  if (actual.count > 0 && actual.src_info == nullptr)
    return ::testing::AssertionFailure() << "src_info is null";
  if (max_tokens_per_rank < 1)
    return ::testing::AssertionFailure() << "max_tokens_per_rank must be >= 1";

  // The multiset of origins: sort both sides and walk them together.
  std::vector<std::pair<int, int>> want(expected_count), got(actual.count);
  for (int i = 0; i < expected_count; ++i) want[i] = {expected.src_rank[i], expected.src_token[i]};
  for (int i = 0; i < actual.count; ++i)
    got[i] = {actual.src_info[i] / max_tokens_per_rank, actual.src_info[i] % max_tokens_per_rank};
  std::sort(want.begin(), want.end());
  std::vector<std::pair<int, int>> got_sorted = got;
  std::sort(got_sorted.begin(), got_sorted.end());
  if (want != got_sorted) {
    std::vector<std::pair<int, int>> missing, extra;
    std::set_difference(want.begin(), want.end(), got_sorted.begin(), got_sorted.end(),
                        std::back_inserter(missing));
    std::set_difference(got_sorted.begin(), got_sorted.end(), want.begin(), want.end(),
                        std::back_inserter(extra));
    auto list = [](const std::vector<std::pair<int, int>>& v) {
      std::string s;
      for (size_t i = 0; i < v.size() && i < 4; ++i)
        s +=
            " (rank " + std::to_string(v[i].first) + ", token " + std::to_string(v[i].second) + ")";
      if (v.size() > 4) s += " ...";
      return s;
    };
    return ::testing::AssertionFailure()
           << "row origins differ: " << missing.size() << " missing" << list(missing) << "; "
           << extra.size() << " unexpected" << list(extra);
  }

  // Each row's data against its source row.
  const int blocks = hidden / kFp8BlockSize;
  std::vector<uint8_t> q(hidden);
  std::vector<float> scales(blocks);
  for (int i = 0; i < actual.count; ++i) {
    const int s = got[i].first, t = got[i].second;
    const uint16_t* src = all[s].x_bf16.data() + static_cast<size_t>(t) * hidden;
    const std::string where = "row " + std::to_string(i) + " (rank " + std::to_string(s) +
                              ", token " + std::to_string(t) + "): ";
    if (actual.x_bf16) {
      ::testing::AssertionResult r =
          compareBf16Exact(actual.x_bf16 + static_cast<size_t>(i) * hidden, src, 1, hidden, true);
      if (!r) return ::testing::AssertionFailure() << where << r.message();
    }
    if (actual.x_fp8) {
      referenceFp8Cast(src, hidden, q.data(), scales.data());
      ::testing::AssertionResult r = compareExact(actual.x_fp8 + static_cast<size_t>(i) * hidden,
                                                  q.data(), 1, hidden, "fp8 bytes");
      if (!r) return ::testing::AssertionFailure() << where << r.message();
      if (actual.scales) {
        r = compareExact(actual.scales + static_cast<size_t>(i) * blocks, scales.data(), 1, blocks,
                         "fp8 scales");
        if (!r) return ::testing::AssertionFailure() << where << r.message();
      }
    }
  }
  return ::testing::AssertionSuccess();
}

}  // namespace epcomm::test
