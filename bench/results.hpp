// SPDX-License-Identifier: Apache-2.0
// The rows of a run: each measured op becomes one Row, reduced over ranks, kept for the final
// table and JSON, and printed by rank 0 as soon as it is complete (stderr, so the final table on
// stdout stays the one place scripts read).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "bench_report.hpp"
#include "ranks.hpp"
#include "traffic.hpp"

namespace epcomm::bench {

// What a row measured: the case columns of the table.
struct RowSpec {
  std::string op;
  std::string dtype;
  int tokens = 0;
  int hidden = 0;
  int sms = 0;  // 0 = not applicable
  int input_sets = 0;
};

class RowRecorder {
 public:
  RowRecorder(const Ranks& ranks, const Workload& work) : ranks_(ranks), work_(work) {}

  // The SM-store link limit (GB/s per rank) that link % refers to; empty: no link %.
  void setLinkLimit(std::optional<double> gbps) { link_limit_gbps_ = gbps; }
  const std::optional<double>& linkLimit() const { return link_limit_gbps_; }

  // Collective: reduces this rank's samples and bytes over ranks, appends the row, and has
  // rank 0 print it. `bytes` empty: no GB/s; `nccl_med_us` empty: no NCCL comparison.
  void add(const RowSpec& spec, const std::vector<float>& samples,
           const std::optional<Bytes>& bytes, const std::optional<double>& nccl_med_us);

  const std::vector<Row>& rows() const { return rows_; }

 private:
  void addBandwidth(Row& r, double med_us, const Bytes& bytes) const;

  const Ranks& ranks_;
  const Workload& work_;
  std::optional<double> link_limit_gbps_;
  std::vector<Row> rows_;
};

}  // namespace epcomm::bench
