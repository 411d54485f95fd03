// SPDX-License-Identifier: Apache-2.0
// Seeded test data for the dispatch/combine tests (docs/design.md §8).
//
// Every rank of an mpirun job calls generateProblem() with the same ProblemSpec and gets the
// inputs of ALL ranks, bit for bit identical, so each rank can compute its own expected output
// with the CPU reference model (common/reference.hpp) without any communication.
//
// Everything here is pure host code. Random numbers come from util::PortableDraw: std::mt19937_64
// (whose output sequence the C++ standard fixes) and our own integer-to-value mappings, never the
// <random> distributions, whose algorithms differ between standard libraries. The expert picks
// are util::pickExperts (util/routing.hpp), the generator ep_bench uses too.
#pragma once

#include <cstdint>
#include <vector>

#include "util/seed.hpp"

namespace epcomm::test {

// FP8 rows carry one float32 scale per this many columns.
inline constexpr int kFp8BlockSize = 128;
// Largest finite FP8 e4m3 magnitude.
inline constexpr float kFp8E4m3Max = 448.0f;

// ----- number formats --------------------------------------------------------------------------

// float -> bf16 bits, round to nearest even. NaN stays NaN (quiet, sign kept); overflow gives inf.
uint16_t floatToBf16(float value);
float bf16ToFloat(uint16_t bits);
// Rounds a float to the nearest bf16 value and back.
inline float roundToBf16(float value) {
  return bf16ToFloat(floatToBf16(value));
}

// float -> FP8 e4m3 bits, round to nearest even, saturating to +-448 (NaN -> 0x7f). This is the
// conversion of cuda_fp8.h (__NV_SATFINITE), which the GPU kernels use too.
uint8_t floatToFp8E4m3(float value);
// FP8 e4m3 bits -> float, exact (every e4m3 value is a float). 0x7f and 0xff are NaN.
float fp8E4m3ToFloat(uint8_t bits);

// ----- hashing -------------------------------------------------------------------------------

// mix64 (splitmix64 finalizer) and hashCombine (order-sensitive), from util/seed.hpp.
using util::hashCombine;
using util::mix64;

// A deterministic, finite, non-zero bf16 "expert output" for (expert, source token, column):
// magnitude in [0.25, 4) with a random sign. The LL combine tests fill the expert outputs with
// it and pass bf16ToFloat(expertOutputValue(...)) to referenceLlCombine().
uint16_t expertOutputValue(uint64_t seed, int global_expert, int src_rank, int src_token, int col);

// ----- problems ------------------------------------------------------------------------------

enum class Routing {
  kUniform,         // K distinct experts per token, uniform
  kSkewed,          // each pick comes from hot_rank's experts with probability `skew`
  kWithNegatives,   // uniform, then each entry becomes -1 with probability negative_fraction
  kWithDuplicates,  // uniform, then each entry k > 0 repeats a random earlier entry of the same
                    // token with probability duplicate_fraction (the ops count it once)
};

struct ProblemSpec {
  int num_ranks = 1;
  int hidden = 128;                  // a multiple of kFp8BlockSize
  int num_experts = 1;               // a multiple of num_ranks
  int num_topk = 1;                  // <= num_experts
  std::vector<int> tokens_per_rank;  // [num_ranks], entries may be 0
  Routing routing = Routing::kUniform;
  int hot_rank = 0;
  double skew = 0.9;
  double negative_fraction = 0.2;
  double duplicate_fraction = 0.3;
  uint64_t seed = 1;
};

// One rank's inputs. N = num_tokens, H = hidden, K = num_topk; all arrays row-major.
struct RankInputs {
  int rank = 0;
  int num_tokens = 0;
  int hidden = 0;    // copied from the spec, so a RankInputs describes itself
  int num_topk = 0;  // copied from the spec
  // [N*H] finite non-zero bf16. Columns 0..2 encode the row's origin exactly:
  // col0 = rank + 1, col1 = token % 128 + 1, col2 = token / 128 + 1 (see decodeRowOrigin()).
  std::vector<uint16_t> x_bf16;
  // [N*H] the same rows in FP8 e4m3, [N*H/128] one scale per 128-column block:
  // scale = amax(block) / 448, x_fp8 = floatToFp8E4m3(x / scale). The GPU only copies these.
  std::vector<uint8_t> x_fp8;
  std::vector<float> x_scales;
  std::vector<int64_t> topk_idx;    // [N*K], -1 = no expert
  std::vector<int32_t> topk_idx32;  // [N*K], the same values as int32
  // [N*K] in [0.05, 1). Entries whose id is -1 still hold a random weight: the ops must ignore
  // them, and a zero there would hide a kernel that does not.
  std::vector<float> topk_weights;
};

// Builds every rank's inputs. Deterministic in the spec; each rank's data depends only on
// (seed, rank, hidden, num_experts, num_topk, routing parameters, its own token count), so
// changing one rank's token count leaves the other ranks' data unchanged, and the x values do not
// depend on the routing parameters. Throws std::invalid_argument on an inconsistent spec.
std::vector<RankInputs> generateProblem(const ProblemSpec& spec);

// The rank's FP8 scales column-major, [hidden / 128][num_tokens] (DispatchArgs with
// scales_token_stride 1 and scales_col_stride num_tokens), from x_scales [num_tokens][hidden /
// 128].
std::vector<float> columnMajorScales(const RankInputs& in);

// Reads the origin tag of a generated row (its first three bf16 columns). Returns false if the
// columns do not look like a tag (not small positive integers).
bool decodeRowOrigin(const uint16_t* row_bf16, int* src_rank, int* src_token);

}  // namespace epcomm::test
