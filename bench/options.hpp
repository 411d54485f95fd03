// SPDX-License-Identifier: Apache-2.0
// ep_bench's command line (CLI11): the options, their checks, and their JSON record.
// docs/benchmarks.md lists every option.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace epcomm::bench {

struct Options {
  int tokens = 4096;
  int hidden = 7168;
  int topk = 8;
  int experts = 256;
  double skew = 0.0;
  // The HT SM budgets: the first is the main case (targets, expert-major and graph rows, the
  // token and hidden sweeps); the others add dispatch and combine rows (issue 14: 16/24/32).
  std::vector<int> sms{32, 24, 16};
  int iters = 50;
  int warmup = 10;
  bool graph = true;
  bool expert_major = true;  // expert-major HT rows (sizes the HT receive region for them)
  bool ll = true;
  int ll_tokens = 128;
  uint64_t seed = 1;
  std::string json;
  std::string mem_mode = "auto";
  std::vector<int> sweep_tokens;
  std::vector<int> sweep_hidden;
  bool quick = false;
  bool nccl = true;
  bool link_bulk = true;  // the TMA bulk-copy rows of the link test
  // Fixed cost per call (issue 13): token sweeps with a fit per op, and host enqueue times.
  bool fixed_cost = true;
  std::vector<int> fit_tokens{1, 8, 32, 128, 512, 4096};  // HT; capped at the HT buffer's max
  std::vector<int> fit_ll_tokens{1, 8, 32, 128};          // LL; capped at --ll-tokens
  // EPCOMM_PERF values to measure the sweep under, one extra buffer each ("off": none set).
  std::vector<std::string> perf_variants;
  // Per-stage kernel times (EPCOMM_STAGE_TIMES) on one extra buffer: docs/benchmarks.md.
  bool stage_times = false;
};

// Registers every option on `app`, bound to `o` (whose values are the defaults shown by --help).
void defineOptions(CLI::App& app, Options& o);

// After app.parse: applies --quick and checks what does not depend on the machine (the rank
// count and the SM count are checked once MPI and the GPU are up). Throws CLI::ValidationError.
void validateOptions(const CLI::App& app, Options& o);

nlohmann::ordered_json optionsJson(const Options& o);

// Before MPI_Init the rank is only known from the launcher's environment; used so that --help
// and command-line errors are printed once, not once per rank.
bool launcherRankIsZero();

// The values in order, repeats dropped.
std::vector<int> unique(const std::vector<int>& values);

}  // namespace epcomm::bench
