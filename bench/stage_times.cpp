// SPDX-License-Identifier: Apache-2.0
#include "stage_times.hpp"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <numeric>
#include <string>

#include "epcomm/epcomm.hpp"
#include "kernels/stage_times.hpp"  // the stage names (the project root is on the include path)
#include "options.hpp"              // unique()
#include "src/diagnostics.hpp"      // the library's internal reader of the stamps
#include "timing.hpp"

namespace epcomm::bench {

namespace {

using kernels::StageKernel;

constexpr int kLlCaseSms = 24;  // issue 13: the LL combine at 128 tokens and 24 SMs

// Per-stage samples of one op over the timed iterations.
class StageSamples {
 public:
  explicit StageSamples(std::vector<StageKernel> kernels)
      : kernels_(std::move(kernels)),
        since_start_(kernels_.size() * kernels::kMaxStages),
        kernel_start_(kernels_.size()) {}

  // The stamps of one call (diagnostics::takeStageTimes).
  void add(const std::vector<uint64_t>& stamps) {
    if (stamps.empty()) return;
    uint64_t op_start = 0;
    for (StageKernel k : kernels_) {
      const uint64_t start = stamps[kernels::stageSlot(k, kernels::kStageStart)];
      if (start != 0 && (op_start == 0 || start < op_start)) op_start = start;
    }
    for (size_t i = 0; i < kernels_.size(); ++i) {
      const uint64_t start = stamps[kernels::stageSlot(kernels_[i], kernels::kStageStart)];
      if (start == 0) continue;
      kernel_start_[i].push_back(static_cast<float>((start - op_start) * 1e-3));
      for (int s = 0; s < kernels::kMaxStages; ++s) {
        const uint64_t t = stamps[kernels::stageSlot(kernels_[i], s)];
        // A stamp before the start is stale (not possible after a read zeroed it) or absent.
        if (t < start) continue;
        since_start_[i * kernels::kMaxStages + s].push_back(static_cast<float>((t - start) * 1e-3));
      }
    }
  }

  // Collective: median and mean per stage, max over ranks.
  StageTable table(const Ranks& ranks, const std::string& op, int iterations) const {
    StageTable out;
    out.op = op;
    out.iterations = iterations;
    for (size_t i = 0; i < kernels_.size(); ++i) {
      const kernels::StageKernelInfo& info =
          kernels::kStageKernelInfo[static_cast<int>(kernels_[i])];
      StageRow head;
      head.kernel = info.name;
      head.kernel_row = true;
      reduce(ranks, kernel_start_[i], head);
      out.rows.push_back(head);
      double previous = 0;
      for (int s = 0; s < info.num_stages; ++s) {
        StageRow row;
        row.kernel = info.name;
        row.stage = info.stages[s];
        reduce(ranks, since_start_[i * kernels::kMaxStages + s], row);
        if (row.reached) {
          row.delta_us = row.median_us - previous;
          previous = row.median_us;
        }
        out.rows.push_back(row);
      }
    }
    return out;
  }

 private:
  static void reduce(const Ranks& ranks, const std::vector<float>& samples, StageRow& row) {
    double median = -1, mean = -1;
    if (!samples.empty()) {
      median = summarize(samples).med_us;
      mean = std::accumulate(samples.begin(), samples.end(), 0.0) / samples.size();
    }
    row.median_us = allMax(ranks, median);
    row.min_rank_us = allMin(ranks, median);
    row.mean_us = allMax(ranks, mean);
    row.reached = row.median_us >= 0;
  }

  std::vector<StageKernel> kernels_;
  std::vector<std::vector<float>> since_start_;   // [kernel][stage] us since the kernel's start
  std::vector<std::vector<float>> kernel_start_;  // [kernel] us since the op's first kernel
};

// warmup + iters calls of `op`, the stamps read after each; the warm-up calls' are dropped.
StageTable runOp(const CaseEnv& env, EpBuffer& buffer, const std::string& name,
                 std::vector<StageKernel> kernels, const std::function<void()>& op,
                 const std::function<void()>& after = {}) {
  StageSamples samples(std::move(kernels));
  (void)diagnostics::takeStageTimes(buffer, env.stream);  // nothing left from earlier calls
  for (int it = 0; it < env.loop.warmup + env.loop.iters; ++it) {
    op();
    std::vector<uint64_t> stamps = diagnostics::takeStageTimes(buffer, env.stream);
    if (it >= env.loop.warmup) samples.add(stamps);
    if (after) {
      after();
      (void)diagnostics::takeStageTimes(buffer, env.stream);
    }
  }
  return samples.table(env.ranks, name, env.loop.iters);
}

std::string smsLabel(int sms) {
  return sms == kAuto ? std::string("default SMs") : std::to_string(sms) + " SMs";
}

void llCases(const CaseEnv& env, EpBuffer& buffer, int hidden, int max_tokens,
             std::vector<StageTable>& out) {
  if (max_tokens <= 0) return;
  // Expert outputs for combine, [local experts, ranks * max_tokens, hidden] BF16.
  const size_t rows = static_cast<size_t>(buffer.numLocalExperts()) * env.ranks.size * max_tokens;
  DeviceMemory expert_out(rows * bf16RowBytes(hidden));
  fillRandomBf16(expert_out.get(), rows * hidden,
                 seedFor(env.work.seed, {static_cast<uint64_t>(env.ranks.rank), 21}), env.stream);
  for (int tokens : unique({1, std::min(128, max_tokens)})) {
    const uint64_t seed = seedFor(
        env.work.seed, {static_cast<uint64_t>(env.ranks.rank), 22, static_cast<uint64_t>(tokens)});
    const Routing routing = makeRouting(env.work, env.ranks.size, tokens, seed);
    DeviceMemory idx = upload(routing.idx);
    DeviceMemory weights = upload(routing.weights);
    DeviceMemory x(std::max<size_t>(static_cast<size_t>(tokens) * hidden * 2, 16));
    fillRandomBf16(x.get(), static_cast<size_t>(tokens) * hidden, seedFor(seed, {1}), env.stream);
    DeviceMemory y(std::max<size_t>(static_cast<size_t>(tokens) * hidden * 2, 16));
    EPCOMM_CUDA_CHECK(cudaStreamSynchronize(env.stream));
    for (int sms : {static_cast<int>(kAuto), kLlCaseSms}) {
      LlDispatchArgs d;
      d.x = x.get();
      d.num_tokens = tokens;
      d.topk = TopkView{idx.get(), IndexType::kInt64, tokens, env.work.topk};
      d.topk_weights = weights.as<float>();
      d.num_sms = sms;
      LlCombineArgs c;
      c.x = expert_out.get();
      c.out = y.get();
      c.num_sms = sms;
      const std::string what = std::to_string(tokens) + " tokens, " + smsLabel(sms);
      // Each dispatch needs its combine: the combine runs after the dispatch's stamps are read.
      out.push_back(runOp(
          env, buffer, "LL dispatch, " + what, {StageKernel::kLlDispatch},
          [&] { buffer.lowLatencyDispatch(d, env.stream); },
          [&] { buffer.lowLatencyCombine(c, env.stream); }));
      out.push_back(runOp(env, buffer, "LL combine, " + what, {StageKernel::kLlCombine}, [&] {
        buffer.lowLatencyDispatch(d, env.stream);
        (void)diagnostics::takeStageTimes(buffer, env.stream);
        buffer.lowLatencyCombine(c, env.stream);
      }));
      // DeepEP's form: combine-time weights, pushed to the expert ranks first.
      LlCombineArgs cw = c;
      cw.topk_weights = weights.as<float>();
      out.push_back(
          runOp(env, buffer, "LL combine (weights), " + what, {StageKernel::kLlCombine}, [&] {
            buffer.lowLatencyDispatch(d, env.stream);
            (void)diagnostics::takeStageTimes(buffer, env.stream);
            buffer.lowLatencyCombine(cw, env.stream);
          }));
    }
  }
}

void htCases(const CaseEnv& env, EpBuffer& buffer, int hidden, int max_tokens, int sms,
             std::vector<StageTable>& out) {
  if (max_tokens <= 0) return;
  for (int tokens : unique({0, std::min(4096, max_tokens)})) {
    const int rows = std::max(tokens, 1);  // valid (unused at 0 tokens) pointers
    const uint64_t seed = seedFor(
        env.work.seed, {static_cast<uint64_t>(env.ranks.rank), 23, static_cast<uint64_t>(tokens)});
    const Routing routing = makeRouting(env.work, env.ranks.size, rows, seed);
    DeviceMemory idx = upload(routing.idx);
    DeviceMemory weights = upload(routing.weights);
    DeviceMemory x(static_cast<size_t>(rows) * hidden * 2);
    fillRandomBf16(x.get(), static_cast<size_t>(rows) * hidden, seedFor(seed, {1}), env.stream);
    DeviceMemory y(static_cast<size_t>(rows) * hidden * 2);
    EPCOMM_CUDA_CHECK(cudaStreamSynchronize(env.stream));
    EpHandle handle = buffer.createHandle();
    DispatchArgs d;
    d.dtype = DType::kBF16;
    d.num_tokens = rows;
    d.x = x.get();
    d.topk = TopkView{idx.get(), IndexType::kInt64, rows, env.work.topk};
    d.topk_weights = weights.as<float>();
    d.num_sms = sms;
    // The zero-copy combine input (a region of the buffer) from a first, untimed dispatch.
    const DispatchResult first = buffer.dispatch(d, handle, env.stream);
    CombineArgs c;
    c.x = first.combine_input;
    c.scale_weights = weights.as<float>();
    c.out = y.get();
    c.num_sms = sms;
    buffer.combine(c, handle, env.stream);
    buffer.sync(env.stream);
    d.num_tokens = tokens;
    d.topk.num_tokens = tokens;
    const std::string what = std::to_string(tokens) + " tokens, " + smsLabel(sms);
    out.push_back(runOp(
        env, buffer, "HT dispatch (with layout), " + what,
        {StageKernel::kLayout, StageKernel::kHtDispatch},
        [&] { buffer.dispatch(d, handle, env.stream); },
        [&] { buffer.combine(c, handle, env.stream); }));
    out.push_back(runOp(env, buffer, "HT combine, " + what, {StageKernel::kHtCombine}, [&] {
      buffer.dispatch(d, handle, env.stream);
      (void)diagnostics::takeStageTimes(buffer, env.stream);
      buffer.combine(c, handle, env.stream);
    }));
  }
}

std::string us(double v) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f", v);
  return text;
}

}  // namespace

std::vector<StageTable> measureStageTimes(const CaseEnv& env, EpBuffer& buffer, int hidden,
                                          int ht_max_tokens, int ll_max_tokens, int ht_sms) {
  std::vector<StageTable> out;
  progress(env.ranks, "stage times");
  llCases(env, buffer, hidden, ll_max_tokens, out);
  htCases(env, buffer, hidden, ht_max_tokens, ht_sms, out);
  return out;
}

void printStageTimes(const std::vector<StageTable>& tables) {
  if (tables.empty()) return;
  std::printf(
      "\nStage times (EPCOMM_STAGE_TIMES=1, eager calls; us since the kernel's start: median and "
      "mean over the calls, each the max over ranks; delta = median minus the previous stage's; "
      "a kernel's own row: its start after the op's first kernel's start; min rank = the "
      "median of the rank with the smallest)\n");
  for (const StageTable& t : tables) {
    std::printf("\n%s (%d calls)\n", t.op.c_str(), t.iterations);
    std::printf("  %-34s %10s %10s %10s %10s\n", "kernel / stage", "median", "mean", "delta",
                "min rank");
    for (const StageRow& r : t.rows) {
      const std::string min_rank = r.reached && r.min_rank_us >= 0 ? us(r.min_rank_us) : "-";
      if (r.kernel_row) {
        std::printf("  %-34s %10s %10s %10s %10s\n", r.kernel.c_str(),
                    r.reached ? us(r.median_us).c_str() : "-",
                    r.reached ? us(r.mean_us).c_str() : "-", "", min_rank.c_str());
        continue;
      }
      std::printf("    %-32s %10s %10s %10s %10s\n", r.stage.c_str(),
                  r.reached ? us(r.median_us).c_str() : "-",
                  r.reached ? us(r.mean_us).c_str() : "-", r.reached ? us(r.delta_us).c_str() : "-",
                  min_rank.c_str());
    }
  }
  std::fflush(stdout);
}

nlohmann::ordered_json stageTimesJson(const std::vector<StageTable>& tables) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (const StageTable& t : tables) {
    nlohmann::ordered_json rows = nlohmann::ordered_json::array();
    for (const StageRow& r : t.rows) {
      nlohmann::ordered_json row{{"kernel", r.kernel}, {"stage", r.kernel_row ? "" : r.stage}};
      row["reached"] = r.reached;
      if (r.reached) {
        row["median_us"] = r.median_us;
        if (r.min_rank_us >= 0) row["median_us_min_rank"] = r.min_rank_us;
        row["mean_us"] = r.mean_us;
        if (!r.kernel_row) row["delta_us"] = r.delta_us;
      }
      rows.push_back(row);
    }
    out.push_back({{"op", t.op}, {"iterations", t.iterations}, {"stages", rows}});
  }
  return out;
}

}  // namespace epcomm::bench
