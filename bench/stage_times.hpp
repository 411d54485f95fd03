// SPDX-License-Identifier: Apache-2.0
// --stage-times: where the microseconds of one call go inside its kernels (EPCOMM_STAGE_TIMES,
// kernels/stage_times.hpp; docs/benchmarks.md, "Stage times"). Eager calls on a buffer created
// with the switch on; after every call the stream is synchronized and the per-stage
// %globaltimer stamps are read (src/diagnostics.hpp).
//
// Collective discipline: every rank runs the same cases in the same order and reduces the same
// number of values (a stage a rank never reached reduces as -1).
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cases.hpp"

namespace epcomm::bench {

struct StageRow {
  std::string kernel;
  std::string stage;
  bool reached = false;     // some rank reached it in some timed iteration
  double median_us = 0;     // median over iterations of (stamp - kernel start), max over ranks
  double min_rank_us = 0;   // the same median, min over ranks (-1: a rank never reached it): the
                            // spread between ranks says which stage is rank-asymmetric
  double mean_us = 0;       // mean of the same samples, max over ranks (%globaltimer may tick in
                            // steps of ~1 us: the mean of many calls resolves finer)
  double delta_us = 0;      // median_us minus the previous reached stage's median_us
  bool kernel_row = false;  // the kernel's header row: median_us = its start since the op's
                            // first kernel's start
};

struct StageTable {
  std::string op;  // e.g. "LL dispatch, 1 tokens, 24 SMs"
  int iterations = 0;
  std::vector<StageRow> rows;
};

// Collective. `buffer` must have been created with EPCOMM_STAGE_TIMES=1. LL dispatch and combine
// at 1 and 128 tokens (capped at ll_max_tokens; none when 0), each at the buffer's default SM
// budget and at 24 SMs; HT dispatch (layout + dispatch kernel) and combine at 0 and 4096 tokens
// (capped at ht_max_tokens) with `ht_sms` SMs.
std::vector<StageTable> measureStageTimes(const CaseEnv& env, EpBuffer& buffer, int hidden,
                                          int ht_max_tokens, int ll_max_tokens, int ht_sms);

// Rank 0: one fixed-width table per op.
void printStageTimes(const std::vector<StageTable>& tables);

nlohmann::ordered_json stageTimesJson(const std::vector<StageTable>& tables);

}  // namespace epcomm::bench
