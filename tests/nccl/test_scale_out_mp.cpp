// SPDX-License-Identifier: Apache-2.0
// ScaleOutBuffer (epcomm/nccl.hpp) on GPUs, skipped without one: hierarchical HT and LL dispatch
// and combine across simulated nodes (CTest gives each rank its own EPCOMM_HOSTID / NCCL_HOSTID;
// several "nodes" share one GPU, under MPS for speed), checked against the CPU reference of the
// same global problem (common/reference.hpp), computed from the inputs alone.
//
// Row order on a receiver differs from EpBuffer's (rows are grouped by forwarder), so received rows
// are matched to the reference by the origin their data encodes (common/test_data.hpp); FP8 rows
// take their origins from a BF16 dispatch of the same routing (the hierarchical HT order is
// deterministic), LL FP8 rows are compared as a multiset.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/mp_fixture.hpp"
#include "common/reference.hpp"
#include "common/test_data.hpp"
#include "epcomm/error.hpp"
#include "epcomm/nccl.hpp"
#include "util/cuda_resources.hpp"

namespace epcomm {
namespace {

using test::DeviceArray;
using test::RankInputs;

constexpr int kHidden = 256;
constexpr int kExperts = 16;
constexpr int kTopk = 4;
constexpr int kMaxTokens = 48;
constexpr int kLlMaxTokens = 16;
constexpr uint64_t kSeed = 4242;

class ScaleOut : public test::MultiRankGpuTest {
 protected:
  std::vector<RankInputs> problem(int max_tokens, uint64_t seed, int zero_rank = -1) {
    test::ProblemSpec spec;
    spec.num_ranks = size();
    spec.hidden = kHidden;
    spec.num_experts = kExperts;
    spec.num_topk = kTopk;
    spec.routing = test::Routing::kWithDuplicates;
    spec.tokens_per_rank.resize(size());
    for (int r = 0; r < size(); ++r) spec.tokens_per_rank[r] = max_tokens - 5 * (r % 3);
    if (zero_rank >= 0 && zero_rank < size()) spec.tokens_per_rank[zero_rank] = 0;
    spec.seed = seed;
    return test::generateProblem(spec);
  }
  // Picks this rank's GPU first (selectDevice), so the buffer is made on it.
  BufferConfig config() {
    BufferConfig c;
    c.device = device();
    c.hidden = kHidden;
    c.num_experts = kExperts;
    c.max_topk = kTopk;
    c.max_tokens_per_rank = kMaxTokens;
    c.ll_max_tokens_per_rank = kLlMaxTokens;
    return c;
  }
};

// The weight rank d gives token t of `in` (sum of its effective entries whose expert is on d).
double rankWeight(const RankInputs& in, int t, int d, int experts_per_rank, bool weighted) {
  double w = 0;
  bool any = false;
  for (int k = 0; k < in.num_topk; ++k) {
    const int64_t e = test::effectiveExpert(&in.topk_idx[size_t(t) * in.num_topk], k);
    if (e < 0 || e / experts_per_rank != d) continue;
    any = true;
    w += weighted ? in.topk_weights[size_t(t) * in.num_topk + k] : 0.0;
  }
  return any ? (weighted ? w : 1.0) : -1.0;  // -1: the token does not go to d
}

// |actual - expected| <= 1e-3 + bound / 64 per element, NaN fails; names the first bad ones.
::testing::AssertionResult compareWithBound(const std::vector<uint16_t>& actual,
                                            const std::vector<double>& expected,
                                            const std::vector<double>& bound, int hidden) {
  int64_t bad = 0;
  std::ostringstream first;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double a = test::bf16ToFloat(actual[i]);
    const double tol = 1e-3 + bound[i] / 64.0;
    if (std::isfinite(a) && std::fabs(a - expected[i]) <= tol) continue;
    if (bad++ < 4) {
      first << "\n  (token " << i / hidden << ", column " << i % hidden << "): expected "
            << expected[i] << " +- " << tol << ", actual " << a;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " of " << expected.size() << " elements off" << first.str();
}

struct HtOptions {
  DType dtype = DType::kBF16;
  IndexType idx_type = IndexType::kInt64;
  int zero_rank = -1;
};

// The recv_topk_weights entry rank `d` gives its row from (src, token), column k, in the
// combined-weights check: multiples of 1/4 in [-2, 2], so every sum of a few is exact in float32
// whatever the order.
float recvWeightValue(int d, int src, int token, int k) {
  return 0.25f * float((d * 7 + src * 3 + token + k * 5) % 17) - 2.0f;
}

// `all` with the rows (BF16, FP8 and scales) of `fresh`: the same routing, new data. The rows of
// both encode the same origins (columns 0..2); the rest differs.
std::vector<RankInputs> withRowsOf(std::vector<RankInputs> all,
                                   const std::vector<RankInputs>& fresh) {
  for (size_t q = 0; q < all.size(); ++q) {
    all[q].x_bf16 = fresh[q].x_bf16;
    all[q].x_fp8 = fresh[q].x_fp8;
    all[q].x_scales = fresh[q].x_scales;
  }
  return all;
}

// A host layout (test::LayoutRef) on the device, as DispatchArgs::layout takes it.
struct DeviceLayout {
  DeviceArray<int32_t> rank_counts, expert_counts;
  DeviceArray<uint8_t> in_rank;
  explicit DeviceLayout(const test::LayoutRef& l)
      : rank_counts(std::vector<int32_t>(l.tokens_per_rank.begin(), l.tokens_per_rank.end())),
        expert_counts(std::vector<int32_t>(l.tokens_per_expert.begin(), l.tokens_per_expert.end())),
        in_rank(std::max<size_t>(l.is_token_in_rank.size(), 1)) {
    in_rank.upload(l.is_token_in_rank);
  }
  DispatchLayout view() const {
    DispatchLayout v;
    v.num_tokens_per_rank = rank_counts.get();
    v.num_tokens_per_expert = expert_counts.get();
    v.is_token_in_rank = reinterpret_cast<const bool*>(in_rank.get());
    return v;
  }
};

// HT: dispatch (poisoned views), check every row against referenceHtDispatch by origin; FP8 of the
// same routing; a cached dispatch (no top-k, the handle's routing) of the rows of `fresh` (the
// same token counts) in BF16 (and FP8), checked the same way against the reference of that
// routing with those rows; then combine: unweighted with bias after the cached dispatch, with
// combined_topk_weights from a caller's recv_topk_weights, and weighted after a new top-k
// dispatch, with combined_topk_weights from the dispatch's recv_topk_weights in place, all into
// poisoned outputs.
// Buffer: nccl::ScaleOutBuffer, or EpBuffer (hierarchical across nodes after enableScaleOut()).
template <typename Buffer>
void runHt(int me, int R, Buffer& buffer, const std::vector<RankInputs>& all,
           const std::vector<RankInputs>& fresh, const HtOptions& o, cudaStream_t stream) {
  const int L = kExperts / R;
  const RankInputs& in = all[me];
  const size_t N = size_t(in.num_tokens);
  DeviceArray<uint16_t> x16(std::max<size_t>(N * kHidden, 8));
  DeviceArray<uint8_t> x8(std::max<size_t>(N * kHidden, 16));
  DeviceArray<float> scales(std::max<size_t>(in.x_scales.size(), 1));
  DeviceArray<int64_t> idx64(std::max<size_t>(in.topk_idx.size(), 1));
  DeviceArray<int32_t> idx32(std::max<size_t>(in.topk_idx32.size(), 1));
  DeviceArray<float> weights(std::max<size_t>(in.topk_weights.size(), 1));
  x16.upload(in.x_bf16);
  x8.upload(in.x_fp8);
  scales.upload(in.x_scales);
  idx64.upload(in.topk_idx);
  idx32.upload(in.topk_idx32);
  weights.upload(in.topk_weights);

  auto argsOf = [&](DType dtype) {
    DispatchArgs a;
    a.dtype = dtype;
    a.x = dtype == DType::kBF16 ? static_cast<const void*>(x16.get()) : x8.get();
    a.x_scales = dtype == DType::kBF16 ? nullptr : scales.get();
    a.num_tokens = in.num_tokens;
    a.topk.idx =
        o.idx_type == IndexType::kInt64 ? static_cast<const void*>(idx64.get()) : idx32.get();
    a.topk.idx_type = o.idx_type;
    a.topk.num_tokens = in.num_tokens;
    a.topk.num_topk = kTopk;
    a.topk_weights = weights.get();
    return a;
  };
  auto handle = buffer.createHandle();

  // BF16 first: its rows name their origin. The views are fixed, so poison them and dispatch again.
  DispatchResult r = buffer.dispatch(argsOf(DType::kBF16), handle, stream);
  buffer.sync(stream);
  const size_t cap = size_t(r.capacity);
  test::poisonDevice(const_cast<void*>(r.recv_x), cap * kHidden * 2, stream);
  const size_t idx_bytes = o.idx_type == IndexType::kInt64 ? 8 : 4;
  test::poisonDevice(const_cast<void*>(r.recv_topk_idx), cap * kTopk * idx_bytes, stream);
  test::poisonDevice(const_cast<float*>(r.recv_topk_weights), cap * kTopk * 4, stream);
  r = buffer.dispatch(argsOf(DType::kBF16), handle, stream);
  buffer.sync(stream);

  // Checks the BF16 rows of `res` (and with top-k their ids and weights) against `want` by the
  // origin each row encodes; returns the reference row of every received row (empty on failure).
  auto checkRows = [&](const DispatchResult& res, const test::HtDispatchRef& want, bool with_topk,
                       const std::string& what) {
    std::vector<int> found;
    const int rows = DeviceArray<int32_t>::downloadFrom(res.num_recv_tokens, 1)[0];
    EXPECT_EQ(rows, want.num_recv) << "rank " << me << " " << what << ": received rows";
    if (rows != want.num_recv) return found;
    EXPECT_TRUE(test::compareExact(
        DeviceArray<int32_t>::downloadFrom(res.num_recv_tokens_per_expert, size_t(L)),
        std::vector<int32_t>(want.tokens_per_local_expert.begin(),
                             want.tokens_per_local_expert.end()),
        what + ": num_recv_tokens_per_expert"));
    EXPECT_EQ(res.recv_topk_idx != nullptr, with_topk) << "rank " << me << " " << what;
    const std::vector<uint16_t> gx = DeviceArray<uint16_t>::downloadFrom(res.recv_x, cap * kHidden);
    std::vector<uint8_t> gidx_raw;
    std::vector<float> gw;
    if (with_topk) {
      gidx_raw =
          DeviceArray<uint8_t>::downloadFrom(res.recv_topk_idx, size_t(rows) * kTopk * idx_bytes);
      gw = DeviceArray<float>::downloadFrom(res.recv_topk_weights, size_t(rows) * kTopk);
    }
    std::map<std::pair<int, int>, int> ref_row;
    for (int j = 0; j < want.num_recv; ++j) ref_row[{want.src_rank[j], want.src_token[j]}] = j;
    std::vector<int> origin(size_t(rows), -1);  // reference row of each GPU row
    std::vector<char> seen(size_t(want.num_recv), 0);
    for (int i = 0; i < rows; ++i) {
      int s = -1, tok = -1;
      const uint16_t* row = &gx[size_t(i) * kHidden];
      if (!test::decodeRowOrigin(row, &s, &tok)) {
        ADD_FAILURE() << "rank " << me << " " << what << " row " << i << ": "
                      << test::describeRowOrigin(row);
        return found;
      }
      auto it = ref_row.find({s, tok});
      if (it == ref_row.end()) {
        ADD_FAILURE() << "rank " << me << " " << what << " row " << i << " from rank " << s
                      << " token " << tok << " should not be here";
        return found;
      }
      const int j = it->second;
      if (seen[size_t(j)]) {
        ADD_FAILURE() << "rank " << me << " " << what << ": rank " << s << " token " << tok
                      << " arrived twice";
        return found;
      }
      seen[size_t(j)] = 1;
      origin[size_t(i)] = j;
      EXPECT_TRUE(test::compareBf16Exact(row, &want.recv_x_bf16[size_t(j) * kHidden], 1, kHidden))
          << "rank " << me << " " << what << " row " << i;
      for (int k = 0; k < kTopk && with_topk; ++k) {
        int64_t id = 0;
        if (idx_bytes == 8) {
          std::memcpy(&id, &gidx_raw[(size_t(i) * kTopk + k) * 8], 8);
        } else {
          int32_t id32 = 0;
          std::memcpy(&id32, &gidx_raw[(size_t(i) * kTopk + k) * 4], 4);
          id = id32;
        }
        EXPECT_EQ(id, want.recv_topk_idx[size_t(j) * kTopk + k])
            << "rank " << me << " row " << i << " (rank " << s << " token " << tok << ") k " << k;
        EXPECT_EQ(gw[size_t(i) * kTopk + k], want.recv_topk_weights[size_t(j) * kTopk + k])
            << "rank " << me << " row " << i << " (rank " << s << " token " << tok << ") k " << k;
      }
    }
    if (cap > size_t(rows)) {  // the row past the last one stays poisoned
      const std::vector<uint8_t> past = DeviceArray<uint8_t>::downloadFrom(
          static_cast<const uint8_t*>(res.recv_x) + size_t(rows) * kHidden * 2, kHidden * 2);
      EXPECT_TRUE(
          std::all_of(past.begin(), past.end(), [](uint8_t b) { return b == test::kPoisonByte; }))
          << "rank " << me << " " << what << ": a row past num_recv_tokens was written";
    }
    found = origin;
    return found;
  };
  // FP8 rows of `res` against `want`, named by the BF16 origins of the same routing.
  auto checkFp8Rows = [&](const DispatchResult& res, const test::HtDispatchRef& want,
                          const std::vector<int>& origins, const std::string& what) {
    const size_t rows = origins.size();
    EXPECT_EQ(DeviceArray<int32_t>::downloadFrom(res.num_recv_tokens, 1)[0], int(rows)) << what;
    const std::vector<uint8_t> fx = DeviceArray<uint8_t>::downloadFrom(res.recv_x, rows * kHidden);
    const std::vector<float> fs =
        DeviceArray<float>::downloadFrom(res.recv_x_scales, rows * (kHidden / 128));
    for (size_t i = 0; i < rows; ++i) {
      const size_t j = size_t(origins[i]);
      EXPECT_TRUE(test::compareExact(&fx[i * kHidden], &want.recv_x_fp8[j * kHidden], 1, kHidden,
                                     what + " fp8 row " + std::to_string(i)));
      EXPECT_TRUE(test::compareExact(&fs[i * (kHidden / 128)],
                                     &want.recv_scales[j * (kHidden / 128)], 1, kHidden / 128,
                                     what + " scales of row " + std::to_string(i)));
    }
  };

  const test::HtDispatchRef ref = test::referenceHtDispatch(all, me, kHidden, kExperts, kTopk, 1);
  std::vector<int> origin = checkRows(r, ref, true, "dispatch");
  ASSERT_FALSE(origin.empty() && ref.num_recv > 0);
  const int rows = ref.num_recv;

  {
    // layout() into another handle, then a cached dispatch of the same rows on it: routed by the
    // laid-out ids, no top-k in the result.
    auto laid = buffer.createHandle();
    TopkView topk = argsOf(DType::kBF16).topk;
    buffer.layout(topk, laid, stream);
    DispatchArgs a = argsOf(DType::kBF16);
    a.topk = TopkView{};
    a.topk_weights = nullptr;
    test::poisonDevice(const_cast<void*>(r.recv_x), cap * kHidden * 2, stream);
    const DispatchResult rl = buffer.dispatch(a, laid, stream);
    buffer.sync(stream);
    EXPECT_FALSE(checkRows(rl, ref, false, "cached dispatch after layout()").empty() &&
                 ref.num_recv > 0);
  }

  // A caller's layout with the top-k (DeepEP's get_dispatch_layout outputs): the same rows.
  const DeviceLayout layout(
      test::referenceLayout(in.topk_idx.data(), in.num_tokens, kTopk, kExperts, R));
  {
    DispatchArgs a = argsOf(DType::kBF16);
    a.layout = layout.view();
    test::poisonDevice(const_cast<void*>(r.recv_x), cap * kHidden * 2, stream);
    const DispatchResult rl = buffer.dispatch(a, handle, stream);
    buffer.sync(stream);
    EXPECT_FALSE(checkRows(rl, ref, true, "dispatch with a DispatchArgs::layout").empty() &&
                 ref.num_recv > 0);
  }

  const float* fp8_scales_view = nullptr;  // fixed, like every view
  if (o.dtype == DType::kFP8E4M3) {
    // Same routing, same (deterministic) row order: the BF16 origins name the FP8 rows.
    test::poisonDevice(const_cast<void*>(r.recv_x), cap * kHidden, stream);
    DispatchResult f = buffer.dispatch(argsOf(DType::kFP8E4M3), handle, stream);
    buffer.sync(stream);
    checkFp8Rows(f, ref, origin, "fp8 dispatch");
    fp8_scales_view = f.recv_x_scales;
  }

  // Cached dispatch (no top-k: what a trainer's combine backward calls): the rows of `fresh`
  // with the routing the handle holds, into poisoned views; the reference is that routing with
  // those rows.
  const std::vector<RankInputs> again = withRowsOf(all, fresh);
  const test::HtDispatchRef ref_again =
      test::referenceHtDispatch(again, me, kHidden, kExperts, kTopk, 1);
  DeviceArray<uint16_t> fresh16(std::max<size_t>(N * kHidden, 8));
  DeviceArray<uint8_t> fresh8(std::max<size_t>(N * kHidden, 16));
  DeviceArray<float> fresh_scales(std::max<size_t>(again[me].x_scales.size(), 1));
  fresh16.upload(again[me].x_bf16);
  fresh8.upload(again[me].x_fp8);
  fresh_scales.upload(again[me].x_scales);
  auto cachedArgs = [&](DType dtype) {  // the new rows, no top-k: the handle's routing
    DispatchArgs a = argsOf(dtype);
    if (dtype == DType::kBF16) a.x = fresh16.get();
    if (dtype != DType::kBF16) a.x = fresh8.get();
    if (dtype != DType::kBF16) a.x_scales = fresh_scales.get();
    a.topk = TopkView{};
    a.topk_weights = nullptr;
    return a;
  };
  if (o.dtype == DType::kFP8E4M3) {
    test::poisonDevice(const_cast<void*>(r.recv_x), cap * kHidden, stream);
    test::poisonDevice(const_cast<float*>(fp8_scales_view), cap * (kHidden / 128) * 4, stream);
    DispatchResult f = buffer.dispatch(cachedArgs(DType::kFP8E4M3), handle, stream);
    buffer.sync(stream);
    checkFp8Rows(f, ref_again, origin, "cached fp8 dispatch");
  }
  test::poisonDevice(const_cast<void*>(r.recv_x), cap * kHidden * 2, stream);
  r = buffer.dispatch(cachedArgs(DType::kBF16), handle, stream);
  buffer.sync(stream);
  origin = checkRows(r, ref_again, false, "cached dispatch");
  ASSERT_FALSE(origin.empty() && ref.num_recv > 0);
  EXPECT_EQ(handle.numTokens(), in.num_tokens);

  // Combine: rank d's expert output for (s, tok) is expertOutputValue(seed, d, s, tok, col).
  std::vector<uint16_t> y(size_t(rows) * kHidden);
  auto fillOutputs = [&] {
    for (int i = 0; i < rows; ++i) {
      const int j = origin[size_t(i)];
      for (int c = 0; c < kHidden; ++c) {
        y[size_t(i) * kHidden + c] =
            test::expertOutputValue(kSeed, me, ref.src_rank[j], ref.src_token[j], c);
      }
    }
  };
  fillOutputs();
  DeviceArray<uint16_t> bias(std::max<size_t>(N * kHidden, 8));
  std::vector<uint16_t> bias_host(N * kHidden);
  for (size_t i = 0; i < bias_host.size(); ++i)
    bias_host[i] = test::floatToBf16(0.25f * float(int(i % 7) - 3));
  bias.upload(bias_host);
  for (int weighted = 0; weighted < 2; ++weighted) {
    if (weighted) {
      // A new top-k dispatch, whose recv_topk_weights the combine reads in place.
      test::poisonDevice(const_cast<void*>(r.recv_x), cap * kHidden * 2, stream);
      r = buffer.dispatch(argsOf(DType::kBF16), handle, stream);
      buffer.sync(stream);
      origin = checkRows(r, ref, true, "dispatch after the cached one");
      ASSERT_FALSE(origin.empty() && ref.num_recv > 0);
      fillOutputs();
    }
    EPCOMM_TEST_CUDA(cudaMemcpy(r.combine_input, y.data(), y.size() * 2, cudaMemcpyHostToDevice));
    DeviceArray<uint16_t> out(std::max<size_t>(N * kHidden, 8));
    out.poison();
    // combined_topk_weights: unweighted round from a caller's recv_topk_weights (row i of rank me
    // from (s, tok): recvWeightValue(me, s, tok, k)); weighted round from the dispatch's
    // recv_topk_weights in place, which sum back to the token's weights of its effective entries.
    std::vector<float> recv_w(std::max<size_t>(size_t(rows) * kTopk, 1), 0.0f);
    for (int i = 0; i < rows; ++i) {
      const int j = origin[size_t(i)];
      for (int k = 0; k < kTopk; ++k) {
        recv_w[size_t(i) * kTopk + k] = recvWeightValue(me, ref.src_rank[j], ref.src_token[j], k);
      }
    }
    DeviceArray<float> recv_wd(recv_w.size());
    recv_wd.upload(recv_w);
    DeviceArray<float> combined_w(std::max<size_t>(N * kTopk, 1));
    combined_w.poison();
    CombineArgs c;
    c.x = r.combine_input;
    c.out = out.get();
    c.scale_weights = weighted ? weights.get() : nullptr;
    c.bias = weighted ? nullptr : bias.get();
    c.recv_topk_weights = weighted ? r.recv_topk_weights : recv_wd.get();
    c.combined_topk_weights = combined_w.get();
    buffer.combine(c, handle, stream);
    buffer.sync(stream);
    // expected = bias + sum over nodes of (sum over its ranks d of w_d * y_d); the node partial
    // is rounded to BF16 once more than on one node, hence a bound over the terms' magnitudes.
    std::vector<double> expected(N * kHidden), bound(N * kHidden);
    std::vector<float> expected_w(N * kTopk, 0.0f);
    for (size_t tok = 0; tok < N; ++tok) {
      for (int col = 0; col < kHidden; ++col) {
        const size_t i = tok * kHidden + col;
        double sum = weighted ? 0.0 : test::bf16ToFloat(bias_host[i]), mag = std::fabs(sum);
        for (int d = 0; d < R; ++d) {
          const double w = rankWeight(in, int(tok), d, L, weighted != 0);
          if (w < 0) continue;
          const double v =
              w * test::bf16ToFloat(test::expertOutputValue(kSeed, d, me, int(tok), col));
          sum += v;
          mag += std::fabs(v);
        }
        expected[i] = sum;
        bound[i] = mag;
      }
      for (int k = 0; k < kTopk; ++k) {
        float& e = expected_w[tok * kTopk + k];
        if (weighted) {
          if (test::effectiveExpert(&in.topk_idx[tok * kTopk], k) >= 0) {
            e = in.topk_weights[tok * kTopk + k];
          }
          continue;
        }
        for (int d = 0; d < R; ++d) {
          if (rankWeight(in, int(tok), d, L, false) >= 0) e += recvWeightValue(d, me, int(tok), k);
        }
      }
    }
    EXPECT_TRUE(compareWithBound(out.download(N * kHidden), expected, bound, kHidden))
        << "rank " << me << (weighted ? " weighted" : " unweighted, with bias") << " combine";
    EXPECT_TRUE(
        test::compareExact(combined_w.download(N * kTopk), expected_w, "combined_topk_weights"))
        << "rank " << me
        << (weighted ? " (dispatch's recv_topk_weights in place)"
                     : " (caller's recv_topk_weights, after a cached dispatch)");
  }
}

// LL: dispatch (BF16 rows checked per local expert against referenceLlDispatch by origin, FP8
// rows as a multiset against referenceFp8Cast of the source rows), then combine with the
// dispatch's weights and with combine-time weights, into poisoned outputs.
template <typename Buffer>
void runLl(int me, int R, Buffer& buffer, const std::vector<RankInputs>& all, bool fp8,
           cudaStream_t stream) {
  const int L = kExperts / R;
  const RankInputs& in = all[me];
  const size_t N = size_t(in.num_tokens);
  DeviceArray<uint16_t> x16(std::max<size_t>(N * kHidden, 8));
  DeviceArray<int64_t> idx64(std::max<size_t>(in.topk_idx.size(), 1));
  DeviceArray<float> weights(std::max<size_t>(in.topk_weights.size(), 1));
  x16.upload(in.x_bf16);
  idx64.upload(in.topk_idx);
  weights.upload(in.topk_weights);
  LlDispatchArgs a;
  a.x = x16.get();
  a.num_tokens = in.num_tokens;
  a.topk.idx = idx64.get();
  a.topk.idx_type = IndexType::kInt64;
  a.topk.num_tokens = in.num_tokens;
  a.topk.num_topk = kTopk;
  a.topk_weights = weights.get();
  a.use_fp8 = fp8;
  LlDispatchResult r = buffer.lowLatencyDispatch(a, stream);
  buffer.sync(stream);
  const size_t per = size_t(r.rows_per_expert);
  // Dispatch and combine alternate: a round that is not checked ends with a combine of zeros.
  DeviceArray<uint16_t> zeros(size_t(L) * per * kHidden);
  EPCOMM_TEST_CUDA(cudaMemset(zeros.get(), 0, zeros.size() * 2));
  DeviceArray<uint16_t> unchecked_out(std::max<size_t>(N * kHidden, 8));
  auto closeRound = [&] {
    LlCombineArgs c;
    c.x = zeros.get();
    c.out = unchecked_out.get();
    buffer.lowLatencyCombine(c, stream);
    buffer.sync(stream);
  };
  closeRound();
  test::poisonDevice(const_cast<void*>(r.recv_x), size_t(L) * per * kHidden * (fp8 ? 1 : 2),
                     stream);
  r = buffer.lowLatencyDispatch(a, stream);
  buffer.sync(stream);

  const test::LlDispatchRef ref = test::referenceLlDispatch(all, me, kExperts, kTopk);
  const std::vector<int32_t> counts =
      DeviceArray<int32_t>::downloadFrom(r.num_recv_tokens_per_expert, size_t(L));
  for (int e = 0; e < L; ++e) {
    const test::LlExpertRows& want = ref.per_local_expert[size_t(e)];
    ASSERT_EQ(counts[size_t(e)], int(want.src_rank.size())) << "rank " << me << " expert " << e;
    const int n = counts[size_t(e)];
    std::vector<std::pair<int, int>> expected, got;
    for (size_t j = 0; j < want.src_rank.size(); ++j)
      expected.push_back({want.src_rank[j], want.src_token[j]});
    std::sort(expected.begin(), expected.end());
    if (!fp8) {
      const std::vector<uint16_t> gx = DeviceArray<uint16_t>::downloadFrom(
          static_cast<const uint16_t*>(r.recv_x) + size_t(e) * per * kHidden, size_t(n) * kHidden);
      for (int i = 0; i < n; ++i) {
        int s = -1, tok = -1;
        const uint16_t* row = &gx[size_t(i) * kHidden];
        ASSERT_TRUE(test::decodeRowOrigin(row, &s, &tok))
            << "rank " << me << " expert " << e << " row " << i;
        ASSERT_TRUE(s >= 0 && s < R && tok >= 0 && tok < all[s].num_tokens);
        EXPECT_TRUE(test::compareBf16Exact(row, &all[s].x_bf16[size_t(tok) * kHidden], 1, kHidden))
            << "rank " << me << " expert " << e << " row " << i;
        got.push_back({s, tok});
      }
      std::sort(got.begin(), got.end());
      EXPECT_EQ(got, expected) << "rank " << me << " expert " << e << ": the rows' origins";
    } else {
      const int S = kHidden / 128;
      const std::vector<uint8_t> gx = DeviceArray<uint8_t>::downloadFrom(
          static_cast<const uint8_t*>(r.recv_x) + size_t(e) * per * kHidden, size_t(n) * kHidden);
      const std::vector<float> gs =
          DeviceArray<float>::downloadFrom(r.recv_x_scales + size_t(e) * per * S, size_t(n) * S);
      auto key = [&](const uint8_t* q, const float* sc) {
        std::string k(reinterpret_cast<const char*>(q), kHidden);
        k.append(reinterpret_cast<const char*>(sc), size_t(S) * 4);
        return k;
      };
      std::vector<std::string> want_keys, got_keys;
      std::vector<uint8_t> q(kHidden);
      std::vector<float> sc(static_cast<size_t>(S));
      for (const auto& st : expected) {
        test::referenceFp8Cast(&all[st.first].x_bf16[size_t(st.second) * kHidden], kHidden,
                               q.data(), sc.data());
        want_keys.push_back(key(q.data(), sc.data()));
      }
      for (int i = 0; i < n; ++i)
        got_keys.push_back(key(&gx[size_t(i) * kHidden], &gs[size_t(i) * S]));
      std::sort(want_keys.begin(), want_keys.end());
      std::sort(got_keys.begin(), got_keys.end());
      EXPECT_TRUE(want_keys == got_keys)
          << "rank " << me << " expert " << e << ": FP8 rows differ from the cast source rows";
    }
  }
  if (fp8) {  // combine takes BF16 outputs; the BF16 run checks it
    closeRound();
    return;
  }

  // Expert outputs in the layout of `rr` (its row order is its own): local expert e's output for
  // the row from (s, tok) is expertOutputValue(seed, global expert, s, tok, col).
  std::vector<uint16_t> y(size_t(L) * per * kHidden, 0);
  auto fillOutputs = [&](const LlDispatchResult& rr) {
    std::fill(y.begin(), y.end(), uint16_t{0});
    const std::vector<int32_t> n =
        DeviceArray<int32_t>::downloadFrom(rr.num_recv_tokens_per_expert, size_t(L));
    for (int e = 0; e < L; ++e) {
      const std::vector<uint16_t> gx = DeviceArray<uint16_t>::downloadFrom(
          static_cast<const uint16_t*>(rr.recv_x) + size_t(e) * per * kHidden,
          size_t(n[size_t(e)]) * kHidden);
      for (int i = 0; i < n[size_t(e)]; ++i) {
        int s = -1, tok = -1;
        ASSERT_TRUE(test::decodeRowOrigin(&gx[size_t(i) * kHidden], &s, &tok));
        for (int c = 0; c < kHidden; ++c) {
          y[(size_t(e) * per + i) * kHidden + c] =
              test::expertOutputValue(kSeed, me * L + e, s, tok, c);
        }
      }
    }
  };
  fillOutputs(r);
  DeviceArray<uint16_t> yd(y.size());
  const test::ExpertOutputFn expert_output = [](int e, int s, int tok, int c) {
    return test::bf16ToFloat(test::expertOutputValue(kSeed, e, s, tok, c));
  };
  std::vector<float> combine_w(in.topk_weights.size());
  for (size_t i = 0; i < combine_w.size(); ++i) combine_w[i] = 0.5f + 0.25f * float(i % 3);
  DeviceArray<float> combine_wd(std::max<size_t>(combine_w.size(), 1));
  combine_wd.upload(combine_w);
  for (int at_combine = 0; at_combine < 2; ++at_combine) {
    if (at_combine) {  // a new round: dispatch again (rows may come in another order)
      r = buffer.lowLatencyDispatch(a, stream);
      buffer.sync(stream);
      fillOutputs(r);
    }
    yd.upload(y);
    DeviceArray<uint16_t> out(std::max<size_t>(N * kHidden, 8));
    out.poison();
    LlCombineArgs c;
    c.x = yd.get();
    c.out = out.get();
    c.topk_weights = at_combine ? combine_wd.get() : nullptr;
    buffer.lowLatencyCombine(c, stream);
    buffer.sync(stream);
    const std::vector<float> ref_out = test::referenceLlCombine(
        all, me, kExperts, kTopk, expert_output, kHidden, at_combine ? combine_w.data() : nullptr);
    const std::vector<float>& w = at_combine ? combine_w : in.topk_weights;
    std::vector<double> expected(ref_out.begin(), ref_out.end()), bound(N * kHidden, 0.0);
    for (size_t tok = 0; tok < N; ++tok) {
      for (int k = 0; k < kTopk; ++k) {
        const int64_t e = test::effectiveExpert(&in.topk_idx[tok * kTopk], k);
        if (e < 0) continue;
        for (int col = 0; col < kHidden; ++col) {
          bound[tok * kHidden + col] +=
              std::fabs(w[tok * kTopk + k] * expert_output(int(e), me, int(tok), col));
        }
      }
    }
    EXPECT_TRUE(compareWithBound(out.download(N * kHidden), expected, bound, kHidden))
        << "rank " << me << " LL combine, weights at " << (at_combine ? "combine" : "dispatch");
  }
}

}  // namespace

TEST_F(ScaleOut, HtBf16) {
  nccl::ScaleOutBuffer buffer(bootstrap(), config());
  if (const char* nodes = std::getenv("EPCOMM_TEST_NODES")) {
    EXPECT_EQ(buffer.numNodes(), std::atoi(nodes));
  }
  runHt(rank(), size(), buffer, problem(kMaxTokens, 11), problem(kMaxTokens, 111), HtOptions{},
        stream());
}

TEST_F(ScaleOut, HtFp8Int32ZeroTokenRank) {
  nccl::ScaleOutBuffer buffer(bootstrap(), config());
  HtOptions o;
  o.dtype = DType::kFP8E4M3;
  o.idx_type = IndexType::kInt32;
  o.zero_rank = size() - 1;
  runHt(rank(), size(), buffer, problem(kMaxTokens, 12, o.zero_rank),
        problem(kMaxTokens, 112, o.zero_rank), o, stream());
}

TEST_F(ScaleOut, LlBf16) {
  nccl::ScaleOutBuffer buffer(bootstrap(), config());
  runLl(rank(), size(), buffer, problem(kLlMaxTokens, 13), false, stream());
}

TEST_F(ScaleOut, LlFp8ZeroTokenRank) {
  nccl::ScaleOutBuffer buffer(bootstrap(), config());
  runLl(rank(), size(), buffer, problem(kLlMaxTokens, 14, 0), true, stream());
}

// LL dispatch + combine captured once in a CUDA graph (worst-case rail exchanges: no host sync)
// and replayed with new tokens, routing and weights of the same counts; the expert is the
// identity (combine reads the dispatch's recv_x), so out = sum over the token's experts of
// weight * x, with the partial roundings of referenceLlCombine and one more per node.
TEST_F(ScaleOut, LlCudaGraphReplays) {
  nccl::ScaleOutBuffer buffer(bootstrap(), config());
  util::OwnedStream graph_stream = util::OwnedStream::create(cudaStreamNonBlocking);
  cudaStream_t gs = graph_stream.get();
  const std::vector<std::vector<RankInputs>> problems = {
      problem(kLlMaxTokens, 41), problem(kLlMaxTokens, 42), problem(kLlMaxTokens, 43)};
  const RankInputs& first = problems[0][size_t(rank())];
  const size_t N = size_t(first.num_tokens);
  DeviceArray<uint16_t> x(std::max<size_t>(N * kHidden, 8));
  DeviceArray<int64_t> idx(std::max<size_t>(N * kTopk, 1));
  DeviceArray<float> weights(std::max<size_t>(N * kTopk, 1));
  DeviceArray<uint16_t> out(std::max<size_t>(N * kHidden, 8));
  auto upload = [&](const RankInputs& in) {
    ASSERT_EQ(size_t(in.num_tokens), N);
    x.upload(in.x_bf16);
    idx.upload(in.topk_idx);
    weights.upload(in.topk_weights);
    out.poison();
    EPCOMM_TEST_CUDA(cudaDeviceSynchronize());  // gs is non-blocking: order it after the copies
  };
  LlDispatchArgs a;
  a.x = x.get();
  a.num_tokens = int(N);
  a.topk.idx = idx.get();
  a.topk.idx_type = IndexType::kInt64;
  a.topk.num_tokens = int(N);
  a.topk.num_topk = kTopk;
  a.topk_weights = weights.get();
  auto body = [&] {
    const LlDispatchResult r = buffer.lowLatencyDispatch(a, gs);
    LlCombineArgs c;
    c.x = r.recv_x;
    c.out = out.get();
    buffer.lowLatencyCombine(c, gs);
  };
  upload(first);
  body();  // eager first: the rails connect outside the capture
  buffer.sync(gs);
  util::GraphExec graph = util::captureGraph(gs, body);
  for (size_t p = 0; p < problems.size() && !HasFailure(); ++p) {
    const std::vector<RankInputs>& all = problems[(p + 1) % problems.size()];
    upload(all[size_t(rank())]);
    graph.launch(gs);
    buffer.sync(gs);
    const test::ExpertOutputFn identity = [&all](int, int s, int tok, int c) {
      return test::bf16ToFloat(all[size_t(s)].x_bf16[size_t(tok) * kHidden + c]);
    };
    const std::vector<float> ref =
        test::referenceLlCombine(all, rank(), kExperts, kTopk, identity, kHidden);
    const RankInputs& in = all[size_t(rank())];
    std::vector<double> expected(ref.begin(), ref.end()), bound(N * kHidden, 0.0);
    for (size_t tok = 0; tok < N; ++tok) {
      for (int k = 0; k < kTopk; ++k) {
        if (test::effectiveExpert(&in.topk_idx[tok * kTopk], k) < 0) continue;
        for (int col = 0; col < kHidden; ++col) {
          bound[tok * kHidden + col] +=
              std::fabs(in.topk_weights[tok * kTopk + k] * identity(0, rank(), int(tok), col));
        }
      }
    }
    EXPECT_TRUE(compareWithBound(out.download(N * kHidden), expected, bound, kHidden))
        << "rank " << rank() << " replay " << p;
  }
}

// The same through plain EpBuffer after enableScaleOut(): hierarchical across nodes, the
// intranode EpBuffer on one node (np2), with the same checks.
TEST_F(ScaleOut, EpBufferHtAndLl) {
  nccl::enableScaleOut();
  EpBuffer buffer(bootstrap(), config());
  EXPECT_EQ(buffer.numRanks(), size());
  EXPECT_EQ(buffer.rank(), rank());
  EXPECT_EQ(buffer.numLocalExperts(), kExperts / size());
  HtOptions o;
  o.dtype = DType::kFP8E4M3;
  runHt(rank(), size(), buffer, problem(kMaxTokens, 21), problem(kMaxTokens, 121), o, stream());
  runLl(rank(), size(), buffer, problem(kLlMaxTokens, 22), false, stream());
  runLl(rank(), size(), buffer, problem(kLlMaxTokens, 23), true, stream());
}

// Bad input is rejected on every rank: the rank that passed it with InvalidArgument naming the
// argument, value, limit and rank; the others with kRemote naming that rank. The buffer stays
// usable.
TEST_F(ScaleOut, TooManyTokensRejectedOnEveryRank) {
  nccl::ScaleOutBuffer buffer(bootstrap(), config());
  nccl::ScaleOutHandle handle = buffer.createHandle();
  DeviceArray<uint16_t> x(size_t(kMaxTokens + 1) * kHidden);
  DeviceArray<int64_t> idx(size_t(kMaxTokens + 1) * kTopk);
  idx.upload(std::vector<int64_t>(idx.size(), 0));
  DispatchArgs a;
  a.x = x.get();
  a.num_tokens = rank() == 0 ? kMaxTokens + 1 : 1;
  a.topk.idx = idx.get();
  a.topk.num_tokens = a.num_tokens;
  a.topk.num_topk = kTopk;
  const test::RankOutcomes all = outcomesOf([&] { buffer.dispatch(a, handle, stream()); });
  ASSERT_TRUE(all.allThrew()) << all.describe();
  if (rank() == 0) {
    try {
      buffer.dispatch(a, handle, stream());
      FAIL() << "no error";
    } catch (const InvalidArgument& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("num_tokens " + std::to_string(kMaxTokens + 1)), std::string::npos)
          << what;
      EXPECT_NE(what.find("max_tokens_per_rank " + std::to_string(kMaxTokens)), std::string::npos)
          << what;
      EXPECT_NE(what.find("rank 0"), std::string::npos) << what;
    }
  } else {
    try {
      buffer.dispatch(a, handle, stream());
      FAIL() << "no error";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kRemote) << e.what();
      EXPECT_NE(std::string(e.what()).find("rank 0"), std::string::npos) << e.what();
    }
  }
  // Still usable.
  runHt(rank(), size(), buffer, problem(kMaxTokens, 15), problem(kMaxTokens, 115), HtOptions{},
        stream());
}

// EpBuffer::barrier across nodes (ScaleOutBuffer::barrier after enableScaleOut(); the intranode
// barrier at np2): rank 0 reaches it 1.5 s after the others, so on every other rank the barrier
// and sync take about that long; then the buffer still works, and synchronizingBarrier too.
TEST_F(ScaleOut, EpBufferBarrierWaitsForEveryRank) {
  nccl::enableScaleOut();
  EpBuffer buffer(bootstrap(), config());
  buffer.synchronizingBarrier(stream());  // connects everything outside the timed part
  constexpr double kDelayS = 1.5;
  bootstrap().barrier();
  const auto start = std::chrono::steady_clock::now();
  if (rank() == 0) std::this_thread::sleep_for(std::chrono::duration<double>(kDelayS));
  buffer.barrier(stream());
  buffer.sync(stream());
  const double waited =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_GE(waited, kDelayS * 0.8) << "rank " << rank() << ": the barrier did not wait for rank 0";
  buffer.synchronizingBarrier(stream());
  runLl(rank(), size(), buffer, problem(kLlMaxTokens, 24), false, stream());
}

// Cached dispatch and combined weights: bad input fails on every rank, before anything is
// enqueued: the rank that passed it with InvalidArgument naming the argument, the value, the
// limit and the rank, the others with kRemote naming that rank; a disagreement between ranks
// with InvalidArgument on every rank naming the ranks. The buffer then still works.
TEST_F(ScaleOut, CachedDispatchBadInputRejectedOnEveryRank) {
  nccl::ScaleOutBuffer buffer(bootstrap(), config());
  const int me = rank();
  const int last = size() - 1;
  const std::vector<RankInputs> all = problem(kMaxTokens, 16);
  const RankInputs& in = all[size_t(me)];
  const int n = in.num_tokens;  // kMaxTokens on rank 0
  DeviceArray<uint16_t> x(std::max<size_t>(size_t(n) * kHidden, 8));
  DeviceArray<int64_t> idx(std::max<size_t>(in.topk_idx.size(), 1));
  DeviceArray<float> w(std::max<size_t>(size_t(n) * kTopk, 1));
  DeviceArray<uint16_t> out(std::max<size_t>(size_t(n) * kHidden, 8));
  x.upload(in.x_bf16);
  idx.upload(in.topk_idx);
  DispatchArgs routed;
  routed.x = x.get();
  routed.num_tokens = n;
  routed.topk.idx = idx.get();
  routed.topk.num_tokens = n;
  routed.topk.num_topk = kTopk;
  DispatchArgs cached;
  cached.x = x.get();
  cached.num_tokens = n;
  nccl::ScaleOutHandle empty = buffer.createHandle();
  nccl::ScaleOutHandle first = buffer.createHandle();
  nccl::ScaleOutHandle second = buffer.createHandle();
  buffer.dispatch(routed, first, stream());                      // top-k dispatch #1
  DispatchResult r = buffer.dispatch(routed, second, stream());  // #2
  buffer.sync(stream());

  // culprit -1: every rank InvalidArgument with the needles.
  auto expectRejected = [&](const test::RankOutcomes& got, int culprit,
                            const std::vector<std::string>& needles, const std::string& what) {
    ASSERT_TRUE(got.allThrew()) << what << "\n" << got.describe();
    const test::CallOutcome& mine = got.ranks[size_t(me)];
    if (culprit < 0 || culprit == me) {
      EXPECT_EQ(mine.code, ErrorCode::kInvalidArgument) << what << ": " << mine.what;
      for (const std::string& needle : needles) {
        EXPECT_NE(mine.what.find(needle), std::string::npos)
            << what << ": no \"" << needle << "\" in: " << mine.what;
      }
      EXPECT_NE(mine.what.find("(rank " + std::to_string(me) + ")"), std::string::npos)
          << what << ": " << mine.what;
    } else {
      EXPECT_EQ(mine.code, ErrorCode::kRemote) << what << ": " << mine.what;
      EXPECT_NE(mine.what.find("rank " + std::to_string(culprit)), std::string::npos)
          << what << ": " << mine.what;
    }
  };

  {  // a token count other than the handle's
    DispatchArgs a = cached;
    if (me == 0) a.num_tokens = n - 1;
    expectRejected(
        outcomesOf([&] { buffer.dispatch(a, second, stream()); }), 0,
        {"num_tokens " + std::to_string(n - 1), "handle's num_tokens " + std::to_string(n)},
        "cached dispatch, num_tokens off by one on rank 0");
  }
  expectRejected(
      outcomesOf([&] { buffer.dispatch(cached, me == last ? empty : second, stream()); }), last,
      {"holds no routing"}, "cached dispatch, a handle without routing on the last rank");
  expectRejected(outcomesOf([&] { buffer.dispatch(cached, me == 0 ? first : second, stream()); }),
                 -1, {"#1 on rank 0", "#2 on rank 1"},
                 "cached dispatch, handles of different dispatches");
  expectRejected(outcomesOf([&] { buffer.dispatch(me == 0 ? cached : routed, second, stream()); }),
                 -1,
                 {"cached (no topk, the handle's dispatched routing) on ranks 0 but a new routing",
                  "on ranks 1"},
                 "cached on rank 0, top-k elsewhere");
  {
    DispatchArgs a = cached;
    if (me == 0) a.recv_topk_idx_out = idx.get();
    expectRejected(outcomesOf([&] { buffer.dispatch(a, second, stream()); }), 0,
                   {"recv_topk_idx_out", "must be nullptr for a cached dispatch"},
                   "cached dispatch with recv_topk_idx_out on rank 0");
  }
  CombineArgs c;
  c.x = r.combine_input;
  c.out = out.get();
  {
    CombineArgs a = c;
    if (me == 0) a.combined_topk_weights = w.get();
    expectRejected(
        outcomesOf([&] { buffer.combine(a, second, stream()); }), 0,
        {"combined_topk_weights is 0x", "recv_topk_weights is nullptr", "both or neither"},
        "combined_topk_weights without recv_topk_weights on rank 0");
  }
  {
    CombineArgs a = c;
    if (me == 0) {
      a.recv_topk_weights = r.recv_topk_weights;
      a.combined_topk_weights = w.get();
    }
    expectRejected(outcomesOf([&] { buffer.combine(a, second, stream()); }), -1,
                   {"set on ranks 0 but not on ranks 1"}, "combined weights on rank 0 only");
  }
  {  // a layout that is not topk's routing on rank 0: one is_token_in_rank entry flipped
    test::LayoutRef l = test::referenceLayout(in.topk_idx.data(), n, kTopk, kExperts, size());
    if (me == 0) l.is_token_in_rank[1] ^= 1;  // token 0, rank 1
    const DeviceLayout bad(l);
    DispatchArgs a = routed;
    a.layout = bad.view();
    expectRejected(
        outcomesOf([&] { buffer.dispatch(a, second, stream()); }), 0,
        {"DispatchArgs::layout.is_token_in_rank[0][1] = " + std::to_string(l.is_token_in_rank[1]),
         "topk.idx gives " + std::to_string(l.is_token_in_rank[1] ^ 1)},
        "a layout that differs from topk on rank 0");
    a.topk = TopkView{};  // a layout without topk on the last rank
    expectRejected(outcomesOf([&] { buffer.dispatch(me == last ? a : cached, second, stream()); }),
                   last, {"DispatchArgs::layout without topk"}, "a layout without topk");
  }
  {  // combine with a handle laid out but not dispatched since, on the last rank
    nccl::ScaleOutHandle laid = buffer.createHandle();
    TopkView topk = routed.topk;
    buffer.layout(topk, laid, stream());
    expectRejected(outcomesOf([&] { buffer.combine(c, me == last ? laid : second, stream()); }),
                   last, {"laid out by layout() and not dispatched since"},
                   "combine with a laid-out handle on the last rank");
  }
  // Still usable: a cached dispatch on the handles of the same dispatch, then everything again.
  EXPECT_NO_THROW(buffer.dispatch(cached, second, stream()));
  buffer.sync(stream());
  runHt(me, size(), buffer, problem(kMaxTokens, 17), problem(kMaxTokens, 117), HtOptions{},
        stream());
}

}  // namespace epcomm
