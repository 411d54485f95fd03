// SPDX-License-Identifier: Apache-2.0
#include "common/test_data.hpp"

#include <cuda_fp8.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "util/routing.hpp"

namespace epcomm::test {

// ----- number formats --------------------------------------------------------------------------

uint16_t floatToBf16(float value) {
  uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof(bits));
  // NaN: keep sign and payload top bits, force the quiet bit so truncation cannot make it inf.
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  // Round to nearest even: add 0x7fff plus the lowest kept bit, then truncate. A carry out of the
  // mantissa correctly bumps the exponent (and the largest finite values round to inf).
  const uint32_t lsb = (bits >> 16) & 1u;
  bits += 0x7fffu + lsb;
  return static_cast<uint16_t>(bits >> 16);
}

float bf16ToFloat(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value = 0.0f;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

uint8_t floatToFp8E4m3(float value) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(value, __NV_SATFINITE, __NV_E4M3));
}

float fp8E4m3ToFloat(uint8_t bits) {
  // Our own decoder (not cuda_fp8.h), so the unit tests can check one against the other.
  // e4m3: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits, no infinities, S.1111.111 = NaN.
  if ((bits & 0x7f) == 0x7f) return std::numeric_limits<float>::quiet_NaN();
  const int exponent = (bits >> 3) & 0xf;
  const int mantissa = bits & 0x7;
  const float magnitude = exponent == 0
                              ? std::ldexp(static_cast<float>(mantissa), -9)
                              : std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);
  return (bits & 0x80) ? -magnitude : magnitude;
}

// ----- hashing -------------------------------------------------------------------------------

namespace {

// 10 random bits -> a bf16 with magnitude in [0.25, 4) and a random sign: bit 9 the sign, bits
// 7..8 the exponent (2^-2 .. 2^1), bits 0..6 the mantissa. Never zero, never inf/NaN, and the
// values span four binades so scale and rounding bugs show.
uint16_t bf16FromBits(uint64_t bits) {
  const uint32_t sign = static_cast<uint32_t>((bits >> 9) & 1u);
  const uint32_t exponent = 125u + static_cast<uint32_t>((bits >> 7) & 3u);
  const uint32_t mantissa = static_cast<uint32_t>(bits & 0x7fu);
  return static_cast<uint16_t>((sign << 15) | (exponent << 7) | mantissa);
}

// Independent random streams per (rank, purpose): the x values, the expert picks and the weights
// each have their own, so e.g. changing the routing mode keeps x unchanged.
enum Stream : uint64_t { kStreamX = 1, kStreamTopk = 2, kStreamWeights = 3 };

uint64_t streamSeed(uint64_t seed, int rank, Stream stream) {
  return hashCombine(hashCombine(mix64(seed), static_cast<uint64_t>(rank)), stream);
}

// The largest token index whose origin tag stays exact in bf16 (col2 = token / 128 + 1 <= 256).
constexpr int kMaxTaggedTokens = 256 * 128;
constexpr int kMaxTaggedRanks = 256;

void validateSpec(const ProblemSpec& spec) {
  auto fail = [](const std::string& what) {
    throw std::invalid_argument("generateProblem: " + what);
  };
  if (spec.num_ranks < 1 || spec.num_ranks > kMaxTaggedRanks)
    fail("num_ranks must be in [1, 256], got " + std::to_string(spec.num_ranks));
  if (static_cast<int>(spec.tokens_per_rank.size()) != spec.num_ranks)
    fail("tokens_per_rank has " + std::to_string(spec.tokens_per_rank.size()) +
         " entries, num_ranks is " + std::to_string(spec.num_ranks));
  for (int n : spec.tokens_per_rank)
    if (n < 0 || n > kMaxTaggedTokens)
      fail("tokens_per_rank entries must be in [0, 32768], got " + std::to_string(n));
  if (spec.hidden <= 0 || spec.hidden % kFp8BlockSize != 0)
    fail("hidden must be a positive multiple of 128, got " + std::to_string(spec.hidden));
  if (spec.num_experts <= 0 || spec.num_experts % spec.num_ranks != 0)
    fail("num_experts must be a positive multiple of num_ranks, got " +
         std::to_string(spec.num_experts));
  if (spec.num_topk < 1 || spec.num_topk > spec.num_experts)
    fail("num_topk must be in [1, num_experts], got " + std::to_string(spec.num_topk));
  if (spec.hot_rank < 0 || spec.hot_rank >= spec.num_ranks)
    fail("hot_rank out of range: " + std::to_string(spec.hot_rank));
  if (!(spec.skew >= 0.0 && spec.skew <= 1.0)) fail("skew must be in [0, 1]");
  if (!(spec.negative_fraction >= 0.0 && spec.negative_fraction <= 1.0))
    fail("negative_fraction must be in [0, 1]");
  if (!(spec.duplicate_fraction >= 0.0 && spec.duplicate_fraction <= 1.0))
    fail("duplicate_fraction must be in [0, 1]");
}

void generateX(const ProblemSpec& spec, RankInputs& in) {
  const int hidden = spec.hidden;
  const int blocks = hidden / kFp8BlockSize;
  const size_t n = static_cast<size_t>(in.num_tokens);
  in.x_bf16.resize(n * hidden);
  in.x_fp8.resize(n * hidden);
  in.x_scales.resize(n * blocks);

  util::PortableDraw rng(streamSeed(spec.seed, in.rank, kStreamX));
  uint64_t bits = 0;
  int bits_left = 0;
  for (int t = 0; t < in.num_tokens; ++t) {
    uint16_t* row = in.x_bf16.data() + static_cast<size_t>(t) * hidden;
    row[0] = floatToBf16(static_cast<float>(in.rank + 1));
    row[1] = floatToBf16(static_cast<float>(t % 128 + 1));
    row[2] = floatToBf16(static_cast<float>(t / 128 + 1));
    for (int c = 3; c < hidden; ++c) {
      if (bits_left < 10) {
        bits = rng.next();
        bits_left = 64;
      }
      row[c] = bf16FromBits(bits);
      bits >>= 10;
      bits_left -= 10;
    }

    // FP8 copy: any deterministic quantization will do (the GPU only moves these bytes), so use
    // the plain textbook one.
    uint8_t* q = in.x_fp8.data() + static_cast<size_t>(t) * hidden;
    float* scales = in.x_scales.data() + static_cast<size_t>(t) * blocks;
    for (int b = 0; b < blocks; ++b) {
      float amax = 0.0f;
      for (int c = b * kFp8BlockSize; c < (b + 1) * kFp8BlockSize; ++c)
        amax = std::fmax(amax, std::fabs(bf16ToFloat(row[c])));
      const float scale = amax / kFp8E4m3Max;  // amax > 0: every value is non-zero
      scales[b] = scale;
      for (int c = b * kFp8BlockSize; c < (b + 1) * kFp8BlockSize; ++c)
        q[c] = floatToFp8E4m3(bf16ToFloat(row[c]) / scale);
    }
  }
}

void generateTopk(const ProblemSpec& spec, RankInputs& in) {
  const int num_experts = spec.num_experts;
  const int k_count = spec.num_topk;
  const int local = num_experts / spec.num_ranks;
  const int hot_lo = spec.hot_rank * local;
  const size_t n = static_cast<size_t>(in.num_tokens);
  in.topk_idx.assign(n * k_count, -1);
  in.topk_idx32.assign(n * k_count, -1);
  in.topk_weights.assign(n * k_count, 0.0f);

  util::PortableDraw rng(streamSeed(spec.seed, in.rank, kStreamTopk));
  util::PortableDraw weight_rng(streamSeed(spec.seed, in.rank, kStreamWeights));
  const util::PickShape shape{num_experts, k_count, hot_lo, local, spec.routing == Routing::kSkewed,
                              spec.skew};
  std::vector<char> used(num_experts, 0);
  for (int t = 0; t < in.num_tokens; ++t) {
    int64_t* ids = in.topk_idx.data() + static_cast<size_t>(t) * k_count;
    util::pickExperts(shape, rng, used, ids, [](int) {});

    if (spec.routing == Routing::kWithNegatives) {
      for (int k = 0; k < k_count; ++k)
        if (rng.unit() < spec.negative_fraction) ids[k] = -1;
    }
    if (spec.routing == Routing::kWithDuplicates) {
      // Entry k repeats a random earlier entry (which may itself be a repetition).
      for (int k = 1; k < k_count; ++k) {
        const bool repeat = rng.unit() < spec.duplicate_fraction;
        const int earlier = static_cast<int>(rng.below(k));
        if (repeat) ids[k] = ids[earlier];
      }
    }
    for (int k = 0; k < k_count; ++k) {
      const size_t i = static_cast<size_t>(t) * k_count + k;
      in.topk_idx32[i] = static_cast<int32_t>(ids[k]);
      float w = static_cast<float>(0.05 + 0.95 * weight_rng.unit());
      // The float rounding of a double just below 1 can give exactly 1; keep the range half open.
      if (w >= 1.0f) w = std::nextafter(1.0f, 0.0f);
      in.topk_weights[i] = w;
    }
  }
}

}  // namespace

uint16_t expertOutputValue(uint64_t seed, int global_expert, int src_rank, int src_token, int col) {
  uint64_t h = mix64(seed ^ 0x5eedc0de5eedc0deull);
  h = hashCombine(h, static_cast<uint64_t>(static_cast<int64_t>(global_expert)));
  h = hashCombine(h, static_cast<uint64_t>(static_cast<int64_t>(src_rank)));
  h = hashCombine(h, static_cast<uint64_t>(static_cast<int64_t>(src_token)));
  h = hashCombine(h, static_cast<uint64_t>(static_cast<int64_t>(col)));
  return bf16FromBits(h >> 20);
}

std::vector<float> columnMajorScales(const RankInputs& in) {
  const int blocks = in.hidden / kFp8BlockSize;
  std::vector<float> transposed(in.x_scales.size());
  for (int t = 0; t < in.num_tokens; ++t) {
    for (int b = 0; b < blocks; ++b) {
      transposed[size_t(b) * in.num_tokens + t] = in.x_scales[size_t(t) * blocks + b];
    }
  }
  return transposed;
}

std::vector<RankInputs> generateProblem(const ProblemSpec& spec) {
  validateSpec(spec);
  std::vector<RankInputs> all(spec.num_ranks);
  for (int r = 0; r < spec.num_ranks; ++r) {
    RankInputs& in = all[r];
    in.rank = r;
    in.num_tokens = spec.tokens_per_rank[r];
    in.hidden = spec.hidden;
    in.num_topk = spec.num_topk;
    generateX(spec, in);
    generateTopk(spec, in);
  }
  return all;
}

bool decodeRowOrigin(const uint16_t* row_bf16, int* src_rank, int* src_token) {
  // Each tag column must be an integer in [1, limit]; the float->int conversion is guarded so a
  // garbage (huge or NaN) value cannot overflow.
  auto tag = [&](int col, int limit, int* out) {
    const float v = bf16ToFloat(row_bf16[col]);
    if (!(v >= 1.0f && v <= static_cast<float>(limit)) || v != std::floor(v)) return false;
    *out = static_cast<int>(v) - 1;
    return true;
  };
  int rank = 0, low = 0, high = 0;
  if (!tag(0, kMaxTaggedRanks, &rank) || !tag(1, 128, &low) || !tag(2, 256, &high)) return false;
  if (src_rank) *src_rank = rank;
  if (src_token) *src_token = high * 128 + low;
  return true;
}

}  // namespace epcomm::test
