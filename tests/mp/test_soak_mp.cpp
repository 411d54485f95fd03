// SPDX-License-Identifier: Apache-2.0
//
// Soak test: many randomized rounds, each one HT dispatch + combine and one LL dispatch +
// combine on the same buffer, every output checked against the CPU reference model
// (common/reference.hpp). Randomized per round: token counts per rank (0 and full included),
// top-k, routing (uniform, skewed to a hot rank, -1 masks up to all-masked), dtype (BF16 / FP8,
// row- or column-major scales), index type, expert alignment, exact-count copies, SM budget,
// combine variants (zero-copy or copy-in, weighted, bias), cached re-dispatch, split LL halves.
// Every 25 rounds (100 in long runs) the buffer is rebuilt with a new random shape (hidden,
// experts, max_topk, capacities), so creation and teardown are soaked too.
//
// Every rank draws every choice and generates the inputs of all ranks from one seed per round,
// so ranks agree without communicating; outputs are poisoned before each round; a failure names
// the round, its parameters and the rank, and the comparison names the token / row.
//
// Environment: EPCOMM_SOAK_ROUNDS (default 200; 10000 for the long run, see EPCOMM_LONG_TESTS
// in tests/CMakeLists.txt), EPCOMM_SOAK_SEED (default 1). A failing round is reproduced by the
// same seed and at least as many rounds.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <sstream>
#include <string>
#include <vector>

#include "common/gpu_helpers.hpp"
#include "common/ht_device_inputs.hpp"
#include "common/mp_fixture.hpp"
#include "common/reference.hpp"
#include "common/test_data.hpp"
#include "common/test_env.hpp"
#include "epcomm/epcomm.hpp"
#include "util/routing.hpp"

namespace epcomm::test {
namespace {

constexpr int kDefaultRounds = 200;
constexpr uint64_t kDefaultSeed = 1;

// A positive integer from the environment, or `fallback` when unset. A malformed value fails
// the test (silently soaking less than asked would hide it).
long long envCount(const char* name, long long fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return fallback;
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  if (*end != '\0' || value < 0) {
    ADD_FAILURE() << name << "='" << text << "' is not a non-negative integer; using " << fallback;
    return fallback;
  }
  return value;
}

// The upload and poison helpers (DeviceArray) work on the legacy default stream, which does not
// order work on the non-blocking stream the ops run on; a pageable cudaMemcpy may even return
// before its DMA lands. Every op waits for them through this.
void settleHostCopies() {
  EPCOMM_TEST_CUDA(cudaDeviceSynchronize());
}

// Deterministic choices through util::PortableDraw (never <random> distributions), so every rank
// and every standard library draws the same values.
class Draw : public util::PortableDraw {
 public:
  using PortableDraw::PortableDraw;
  int range(int lo, int hi) { return lo + below(hi - lo + 1); }
  template <typename T>
  T pick(std::initializer_list<T> values) {
    return *(values.begin() + below(static_cast<int>(values.size())));
  }
};

// The buffer shape of one segment of rounds.
struct Shape {
  int hidden = 0;
  int experts = 0;
  int max_topk = 0;
  int ht_max_tokens = 0;
  int ll_max_tokens = 0;
};

Shape drawShape(Draw& d, int num_ranks) {
  Shape s;
  s.hidden = d.pick({128, 256, 512, 1024, 2048, 4096, 7168});
  s.experts = num_ranks * d.pick({1, 2, 3, 4, 8, 16, 32});
  s.max_topk = d.range(1, std::min(10, s.experts));
  // Keeps the host reference cheap: at most 256K elements in one rank's x.
  const int row_cap = std::max(1, (1 << 18) / s.hidden);
  s.ht_max_tokens = std::min(d.pick({16, 64, 128, 256}), row_cap);
  s.ll_max_tokens = std::min(d.pick({1, 8, 32, 64, 128}), row_cap);
  return s;
}

std::string describeShape(const Shape& s) {
  std::ostringstream o;
  o << "hidden " << s.hidden << ", experts " << s.experts << ", max_topk " << s.max_topk
    << ", HT capacity " << s.ht_max_tokens << ", LL capacity " << s.ll_max_tokens;
  return o.str();
}

// Parameters of one round; identical on every rank.
struct Round {
  int index = 0;
  uint64_t seed = 0;
  // HT
  ProblemSpec ht_spec;
  DType ht_dtype = DType::kBF16;
  IndexType ht_idx = IndexType::kInt64;
  int alignment = 1;
  bool column_major_scales = false;
  bool exact_count = false;
  int ht_sms = kAuto;
  bool zero_copy = true;
  bool weighted = false;
  bool bias = false;
  bool cached = false;
  // LL
  ProblemSpec ll_spec;
  bool ll_fp8 = false;
  IndexType ll_idx = IndexType::kInt64;
  bool ll_split = false;
  int ll_sms = kAuto;
  bool ll_first = false;  // LL before HT in this round
};

const char* routingName(Routing r) {
  if (r == Routing::kUniform) return "uniform";
  if (r == Routing::kSkewed) return "skewed";
  if (r == Routing::kWithNegatives) return "masked";
  return "other";
}

void drawRouting(Draw& d, ProblemSpec& spec) {
  spec.routing = d.pick({Routing::kUniform, Routing::kSkewed, Routing::kWithNegatives});
  spec.hot_rank = d.below(spec.num_ranks);
  spec.skew = d.pick({0.5, 0.9, 1.0});
  spec.negative_fraction = d.pick({0.1, 0.3, 0.7, 1.0});
}

// Token counts: often random, sometimes 0 or the full capacity, now and then 0 on every rank.
std::vector<int> drawTokens(Draw& d, int num_ranks, int capacity) {
  std::vector<int> tokens(num_ranks);
  const bool all_zero = d.chance(0.03);
  for (int& n : tokens) {
    const int kind = d.below(10);
    n = all_zero || kind == 0 ? 0 : kind == 1 ? capacity : d.range(1, capacity);
  }
  return tokens;
}

Round drawRound(uint64_t base_seed, int index, const Shape& s, int num_ranks, int device_sms) {
  Round r;
  r.index = index;
  r.seed = hashCombine(mix64(base_seed), static_cast<uint64_t>(index));
  Draw d(r.seed);
  const int topk = d.range(1, s.max_topk);
  for (ProblemSpec* spec : {&r.ht_spec, &r.ll_spec}) {
    spec->num_ranks = num_ranks;
    spec->hidden = s.hidden;
    spec->num_experts = s.experts;
    spec->num_topk = topk;
    drawRouting(d, *spec);
  }
  r.ht_spec.tokens_per_rank = drawTokens(d, num_ranks, s.ht_max_tokens);
  r.ll_spec.tokens_per_rank = drawTokens(d, num_ranks, s.ll_max_tokens);
  r.ht_spec.seed = mix64(r.seed ^ 0x4854);
  r.ll_spec.seed = mix64(r.seed ^ 0x4c4c);
  r.ht_dtype = d.chance(0.5) ? DType::kFP8E4M3 : DType::kBF16;
  r.ht_idx = d.chance(0.5) ? IndexType::kInt32 : IndexType::kInt64;
  r.alignment = d.pick({1, 1, 2, 4, 8});
  r.column_major_scales = d.chance(0.3);
  r.exact_count = d.chance(0.3);
  const int small = std::min(device_sms, 4);
  r.ht_sms = d.pick({kAuto, kAuto, kAuto, 1, small, std::min(device_sms, 24)});
  r.zero_copy = d.chance(0.5);
  r.weighted = d.chance(0.5);
  r.bias = d.chance(0.3);
  r.cached = d.chance(0.25);
  r.ll_fp8 = d.chance(0.5);
  r.ll_idx = d.chance(0.5) ? IndexType::kInt32 : IndexType::kInt64;
  r.ll_split = d.chance(0.2);
  r.ll_sms = d.pick({kAuto, kAuto, kAuto, 1, small});
  r.ll_first = d.chance(0.5);
  return r;
}

std::string describeSpec(const ProblemSpec& spec) {
  std::ostringstream o;
  o << "tokens [";
  for (size_t i = 0; i < spec.tokens_per_rank.size(); ++i)
    o << (i ? " " : "") << spec.tokens_per_rank[i];
  o << "], topk " << spec.num_topk << ", " << routingName(spec.routing);
  if (spec.routing == Routing::kSkewed) o << " to rank " << spec.hot_rank << " p=" << spec.skew;
  if (spec.routing == Routing::kWithNegatives) o << " p(-1)=" << spec.negative_fraction;
  return o.str();
}

std::string smsName(int sms) {
  return sms == kAuto ? "auto" : std::to_string(sms);
}

std::string describeHt(const Round& r) {
  std::ostringstream o;
  o << "HT " << (r.ht_dtype == DType::kBF16 ? "bf16" : "fp8")
    << (r.ht_dtype == DType::kFP8E4M3 && r.column_major_scales ? " (column-major scales)" : "")
    << ", " << describeSpec(r.ht_spec) << ", int" << (r.ht_idx == IndexType::kInt32 ? 32 : 64)
    << " ids, alignment " << r.alignment << (r.exact_count ? ", exact count + copy-out" : "")
    << ", sms " << smsName(r.ht_sms) << ", combine " << (r.zero_copy ? "zero-copy" : "copy-in")
    << (r.weighted ? " weighted" : "") << (r.bias ? " bias" : "")
    << (r.cached ? ", cached re-dispatch" : "");
  return o.str();
}

std::string describeLl(const Round& r) {
  std::ostringstream o;
  o << "LL " << (r.ll_fp8 ? "fp8 cast" : "bf16") << ", " << describeSpec(r.ll_spec) << ", int"
    << (r.ll_idx == IndexType::kInt32 ? 32 : 64) << " ids, sms " << smsName(r.ll_sms)
    << (r.ll_split ? ", split send/recv" : "");
  return o.str();
}

// Output pointers that stay the same for the life of a buffer and handle (zero-copy views and
// handle-owned arrays), learnt from the first call of each kind and poisoned before every
// later round.
struct KnownViews {
  bool ht = false;
  DispatchResult ht_bf16;  // pointers of a BF16 dispatch
  const float* ht_scales = nullptr;
  bool ll = false;
  LlDispatchResult ll_result;
  const float* ll_scales = nullptr;
};

// The whole test state of one segment (one buffer shape).
class Segment {
 public:
  Segment(Bootstrap& bs, const Shape& shape)
      : shape_(shape),
        me_(bs.rank()),
        num_ranks_(bs.size()),
        local_experts_(shape.experts / bs.size()),
        capacity_(size_t(bs.size()) * shape.ht_max_tokens),
        buffer_(bs, configOf(shape)),
        handle_(buffer_.createHandle()),
        ht_in_(shape.ht_max_tokens, shape.hidden, shape.max_topk),
        ll_in_(shape.ll_max_tokens, shape.hidden, shape.max_topk),
        recv_copy_(capacity_ * shape.hidden * 2),
        scales_copy_(capacity_ * (shape.hidden / kFp8BlockSize)),
        combine_x_(std::max<size_t>(capacity_ * shape.hidden, 8)),
        bias_(std::max<size_t>(size_t(shape.ht_max_tokens) * shape.hidden, 8)),
        out_(std::max<size_t>(
            size_t(std::max(shape.ht_max_tokens, shape.ll_max_tokens)) * shape.hidden, 8)),
        ll_y_(size_t(local_experts_) * num_ranks_ * shape.ll_max_tokens * shape.hidden) {}

  void runHt(const Round& r);
  void runLl(const Round& r);

 private:
  static BufferConfig configOf(const Shape& s) {
    BufferConfig config;
    config.hidden = s.hidden;
    config.num_experts = s.experts;
    config.max_topk = s.max_topk;
    config.max_tokens_per_rank = s.ht_max_tokens;
    config.ll_max_tokens_per_rank = s.ll_max_tokens;
    config.timeout_s = kAuto;  // EPCOMM_TIMEOUT_S, else the library default
    return config;
  }

  void poisonHt(const Round& r, cudaStream_t stream);
  void checkHtDispatch(const DispatchResult& res, const std::vector<RankInputs>& all,
                       const Round& r, bool with_topk);
  void checkHtCombine(const std::vector<RankInputs>& all, const Round& r);

  Shape shape_;
  int me_;
  int num_ranks_;
  int local_experts_;
  size_t capacity_;
  EpBuffer buffer_;
  EpHandle handle_;
  TestStream stream_;
  HtDeviceInputs ht_in_;  // this rank's inputs on the device, sized for the segment; every round
  HtDeviceInputs ll_in_;
  DeviceArray<uint8_t> recv_copy_;
  DeviceArray<float> scales_copy_;
  DeviceArray<uint16_t> combine_x_;
  DeviceArray<uint16_t> bias_;
  DeviceArray<uint16_t> out_;
  DeviceArray<uint16_t> ll_y_;
  KnownViews known_;
};

void Segment::poisonHt(const Round& r, cudaStream_t stream) {
  if (!known_.ht) return;
  const DispatchResult& v = known_.ht_bf16;
  const size_t rows = capacity_;
  const size_t elem = r.ht_dtype == DType::kBF16 ? 2 : 1;
  poisonDevice(const_cast<void*>(v.recv_x), rows * shape_.hidden * elem, stream);
  if (r.ht_dtype == DType::kFP8E4M3 && known_.ht_scales != nullptr) {
    poisonDevice(const_cast<float*>(known_.ht_scales),
                 rows * (shape_.hidden / kFp8BlockSize) * sizeof(float), stream);
  }
  poisonDevice(const_cast<int32_t*>(v.recv_src_idx), rows * sizeof(int32_t), stream);
  // Every dispatch, a cached one too, writes its per-expert counts (issue 11).
  poisonDevice(const_cast<int32_t*>(v.num_recv_tokens_per_expert), local_experts_ * sizeof(int32_t),
               stream);
  // A cached re-dispatch reuses the handle's routing: its counts and prefixes stay as they are.
  if (!r.cached) {
    poisonDevice(const_cast<int32_t*>(v.num_recv_tokens), sizeof(int32_t), stream);
    poisonDevice(const_cast<int32_t*>(v.recv_rank_prefix), (num_ranks_ + 1) * sizeof(int32_t),
                 stream);
    poisonDevice(const_cast<void*>(v.recv_topk_idx),
                 rows * r.ht_spec.num_topk * (r.ht_idx == IndexType::kInt64 ? 8 : 4), stream);
    poisonDevice(const_cast<float*>(v.recv_topk_weights), rows * r.ht_spec.num_topk * sizeof(float),
                 stream);
  }
}

void Segment::checkHtDispatch(const DispatchResult& res, const std::vector<RankInputs>& all,
                              const Round& r, bool with_topk) {
  const int hidden = shape_.hidden;
  const int topk = r.ht_spec.num_topk;
  const HtDispatchRef ref =
      referenceHtDispatch(all, me_, hidden, shape_.experts, topk, r.alignment);
  const int n = DeviceArray<int32_t>::downloadFrom(res.num_recv_tokens, 1)[0];
  ASSERT_EQ(n, ref.num_recv) << "received rows";
  ASSERT_LE(n, res.capacity);
  EXPECT_TRUE(compareExact(DeviceArray<int32_t>::downloadFrom(res.recv_rank_prefix, num_ranks_ + 1),
                           std::vector<int32_t>(ref.rank_prefix.begin(), ref.rank_prefix.end()),
                           "recv_rank_prefix"));
  const size_t rows = size_t(n);
  if (r.ht_dtype == DType::kBF16) {
    const std::vector<uint16_t> x = DeviceArray<uint16_t>::downloadFrom(res.recv_x, rows * hidden);
    EXPECT_TRUE(compareBf16Exact(x.data(), ref.recv_x_bf16.data(), n, hidden, true)) << "recv_x";
  } else {
    EXPECT_TRUE(compareExact(DeviceArray<uint8_t>::downloadFrom(res.recv_x, rows * hidden),
                             ref.recv_x_fp8, "recv_x (fp8 bytes)"));
    EXPECT_TRUE(compareExact(
        DeviceArray<float>::downloadFrom(res.recv_x_scales, rows * (hidden / kFp8BlockSize)),
        ref.recv_scales, "recv_x_scales"));
  }
  EXPECT_TRUE(compareExact(DeviceArray<int32_t>::downloadFrom(res.recv_src_idx, rows),
                           std::vector<int32_t>(ref.recv_src_idx.begin(), ref.recv_src_idx.end()),
                           "recv_src_idx"));
  EXPECT_TRUE(compareExact(
      DeviceArray<int32_t>::downloadFrom(res.num_recv_tokens_per_expert, local_experts_),
      std::vector<int32_t>(ref.tokens_per_local_expert.begin(), ref.tokens_per_local_expert.end()),
      "num_recv_tokens_per_expert"));
  if (!with_topk) {
    EXPECT_EQ(res.recv_topk_idx, nullptr);
    return;
  }
  ASSERT_NE(res.recv_topk_idx, nullptr);
  std::vector<int64_t> idx(rows * topk);
  if (r.ht_idx == IndexType::kInt64) {
    idx = DeviceArray<int64_t>::downloadFrom(res.recv_topk_idx, rows * topk);
  } else {
    const std::vector<int32_t> idx32 =
        DeviceArray<int32_t>::downloadFrom(res.recv_topk_idx, rows * topk);
    idx.assign(idx32.begin(), idx32.end());
  }
  EXPECT_TRUE(compareExact(idx, ref.recv_topk_idx, "recv_topk_idx"));
  EXPECT_TRUE(compareExact(DeviceArray<float>::downloadFrom(res.recv_topk_weights, rows * topk),
                           ref.recv_topk_weights, "recv_topk_weights"));

  // The layout kept in the handle.
  const RankInputs& in = all[me_];
  const LayoutRef layout =
      referenceLayout(in.topk_idx.data(), in.num_tokens, topk, shape_.experts, num_ranks_);
  const size_t cells = size_t(in.num_tokens) * num_ranks_;
  EXPECT_TRUE(compareExact(
      DeviceArray<int32_t>::downloadFrom(handle_.numTokensPerRank(), num_ranks_),
      std::vector<int32_t>(layout.tokens_per_rank.begin(), layout.tokens_per_rank.end()),
      "numTokensPerRank"));
  EXPECT_TRUE(compareExact(
      DeviceArray<int32_t>::downloadFrom(handle_.numTokensPerExpert(), shape_.experts),
      std::vector<int32_t>(layout.tokens_per_expert.begin(), layout.tokens_per_expert.end()),
      "numTokensPerExpert"));
  EXPECT_TRUE(compareExact(DeviceArray<uint8_t>::downloadFrom(handle_.isTokenInRank(), cells),
                           layout.is_token_in_rank, "isTokenInRank"));
  EXPECT_TRUE(compareExact(DeviceArray<int32_t>::downloadFrom(handle_.tokenSlot(), cells),
                           std::vector<int32_t>(layout.token_slot.begin(), layout.token_slot.end()),
                           "tokenSlot"));
}

// Combine of the dispatch just made: every rank's expert outputs are a deterministic value per
// (rank, row, column), so each rank can compute what it must get back.
void Segment::checkHtCombine(const std::vector<RankInputs>& all, const Round& r) {
  const int hidden = shape_.hidden;
  const uint64_t seed = r.seed ^ 0xc0b1;
  std::vector<std::vector<uint16_t>> inputs(num_ranks_);
  for (int d = 0; d < num_ranks_; ++d) {
    const HtDispatchRef ref =
        referenceHtDispatch(all, d, hidden, shape_.experts, r.ht_spec.num_topk, 1);
    inputs[d].resize(size_t(ref.num_recv) * hidden);
    for (int row = 0; row < ref.num_recv; ++row)
      for (int col = 0; col < hidden; ++col)
        inputs[d][size_t(row) * hidden + col] = expertOutputValue(seed, d, 0, row, col);
  }
  const RankInputs& in = all[me_];
  const cudaStream_t stream = stream_.get();
  CombineArgs args;
  if (r.zero_copy) {
    if (!inputs[me_].empty()) {
      EPCOMM_TEST_CUDA(cudaMemcpy(known_.ht_bf16.combine_input, inputs[me_].data(),
                                  inputs[me_].size() * 2, cudaMemcpyHostToDevice));
    }
    args.x = known_.ht_bf16.combine_input;
  } else {
    combine_x_.upload(inputs[me_]);
    args.x = combine_x_.get();
  }
  std::vector<uint16_t> bias_host;
  if (r.bias) {
    bias_host.resize(size_t(in.num_tokens) * hidden);
    for (int t = 0; t < in.num_tokens; ++t)
      for (int col = 0; col < hidden; ++col)
        bias_host[size_t(t) * hidden + col] =
            expertOutputValue(seed ^ 0xb1a5, 1000 + me_, 0, t, col);
    bias_.upload(bias_host);
    args.bias = bias_.get();
  }
  // The dispatch's weights are still on the device (ht_in_), in this rank's token order.
  if (r.weighted) args.scale_weights = ht_in_.weights.get();
  out_.poison();
  args.out = out_.get();
  args.num_sms = r.ht_sms;
  settleHostCopies();
  buffer_.combine(args, handle_, stream);
  buffer_.sync(stream);
  const std::vector<float> expected =
      referenceHtCombine(all, me_, inputs, hidden, shape_.experts, r.ht_spec.num_topk, r.weighted,
                         r.bias ? bias_host.data() : nullptr);
  EXPECT_TRUE(compareBf16Near(out_.download(size_t(in.num_tokens) * hidden), expected, hidden))
      << "HT combine output (row = token of rank " << me_ << ")";
}

void Segment::runHt(const Round& r) {
  SCOPED_TRACE(describeHt(r));
  const int hidden = shape_.hidden;
  const cudaStream_t stream = stream_.get();
  const std::vector<RankInputs> all = generateProblem(r.ht_spec);
  const RankInputs& in = all[me_];
  ht_in_.upload(in, r.column_major_scales);

  DispatchArgs args;
  args.dtype = r.ht_dtype;
  args.num_tokens = in.num_tokens;
  if (r.ht_dtype == DType::kBF16) {
    args.x = ht_in_.x_bf16.get();
  } else {
    args.x = ht_in_.x_fp8.get();
    args.x_scales = ht_in_.scales.get();
    if (r.column_major_scales) {
      args.scales_token_stride = 1;
      args.scales_col_stride = std::max(in.num_tokens, 1);
    }
  }
  args.topk.idx = ht_in_.idx(r.ht_idx);
  args.topk.idx_type = r.ht_idx;
  args.topk.num_tokens = in.num_tokens;
  args.topk.num_topk = r.ht_spec.num_topk;
  args.topk_weights = ht_in_.weights.get();
  args.expert_alignment = r.alignment;
  args.num_sms = r.ht_sms;
  if (r.exact_count) {
    args.exact_count = true;
    recv_copy_.poison();
    scales_copy_.poison();
    args.recv_x_out = recv_copy_.get();
    if (r.ht_dtype == DType::kFP8E4M3) args.recv_scales_out = scales_copy_.get();
  }
  Round poison_round = r;
  poison_round.cached = false;
  poisonHt(poison_round, stream);
  settleHostCopies();
  const DispatchResult res = buffer_.dispatch(args, handle_, stream);
  buffer_.sync(stream);
  if (!known_.ht) {
    known_.ht = true;
    known_.ht_bf16 = res;
  }
  if (res.recv_x_scales != nullptr) known_.ht_scales = res.recv_x_scales;

  {
    SCOPED_TRACE("HT dispatch");
    checkHtDispatch(res, all, r, true);
    if (r.exact_count) {
      const HtDispatchRef ref =
          referenceHtDispatch(all, me_, hidden, shape_.experts, r.ht_spec.num_topk, r.alignment);
      EXPECT_EQ(res.num_recv_tokens_host, ref.num_recv) << "exact count";
      const size_t rows = size_t(std::max(ref.num_recv, 0));
      if (r.ht_dtype == DType::kBF16) {
        const std::vector<uint16_t> x =
            DeviceArray<uint16_t>::downloadFrom(recv_copy_.get(), rows * hidden);
        EXPECT_TRUE(compareBf16Exact(x.data(), ref.recv_x_bf16.data(), ref.num_recv, hidden, true))
            << "recv_x_out copy";
      } else {
        EXPECT_TRUE(compareExact(recv_copy_.download(rows * hidden), ref.recv_x_fp8,
                                 "recv_x_out copy (fp8)"));
        EXPECT_TRUE(compareExact(scales_copy_.download(rows * (hidden / kFp8BlockSize)),
                                 ref.recv_scales, "recv_scales_out copy"));
      }
    } else {
      EXPECT_EQ(res.num_recv_tokens_host, -1);
    }
  }
  if (::testing::Test::HasFailure()) return;
  {
    SCOPED_TRACE("HT combine");
    checkHtCombine(all, r);
  }
  if (!r.cached || ::testing::Test::HasFailure()) return;

  // Cached re-dispatch: the same routing (kept in the handle), new rows, no top-k sent.
  SCOPED_TRACE("HT cached re-dispatch");
  ProblemSpec fresh_spec = r.ht_spec;
  fresh_spec.seed = mix64(r.ht_spec.seed ^ 0xcac4ed);
  const std::vector<RankInputs> fresh = generateProblem(fresh_spec);
  std::vector<RankInputs> same_routing = all;
  for (int rank = 0; rank < num_ranks_; ++rank) {
    same_routing[rank].x_bf16 = fresh[rank].x_bf16;
    same_routing[rank].x_fp8 = fresh[rank].x_fp8;
    same_routing[rank].x_scales = fresh[rank].x_scales;
  }
  ht_in_.upload(same_routing[me_], r.column_major_scales);
  args.topk = TopkView{};
  args.topk_weights = nullptr;
  args.exact_count = false;
  args.recv_x_out = nullptr;
  args.recv_scales_out = nullptr;
  poisonHt(r, stream);
  settleHostCopies();
  const DispatchResult cached = buffer_.dispatch(args, handle_, stream);
  buffer_.sync(stream);
  checkHtDispatch(cached, same_routing, r, false);
}

void Segment::runLl(const Round& r) {
  SCOPED_TRACE(describeLl(r));
  const int hidden = shape_.hidden;
  const int max_tokens = shape_.ll_max_tokens;
  const int topk = r.ll_spec.num_topk;
  const cudaStream_t stream = stream_.get();
  const std::vector<RankInputs> all = generateProblem(r.ll_spec);
  const RankInputs& in = all[me_];
  ll_in_.upload(in, false);

  const size_t rows = size_t(num_ranks_) * max_tokens;
  if (known_.ll) {
    const LlDispatchResult& v = known_.ll_result;
    poisonDevice(const_cast<void*>(v.recv_x), local_experts_ * rows * hidden * 2, stream);
    if (r.ll_fp8 && known_.ll_scales != nullptr) {
      poisonDevice(const_cast<float*>(known_.ll_scales),
                   local_experts_ * rows * (hidden / kFp8BlockSize) * sizeof(float), stream);
    }
    poisonDevice(const_cast<int32_t*>(v.recv_src_info), local_experts_ * rows * sizeof(int32_t),
                 stream);
    poisonDevice(const_cast<int32_t*>(v.num_recv_tokens_per_expert),
                 local_experts_ * sizeof(int32_t), stream);
  }
  LlDispatchArgs args;
  args.x = ll_in_.x_bf16.get();
  args.num_tokens = in.num_tokens;
  args.topk.idx = ll_in_.idx(r.ll_idx);
  args.topk.idx_type = r.ll_idx;
  args.topk.num_tokens = in.num_tokens;
  args.topk.num_topk = topk;
  args.topk_weights = ll_in_.weights.get();
  args.use_fp8 = r.ll_fp8;
  args.num_sms = r.ll_sms;
  LlDispatchResult res;
  settleHostCopies();
  if (r.ll_split) {
    buffer_.lowLatencyDispatch(args, stream, LlPhase::kSend);
    launchSpin(5000, stream);
    res = buffer_.lowLatencyDispatch(args, stream, LlPhase::kRecv);
  } else {
    res = buffer_.lowLatencyDispatch(args, stream);
  }
  buffer_.sync(stream);
  if (!known_.ll) {
    known_.ll = true;
    known_.ll_result = res;
  }
  if (res.recv_x_scales != nullptr) known_.ll_scales = res.recv_x_scales;

  // Dispatch: per local expert, the multiset of (source rank, token) and every row's data.
  std::vector<int32_t> counts;
  std::vector<int32_t> src_info;
  {
    SCOPED_TRACE("LL dispatch");
    EXPECT_EQ(res.rows_per_expert, int64_t(rows));
    ASSERT_EQ(res.recv_x_scales != nullptr, r.ll_fp8) << "recv_x_scales present iff FP8";
    const LlDispatchRef ref = referenceLlDispatch(all, me_, shape_.experts, topk);
    counts = DeviceArray<int32_t>::downloadFrom(res.num_recv_tokens_per_expert, local_experts_);
    src_info = DeviceArray<int32_t>::downloadFrom(res.recv_src_info, local_experts_ * rows);
    std::vector<uint16_t> x_bf16;
    std::vector<uint8_t> x_fp8;
    std::vector<float> scales;
    if (r.ll_fp8) {
      x_fp8 = DeviceArray<uint8_t>::downloadFrom(res.recv_x, local_experts_ * rows * hidden);
      scales = DeviceArray<float>::downloadFrom(res.recv_x_scales,
                                                local_experts_ * rows * (hidden / kFp8BlockSize));
    } else {
      x_bf16 = DeviceArray<uint16_t>::downloadFrom(res.recv_x, local_experts_ * rows * hidden);
    }
    for (int e = 0; e < local_experts_; ++e) {
      LlExpertView view;
      view.count = counts[e];
      ASSERT_TRUE(view.count >= 0 && size_t(view.count) <= rows)
          << "local expert " << e << " count " << view.count << " outside [0, " << rows << "]";
      view.src_info = src_info.data() + e * rows;
      if (r.ll_fp8) {
        view.x_fp8 = x_fp8.data() + e * rows * hidden;
        view.scales = scales.data() + e * rows * (hidden / kFp8BlockSize);
      } else {
        view.x_bf16 = x_bf16.data() + e * rows * hidden;
      }
      EXPECT_TRUE(checkLlExpertRows(all, ref.per_local_expert[e], view, max_tokens, hidden))
          << "local expert " << e << " (global " << me_ * local_experts_ + e << ")";
    }
  }
  if (::testing::Test::HasFailure()) return;

  // Combine: expert e's output for (source rank, token, column) is a deterministic value.
  SCOPED_TRACE("LL combine");
  const uint64_t seed = r.seed ^ 0x11c0;
  std::vector<uint16_t> y(local_experts_ * rows * hidden, 0x7f7f);
  for (int e = 0; e < local_experts_; ++e) {
    const int global_expert = me_ * local_experts_ + e;
    for (int i = 0; i < counts[e]; ++i) {
      const int info = src_info[e * rows + i];
      const int s = info / max_tokens;
      const int t = info % max_tokens;
      uint16_t* row = y.data() + (e * rows + i) * hidden;
      for (int col = 0; col < hidden; ++col)
        row[col] = expertOutputValue(seed, global_expert, s, t, col);
    }
  }
  ll_y_.upload(y);
  out_.poison();
  LlCombineArgs cargs;
  cargs.x = ll_y_.get();
  cargs.out = out_.get();
  cargs.num_sms = r.ll_sms;
  settleHostCopies();
  if (r.ll_split) {
    buffer_.lowLatencyCombine(cargs, stream, LlPhase::kSend);
    launchSpin(5000, stream);
    buffer_.lowLatencyCombine(cargs, stream, LlPhase::kRecv);
  } else {
    buffer_.lowLatencyCombine(cargs, stream);
  }
  buffer_.sync(stream);
  const std::vector<float> expected = referenceLlCombine(
      all, me_, shape_.experts, topk,
      [seed](int e, int s, int t, int col) {
        return bf16ToFloat(expertOutputValue(seed, e, s, t, col));
      },
      hidden);
  EXPECT_TRUE(compareBf16Near(out_.download(size_t(in.num_tokens) * hidden), expected, hidden))
      << "LL combine output (row = token of rank " << me_ << ")";
}

class Soak : public MultiRankGpuTest {};

TEST_F(Soak, RandomizedHtAndLlRoundsMatchTheReference) {
  Bootstrap& bs = bootstrap();
  int device_sms = 0;
  EPCOMM_TEST_CUDA(cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, device()));
  const int rounds = static_cast<int>(envCount("EPCOMM_SOAK_ROUNDS", kDefaultRounds));
  const uint64_t seed = static_cast<uint64_t>(envCount("EPCOMM_SOAK_SEED", kDefaultSeed));
  const int segment_rounds = rounds > 1000 ? 100 : 25;
  const int me = rank();
  if (me == 0) {
    std::printf(
        "soak: %d rounds (HT + LL each) on %d ranks, seed %llu, new buffer shape every %d\n",
        rounds, size(), static_cast<unsigned long long>(seed), segment_rounds);
    std::fflush(stdout);
  }
  const auto start = std::chrono::steady_clock::now();
  int done = 0;
  bool stop = false;
  for (int first = 0; first < rounds && !stop; first += segment_rounds) {
    Draw shape_draw(hashCombine(mix64(seed), 0x5e9u + static_cast<uint64_t>(first)));
    const Shape shape = drawShape(shape_draw, size());
    const std::string where_shape =
        "segment at round " + std::to_string(first) + " (" + describeShape(shape) + ")";
    try {
      Segment segment(bs, shape);
      for (int i = first; i < std::min(rounds, first + segment_rounds); ++i) {
        const Round round = drawRound(seed, i, shape, size(), device_sms);
        SCOPED_TRACE("rank " + std::to_string(me) + ", round " + std::to_string(i) + " of seed " +
                     std::to_string(seed) + ", " + where_shape);
        try {
          if (round.ll_first) segment.runLl(round);
          if (!::testing::Test::HasFailure()) segment.runHt(round);
          if (!round.ll_first && !::testing::Test::HasFailure()) segment.runLl(round);
        } catch (const std::exception& e) {
          ADD_FAILURE() << "exception: " << e.what();
        }
        ++done;
        if (anyRankFailed()) {
          stop = true;
          break;
        }
      }
    } catch (const std::exception& e) {
      ADD_FAILURE() << "rank " << me << ", " << where_shape << ": exception: " << e.what();
      stop = anyRankFailed();
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::string failed = failedRanks(bs);
  if (me == 0) {
    std::printf("soak: %d of %d rounds run in %.1f s%s%s\n", done, rounds, seconds,
                failed.empty() ? "" : "; stopped at the first failure: ", failed.c_str());
    std::fflush(stdout);
  }
}

}  // namespace
}  // namespace epcomm::test
