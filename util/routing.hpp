// SPDX-License-Identifier: Apache-2.0
// Routing generators shared by the tests (tests/common/test_data.cpp) and ep_bench
// (bench/traffic.cpp): top-k expert picks per token, distinct, uniform or skewed toward one
// rank's experts. One algorithm, drawn through one of two random sources:
//   PortableDraw  std::mt19937_64 through our own integer-to-value mappings, never the <random>
//                 distributions (whose algorithms differ between standard libraries), so one seed
//                 gives the same values everywhere. The tests use it.
//   StdDraw       the same interface through the <random> distributions. ep_bench has drawn its
//                 routing this way since its first recorded numbers; keeping it keeps rows
//                 comparable across versions.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace epcomm::util {

class PortableDraw {
 public:
  explicit PortableDraw(uint64_t seed) : rng_(seed) {}
  uint64_t next() { return rng_(); }
  // Uniform in [0, 1) from the top 53 bits.
  double unit() { return static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0); }
  // Uniform in [0, n). The modulo bias is below 2^-50 for the small n used here.
  int below(int n) { return static_cast<int>(rng_() % static_cast<uint64_t>(n)); }
  bool chance(double p) { return unit() < p; }

 private:
  std::mt19937_64 rng_;
};

class StdDraw {
 public:
  explicit StdDraw(uint64_t seed) : rng_(seed) {}
  double unit() { return std::uniform_real_distribution<double>(0.0, 1.0)(rng_); }
  int below(int n) { return std::uniform_int_distribution<int>(0, n - 1)(rng_); }
  // A routing weight in [0.05, 1).
  float weight() { return std::uniform_real_distribution<float>(0.05f, 1.0f)(rng_); }

 private:
  std::mt19937_64 rng_;
};

// What one token's picks are drawn from.
struct PickShape {
  int num_experts = 0;
  int topk = 0;       // <= num_experts
  int hot_first = 0;  // the hot rank's experts: [hot_first, hot_first + hot_count)
  int hot_count = 0;
  bool skewed = false;  // flip the skew coin at all
  double skew = 0;      // probability that a pick comes from the hot rank's experts
};

// Picks s.topk distinct experts for one token into ids[0, topk). When s.skewed, every pick first
// flips a coin: with probability s.skew, and while the hot rank has an expert left, the pick comes
// from the hot rank's experts; otherwise uniformly from all. Rejection keeps the picks distinct.
// `used` is num_experts zeros of scratch (left zeroed); after_pick(k) runs right after pick k
// (ep_bench draws that pick's weight there, from the same stream).
template <typename Draw, typename AfterPick>
void pickExperts(const PickShape& s, Draw& draw, std::vector<char>& used, int64_t* ids,
                 AfterPick&& after_pick) {
  int hot_used = 0;
  for (int k = 0; k < s.topk; ++k) {
    // The coin is drawn whenever skewed, so the stream advances the same way whatever the outcome.
    const bool hot = s.skewed && draw.unit() < s.skew && hot_used < s.hot_count;
    int expert = 0;
    do {
      expert = hot ? s.hot_first + draw.below(s.hot_count) : draw.below(s.num_experts);
    } while (used[static_cast<size_t>(expert)]);
    used[static_cast<size_t>(expert)] = 1;
    if (expert >= s.hot_first && expert < s.hot_first + s.hot_count) ++hot_used;
    ids[k] = expert;
    after_pick(k);
  }
  for (int k = 0; k < s.topk; ++k) used[static_cast<size_t>(ids[k])] = 0;
}

// One rank's routing as ep_bench draws it (StdDraw, hot rank 0).
struct TokenRouting {
  std::vector<int64_t> idx;      // [tokens, topk], distinct experts per token
  std::vector<float> weights;    // [tokens, topk], in [0.05, 1)
  std::vector<int> dest_tokens;  // [ranks] tokens with >= 1 expert on that rank
};

// With probability `skew` (0 = uniform) a pick comes from rank 0's experts, else uniformly.
// num_experts must be a multiple of num_ranks. Not collective.
inline TokenRouting drawRouting(int num_experts, int num_ranks, int topk, double skew, int tokens,
                                uint64_t seed) {
  const int per_rank = num_experts / num_ranks;
  const PickShape shape{num_experts, topk, 0, per_rank, skew > 0.0, skew};
  StdDraw draw(seed);
  TokenRouting r;
  r.idx.resize(static_cast<size_t>(tokens) * topk);
  r.weights.resize(r.idx.size());
  r.dest_tokens.assign(static_cast<size_t>(num_ranks), 0);
  std::vector<char> used(static_cast<size_t>(num_experts), 0);
  std::vector<char> to_rank(static_cast<size_t>(num_ranks), 0);
  for (int t = 0; t < tokens; ++t) {
    int64_t* ids = r.idx.data() + static_cast<size_t>(t) * topk;
    float* weights = r.weights.data() + static_cast<size_t>(t) * topk;
    pickExperts(shape, draw, used, ids, [&](int k) { weights[k] = draw.weight(); });
    for (int k = 0; k < topk; ++k) to_rank[static_cast<size_t>(ids[k] / per_rank)] = 1;
    for (int d = 0; d < num_ranks; ++d) {
      r.dest_tokens[static_cast<size_t>(d)] += to_rank[static_cast<size_t>(d)];
      to_rank[static_cast<size_t>(d)] = 0;
    }
  }
  return r;
}

}  // namespace epcomm::util
