// SPDX-License-Identifier: Apache-2.0
// LL dispatch and combine across ranks (1, 2, 4 and 8 ranks; several ranks may share a GPU),
// checked against the CPU reference on every rank: the expert-major rows (as multisets, since
// positions within an expert are taken with atomics), their data (BF16 bit-exact, FP8 against the
// reference cast), and combine within float tolerance. Outputs are poisoned before every run.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/call_outcome.hpp"
#include "common/gpu_helpers.hpp"
#include "common/poison_new_buffers.hpp"
#include "common/reference.hpp"
#include "common/stage_times_check.hpp"
#include "common/test_data.hpp"
#include "common/test_env.hpp"
#include "core/perf_flags.hpp"
#include "epcomm/epcomm.hpp"
#include "test_hooks.hpp"

namespace epcomm::test {
namespace {

// Where the router weights come from (LlDispatchArgs::topk_weights, LlCombineArgs::topk_weights).
enum class WeightsAt { kDispatch, kCombine, kBoth };

struct LlCase {
  int hidden = 2048;
  int experts = 64;
  int topk = 8;
  int max_topk = 8;
  int max_tokens = 128;
  int tokens = 128;
  Routing routing = Routing::kUniform;
  bool fp8 = false;
  IndexType idx_type = IndexType::kInt64;
  uint64_t seed = 17;
  int all_one_expert = -1;      // >= 0: every top-k entry of every token is this expert
  bool nowhere_tokens = false;  // tokens t % 5 == 2 have every entry -1 (routed nowhere)
  WeightsAt weights = WeightsAt::kDispatch;
  int num_sms = kAuto;      // LlDispatchArgs / LlCombineArgs::num_sms
  bool cumulative = false;  // pass LlDispatchArgs::cumulative_recv_counts and check it
  bool stage_times =
      false;  // EPCOMM_STAGE_TIMES on for the buffer; checks the fused kernels' stamps
  // The buffer's memory is set to 0xFF before it is initialized (testing hook), as reused
  // memory could be: the LL dispatch's row tags lie outside the control region.
  bool poisoned_memory = false;
};

// Combine-time weights of a rank's tokens: [N*K] in [1/16, 1), unlike the dispatch's weights
// (generated from another stream), so using the wrong ones shows.
std::vector<float> combineWeightsOf(const RankInputs& in, uint64_t seed) {
  std::vector<float> w(in.topk_weights.size());
  for (size_t i = 0; i < w.size(); ++i) {
    w[i] = 0.0625f +
           static_cast<float>(mix64(hashCombine(seed, in.rank * 1000003ull + i)) % 960) / 1024.0f;
  }
  return w;
}

void editRouting(std::vector<RankInputs>& all, const LlCase& c) {
  if (c.nowhere_tokens) {
    for (RankInputs& in : all) {
      for (int t = 2; t < in.num_tokens; t += 5) {
        for (int k = 0; k < in.num_topk; ++k) {
          in.topk_idx[size_t(t) * in.num_topk + k] = -1;
          in.topk_idx32[size_t(t) * in.num_topk + k] = -1;
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

ProblemSpec specOf(const LlCase& c, int num_ranks, uint64_t seed) {
  ProblemSpec spec;
  spec.num_ranks = num_ranks;
  spec.hidden = c.hidden;
  spec.num_experts = c.experts;
  spec.num_topk = c.topk;
  spec.tokens_per_rank.assign(num_ranks, c.tokens);
  // Uneven token counts (never above the capacity, never below 0).
  for (int r = 1; r < num_ranks; r += 2) spec.tokens_per_rank[r] = c.tokens / 2;
  spec.routing = c.routing;
  spec.hot_rank = 0;
  spec.seed = seed;
  return spec;
}

BufferConfig configOf(const LlCase& c) {
  BufferConfig config;
  config.hidden = c.hidden;
  config.num_experts = c.experts;
  config.max_topk = c.max_topk;
  config.max_tokens_per_rank = 0;  // LL only
  config.ll_max_tokens_per_rank = c.max_tokens;
  config.timeout_s = kAuto;  // EPCOMM_TIMEOUT_S, else 30 s
  return config;
}

struct DeviceInputs {
  DeviceArray<uint16_t> x;
  DeviceArray<int64_t> idx64;
  DeviceArray<int32_t> idx32;
  DeviceArray<float> weights;
  DeviceArray<float> combine_weights;
  DeviceInputs(const LlCase& c)
      : x(size_t(c.max_tokens) * c.hidden),
        idx64(size_t(c.max_tokens) * c.max_topk),
        idx32(size_t(c.max_tokens) * c.max_topk),
        weights(size_t(c.max_tokens) * c.max_topk),
        combine_weights(size_t(c.max_tokens) * c.max_topk) {}
  void upload(const RankInputs& in) {
    x.upload(in.x_bf16);
    idx64.upload(in.topk_idx);
    idx32.upload(in.topk_idx32);
    weights.upload(in.topk_weights);
  }
  LlDispatchArgs args(const RankInputs& in, const LlCase& c) const {
    LlDispatchArgs a;
    a.x = x.get();
    a.num_tokens = in.num_tokens;
    a.topk.idx = c.idx_type == IndexType::kInt64 ? static_cast<const void*>(idx64.get())
                                                 : static_cast<const void*>(idx32.get());
    a.topk.idx_type = c.idx_type;
    a.topk.num_tokens = in.num_tokens;
    a.topk.num_topk = c.topk;
    a.topk_weights = c.weights == WeightsAt::kCombine ? nullptr : weights.get();
    a.use_fp8 = c.fp8;
    a.num_sms = c.num_sms;
    return a;
  }
  LlCombineArgs combineArgs(const LlCase& c, const void* y, void* out) const {
    LlCombineArgs a;
    a.x = y;
    a.out = out;
    a.topk_weights = c.weights == WeightsAt::kDispatch ? nullptr : combine_weights.get();
    a.num_sms = c.num_sms;
    return a;
  }
};

int rankNow() {
  return mpiBootstrap()->rank();
}

void poisonLlViews(const LlDispatchResult& r, int local_experts, const LlCase& c,
                   cudaStream_t stream) {
  const size_t rows = size_t(local_experts) * r.rows_per_expert;
  poisonDevice(const_cast<void*>(r.recv_x), rows * c.hidden * 2, stream);
  if (r.recv_x_scales) {
    poisonDevice(const_cast<float*>(r.recv_x_scales), rows * (c.hidden / 128) * 4, stream);
  }
  poisonDevice(const_cast<int32_t*>(r.recv_src_info), rows * 4, stream);
}

// Checks an LL dispatch result and returns the host copy of src_info (for building the expert
// outputs of the combine).
std::vector<int32_t> checkLlDispatch(const LlDispatchResult& r, const std::vector<RankInputs>& all,
                                     const LlCase& c, const std::string& where) {
  SCOPED_TRACE(where + " rank " + std::to_string(rankNow()));
  const int me = rankNow();
  const int num_ranks = static_cast<int>(all.size());
  const int local_experts = c.experts / num_ranks;
  const size_t rows = size_t(r.rows_per_expert);
  EXPECT_EQ(r.rows_per_expert, int64_t{num_ranks} * c.max_tokens);
  const LlDispatchRef ref = referenceLlDispatch(all, me, c.experts, c.topk);
  std::vector<int32_t> counts =
      DeviceArray<int32_t>::downloadFrom(r.num_recv_tokens_per_expert, local_experts);
  std::vector<int32_t> src_info =
      DeviceArray<int32_t>::downloadFrom(r.recv_src_info, local_experts * rows);
  std::vector<uint16_t> x_bf16;
  std::vector<uint8_t> x_fp8;
  std::vector<float> scales;
  if (c.fp8) {
    EXPECT_NE(r.recv_x_scales, nullptr);
    x_fp8 = DeviceArray<uint8_t>::downloadFrom(r.recv_x, local_experts * rows * c.hidden);
    scales =
        DeviceArray<float>::downloadFrom(r.recv_x_scales, local_experts * rows * (c.hidden / 128));
  } else {
    x_bf16 = DeviceArray<uint16_t>::downloadFrom(r.recv_x, local_experts * rows * c.hidden);
  }
  for (int e = 0; e < local_experts; ++e) {
    LlExpertView view;
    view.count = counts[e];
    if (view.count < 0 || size_t(view.count) > rows) {
      ADD_FAILURE() << "expert " << e << " count " << view.count << " outside [0, " << rows << "]";
      continue;
    }
    view.src_info = src_info.data() + e * rows;
    if (c.fp8) {
      view.x_fp8 = x_fp8.data() + e * rows * c.hidden;
      view.scales = scales.data() + e * rows * (c.hidden / 128);
    } else {
      view.x_bf16 = x_bf16.data() + e * rows * c.hidden;
    }
    EXPECT_TRUE(checkLlExpertRows(all, ref.per_local_expert[e], view, c.max_tokens, c.hidden))
        << "local expert " << e;
    if (c.fp8) {
      // The documented convention (ops.hpp): x ~= fp8 * scale within fp8DequantBound.
      int64_t bad = 0;
      std::string first;
      for (int i = 0; i < view.count; ++i) {
        const int info = view.src_info[i];
        const int s = info / c.max_tokens, t = info % c.max_tokens;
        if (s < 0 || s >= num_ranks || t < 0 || t >= all[s].num_tokens) continue;  // reported
        for (int col = 0; col < c.hidden; ++col) {
          const double x = bf16ToFloat(all[s].x_bf16[size_t(t) * c.hidden + col]);
          const double scale = view.scales[size_t(i) * (c.hidden / 128) + col / 128];
          const double back =
              double{fp8E4m3ToFloat(view.x_fp8[size_t(i) * c.hidden + col])} * scale;
          if (std::fabs(back - x) <= fp8DequantBound(x, scale)) continue;
          if (bad++ == 0) {
            first = "row " + std::to_string(i) + " (src rank " + std::to_string(s) + ", token " +
                    std::to_string(t) + ") column " + std::to_string(col) + ": x " +
                    std::to_string(x) + ", fp8 * scale " + std::to_string(back);
          }
        }
      }
      EXPECT_EQ(bad, 0) << "local expert " << e << ": dequantized FP8 outside the bound; first "
                        << first;
    }
  }
  return src_info;
}

float expertOutput(uint64_t seed, int expert, int src_rank, int src_token, int col) {
  return bf16ToFloat(expertOutputValue(seed, expert, src_rank, src_token, col));
}

// The expert outputs for the rows this rank received: a function of (expert, source, column).
std::vector<uint16_t> expertOutputsFor(const std::vector<int32_t>& src_info,
                                       const std::vector<int32_t>& counts, int local_experts,
                                       const LlCase& c, int64_t rows, uint64_t seed) {
  const int me = rankNow();
  std::vector<uint16_t> y(size_t(local_experts) * rows * c.hidden, 0x7f7f);
  for (int e = 0; e < local_experts; ++e) {
    const int global_expert = me * local_experts + e;
    for (int i = 0; i < counts[e]; ++i) {
      const int info = src_info[size_t(e) * rows + i];
      const int s = info / c.max_tokens;
      const int t = info % c.max_tokens;
      uint16_t* row = y.data() + (size_t(e) * rows + i) * c.hidden;
      for (int col = 0; col < c.hidden; ++col)
        row[col] = expertOutputValue(seed, global_expert, s, t, col);
    }
  }
  return y;
}

// True when every byte of [ptr, ptr + bytes) on the device is the poison byte.
bool stillPoisoned(const void* ptr, size_t bytes) {
  const std::vector<uint8_t> host = DeviceArray<uint8_t>::downloadFrom(ptr, bytes);
  for (uint8_t b : host) {
    if (b != kPoisonByte) return false;
  }
  return true;
}

// Cumulative per-expert receive counts across the pairs of a case (LlCase::cumulative).
struct Cumulative {
  DeviceArray<int32_t> device;
  std::vector<int32_t> expected;
  explicit Cumulative(int local_experts) : device(local_experts), expected(local_experts) {
    // Non-zero start: the op adds to it and never resets it.
    for (int e = 0; e < local_experts; ++e) expected[e] = 1000 + 7 * e;
    device.upload(expected);
  }
};

// One dispatch + combine pair, optionally split into send/recv halves with work in between,
// checked completely. Split pairs also check which half fills the results: after a kSend-only
// call (and a sync) the poisoned dispatch views and combine output are still poison.
// `last` holds the previous pair's views of this buffer (their addresses never change), used to
// poison the outputs; it starts empty.
void runPair(EpBuffer& buffer, DeviceInputs& dev, const std::vector<RankInputs>& all,
             const LlCase& c, bool split, cudaStream_t stream, LlDispatchResult* last,
             const std::string& where, Cumulative* cumulative = nullptr) {
  const int me = rankNow();
  const int num_ranks = static_cast<int>(all.size());
  const int local_experts = c.experts / num_ranks;
  const RankInputs& in = all[me];
  SCOPED_TRACE(where + " rank " + std::to_string(me));
  dev.upload(in);
  const uint64_t seed = c.seed * 31 + 7;
  const std::vector<float> combine_weights = combineWeightsOf(in, seed ^ 0xc0b1);
  dev.combine_weights.upload(combine_weights);
  if (last->recv_x != nullptr) poisonLlViews(*last, local_experts, c, stream);
  LlDispatchArgs dargs = dev.args(in, c);
  if (cumulative != nullptr) dargs.cumulative_recv_counts = cumulative->device.get();
  LlDispatchResult r;
  if (split) {
    const LlDispatchResult sent = buffer.lowLatencyDispatch(dargs, stream, LlPhase::kSend);
    poisonLlViews(sent, local_experts, c, stream);  // stream-ordered after the send half
    buffer.sync(stream);
    // The send half does not produce the result: the views are untouched and the counts 0.
    EXPECT_TRUE(stillPoisoned(
        sent.recv_x, size_t(local_experts) * sent.rows_per_expert * c.hidden * (c.fp8 ? 1 : 2)))
        << "the kSend half wrote LlDispatchResult::recv_x";
    EXPECT_TRUE(stillPoisoned(sent.recv_src_info, size_t(local_experts) * sent.rows_per_expert * 4))
        << "the kSend half wrote LlDispatchResult::recv_src_info";
    const std::vector<int32_t> zero =
        DeviceArray<int32_t>::downloadFrom(sent.num_recv_tokens_per_expert, local_experts);
    EXPECT_TRUE(compareExact(zero, std::vector<int32_t>(local_experts, 0), "counts after kSend"));
    launchSpin(20000, stream);
    r = buffer.lowLatencyDispatch(dargs, stream, LlPhase::kRecv);
    EXPECT_EQ(r.recv_x, sent.recv_x);
    EXPECT_EQ(r.num_recv_tokens_per_expert, sent.num_recv_tokens_per_expert);
  } else {
    r = buffer.lowLatencyDispatch(dargs, stream);
  }
  *last = r;
  buffer.sync(stream);
  const std::vector<int32_t> src_info = checkLlDispatch(r, all, c, where);
  const std::vector<int32_t> counts =
      DeviceArray<int32_t>::downloadFrom(r.num_recv_tokens_per_expert, local_experts);
  if (cumulative != nullptr) {
    const LlDispatchRef ref = referenceLlDispatch(all, me, c.experts, c.topk);
    for (int e = 0; e < local_experts; ++e) {
      cumulative->expected[e] += static_cast<int32_t>(ref.per_local_expert[e].src_rank.size());
    }
    EXPECT_TRUE(compareExact(cumulative->device.download(local_experts), cumulative->expected,
                             "cumulative_recv_counts"));
  }

  DeviceArray<uint16_t> y(
      expertOutputsFor(src_info, counts, local_experts, c, r.rows_per_expert, seed));
  DeviceArray<uint16_t> out(std::max<size_t>(size_t(in.num_tokens) * c.hidden, 8));
  out.poison();
  const LlCombineArgs cargs = dev.combineArgs(c, y.get(), out.get());
  if (split) {
    buffer.lowLatencyCombine(cargs, stream, LlPhase::kSend);
    buffer.sync(stream);
    EXPECT_TRUE(stillPoisoned(out.get(), out.size() * 2)) << "the kSend half wrote the output";
    launchSpin(20000, stream);
    buffer.lowLatencyCombine(cargs, stream, LlPhase::kRecv);
  } else {
    buffer.lowLatencyCombine(cargs, stream);
  }
  buffer.sync(stream);
  const std::vector<float> expected = referenceLlCombine(
      all, me, c.experts, c.topk,
      [seed](int e, int s, int t, int col) { return expertOutput(seed, e, s, t, col); }, c.hidden,
      c.weights == WeightsAt::kDispatch ? nullptr : combine_weights.data());
  EXPECT_TRUE(compareBf16Near(out.download(size_t(in.num_tokens) * c.hidden), expected, c.hidden))
      << "LL combine";
}

// `start_calls` > 0: the buffer's call counters start there (testing::setCallCounterForTesting).
void runCase(const LlCase& c, int pairs = 2, bool split = false, uint64_t start_calls = 0) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  if (c.experts % bs.size() != 0)
    GTEST_SKIP() << c.experts << " experts on " << bs.size() << " ranks";
  BufferConfig config = configOf(c);
  if (start_calls > 0) config.timeout_s = 10;
  std::optional<StageTimesOn> stage_times;
  if (c.stage_times) stage_times.emplace();
  std::optional<EpBuffer> made;
  {
    const PoisonNewBuffers poison(c.poisoned_memory);
    made.emplace(bs, config);
  }
  EpBuffer& buffer = *made;
  stage_times.reset();
  if (start_calls > 0) testing::setCallCounterForTesting(buffer, bs, start_calls);
  TestStream stream;
  DeviceInputs dev(c);
  LlDispatchResult last{};
  int my_tokens = 0;  // this rank's tokens in the last pair
  std::unique_ptr<Cumulative> cumulative;
  if (c.cumulative) cumulative = std::make_unique<Cumulative>(c.experts / bs.size());
  for (int pair = 0; pair < pairs; ++pair) {
    std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), c.seed + pair));
    editRouting(all, c);
    my_tokens = all[bs.rank()].num_tokens;
    runPair(buffer, dev, all, c, split, stream.get(), &last, "pair " + std::to_string(pair),
            cumulative.get());
    if (anyRankFailed()) break;
  }
  if (c.stage_times && !anyRankFailed()) {
    namespace d = kernels::ll_dispatch_stage;
    namespace cb = kernels::ll_combine_stage;
    // The per-tile stages (routed, copied, tagged) run once per tile of this rank's tokens: a
    // rank with none (odd ranks at 1 token) never reaches them.
    std::vector<int> dispatch_stages = {d::kAllStarted, d::kSetup,  d::kPosted,
                                        d::kSourceWait, d::kPlaced, d::kEnd};
    if (my_tokens > 0) {
      dispatch_stages.insert(dispatch_stages.end(), {d::kRouted, d::kCopied, d::kTagged});
    }
    expectStagesStamped(
        buffer, stream.get(),
        {{kernels::StageKernel::kLlDispatch, dispatch_stages},
         {kernels::StageKernel::kLlCombine,
          {cb::kAllStarted, cb::kWeights, cb::kItemTable, cb::kReduced, cb::kSummed, cb::kEnd}}});
  }
}

// Issue 11 item 7: 896 and 1024 experts with top-16 (a token reaches up to 16 ranks), BF16 and
// FP8; int32 ids with -1 entries in the second. 960 experts also divide 24, 40 and 48 ranks
// (EPCOMM_MANY_RANK_TESTS runs this at 40 ranks).
TEST(LlDispatchCombine, Top16Of896And1024Experts) {
  for (int experts : {896, 960, 1024}) {
    if (experts % mpiBootstrap()->size() != 0) continue;  // a skip would hide the other counts
    LlCase c;
    c.experts = experts;
    c.topk = 16;
    c.max_topk = 16;
    c.hidden = 1024;
    c.max_tokens = 64;
    c.tokens = 64;
    c.fp8 = experts == 1024;
    if (experts == 1024) {
      c.routing = Routing::kWithNegatives;
      c.idx_type = IndexType::kInt32;
    }
    c.seed = 300 + experts;
    SCOPED_TRACE(std::to_string(experts) + " experts");
    runCase(c);
  }
}

TEST(LlDispatchCombine, Bf16FullBatch) {
  runCase(LlCase{});
}

TEST(LlDispatchCombine, OneToken) {
  LlCase c;
  c.tokens = 1;
  runCase(c);
}

TEST(LlDispatchCombine, MaxTokensHidden7168) {
  LlCase c;
  c.hidden = 7168;
  c.experts = 32;
  c.tokens = 128;
  runCase(c, 1);
}

// Small batches at DeepSeek-V3's hidden (a 14 KB BF16 row): the shapes whose LL kernels place
// and sum with four-warp groups (llDispatchFineItems, llCombineFineItems), BF16 with the dispatch's
// weights and FP8 with combine-time weights, 1 and 3 tokens per rank.
TEST(LlDispatchCombine, SmallBatchesHidden7168) {
  for (int tokens : {1, 3}) {
    for (bool fp8 : {false, true}) {
      LlCase c;
      c.hidden = 7168;
      c.experts = 32;
      c.max_tokens = 8;
      c.tokens = tokens;
      c.fp8 = fp8;
      c.weights = fp8 ? WeightsAt::kCombine : WeightsAt::kDispatch;
      c.seed = 500 + 2 * tokens + (fp8 ? 1 : 0);
      SCOPED_TRACE(std::to_string(tokens) + (fp8 ? " tokens, FP8" : " tokens, BF16"));
      runCase(c);
      if (anyRankFailed()) return;
    }
  }
}

TEST(LlDispatchCombine, NegativeEntriesInt32) {
  LlCase c;
  c.routing = Routing::kWithNegatives;
  c.idx_type = IndexType::kInt32;
  runCase(c);
}

TEST(LlDispatchCombine, TopkVariants) {
  for (int topk : {1, 8, 9}) {
    LlCase c;
    c.topk = topk;
    c.max_topk = 9;
    c.hidden = 1024;
    c.tokens = 64;
    c.seed = 40 + topk;
    SCOPED_TRACE("topk " + std::to_string(topk));
    runCase(c);
  }
}

TEST(LlDispatchCombine, SkewedRouting) {
  LlCase c;
  c.routing = Routing::kSkewed;
  runCase(c);
}

TEST(LlDispatchCombine, Fp8Cast) {
  LlCase c;
  c.fp8 = true;
  runCase(c);
}

TEST(LlDispatchCombine, SplitSendReceiveWithWorkBetween) {
  LlCase c;
  c.hidden = 1024;
  runCase(c, 3, true);
}

// Issue 9 item 1: a repeated expert id in a token's top-k counts once (ops.hpp "Routing policy"),
// as in the reference model; every entry of every token naming expert 0 (which used to write past
// expert 0's slab) fills the slab exactly.
TEST(LlDispatchCombine, RepeatedExpertIdsCountOnce) {
  for (IndexType idx : {IndexType::kInt64, IndexType::kInt32}) {
    LlCase c;
    c.routing = Routing::kWithDuplicates;
    c.idx_type = idx;
    c.hidden = 1024;
    c.seed = idx == IndexType::kInt64 ? 81 : 82;
    SCOPED_TRACE(idx == IndexType::kInt64 ? "int64 ids" : "int32 ids");
    runCase(c);
    if (anyRankFailed()) return;
  }
  for (int topk : {2, 8}) {
    LlCase c;
    c.all_one_expert = 0;
    c.topk = topk;
    c.hidden = 512;
    c.seed = 90 + topk;
    SCOPED_TRACE("every entry is expert 0, top-" + std::to_string(topk));
    runCase(c);
    if (anyRankFailed()) return;
  }
}

// Issue 9 item 9: the LL call counter crosses 2^32 (the epoch part of the rows-sent post wraps)
// with every pair still correct, plain and split.
TEST(LlDispatchCombine, CallCounterWrapsPast2To32) {
  LlCase c;
  c.hidden = 512;
  c.experts = 16;
  c.topk = 4;
  c.max_topk = 4;
  c.max_tokens = 16;
  c.tokens = 16;
  c.routing = Routing::kWithNegatives;
  runCase(c, 6, false, (uint64_t{1} << 32) - 3);
  if (anyRankFailed()) return;
  runCase(c, 6, true, (uint64_t{1} << 32) - 2);
}

// A buffer made in memory whose every byte was 0xFF: the first pairs, plain and split, and with
// combine-time weights, are correct (the dispatch's row tags and the pushed weights' tags, outside
// the control region, start zeroed: clearSignals).
TEST(LlDispatchCombine, FirstCallsAreCorrectOnPoisonedMemory) {
  LlCase c;
  c.hidden = 2048;
  c.experts = 16;
  c.topk = 4;
  c.max_topk = 4;
  c.max_tokens = 16;
  c.tokens = 16;
  c.poisoned_memory = true;
  runCase(c, 3, false);
  if (anyRankFailed()) return;
  runCase(c, 3, true);
  if (anyRankFailed()) return;
  c.weights = WeightsAt::kCombine;
  runCase(c, 3, false);
  if (anyRankFailed()) return;
  runCase(c, 3, true);
}

// 1000 back-to-back pairs with new routing every time, through both halves of the double
// buffer, every pair checked.
TEST(LlDispatchCombine, ThousandPairsChangingRouting) {
  LlCase c;
  c.hidden = 256;
  c.experts = 16;
  c.topk = 4;
  c.max_topk = 4;
  c.max_tokens = 24;
  c.tokens = 24;
  c.routing = Routing::kWithNegatives;
  runCase(c, 1000);
}

// Dispatch and combine captured as CUDA graphs; replays with new inputs give correct results.
// Weights at combine (DeepEP's convention), so the combine-weights push is captured too. The
// views returned at capture are every replay's views, and an eager call afterwards returns the
// same addresses (ops.hpp, LlPhase: "CUDA graphs").
TEST(LlDispatchCombine, GraphReplay) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  LlCase c;
  c.hidden = 1024;
  c.tokens = 64;
  c.weights = WeightsAt::kCombine;
  if (c.experts % bs.size() != 0) GTEST_SKIP();
  const int me = bs.rank();
  const int local_experts = c.experts / bs.size();
  EpBuffer buffer(bs, configOf(c));
  TestStream stream;
  DeviceInputs dev(c);
  const int64_t rows = int64_t{bs.size()} * c.max_tokens;
  DeviceArray<uint16_t> y(size_t(local_experts) * rows * c.hidden);
  DeviceArray<uint16_t> out(size_t(c.max_tokens) * c.hidden);
  std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), 900));

  cudaGraph_t dispatch_graph, combine_graph;
  cudaGraphExec_t dispatch_exec, combine_exec;
  EPCOMM_TEST_CUDA(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeThreadLocal));
  LlDispatchResult r = buffer.lowLatencyDispatch(dev.args(all[me], c), stream.get());
  EPCOMM_TEST_CUDA(cudaStreamEndCapture(stream.get(), &dispatch_graph));
  const LlCombineArgs cargs = dev.combineArgs(c, y.get(), out.get());
  EPCOMM_TEST_CUDA(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeThreadLocal));
  buffer.lowLatencyCombine(cargs, stream.get());
  EPCOMM_TEST_CUDA(cudaStreamEndCapture(stream.get(), &combine_graph));
  EPCOMM_TEST_CUDA(cudaGraphInstantiate(&dispatch_exec, dispatch_graph, 0));
  EPCOMM_TEST_CUDA(cudaGraphInstantiate(&combine_exec, combine_graph, 0));

  for (int replay = 0; replay < 5; ++replay) {
    SCOPED_TRACE("replay " + std::to_string(replay));
    all = generateProblem(specOf(c, bs.size(), 901 + replay));
    dev.upload(all[me]);
    const std::vector<float> combine_weights = combineWeightsOf(all[me], 500 + replay);
    dev.combine_weights.upload(combine_weights);
    poisonLlViews(r, local_experts, c, stream.get());
    EPCOMM_TEST_CUDA(cudaGraphLaunch(dispatch_exec, stream.get()));
    buffer.sync(stream.get());
    const std::vector<int32_t> src_info = checkLlDispatch(r, all, c, "graph dispatch");
    const std::vector<int32_t> counts =
        DeviceArray<int32_t>::downloadFrom(r.num_recv_tokens_per_expert, local_experts);
    const uint64_t seed = 77 + replay;
    y.upload(expertOutputsFor(src_info, counts, local_experts, c, rows, seed));
    out.poison();
    EPCOMM_TEST_CUDA(cudaGraphLaunch(combine_exec, stream.get()));
    buffer.sync(stream.get());
    const std::vector<float> expected = referenceLlCombine(
        all, me, c.experts, c.topk,
        [seed](int e, int s, int t, int col) { return expertOutput(seed, e, s, t, col); }, c.hidden,
        combine_weights.data());
    EXPECT_TRUE(
        compareBf16Near(out.download(size_t(all[me].num_tokens) * c.hidden), expected, c.hidden));
    if (anyRankFailed()) break;
  }
  // An eager pair after the replays: correct, and its views are the captured ones.
  LlDispatchResult eager{};
  runPair(buffer, dev, generateProblem(specOf(c, bs.size(), 990)), c, false, stream.get(), &eager,
          "eager after replays");
  EXPECT_EQ(eager.recv_x, r.recv_x);
  EXPECT_EQ(eager.recv_src_info, r.recv_src_info);
  EXPECT_EQ(eager.num_recv_tokens_per_expert, r.num_recv_tokens_per_expert);
  EPCOMM_TEST_CUDA(cudaGraphExecDestroy(dispatch_exec));
  EPCOMM_TEST_CUDA(cudaGraphExecDestroy(combine_exec));
  EPCOMM_TEST_CUDA(cudaGraphDestroy(dispatch_graph));
  EPCOMM_TEST_CUDA(cudaGraphDestroy(combine_graph));
}

// Issue 11 item 6: weights at combine (DeepEP's low_latency_combine), alone or replacing the
// dispatch's; tokens routed nowhere come back as zero rows (the output is poisoned first).
TEST(LlDispatchCombine, WeightsAtCombine) {
  for (WeightsAt at : {WeightsAt::kCombine, WeightsAt::kBoth}) {
    for (bool split : {false, true}) {
      LlCase c;
      c.hidden = 1024;
      c.weights = at;
      c.nowhere_tokens = true;
      c.routing = Routing::kWithNegatives;
      c.seed = at == WeightsAt::kCombine ? 60 : 61;
      SCOPED_TRACE(std::string(at == WeightsAt::kCombine ? "weights at combine only"
                                                         : "weights at dispatch and combine") +
                   (split ? ", split" : ""));
      runCase(c, 3, split);
      if (anyRankFailed()) return;
    }
  }
  LlCase c;
  c.fp8 = true;
  c.weights = WeightsAt::kCombine;
  c.idx_type = IndexType::kInt32;
  c.topk = 4;
  c.seed = 62;
  SCOPED_TRACE("FP8, int32 ids, weights at combine");
  runCase(c, 2);
}

// Tokens routed nowhere (every entry -1) get a zero row, with dispatch weights too.
TEST(LlDispatchCombine, TokensRoutedNowhereAreZero) {
  LlCase c;
  c.hidden = 512;
  c.nowhere_tokens = true;
  runCase(c, 2);
}

// A rank with 0 tokens takes part whether it passes combine weights or not.
TEST(LlDispatchCombine, WeightsAtCombineWithZeroTokenRanks) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  LlCase c;
  c.hidden = 512;
  c.experts = 16;
  c.weights = WeightsAt::kCombine;
  if (c.experts % bs.size() != 0) GTEST_SKIP();
  EpBuffer buffer(bs, configOf(c));
  TestStream stream;
  DeviceInputs dev(c);
  LlDispatchResult last{};
  for (int pair = 0; pair < 2; ++pair) {
    ProblemSpec spec = specOf(c, bs.size(), 70 + pair);
    for (int r = pair % 2; r < bs.size(); r += 2) spec.tokens_per_rank[r] = 0;
    const std::vector<RankInputs> all = generateProblem(spec);
    runPair(buffer, dev, all, c, pair == 1, stream.get(), &last, "pair " + std::to_string(pair));
    if (anyRankFailed()) return;
  }
}

// Issue 11 item 6: LlDispatchArgs::cumulative_recv_counts += each call's per-expert rows.
TEST(LlDispatchCombine, CumulativeRecvCounts) {
  LlCase c;
  c.hidden = 512;
  c.routing = Routing::kSkewed;
  c.cumulative = true;
  runCase(c, 4);
  if (anyRankFailed()) return;
  c.routing = Routing::kWithDuplicates;
  c.seed = 18;
  runCase(c, 3, true);
}

// Issue 11 item 6: any SM budget covers the work (the kernels loop), including budgets below
// the rank count and the default (kAuto = every SM, shared among the ranks on a GPU).
TEST(LlDispatchCombine, SmallSmBudgets) {
  EPCOMM_REQUIRE_GPU();
  // An explicit budget is taken as given, so it must let every rank on a GPU be resident at
  // once (ranks share GPUs under MPS here): at most SMs / ranks-per-GPU.
  int devices = 1, device_sms = 0;
  ASSERT_EQ(cudaGetDeviceCount(&devices), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  const int ranks_per_gpu = (worldSize() + devices - 1) / devices;
  const int fitting = std::max(1, device_sms / ranks_per_gpu);
  for (int sms : {1, 3, std::min(16, fitting), kAuto}) {
    LlCase c;
    c.hidden = 2048;
    c.num_sms = sms;
    c.weights = sms == 3 ? WeightsAt::kCombine : WeightsAt::kDispatch;
    c.seed = 100 + sms;
    SCOPED_TRACE("num_sms " + std::to_string(sms));
    runCase(c, 2, sms == 16);
    if (anyRankFailed()) return;
  }
}

// EPCOMM_STAGE_TIMES=1 (docs/perf-notes.md, "Stage times"): the fused kernels stamp every stage
// and every result is still exact, at the default budget and at 24 SMs, with dispatch and with
// combine-time weights.
TEST(LlStageTimes, StampsEveryStageResultsUnchanged) {
  EPCOMM_REQUIRE_GPU();
  const PerfFlags flags = perfFlagsFromEnv();
  if (!flags.ll_fused_dispatch || !flags.ll_fused_combine) {
    GTEST_SKIP() << "EPCOMM_PERF turns the fused LL kernels off; they record the stage times";
  }
  // 24 SMs, or fewer when ranks share a GPU (every rank's grid must be resident at once; see
  // SmallSmBudgets).
  int devices = 1, device_sms = 0;
  ASSERT_EQ(cudaGetDeviceCount(&devices), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  const int ranks_per_gpu = (worldSize() + devices - 1) / devices;
  const int budget = std::min(24, std::max(1, device_sms / ranks_per_gpu));
  for (int sms : {static_cast<int>(kAuto), budget}) {
    for (int tokens : {1, 128}) {
      LlCase c;
      c.tokens = tokens;
      c.num_sms = sms;
      c.stage_times = true;
      c.weights = tokens == 1 ? WeightsAt::kCombine : WeightsAt::kDispatch;
      c.seed = 700 + tokens + sms;
      SCOPED_TRACE(std::to_string(tokens) + " tokens, num_sms " + std::to_string(sms));
      runCase(c);
      if (anyRankFailed()) return;
    }
  }
}

// Issue 11 item 5: bytesFor (no CUDA call) is what a real buffer allocates.
TEST(LlBuffer, BytesForEqualsBytesPerRank) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  for (int variant = 0; variant < 3; ++variant) {
    BufferConfig config;
    config.hidden = 1024;
    config.num_experts = 64;
    config.max_topk = 8;
    config.max_tokens_per_rank = variant == 1 ? 0 : 256;
    config.ll_max_tokens_per_rank = variant == 2 ? 0 : 128;
    config.scratch_bytes = variant == 0 ? 3 << 20 : 0;
    const BufferSizes sizes = EpBuffer::bytesFor(config, bs.size());
    EpBuffer buffer(bs, config);
    EXPECT_EQ(sizes.total, buffer.bytesPerRank()) << "variant " << variant;
    EXPECT_EQ(sizes.control + sizes.ht + sizes.ll + sizes.scratch + sizes.padding, sizes.total);
  }
}

// Issue 11 item 6: combine with no weights at all (none at dispatch, none at combine) is
// rejected on the host, as DeepEP always takes weights at combine; the buffer stays usable.
TEST(LlBadInput, CombineWithoutAnyWeightsIsRejected) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int me = bs.rank();
  LlCase c;
  c.hidden = 256;
  c.experts = 16;
  c.max_tokens = 8;
  c.tokens = 8;
  c.weights = WeightsAt::kCombine;
  if (c.experts % bs.size() != 0) GTEST_SKIP();
  const std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), 14));
  DeviceInputs dev(c);
  dev.upload(all[me]);
  EpBuffer buffer(bs, configOf(c));
  TestStream stream;
  buffer.lowLatencyDispatch(dev.args(all[me], c), stream.get());
  buffer.sync(stream.get());
  DeviceArray<uint16_t> y(size_t(c.experts / bs.size()) * bs.size() * c.max_tokens * c.hidden);
  DeviceArray<uint16_t> out(size_t(c.max_tokens) * c.hidden);
  LlCombineArgs cargs;  // no topk_weights
  cargs.x = y.get();
  cargs.out = out.get();
  const CallOutcome o = runTimed([&] {
    buffer.lowLatencyCombine(cargs, stream.get());
    buffer.sync(stream.get());
  });
  EXPECT_TRUE(o.threw) << "rank " << me << " accepted an LL combine without weights";
  EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << o.what;  // every rank has tokens
  EXPECT_NE(o.what.find("LlCombineArgs::topk_weights"), std::string::npos) << o.what;
  EXPECT_LT(o.seconds, 5.0) << o.what;
}

// Whether combine weights are given must match across ranks that have tokens: rank 0 with them,
// the others with dispatch weights only, fails the combine on every rank within seconds
// (InvalidArgument naming the field on rank 0, kRemote naming rank 0 on the others).
TEST(LlBadInput, CombineWeightsOnOneRankOnlyFailsEveryRank) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  selectDevice(bs);
  const int me = bs.rank();
  LlCase c;
  c.hidden = 256;
  c.experts = 16;
  c.max_tokens = 8;
  c.tokens = 8;
  if (c.experts % bs.size() != 0) GTEST_SKIP();
  const std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), 15));
  DeviceInputs dev(c);
  dev.upload(all[me]);
  dev.combine_weights.upload(combineWeightsOf(all[me], 15));
  BufferConfig config = configOf(c);
  config.timeout_s = 30;
  EpBuffer buffer(bs, config);
  TestStream stream;
  DeviceArray<uint16_t> y(size_t(c.experts / bs.size()) * bs.size() * c.max_tokens * c.hidden);
  DeviceArray<uint16_t> out(size_t(c.max_tokens) * c.hidden);
  const CallOutcome o = runTimed([&] {
    buffer.lowLatencyDispatch(dev.args(all[me], c), stream.get());  // with dispatch weights
    LlCase mine = c;
    mine.weights = me == 0 ? WeightsAt::kBoth : WeightsAt::kDispatch;
    buffer.lowLatencyCombine(dev.combineArgs(mine, y.get(), out.get()), stream.get());
    buffer.sync(stream.get());
  });
  EXPECT_TRUE(o.threw) << "rank " << me << " finished a combine whose weights mode differed";
  if (me == 0) {
    EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << o.what;
    EXPECT_NE(o.what.find("topk_weights"), std::string::npos) << o.what;
  } else {
    EXPECT_EQ(o.code, ErrorCode::kRemote) << o.what;
    EXPECT_NE(o.what.find("rank 0"), std::string::npos) << o.what;
  }
  EXPECT_LT(o.seconds, 5.0) << o.what;
}

// A rank that rejects its combine on the host while the others pushed combine weights: the
// others' combine send waits for that rank's weights, sees the rejection, still posts (so no
// one waits to the deadline), and the buffer stays usable: a full pair afterwards is correct.
TEST(LlBadInput, CombineRejectedWhileOthersPushWeights) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  selectDevice(bs);
  const int me = bs.rank();
  LlCase c;
  c.hidden = 512;
  c.experts = 16;
  c.max_tokens = 16;
  c.tokens = 16;
  c.weights = WeightsAt::kCombine;
  if (c.experts % bs.size() != 0) GTEST_SKIP();
  const std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), 16));
  DeviceInputs dev(c);
  dev.upload(all[me]);
  dev.combine_weights.upload(combineWeightsOf(all[me], 16));
  BufferConfig config = configOf(c);
  config.timeout_s = 30;
  EpBuffer buffer(bs, config);
  TestStream stream;
  DeviceArray<uint16_t> y(size_t(c.experts / bs.size()) * bs.size() * c.max_tokens * c.hidden);
  DeviceArray<uint16_t> out(size_t(c.max_tokens) * c.hidden);
  const CallOutcome o = runTimed([&] {
    buffer.lowLatencyDispatch(dev.args(all[me], c), stream.get());
    LlCombineArgs a = dev.combineArgs(c, y.get(), out.get());
    if (me == 0) a.x = nullptr;  // rejected on the host
    buffer.lowLatencyCombine(a, stream.get());
    buffer.sync(stream.get());
  });
  EXPECT_TRUE(o.threw) << "rank " << me << " finished a combine rank 0 rejected";
  EXPECT_EQ(o.code, me == 0 ? ErrorCode::kInvalidArgument : ErrorCode::kRemote) << o.what;
  EXPECT_LT(o.seconds, 5.0) << "a rank waited for the deadline: " << o.what;
  if (anyRankFailed()) return;
  LlDispatchResult last{};
  runPair(buffer, dev, generateProblem(specOf(c, bs.size(), 17)), c, false, stream.get(), &last,
          "pair after the rejection");
}

TEST(LlBadInput, RejectedBeforeLaunch) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  LlCase c;
  c.hidden = 256;
  c.experts = 16;
  c.max_tokens = 8;
  c.tokens = 8;
  const std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), 3));
  TestStream stream;
  DeviceInputs dev(c);
  dev.upload(all[bs.rank()]);
  {
    EpBuffer buffer(bs, configOf(c));
    DeviceArray<uint16_t> out(64);
    LlCombineArgs cargs;
    cargs.x = out.get();
    cargs.out = out.get();
    try {
      buffer.lowLatencyCombine(cargs, stream.get());
      ADD_FAILURE() << "combine before dispatch was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("must follow"), std::string::npos) << e.what();
    }
  }
  {
    EpBuffer buffer(bs, configOf(c));
    LlDispatchArgs args = dev.args(all[bs.rank()], c);
    args.num_tokens = args.topk.num_tokens = c.max_tokens + 1;
    try {
      buffer.lowLatencyDispatch(args, stream.get());
      ADD_FAILURE() << "too many tokens were accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("LlDispatchArgs::num_tokens"), std::string::npos)
          << e.what();
    }
  }
}

// Issue 9 item 5: LL treats an expert id outside [-1, num_experts) like HT does: the dispatch
// fails on every rank within milliseconds, InvalidArgument on the offending rank and kRemote
// naming it on the others (it used to drop the id silently).
TEST(LlBadInput, ExpertIdOutOfRangeFailsEveryRankQuickly) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int me = bs.rank();
  LlCase base;
  base.hidden = 256;
  base.experts = 16;
  base.max_tokens = 8;
  base.tokens = 8;
  struct Bad {
    int64_t id;
    IndexType type;
  };
  const std::vector<Bad> bads = {{base.experts, IndexType::kInt64},
                                 {base.experts + 3, IndexType::kInt32},
                                 {-2, IndexType::kInt64},
                                 {int64_t{1} << 32, IndexType::kInt64}};
  for (const Bad& bad : bads) {
    SCOPED_TRACE("bad id " + std::to_string(bad.id));
    LlCase c = base;
    c.idx_type = bad.type;
    std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), 12));
    all[0].topk_idx[1 * c.topk + 2] = bad.id;
    all[0].topk_idx32[1 * c.topk + 2] = static_cast<int32_t>(bad.id);
    DeviceInputs dev(c);
    dev.upload(all[me]);
    BufferConfig config = configOf(c);
    config.timeout_s = 30;
    EpBuffer buffer(bs, config);
    TestStream stream;
    const CallOutcome o = runTimed([&] {
      buffer.lowLatencyDispatch(dev.args(all[me], c), stream.get());
      buffer.sync(stream.get());
    });
    EXPECT_TRUE(o.threw) << "rank " << me << " finished an LL dispatch with a bad expert id";
    if (me == 0) {
      EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << o.what;
      EXPECT_NE(o.what.find("topk_idx"), std::string::npos) << o.what;
      EXPECT_NE(o.what.find("token 1"), std::string::npos) << o.what;
    } else {
      EXPECT_EQ(o.code, ErrorCode::kRemote) << o.what;
      EXPECT_NE(o.what.find("rank 0"), std::string::npos) << o.what;
    }
    EXPECT_LT(o.seconds, 3.0) << "the op did not fail promptly: " << o.what;
    if (anyRankFailed()) break;
  }
}

// Issue 9 item 6: use_fp8 must match across ranks; one rank FP8 and the others BF16 fails the LL
// dispatch on every rank, naming the field and a rank.
TEST(LlBadInput, Fp8OnOneRankOnlyFailsEveryRank) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  selectDevice(bs);
  const int me = bs.rank();
  LlCase c;
  c.hidden = 256;
  c.experts = 16;
  c.max_tokens = 8;
  c.tokens = 8;
  const std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), 13));
  DeviceInputs dev(c);
  dev.upload(all[me]);
  BufferConfig config = configOf(c);
  config.timeout_s = 30;
  EpBuffer buffer(bs, config);
  TestStream stream;
  const CallOutcome o = runTimed([&] {
    LlDispatchArgs a = dev.args(all[me], c);
    a.use_fp8 = me == 0;
    buffer.lowLatencyDispatch(a, stream.get());
    buffer.sync(stream.get());
  });
  EXPECT_TRUE(o.threw) << "rank " << me << " accepted use_fp8 differing across ranks";
  EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << o.what;
  EXPECT_NE(o.what.find("use_fp8"), std::string::npos) << o.what;
  EXPECT_NE(o.what.find(me == 0 ? "rank 1" : "rank 0"), std::string::npos) << o.what;
  EXPECT_LT(o.seconds, 3.0) << o.what;
}

}  // namespace
}  // namespace epcomm::test
