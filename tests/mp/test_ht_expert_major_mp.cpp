// SPDX-License-Identifier: Apache-2.0
// Expert-major HT dispatch and combine (DispatchArgs::expert_major) across ranks (1, 2, 4 and 8
// ranks; several ranks may share a GPU). Every rank regenerates the inputs of all ranks from one
// seed and checks its own outputs against the CPU reference model (tests/common/reference.hpp):
// group offsets and sizes, every pair row bit for bit (rows of one source within a group may come
// in any order: the checker matches them by source token), padding rows, and combine within
// float tolerance. Outputs are poisoned before every run; padding rows of the combine input hold
// NaN, so a combine that reads one fails.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "common/call_outcome.hpp"
#include "common/gpu_helpers.hpp"
#include "common/ht_device_inputs.hpp"
#include "common/reference.hpp"
#include "common/test_data.hpp"
#include "common/test_env.hpp"
#include "epcomm/epcomm.hpp"

namespace epcomm::test {
namespace {

constexpr uint16_t kBf16Nan = 0x7fc0;

// The dispatch input form (dtype, ids, top-k, alignment) is HtInputForm's, expert-major.
struct EmCase : HtInputForm {
  EmCase() { expert_major = true; }
  int hidden = 1024;
  int experts = 64;
  int max_topk = 8;
  int tokens = 160;
  Routing routing = Routing::kUniform;
  int zero_rank = -1;  // this rank sends 0 tokens
  uint64_t seed = 11;
  int max_tokens = 192;
};

int rankNow() {
  return mpiBootstrap()->rank();
}

ProblemSpec specOf(const EmCase& c, int num_ranks, uint64_t seed) {
  ProblemSpec spec;
  spec.num_ranks = num_ranks;
  spec.hidden = c.hidden;
  spec.num_experts = c.experts;
  spec.num_topk = c.topk;
  spec.tokens_per_rank.assign(num_ranks, c.tokens);
  // Uneven counts, never below 0 (past 16 ranks the pattern repeats).
  for (int r = 0; r < num_ranks; ++r)
    spec.tokens_per_rank[r] = c.tokens - (c.tokens / 16) * (r % 16);
  if (c.zero_rank >= 0 && c.zero_rank < num_ranks) spec.tokens_per_rank[c.zero_rank] = 0;
  spec.routing = c.routing;
  spec.hot_rank = num_ranks - 1;
  spec.seed = seed;
  return spec;
}

// The most rows any rank receives in this problem (padding included).
int64_t rowsNeeded(const std::vector<RankInputs>& all, const EmCase& c) {
  int64_t rows = 0;
  for (int d = 0; d < static_cast<int>(all.size()); ++d) {
    rows = std::max<int64_t>(
        rows, referenceHtDispatchExpertMajor(all, d, c.experts, c.topk, c.alignment).num_rows);
  }
  return rows;
}

// Sized to exactly what the problem needs (at least the rank-major capacity), so the tests also
// run at the capacity's edge.
BufferConfig configOf(const EmCase& c, int num_ranks, int64_t rows_needed) {
  BufferConfig config;
  config.hidden = c.hidden;
  config.num_experts = c.experts;
  config.max_topk = c.max_topk;
  config.max_tokens_per_rank = c.max_tokens;
  config.ht_recv_rows = std::max<int64_t>(rows_needed, int64_t{num_ranks} * c.max_tokens);
  config.timeout_s = kAuto;
  return config;
}

void poisonDispatchViews(const DispatchResult& r, const EmCase& c, cudaStream_t stream) {
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
  const int local = c.experts / mpiBootstrap()->size();
  if (r.expert_offsets)
    poisonDevice(const_cast<int32_t*>(r.expert_offsets), (local + 1) * 4, stream);
  poisonDevice(const_cast<int32_t*>(r.num_recv_tokens_per_expert), local * 4, stream);
  poisonDevice(const_cast<int32_t*>(r.num_recv_tokens), 4, stream);
}

// Host copies of one expert-major result, and the check against the reference. `x_override`:
// the rows from a recv_x_out copy instead of the view. Returns the GPU row -> reference row map.
std::vector<int> checkDispatch(const DispatchResult& r, const std::vector<RankInputs>& all,
                               const EmCase& c, bool with_topk, const std::string& where,
                               const void* x_override = nullptr,
                               const float* scales_override = nullptr) {
  SCOPED_TRACE(where + " rank " + std::to_string(rankNow()));
  const int me = rankNow();
  const int num_ranks = static_cast<int>(all.size());
  const int local = c.experts / num_ranks;
  const HtExpertMajorRef ref =
      referenceHtDispatchExpertMajor(all, me, c.experts, c.topk, c.alignment);
  EXPECT_EQ(r.recv_rank_prefix, nullptr) << "recv_rank_prefix has no meaning in expert-major";
  if (r.expert_offsets == nullptr) {
    ADD_FAILURE() << "expert_offsets is null";
    return {};
  }
  const int n = DeviceArray<int32_t>::downloadFrom(r.num_recv_tokens, 1)[0];
  if (n != ref.num_rows || n > r.capacity) {
    ADD_FAILURE() << "received rows " << n << ", expected " << ref.num_rows << " (capacity "
                  << r.capacity << ")";
    return {};
  }
  const size_t rows = static_cast<size_t>(n);
  const std::vector<int32_t> offsets =
      DeviceArray<int32_t>::downloadFrom(r.expert_offsets, local + 1);
  const std::vector<int32_t> sizes =
      DeviceArray<int32_t>::downloadFrom(r.num_recv_tokens_per_expert, local);
  const std::vector<int32_t> src = DeviceArray<int32_t>::downloadFrom(r.recv_src_idx, rows);
  std::vector<uint16_t> x16;
  std::vector<uint8_t> x8;
  std::vector<float> scales;
  HtExpertMajorView view;
  view.num_rows = n;
  view.expert_offsets = offsets.data();
  view.tokens_per_expert = sizes.data();
  view.src_idx = src.data();
  const void* x = x_override ? x_override : r.recv_x;
  if (c.dtype == DType::kBF16) {
    x16 = DeviceArray<uint16_t>::downloadFrom(x, rows * c.hidden);
    view.x_bf16 = x16.data();
  } else {
    x8 = DeviceArray<uint8_t>::downloadFrom(x, rows * c.hidden);
    scales = DeviceArray<float>::downloadFrom(scales_override ? scales_override : r.recv_x_scales,
                                              rows * (c.hidden / 128));
    view.x_fp8 = x8.data();
    view.scales = scales.data();
  }
  std::vector<int64_t> idx;
  std::vector<float> weights;
  if (with_topk) {
    if (r.recv_topk_idx == nullptr || r.recv_topk_weights == nullptr) {
      ADD_FAILURE() << "recv_topk_idx/weights are null";
      return {};
    }
    if (c.idx_type == IndexType::kInt64) {
      idx = DeviceArray<int64_t>::downloadFrom(r.recv_topk_idx, rows * c.topk);
    } else {
      const std::vector<int32_t> idx32 =
          DeviceArray<int32_t>::downloadFrom(r.recv_topk_idx, rows * c.topk);
      idx.assign(idx32.begin(), idx32.end());
    }
    weights = DeviceArray<float>::downloadFrom(r.recv_topk_weights, rows * c.topk);
    view.topk_idx = idx.data();
    view.topk_weights = weights.data();
  } else {
    EXPECT_EQ(r.recv_topk_idx, nullptr);
  }
  std::vector<int> origin;
  const ::testing::AssertionResult ok =
      checkHtExpertMajorRows(all, ref, view, me, c.experts, c.hidden, c.topk, &origin);
  EXPECT_TRUE(ok);
  if (!ok) return {};
  // Each row's (source rank, token, global expert), for the combine inputs.
  return origin;
}

// The expert output of (global expert e, source rank, token, column): deterministic, non-zero.
float expertOutput(uint64_t seed, int e, int s, int t, int col) {
  return bf16ToFloat(expertOutputValue(seed, e, s, t, col));
}

// This rank's combine input in its dispatch row order: the expert output of each pair row, NaN
// in the padding rows (never to be read).
std::vector<uint16_t> combineInput(const std::vector<RankInputs>& all, const EmCase& c,
                                   const std::vector<int>& origin, uint64_t seed) {
  const int me = rankNow();
  const int local = c.experts / static_cast<int>(all.size());
  const HtExpertMajorRef ref =
      referenceHtDispatchExpertMajor(all, me, c.experts, c.topk, c.alignment);
  std::vector<uint16_t> rows(origin.size() * c.hidden, kBf16Nan);
  for (size_t i = 0; i < origin.size(); ++i) {
    const int o = origin[i];
    if (o < 0) continue;
    const int s = ref.src_rank[o], t = ref.src_token[o], k = ref.topk_col[o];
    const int e = static_cast<int>(all[s].topk_idx[size_t(t) * c.topk + k]);
    EXPECT_EQ(e / local, me);
    for (int col = 0; col < c.hidden; ++col)
      rows[i * c.hidden + col] = expertOutputValue(seed, e, s, t, col);
  }
  return rows;
}

std::vector<uint16_t> biasOf(const RankInputs& in, int hidden, uint64_t seed) {
  std::vector<uint16_t> bias(size_t(in.num_tokens) * hidden);
  for (int t = 0; t < in.num_tokens; ++t)
    for (int col = 0; col < hidden; ++col)
      bias[size_t(t) * hidden + col] = expertOutputValue(seed ^ 0xb1a5, 1000 + in.rank, 0, t, col);
  return bias;
}

void runAndCheckCombine(EpBuffer& buffer, const EpHandle& handle, const DispatchResult& r,
                        const std::vector<RankInputs>& all, const EmCase& c,
                        const std::vector<uint16_t>& input, uint64_t seed, bool zero_copy,
                        bool weighted, bool with_bias, cudaStream_t stream,
                        const std::string& where) {
  SCOPED_TRACE(where + " rank " + std::to_string(rankNow()) +
               (zero_copy ? " zero-copy" : " copy-in") + (weighted ? " weighted" : "") +
               (with_bias ? " bias" : ""));
  const int me = rankNow();
  const RankInputs& in = all[me];
  DeviceArray<uint16_t> separate(std::max<size_t>(input.size(), 8));
  if (zero_copy) {
    if (!input.empty()) {
      EPCOMM_TEST_CUDA(
          cudaMemcpy(r.combine_input, input.data(), input.size() * 2, cudaMemcpyHostToDevice));
    }
  } else {
    separate.upload(input);
  }
  const std::vector<uint16_t> bias_host = biasOf(in, c.hidden, seed);
  DeviceArray<uint16_t> bias(std::max<size_t>(bias_host.size(), 8));
  bias.upload(bias_host);
  DeviceArray<float> weights(std::max<size_t>(in.topk_weights.size(), 1));
  weights.upload(in.topk_weights);
  DeviceArray<uint16_t> out(std::max<size_t>(size_t(in.num_tokens) * c.hidden, 8));
  out.poison();

  CombineArgs args;
  args.x = zero_copy ? r.combine_input : separate.get();
  args.scale_weights = weighted ? weights.get() : nullptr;
  args.bias = with_bias ? bias.get() : nullptr;
  args.out = out.get();
  buffer.combine(args, handle, stream);
  buffer.sync(stream);

  const std::vector<float> expected = referenceHtCombineExpertMajor(
      all, me, c.experts, c.topk,
      [seed](int e, int s, int t, int col) { return expertOutput(seed, e, s, t, col); }, c.hidden,
      weighted, with_bias ? bias_host.data() : nullptr);
  EXPECT_TRUE(compareBf16Near(out.download(size_t(in.num_tokens) * c.hidden), expected, c.hidden));
}

// The full check of one case: dispatch into poisoned copies (exact count), into poisoned views,
// combine in its variants, the round trip combine(dispatch(x)), and a cached re-dispatch.
void runCase(const EmCase& c) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int num_ranks = bs.size();
  const int me = bs.rank();
  if (c.experts % num_ranks != 0)
    GTEST_SKIP() << c.experts << " experts on " << num_ranks << " ranks";
  const std::vector<RankInputs> all = generateProblem(specOf(c, num_ranks, c.seed));
  const RankInputs& in = all[me];
  const int64_t needed = rowsNeeded(all, c);
  EpBuffer buffer(bs, configOf(c, num_ranks, needed));
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  HtDeviceInputs dev(in, c);
  const HtExpertMajorRef ref =
      referenceHtDispatchExpertMajor(all, me, c.experts, c.topk, c.alignment);

  // 1. exact count, rows copied to poisoned caller buffers
  const size_t capacity = static_cast<size_t>(std::max<int64_t>(needed, 1));
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
  EXPECT_EQ(first.num_recv_tokens_host, ref.num_rows);
  EXPECT_GE(first.capacity, needed);
  checkDispatch(first, all, c, true, "exact-count dispatch, recv_x_out copy", recv_copy.get(),
                scales_copy.get());

  // 2. again into poisoned zero-copy views
  poisonDispatchViews(first, c, stream.get());
  DispatchResult r = buffer.dispatch(dev.args(in, c, true), handle, stream.get());
  buffer.sync(stream.get());
  EXPECT_EQ(r.num_recv_tokens_host, -1);
  const std::vector<int> origin = checkDispatch(r, all, c, true, "zero-copy dispatch");
  if (::testing::Test::HasFailure() || anyRankFailed()) return;

  // 3. combine variants (the handle keeps this dispatch's row order)
  const uint64_t seed = c.seed + 99;
  const std::vector<uint16_t> input = combineInput(all, c, origin, seed);
  runAndCheckCombine(buffer, handle, r, all, c, input, seed, true, false, false, stream.get(),
                     "combine");
  runAndCheckCombine(buffer, handle, r, all, c, input, seed, false, true, true, stream.get(),
                     "combine");
  runAndCheckCombine(buffer, handle, r, all, c, input, seed, true, true, false, stream.get(),
                     "combine");

  // 4. round trip: combine(dispatch(x)) = sum over the token's valid entries of w_k * x (BF16)
  if (c.dtype == DType::kBF16) {
    SCOPED_TRACE("round trip rank " + std::to_string(me));
    DispatchResult again = buffer.dispatch(dev.args(in, c, true), handle, stream.get());
    DeviceArray<uint16_t> out(std::max<size_t>(size_t(in.num_tokens) * c.hidden, 8));
    out.poison();
    CombineArgs cargs;
    cargs.x = again.recv_x;  // not the combine input: staged by a copy
    cargs.scale_weights = dev.weights.get();
    cargs.out = out.get();
    buffer.combine(cargs, handle, stream.get());
    buffer.sync(stream.get());
    const std::vector<float> expected = referenceHtCombineExpertMajor(
        all, me, c.experts, c.topk,
        [&all, &c](int, int s, int t, int col) {
          return bf16ToFloat(all[s].x_bf16[size_t(t) * c.hidden + col]);
        },
        c.hidden, true, nullptr);
    EXPECT_TRUE(compareBf16Near(out.download(expected.size()), expected, c.hidden))
        << "combine(dispatch(x)) != sum_k w_k * x";
  }

  // 5. cached dispatch: same routing, new rows, no top-k sent; then combine from its rows
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
  const std::vector<int> cached_origin =
      checkDispatch(cached, same_routing, c, false, "cached dispatch");
  if (::testing::Test::HasFailure() || anyRankFailed()) return;
  const std::vector<uint16_t> cached_input = combineInput(same_routing, c, cached_origin, seed + 1);
  runAndCheckCombine(buffer, handle, cached, same_routing, c, cached_input, seed + 1, true, true,
                     true, stream.get(), "combine after cached dispatch");

  // 6. the same buffer still does rank-major (the signature bit and the handle follow the mode)
  DispatchArgs rank_major = dev.args(same_routing[me], c, true);
  rank_major.expert_major = false;
  DispatchResult rm = buffer.dispatch(rank_major, handle, stream.get());
  buffer.sync(stream.get());
  EXPECT_EQ(rm.expert_offsets, nullptr);
  const HtDispatchRef rm_ref =
      referenceHtDispatch(same_routing, me, c.hidden, c.experts, c.topk, c.alignment);
  EXPECT_EQ(DeviceArray<int32_t>::downloadFrom(rm.num_recv_tokens, 1)[0], rm_ref.num_recv);
}

TEST(HtExpertMajor, UniformBf16Alignment1) {
  runCase(EmCase{});
}

TEST(HtExpertMajor, Alignment128) {
  EmCase c;
  c.alignment = 128;
  c.seed = 12;
  runCase(c);
}

// Skewed routing: most of a token's experts on one rank, so it arrives there several times.
TEST(HtExpertMajor, SkewedInt32Alignment4) {
  EmCase c;
  c.routing = Routing::kSkewed;
  c.idx_type = IndexType::kInt32;
  c.alignment = 4;
  c.seed = 13;
  runCase(c);
}

TEST(HtExpertMajor, NegativesAndDuplicates) {
  for (Routing routing : {Routing::kWithNegatives, Routing::kWithDuplicates}) {
    EmCase c;
    c.routing = routing;
    c.alignment = 8;
    c.seed = routing == Routing::kWithNegatives ? 14 : 15;
    runCase(c);
    if (::testing::Test::HasFailure() || anyRankFailed()) return;
  }
}

TEST(HtExpertMajor, ZeroTokenRanks) {
  for (int zero_rank : {0, 1}) {
    EmCase c;
    c.zero_rank = zero_rank;
    c.null_topk_when_empty = zero_rank == 1;
    c.alignment = 16;
    c.seed = 16 + zero_rank;
    runCase(c);
    if (::testing::Test::HasFailure() || anyRankFailed()) return;
  }
}

TEST(HtExpertMajor, Fp8) {
  EmCase c;
  c.dtype = DType::kFP8E4M3;
  c.hidden = 2048;
  c.alignment = 32;
  c.seed = 18;
  runCase(c);
}

TEST(HtExpertMajor, Top1AndTop16) {
  for (int topk : {1, 16}) {
    EmCase c;
    c.topk = topk;
    c.max_topk = 16;
    c.tokens = 96;
    c.max_tokens = 128;
    c.seed = 20 + topk;
    runCase(c);
    if (::testing::Test::HasFailure() || anyRankFailed()) return;
  }
}

// Dispatch (with layout) + combine of the dispatched rows captured in a CUDA graph: each replay
// with new inputs and routing gives the reference round trip, and the same calls eagerly give
// bit-identical output (the row order within a group may differ between calls; combine sums a
// token's rows in top-k order, so its result does not depend on it).
TEST(HtExpertMajor, GraphReplayEqualsEager) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int num_ranks = bs.size();
  const int me = bs.rank();
  EmCase c;
  c.tokens = 96;
  c.max_tokens = 128;
  c.alignment = 8;
  if (c.experts % num_ranks != 0) GTEST_SKIP() << c.experts << " experts on " << num_ranks;
  const int local = c.experts / num_ranks;
  // Every replay draws a new routing: size for the worst case of any routing.
  const int64_t worst = int64_t{num_ranks} * c.max_tokens * std::min(c.topk, local) +
                        int64_t{local} * (c.alignment - 1);
  EpBuffer buffer(bs, configOf(c, num_ranks, worst));
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  std::vector<RankInputs> all = generateProblem(specOf(c, num_ranks, 40));
  HtDeviceInputs dev(all[me], c);
  DeviceArray<uint16_t> out(std::max<size_t>(size_t(c.tokens) * c.hidden, 8));

  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  EPCOMM_TEST_CUDA(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeThreadLocal));
  const DispatchResult r = buffer.dispatch(dev.args(all[me], c, true), handle, stream.get());
  CombineArgs cargs;
  cargs.x = r.recv_x;  // staged into the combine input by a copy inside the graph
  cargs.scale_weights = dev.weights.get();
  cargs.out = out.get();
  buffer.combine(cargs, handle, stream.get());
  EPCOMM_TEST_CUDA(cudaStreamEndCapture(stream.get(), &graph));
  EPCOMM_TEST_CUDA(cudaGraphInstantiate(&exec, graph, 0));

  for (int replay = 0; replay < 4; ++replay) {
    SCOPED_TRACE("replay " + std::to_string(replay) + " rank " + std::to_string(me));
    all = generateProblem(specOf(c, num_ranks, 41 + replay));
    dev.upload(all[me], c);
    out.poison();
    poisonDispatchViews(r, c, stream.get());
    EPCOMM_TEST_CUDA(cudaStreamSynchronize(stream.get()));
    EPCOMM_TEST_CUDA(cudaGraphLaunch(exec, stream.get()));
    buffer.sync(stream.get());
    checkDispatch(r, all, c, true, "graph");
    const std::vector<uint16_t> graph_out = out.download(size_t(all[me].num_tokens) * c.hidden);
    const std::vector<float> expected = referenceHtCombineExpertMajor(
        all, me, c.experts, c.topk,
        [&all, &c](int, int s, int t, int col) {
          return bf16ToFloat(all[s].x_bf16[size_t(t) * c.hidden + col]);
        },
        c.hidden, true, nullptr);
    EXPECT_TRUE(compareBf16Near(graph_out, expected, c.hidden));
    out.poison();
    buffer.dispatch(dev.args(all[me], c, true), handle, stream.get());
    buffer.combine(cargs, handle, stream.get());
    buffer.sync(stream.get());
    EXPECT_TRUE(compareExact(out.download(graph_out.size()), graph_out, "eager vs graph"));
    if (::testing::Test::HasFailure() || anyRankFailed()) break;
  }
  EPCOMM_TEST_CUDA(cudaGraphExecDestroy(exec));
  EPCOMM_TEST_CUDA(cudaGraphDestroy(graph));
}

// More rows than BufferConfig::ht_recv_rows: the call fails on every rank, quickly, naming the
// capacity; nothing is written out of bounds.
TEST(HtExpertMajor, OverCapacityFailsEverywhere) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  const int me = bs.rank();
  EmCase c;
  c.hidden = 512;
  c.tokens = 64;
  c.max_tokens = 64;
  c.alignment = 1024;  // 64 / R local experts of 1024 rows each: far over R * 64 rows
  const std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), 30));
  HtDeviceInputs dev(all[me], c);
  BufferConfig config = configOf(c, bs.size(), 0);  // kAuto-sized: R * max_tokens rows
  config.timeout_s = 30;
  EpBuffer buffer(bs, config);
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  const CallOutcome o = runTimed([&] {
    buffer.dispatch(dev.args(all[me], c, true), handle, stream.get());
    buffer.sync(stream.get());
  });
  EXPECT_TRUE(o.threw) << "rank " << me << " dispatched more rows than the capacity";
  EXPECT_TRUE(o.code == ErrorCode::kBroken || o.code == ErrorCode::kRemote) << o.what;
  if (o.code == ErrorCode::kBroken) {
    EXPECT_NE(o.what.find("ht_recv_rows"), std::string::npos) << o.what;
  }
  EXPECT_LT(o.seconds, 3.0) << o.what;
}

// expert_major is part of the call signature: one rank in the other mode fails the call on every
// rank, naming the field, without waiting.
TEST(HtExpertMajor, ModeMustMatchAcrossRanks) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  selectDevice(bs);
  const int me = bs.rank();
  EmCase c;
  c.hidden = 512;
  c.tokens = 32;
  c.max_tokens = 64;
  const std::vector<RankInputs> all = generateProblem(specOf(c, bs.size(), 31));
  HtDeviceInputs dev(all[me], c);
  BufferConfig config = configOf(c, bs.size(), rowsNeeded(all, c));
  config.timeout_s = 30;
  EpBuffer buffer(bs, config);
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  const CallOutcome o = runTimed([&] {
    DispatchArgs a = dev.args(all[me], c, true);
    if (me == 0) a.expert_major = false;
    buffer.dispatch(a, handle, stream.get());
    buffer.sync(stream.get());
  });
  EXPECT_TRUE(o.threw) << "rank " << me << " accepted a call whose mode differs across ranks";
  EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << o.what;
  EXPECT_NE(o.what.find("expert_major"), std::string::npos) << o.what;
  EXPECT_LT(o.seconds, 3.0) << o.what;
}

}  // namespace
}  // namespace epcomm::test
