// SPDX-License-Identifier: Apache-2.0
#include "options.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "epcomm/config.hpp"

#ifndef EPCOMM_BENCH_HAVE_NCCL
#define EPCOMM_BENCH_HAVE_NCCL 0
#endif

namespace epcomm::bench {

namespace {

constexpr int kMinIters = 50;
constexpr int kQuickIters = 10;
constexpr int kQuickWarmup = 2;

// An on/off option: --NAME turns it on, --no-NAME off; the later one on the command line wins.
// CLI11 would print a combined "--NAME,!--no-NAME" flag as "--NAME,--no-NAME{false}" (the value
// --no-NAME stores), which reads as "default false"; two flags keep the help true to the default.
void addSwitch(CLI::App& app, const std::string& name, bool& value, const std::string& on_text,
               const std::string& off_text, const std::string& default_text) {
  app.add_flag("--" + name, value, on_text + " (default: " + default_text + ")")
      ->trigger_on_parse();
  app.add_flag_callback(
         "--no-" + name, [&value] { value = false; }, off_text)
      ->trigger_on_parse();
}

std::string onOff(bool value) {
  return value ? "on" : "off";
}

void require(bool ok, const char* option, const std::string& message) {
  if (!ok) throw CLI::ValidationError(option, message);
}

void checkTokens(int t, const char* option) {
  require(t >= 1 && t <= kMaxTokensPerRank, option,
          "must be in [1, " + std::to_string(kMaxTokensPerRank) + "]");
}

void checkHidden(int h, const char* option) {
  require(h >= kHiddenAlignment && h <= kMaxHidden && h % kHiddenAlignment == 0, option,
          "must be a multiple of " + std::to_string(kHiddenAlignment) + " in [" +
              std::to_string(kHiddenAlignment) + ", " + std::to_string(kMaxHidden) + "]");
}

}  // namespace

std::vector<int> unique(const std::vector<int>& values) {
  std::vector<int> out;
  for (int v : values) {
    if (std::find(out.begin(), out.end(), v) == out.end()) out.push_back(v);
  }
  return out;
}

bool launcherRankIsZero() {
  for (const char* name :
       {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID", "MV2_COMM_WORLD_RANK"}) {
    if (const char* value = std::getenv(name)) return std::strcmp(value, "0") == 0;
  }
  return true;
}

void defineOptions(CLI::App& app, Options& o) {
  app.add_option("--tokens", o.tokens, "HT tokens per rank")->capture_default_str();
  app.add_option("--hidden", o.hidden, "Hidden size (elements per token; multiple of 128)")
      ->capture_default_str();
  app.add_option("--topk", o.topk, "Experts per token")->capture_default_str();
  app.add_option("--experts", o.experts, "Experts in total (divisible by the rank count)")
      ->capture_default_str();
  app.add_option("--skew", o.skew,
                 "Routing skew: probability that a top-k pick is forced onto rank 0's experts "
                 "(0 = uniform)")
      ->capture_default_str();
  app.add_option(
         "--sms", o.sms,
         "SM budgets of the HT ops, the first the main case (targets, expert-major and graph "
         "rows, --sweep-tokens, --sweep-hidden); the others add dispatch and combine rows "
         "and the SM-budget table")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--iters", o.iters, "Timed iterations per row (>= 50 unless --quick)")
      ->capture_default_str();
  app.add_option("--warmup", o.warmup, "Untimed warm-up iterations before each row")
      ->capture_default_str();
  addSwitch(app, "graph", o.graph, "CUDA-graph replay rows", "Skip the CUDA-graph replay rows",
            onOff(o.graph));
  addSwitch(app, "expert-major", o.expert_major,
            "Expert-major HT rows (the receive region is sized for one row per (token, expert))",
            "Skip the expert-major HT rows", onOff(o.expert_major));
  addSwitch(app, "ll", o.ll, "Low-latency rows", "Skip the low-latency rows", onOff(o.ll));
  app.add_option("--ll-tokens", o.ll_tokens, "LL tokens per rank (the LL rows also run 1 token)")
      ->capture_default_str();
  app.add_option("--seed", o.seed, "Seed of the random inputs and routing")->capture_default_str();
  app.add_option("--json", o.json, "Also write every row, the setup and the link limits here")
      ->type_name("FILE");
  app.add_option("--mem-mode", o.mem_mode, "Symmetric memory mode (auto honours EPCOMM_MEM_MODE)")
      ->check(CLI::IsMember({"auto", "fabric", "posix_fd", "cuda_ipc"}))
      ->capture_default_str();
  app.add_option("--sweep-tokens", o.sweep_tokens, "Extra HT rows at these tokens per rank")
      ->delimiter(',');
  app.add_option("--sweep-hidden", o.sweep_hidden,
                 "Extra HT rows at these hidden sizes (one EpBuffer per size)")
      ->delimiter(',');
  app.add_flag("--quick", o.quick,
               "Smoke test: 10 iterations, 2 warm-ups, shorter link test (numbers not for "
               "reporting; default: " +
                   onOff(o.quick) + ")");
  addSwitch(app, "nccl", o.nccl, "NCCL baseline", "Skip the NCCL baseline",
            onOff(o.nccl) +
                (EPCOMM_BENCH_HAVE_NCCL ? "" : "; this build has no NCCL, so its column is n/a"));
  addSwitch(app, "link-bulk", o.link_bulk,
            "TMA bulk-copy rows in the link test (SM bulk store / SM bulk load, 4/8/16 KiB "
            "stages; checked, never the link limit)",
            "Skip the bulk-copy rows of the link test", onOff(o.link_bulk));
  addSwitch(app, "fixed-cost", o.fixed_cost,
            "Fixed cost per call: a token sweep per op with a least-squares fit (fixed us, "
            "streaming GB/s) and the host time to enqueue each op",
            "Skip the fixed-cost sweep", onOff(o.fixed_cost));
  app.add_option("--fit-tokens", o.fit_tokens,
                 "HT token counts of the fixed-cost sweep (those above the HT maximum are dropped)")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--fit-ll-tokens", o.fit_ll_tokens,
                 "LL token counts of the fixed-cost sweep (those above --ll-tokens are dropped)")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--perf-variants", o.perf_variants,
                 "Also run the fixed-cost sweep on one extra EpBuffer per value, created with "
                 "EPCOMM_PERF set to it ('off': unset; '+' joins names, e.g. "
                 "ll_fused_dispatch+ll_fused_combine), rows labelled [value]: old and new fast "
                 "paths in one run (docs/perf-notes.md)")
      ->delimiter(',');
  app.add_flag("--stage-times", o.stage_times,
               "Also time the stages inside the LL (1 and 128 tokens, default and 24 SMs) and HT "
               "(0 and 4096 tokens) kernels on one extra EpBuffer created with "
               "EPCOMM_STAGE_TIMES=1: a table per op, printed last (docs/benchmarks.md, "
               "\"Stage times\"; default: " +
                   onOff(o.stage_times) + ")");
  app.footer(
      "Run under mpirun with one rank per GPU (scripts/bench.sh). Definitions of every column: "
      "docs/benchmarks.md.");
}

void validateOptions(const CLI::App& app, Options& o) {
  if (o.quick) {
    if (app.get_option("--iters")->count() == 0) o.iters = kQuickIters;
    if (app.get_option("--warmup")->count() == 0) o.warmup = kQuickWarmup;
  }
  require(o.iters >= 1, "--iters", "must be >= 1");
  require(o.quick || o.iters >= kMinIters, "--iters",
          "must be >= " + std::to_string(kMinIters) + " (use --quick for smoke tests)");
  require(o.warmup >= 0, "--warmup", "must be >= 0");
  checkTokens(o.tokens, "--tokens");
  for (int t : o.sweep_tokens) checkTokens(t, "--sweep-tokens");
  checkHidden(o.hidden, "--hidden");
  for (int h : o.sweep_hidden) checkHidden(h, "--sweep-hidden");
  for (int t : o.fit_tokens) checkTokens(t, "--fit-tokens");
  for (int t : o.fit_ll_tokens) {
    require(t >= 1 && t <= kMaxLlTokensPerRank, "--fit-ll-tokens",
            "values must be in [1, " + std::to_string(kMaxLlTokensPerRank) + "]");
  }
  // The names EPCOMM_PERF knows (src/core/perf_flags.hpp), checked here so that a typo fails
  // before the run rather than at the variant's buffer, after every other row.
  for (const std::string& variant : o.perf_variants) {
    std::string rest = variant;
    while (true) {
      const size_t plus = rest.find('+');
      const std::string name = rest.substr(0, plus);
      require(name == "off" || name == "default" || name == "none" || name == "all" ||
                  name == "ll_fused_dispatch" || name == "ll_fused_combine" ||
                  name == "ht_counts_once" || name == "ht_fused_layout" ||
                  name == "ht_push_combine",
              "--perf-variants",
              "'" + variant +
                  "': names are off, default, none, all, ll_fused_dispatch, ll_fused_combine, "
                  "ht_counts_once, ht_fused_layout, ht_push_combine, joined by '+'");
      if (plus == std::string::npos) break;
      rest = rest.substr(plus + 1);
    }
  }
  o.fit_tokens = unique(o.fit_tokens);
  o.fit_ll_tokens = unique(o.fit_ll_tokens);
  require(o.experts >= 1 && o.experts <= kMaxExperts, "--experts",
          "must be in [1, " + std::to_string(kMaxExperts) + "]");
  require(o.topk >= 1 && o.topk <= kMaxTopk, "--topk",
          "must be in [1, " + std::to_string(kMaxTopk) + "]");
  require(o.topk <= o.experts, "--topk", "must be <= --experts (picks are distinct experts)");
  require(o.skew >= 0.0 && o.skew <= 1.0, "--skew", "must be in [0, 1]");
  require(!o.sms.empty(), "--sms", "needs at least one value");
  for (int s : o.sms) require(s >= 1, "--sms", "values must be >= 1");
  o.sms = unique(o.sms);
  require(o.ll_tokens >= 1 && o.ll_tokens <= kMaxLlTokensPerRank, "--ll-tokens",
          "must be in [1, " + std::to_string(kMaxLlTokensPerRank) + "]");
}

nlohmann::ordered_json optionsJson(const Options& o) {
  return {{"tokens", o.tokens},
          {"hidden", o.hidden},
          {"topk", o.topk},
          {"experts", o.experts},
          {"skew", o.skew},
          {"sms", o.sms},
          {"iters", o.iters},
          {"warmup", o.warmup},
          {"graph", o.graph},
          {"expert_major", o.expert_major},
          {"ll", o.ll},
          {"ll_tokens", o.ll_tokens},
          {"seed", o.seed},
          {"mem_mode", o.mem_mode},
          {"sweep_tokens", o.sweep_tokens},
          {"sweep_hidden", o.sweep_hidden},
          {"quick", o.quick},
          {"nccl", o.nccl},
          {"link_bulk", o.link_bulk},
          {"fixed_cost", o.fixed_cost},
          {"fit_tokens", o.fit_tokens},
          {"fit_ll_tokens", o.fit_ll_tokens},
          {"perf_variants", o.perf_variants},
          {"stage_times", o.stage_times}};
}

}  // namespace epcomm::bench
