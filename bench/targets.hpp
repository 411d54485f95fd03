// SPDX-License-Identifier: Apache-2.0
// The targets of docs/benchmarks.md (Targets), as a table, checked against the rows of a run.
#pragma once

#include <vector>

#include "bench_report.hpp"

namespace epcomm::bench {

// Where the targets are read: the main case and the LL batch of the run.
struct TargetCase {
  int tokens = 0;     // --tokens
  int hidden = 0;     // --hidden
  int sms = 0;        // the first --sms value
  int ll_tokens = 0;  // --ll-tokens
  bool ll = false;    // LL rows were run
};

// One Target per table entry that applies, in table order; a value is empty when its row was
// not measured.
std::vector<Target> evaluateTargets(const std::vector<Row>& rows, const TargetCase& where);

}  // namespace epcomm::bench
