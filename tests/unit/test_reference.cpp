// SPDX-License-Identifier: Apache-2.0
// Tests of the CPU reference model and the seeded test-data generator (tests/common/).
//
// The multi-rank GPU tests trust these two pieces, so every expectation here is a number worked
// out by hand (see the comments), or a property checked independently of the code under test,
// never the same computation repeated.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "common/reference.hpp"
#include "common/test_data.hpp"

namespace epcomm::test {
namespace {

uint16_t bf(float v) {
  return floatToBf16(v);
}

// ----- number formats ------------------------------------------------------------------------

TEST(ReferenceNumbers, Bf16KnownValues) {
  EXPECT_EQ(bf(1.0f), 0x3f80);
  EXPECT_EQ(bf(-2.0f), 0xc000);
  EXPECT_EQ(bf(0.0f), 0x0000);
  EXPECT_EQ(bf(-0.0f), 0x8000);
  EXPECT_EQ(bf(1.0078125f), 0x3f81);    // 1 + 2^-7: exact
  EXPECT_EQ(bf(1.00390625f), 0x3f80);   // 1 + 2^-8: tie, even mantissa (0) wins
  EXPECT_EQ(bf(1.01171875f), 0x3f82);   // 1 + 3*2^-8: tie between 0x3f81 and 0x3f82 -> even
  EXPECT_EQ(bf(1.005859375f), 0x3f81);  // 1 + 1.5*2^-8: above the tie -> up
  EXPECT_EQ(bf(1.0019531f), 0x3f80);    // below the tie -> down
  EXPECT_EQ(bf(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(bf(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(bf(std::numeric_limits<float>::max()), 0x7f80);  // beyond the largest bf16 -> inf
  const uint16_t nan = bf(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7f80, 0x7f80);
  EXPECT_NE(nan & 0x007f, 0);
  // A signalling NaN whose payload lives only in the low 16 bits must not become inf.
  uint32_t snan_bits = 0x7f800001u;
  float snan = 0.0f;
  std::memcpy(&snan, &snan_bits, sizeof(snan));
  EXPECT_NE(bf(snan) & 0x007f, 0);

  EXPECT_EQ(bf16ToFloat(0x4049), 3.140625f);
  EXPECT_EQ(bf16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(bf16ToFloat(0x3e80), 0.25f);
  EXPECT_EQ(roundToBf16(64.875f), 65.0f);
}

TEST(ReferenceNumbers, Bf16MatchesCudaHeaderConversion) {
  // cuda_bf16.h's host conversion is an independent implementation of the same rounding.
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) {
    uint32_t bits = rng();
    float v = 0.0f;
    std::memcpy(&v, &bits, sizeof(v));
    if (std::isnan(v)) continue;
    const __nv_bfloat16_raw raw = __float2bfloat16_rn(v);
    ASSERT_EQ(bf(v), raw.x) << "float bits 0x" << std::hex << bits;
  }
}

TEST(ReferenceNumbers, Fp8KnownValues) {
  EXPECT_EQ(floatToFp8E4m3(448.0f), 0x7e);
  EXPECT_EQ(floatToFp8E4m3(500.0f), 0x7e);  // saturates
  EXPECT_EQ(floatToFp8E4m3(-1e9f), 0xfe);
  EXPECT_EQ(floatToFp8E4m3(-1.0f), 0xb8);
  EXPECT_EQ(floatToFp8E4m3(0.5f), 0x30);
  EXPECT_EQ(floatToFp8E4m3(3.25f), 0x45);
  EXPECT_EQ(floatToFp8E4m3(17.0f), 0x58);         // tie between 16 and 18 -> 16 (even)
  EXPECT_EQ(floatToFp8E4m3(19.0f), 0x5a);         // tie between 18 and 20 -> 20 (even)
  EXPECT_EQ(floatToFp8E4m3(0.001953125f), 0x01);  // 2^-9, smallest subnormal
  EXPECT_EQ(floatToFp8E4m3(std::numeric_limits<float>::quiet_NaN()) & 0x7f, 0x7f);

  EXPECT_EQ(fp8E4m3ToFloat(0x00), 0.0f);
  EXPECT_TRUE(std::signbit(fp8E4m3ToFloat(0x80)));
  EXPECT_EQ(fp8E4m3ToFloat(0x01), 0.001953125f);
  EXPECT_EQ(fp8E4m3ToFloat(0x07), 7.0f / 512.0f);  // largest subnormal
  EXPECT_EQ(fp8E4m3ToFloat(0x08), 0.015625f);      // 2^-6, smallest normal
  EXPECT_EQ(fp8E4m3ToFloat(0x38), 1.0f);
  EXPECT_EQ(fp8E4m3ToFloat(0x45), 3.25f);
  EXPECT_EQ(fp8E4m3ToFloat(0x7e), 448.0f);
  EXPECT_EQ(fp8E4m3ToFloat(0xfe), -448.0f);
  EXPECT_TRUE(std::isnan(fp8E4m3ToFloat(0x7f)));
  EXPECT_TRUE(std::isnan(fp8E4m3ToFloat(0xff)));
}

TEST(ReferenceNumbers, Fp8DecoderMatchesCudaHeaderForAllBytes) {
  for (int b = 0; b < 256; ++b) {
    const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b), __NV_E4M3);
    const float expected = __half2float(__half(h));
    const float actual = fp8E4m3ToFloat(static_cast<uint8_t>(b));
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(actual)) << "byte " << b;
    } else {
      EXPECT_EQ(actual, expected) << "byte " << b;
      EXPECT_EQ(std::signbit(actual), std::signbit(expected)) << "byte " << b;
      // And the encoder inverts the decoder on every finite value.
      EXPECT_EQ(floatToFp8E4m3(actual), b) << "byte " << b;
    }
  }
}

// ----- FP8 cast --------------------------------------------------------------------------------

TEST(ReferenceFp8Cast, KnownBlocks) {
  std::vector<uint16_t> row(512, bf(0.0f));
  // Block 0: amax 448 -> scale exactly 1, values quantized as they are.
  row[0] = bf(448.0f);
  row[1] = bf(-1.0f);
  row[2] = bf(0.5f);
  row[3] = bf(3.25f);
  row[4] = bf(17.0f);  // fp8 tie -> 16
  row[5] = bf(19.0f);  // fp8 tie -> 20
  row[6] = bf(0.001953125f);
  row[7] = bf(-0.0f);
  // Block 1: all zero -> scale is the floor 1e-4 / 448, every byte zero.
  // Block 2: amax 2 -> scale 2/448, so 2 -> 448, 1 -> 224, 0.25 -> 56, -0.5 -> -112.
  row[256] = bf(2.0f);
  row[257] = bf(1.0f);
  row[258] = bf(0.25f);
  row[259] = bf(-0.5f);
  // Block 3: the amax comes from a negative value.
  row[384] = bf(-448.0f);
  row[385] = bf(1.0f);

  std::vector<uint8_t> q(512, 0xaa);
  std::vector<float> scales(4, -1.0f);
  referenceFp8Cast(row.data(), 512, q.data(), scales.data());

  EXPECT_EQ(scales[0], 1.0f);
  EXPECT_EQ(scales[1], 1e-4f / 448.0f);
  EXPECT_NEAR(scales[1], 2.2321428e-7, 1e-13);
  EXPECT_EQ(scales[2], 2.0f / 448.0f);
  EXPECT_EQ(scales[3], 1.0f);

  const std::vector<uint8_t> block0 = {0x7e, 0xb8, 0x30, 0x45, 0x58, 0x5a, 0x01, 0x80};
  for (int c = 0; c < 8; ++c) EXPECT_EQ(q[c], block0[c]) << "column " << c;
  for (int c = 8; c < 256; ++c) ASSERT_EQ(q[c], 0x00) << "column " << c;
  EXPECT_EQ(q[256], 0x7e);  // 448
  EXPECT_EQ(q[257], 0x76);  // 224 = 1.75 * 2^7
  EXPECT_EQ(q[258], 0x66);  // 56 = 1.75 * 2^5
  EXPECT_EQ(q[259], 0xee);  // -112 = -1.75 * 2^6
  EXPECT_EQ(q[260], 0x00);
  EXPECT_EQ(q[384], 0xfe);
  EXPECT_EQ(q[385], 0x38);
  EXPECT_EQ(q[386], 0x00);
}

TEST(ReferenceFp8Cast, RejectsHiddenNotMultipleOf128) {
  std::vector<uint16_t> row(200, bf(1.0f));
  std::vector<uint8_t> q(200);
  std::vector<float> scales(2);
  EXPECT_THROW(referenceFp8Cast(row.data(), 200, q.data(), scales.data()), std::invalid_argument);
}

// ----- the hand-made problem ---------------------------------------------------------------------
//
// 2 ranks, 4 experts (rank 0 owns 0,1; rank 1 owns 2,3), top-2, hidden 128.
//   rank 0: t0 [1, 2] w [0.5, 0.25]    -> ranks 0 and 1
//           t1 [-1,-1] w [0.75, 0.125] -> nowhere
//           t2 [3, 2] w [0.5, 0.125]   -> rank 1 only (both experts there)
//           t3 [0,-1] w [0.375, 0.5]   -> rank 0
//   rank 1: t0 [2, 0] w [0.25, 0.75]   -> ranks 1 and 0
//           t1 [1, 0] w [0.5, 0.5]     -> rank 0 only (both experts there)
//           t2 [-1, 3] w [0.625, 0.25] -> rank 1
// x[t][0..2] is the origin tag; x[t][c >= 3] = (8 * rank + t + 1) * (c odd ? 1 : -1).
// x_fp8[t][c] = 64 * rank + 8 * t + (c & 7); x_scales[t][0] = 10 * rank + t + 0.5.

constexpr int kH = 128;
constexpr int kE = 4;
constexpr int kK = 2;

RankInputs makeRank(int rank, const std::vector<int64_t>& topk, const std::vector<float>& w) {
  RankInputs in;
  in.rank = rank;
  in.num_tokens = static_cast<int>(topk.size()) / kK;
  in.hidden = kH;
  in.num_topk = kK;
  in.topk_idx = topk;
  in.topk_idx32.assign(topk.begin(), topk.end());
  in.topk_weights = w;
  for (int t = 0; t < in.num_tokens; ++t) {
    in.x_bf16.push_back(bf(static_cast<float>(rank + 1)));
    in.x_bf16.push_back(bf(static_cast<float>(t + 1)));
    in.x_bf16.push_back(bf(1.0f));
    for (int c = 3; c < kH; ++c)
      in.x_bf16.push_back(bf(static_cast<float>(8 * rank + t + 1) * (c % 2 ? 1.0f : -1.0f)));
    for (int c = 0; c < kH; ++c)
      in.x_fp8.push_back(static_cast<uint8_t>(64 * rank + 8 * t + (c & 7)));
    in.x_scales.push_back(static_cast<float>(10 * rank + t) + 0.5f);
  }
  return in;
}

std::vector<RankInputs> handProblem() {
  return {makeRank(0, {1, 2, -1, -1, 3, 2, 0, -1},
                   {0.5f, 0.25f, 0.75f, 0.125f, 0.5f, 0.125f, 0.375f, 0.5f}),
          makeRank(1, {2, 0, 1, 0, -1, 3}, {0.25f, 0.75f, 0.5f, 0.5f, 0.625f, 0.25f})};
}

TEST(ReferenceLayout, HandComputedRank0) {
  const auto all = handProblem();
  const LayoutRef ref = referenceLayout(all[0].topk_idx.data(), 4, kK, kE, 2);
  EXPECT_EQ(ref.tokens_per_rank, (std::vector<int>{2, 2}));
  EXPECT_EQ(ref.tokens_per_expert, (std::vector<int>{1, 1, 2, 1}));
  EXPECT_EQ(ref.is_token_in_rank, (std::vector<uint8_t>{1, 1, 0, 0, 0, 1, 1, 0}));
  EXPECT_EQ(ref.token_slot, (std::vector<int>{0, 0, -1, -1, -1, 1, 1, -1}));
}

TEST(ReferenceLayout, HandComputedRank1) {
  const auto all = handProblem();
  const LayoutRef ref = referenceLayout(all[1].topk_idx.data(), 3, kK, kE, 2);
  EXPECT_EQ(ref.tokens_per_rank, (std::vector<int>{2, 2}));
  EXPECT_EQ(ref.tokens_per_expert, (std::vector<int>{2, 1, 1, 1}));
  EXPECT_EQ(ref.is_token_in_rank, (std::vector<uint8_t>{1, 1, 1, 0, 0, 1}));
  EXPECT_EQ(ref.token_slot, (std::vector<int>{0, 0, 1, -1, -1, 1}));
}

TEST(ReferenceLayout, FourRanksSlotsCountEarlierTokensOnly) {
  // 4 ranks, 8 experts (2 per rank), top-3, 4 tokens.
  //   t0 [0, 1, 7]  -> ranks 0, 3
  //   t1 [6, 2, -1] -> ranks 3, 1
  //   t2 [7, 6, 5]  -> ranks 3, 2
  //   t3 [4, 0, 3]  -> ranks 2, 0, 1
  const std::vector<int64_t> topk = {0, 1, 7, 6, 2, -1, 7, 6, 5, 4, 0, 3};
  const LayoutRef ref = referenceLayout(topk.data(), 4, 3, 8, 4);
  EXPECT_EQ(ref.tokens_per_rank, (std::vector<int>{2, 2, 2, 3}));
  EXPECT_EQ(ref.tokens_per_expert, (std::vector<int>{2, 1, 1, 1, 1, 1, 2, 2}));
  EXPECT_EQ(ref.token_slot,
            (std::vector<int>{0, -1, -1, 0, -1, 0, -1, 1, -1, -1, 0, 2, 1, 1, 1, -1}));
}

TEST(ReferenceLayout, RejectsOutOfRangeExpert) {
  const std::vector<int64_t> topk = {0, 4};
  EXPECT_THROW(referenceLayout(topk.data(), 1, 2, 4, 2), std::invalid_argument);
  const std::vector<int64_t> topk2 = {0, -2};
  EXPECT_THROW(referenceLayout(topk2.data(), 1, 2, 4, 2), std::invalid_argument);
  EXPECT_THROW(referenceLayout(topk.data(), 1, 2, 5, 2), std::invalid_argument);  // 5 % 2
}

TEST(ReferenceHtDispatch, HandComputedRank0) {
  const auto all = handProblem();
  const HtDispatchRef ref = referenceHtDispatch(all, 0, kH, kE, kK, 1);
  // Rows: (0,t0) (0,t3) (1,t0) (1,t1).
  EXPECT_EQ(ref.num_recv, 4);
  EXPECT_EQ(ref.rank_prefix, (std::vector<int>{0, 2, 4}));
  EXPECT_EQ(ref.src_rank, (std::vector<int>{0, 0, 1, 1}));
  EXPECT_EQ(ref.src_token, (std::vector<int>{0, 3, 0, 1}));
  EXPECT_EQ(ref.recv_src_idx, (std::vector<int>{0, 3, 0, 1}));
  EXPECT_EQ(ref.recv_topk_idx, (std::vector<int64_t>{1, -1, 0, -1, -1, 0, 1, 0}));
  EXPECT_EQ(ref.recv_topk_weights,
            (std::vector<float>{0.5f, 0.0f, 0.375f, 0.0f, 0.0f, 0.75f, 0.5f, 0.5f}));
  // Local expert 0 (global 0): rows 1, 2, 3; local expert 1 (global 1): rows 0, 3.
  EXPECT_EQ(ref.tokens_per_local_expert, (std::vector<int>{3, 2}));

  ASSERT_EQ(ref.recv_x_bf16.size(), 4u * kH);
  // Row 1 is rank 0 token 3: tag (1, 4, 1), then value 8*0 + 3 + 1 = 4 with alternating sign.
  EXPECT_EQ(ref.recv_x_bf16[1 * kH + 0], bf(1.0f));
  EXPECT_EQ(ref.recv_x_bf16[1 * kH + 1], bf(4.0f));
  EXPECT_EQ(ref.recv_x_bf16[1 * kH + 3], bf(4.0f));
  EXPECT_EQ(ref.recv_x_bf16[1 * kH + 4], bf(-4.0f));
  // Row 3 is rank 1 token 1: tag (2, 2, 1), value 8 + 1 + 1 = 10.
  EXPECT_EQ(ref.recv_x_bf16[3 * kH + 0], bf(2.0f));
  EXPECT_EQ(ref.recv_x_bf16[3 * kH + 1], bf(2.0f));
  EXPECT_EQ(ref.recv_x_bf16[3 * kH + 127], bf(10.0f));
  ASSERT_EQ(ref.recv_x_fp8.size(), 4u * kH);
  EXPECT_EQ(ref.recv_x_fp8[3 * kH + 10], 74);  // 64 + 8 + (10 & 7)
  EXPECT_EQ(ref.recv_x_fp8[1 * kH + 7], 31);   // 0 + 24 + 7
  EXPECT_EQ(ref.recv_scales, (std::vector<float>{0.5f, 3.5f, 10.5f, 11.5f}));
}

TEST(ReferenceHtDispatch, HandComputedRank1) {
  const auto all = handProblem();
  const HtDispatchRef ref = referenceHtDispatch(all, 1, kH, kE, kK, 1);
  // Rows: (0,t0) (0,t2) (1,t0) (1,t2).
  EXPECT_EQ(ref.num_recv, 4);
  EXPECT_EQ(ref.rank_prefix, (std::vector<int>{0, 2, 4}));
  EXPECT_EQ(ref.src_rank, (std::vector<int>{0, 0, 1, 1}));
  EXPECT_EQ(ref.src_token, (std::vector<int>{0, 2, 0, 2}));
  EXPECT_EQ(ref.recv_topk_idx, (std::vector<int64_t>{-1, 0, 1, 0, 0, -1, -1, 1}));
  EXPECT_EQ(ref.recv_topk_weights,
            (std::vector<float>{0.0f, 0.25f, 0.5f, 0.125f, 0.25f, 0.0f, 0.0f, 0.25f}));
  EXPECT_EQ(ref.tokens_per_local_expert, (std::vector<int>{3, 2}));
  EXPECT_EQ(ref.recv_scales, (std::vector<float>{0.5f, 2.5f, 10.5f, 12.5f}));
}

TEST(ReferenceHtDispatch, ExpertAlignmentRoundsCountsUp) {
  const auto all = handProblem();
  EXPECT_EQ(referenceHtDispatch(all, 0, kH, kE, kK, 2).tokens_per_local_expert,
            (std::vector<int>{4, 2}));
  EXPECT_EQ(referenceHtDispatch(all, 0, kH, kE, kK, 4).tokens_per_local_expert,
            (std::vector<int>{4, 4}));
  EXPECT_EQ(referenceHtDispatch(all, 1, kH, kE, kK, 128).tokens_per_local_expert,
            (std::vector<int>{128, 128}));
  EXPECT_THROW(referenceHtDispatch(all, 0, kH, kE, kK, 0), std::invalid_argument);
}

TEST(ReferenceHtDispatch, RankWithZeroTokens) {
  // Rank 0 sends nothing; rank 1's two tokens go to rank 0 ([0,1]) and to both ([3,1]).
  std::vector<RankInputs> all = {makeRank(0, {}, {}),
                                 makeRank(1, {0, 1, 3, 1}, {0.5f, 0.25f, 0.125f, 0.75f})};
  const HtDispatchRef on0 = referenceHtDispatch(all, 0, kH, kE, kK, 1);
  EXPECT_EQ(on0.num_recv, 2);
  EXPECT_EQ(on0.rank_prefix, (std::vector<int>{0, 0, 2}));
  EXPECT_EQ(on0.src_token, (std::vector<int>{0, 1}));
  EXPECT_EQ(on0.recv_topk_idx, (std::vector<int64_t>{0, 1, -1, 1}));
  EXPECT_EQ(on0.recv_topk_weights, (std::vector<float>{0.5f, 0.25f, 0.0f, 0.75f}));
  EXPECT_EQ(on0.tokens_per_local_expert, (std::vector<int>{1, 2}));
  const HtDispatchRef on1 = referenceHtDispatch(all, 1, kH, kE, kK, 1);
  EXPECT_EQ(on1.num_recv, 1);
  EXPECT_EQ(on1.rank_prefix, (std::vector<int>{0, 0, 1}));
  EXPECT_EQ(on1.recv_topk_idx, (std::vector<int64_t>{1, -1}));
  EXPECT_EQ(on1.tokens_per_local_expert, (std::vector<int>{0, 1}));
  // Combine back to the empty rank is an empty result.
  std::vector<std::vector<uint16_t>> y = {std::vector<uint16_t>(2 * kH, bf(1.0f)),
                                          std::vector<uint16_t>(1 * kH, bf(1.0f))};
  EXPECT_TRUE(referenceHtCombine(all, 0, y, kH, kE, kK, true, nullptr).empty());
}

// Expert outputs for the HT combine tests: on destination d, row i, column c the value
// (1 + i + 4 d) * (c odd ? 2 : 1); rows past num_recv hold NaN so that reading one shows.
std::vector<std::vector<uint16_t>> handCombineInputs() {
  std::vector<std::vector<uint16_t>> y(2, std::vector<uint16_t>(8 * kH, 0x7fc0));
  for (int d = 0; d < 2; ++d)
    for (int i = 0; i < 4; ++i)
      for (int c = 0; c < kH; ++c)
        y[d][i * kH + c] = bf(static_cast<float>(1 + i + 4 * d) * (c % 2 ? 2.0f : 1.0f));
  return y;
}

void expectColumns(const std::vector<float>& out, int token, float even, float odd) {
  for (int c = 0; c < kH; ++c)
    ASSERT_EQ(out[token * kH + c], c % 2 ? odd : even) << "token " << token << " column " << c;
}

// ----- dispatch from a caller's layout, static shapes, combined top-k weights ----------------

TEST(ReferenceHtDispatchFromLayout, TopkLayoutsGiveTheTopkDispatch) {
  const auto all = handProblem();
  const std::vector<LayoutRef> layouts = referenceLayouts(all, kE, kK);
  for (int d = 0; d < 2; ++d) {
    SCOPED_TRACE("destination " + std::to_string(d));
    const HtDispatchRef want = referenceHtDispatch(all, d, kH, kE, kK, 2);
    const HtDispatchRef got = referenceHtDispatchFromLayout(all, layouts, d, kH, kE, kK, true, 2);
    EXPECT_EQ(got.num_recv, want.num_recv);
    EXPECT_EQ(got.rank_prefix, want.rank_prefix);
    EXPECT_EQ(got.src_token, want.src_token);
    EXPECT_EQ(got.recv_x_bf16, want.recv_x_bf16);
    EXPECT_EQ(got.recv_topk_idx, want.recv_topk_idx);
    EXPECT_EQ(got.recv_topk_weights, want.recv_topk_weights);
    EXPECT_EQ(got.tokens_per_local_expert, want.tokens_per_local_expert);
  }
}

// Rank 0 also sends t1 (which has no expert) to rank 1, and claims one more pair for expert 2:
// rows follow is_token_in_rank, counts follow tokens_per_expert, no top-k without with_topk.
TEST(ReferenceHtDispatchFromLayout, LayoutOnlyRoutesByIsTokenInRank) {
  const auto all = handProblem();
  std::vector<LayoutRef> layouts = referenceLayouts(all, kE, kK);
  layouts[0].is_token_in_rank[1 * 2 + 1] = 1;
  layouts[0].tokens_per_rank[1] = 3;
  layouts[0].tokens_per_expert[2] = 3;  // <= tokens_per_rank[1]
  const HtDispatchRef on1 = referenceHtDispatchFromLayout(all, layouts, 1, kH, kE, kK, false, 1);
  EXPECT_EQ(on1.num_recv, 5);
  EXPECT_EQ(on1.rank_prefix, (std::vector<int>{0, 3, 5}));
  EXPECT_EQ(on1.src_rank, (std::vector<int>{0, 0, 0, 1, 1}));
  EXPECT_EQ(on1.recv_src_idx, (std::vector<int>{0, 1, 2, 0, 2}));
  EXPECT_TRUE(on1.recv_topk_idx.empty());
  EXPECT_TRUE(on1.recv_topk_weights.empty());
  // expert 2: 3 (rank 0's claim) + 1; expert 3: 1 + 1.
  EXPECT_EQ(on1.tokens_per_local_expert, (std::vector<int>{4, 2}));
  EXPECT_EQ(on1.recv_x_bf16[1 * kH + 1], bf(2.0f));  // row 1 is rank 0's t1
  // Rank 0 receives what topk routing gives (its layouts did not change for rank 0).
  EXPECT_EQ(referenceHtDispatchFromLayout(all, layouts, 0, kH, kE, kK, false, 1).src_token,
            (std::vector<int>{0, 3, 0, 1}));
}

TEST(ReferenceHtDispatchFromLayout, RejectsInconsistentLayouts) {
  const auto all = handProblem();
  const std::vector<LayoutRef> good = referenceLayouts(all, kE, kK);
  std::vector<LayoutRef> bad = good;
  bad[1].tokens_per_rank[0] = 1;  // is_token_in_rank sends 2 tokens to rank 0
  EXPECT_THROW(referenceHtDispatchFromLayout(all, bad, 0, kH, kE, kK, false, 1),
               std::invalid_argument);
  bad = good;
  bad[0].tokens_per_expert[3] = 3;  // rank 0 sends only 2 tokens to rank 1
  EXPECT_THROW(referenceHtDispatchFromLayout(all, bad, 0, kH, kE, kK, false, 1),
               std::invalid_argument);
  bad = good;
  bad[0].tokens_per_expert[0] = -1;
  EXPECT_THROW(referenceHtDispatchFromLayout(all, bad, 0, kH, kE, kK, false, 1),
               std::invalid_argument);
  bad = good;
  bad.pop_back();
  EXPECT_THROW(referenceHtDispatchFromLayout(all, bad, 0, kH, kE, kK, false, 1),
               std::invalid_argument);
}

TEST(ReferencePadToWorstTokens, AppendsZeroRowsAndMinusOne) {
  const auto all = handProblem();
  HtDispatchRef ref = referenceHtDispatch(all, 0, kH, kE, kK, 1);
  padToWorstTokens(ref, 6, kH, kK);
  EXPECT_EQ(ref.num_recv, 4);
  EXPECT_EQ(ref.rank_prefix, (std::vector<int>{0, 2, 4}));
  EXPECT_EQ(ref.recv_src_idx, (std::vector<int>{0, 3, 0, 1, -1, -1}));
  EXPECT_EQ(ref.recv_topk_idx, (std::vector<int64_t>{1, -1, 0, -1, -1, 0, 1, 0, -1, -1, -1, -1}));
  EXPECT_EQ(ref.recv_topk_weights.size(), 12u);
  EXPECT_EQ(ref.recv_topk_weights[8], 0.0f);
  ASSERT_EQ(ref.recv_x_bf16.size(), 6u * kH);
  EXPECT_EQ(ref.recv_x_bf16[4 * kH], 0);
  EXPECT_EQ(ref.recv_x_bf16[6 * kH - 1], 0);
  EXPECT_EQ(ref.recv_x_fp8.size(), 6u * kH);
  EXPECT_EQ(ref.recv_scales, (std::vector<float>{0.5f, 3.5f, 10.5f, 11.5f, 0.0f, 0.0f}));

  HtDispatchRef no_topk =
      referenceHtDispatchFromLayout(all, referenceLayouts(all, kE, kK), 0, kH, kE, kK, false, 1);
  padToWorstTokens(no_topk, 4, kH, 0);  // exactly full: nothing added
  EXPECT_EQ(no_topk.recv_src_idx.size(), 4u);
  EXPECT_TRUE(no_topk.recv_topk_idx.empty());

  HtDispatchRef over = referenceHtDispatch(all, 0, kH, kE, kK, 1);
  EXPECT_THROW(padToWorstTokens(over, 3, kH, kK), std::invalid_argument);
}

TEST(ReferenceCombinedTopkWeights, SumsTheRowsOfEveryRankInRankOrder) {
  const auto all = handProblem();
  const std::vector<LayoutRef> layouts = referenceLayouts(all, kE, kK);
  // recv_weights[d] [4 rows, 2]: rows as in HandComputedRank0 / HandComputedRank1.
  const std::vector<std::vector<float>> w = {{1, 2, 3, 4, 5, 6, 7, 8},
                                             {10, 20, 30, 40, 50, 60, 70, 80}};
  // Rank 0: t0 -> row 0 on both; t1 nowhere; t2 -> row 1 on rank 1; t3 -> row 1 on rank 0.
  EXPECT_EQ(referenceCombinedTopkWeights(layouts, 0, w, kK),
            (std::vector<float>{11, 22, 0, 0, 30, 40, 3, 4}));
  // Rank 1 (rows from 2 on): t0 -> row 2 on both; t1 -> row 3 on rank 0; t2 -> row 3 on rank 1.
  EXPECT_EQ(referenceCombinedTopkWeights(layouts, 1, w, kK),
            (std::vector<float>{55, 66, 7, 8, 70, 80}));
  // With rank 0's t1 also sent to rank 1 (a caller's layout), rank 1 holds 5 rows and t1 gets row
  // 1 there; rank 1's own rows move down by one.
  std::vector<LayoutRef> extra = layouts;
  extra[0].is_token_in_rank[1 * 2 + 1] = 1;
  extra[0].tokens_per_rank[1] = 3;
  const std::vector<std::vector<float>> w5 = {{1, 2, 3, 4, 5, 6, 7, 8},
                                              {10, 20, 30, 40, 50, 60, 70, 80, 90, 100}};
  EXPECT_EQ(referenceCombinedTopkWeights(extra, 0, w5, kK),
            (std::vector<float>{11, 22, 30, 40, 50, 60, 3, 4}));
  EXPECT_EQ(referenceCombinedTopkWeights(extra, 1, w5, kK),
            (std::vector<float>{75, 86, 7, 8, 90, 100}));
  // Too few rows for the routing.
  EXPECT_THROW(referenceCombinedTopkWeights(extra, 0, w, kK), std::invalid_argument);
}

TEST(ReferenceHtCombine, RoutingFromACallersLayout) {
  const auto all = handProblem();
  std::vector<LayoutRef> extra = referenceLayouts(all, kE, kK);
  extra[0].is_token_in_rank[1 * 2 + 1] = 1;  // rank 0's t1 also goes to rank 1 (row 1 there)
  extra[0].tokens_per_rank[1] = 3;
  std::vector<std::vector<uint16_t>> y = {std::vector<uint16_t>(4 * kH, bf(1.0f)),
                                          std::vector<uint16_t>(5 * kH, bf(2.0f))};
  const std::vector<float> out = referenceHtCombine(all, 0, y, kH, kE, kK, false, nullptr, &extra);
  ASSERT_EQ(out.size(), 4u * kH);
  EXPECT_EQ(out[0 * kH], 3.0f);  // t0: ranks 0 and 1
  EXPECT_EQ(out[1 * kH], 2.0f);  // t1: rank 1 only, through the layout
  EXPECT_EQ(out[3 * kH], 1.0f);  // t3: rank 0
  // Without the layout t1 went nowhere.
  y[1].resize(4 * kH);
  EXPECT_EQ(referenceHtCombine(all, 0, y, kH, kE, kK, false, nullptr)[1 * kH], 0.0f);
}

TEST(ReferenceHtCombine, UnweightedSumsRowsOfEveryDestination) {
  const auto all = handProblem();
  const auto y = handCombineInputs();
  const std::vector<float> out0 = referenceHtCombine(all, 0, y, kH, kE, kK, false, nullptr);
  ASSERT_EQ(out0.size(), 4u * kH);
  expectColumns(out0, 0, 6.0f, 12.0f);  // d0 row 0 (1) + d1 row 0 (5)
  expectColumns(out0, 1, 0.0f, 0.0f);   // sent nowhere
  expectColumns(out0, 2, 6.0f, 12.0f);  // d1 row 1 (6), once although two experts live there
  expectColumns(out0, 3, 2.0f, 4.0f);   // d0 row 1 (2)
  const std::vector<float> out1 = referenceHtCombine(all, 1, y, kH, kE, kK, false, nullptr);
  expectColumns(out1, 0, 10.0f, 20.0f);  // d0 row 2 (3) + d1 row 2 (7)
  expectColumns(out1, 1, 4.0f, 8.0f);    // d0 row 3 (4)
  expectColumns(out1, 2, 8.0f, 16.0f);   // d1 row 3 (8)
}

TEST(ReferenceHtCombine, WeightedUsesSumOfWeightsPerDestination) {
  const auto all = handProblem();
  const auto y = handCombineInputs();
  const std::vector<float> out0 = referenceHtCombine(all, 0, y, kH, kE, kK, true, nullptr);
  expectColumns(out0, 0, 1.75f, 3.5f);  // 0.5 * 1 + 0.25 * 5
  expectColumns(out0, 1, 0.0f, 0.0f);
  expectColumns(out0, 2, 3.75f, 7.5f);  // (0.5 + 0.125) * 6
  expectColumns(out0, 3, 0.75f, 1.5f);  // 0.375 * 2; the -1 entry's weight 0.5 is ignored
  const std::vector<float> out1 = referenceHtCombine(all, 1, y, kH, kE, kK, true, nullptr);
  expectColumns(out1, 0, 4.0f, 8.0f);  // 0.75 * 3 + 0.25 * 7
  expectColumns(out1, 1, 4.0f, 8.0f);  // (0.5 + 0.5) * 4
  expectColumns(out1, 2, 2.0f, 4.0f);  // 0.25 * 8; the -1 entry's weight 0.625 is ignored
}

TEST(ReferenceHtCombine, BiasIsAddedOncePerToken) {
  const auto all = handProblem();
  const auto y = handCombineInputs();
  std::vector<uint16_t> bias(4 * kH);
  for (int t = 0; t < 4; ++t)
    for (int c = 0; c < kH; ++c) bias[t * kH + c] = bf(0.5f * static_cast<float>(t + 1));
  const std::vector<float> out0 = referenceHtCombine(all, 0, y, kH, kE, kK, true, bias.data());
  expectColumns(out0, 0, 2.25f, 4.0f);
  expectColumns(out0, 1, 1.0f, 1.0f);  // a token sent nowhere still gets its bias
  expectColumns(out0, 2, 5.25f, 9.0f);
  expectColumns(out0, 3, 2.75f, 3.5f);
}

TEST(ReferenceHtCombine, RejectsTooFewInputRows) {
  const auto all = handProblem();
  std::vector<std::vector<uint16_t>> y = handCombineInputs();
  y[1].resize(3 * kH);  // rank 1 received 4 rows
  EXPECT_THROW(referenceHtCombine(all, 0, y, kH, kE, kK, true, nullptr), std::invalid_argument);
  y.pop_back();
  EXPECT_THROW(referenceHtCombine(all, 0, y, kH, kE, kK, true, nullptr), std::invalid_argument);
}

// ----- LL ----------------------------------------------------------------------------------------

using Origins = std::vector<std::pair<int, int>>;

Origins origins(const LlExpertRows& rows) {
  Origins out;
  for (size_t i = 0; i < rows.src_rank.size(); ++i)
    out.emplace_back(rows.src_rank[i], rows.src_token[i]);
  std::sort(out.begin(), out.end());
  return out;
}

TEST(ReferenceLlDispatch, HandComputedExpertRows) {
  const auto all = handProblem();
  const LlDispatchRef on0 = referenceLlDispatch(all, 0, kE, kK);
  ASSERT_EQ(on0.per_local_expert.size(), 2u);
  EXPECT_EQ(origins(on0.per_local_expert[0]), (Origins{{0, 3}, {1, 0}, {1, 1}}));  // expert 0
  EXPECT_EQ(origins(on0.per_local_expert[1]), (Origins{{0, 0}, {1, 1}}));          // expert 1
  const LlDispatchRef on1 = referenceLlDispatch(all, 1, kE, kK);
  ASSERT_EQ(on1.per_local_expert.size(), 2u);
  EXPECT_EQ(origins(on1.per_local_expert[0]), (Origins{{0, 0}, {0, 2}, {1, 0}}));  // expert 2
  EXPECT_EQ(origins(on1.per_local_expert[1]), (Origins{{0, 2}, {1, 2}}));          // expert 3
}

TEST(ReferenceLlCombine, HandComputedWithPerRankBf16Rounding) {
  const auto all = handProblem();
  // f(e, s, t, c) = e + 1 + c. Column 0 sums are exact; in column 100 some per-rank partials are
  // not bf16 values and must be rounded before the cross-rank sum.
  const ExpertOutputFn f = [](int e, int, int, int c) { return static_cast<float>(e + 1 + c); };
  const std::vector<float> out0 = referenceLlCombine(all, 0, kE, kK, f, kH);
  ASSERT_EQ(out0.size(), 4u * kH);
  // t0: d0 0.5*(2+c), d1 0.25*(3+c). c=100: 51 + 25.75 (both bf16-exact).
  EXPECT_EQ(out0[0 * kH + 0], 1.75f);
  EXPECT_EQ(out0[0 * kH + 100], 76.75f);
  // t1: no expert.
  for (int c = 0; c < kH; ++c) ASSERT_EQ(out0[1 * kH + c], 0.0f) << c;
  // t2: one partial on d1 = 0.5*(4+c) + 0.125*(3+c). c=100: 64.875 -> bf16 65 (spacing 0.5).
  EXPECT_EQ(out0[2 * kH + 0], 2.375f);
  EXPECT_EQ(out0[2 * kH + 100], 65.0f);
  // t3: 0.375*(1+c). c=100: 37.875 is a tie between 37.75 and 38 -> 38 (even mantissa).
  EXPECT_EQ(out0[3 * kH + 0], 0.375f);
  EXPECT_EQ(out0[3 * kH + 100], 38.0f);

  const std::vector<float> out1 = referenceLlCombine(all, 1, kE, kK, f, kH);
  // t0: d0 0.75*(1+c), d1 0.25*(3+c). c=100: 75.75 ties 75.5/76 -> 76, plus 25.75.
  EXPECT_EQ(out1[0 * kH + 0], 1.5f);
  EXPECT_EQ(out1[0 * kH + 100], 101.75f);
  // t1: both experts on d0: 0.5*(2+c) + 0.5*(1+c). c=100: 101.5 (bf16-exact).
  EXPECT_EQ(out1[1 * kH + 0], 1.5f);
  EXPECT_EQ(out1[1 * kH + 100], 101.5f);
  // t2: 0.25*(4+c); the -1 entry contributes nothing.
  EXPECT_EQ(out1[2 * kH + 0], 1.0f);
  EXPECT_EQ(out1[2 * kH + 100], 26.0f);
}

// LlCombineArgs::topk_weights replace the dispatch's for the owner's tokens: the result equals
// the model run on inputs whose topk_weights are the combine weights, and differs from the
// dispatch-weighted one.
TEST(ReferenceLlCombine, CombineWeightsReplaceTheDispatchWeights) {
  const auto all = handProblem();
  const ExpertOutputFn f = [](int e, int, int, int c) { return static_cast<float>(e + 1 + c); };
  for (int s = 0; s < 2; ++s) {
    std::vector<float> w(all[s].topk_weights.size());
    for (size_t i = 0; i < w.size(); ++i) w[i] = 0.0625f * static_cast<float>(i % 7 + 1);
    auto replaced = all;
    replaced[s].topk_weights = w;
    const std::vector<float> with = referenceLlCombine(all, s, kE, kK, f, kH, w.data());
    EXPECT_EQ(with, referenceLlCombine(replaced, s, kE, kK, f, kH)) << "rank " << s;
    EXPECT_NE(with, referenceLlCombine(all, s, kE, kK, f, kH)) << "rank " << s;
  }
  // Token 1 of rank 0 is routed nowhere: its row is zeros whatever the weights.
  std::vector<float> w(all[0].topk_weights.size(), 3.0f);
  const std::vector<float> out = referenceLlCombine(all, 0, kE, kK, f, kH, w.data());
  for (int c = 0; c < kH; ++c) ASSERT_EQ(out[1 * kH + c], 0.0f) << c;
}

// The FP8 convention of ops.hpp: x ~= fp8 * scale with scale = max(amax, 1e-4) / 448 (not a
// power of two), within |x| / 16 + scale / 1024; the bound is tight enough to catch a wrong
// scale (e.g. amax / 240 or a power-of-two rounding of the scale changes the bytes).
TEST(ReferenceFp8Cast, DequantizedValuesWithinTheStatedBound) {
  std::mt19937 gen(5);
  std::uniform_real_distribution<float> mag(-6.0f, 3.0f);
  const int hidden = 1024;
  std::vector<uint16_t> row(hidden);
  for (int trial = 0; trial < 50; ++trial) {
    for (int c = 0; c < hidden; ++c) {
      const float v = std::pow(2.0f, mag(gen)) * ((c + trial) % 3 == 0 ? -1.0f : 1.0f);
      row[c] = bf((c / 128) % 4 == 3 && trial % 2 ? v * 1e-6f : v);  // some tiny blocks
    }
    std::vector<uint8_t> q(hidden);
    std::vector<float> scales(hidden / 128);
    referenceFp8Cast(row.data(), hidden, q.data(), scales.data());
    for (int b = 0; b < hidden / 128; ++b) {
      float amax = 0.0f;
      for (int c = b * 128; c < (b + 1) * 128; ++c)
        amax = std::fmax(amax, std::fabs(bf16ToFloat(row[c])));
      ASSERT_EQ(scales[b], std::fmax(amax, 1e-4f) / 448.0f) << "block " << b;
      for (int c = b * 128; c < (b + 1) * 128; ++c) {
        const double x = bf16ToFloat(row[c]);
        const double back = double{fp8E4m3ToFloat(q[c])} * scales[b];
        ASSERT_LE(std::fabs(back - x), fp8DequantBound(x, scales[b]))
            << "trial " << trial << " column " << c << ": x " << x << ", dequantized " << back;
      }
    }
  }
}

// ----- repeated expert ids
// ---------------------------------------------------------------------------
//
// Policy (include/epcomm/ops.hpp): an id repeated within one token's top-k counts once; every
// repetition after the first behaves exactly like -1. 2 ranks, 4 experts, top-3, hidden 128:
//   rank 0: t0 [1, 1, 2] w [0.5, 0.25, 0.125]  = [1, -1, 2] -> ranks 0 and 1
//           t1 [3, 3, 3] w [0.5, 0.25, 0.75]   = [3, -1, -1] -> rank 1
//   rank 1: t0 [0, 2, 0] w [0.25, 0.5, 0.75]   = [0, 2, -1] -> ranks 0 and 1
RankInputs makeRank3(int rank, const std::vector<int64_t>& topk, const std::vector<float>& w) {
  RankInputs in;
  in.rank = rank;
  in.num_tokens = static_cast<int>(topk.size()) / 3;
  in.hidden = kH;
  in.num_topk = 3;
  in.topk_idx = topk;
  in.topk_idx32.assign(topk.begin(), topk.end());
  in.topk_weights = w;
  for (int t = 0; t < in.num_tokens; ++t) {
    for (int c = 0; c < kH; ++c)
      in.x_bf16.push_back(bf(static_cast<float>(c == 0 ? rank + 1 : t + 1)));
    for (int c = 0; c < kH; ++c) in.x_fp8.push_back(static_cast<uint8_t>(c));
    in.x_scales.push_back(1.0f);
  }
  return in;
}

std::vector<RankInputs> duplicateProblem() {
  return {makeRank3(0, {1, 1, 2, 3, 3, 3}, {0.5f, 0.25f, 0.125f, 0.5f, 0.25f, 0.75f}),
          makeRank3(1, {0, 2, 0}, {0.25f, 0.5f, 0.75f})};
}

// ----- HT expert-major ------------------------------------------------------------------------
// handProblem(): rank 0 owns experts 0, 1; rank 1 owns 2, 3.
//   rank 0: t0 [1, 2]  t1 [-1, -1]  t2 [3, 2]  t3 [0, -1]
//   rank 1: t0 [2, 0]  t1 [1, 0]    t2 [-1, 3]
// Rank 0 t2 has both its experts on rank 1: it arrives there twice.

TEST(ReferenceHtExpertMajor, HandComputedRank0) {
  const auto all = handProblem();
  const HtExpertMajorRef ref = referenceHtDispatchExpertMajor(all, 0, kE, kK, 1);
  // Expert 0: (0,t3,k0) | (1,t0,k1) (1,t1,k1); expert 1: (0,t0,k0) | (1,t1,k0).
  EXPECT_EQ(ref.num_rows, 5);
  EXPECT_EQ(ref.expert_offsets, (std::vector<int>{0, 3, 5}));
  EXPECT_EQ(ref.tokens_per_local_expert, (std::vector<int>{3, 2}));
  EXPECT_EQ(ref.pairs_per_local_expert, (std::vector<int>{3, 2}));
  EXPECT_EQ(ref.part_begin, (std::vector<int>{0, 1, 3, 3, 4, 5}));
  EXPECT_EQ(ref.src_rank, (std::vector<int>{0, 1, 1, 0, 1}));
  EXPECT_EQ(ref.src_token, (std::vector<int>{3, 0, 1, 0, 1}));
  EXPECT_EQ(ref.topk_col, (std::vector<int>{0, 1, 1, 0, 0}));
}

TEST(ReferenceHtExpertMajor, TokenWithTwoLocalExpertsArrivesTwiceAndPaddingAligns) {
  const auto all = handProblem();
  const HtExpertMajorRef one = referenceHtDispatchExpertMajor(all, 1, kE, kK, 1);
  // Expert 2: (0,t0,k1) (0,t2,k1) | (1,t0,k0); expert 3: (0,t2,k0) | (1,t2,k1).
  EXPECT_EQ(one.expert_offsets, (std::vector<int>{0, 3, 5}));
  EXPECT_EQ(one.src_rank, (std::vector<int>{0, 0, 1, 0, 1}));
  EXPECT_EQ(one.src_token, (std::vector<int>{0, 2, 0, 2, 2}));
  EXPECT_EQ(one.topk_col, (std::vector<int>{1, 1, 0, 0, 1}));
  const HtExpertMajorRef four = referenceHtDispatchExpertMajor(all, 1, kE, kK, 4);
  EXPECT_EQ(four.num_rows, 8);
  EXPECT_EQ(four.expert_offsets, (std::vector<int>{0, 4, 8}));
  EXPECT_EQ(four.tokens_per_local_expert, (std::vector<int>{4, 4}));
  EXPECT_EQ(four.pairs_per_local_expert, (std::vector<int>{3, 2}));
  EXPECT_EQ(four.part_begin, (std::vector<int>{0, 2, 3, 4, 5, 6}));
  EXPECT_EQ(four.src_rank, (std::vector<int>{0, 0, 1, -1, 0, 1, -1, -1}));
  EXPECT_EQ(four.src_token, (std::vector<int>{0, 2, 0, -1, 2, 2, -1, -1}));
  EXPECT_EQ(four.topk_col, (std::vector<int>{1, 1, 0, -1, 0, 1, -1, -1}));
}

TEST(ReferenceHtExpertMajor, DuplicatesCountOnceAndZeroTokenRanks) {
  const auto dup = duplicateProblem();
  // rank 0 t0 [1, 1, 2] -> expert 1 once (k0); rank 1 t0 [0, 2, 0] -> expert 0 once (k0).
  const HtExpertMajorRef ref = referenceHtDispatchExpertMajor(dup, 0, kE, 3, 1);
  EXPECT_EQ(ref.expert_offsets, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(ref.src_rank, (std::vector<int>{1, 0}));
  EXPECT_EQ(ref.topk_col, (std::vector<int>{0, 0}));
  // A rank with 0 tokens sends nothing; with alignment 8 every empty group stays empty.
  std::vector<RankInputs> empty = {makeRank(0, {}, {}), makeRank(1, {}, {})};
  const HtExpertMajorRef none = referenceHtDispatchExpertMajor(empty, 1, kE, kK, 8);
  EXPECT_EQ(none.num_rows, 0);
  EXPECT_EQ(none.expert_offsets, (std::vector<int>{0, 0, 0}));
}

TEST(ReferenceHtExpertMajor, CombineSumsOneWeightedRowPerExpert) {
  const auto all = handProblem();
  // Expert output e + 1 in every column.
  auto y = [](int e, int, int, int) { return static_cast<float>(e + 1); };
  const std::vector<float> w0 = referenceHtCombineExpertMajor(all, 0, kE, kK, y, kH, true, nullptr);
  EXPECT_EQ(w0[0 * kH + 7], 0.5f * 2 + 0.25f * 3);   // t0: experts 1, 2
  EXPECT_EQ(w0[1 * kH + 7], 0.0f);                   // t1: routed nowhere
  EXPECT_EQ(w0[2 * kH + 7], 0.5f * 4 + 0.125f * 3);  // t2: experts 3, 2, both on rank 1
  const std::vector<float> u0 =
      referenceHtCombineExpertMajor(all, 0, kE, kK, y, kH, false, nullptr);
  EXPECT_EQ(u0[2 * kH + 7], 4.0f + 3.0f);  // one row per expert, not one per rank
  std::vector<uint16_t> bias(4 * kH, bf(0.5f));
  const std::vector<float> b0 =
      referenceHtCombineExpertMajor(all, 0, kE, kK, y, kH, false, bias.data());
  EXPECT_EQ(b0[1 * kH + 7], 0.5f);
  const auto dup = duplicateProblem();
  const std::vector<float> d0 = referenceHtCombineExpertMajor(dup, 0, kE, 3, y, kH, true, nullptr);
  EXPECT_EQ(d0[1 * kH + 3], 0.5f * 4);  // t1 [3, 3, 3]: the first weight only
}

// Builds what a correct GPU would return on rank 1 with alignment 4, from the inputs directly.
struct FakeExpertMajorResult {
  std::vector<int32_t> offsets{0, 4, 8}, sizes{4, 4}, src;
  std::vector<uint16_t> x;
  std::vector<int64_t> idx;
  std::vector<float> w;
  HtExpertMajorView view() const {
    HtExpertMajorView v;
    v.num_rows = static_cast<int>(src.size());
    v.expert_offsets = offsets.data();
    v.tokens_per_expert = sizes.data();
    v.src_idx = src.data();
    v.x_bf16 = x.data();
    v.topk_idx = idx.data();
    v.topk_weights = w.data();
    return v;
  }
};

FakeExpertMajorResult fakeRank1(const std::vector<RankInputs>& all) {
  // Rows: (0,t2,k1) (0,t0,k1) [source 0's part swapped: any order is valid] (1,t0,k0) pad |
  //       (0,t2,k0) (1,t2,k1) pad pad
  const int rows[8][3] = {{0, 2, 1}, {0, 0, 1}, {1, 0, 0},    {-1, -1, -1},
                          {0, 2, 0}, {1, 2, 1}, {-1, -1, -1}, {-1, -1, -1}};
  FakeExpertMajorResult f;
  for (const auto& r : rows) {
    f.src.push_back(r[1]);
    for (int c = 0; c < kH; ++c)
      f.x.push_back(r[0] < 0 ? 0 : all[r[0]].x_bf16[static_cast<size_t>(r[1]) * kH + c]);
    for (int k = 0; k < kK; ++k) {
      const bool own = r[0] >= 0 && k == r[2];
      const size_t i = static_cast<size_t>(r[1]) * kK + k;
      f.idx.push_back(own ? all[r[0]].topk_idx[i] - 2 : -1);
      f.w.push_back(own ? all[r[0]].topk_weights[i] : 0.0f);
    }
  }
  return f;
}

TEST(ReferenceHtExpertMajor, RowCheckAcceptsAnyOrderWithinAPartAndNamesOrigins) {
  const auto all = handProblem();
  const HtExpertMajorRef ref = referenceHtDispatchExpertMajor(all, 1, kE, kK, 4);
  const FakeExpertMajorResult f = fakeRank1(all);
  std::vector<int> origin;
  EXPECT_TRUE(checkHtExpertMajorRows(all, ref, f.view(), 1, kE, kH, kK, &origin));
  EXPECT_EQ(origin, (std::vector<int>{1, 0, 2, -1, 4, 5, -1, -1}));
}

TEST(ReferenceHtExpertMajor, RowCheckFindsEachKindOfError) {
  const auto all = handProblem();
  const HtExpertMajorRef ref = referenceHtDispatchExpertMajor(all, 1, kE, kK, 4);
  {
    FakeExpertMajorResult f = fakeRank1(all);
    f.src[3] = 0;  // padding row claims a source
    EXPECT_FALSE(checkHtExpertMajorRows(all, ref, f.view(), 1, kE, kH, kK));
  }
  {
    FakeExpertMajorResult f = fakeRank1(all);
    f.x[3 * kH + 5] = bf(1.0f);  // padding data not zero
    EXPECT_FALSE(checkHtExpertMajorRows(all, ref, f.view(), 1, kE, kH, kK));
  }
  {
    FakeExpertMajorResult f = fakeRank1(all);
    // Rows 1 (source 0, t0) and 2 (source 1, t0) swapped: same token index, wrong part.
    std::swap(f.src[1], f.src[2]);
    std::swap_ranges(f.x.begin() + 1 * kH, f.x.begin() + 2 * kH, f.x.begin() + 2 * kH);
    std::swap_ranges(f.idx.begin() + 1 * kK, f.idx.begin() + 2 * kK, f.idx.begin() + 2 * kK);
    std::swap_ranges(f.w.begin() + 1 * kK, f.w.begin() + 2 * kK, f.w.begin() + 2 * kK);
    EXPECT_FALSE(checkHtExpertMajorRows(all, ref, f.view(), 1, kE, kH, kK));
  }
  {
    FakeExpertMajorResult f = fakeRank1(all);
    f.x[4 * kH + 9] ^= 1;  // data of a pair row
    EXPECT_FALSE(checkHtExpertMajorRows(all, ref, f.view(), 1, kE, kH, kK));
  }
  {
    FakeExpertMajorResult f = fakeRank1(all);
    f.idx[4 * kK + 1] = 1;  // another column of the pair row set
    EXPECT_FALSE(checkHtExpertMajorRows(all, ref, f.view(), 1, kE, kH, kK));
  }
  {
    FakeExpertMajorResult f = fakeRank1(all);
    f.w[5 * kK + 1] = 0.0f;  // its own weight lost
    EXPECT_FALSE(checkHtExpertMajorRows(all, ref, f.view(), 1, kE, kH, kK));
  }
  {
    FakeExpertMajorResult f = fakeRank1(all);
    f.offsets[1] = 3;  // offsets not aligned
    EXPECT_FALSE(checkHtExpertMajorRows(all, ref, f.view(), 1, kE, kH, kK));
  }
  {
    FakeExpertMajorResult f = fakeRank1(all);
    f.src.pop_back();  // one row short
    f.x.resize(f.x.size() - kH);
    EXPECT_FALSE(checkHtExpertMajorRows(all, ref, f.view(), 1, kE, kH, kK));
  }
}

TEST(ReferenceDuplicates, EffectiveExpert) {
  const std::vector<int64_t> ids = {3, -1, 3, 5, 5, -1, 2};
  const std::vector<int64_t> want = {3, -1, -1, 5, -1, -1, 2};
  for (int k = 0; k < 7; ++k) EXPECT_EQ(effectiveExpert(ids.data(), k), want[k]) << k;
}

TEST(ReferenceDuplicates, LayoutCountsEachExpertOncePerToken) {
  const auto all = duplicateProblem();
  const LayoutRef ref0 = referenceLayout(all[0].topk_idx.data(), 2, 3, kE, 2);
  EXPECT_EQ(ref0.tokens_per_rank, (std::vector<int>{1, 2}));
  EXPECT_EQ(ref0.tokens_per_expert, (std::vector<int>{0, 1, 1, 1}));
  EXPECT_EQ(ref0.token_slot, (std::vector<int>{0, 0, -1, 1}));
  const LayoutRef ref1 = referenceLayout(all[1].topk_idx.data(), 1, 3, kE, 2);
  EXPECT_EQ(ref1.tokens_per_expert, (std::vector<int>{1, 0, 1, 0}));
}

TEST(ReferenceDuplicates, HtDispatchSendsRepetitionsAsMinusOne) {
  const auto all = duplicateProblem();
  const HtDispatchRef on1 = referenceHtDispatch(all, 1, kH, kE, 3, 1);
  // Rows (0,t0) (0,t1) (1,t0); local experts 2, 3.
  EXPECT_EQ(on1.num_recv, 3);
  EXPECT_EQ(on1.recv_topk_idx, (std::vector<int64_t>{-1, -1, 0, 1, -1, -1, -1, 0, -1}));
  EXPECT_EQ(on1.recv_topk_weights, (std::vector<float>{0, 0, 0.125f, 0.5f, 0, 0, 0, 0.5f, 0}));
  EXPECT_EQ(on1.tokens_per_local_expert, (std::vector<int>{2, 1}));
  const HtDispatchRef on0 = referenceHtDispatch(all, 0, kH, kE, 3, 1);
  // Rows (0,t0) (1,t0); local experts 0, 1.
  EXPECT_EQ(on0.recv_topk_idx, (std::vector<int64_t>{1, -1, -1, 0, -1, -1}));
  EXPECT_EQ(on0.recv_topk_weights, (std::vector<float>{0.5f, 0, 0, 0.25f, 0, 0}));
  EXPECT_EQ(on0.tokens_per_local_expert, (std::vector<int>{1, 1}));
}

TEST(ReferenceDuplicates, HtCombineUsesTheFirstOccurrencesWeightOnly) {
  const auto all = duplicateProblem();
  // Rank 0 receives (0,t0) (1,t0) with outputs 1, 2; rank 1 receives (0,t0) (0,t1) (1,t0) with
  // outputs 4, 8, 16 (every column).
  std::vector<std::vector<uint16_t>> inputs(2);
  for (float v : {1.0f, 2.0f}) inputs[0].insert(inputs[0].end(), kH, bf(v));
  for (float v : {4.0f, 8.0f, 16.0f}) inputs[1].insert(inputs[1].end(), kH, bf(v));
  const std::vector<float> out0 = referenceHtCombine(all, 0, inputs, kH, kE, 3, true, nullptr);
  EXPECT_EQ(out0[0 * kH + 5], 0.5f * 1 + 0.125f * 4);  // not (0.5 + 0.25) * 1 + ...
  EXPECT_EQ(out0[1 * kH + 5], 0.5f * 8);               // not (0.5 + 0.25 + 0.75) * 8
  const std::vector<float> out1 = referenceHtCombine(all, 1, inputs, kH, kE, 3, true, nullptr);
  EXPECT_EQ(out1[0 * kH + 5], 0.25f * 2 + 0.5f * 16);  // not (0.25 + 0.75) * 2 + ...
  // Unweighted: one row per destination rank, as always.
  const std::vector<float> plain = referenceHtCombine(all, 0, inputs, kH, kE, 3, false, nullptr);
  EXPECT_EQ(plain[0 * kH + 5], 1.0f + 4.0f);
  EXPECT_EQ(plain[1 * kH + 5], 8.0f);
}

TEST(ReferenceDuplicates, LlDispatchAndCombineCountOnce) {
  const auto all = duplicateProblem();
  const LlDispatchRef on1 = referenceLlDispatch(all, 1, kE, 3);
  EXPECT_EQ(origins(on1.per_local_expert[0]), (Origins{{0, 0}, {1, 0}}));  // expert 2
  EXPECT_EQ(origins(on1.per_local_expert[1]), (Origins{{0, 1}}));          // expert 3, once
  const LlDispatchRef on0 = referenceLlDispatch(all, 0, kE, 3);
  EXPECT_EQ(origins(on0.per_local_expert[0]), (Origins{{1, 0}}));  // expert 0, once
  EXPECT_EQ(origins(on0.per_local_expert[1]), (Origins{{0, 0}}));  // expert 1, once
  const ExpertOutputFn f = [](int e, int, int, int c) { return static_cast<float>(e + 1 + c); };
  const std::vector<float> out0 = referenceLlCombine(all, 0, kE, 3, f, kH);
  EXPECT_EQ(out0[0 * kH + 0], 0.5f * 2 + 0.125f * 3);
  EXPECT_EQ(out0[1 * kH + 0], 0.5f * 4);
  const std::vector<float> out1 = referenceLlCombine(all, 1, kE, 3, f, kH);
  EXPECT_EQ(out1[0 * kH + 0], 0.25f * 1 + 0.5f * 3);
}

// ----- the generator -----------------------------------------------------------------------------

ProblemSpec smallSpec() {
  ProblemSpec spec;
  spec.num_ranks = 3;
  spec.hidden = 256;
  spec.num_experts = 12;
  spec.num_topk = 3;
  spec.tokens_per_rank = {5, 0, 300};
  spec.seed = 42;
  return spec;
}

void expectSameRank(const RankInputs& a, const RankInputs& b) {
  EXPECT_EQ(a.rank, b.rank);
  EXPECT_EQ(a.num_tokens, b.num_tokens);
  EXPECT_EQ(a.x_bf16, b.x_bf16);
  EXPECT_EQ(a.x_fp8, b.x_fp8);
  EXPECT_EQ(a.x_scales, b.x_scales);
  EXPECT_EQ(a.topk_idx, b.topk_idx);
  EXPECT_EQ(a.topk_idx32, b.topk_idx32);
  EXPECT_EQ(a.topk_weights, b.topk_weights);
}

TEST(ReferenceGenerator, SameSeedSameData) {
  const auto a = generateProblem(smallSpec());
  const auto b = generateProblem(smallSpec());
  ASSERT_EQ(a.size(), 3u);
  for (int r = 0; r < 3; ++r) expectSameRank(a[r], b[r]);

  ProblemSpec other = smallSpec();
  other.seed = 43;
  const auto c = generateProblem(other);
  EXPECT_NE(a[0].x_bf16, c[0].x_bf16);
  EXPECT_NE(a[2].topk_idx, c[2].topk_idx);
  EXPECT_NE(a[2].topk_weights, c[2].topk_weights);
  // Ranks get different data from the same seed.
  EXPECT_NE(std::vector<int64_t>(a[0].topk_idx.begin(), a[0].topk_idx.begin() + 15),
            std::vector<int64_t>(a[2].topk_idx.begin(), a[2].topk_idx.begin() + 15));
}

TEST(ReferenceGenerator, OneRanksTokenCountDoesNotChangeOthers) {
  const auto a = generateProblem(smallSpec());
  ProblemSpec spec = smallSpec();
  spec.tokens_per_rank[1] = 7;
  const auto b = generateProblem(spec);
  expectSameRank(a[0], b[0]);
  expectSameRank(a[2], b[2]);
  EXPECT_EQ(b[1].num_tokens, 7);
  EXPECT_EQ(b[1].x_bf16.size(), 7u * 256);
}

TEST(ReferenceGenerator, RoutingModeDoesNotChangeX) {
  const auto a = generateProblem(smallSpec());
  ProblemSpec spec = smallSpec();
  spec.routing = Routing::kSkewed;
  const auto b = generateProblem(spec);
  EXPECT_EQ(a[2].x_bf16, b[2].x_bf16);
  EXPECT_NE(a[2].topk_idx, b[2].topk_idx);
}

TEST(ReferenceGenerator, ZeroTokenRankIsEmpty) {
  const auto all = generateProblem(smallSpec());
  EXPECT_EQ(all[1].num_tokens, 0);
  EXPECT_TRUE(all[1].x_bf16.empty());
  EXPECT_TRUE(all[1].x_fp8.empty());
  EXPECT_TRUE(all[1].x_scales.empty());
  EXPECT_TRUE(all[1].topk_idx.empty());
  EXPECT_TRUE(all[1].topk_weights.empty());
}

TEST(ReferenceGenerator, ColumnMajorScalesTransposeTheRowMajorOnes) {
  const auto all = generateProblem(smallSpec());
  const RankInputs& in = all[2];  // 300 tokens of hidden 256: 2 scale blocks per token
  const int blocks = in.hidden / kFp8BlockSize;
  ASSERT_EQ(blocks, 2);
  const std::vector<float> cols = columnMajorScales(in);
  ASSERT_EQ(cols.size(), in.x_scales.size());
  for (int t = 0; t < in.num_tokens; ++t) {
    for (int b = 0; b < blocks; ++b) {
      ASSERT_EQ(cols[size_t(b) * in.num_tokens + t], in.x_scales[size_t(t) * blocks + b]);
    }
  }
}

TEST(ReferenceGenerator, RowsCarryTheirOriginAndNonZeroValues) {
  const auto all = generateProblem(smallSpec());
  const RankInputs& in = all[2];
  ASSERT_EQ(in.x_bf16.size(), 300u * 256);
  // Token 299 = 2 * 128 + 43 on rank 2: tag (3, 44, 3).
  const uint16_t* row = in.x_bf16.data() + 299 * 256;
  EXPECT_EQ(bf16ToFloat(row[0]), 3.0f);
  EXPECT_EQ(bf16ToFloat(row[1]), 44.0f);
  EXPECT_EQ(bf16ToFloat(row[2]), 3.0f);
  int rank = -1, token = -1;
  ASSERT_TRUE(decodeRowOrigin(row, &rank, &token));
  EXPECT_EQ(rank, 2);
  EXPECT_EQ(token, 299);
  EXPECT_EQ(describeRowOrigin(row), "src_rank 2, token 299");
  for (const RankInputs& r : all) {
    for (int t = 0; t < r.num_tokens; ++t) {
      ASSERT_TRUE(decodeRowOrigin(r.x_bf16.data() + t * 256, &rank, &token));
      ASSERT_EQ(rank, r.rank);
      ASSERT_EQ(token, t);
      for (int c = 3; c < 256; ++c) {
        const float v = bf16ToFloat(r.x_bf16[t * 256 + c]);
        ASSERT_TRUE(std::fabs(v) >= 0.25f && std::fabs(v) < 4.0f) << v;
      }
    }
  }
  // Both signs and all four binades occur.
  int negative = 0;
  std::set<int> binades;
  for (int c = 3; c < 256; ++c) {
    const float v = bf16ToFloat(in.x_bf16[c]);
    negative += v < 0;
    binades.insert(static_cast<int>(std::floor(std::log2(std::fabs(v)))));
  }
  EXPECT_GT(negative, 60);
  EXPECT_LT(negative, 193);
  EXPECT_EQ(binades, (std::set<int>{-2, -1, 0, 1}));
}

TEST(ReferenceGenerator, Fp8RowsDequantizeToTheBf16Rows) {
  const auto all = generateProblem(smallSpec());
  const RankInputs& in = all[2];
  ASSERT_EQ(in.x_scales.size(), 300u * 2);
  for (int t = 0; t < in.num_tokens; ++t) {
    for (int b = 0; b < 2; ++b) {
      const float scale = in.x_scales[t * 2 + b];
      float amax = 0.0f;
      for (int c = b * 128; c < (b + 1) * 128; ++c)
        amax = std::max(amax, std::fabs(bf16ToFloat(in.x_bf16[t * 256 + c])));
      ASSERT_NEAR(scale * 448.0f, amax, amax * 1e-6f);
      for (int c = b * 128; c < (b + 1) * 128; ++c) {
        const float x = bf16ToFloat(in.x_bf16[t * 256 + c]);
        const float deq = fp8E4m3ToFloat(in.x_fp8[t * 256 + c]) * scale;
        // e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus the subnormal step.
        ASSERT_NEAR(deq, x, std::fabs(x) / 16.0f + scale / 512.0f) << t << "," << c;
      }
    }
  }
}

void expectValidTopk(const RankInputs& in, int num_experts, int k_count, bool allow_negative) {
  ASSERT_EQ(in.topk_idx.size(), static_cast<size_t>(in.num_tokens) * k_count);
  ASSERT_EQ(in.topk_idx32.size(), in.topk_idx.size());
  for (int t = 0; t < in.num_tokens; ++t) {
    std::set<int64_t> seen;
    for (int k = 0; k < k_count; ++k) {
      const size_t i = static_cast<size_t>(t) * k_count + k;
      const int64_t e = in.topk_idx[i];
      ASSERT_EQ(in.topk_idx32[i], e);
      const float w = in.topk_weights[i];
      ASSERT_TRUE(w >= 0.05f && w < 1.0f) << w;
      if (e == -1 && allow_negative) continue;
      ASSERT_GE(e, 0);
      ASSERT_LT(e, num_experts);
      ASSERT_TRUE(seen.insert(e).second) << "token " << t << " repeats expert " << e;
    }
  }
}

// A routing problem: `tokens` per rank (their count is the rank count), hidden 128.
ProblemSpec routingSpec(int experts, int topk, std::vector<int> tokens, Routing routing,
                        uint64_t seed) {
  ProblemSpec spec;
  spec.num_ranks = static_cast<int>(tokens.size());
  spec.num_experts = experts;
  spec.num_topk = topk;
  spec.tokens_per_rank = std::move(tokens);
  spec.routing = routing;
  spec.seed = seed;
  return spec;
}

TEST(ReferenceGenerator, UniformRoutingIsDistinctAndSpread) {
  const ProblemSpec spec = routingSpec(16, 9, {1000, 1000, 1000, 1000}, Routing::kUniform, 5);
  const auto all = generateProblem(spec);
  std::vector<int> per_expert(16, 0);
  for (const auto& in : all) {
    expectValidTopk(in, 16, 9, false);
    for (int64_t e : in.topk_idx) ++per_expert[e];
  }
  // 36000 picks over 16 experts: 2250 each on average.
  for (int e = 0; e < 16; ++e) {
    EXPECT_GT(per_expert[e], 2000) << e;
    EXPECT_LT(per_expert[e], 2500) << e;
  }
}

TEST(ReferenceGenerator, SkewedRoutingFavoursHotRank) {
  ProblemSpec spec = routingSpec(32, 4, {2000, 2000, 0, 2000}, Routing::kSkewed, 11);
  spec.hot_rank = 2;
  spec.skew = 0.9;
  const auto all = generateProblem(spec);
  int hot = 0, total = 0;
  for (const auto& in : all) {
    expectValidTopk(in, 32, 4, false);
    for (int64_t e : in.topk_idx) {
      hot += e >= 16 && e < 24;
      ++total;
    }
  }
  // 0.9 directly plus a quarter of the remaining 0.1: about 0.92.
  EXPECT_GT(hot, total * 0.88);
  EXPECT_LT(hot, total * 0.96);
}

TEST(ReferenceGenerator, SkewedRoutingFallsBackWhenHotRangeIsSmall) {
  // 2 experts per rank, top-4: at most 2 picks can be hot.
  ProblemSpec spec = routingSpec(8, 4, {500, 500, 500, 500}, Routing::kSkewed, 3);
  spec.hot_rank = 1;
  const auto all = generateProblem(spec);
  int both_hot = 0;
  for (const auto& in : all) {
    expectValidTopk(in, 8, 4, false);
    for (int t = 0; t < in.num_tokens; ++t) {
      int hot = 0;
      for (int k = 0; k < 4; ++k) hot += in.topk_idx[t * 4 + k] / 2 == 1;
      both_hot += hot == 2;
    }
  }
  EXPECT_GT(both_hot, 2000 * 0.95);
}

TEST(ReferenceGenerator, NegativesFractionRoughlyAsAsked) {
  ProblemSpec spec = routingSpec(8, 4, {2500, 2500}, Routing::kWithNegatives, 9);
  spec.negative_fraction = 0.2;
  const auto all = generateProblem(spec);
  int negative = 0;
  for (const auto& in : all) {
    expectValidTopk(in, 8, 4, true);
    for (int64_t e : in.topk_idx) negative += e == -1;
  }
  // 20000 entries, expected 4000, standard deviation about 57.
  EXPECT_GT(negative, 3700);
  EXPECT_LT(negative, 4300);

  // With half the entries negative and top-2, about a quarter of tokens have no expert at all.
  spec.negative_fraction = 0.5;
  spec.num_topk = 2;
  const auto half = generateProblem(spec);
  int empty = 0;
  for (int t = 0; t < 2500; ++t)
    empty += half[0].topk_idx[t * 2] == -1 && half[0].topk_idx[t * 2 + 1] == -1;
  EXPECT_GT(empty, 500);
  EXPECT_LT(empty, 750);
}

TEST(ReferenceGenerator, DuplicatesRepeatEarlierEntriesOfTheSameToken) {
  ProblemSpec spec = routingSpec(16, 4, {2000, 2000}, Routing::kWithDuplicates, 13);
  spec.duplicate_fraction = 0.3;
  const auto all = generateProblem(spec);
  EXPECT_EQ(all[0].topk_idx, generateProblem(spec)[0].topk_idx);
  int repeats = 0;
  for (const auto& in : all) {
    for (int t = 0; t < in.num_tokens; ++t) {
      const int64_t* ids = in.topk_idx.data() + t * 4;
      for (int k = 0; k < 4; ++k) {
        ASSERT_GE(ids[k], 0);
        ASSERT_LT(ids[k], 16);
        EXPECT_EQ(in.topk_idx32[t * 4 + k], ids[k]);
        repeats += effectiveExpert(ids, k) < 0;
      }
    }
  }
  // 12000 entries k > 0, each repeated with probability 0.3 (a uniform pick is never a repeat):
  // expected 3600, standard deviation about 50.
  EXPECT_GT(repeats, 3300);
  EXPECT_LT(repeats, 3900);
}

TEST(ReferenceGenerator, RejectsBadSpecs) {
  ProblemSpec spec = smallSpec();
  spec.tokens_per_rank = {1, 2};
  EXPECT_THROW(generateProblem(spec), std::invalid_argument);
  spec = smallSpec();
  spec.num_experts = 13;
  EXPECT_THROW(generateProblem(spec), std::invalid_argument);
  spec = smallSpec();
  spec.num_topk = 13;
  EXPECT_THROW(generateProblem(spec), std::invalid_argument);
  spec = smallSpec();
  spec.hidden = 100;
  EXPECT_THROW(generateProblem(spec), std::invalid_argument);
  spec = smallSpec();
  spec.hot_rank = 3;
  EXPECT_THROW(generateProblem(spec), std::invalid_argument);
  spec = smallSpec();
  spec.tokens_per_rank[0] = -1;
  EXPECT_THROW(generateProblem(spec), std::invalid_argument);
}

TEST(ReferenceGenerator, ExpertOutputValueIsDeterministicNonZeroAndUsesEveryArgument) {
  int changed[5] = {0, 0, 0, 0, 0};
  for (int c = 0; c < 128; ++c) {
    const uint16_t v = expertOutputValue(1, 3, 2, 17, c);
    ASSERT_EQ(v, expertOutputValue(1, 3, 2, 17, c));
    const float f = bf16ToFloat(v);
    ASSERT_TRUE(std::fabs(f) >= 0.25f && std::fabs(f) < 4.0f) << f;
    changed[0] += v != expertOutputValue(2, 3, 2, 17, c);
    changed[1] += v != expertOutputValue(1, 4, 2, 17, c);
    changed[2] += v != expertOutputValue(1, 3, 1, 17, c);
    changed[3] += v != expertOutputValue(1, 3, 2, 18, c);
    changed[4] += v != expertOutputValue(1, 3, 2, 17, c + 128);
  }
  // 1024 possible values: a changed argument leaves at most a few columns equal by chance.
  for (int i = 0; i < 5; ++i) EXPECT_GT(changed[i], 110) << "argument " << i;
}

// ----- the model on generated data: properties that hold whatever the routing ------------------

TEST(ReferenceModel, GeneratedDispatchRowsMatchTheirTags) {
  ProblemSpec spec;
  spec.num_ranks = 4;
  spec.hidden = 128;
  spec.num_experts = 16;
  spec.num_topk = 3;
  spec.tokens_per_rank = {37, 0, 130, 9};
  spec.routing = Routing::kWithNegatives;
  spec.seed = 77;
  const auto all = generateProblem(spec);
  int valid_pairs = 0, sent = 0;
  for (const auto& in : all) {
    for (int64_t e : in.topk_idx) valid_pairs += e >= 0;
    const LayoutRef layout = referenceLayout(in.topk_idx.data(), in.num_tokens, 3, 16, 4);
    for (int n : layout.tokens_per_rank) sent += n;
  }
  int recv = 0, counted_pairs = 0, ll_rows = 0;
  for (int d = 0; d < 4; ++d) {
    const HtDispatchRef ref = referenceHtDispatch(all, d, 128, 16, 3, 1);
    recv += ref.num_recv;
    for (int n : ref.tokens_per_local_expert) counted_pairs += n;
    for (int i = 0; i < ref.num_recv; ++i) {
      int rank = -1, token = -1;
      ASSERT_TRUE(decodeRowOrigin(ref.recv_x_bf16.data() + i * 128, &rank, &token));
      ASSERT_EQ(rank, ref.src_rank[i]);
      ASSERT_EQ(token, ref.src_token[i]);
      ASSERT_EQ(token, ref.recv_src_idx[i]);
      ASSERT_GE(i, ref.rank_prefix[rank]);
      ASSERT_LT(i, ref.rank_prefix[rank + 1]);
    }
    const LlDispatchRef ll = referenceLlDispatch(all, d, 16, 3);
    for (int l = 0; l < 4; ++l) {
      const LlExpertRows& rows = ll.per_local_expert[l];
      ll_rows += static_cast<int>(rows.src_rank.size());
      for (size_t i = 0; i < rows.src_rank.size(); ++i) {
        const int64_t* ids = all[rows.src_rank[i]].topk_idx.data() + rows.src_token[i] * 3;
        ASSERT_TRUE(std::find(ids, ids + 3, d * 4 + l) != ids + 3);
      }
    }
  }
  EXPECT_EQ(recv, sent);
  EXPECT_EQ(counted_pairs, valid_pairs);
  EXPECT_EQ(ll_rows, valid_pairs);
}

// Issue 11 item 7: the reference at 16 and 72 ranks with up to 1024 experts and top-16, where a
// token reaches many ranks (the layout the GPU tests compare against at 16 ranks).
void checkManyRanks(int num_ranks, int experts, int topk, uint64_t seed) {
  SCOPED_TRACE(std::to_string(num_ranks) + " ranks, " + std::to_string(experts) + " experts");
  const int hidden = 128;
  ProblemSpec spec;
  spec.num_ranks = num_ranks;
  spec.hidden = hidden;
  spec.num_experts = experts;
  spec.num_topk = topk;
  spec.tokens_per_rank.assign(num_ranks, 0);
  for (int r = 0; r < num_ranks; ++r) spec.tokens_per_rank[r] = r == 1 ? 0 : 3 + (r * 7) % 11;
  spec.routing = Routing::kUniform;
  spec.seed = seed;
  const auto all = generateProblem(spec);
  const int local = experts / num_ranks;
  int valid_pairs = 0, sent = 0, max_dests = 0;
  for (const auto& in : all) {
    for (int64_t e : in.topk_idx) valid_pairs += e >= 0;
    const LayoutRef layout =
        referenceLayout(in.topk_idx.data(), in.num_tokens, topk, experts, num_ranks);
    for (int n : layout.tokens_per_rank) sent += n;
    for (int t = 0; t < in.num_tokens; ++t) {
      std::set<int64_t> ranks;
      for (int k = 0; k < topk; ++k) ranks.insert(in.topk_idx[t * topk + k] / local);
      int dests = 0;
      for (int d = 0; d < num_ranks; ++d) {
        const bool in_rank = layout.is_token_in_rank[size_t(t) * num_ranks + d];
        ASSERT_EQ(in_rank, ranks.count(d) == 1) << "token " << t << " rank " << d;
        dests += in_rank;
      }
      max_dests = std::max(max_dests, dests);
    }
  }
  EXPECT_GT(max_dests, 8) << "the routing should reach more ranks than the old 8-rank limit";
  int recv = 0, counted_pairs = 0;
  std::vector<std::vector<uint16_t>> y(num_ranks);
  for (int d = 0; d < num_ranks; ++d) {
    const HtDispatchRef ref = referenceHtDispatch(all, d, hidden, experts, topk, 1);
    recv += ref.num_recv;
    for (int n : ref.tokens_per_local_expert) counted_pairs += n;
    for (int i = 0; i < ref.num_recv; ++i) {
      int rank = -1, token = -1;
      ASSERT_TRUE(decodeRowOrigin(ref.recv_x_bf16.data() + i * hidden, &rank, &token));
      ASSERT_EQ(rank, ref.src_rank[i]);
      ASSERT_EQ(token, ref.src_token[i]);
      ASSERT_GE(i, ref.rank_prefix[rank]);
      ASSERT_LT(i, ref.rank_prefix[rank + 1]);
    }
    y[d] = ref.recv_x_bf16;
  }
  EXPECT_EQ(recv, sent);
  EXPECT_EQ(counted_pairs, valid_pairs);
  // Unweighted combine of the identity: every destination's copy comes back once.
  for (int s = 0; s < num_ranks; ++s) {
    const std::vector<float> out =
        referenceHtCombine(all, s, y, hidden, experts, topk, false, nullptr);
    for (int t = 0; t < all[s].num_tokens; ++t) {
      std::set<int64_t> ranks;
      for (int k = 0; k < topk; ++k) ranks.insert(all[s].topk_idx[t * topk + k] / local);
      ASSERT_EQ(out[size_t(t) * hidden + 3], static_cast<float>(ranks.size()) *
                                                 bf16ToFloat(all[s].x_bf16[size_t(t) * hidden + 3]))
          << "rank " << s << " token " << t;
    }
  }
}

TEST(ReferenceModel, SixteenRanks1024ExpertsTop16) {
  checkManyRanks(16, 1024, 16, 901);
}
TEST(ReferenceModel, SixteenRanks896ExpertsTop16) {
  checkManyRanks(16, 896, 16, 902);
}
TEST(ReferenceModel, SeventyTwoRanks1008ExpertsTop16) {
  checkManyRanks(72, 1008, 16, 903);
}

TEST(ReferenceModel, IdentityCombineMultipliesByDestinationCount) {
  ProblemSpec spec;
  spec.num_ranks = 4;
  spec.hidden = 256;
  spec.num_experts = 8;
  spec.num_topk = 4;
  spec.tokens_per_rank = {20, 3, 0, 50};
  spec.routing = Routing::kWithNegatives;
  spec.negative_fraction = 0.3;
  spec.seed = 123;
  const auto all = generateProblem(spec);
  std::vector<std::vector<uint16_t>> y(4);
  for (int d = 0; d < 4; ++d) y[d] = referenceHtDispatch(all, d, 256, 8, 4, 1).recv_x_bf16;
  for (int s = 0; s < 4; ++s) {
    const std::vector<float> out = referenceHtCombine(all, s, y, 256, 8, 4, false, nullptr);
    for (int t = 0; t < all[s].num_tokens; ++t) {
      std::set<int64_t> ranks;
      for (int k = 0; k < 4; ++k)
        if (all[s].topk_idx[t * 4 + k] >= 0) ranks.insert(all[s].topk_idx[t * 4 + k] / 2);
      for (int c = 0; c < 256; ++c)
        ASSERT_EQ(out[t * 256 + c],
                  static_cast<float>(ranks.size()) * bf16ToFloat(all[s].x_bf16[t * 256 + c]));
    }
  }
}

// ----- comparison helpers ------------------------------------------------------------------------

TEST(ReferenceCompare, Bf16NearNamesFirstBadElement) {
  const std::vector<float> expected = {1.0f, 2.0f, 3.0f, 100.0f, 5.0f, 6.0f};
  std::vector<uint16_t> actual;
  for (float v : expected) actual.push_back(bf(v));
  EXPECT_TRUE(compareBf16Near(actual, expected, 3));
  actual[3] = bf(100.5f);  // one bf16 ulp (0.5) off 100: within rtol 1/128
  EXPECT_TRUE(compareBf16Near(actual, expected, 3));
  actual[5] = bf(6.5f);
  const ::testing::AssertionResult r = compareBf16Near(actual, expected, 3);
  ASSERT_FALSE(r);
  const std::string msg = r.message();
  EXPECT_NE(msg.find("1 of 6"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(token 1, column 2)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("expected 6,"), std::string::npos) << msg;
  EXPECT_NE(msg.find("actual 6.5"), std::string::npos) << msg;
  actual[5] = 0x7fc0;  // NaN poison left unwritten
  EXPECT_FALSE(compareBf16Near(actual, expected, 3));
  actual[5] = 0x7f80;  // inf
  EXPECT_FALSE(compareBf16Near(actual, expected, 3));
}

TEST(ReferenceCompare, ExactComparisons) {
  const auto all = handProblem();
  std::vector<uint16_t> rows(all[0].x_bf16.begin(), all[0].x_bf16.begin() + 2 * kH);
  EXPECT_TRUE(compareBf16Exact(rows.data(), all[0].x_bf16.data(), 2, kH));
  // Row 1 replaced by rank 1's token 0: a misplaced row.
  std::copy(all[1].x_bf16.begin(), all[1].x_bf16.begin() + kH, rows.begin() + kH);
  const ::testing::AssertionResult r =
      compareBf16Exact(rows.data(), all[0].x_bf16.data(), 2, kH, true);
  ASSERT_FALSE(r);
  const std::string msg = r.message();
  EXPECT_NE(msg.find("in 1 of 2 rows"), std::string::npos) << msg;
  EXPECT_NE(msg.find("expected row src_rank 0, token 1"), std::string::npos) << msg;
  EXPECT_NE(msg.find("actual row src_rank 1, token 0"), std::string::npos) << msg;

  const std::vector<int64_t> a = {1, 2, 3}, b = {1, 5, 3};
  EXPECT_TRUE(compareExact(a, a, "ids"));
  const ::testing::AssertionResult ri = compareExact(a, b, "ids");
  ASSERT_FALSE(ri);
  EXPECT_NE(std::string(ri.message()).find("ids: 1 of 3 elements differ"), std::string::npos)
      << ri.message();
  EXPECT_NE(std::string(ri.message()).find("expected 5, actual 2"), std::string::npos)
      << ri.message();
  const std::vector<uint8_t> q1 = {7, 8}, q2 = {7, 9};
  EXPECT_NE(std::string(compareExact(q1, q2).message()).find("expected 9, actual 8"),
            std::string::npos);
  EXPECT_FALSE(compareExact(a, std::vector<int64_t>{1, 2}));

  uint16_t untagged[3] = {bf(0.5f), bf(1.0f), bf(1.0f)};
  EXPECT_EQ(describeRowOrigin(untagged).rfind("untagged row", 0), 0u);
  int rank = 0, token = 0;
  EXPECT_FALSE(decodeRowOrigin(untagged, &rank, &token));
}

TEST(ReferenceCompare, CheckLlExpertRows) {
  ProblemSpec spec;
  spec.num_ranks = 2;
  spec.hidden = 256;
  spec.num_experts = 4;
  spec.num_topk = 2;
  spec.tokens_per_rank = {40, 25};
  spec.seed = 8;
  const auto all = generateProblem(spec);
  const int max_tokens = 64;
  const LlExpertRows expected = referenceLlDispatch(all, 1, 4, 2).per_local_expert[1];
  const int n = static_cast<int>(expected.src_rank.size());
  ASSERT_GT(n, 2);

  // A GPU may deliver rows in any order: build them reversed.
  std::vector<int32_t> info(n);
  std::vector<uint16_t> x(static_cast<size_t>(n) * 256);
  std::vector<uint8_t> q(static_cast<size_t>(n) * 256);
  std::vector<float> scales(static_cast<size_t>(n) * 2);
  for (int i = 0; i < n; ++i) {
    const int j = n - 1 - i;
    const int s = expected.src_rank[j], t = expected.src_token[j];
    info[i] = s * max_tokens + t;
    std::copy_n(all[s].x_bf16.begin() + t * 256, 256, x.begin() + i * 256);
    referenceFp8Cast(all[s].x_bf16.data() + t * 256, 256, q.data() + i * 256,
                     scales.data() + i * 2);
  }
  LlExpertView view;
  view.count = n;
  view.src_info = info.data();
  view.x_bf16 = x.data();
  EXPECT_TRUE(checkLlExpertRows(all, expected, view, max_tokens, 256));
  LlExpertView fp8_view = view;
  fp8_view.x_bf16 = nullptr;
  fp8_view.x_fp8 = q.data();
  fp8_view.scales = scales.data();
  EXPECT_TRUE(checkLlExpertRows(all, expected, fp8_view, max_tokens, 256));

  view.count = n - 1;
  EXPECT_FALSE(checkLlExpertRows(all, expected, view, max_tokens, 256));
  view.count = n;
  x[5] ^= 1;  // one bit of row 0
  EXPECT_FALSE(checkLlExpertRows(all, expected, view, max_tokens, 256));
  x[5] ^= 1;
  q[300] ^= 1;  // one byte of row 1
  EXPECT_FALSE(checkLlExpertRows(all, expected, fp8_view, max_tokens, 256));
  q[300] ^= 1;
  scales[1] *= 2.0f;
  EXPECT_FALSE(checkLlExpertRows(all, expected, fp8_view, max_tokens, 256));
  scales[1] /= 2.0f;
  // Replace one row's origin by one this expert does not receive.
  std::set<std::pair<int, int>> want;
  for (int i = 0; i < n; ++i) want.insert({expected.src_rank[i], expected.src_token[i]});
  int stray = 0;
  while (want.count({0, stray})) ++stray;
  info[0] = stray;
  const ::testing::AssertionResult r = checkLlExpertRows(all, expected, view, max_tokens, 256);
  ASSERT_FALSE(r);
  EXPECT_NE(std::string(r.message()).find("1 missing"), std::string::npos) << r.message();
  EXPECT_NE(std::string(r.message()).find("(rank 0, token " + std::to_string(stray) + ")"),
            std::string::npos)
      << r.message();
}

}  // namespace
}  // namespace epcomm::test
