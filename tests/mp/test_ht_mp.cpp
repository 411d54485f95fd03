// SPDX-License-Identifier: Apache-2.0
// HT dispatch and combine across ranks (1, 2, 4 and 8 ranks; several ranks may share a GPU).
// Every rank regenerates the inputs of all ranks from one seed and checks its own outputs against
// the CPU reference model: dispatch exactly, combine within float tolerance. Outputs are poisoned
// before every run.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/call_outcome.hpp"
#include "common/gpu_helpers.hpp"
#include "common/ht_device_inputs.hpp"
#include "common/poison_new_buffers.hpp"
#include "common/reference.hpp"
#include "common/stage_times_check.hpp"
#include "common/test_data.hpp"
#include "common/test_env.hpp"
#include "epcomm/epcomm.hpp"
#include "kernels/protocol.hpp"
#include "test_hooks.hpp"

namespace epcomm::test {
namespace {

// The dispatch input form (dtype, ids, top-k, alignment, scales layout) is HtInputForm's.
struct HtCase : HtInputForm {
  int hidden = 2048;
  int experts = 64;
  int max_topk = 8;
  int tokens = 192;
  Routing routing = Routing::kUniform;
  int zero_rank = -1;  // this rank sends 0 tokens
  uint64_t seed = 7;
  int max_tokens = 256;
  int all_one_expert = -1;    // >= 0: every top-k entry of every token is this expert
  int nowhere_every = 0;      // > 0: every token t with t % nowhere_every == 1 has only -1
  bool equal_tokens = false;  // every rank has `tokens` tokens
  bool stage_times = false;   // EPCOMM_STAGE_TIMES on for the buffer; checks the stamps
};

// Applies the case's routing edits to the generated problem.
void editRouting(std::vector<RankInputs>& all, const HtCase& c) {
  if (c.nowhere_every > 0) {
    for (RankInputs& in : all) {
      for (int t = 1; t < in.num_tokens; t += c.nowhere_every) {
        for (int k = 0; k < c.topk; ++k) {
          in.topk_idx[size_t(t) * c.topk + k] = -1;
          in.topk_idx32[size_t(t) * c.topk + k] = -1;
        }
      }
    }
  }
  if (c.all_one_expert < 0) return;
  for (RankInputs& in : all) {
    for (size_t i = 0; i < in.topk_idx.size(); ++i) {
      in.topk_idx[i] = c.all_one_expert;
      in.topk_idx32[i] = c.all_one_expert;
    }
  }
}

ProblemSpec specOf(const HtCase& c, int num_ranks, uint64_t seed) {
  ProblemSpec spec;
  spec.num_ranks = num_ranks;
  spec.hidden = c.hidden;
  spec.num_experts = c.experts;
  spec.num_topk = c.topk;
  spec.tokens_per_rank.assign(num_ranks, c.tokens);
  // Uneven counts, never below 0 (past 16 ranks the pattern repeats).
  for (int r = 0; r < num_ranks && !c.equal_tokens; ++r)
    spec.tokens_per_rank[r] = c.tokens - (c.tokens / 16) * (r % 16);
  if (c.zero_rank >= 0 && c.zero_rank < num_ranks) spec.tokens_per_rank[c.zero_rank] = 0;
  spec.routing = c.routing;
  spec.hot_rank = num_ranks - 1;
  spec.seed = seed;
  return spec;
}

BufferConfig configOf(const HtCase& c) {
  BufferConfig config;
  config.hidden = c.hidden;
  config.num_experts = c.experts;
  config.max_topk = c.max_topk;
  config.max_tokens_per_rank = c.max_tokens;
  config.timeout_s = kAuto;  // EPCOMM_TIMEOUT_S, else 30 s
  return config;
}

int rankNow() {
  return mpiBootstrap()->rank();
}

// Poisons the zero-copy outputs of a previous dispatch (same pointers every call).
void poisonDispatchViews(const DispatchResult& r, const HtCase& c, cudaStream_t stream) {
  const size_t rows = static_cast<size_t>(r.capacity);
  const size_t elem = c.dtype == DType::kBF16 ? 2 : 1;
  poisonDevice(const_cast<void*>(r.recv_x), rows * c.hidden * elem, stream);
  if (r.recv_x_scales) {
    poisonDevice(const_cast<float*>(r.recv_x_scales), rows * (c.hidden / 128) * 4, stream);
  }
  if (r.recv_topk_idx) {
    poisonDevice(const_cast<void*>(r.recv_topk_idx),
                 rows * c.topk * (c.idx_type == IndexType::kInt64 ? 8 : 4), stream);
    poisonDevice(const_cast<float*>(r.recv_topk_weights), rows * c.topk * 4, stream);
  }
  poisonDevice(const_cast<int32_t*>(r.recv_src_idx), rows * 4, stream);
}

// Checks the layout outputs in the handle against the reference.
void checkLayout(const EpHandle& handle, const RankInputs& in, const HtCase& c, int num_ranks) {
  const LayoutRef ref =
      referenceLayout(in.topk_idx.data(), in.num_tokens, c.topk, c.experts, num_ranks);
  const size_t n = static_cast<size_t>(in.num_tokens);
  EXPECT_TRUE(
      compareExact(DeviceArray<int32_t>::downloadFrom(handle.numTokensPerRank(), num_ranks),
                   std::vector<int32_t>(ref.tokens_per_rank.begin(), ref.tokens_per_rank.end()),
                   "numTokensPerRank"));
  EXPECT_TRUE(
      compareExact(DeviceArray<int32_t>::downloadFrom(handle.numTokensPerExpert(), c.experts),
                   std::vector<int32_t>(ref.tokens_per_expert.begin(), ref.tokens_per_expert.end()),
                   "numTokensPerExpert"));
  std::vector<uint8_t> in_rank =
      DeviceArray<uint8_t>::downloadFrom(handle.isTokenInRank(), n * num_ranks);
  EXPECT_TRUE(compareExact(in_rank, ref.is_token_in_rank, "isTokenInRank"));
  EXPECT_TRUE(compareExact(DeviceArray<int32_t>::downloadFrom(handle.tokenSlot(), n * num_ranks),
                           std::vector<int32_t>(ref.token_slot.begin(), ref.token_slot.end()),
                           "tokenSlot"));
}

// Checks every output of a dispatch on this rank against `ref` (from referenceHtDispatch or
// referenceHtDispatchFromLayout with c.alignment). With num_worst_tokens > 0 the views are checked
// over num_worst_tokens rows (padToWorstTokens), the counts still against the real rows.
void checkDispatchAgainst(const DispatchResult& r, HtDispatchRef ref, const HtCase& c,
                          bool with_topk, int num_worst_tokens, const std::string& where) {
  SCOPED_TRACE(where + " rank " + std::to_string(rankNow()));
  const int num_ranks = static_cast<int>(ref.rank_prefix.size()) - 1;
  EXPECT_EQ(r.capacity, int64_t{num_ranks} * c.max_tokens) << "capacity";
  const int n = DeviceArray<int32_t>::downloadFrom(r.num_recv_tokens, 1)[0];
  ASSERT_EQ(n, ref.num_recv) << "received rows";
  ASSERT_LE(n, r.capacity);
  EXPECT_TRUE(compareExact(DeviceArray<int32_t>::downloadFrom(r.recv_rank_prefix, num_ranks + 1),
                           std::vector<int32_t>(ref.rank_prefix.begin(), ref.rank_prefix.end()),
                           "recv_rank_prefix"));
  // Per-expert counts: every dispatch, cached ones included, counts its own routing at its own
  // alignment.
  const int local_experts = c.experts / num_ranks;
  EXPECT_TRUE(compareExact(
      DeviceArray<int32_t>::downloadFrom(r.num_recv_tokens_per_expert, local_experts),
      std::vector<int32_t>(ref.tokens_per_local_expert.begin(), ref.tokens_per_local_expert.end()),
      "num_recv_tokens_per_expert (alignment " + std::to_string(c.alignment) + ")"));
  if (num_worst_tokens > 0)
    padToWorstTokens(ref, num_worst_tokens, c.hidden, with_topk ? c.topk : 0);
  const int n_rows = num_worst_tokens > 0 ? num_worst_tokens : n;
  const size_t rows = static_cast<size_t>(n_rows);
  if (c.dtype == DType::kBF16) {
    std::vector<uint16_t> x = DeviceArray<uint16_t>::downloadFrom(r.recv_x, rows * c.hidden);
    EXPECT_TRUE(compareBf16Exact(x.data(), ref.recv_x_bf16.data(), n_rows, c.hidden, true))
        << "recv_x";
  } else {
    std::vector<uint8_t> x = DeviceArray<uint8_t>::downloadFrom(r.recv_x, rows * c.hidden);
    EXPECT_TRUE(compareExact(x, ref.recv_x_fp8, "recv_x (fp8 bytes)"));
    std::vector<float> s =
        DeviceArray<float>::downloadFrom(r.recv_x_scales, rows * (c.hidden / kFp8BlockSize));
    EXPECT_TRUE(compareExact(s, ref.recv_scales, "recv_x_scales"));
  }
  EXPECT_TRUE(compareExact(DeviceArray<int32_t>::downloadFrom(r.recv_src_idx, rows),
                           std::vector<int32_t>(ref.recv_src_idx.begin(), ref.recv_src_idx.end()),
                           "recv_src_idx"));
  if (with_topk) {
    ASSERT_NE(r.recv_topk_idx, nullptr);
    std::vector<int64_t> idx(rows * c.topk);
    if (c.idx_type == IndexType::kInt64) {
      idx = DeviceArray<int64_t>::downloadFrom(r.recv_topk_idx, rows * c.topk);
    } else {
      std::vector<int32_t> idx32 =
          DeviceArray<int32_t>::downloadFrom(r.recv_topk_idx, rows * c.topk);
      idx.assign(idx32.begin(), idx32.end());
    }
    EXPECT_TRUE(compareExact(idx, ref.recv_topk_idx, "recv_topk_idx"));
    EXPECT_TRUE(compareExact(DeviceArray<float>::downloadFrom(r.recv_topk_weights, rows * c.topk),
                             ref.recv_topk_weights, "recv_topk_weights"));
  } else {
    EXPECT_EQ(r.recv_topk_idx, nullptr);
  }
}

// Checks every output of a dispatch routed by topk_idx (or a cached one of that routing).
void checkDispatch(const DispatchResult& r, const std::vector<RankInputs>& all, const HtCase& c,
                   bool with_topk, const std::string& where, int num_worst_tokens = 0) {
  checkDispatchAgainst(
      r, referenceHtDispatch(all, rankNow(), c.hidden, c.experts, c.topk, c.alignment), c,
      with_topk, num_worst_tokens, where);
}

// Every rank's combine input rows: a deterministic non-zero value per (rank, row, column).
// `routing`: the layouts of a dispatch from DispatchArgs::layout (nullptr: topk routing).
std::vector<std::vector<uint16_t>> combineInputsOfAll(
    const std::vector<RankInputs>& all, const HtCase& c, uint64_t seed,
    const std::vector<LayoutRef>* routing = nullptr) {
  const int num_ranks = static_cast<int>(all.size());
  std::vector<std::vector<uint16_t>> inputs(num_ranks);
  for (int d = 0; d < num_ranks; ++d) {
    const HtDispatchRef ref =
        routing != nullptr
            ? referenceHtDispatchFromLayout(all, *routing, d, c.hidden, c.experts, c.topk, false, 1)
            : referenceHtDispatch(all, d, c.hidden, c.experts, c.topk, 1);
    inputs[d].resize(size_t(ref.num_recv) * c.hidden);
    for (int row = 0; row < ref.num_recv; ++row) {
      for (int col = 0; col < c.hidden; ++col) {
        inputs[d][size_t(row) * c.hidden + col] = expertOutputValue(seed, d, 0, row, col);
      }
    }
  }
  return inputs;
}

std::vector<uint16_t> biasOf(const RankInputs& in, int hidden, uint64_t seed) {
  std::vector<uint16_t> bias(size_t(in.num_tokens) * hidden);
  for (int t = 0; t < in.num_tokens; ++t) {
    for (int col = 0; col < hidden; ++col) {
      bias[size_t(t) * hidden + col] = expertOutputValue(seed ^ 0xb1a5, 1000 + in.rank, 0, t, col);
    }
  }
  return bias;
}

// CombineArgs::recv_topk_weights: none, DispatchResult::recv_topk_weights as dispatched (read in
// place), or other values in separate memory (copied into the buffer first).
enum class CombinedWeights { kNone, kInPlace, kCopyIn };

// A non-zero float for rank d's received-weight entry (row, k) in the copy-in variant.
float recvWeightValue(uint64_t seed, int d, int row, int k) {
  const uint64_t h = mix64(hashCombine(hashCombine(hashCombine(seed, d), row), k));
  return 0.0625f + static_cast<float>(h % 1024) / 256.0f;  // exact in float, sums too
}

// Runs combine with this rank's rows from `inputs` and checks the output (and the combined top-k
// weights). `routing`: the layouts of a dispatch from DispatchArgs::layout (nullptr: topk).
void runAndCheckCombine(EpBuffer& buffer, const EpHandle& handle, const DispatchResult& r,
                        const std::vector<RankInputs>& all, const HtCase& c,
                        const std::vector<std::vector<uint16_t>>& inputs, bool zero_copy,
                        bool weighted, bool with_bias, cudaStream_t stream,
                        const std::string& where, CombinedWeights combined = CombinedWeights::kNone,
                        const std::vector<LayoutRef>* routing = nullptr) {
  SCOPED_TRACE(where + " rank " + std::to_string(rankNow()) +
               (zero_copy ? " zero-copy" : " copy-in") + (weighted ? " weighted" : "") +
               (with_bias ? " bias" : "") +
               (combined == CombinedWeights::kInPlace  ? " combined weights (in place)"
                : combined == CombinedWeights::kCopyIn ? " combined weights (copied in)"
                                                       : ""));
  const int me = rankNow();
  const RankInputs& in = all[me];
  DeviceArray<uint16_t> x_separate(std::max<size_t>(inputs[me].size(), 8));
  if (zero_copy) {
    if (!inputs[me].empty()) {
      EPCOMM_TEST_CUDA(cudaMemcpy(r.combine_input, inputs[me].data(), inputs[me].size() * 2,
                                  cudaMemcpyHostToDevice));
    }
  } else {
    x_separate.upload(inputs[me]);
    // NaN in every row of the combine-input region: a copy-in combine stages there only the rows
    // its peers read, and reads its own rows from x, so no row of it may come from here unstaged.
    EPCOMM_TEST_CUDA(
        cudaMemsetAsync(r.combine_input, 0xff, size_t(r.capacity) * size_t(c.hidden) * 2, stream));
  }
  DeviceArray<uint16_t> bias(std::max<size_t>(size_t(in.num_tokens) * c.hidden, 8));
  const std::vector<uint16_t> bias_host = biasOf(in, c.hidden, c.seed);
  bias.upload(bias_host);
  DeviceArray<float> weights(std::max<size_t>(in.topk_weights.size(), 1));
  weights.upload(in.topk_weights);
  DeviceArray<uint16_t> out(std::max<size_t>(size_t(in.num_tokens) * c.hidden, 8));
  out.poison();

  // Every rank's received-weight rows [num_recv_d, K], as this rank's combine will see them.
  const int num_ranks = static_cast<int>(all.size());
  const std::vector<LayoutRef> layouts =
      routing != nullptr ? *routing : referenceLayouts(all, c.experts, c.topk);
  std::vector<std::vector<float>> recv_weights(num_ranks);
  for (int d = 0; d < num_ranks && combined != CombinedWeights::kNone; ++d) {
    const HtDispatchRef ref =
        referenceHtDispatchFromLayout(all, layouts, d, c.hidden, c.experts, c.topk, true, 1);
    recv_weights[d] = ref.recv_topk_weights;
    if (combined == CombinedWeights::kCopyIn) {
      for (int row = 0; row < ref.num_recv; ++row)
        for (int k = 0; k < c.topk; ++k)
          recv_weights[d][size_t(row) * c.topk + k] = recvWeightValue(c.seed, d, row, k);
    }
  }
  DeviceArray<float> recv_weights_dev(std::max<size_t>(recv_weights[me].size(), 1));
  recv_weights_dev.upload(recv_weights[me]);
  DeviceArray<float> combined_out(std::max<size_t>(size_t(in.num_tokens) * c.topk, 1));
  combined_out.poison();

  CombineArgs args;
  args.x = zero_copy ? r.combine_input : x_separate.get();
  args.scale_weights = weighted ? weights.get() : nullptr;
  args.bias = with_bias ? bias.get() : nullptr;
  args.out = out.get();
  if (combined != CombinedWeights::kNone) {
    args.recv_topk_weights =
        combined == CombinedWeights::kInPlace ? r.recv_topk_weights : recv_weights_dev.get();
    args.combined_topk_weights = combined_out.get();
  }
  buffer.combine(args, handle, stream);
  buffer.sync(stream);

  const std::vector<float> expected =
      referenceHtCombine(all, me, inputs, c.hidden, c.experts, c.topk, weighted,
                         with_bias ? bias_host.data() : nullptr, routing);
  EXPECT_TRUE(compareBf16Near(out.download(size_t(in.num_tokens) * c.hidden), expected, c.hidden))
      << "combine out";
  if (combined != CombinedWeights::kNone) {
    EXPECT_TRUE(compareExact(combined_out.download(size_t(in.num_tokens) * c.topk),
                             referenceCombinedTopkWeights(layouts, me, recv_weights, c.topk),
                             "combined_topk_weights [token, k] (row = token, column = k)"));
  }
}

// The full check of one case: layout, dispatch (copies and zero-copy views), combine in its
// variants, the identity combine(dispatch(x)) = x * ranks, and a cached re-dispatch.
void runCase(const HtCase& c) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int num_ranks = bs.size();
  const int me = bs.rank();
  if (c.experts % num_ranks != 0)
    GTEST_SKIP() << c.experts << " experts on " << num_ranks << " ranks";
  std::optional<StageTimesOn> stage_times;
  if (c.stage_times) stage_times.emplace();
  EpBuffer buffer(bs, configOf(c));
  stage_times.reset();
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  std::vector<RankInputs> all = generateProblem(specOf(c, num_ranks, c.seed));
  editRouting(all, c);
  const RankInputs& in = all[me];
  HtDeviceInputs dev(in, c);

  // 1. dispatch with copies to poisoned caller buffers (exact mode)
  const size_t capacity = size_t(num_ranks) * c.max_tokens;
  const size_t elem = c.dtype == DType::kBF16 ? 2 : 1;
  DeviceArray<uint8_t> recv_copy(capacity * c.hidden * elem);
  DeviceArray<float> scales_copy(capacity * (c.hidden / 128));
  recv_copy.poison();
  scales_copy.poison();
  DispatchArgs args = dev.args(in, c, true);
  args.exact_count = true;
  args.recv_x_out = recv_copy.get();
  if (c.dtype == DType::kFP8E4M3) args.recv_scales_out = scales_copy.get();
  DispatchResult first = buffer.dispatch(args, handle, stream.get());
  buffer.sync(stream.get());
  const HtDispatchRef ref = referenceHtDispatch(all, me, c.hidden, c.experts, c.topk, c.alignment);
  EXPECT_EQ(first.num_recv_tokens_host, ref.num_recv);
  if (c.dtype == DType::kBF16) {
    std::vector<uint16_t> x =
        DeviceArray<uint16_t>::downloadFrom(recv_copy.get(), size_t(ref.num_recv) * c.hidden);
    EXPECT_TRUE(compareBf16Exact(x.data(), ref.recv_x_bf16.data(), ref.num_recv, c.hidden, true))
        << "recv_x_out copy";
  } else {
    EXPECT_TRUE(compareExact(recv_copy.download(size_t(ref.num_recv) * c.hidden), ref.recv_x_fp8,
                             "recv_x_out copy (fp8)"));
    EXPECT_TRUE(compareExact(scales_copy.download(size_t(ref.num_recv) * (c.hidden / 128)),
                             ref.recv_scales, "recv_scales_out copy"));
  }
  checkLayout(handle, in, c, num_ranks);

  // 2. again into poisoned zero-copy views
  poisonDispatchViews(first, c, stream.get());
  args = dev.args(in, c, true);
  DispatchResult r = buffer.dispatch(args, handle, stream.get());
  buffer.sync(stream.get());
  EXPECT_EQ(r.num_recv_tokens_host, -1);
  checkDispatch(r, all, c, true, "zero-copy dispatch");

  // 3. combine variants
  const std::vector<std::vector<uint16_t>> inputs = combineInputsOfAll(all, c, c.seed + 99);
  runAndCheckCombine(buffer, handle, r, all, c, inputs, true, false, false, stream.get(),
                     "combine");
  runAndCheckCombine(buffer, handle, r, all, c, inputs, false, true, true, stream.get(), "combine",
                     CombinedWeights::kInPlace);
  runAndCheckCombine(buffer, handle, r, all, c, inputs, true, true, false, stream.get(), "combine",
                     CombinedWeights::kCopyIn);

  // 4. identity: combine(dispatch(x)) = x * (number of ranks the token went to), BF16 only
  if (c.dtype == DType::kBF16) {
    DispatchResult again = buffer.dispatch(dev.args(in, c, true), handle, stream.get());
    DeviceArray<uint16_t> out(std::max<size_t>(size_t(in.num_tokens) * c.hidden, 8));
    out.poison();
    CombineArgs cargs;
    cargs.x = again.recv_x;
    cargs.out = out.get();
    buffer.combine(cargs, handle, stream.get());
    buffer.sync(stream.get());
    const LayoutRef layout =
        referenceLayout(in.topk_idx.data(), in.num_tokens, c.topk, c.experts, num_ranks);
    std::vector<float> expected(size_t(in.num_tokens) * c.hidden);
    for (int t = 0; t < in.num_tokens; ++t) {
      int ranks = 0;
      for (int d = 0; d < num_ranks; ++d)
        ranks += layout.is_token_in_rank[size_t(t) * num_ranks + d];
      for (int col = 0; col < c.hidden; ++col) {
        expected[size_t(t) * c.hidden + col] =
            bf16ToFloat(in.x_bf16[size_t(t) * c.hidden + col]) * ranks;
      }
    }
    EXPECT_TRUE(compareBf16Near(out.download(expected.size()), expected, c.hidden))
        << "combine(dispatch(x)) != x * ranks";
  }

  // 5. cached dispatch: same routing, new rows, no top-k sent
  std::vector<RankInputs> fresh = generateProblem(specOf(c, num_ranks, c.seed + 1000));
  std::vector<RankInputs> same_routing = all;
  for (int rank = 0; rank < num_ranks; ++rank) {
    same_routing[rank].x_bf16 = fresh[rank].x_bf16;
    same_routing[rank].x_fp8 = fresh[rank].x_fp8;
    same_routing[rank].x_scales = fresh[rank].x_scales;
  }
  dev.upload(same_routing[me], c);
  poisonDispatchViews(first, c, stream.get());
  DispatchResult cached =
      buffer.dispatch(dev.args(same_routing[me], c, false), handle, stream.get());
  buffer.sync(stream.get());
  checkDispatch(cached, same_routing, c, false, "cached dispatch");

  if (c.stage_times && !anyRankFailed()) {
    namespace l = kernels::layout_stage;
    namespace d = kernels::ht_dispatch_stage;
    namespace cb = kernels::ht_combine_stage;
    std::vector<int> layout_stages = {l::kAllStarted, l::kHistZeroed, l::kRouted, l::kScanned,
                                      l::kTileEnd};
    // Two tiles or more: the look-back and the last block (the layout of all[me]).
    if (all[me].num_tokens > kernels::kLayoutThreads) {
      layout_stages.insert(layout_stages.end(), {l::kLookBack, l::kLastBlockEnd});
    }
    expectStagesStamped(
        buffer, stream.get(),
        {{kernels::StageKernel::kLayout, layout_stages},
         {kernels::StageKernel::kHtDispatch,
          {d::kAllStarted, d::kCountsPosted, d::kCountsWaited, d::kChecked, d::kExpertCounts,
           d::kRowsCopied, d::kDonePosted, d::kDoneWaited, d::kEnd}},
         {kernels::StageKernel::kHtCombine,
          {cb::kAllStarted, cb::kReadyPosted, cb::kReadyWaited, cb::kPulled, cb::kDonePosted,
           cb::kDoneWaited, cb::kEnd}}});
  }
}

TEST(HtDispatchCombine, UniformBf16) {
  runCase(HtCase{});
}

// EPCOMM_STAGE_TIMES=1 (docs/perf-notes.md, "Stage times"): the layout, dispatch and combine
// kernels stamp every stage and every result is still exact (with a rank of 0 tokens too, and
// with 600 tokens, whose layout takes two tiles: the look-back and the last block).
TEST(HtStageTimes, StampsEveryStageResultsUnchanged) {
  for (int zero_rank : {-1, 0}) {
    HtCase c;
    c.stage_times = true;
    c.zero_rank = zero_rank;
    c.tokens = zero_rank < 0 ? 600 : 192;
    c.max_tokens = 640;
    c.seed = 800 + zero_rank;
    SCOPED_TRACE("zero_rank " + std::to_string(zero_rank));
    runCase(c);
    if (anyRankFailed()) return;
  }
}

TEST(HtDispatchCombine, SkewedRouting) {
  HtCase c;
  c.routing = Routing::kSkewed;
  runCase(c);
}

TEST(HtDispatchCombine, RankWithZeroTokens) {
  HtCase c;
  c.zero_rank = 0;
  runCase(c);
}

TEST(HtDispatchCombine, NegativeEntriesAndInt32Ids) {
  HtCase c;
  c.routing = Routing::kWithNegatives;
  c.idx_type = IndexType::kInt32;
  c.alignment = 4;
  runCase(c);
}

TEST(HtDispatchCombine, TopkVariants) {
  for (int topk : {1, 2, 8, 9}) {
    HtCase c;
    c.topk = topk;
    c.max_topk = 16;
    c.hidden = 1024;
    c.tokens = 128;
    c.seed = 100 + topk;
    SCOPED_TRACE("topk " + std::to_string(topk));
    runCase(c);
  }
}

TEST(HtDispatchCombine, HiddenSizesBf16AndFp8) {
  for (int hidden : {2048, 4096, 5120, 7168, 8192}) {
    for (DType dtype : {DType::kBF16, DType::kFP8E4M3}) {
      HtCase c;
      c.hidden = hidden;
      c.dtype = dtype;
      c.tokens = 96;
      c.max_tokens = 128;
      c.column_major_scales = hidden == 5120;
      c.seed = hidden + (dtype == DType::kBF16 ? 0 : 1);
      SCOPED_TRACE("hidden " + std::to_string(hidden) + (dtype == DType::kBF16 ? " bf16" : " fp8"));
      runCase(c);
    }
  }
}

TEST(HtDispatchCombine, MaxExperts) {
  HtCase c;
  c.experts = kMaxExperts;
  c.hidden = 1024;
  runCase(c);
}

// Issue 11 item 7: 896 and 1024 experts with top-16, so that a token reaches many ranks (up to 16
// at 16 ranks, past the 8-rank limit the kernels once had): BF16 and FP8, uniform and skewed.
// 960 experts also divide 24, 40 and 48 ranks (EPCOMM_MANY_RANK_TESTS runs this at 40 ranks).
TEST(HtDispatchCombine, Top16Of896And1024Experts) {
  for (int experts : {896, 960, 1024}) {
    if (experts % mpiBootstrap()->size() != 0) continue;  // a skip would hide the other counts
    for (DType dtype : {DType::kBF16, DType::kFP8E4M3}) {
      HtCase c;
      c.experts = experts;
      c.topk = 16;
      c.max_topk = 16;
      c.hidden = 1024;
      c.tokens = 128;
      c.max_tokens = 128;
      c.dtype = dtype;
      c.alignment = experts == 896 ? 1 : 8;
      c.routing = dtype == DType::kBF16 ? Routing::kUniform : Routing::kSkewed;
      c.seed = experts + (dtype == DType::kBF16 ? 0 : 1);
      SCOPED_TRACE(std::to_string(experts) + " experts" +
                   (dtype == DType::kBF16 ? " bf16" : " fp8"));
      runCase(c);
    }
  }
}

// Issue 9 item 1: an expert id repeated within a token's top-k counts once (ops.hpp, "Routing
// policy"), checked against the reference model, including every entry of every token naming
// expert 0 (the input that used to overflow a slab in LL).
TEST(HtDispatchCombine, RepeatedExpertIdsCountOnce) {
  for (IndexType idx : {IndexType::kInt64, IndexType::kInt32}) {
    HtCase c;
    c.routing = Routing::kWithDuplicates;
    c.idx_type = idx;
    c.hidden = 1024;
    c.seed = idx == IndexType::kInt64 ? 61 : 62;
    SCOPED_TRACE(idx == IndexType::kInt64 ? "int64 ids" : "int32 ids");
    runCase(c);
  }
  HtCase c;
  c.all_one_expert = 0;
  c.hidden = 512;
  c.tokens = 256;
  SCOPED_TRACE("every entry is expert 0");
  runCase(c);
}

// Issue 9 item 3: a rank with 0 tokens may pass topk.idx == nullptr; the others must not wait for
// its expert counts.
TEST(HtDispatchCombine, ZeroTokenRankWithNullTopk) {
  for (int zero_rank : {0, worldSize() - 1}) {
    HtCase c;
    c.zero_rank = zero_rank;
    c.null_topk_when_empty = true;
    c.hidden = 1024;
    c.seed = 70 + zero_rank;
    SCOPED_TRACE("rank " + std::to_string(zero_rank) + " has 0 tokens and topk.idx == nullptr");
    runCase(c);
    if (anyRankFailed()) break;
  }
}

// `iters` dispatch/combine pairs on `buffer`, each checked against the CPU model: seeds
// first_seed + i, routing with -1 entries on even iterations, the combine zero-copy on even
// iterations and with copied-in combined weights on every third.
void runCheckedPairs(EpBuffer& buffer, HtCase c, uint64_t first_seed, int iters) {
  Bootstrap& bs = *mpiBootstrap();
  const int me = bs.rank();
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  for (int iter = 0; iter < iters; ++iter) {
    c.seed = first_seed + iter;
    c.routing = iter % 2 == 0 ? Routing::kWithNegatives : Routing::kUniform;
    const std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), c.seed));
    HtDeviceInputs dev(all[me], c);
    DispatchResult r = buffer.dispatch(dev.args(all[me], c, true), handle, stream.get());
    const std::vector<std::vector<uint16_t>> inputs = combineInputsOfAll(all, c, c.seed);
    buffer.sync(stream.get());
    const std::string where = "iteration " + std::to_string(iter);
    checkDispatch(r, all, c, true, where);
    runAndCheckCombine(buffer, handle, r, all, c, inputs, iter % 2 == 0, true, false, stream.get(),
                       where, iter % 3 == 1 ? CombinedWeights::kCopyIn : CombinedWeights::kNone);
    buffer.synchronizingBarrier(stream.get());
    if (anyRankFailed()) break;
  }
}

// Issue 9 item 9 (item 7 of the brief): the call counters cross 2^32 (the 32-bit epoch part of
// the tagged signal words wraps) with every call still correct.
TEST(HtDispatchCombine, CallCounterWrapsPast2To32) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  HtCase c;
  c.hidden = 512;
  c.tokens = 64;
  c.max_tokens = 64;
  BufferConfig config = configOf(c);
  config.timeout_s = 10;
  EpBuffer buffer(bs, config);
  testing::setCallCounterForTesting(buffer, bs, (uint64_t{1} << 32) - 3);
  runCheckedPairs(buffer, c, 7000, 7);
}

// A buffer whose memory starts as garbage (every byte 0xFF, as an earlier buffer's signals could
// leave reused memory) works from its first call: nothing reads a word that creation did not
// initialize. With EPCOMM_PERF ht_push_combine this covers the push combine's chunk flags, the
// only epoch words outside the control region (left as they were, the first combine would sum
// rows nobody pushed).
TEST(HtDispatchCombine, FirstCallsAreCorrectOnPoisonedMemory) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  HtCase c;
  c.hidden = 512;
  c.tokens = 64;
  c.max_tokens = 64;
  BufferConfig config = configOf(c);
  config.timeout_s = 10;
  std::optional<EpBuffer> buffer;
  {
    const PoisonNewBuffers poison;
    buffer.emplace(bs, config);
  }
  runCheckedPairs(*buffer, c, 7100, 3);
}

// 100 back-to-back dispatch/combine pairs with new routing every time, checked every time.
TEST(HtDispatchCombine, BackToBackChangingRouting) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int num_ranks = bs.size();
  const int me = bs.rank();
  HtCase c;
  c.hidden = 512;
  c.tokens = 64;
  c.max_tokens = 64;
  EpBuffer buffer(bs, configOf(c));
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  std::vector<RankInputs> all = generateProblem(specOf(c, num_ranks, 1));
  HtDeviceInputs dev(all[me], c);
  for (int iter = 0; iter < 100; ++iter) {
    c.seed = 5000 + iter;
    c.routing = iter % 3 == 0   ? Routing::kSkewed
                : iter % 3 == 1 ? Routing::kWithNegatives
                                : Routing::kUniform;
    all = generateProblem(specOf(c, num_ranks, c.seed));
    dev.upload(all[me], c);
    DispatchResult r = buffer.dispatch(dev.args(all[me], c, true), handle, stream.get());
    const std::vector<std::vector<uint16_t>> inputs = combineInputsOfAll(all, c, c.seed);
    buffer.sync(stream.get());
    checkDispatch(r, all, c, true, "iteration " + std::to_string(iter));
    runAndCheckCombine(buffer, handle, r, all, c, inputs, iter % 2 == 0, iter % 4 < 2, false,
                       stream.get(), "iteration " + std::to_string(iter));
    if (anyRankFailed()) break;
  }
}

// dispatch (with layout) + combine captured in a CUDA graph: replays with new inputs give what
// eager calls give.
TEST(HtDispatchCombine, GraphReplayEqualsEager) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int num_ranks = bs.size();
  const int me = bs.rank();
  HtCase c;
  c.hidden = 1024;
  c.tokens = 96;
  c.max_tokens = 128;
  EpBuffer buffer(bs, configOf(c));
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  std::vector<RankInputs> all = generateProblem(specOf(c, num_ranks, 11));
  HtDeviceInputs dev(all[me], c);
  const size_t out_elems = std::max<size_t>(size_t(c.tokens) * c.hidden, 8);
  DeviceArray<uint16_t> combine_x(size_t(num_ranks) * c.max_tokens * c.hidden);
  DeviceArray<uint16_t> out(out_elems);

  // Capture.
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  EPCOMM_TEST_CUDA(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeThreadLocal));
  DispatchResult r = buffer.dispatch(dev.args(all[me], c, true), handle, stream.get());
  CombineArgs cargs;
  cargs.x = combine_x.get();
  cargs.out = out.get();
  buffer.combine(cargs, handle, stream.get());
  EPCOMM_TEST_CUDA(cudaStreamEndCapture(stream.get(), &graph));
  EPCOMM_TEST_CUDA(cudaGraphInstantiate(&exec, graph, 0));

  for (int replay = 0; replay < 4; ++replay) {
    SCOPED_TRACE("replay " + std::to_string(replay));
    all = generateProblem(specOf(c, num_ranks, 200 + replay));
    dev.upload(all[me], c);
    const std::vector<std::vector<uint16_t>> inputs = combineInputsOfAll(all, c, 300 + replay);
    combine_x.upload(inputs[me]);
    out.poison();
    poisonDispatchViews(r, c, stream.get());
    EPCOMM_TEST_CUDA(cudaStreamSynchronize(stream.get()));
    EPCOMM_TEST_CUDA(cudaGraphLaunch(exec, stream.get()));
    buffer.sync(stream.get());
    checkDispatch(r, all, c, true, "graph");
    const std::vector<uint16_t> graph_out = out.download(size_t(all[me].num_tokens) * c.hidden);
    const std::vector<float> expected =
        referenceHtCombine(all, me, inputs, c.hidden, c.experts, c.topk, false, nullptr);
    EXPECT_TRUE(compareBf16Near(graph_out, expected, c.hidden));
    // The same calls eagerly give bit-identical results.
    out.poison();
    buffer.dispatch(dev.args(all[me], c, true), handle, stream.get());
    buffer.combine(cargs, handle, stream.get());
    buffer.sync(stream.get());
    EXPECT_TRUE(compareExact(out.download(graph_out.size()), graph_out, "eager vs graph"));
  }
  EPCOMM_TEST_CUDA(cudaGraphExecDestroy(exec));
  EPCOMM_TEST_CUDA(cudaGraphDestroy(graph));
}

// --- issue 11: layout input, cached dispatch counts, static shapes, combined weights -----------

// A caller's layout (DispatchArgs::layout) of this rank on the device.
struct DeviceLayout {
  DeviceArray<int32_t> per_rank;
  DeviceArray<uint8_t> in_rank;
  DeviceArray<int32_t> per_expert;
  explicit DeviceLayout(const LayoutRef& l)
      : per_rank(std::vector<int32_t>(l.tokens_per_rank.begin(), l.tokens_per_rank.end())),
        in_rank(std::max<size_t>(l.is_token_in_rank.size(), 1)),
        per_expert(std::vector<int32_t>(l.tokens_per_expert.begin(), l.tokens_per_expert.end())) {
    in_rank.upload(l.is_token_in_rank);
  }
  DispatchLayout view() const {
    return DispatchLayout{per_rank.get(), reinterpret_cast<const bool*>(in_rank.get()),
                          per_expert.get()};
  }
};

// Every rank's layout as referenceLayout computes it, plus extra destinations: token t with
// t % 5 == 2 also goes to rank (t / 5) % R (allowed with top-k too: it only adds ranks). The
// per-expert counts stay those of topk_idx.
std::vector<LayoutRef> layoutsWithExtraRanks(const std::vector<RankInputs>& all, const HtCase& c) {
  std::vector<LayoutRef> layouts = referenceLayouts(all, c.experts, c.topk);
  const int num_ranks = static_cast<int>(all.size());
  for (int s = 0; s < num_ranks; ++s) {
    LayoutRef& l = layouts[s];
    for (int t = 2; t < all[s].num_tokens; t += 5) {
      uint8_t& cell = l.is_token_in_rank[size_t(t) * num_ranks + (t / 5) % num_ranks];
      if (!cell) {
        cell = 1;
        ++l.tokens_per_rank[(t / 5) % num_ranks];
      }
    }
    l.token_slot.clear();  // recomputed by the reference from is_token_in_rank
  }
  return layouts;
}

// Issue 11 item 1: dispatch from a precomputed layout, with and without top-k, against the
// reference; ranks may mix routing sources (layout on even ranks, topk on odd ones) in one call;
// combine (and combined weights) follow the layout's routing; the handle holds it afterwards, so a
// cached dispatch with another alignment counts it again.
TEST(HtLayoutInput, DispatchFromLayoutWithAndWithoutTopk) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int num_ranks = bs.size();
  const int me = bs.rank();
  for (int variant = 0; variant < 3; ++variant) {
    // 0: layout + top-k on every rank; 1: layout only (no top-k sent); 2: layout + top-k on even
    // ranks, top-k alone on odd ranks (the routing source need not match across ranks).
    const bool with_topk = variant != 1;
    const bool use_layout = variant != 2 || me % 2 == 0;
    SCOPED_TRACE("variant " + std::to_string(variant));
    HtCase c;
    c.hidden = 1024;
    c.alignment = 2;
    c.routing = variant == 1 ? Routing::kWithNegatives : Routing::kUniform;
    c.nowhere_every = 6;
    c.seed = 400 + variant;
    c.zero_rank = variant == 1 ? num_ranks - 1 : -1;
    EpBuffer buffer(bs, configOf(c));
    EpHandle handle = buffer.createHandle();
    TestStream stream;
    std::vector<RankInputs> all = generateProblem(specOf(c, num_ranks, c.seed));
    editRouting(all, c);
    std::vector<LayoutRef> layouts = layoutsWithExtraRanks(all, c);
    if (variant == 2) {  // odd ranks route from topk: their layout is topk's
      const std::vector<LayoutRef> plain = referenceLayouts(all, c.experts, c.topk);
      for (int s = 1; s < num_ranks; s += 2) layouts[s] = plain[s];
    }
    const RankInputs& in = all[me];
    HtDeviceInputs dev(in, c);
    const DeviceLayout dev_layout(layouts[me]);

    DispatchArgs args = dev.args(in, c, with_topk);
    if (use_layout) args.layout = dev_layout.view();
    args.exact_count = true;
    DispatchResult r = buffer.dispatch(args, handle, stream.get());
    buffer.sync(stream.get());
    const HtDispatchRef ref = referenceHtDispatchFromLayout(all, layouts, me, c.hidden, c.experts,
                                                            c.topk, with_topk, c.alignment);
    EXPECT_EQ(r.num_recv_tokens_host, ref.num_recv);
    ASSERT_NE(r.num_recv_tokens_per_expert_host, nullptr);
    EXPECT_TRUE(compareExact(
        std::vector<int32_t>(r.num_recv_tokens_per_expert_host,
                             r.num_recv_tokens_per_expert_host + c.experts / num_ranks),
        std::vector<int32_t>(ref.tokens_per_local_expert.begin(),
                             ref.tokens_per_local_expert.end()),
        "num_recv_tokens_per_expert_host"));
    checkDispatchAgainst(r, ref, c, with_topk, 0, "layout dispatch");
    // The handle now holds the layout's routing.
    EXPECT_TRUE(
        compareExact(DeviceArray<int32_t>::downloadFrom(handle.numTokensPerRank(), num_ranks),
                     std::vector<int32_t>(layouts[me].tokens_per_rank.begin(),
                                          layouts[me].tokens_per_rank.end()),
                     "handle numTokensPerRank"));
    EXPECT_TRUE(compareExact(DeviceArray<uint8_t>::downloadFrom(handle.isTokenInRank(),
                                                                size_t(in.num_tokens) * num_ranks),
                             layouts[me].is_token_in_rank, "handle isTokenInRank"));

    // Combine follows the layout's routing.
    const std::vector<std::vector<uint16_t>> inputs =
        combineInputsOfAll(all, c, c.seed + 1, &layouts);
    runAndCheckCombine(buffer, handle, r, all, c, inputs, true, false, true, stream.get(),
                       "combine after layout dispatch",
                       with_topk ? CombinedWeights::kCopyIn : CombinedWeights::kNone, &layouts);
    if (with_topk) {
      runAndCheckCombine(buffer, handle, r, all, c, inputs, false, true, false, stream.get(),
                         "combine after layout dispatch", CombinedWeights::kInPlace, &layouts);
    }

    // Cached dispatch of the same routing with another alignment.
    HtCase c8 = c;
    c8.alignment = 8;
    poisonDispatchViews(r, c, stream.get());
    DispatchArgs cached = dev.args(in, c8, false);
    DispatchResult rc = buffer.dispatch(cached, handle, stream.get());
    buffer.sync(stream.get());
    checkDispatchAgainst(rc,
                         referenceHtDispatchFromLayout(all, layouts, me, c.hidden, c.experts,
                                                       c.topk, false, c8.alignment),
                         c8, false, 0, "cached dispatch after a layout dispatch");
    if (anyRankFailed()) break;
  }
}

// Issue 11 item 1: the handle's layout outputs after EpBuffer::layout() are a valid
// DispatchArgs::layout (DeepEP's get_dispatch_layout, then dispatch), with repeated ids in the
// routing: the device checks accept them, with and without top-k, and the results match.
TEST(HtLayoutInput, LayoutOfAnotherHandleIsAValidLayout) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int num_ranks = bs.size();
  const int me = bs.rank();
  HtCase c;
  c.hidden = 512;
  c.routing = Routing::kWithDuplicates;
  c.idx_type = IndexType::kInt32;
  c.seed = 48;
  EpBuffer buffer(bs, configOf(c));
  EpHandle source = buffer.createHandle();
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  const std::vector<RankInputs> all = generateProblem(specOf(c, num_ranks, c.seed));
  HtDeviceInputs dev(all[me], c);
  buffer.layout(dev.args(all[me], c, true).topk, source, stream.get());
  const DispatchLayout layout{source.numTokensPerRank(), source.isTokenInRank(),
                              source.numTokensPerExpert()};
  for (bool with_topk : {true, false}) {
    SCOPED_TRACE(with_topk ? "layout + top-k" : "layout only");
    DispatchArgs args = dev.args(all[me], c, with_topk);
    args.layout = layout;
    DispatchResult r = buffer.dispatch(args, handle, stream.get());
    buffer.sync(stream.get());
    checkDispatchAgainst(
        r,
        referenceHtDispatchFromLayout(all, referenceLayouts(all, c.experts, c.topk), me, c.hidden,
                                      c.experts, c.topk, with_topk, c.alignment),
        c, with_topk, 0, "dispatch from another handle's layout");
    if (anyRankFailed()) break;
  }
}

// Issue 11 item 1, the bug found by a user: after layout() with a new routing, a cached dispatch
// returned the previous dispatch's per-expert counts at the previous alignment. Every dispatch
// must count its own routing at its own alignment (exact mode's host copy too).
TEST(HtDispatchCombine, CachedDispatchAfterLayoutCountsNewRoutingAtItsAlignment) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int num_ranks = bs.size();
  const int me = bs.rank();
  HtCase a;
  a.hidden = 512;
  a.alignment = 1;
  a.seed = 31;
  HtCase b = a;
  b.seed = 32;
  b.routing = Routing::kSkewed;  // very different per-expert counts from a's
  b.alignment = 4;
  EpBuffer buffer(bs, configOf(a));
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  const std::vector<RankInputs> all_a = generateProblem(specOf(a, num_ranks, a.seed));
  const std::vector<RankInputs> all_b = generateProblem(specOf(b, num_ranks, b.seed));
  HtDeviceInputs dev_a(all_a[me], a);
  HtDeviceInputs dev_b(all_b[me], b);

  DispatchResult r = buffer.dispatch(dev_a.args(all_a[me], a, true), handle, stream.get());
  buffer.sync(stream.get());
  checkDispatch(r, all_a, a, true, "dispatch of routing A");

  buffer.layout(dev_b.args(all_b[me], b, true).topk, handle, stream.get());
  poisonDispatchViews(r, a, stream.get());
  DispatchArgs cached = dev_b.args(all_b[me], b, false);
  cached.exact_count = true;
  DispatchResult rc = buffer.dispatch(cached, handle, stream.get());
  buffer.sync(stream.get());
  checkDispatch(rc, all_b, b, false, "cached dispatch of routing B (layout()), alignment 4");
  const HtDispatchRef ref = referenceHtDispatch(all_b, me, b.hidden, b.experts, b.topk, 4);
  EXPECT_EQ(rc.num_recv_tokens_host, ref.num_recv);
  ASSERT_NE(rc.num_recv_tokens_per_expert_host, nullptr);
  EXPECT_TRUE(compareExact(
      std::vector<int32_t>(rc.num_recv_tokens_per_expert_host,
                           rc.num_recv_tokens_per_expert_host + b.experts / num_ranks),
      std::vector<int32_t>(ref.tokens_per_local_expert.begin(), ref.tokens_per_local_expert.end()),
      "num_recv_tokens_per_expert_host"));

  // Same routing, alignment 16: the counts follow the call.
  HtCase b16 = b;
  b16.alignment = 16;
  DispatchResult r16 = buffer.dispatch(dev_b.args(all_b[me], b16, false), handle, stream.get());
  buffer.sync(stream.get());
  checkDispatch(r16, all_b, b16, false, "cached dispatch of routing B, alignment 16");
  // Combine with the handle uses routing B.
  const std::vector<std::vector<uint16_t>> inputs = combineInputsOfAll(all_b, b, 77);
  runAndCheckCombine(buffer, handle, r16, all_b, b, inputs, true, true, false, stream.get(),
                     "combine after the cached dispatch", CombinedWeights::kCopyIn);
}

// Issue 11 item 3: static shapes. Rows [num_recv, num_worst_tokens) of every view are filled
// (zeros, -1), the caller copies get num_worst_tokens rows, the counts stay real; also in a
// captured graph replayed with changing routing; num_worst_tokens may differ per rank.
TEST(HtStaticShapes, WorstTokensPadEveryViewEagerAndInGraphs) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int num_ranks = bs.size();
  const int me = bs.rank();
  for (DType dtype : {DType::kBF16, DType::kFP8E4M3}) {
    SCOPED_TRACE(dtype == DType::kBF16 ? "bf16" : "fp8");
    HtCase c;
    c.hidden = 1024;
    c.tokens = 96;
    c.max_tokens = 128;
    c.dtype = dtype;
    c.idx_type = dtype == DType::kBF16 ? IndexType::kInt64 : IndexType::kInt32;
    c.seed = dtype == DType::kBF16 ? 500 : 501;
    EpBuffer buffer(bs, configOf(c));
    EpHandle handle = buffer.createHandle();
    TestStream stream;
    const int capacity = num_ranks * c.max_tokens;
    // Every rank receives at most num_ranks * tokens rows; rank-dependent worst sizes.
    const int worst = me % 2 == 0 ? capacity : num_ranks * c.tokens + 3;
    std::vector<RankInputs> all = generateProblem(specOf(c, num_ranks, c.seed));
    HtDeviceInputs dev(all[me], c);
    const size_t elem = dtype == DType::kBF16 ? 2 : 1;
    DeviceArray<uint8_t> x_copy(size_t(capacity) * c.hidden * elem);
    DeviceArray<float> scales_copy(size_t(capacity) * (c.hidden / 128));
    const size_t idx_elem = c.idx_type == IndexType::kInt64 ? 8 : 4;
    DeviceArray<uint8_t> idx_copy(size_t(capacity) * c.topk * idx_elem);
    DeviceArray<float> weights_copy(size_t(capacity) * c.topk);

    // Eager, with the caller copies (rows, scales, top-k ids and weights: one launch).
    x_copy.poison();
    scales_copy.poison();
    idx_copy.poison();
    weights_copy.poison();
    DispatchArgs args = dev.args(all[me], c, true);
    args.num_worst_tokens = worst;
    args.recv_x_out = x_copy.get();
    if (dtype == DType::kFP8E4M3) args.recv_scales_out = scales_copy.get();
    args.recv_topk_idx_out = idx_copy.get();
    args.recv_topk_weights_out = weights_copy.get();
    DispatchResult first = buffer.dispatch(args, handle, stream.get());
    buffer.sync(stream.get());
    poisonDispatchViews(first, c, stream.get());
    DispatchResult r = buffer.dispatch(args, handle, stream.get());
    buffer.sync(stream.get());
    checkDispatch(r, all, c, true, "eager, num_worst_tokens " + std::to_string(worst), worst);
    HtDispatchRef ref = referenceHtDispatch(all, me, c.hidden, c.experts, c.topk, c.alignment);
    padToWorstTokens(ref, worst, c.hidden, c.topk);
    if (dtype == DType::kBF16) {
      std::vector<uint16_t> x =
          DeviceArray<uint16_t>::downloadFrom(x_copy.get(), size_t(worst) * c.hidden);
      EXPECT_TRUE(compareBf16Exact(x.data(), ref.recv_x_bf16.data(), worst, c.hidden, true))
          << "recv_x_out copy of num_worst_tokens rows";
    } else {
      EXPECT_TRUE(compareExact(x_copy.download(size_t(worst) * c.hidden), ref.recv_x_fp8,
                               "recv_x_out copy of num_worst_tokens rows (fp8)"));
      EXPECT_TRUE(compareExact(scales_copy.download(size_t(worst) * (c.hidden / 128)),
                               ref.recv_scales, "recv_scales_out copy of num_worst_tokens rows"));
    }
    std::vector<int64_t> idx(size_t(worst) * c.topk);
    if (c.idx_type == IndexType::kInt64) {
      idx = DeviceArray<int64_t>::downloadFrom(idx_copy.get(), idx.size());
    } else {
      std::vector<int32_t> idx32 = DeviceArray<int32_t>::downloadFrom(idx_copy.get(), idx.size());
      idx.assign(idx32.begin(), idx32.end());
    }
    EXPECT_TRUE(compareExact(idx, ref.recv_topk_idx, "recv_topk_idx_out copy"));
    EXPECT_TRUE(compareExact(weights_copy.download(size_t(worst) * c.topk), ref.recv_topk_weights,
                             "recv_topk_weights_out copy"));

    // Captured: replays with new routing give padded views at the same pointers.
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    DispatchArgs gargs = dev.args(all[me], c, true);
    gargs.num_worst_tokens = worst;
    EPCOMM_TEST_CUDA(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeThreadLocal));
    DispatchResult g = buffer.dispatch(gargs, handle, stream.get());
    EPCOMM_TEST_CUDA(cudaStreamEndCapture(stream.get(), &graph));
    EPCOMM_TEST_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    EXPECT_EQ(g.recv_x, r.recv_x) << "views move between calls";
    EXPECT_EQ(g.recv_topk_idx, r.recv_topk_idx);
    EXPECT_EQ(g.num_recv_tokens_per_expert, r.num_recv_tokens_per_expert);
    for (int replay = 0; replay < 3; ++replay) {
      c.seed = 600 + replay;
      c.routing = replay == 1 ? Routing::kSkewed : Routing::kWithNegatives;
      all = generateProblem(specOf(c, num_ranks, c.seed));
      dev.upload(all[me], c);
      poisonDispatchViews(g, c, stream.get());
      EPCOMM_TEST_CUDA(cudaStreamSynchronize(stream.get()));
      EPCOMM_TEST_CUDA(cudaGraphLaunch(exec, stream.get()));
      buffer.sync(stream.get());
      checkDispatch(g, all, c, true, "graph replay " + std::to_string(replay), worst);
      if (anyRankFailed()) break;
    }
    EPCOMM_TEST_CUDA(cudaGraphExecDestroy(exec));
    EPCOMM_TEST_CUDA(cudaGraphDestroy(graph));
    if (anyRankFailed()) break;
  }
}

// Issue 11 items 3 and 8: the capacity is exactly num_ranks * max_tokens_per_rank rows: every
// rank sending all of its max_tokens_per_rank tokens to rank 0 fits, with num_worst_tokens =
// capacity too.
TEST(HtStaticShapes, ExactCapacityFits) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int num_ranks = bs.size();
  const int me = bs.rank();
  HtCase c;
  c.hidden = 512;
  c.tokens = 64;
  c.max_tokens = 64;
  c.equal_tokens = true;
  c.all_one_expert = 0;
  EpBuffer buffer(bs, configOf(c));
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  std::vector<RankInputs> all = generateProblem(specOf(c, num_ranks, 41));
  editRouting(all, c);
  HtDeviceInputs dev(all[me], c);
  DispatchArgs args = dev.args(all[me], c, true);
  args.num_worst_tokens = num_ranks * c.max_tokens;
  args.exact_count = true;
  DispatchResult r = buffer.dispatch(args, handle, stream.get());
  buffer.sync(stream.get());
  EXPECT_EQ(r.capacity, int64_t{num_ranks} * c.max_tokens);
  EXPECT_EQ(r.num_recv_tokens_host, me == 0 ? r.capacity : 0);
  checkDispatch(r, all, c, true, "every token to rank 0", num_ranks * c.max_tokens);
}

// Issue 11 item 3: more received rows than num_worst_tokens fails the op on every rank: the
// receiving rank names num_worst_tokens, the others name that rank; promptly, never by timeout.
TEST(HtStaticShapes, MoreRowsThanWorstTokensFailsEveryRank) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int me = bs.rank();
  HtCase c;
  c.hidden = 512;
  c.tokens = 32;
  c.max_tokens = 64;
  BufferConfig config = configOf(c);
  config.timeout_s = 30;
  const std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), 42));
  const HtDispatchRef ref0 = referenceHtDispatch(all, 0, c.hidden, c.experts, c.topk, 1);
  ASSERT_GT(ref0.num_recv, 1);
  HtDeviceInputs dev(all[me], c);
  EpBuffer buffer(bs, config);
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  const CallOutcome o = runTimed([&] {
    DispatchArgs a = dev.args(all[me], c, true);
    a.num_worst_tokens = me == 0 ? ref0.num_recv - 1 : 0;
    buffer.dispatch(a, handle, stream.get());
    buffer.sync(stream.get());
  });
  EXPECT_TRUE(o.threw) << "rank " << me << " finished a dispatch over rank 0's num_worst_tokens";
  if (me == 0) {
    EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << o.what;
    EXPECT_NE(o.what.find("num_worst_tokens"), std::string::npos) << o.what;
  } else {
    EXPECT_EQ(o.code, ErrorCode::kRemote) << o.what;
    EXPECT_NE(o.what.find("rank 0"), std::string::npos) << o.what;
  }
  EXPECT_LT(o.seconds, 3.0) << o.what;
}

// Issue 11 item 1: an inconsistent layout held in device memory fails the op on every rank like a
// bad expert id (InvalidArgument naming the field on the rank that passed it, kRemote naming that
// rank on the others), promptly; it is never used as an address.
TEST(HtLayoutInput, InconsistentLayoutFailsEveryRank) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int num_ranks = bs.size();
  const int me = bs.rank();
  HtCase c;
  c.hidden = 512;
  c.tokens = 32;
  c.max_tokens = 64;
  const std::vector<RankInputs> all = generateProblem(specOf(c, num_ranks, 43));
  HtDeviceInputs dev(all[me], c);
  BufferConfig config = configOf(c);
  config.timeout_s = 30;
  struct Bad {
    const char* name;
    const char* text;  // must appear in rank 0's message
    bool with_topk;
    std::function<void(LayoutRef&)> edit;
  };
  const int experts_per_rank = c.experts / num_ranks;
  const std::vector<Bad> cases = {
      {"num_tokens_per_rank off by one", "layout.num_tokens_per_rank[0]", false,
       [](LayoutRef& l) { l.tokens_per_rank[0] += 1; }},
      {"num_tokens_per_expert above its rank's tokens", "layout.num_tokens_per_expert[0]", false,
       [](LayoutRef& l) { l.tokens_per_expert[0] = l.tokens_per_rank[0] + 1; }},
      {"negative num_tokens_per_expert", "layout.num_tokens_per_expert[1]", false,
       [](LayoutRef& l) { l.tokens_per_expert[1] = -7; }},
      {"num_tokens_per_expert disagrees with topk", "topk.idx names expert", true,
       [experts_per_rank](LayoutRef& l) {
         // Move one pair between two experts of rank 0: bounds hold, the topk counts do not.
         l.tokens_per_expert[0] += 1;
         l.tokens_per_expert[experts_per_rank > 1 ? 1 : 0] -= experts_per_rank > 1 ? 1 : 0;
       }},
      {"is_token_in_rank leaves out a topk rank", "layout.is_token_in_rank: token", true,
       [num_ranks](LayoutRef& l) {
         // The first token that goes somewhere loses that destination.
         for (size_t i = 0; i < l.is_token_in_rank.size(); ++i) {
           if (l.is_token_in_rank[i]) {
             l.is_token_in_rank[i] = 0;
             l.tokens_per_rank[i % num_ranks] -= 1;
             break;
           }
         }
       }},
  };
  for (const Bad& bad : cases) {
    SCOPED_TRACE(std::string("rank 0 passes a layout with ") + bad.name);
    std::vector<LayoutRef> layouts = referenceLayouts(all, c.experts, c.topk);
    if (me == 0) bad.edit(layouts[0]);
    const DeviceLayout dev_layout(layouts[me]);
    EpBuffer buffer(bs, config);
    EpHandle handle = buffer.createHandle();
    TestStream stream;
    const CallOutcome o = runTimed([&] {
      DispatchArgs a = dev.args(all[me], c, bad.with_topk);
      a.layout = dev_layout.view();
      buffer.dispatch(a, handle, stream.get());
      buffer.sync(stream.get());
    });
    EXPECT_TRUE(o.threw) << "rank " << me << " finished a dispatch with a bad layout";
    if (me == 0) {
      EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << o.what;
      EXPECT_NE(o.what.find(bad.text), std::string::npos) << o.what;
    } else {
      EXPECT_EQ(o.code, ErrorCode::kRemote) << o.what;
      EXPECT_NE(o.what.find("rank 0"), std::string::npos) << o.what;
    }
    EXPECT_LT(o.seconds, 3.0) << o.what;
    EXPECT_THROW(buffer.barrier(stream.get()), Error);  // broken on every rank
    if (anyRankFailed()) break;
  }
}

// Issue 11 item 8: a token routed nowhere gets its bias row (or zeros) from combine, and 0 in
// combined_topk_weights; checked explicitly on top of the reference comparison.
TEST(HtDispatchCombine, TokenRoutedNowhereIsAlwaysWritten) {
  HtCase c;
  c.hidden = 1024;
  c.nowhere_every = 4;
  c.seed = 44;
  runCase(c);
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int num_ranks = bs.size();
  const int me = bs.rank();
  EpBuffer buffer(bs, configOf(c));
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  std::vector<RankInputs> all = generateProblem(specOf(c, num_ranks, c.seed));
  editRouting(all, c);
  const RankInputs& in = all[me];
  HtDeviceInputs dev(in, c);
  DispatchResult r = buffer.dispatch(dev.args(in, c, true), handle, stream.get());
  const std::vector<std::vector<uint16_t>> inputs = combineInputsOfAll(all, c, 45);
  buffer.sync(stream.get());
  if (!inputs[me].empty()) {
    EPCOMM_TEST_CUDA(cudaMemcpy(r.combine_input, inputs[me].data(), inputs[me].size() * 2,
                                cudaMemcpyHostToDevice));
  }
  const std::vector<uint16_t> bias_host = biasOf(in, c.hidden, c.seed);
  DeviceArray<uint16_t> bias(std::max<size_t>(bias_host.size(), 8));
  bias.upload(bias_host);
  for (bool with_bias : {false, true}) {
    SCOPED_TRACE(with_bias ? "with bias" : "without bias");
    DeviceArray<uint16_t> out(std::max<size_t>(size_t(in.num_tokens) * c.hidden, 8));
    DeviceArray<float> combined(std::max<size_t>(size_t(in.num_tokens) * c.topk, 1));
    out.poison();
    combined.poison();
    CombineArgs args;
    args.x = r.combine_input;
    args.bias = with_bias ? bias.get() : nullptr;
    args.out = out.get();
    args.recv_topk_weights = r.recv_topk_weights;
    args.combined_topk_weights = combined.get();
    buffer.combine(args, handle, stream.get());
    buffer.sync(stream.get());
    const std::vector<uint16_t> got = out.download(size_t(in.num_tokens) * c.hidden);
    const std::vector<float> got_w = combined.download(size_t(in.num_tokens) * c.topk);
    for (int t = 1; t < in.num_tokens; t += c.nowhere_every) {
      const std::vector<uint16_t> want =
          with_bias ? std::vector<uint16_t>(bias_host.begin() + size_t(t) * c.hidden,
                                            bias_host.begin() + size_t(t + 1) * c.hidden)
                    : std::vector<uint16_t>(c.hidden, 0);
      EXPECT_TRUE(compareBf16Exact(got.data() + size_t(t) * c.hidden, want.data(), 1, c.hidden))
          << "token " << t << " (routed nowhere)";
      EXPECT_TRUE(compareExact(got_w.data() + size_t(t) * c.topk,
                               std::vector<float>(c.topk, 0.0f).data(), 1, c.topk,
                               "combined_topk_weights of token " + std::to_string(t)));
      if (::testing::Test::HasFailure()) break;
    }
  }
}

// Issue 11 item 8: with top-k but without topk_weights, recv_topk_weights holds 0.0f in every
// received entry (and the ids are still right).
TEST(HtDispatchCombine, NoDispatchWeightsGiveZeroRecvWeights) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int num_ranks = bs.size();
  const int me = bs.rank();
  HtCase c;
  c.hidden = 512;
  c.seed = 46;
  EpBuffer buffer(bs, configOf(c));
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  std::vector<RankInputs> all = generateProblem(specOf(c, num_ranks, c.seed));
  HtDeviceInputs dev(all[me], c);
  DispatchArgs args = dev.args(all[me], c, true);
  DispatchResult first = buffer.dispatch(args, handle, stream.get());
  buffer.sync(stream.get());
  poisonDispatchViews(first, c, stream.get());
  args.topk_weights = nullptr;
  DispatchResult r = buffer.dispatch(args, handle, stream.get());
  buffer.sync(stream.get());
  for (RankInputs& in : all) std::fill(in.topk_weights.begin(), in.topk_weights.end(), 0.0f);
  checkDispatch(r, all, c, true, "dispatch without topk_weights");
}

// --- bad input -----------------------------------------------------------------------------------

struct BadInput {
  const char* name;
  const char* expected_text;  // must appear in the message
  std::function<void(EpBuffer&, EpHandle&, const RankInputs&, const HtDeviceInputs&, const HtCase&,
                     cudaStream_t)>
      call;
};

// A zero-copy combine after a top-k dispatch, its arguments first edited by `edit(args, result)`.
template <typename Edit>
void combineAfterDispatch(EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d,
                          const HtCase& hc, cudaStream_t s, Edit edit) {
  const DispatchResult r = b.dispatch(d.args(i, hc, true), h, s);
  b.sync(s);
  DeviceArray<uint16_t> out(std::max<size_t>(size_t(i.num_tokens) * hc.hidden, 8));
  CombineArgs a;
  a.x = r.combine_input;
  a.out = out.get();
  edit(a, r);
  b.combine(a, h, s);
}

TEST(HtBadInput, RejectedOnEveryRankBeforeLaunch) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int num_ranks = bs.size();
  const int me = bs.rank();
  HtCase c;
  c.hidden = 512;
  c.tokens = 32;
  c.max_tokens = 64;
  const std::vector<RankInputs> all = generateProblem(specOf(c, num_ranks, 3));
  const RankInputs& in = all[me];
  HtDeviceInputs dev(in, c);

  const std::vector<BadInput> cases = {
      {"num_tokens over capacity", "DispatchArgs::num_tokens",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         DispatchArgs a = d.args(i, hc, true);
         a.num_tokens = hc.max_tokens + 1;
         a.topk.num_tokens = a.num_tokens;
         b.dispatch(a, h, s);
       }},
      {"topk over max_topk", "topk.num_topk",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         DispatchArgs a = d.args(i, hc, true);
         a.topk.num_topk = hc.max_topk + 1;
         b.dispatch(a, h, s);
       }},
      {"null x", "DispatchArgs::x",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         DispatchArgs a = d.args(i, hc, true);
         a.num_tokens = a.topk.num_tokens = 4;
         a.x = nullptr;
         b.dispatch(a, h, s);
       }},
      {"misaligned x", "16-byte aligned",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         DispatchArgs a = d.args(i, hc, true);
         a.x = static_cast<const char*>(a.x) + 2;
         b.dispatch(a, h, s);
       }},
      {"bad dtype", "DispatchArgs::dtype",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         DispatchArgs a = d.args(i, hc, true);
         a.dtype = static_cast<DType>(7);
         b.dispatch(a, h, s);
       }},
      {"fp8 without scales", "DispatchArgs::x_scales",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         DispatchArgs a = d.args(i, hc, true);
         a.num_tokens = a.topk.num_tokens = 4;
         a.dtype = DType::kFP8E4M3;
         a.x_scales = nullptr;
         b.dispatch(a, h, s);
       }},
      {"topk token count mismatch", "topk.num_tokens",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         DispatchArgs a = d.args(i, hc, true);
         a.topk.num_tokens = a.num_tokens + 1;
         b.dispatch(a, h, s);
       }},
      {"expert_alignment 0", "expert_alignment",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         DispatchArgs a = d.args(i, hc, true);
         a.expert_alignment = 0;
         b.dispatch(a, h, s);
       }},
      {"num_sms 0", "num_sms",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         DispatchArgs a = d.args(i, hc, true);
         a.num_sms = 0;
         b.dispatch(a, h, s);
       }},
      {"num_sms above the device", "num_sms",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         DispatchArgs a = d.args(i, hc, true);
         a.num_sms = 100000;
         b.dispatch(a, h, s);
       }},
      {"cached dispatch without a layout", "topk.idx",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) { b.dispatch(d.args(i, hc, false), h, s); }},
      {"layout without num_tokens_per_expert", "DispatchArgs::layout.num_tokens_per_expert",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         DispatchArgs a = d.args(i, hc, true);
         a.layout.num_tokens_per_rank = d.idx32.get();
         a.layout.is_token_in_rank = reinterpret_cast<const bool*>(d.idx32.get());
         b.dispatch(a, h, s);
       }},
      {"layout without is_token_in_rank", "DispatchArgs::layout.is_token_in_rank",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         DispatchArgs a = d.args(i, hc, false);
         a.num_tokens = 4;
         a.layout.num_tokens_per_rank = d.idx32.get();
         a.layout.num_tokens_per_expert = d.idx32.get();
         b.dispatch(a, h, s);
       }},
      {"num_worst_tokens over the capacity", "DispatchArgs::num_worst_tokens",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         DispatchArgs a = d.args(i, hc, true);
         a.num_worst_tokens = worldSize() * hc.max_tokens + 1;
         b.dispatch(a, h, s);
       }},
      {"negative num_worst_tokens", "DispatchArgs::num_worst_tokens",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         DispatchArgs a = d.args(i, hc, true);
         a.num_worst_tokens = -1;
         b.dispatch(a, h, s);
       }},
      {"recv_topk_idx_out without top-k", "DispatchArgs::recv_topk_idx_out",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         DispatchArgs a = d.args(i, hc, false);
         a.recv_topk_idx_out = d.idx32.get();
         b.dispatch(a, h, s);
       }},
      {"recv_topk_weights_out without top-k", "DispatchArgs::recv_topk_weights_out",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         DispatchArgs a = d.args(i, hc, false);
         a.recv_topk_weights_out = reinterpret_cast<float*>(d.idx32.get());
         b.dispatch(a, h, s);
       }},
      {"combined_topk_weights without recv_topk_weights", "CombineArgs::combined_topk_weights",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         combineAfterDispatch(b, h, i, d, hc, s, [&](CombineArgs& a, const DispatchResult&) {
           a.combined_topk_weights = const_cast<float*>(d.weights.get());
         });
       }},
      {"scale_weights after a dispatch without top-k", "CombineArgs::scale_weights",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         const DeviceLayout layout(
             referenceLayout(i.topk_idx.data(), i.num_tokens, hc.topk, hc.experts, worldSize()));
         DispatchArgs da = d.args(i, hc, false);
         da.layout = layout.view();
         const DispatchResult r = b.dispatch(da, h, s);
         b.sync(s);
         DeviceArray<uint16_t> out(std::max<size_t>(size_t(i.num_tokens) * hc.hidden, 8));
         CombineArgs a;
         a.x = r.combine_input;
         a.out = out.get();
         a.scale_weights = d.weights.get();
         b.combine(a, h, s);
       }},
      {"recv_topk_weights after a dispatch without top-k", "CombineArgs::recv_topk_weights",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         const DeviceLayout layout(
             referenceLayout(i.topk_idx.data(), i.num_tokens, hc.topk, hc.experts, worldSize()));
         DispatchArgs da = d.args(i, hc, false);
         da.layout = layout.view();
         const DispatchResult r = b.dispatch(da, h, s);
         b.sync(s);
         DeviceArray<uint16_t> out(std::max<size_t>(size_t(i.num_tokens) * hc.hidden, 8));
         DeviceArray<float> combined(std::max<size_t>(size_t(i.num_tokens) * hc.topk, 1));
         CombineArgs a;
         a.x = r.combine_input;
         a.out = out.get();
         a.recv_topk_weights = d.weights.get();
         a.combined_topk_weights = combined.get();
         b.combine(a, h, s);
       }},
      // Peers push into the combine input (or the staging copy writes it) while x is read.
      {"x a row inside the combine input", "CombineArgs::x",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         combineAfterDispatch(b, h, i, d, hc, s, [&](CombineArgs& a, const DispatchResult& r) {
           a.x = static_cast<uint16_t*>(r.combine_input) + hc.hidden;
         });
       }},
      {"combine before dispatch", "handle",
       [](EpBuffer& b, EpHandle& h, const RankInputs& i, const HtDeviceInputs& d, const HtCase& hc,
          cudaStream_t s) {
         CombineArgs a;
         a.x = d.x_bf16.get();
         a.out = const_cast<uint16_t*>(d.x_bf16.get());
         b.combine(a, h, s);
       }},
  };
  for (const BadInput& bad : cases) {
    SCOPED_TRACE(bad.name);
    EpBuffer buffer(bs, configOf(c));
    EpHandle handle = buffer.createHandle();
    TestStream stream;
    bool threw = false;
    try {
      bad.call(buffer, handle, in, dev, c, stream.get());
    } catch (const InvalidArgument& e) {
      threw = true;
      EXPECT_NE(std::string(e.what()).find(bad.expected_text), std::string::npos) << e.what();
    }
    EXPECT_TRUE(threw) << bad.name << " was accepted on rank " << me;
    // A call rejected on the host leaves the buffer usable on every rank (issue 9 item 12).
    EXPECT_NO_THROW(buffer.synchronizingBarrier(stream.get())) << bad.name;
  }
}

TEST(HtBadInput, ConfigRejectedWithArgumentAndLimit) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  struct ConfigCase {
    const char* text;
    std::function<void(BufferConfig&)> edit;
  };
  const std::vector<ConfigCase> cases = {
      {"BufferConfig::hidden", [](BufferConfig& c) { c.hidden = 100; }},
      {"BufferConfig::num_experts", [](BufferConfig& c) { c.num_experts = kMaxExperts + 8; }},
      {"BufferConfig::max_topk", [](BufferConfig& c) { c.max_topk = kMaxTopk + 1; }},
      {"BufferConfig::max_tokens_per_rank", [](BufferConfig& c) { c.max_tokens_per_rank = -1; }},
  };
  for (const ConfigCase& cc : cases) {
    BufferConfig config = configOf(HtCase{});
    cc.edit(config);
    try {
      EpBuffer buffer(bs, config);
      ADD_FAILURE() << cc.text << " was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(cc.text), std::string::npos) << e.what();
    }
  }
}

// One rank rejects its input; the others stop with an error naming it instead of timing out.
TEST(HtBadInput, OneRankRejectsOthersStopQuickly) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  selectDevice(bs);
  const int me = bs.rank();
  HtCase c;
  c.hidden = 512;
  c.tokens = 32;
  c.max_tokens = 64;
  BufferConfig config = configOf(c);
  config.timeout_s = 30;
  const std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), 4));
  HtDeviceInputs dev(all[me], c);
  EpBuffer buffer(bs, config);
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  DispatchArgs args = dev.args(all[me], c, true);
  if (me == 0) args.expert_alignment = -3;
  const auto start = std::chrono::steady_clock::now();
  try {
    buffer.dispatch(args, handle, stream.get());
    buffer.sync(stream.get());
    ADD_FAILURE() << "rank " << me << " finished a dispatch that rank 0 rejected";
  } catch (const Error& e) {
    if (me == 0) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
    } else {
      EXPECT_EQ(e.code(), ErrorCode::kRemote) << e.what();
      EXPECT_NE(std::string(e.what()).find("rank 0"), std::string::npos) << e.what();
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 10.0) << "the peers waited instead of stopping";
}

// Issue 9 item 4: an expert id out of range held in device memory fails the op in which it is
// found on every rank within milliseconds (InvalidArgument on the offending rank, kRemote naming
// it on the others), never by timeout, and is never used as an address.
TEST(HtBadInput, ExpertIdOutOfRangeFailsEveryRankQuickly) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int me = bs.rank();
  HtCase base;
  base.hidden = 512;
  base.tokens = 32;
  base.max_tokens = 64;
  struct Bad {
    int64_t id;
    IndexType type;
  };
  const std::vector<Bad> bads = {{base.experts + 5, IndexType::kInt64},
                                 {base.experts, IndexType::kInt32},
                                 {-2, IndexType::kInt32},
                                 {int64_t{1} << 32, IndexType::kInt64}};
  for (const Bad& bad : bads) {
    SCOPED_TRACE("bad id " + std::to_string(bad.id));
    HtCase c = base;
    c.idx_type = bad.type;
    std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), 5));
    all[0].topk_idx[3 * c.topk + 1] = bad.id;
    all[0].topk_idx32[3 * c.topk + 1] = static_cast<int32_t>(bad.id);
    HtDeviceInputs dev(all[me], c);
    BufferConfig config = configOf(c);
    config.timeout_s = 30;
    EpBuffer buffer(bs, config);
    EpHandle handle = buffer.createHandle();
    TestStream stream;
    const CallOutcome o = runTimed([&] {
      buffer.dispatch(dev.args(all[me], c, true), handle, stream.get());
      buffer.sync(stream.get());
    });
    EXPECT_TRUE(o.threw) << "rank " << me << " finished a dispatch with a bad expert id";
    if (me == 0) {
      EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << o.what;
      EXPECT_NE(o.what.find("topk_idx"), std::string::npos) << o.what;
      EXPECT_NE(o.what.find("token 3"), std::string::npos) << o.what;
    } else {
      EXPECT_EQ(o.code, ErrorCode::kRemote) << o.what;
      EXPECT_NE(o.what.find("rank 0"), std::string::npos) << o.what;
    }
    EXPECT_LT(o.seconds, 3.0) << "the op did not fail promptly: " << o.what;
    // The buffer stays broken on every rank.
    EXPECT_THROW(buffer.barrier(stream.get()), Error);
    if (anyRankFailed()) break;
  }
}

// Issue 9 item 2: counts that come from another rank are bounded before they become an address.
// Rank 0 corrupts its handle's per-rank counts and runs a cached dispatch (which sends them as
// they are): every rank fails with a device-side error (no CUDA fault, no timeout), promptly.
TEST(HtBadInput, GarbageCountsFromAPeerFailEveryRankWithoutWriting) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int num_ranks = bs.size();
  const int me = bs.rank();
  HtCase c;
  c.hidden = 512;
  c.tokens = 32;
  c.max_tokens = 64;
  const std::vector<RankInputs> all = generateProblem(specOf(c, num_ranks, 8));
  HtDeviceInputs dev(all[me], c);
  BufferConfig config = configOf(c);
  config.timeout_s = 30;
  for (int32_t garbage : {num_ranks * c.max_tokens + 1, 0x7fffffff, -5}) {
    SCOPED_TRACE("rank 0 claims " + std::to_string(garbage) + " rows for rank " +
                 std::to_string(num_ranks - 1));
    EpBuffer buffer(bs, config);
    EpHandle handle = buffer.createHandle();
    TestStream stream;
    buffer.dispatch(dev.args(all[me], c, true), handle, stream.get());
    buffer.sync(stream.get());
    if (me == 0) {
      int32_t* counts = const_cast<int32_t*>(handle.numTokensPerRank());
      EPCOMM_TEST_CUDA(
          cudaMemcpy(counts + num_ranks - 1, &garbage, sizeof(garbage), cudaMemcpyHostToDevice));
    }
    bs.barrier();
    const CallOutcome o = runTimed([&] {
      buffer.dispatch(dev.args(all[me], c, false), handle, stream.get());
      buffer.sync(stream.get());
    });
    EXPECT_TRUE(o.threw) << "rank " << me << " accepted garbage counts";
    EXPECT_NE(o.code, ErrorCode::kTimeout) << o.what;
    EXPECT_NE(o.code, ErrorCode::kCuda) << "a kernel faulted: " << o.what;
    EXPECT_LT(o.seconds, 3.0) << o.what;
    if (anyRankFailed()) break;
  }
}

// Issue 9 item 6: the per-call parameters that must match across ranks are checked on every call;
// a mismatch fails the op on every rank, naming the field and a rank, without waiting.
TEST(HtBadInput, PerCallParametersMustMatchAcrossRanks) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  selectDevice(bs);
  const int me = bs.rank();
  HtCase c;
  c.hidden = 512;
  c.tokens = 32;
  c.max_tokens = 64;
  const std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), 9));
  HtDeviceInputs dev(all[me], c);
  BufferConfig config = configOf(c);
  config.timeout_s = 30;
  struct Mismatch {
    const char* field;
    std::function<void(EpBuffer&, EpHandle&, DispatchArgs&, cudaStream_t)> edit_rank0;
  };
  const std::vector<Mismatch> cases = {
      {"dtype is FP8",
       [&](EpBuffer&, EpHandle&, DispatchArgs& a, cudaStream_t) {
         a.dtype = DType::kFP8E4M3;
         a.x = dev.x_fp8.get();
         a.x_scales = dev.scales.get();
       }},
      {"topk.num_topk",
       [&](EpBuffer&, EpHandle&, DispatchArgs& a, cudaStream_t) { a.topk.num_topk = c.topk - 1; }},
      {"topk.idx_type",
       [&](EpBuffer&, EpHandle&, DispatchArgs& a, cudaStream_t) {
         a.topk.idx_type = IndexType::kInt32;
         a.topk.idx = dev.idx32.get();
       }},
      {"expert_alignment",
       [&](EpBuffer&, EpHandle&, DispatchArgs& a, cudaStream_t) { a.expert_alignment = 4; }},
      {"top-k sent",
       [&](EpBuffer& b, EpHandle& h, DispatchArgs& a, cudaStream_t s) {
         b.layout(a.topk, h, s);
         a.topk = TopkView{};
         a.topk_weights = nullptr;
       }},
  };
  for (const Mismatch& m : cases) {
    SCOPED_TRACE(std::string("rank 0 differs in ") + m.field);
    EpBuffer buffer(bs, config);
    EpHandle handle = buffer.createHandle();
    TestStream stream;
    const CallOutcome o = runTimed([&] {
      DispatchArgs a = dev.args(all[me], c, true);
      if (me == 0) m.edit_rank0(buffer, handle, a, stream.get());
      buffer.dispatch(a, handle, stream.get());
      buffer.sync(stream.get());
    });
    EXPECT_TRUE(o.threw) << "rank " << me << " accepted a call that differs across ranks";
    EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << o.what;
    EXPECT_NE(o.what.find(m.field), std::string::npos) << o.what;
    EXPECT_NE(o.what.find(me == 0 ? "rank 1" : "rank 0"), std::string::npos) << o.what;
    EXPECT_LT(o.seconds, 3.0) << o.what;
    if (anyRankFailed()) break;
  }
}

// Issue 11 item 8: combined top-k weights are pulled from every rank, so whether
// CombineArgs::recv_topk_weights is set must match across ranks: a mismatch fails the combine on
// every rank naming the field, without waiting.
TEST(HtBadInput, CombinedWeightsMustBeSetOnEveryRankOrNone) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  selectDevice(bs);
  const int me = bs.rank();
  HtCase c;
  c.hidden = 512;
  c.tokens = 32;
  c.max_tokens = 64;
  const std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), 47));
  HtDeviceInputs dev(all[me], c);
  BufferConfig config = configOf(c);
  config.timeout_s = 30;
  EpBuffer buffer(bs, config);
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  const DispatchResult r = buffer.dispatch(dev.args(all[me], c, true), handle, stream.get());
  buffer.sync(stream.get());
  DeviceArray<uint16_t> out(size_t(all[me].num_tokens) * c.hidden + 8);
  DeviceArray<float> combined(size_t(all[me].num_tokens) * c.topk + 1);
  const CallOutcome o = runTimed([&] {
    CombineArgs a;
    a.x = r.combine_input;
    a.out = out.get();
    if (me == 0) {
      a.recv_topk_weights = r.recv_topk_weights;
      a.combined_topk_weights = combined.get();
    }
    buffer.combine(a, handle, stream.get());
    buffer.sync(stream.get());
  });
  EXPECT_TRUE(o.threw) << "rank " << me << " finished a combine whose ranks disagree";
  EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << o.what;
  EXPECT_NE(o.what.find("CombineArgs::recv_topk_weights set"), std::string::npos) << o.what;
  if (me != 0) {
    EXPECT_NE(o.what.find("rank 0"), std::string::npos) << o.what;
  }
  EXPECT_LT(o.seconds, 3.0) << o.what;
}

// A copy-in combine pushes and a zero-copy one pulls (PerfFlags::ht_push_combine), so every rank
// must pass x alike: rank 0 copying in while the others pass the buffer's combine input fails
// the combine on every rank naming the signature field, without waiting. Skipped where
// EPCOMM_PERF turns the push off (every rank then pulls, and mixing is allowed).
TEST(HtBadInput, PushCombineNeedsEveryRankToPassXAlike) {
  EPCOMM_REQUIRE_GPU();
  const char* perf = std::getenv("EPCOMM_PERF");
  const std::string flags = perf != nullptr ? perf : "";
  if (!flags.empty() && flags != "default" && flags != "all" &&
      flags.find("ht_push_combine") == std::string::npos) {
    GTEST_SKIP() << "EPCOMM_PERF=" << flags << " turns the push combine off";
  }
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  selectDevice(bs);
  const int me = bs.rank();
  HtCase c;
  c.hidden = 512;
  c.tokens = 32;
  c.max_tokens = 64;
  const std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), 48));
  HtDeviceInputs dev(all[me], c);
  BufferConfig config = configOf(c);
  config.timeout_s = 30;
  EpBuffer buffer(bs, config);
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  const DispatchResult r = buffer.dispatch(dev.args(all[me], c, true), handle, stream.get());
  buffer.sync(stream.get());
  DeviceArray<uint16_t> x_separate(size_t(r.capacity) * c.hidden + 8);
  DeviceArray<uint16_t> out(size_t(all[me].num_tokens) * c.hidden + 8);
  const CallOutcome o = runTimed([&] {
    CombineArgs a;
    a.x = me == 0 ? static_cast<const void*>(x_separate.get()) : r.combine_input;
    a.out = out.get();
    buffer.combine(a, handle, stream.get());
    buffer.sync(stream.get());
  });
  EXPECT_TRUE(o.threw) << "rank " << me << " finished a combine whose ranks disagree";
  EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << o.what;
  EXPECT_NE(o.what.find("pushed: copy-in"), std::string::npos) << o.what;
  EXPECT_LT(o.seconds, 3.0) << o.what;
}

}  // namespace
}  // namespace epcomm::test
