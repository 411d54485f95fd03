// SPDX-License-Identifier: Apache-2.0
// What ep_bench reports: result rows, the link-limit table, the target summary, and their
// fixed-width and JSON renderings. Every number here is already reduced over ranks;
// docs/benchmarks.md defines each one.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "timing.hpp"

namespace epcomm::bench {

// One line of the main table. Time statistics are the maximum over ranks of each rank's
// statistic; GB/s are the minimum over ranks of (this rank's bytes per call / its median time).
struct Row {
  std::string op;     // "dispatch", "combine", "ll dispatch", ...
  std::string dtype;  // "bf16", "fp8" or "-"
  int tokens = 0;     // tokens per rank
  int hidden = 0;
  int topk = 0;
  int experts = 0;
  int ranks = 0;
  int sms = 0;  // SM budget of the op; 0 = not applicable
  int input_sets = 0;
  Stats time;
  // Per-call bytes of one rank (min and max over ranks); empty where bytes do not apply.
  std::optional<double> logical_bytes_min, logical_bytes_max;
  std::optional<double> link_bytes_min, link_bytes_max;
  std::optional<double> logical_gbps;      // min over ranks
  std::optional<double> link_gbps;         // min over ranks
  std::optional<double> logical_gbps_max;  // max over ranks (the busiest rank under --skew)
  std::optional<double> link_gbps_max;
  std::optional<double> link_pct;     // link_gbps / link limit * 100
  std::optional<double> nccl_med_us;  // NCCL moving the same per-peer bytes
  std::optional<double> vs_nccl;      // nccl_med_us / time.med_us
};

// One line of the link-limit table.
struct LinkRow {
  std::string method;  // "SM store", "SM load", "copy engine", "SM bulk store", "SM bulk load"
  int sms = 0;         // 0 = copy engine
  double bytes_per_rank = 0;
  double med_us_max = 0;  // slowest rank's median
  double gbps_min = 0;    // min over ranks of bytes / median
  double gbps_max = 0;
  // Bulk rows only (0 / "" otherwise): bytes per pipeline stage, stages per block, and the
  // check over all ranks: "ok", or "bad" / "timeout" / "n/a", printed instead of the numbers.
  int chunk_bytes = 0;
  int stages = 0;
  std::string check;

  bool failed() const { return !check.empty() && check != "ok"; }
  // "SM bulk store 16K" for a bulk row, the method otherwise.
  std::string label() const;
};

// The fastest checked bulk row per (method, SM count), in table order.
std::vector<LinkRow> bestBulkRows(const std::vector<LinkRow>& rows);

struct Target {
  std::string name;
  std::optional<double> value;  // empty: not measured in this run
  std::string unit;             // "%", "x", "us"
  bool at_least = true;         // PASS when value >= threshold (else value <= threshold)
  double threshold = 0;
  std::string note;  // where the value comes from
};

// The setup block: human-readable lines for the terminal, typed values for the JSON.
struct Setup {
  std::vector<std::pair<std::string, std::string>> lines;
  nlohmann::ordered_json json = nlohmann::ordered_json::object();

  template <typename V>
  void add(const std::string& key, const std::string& text, const V& value) {
    lines.emplace_back(key, text);
    json[key] = value;
  }
};

void printSetup(const Setup& setup);
void printLinkTable(const std::vector<LinkRow>& rows, const std::string& note);
void printTable(const std::vector<Row>& rows);
// One row as soon as it is measured, on stderr (flushed) as "ep_bench:   <table row>", after the
// table header when `first`. The prefix keeps these lines apart from the final table on stdout
// (scripts look for the line starting with "op ").
void printRowLive(const Row& row, bool first);
void printTargets(const std::vector<Target>& targets);
// The HT rows measured at more than one SM budget (--sms), grouped by op: SMs, median, SM x us
// (the SM time the op takes from other work: SMs x median us), link % and the time against the
// first budget's. Prints nothing when every op ran at one budget.
void printSmBudgets(const std::vector<Row>& rows);

// Writes everything as one JSON document. Returns an error message, or "" on success.
std::string writeJson(const std::string& path, const nlohmann::ordered_json& options,
                      const Setup& setup, const std::vector<LinkRow>& link,
                      const std::optional<double>& link_limit_gbps, const std::vector<Row>& rows,
                      const std::vector<Target>& targets,
                      const nlohmann::ordered_json& fixed_cost = nlohmann::ordered_json(),
                      const nlohmann::ordered_json& stage_times = nlohmann::ordered_json());

}  // namespace epcomm::bench
