// SPDX-License-Identifier: Apache-2.0
// Fixed cost per call (issue 13): a token sweep per op with a least-squares fit of the median
// GPU time against the bytes moved (intercept = fixed us, 1 / slope = streaming GB/s), and the
// host time to enqueue each op (a steady_clock around the API call, no GPU wait).
// docs/benchmarks.md, "Fixed cost", defines every number.
//
// Collective discipline: every rank runs the same sweep points in the same order.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cases.hpp"

namespace epcomm::bench {

// One op at one token count.
struct SweepPoint {
  int tokens = 0;
  double bytes = 0;        // logical bytes (received rows x row bytes), mean over the sets
  double device_us = 0;    // median GPU time (CUDA events), max over ranks
  double host_us = 0;      // median host enqueue time, max over ranks
  double host_min_us = 0;  // minimum host enqueue time, max over ranks
};

struct OpSweep {
  std::string op;
  std::vector<SweepPoint> points;
  // Least squares of device_us on bytes over the points (valid when >= 2 distinct byte counts).
  bool fitted = false;
  double fixed_us = 0;        // intercept
  double gbps = 0;            // 1 / slope; 0 when the slope is <= 0
  double host_median_us = 0;  // median of the points' host medians
};

// Least squares fit of y on x; false when fewer than 2 distinct x.
bool fitLine(const std::vector<double>& x, const std::vector<double>& y, double& intercept,
             double& slope);

// Collective. HT: dispatch (with layout), dispatch (cached), combine at each HT token count
// (<= the buffer's max). LL: dispatch and combine at each LL token count (<= LL max); empty LL
// list: no LL sweep.
std::vector<OpSweep> measureFixedCost(const CaseEnv& env, EpBuffer& buffer, int hidden,
                                      const std::vector<int>& ht_tokens,
                                      const std::vector<int>& ll_tokens);

// Issue 13's targets that the sweep measures, from the main buffer's ops (variants, whose op
// names end in "]", are left out): the fit's fixed cost of a cached HT dispatch (<= 6 us), the
// LL graph round trip at 1 token (<= 12 us) and the slowest op's host enqueue median (<= 3 us).
// Values are empty when the sweep did not run.
std::vector<Target> fixedCostTargets(const std::vector<OpSweep>& sweeps);

// Rank 0: the sweep table and the fit per op.
void printFixedCost(const std::vector<OpSweep>& sweeps);

nlohmann::ordered_json fixedCostJson(const std::vector<OpSweep>& sweeps);

}  // namespace epcomm::bench
