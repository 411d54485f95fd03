// SPDX-License-Identifier: Apache-2.0
// ep_bench: latency and bandwidth of epcomm's dispatch and combine, measured against this
// machine's link limit and against NCCL moving the same bytes, in one run.
//
// Launch one rank per GPU under mpirun (scripts/bench.sh does it); every rank runs every op,
// rank 0 prints. docs/benchmarks.md defines every number printed here.
//
// Collective discipline: every rank must issue the same epcomm ops, NCCL calls and MPI
// reductions in the same order. Nothing branches on the rank except printing; every value that
// steers control flow (set counts, SM limits, byte presence) is reduced over ranks first.
//
// The modules: options (command line), machine (GPU facts, buffers, link limit, setup block),
// cases (HT and LL rows; ht_case.cpp, ll_case.cpp), timing, traffic (routing and bytes), results
// (rows, printed as they finish), targets, bench_report (tables and JSON), link_bench (CUDA),
// nccl_baseline.
#include <cuda_runtime_api.h>
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench_report.hpp"
#include "cases.hpp"
#include "epcomm/epcomm.hpp"
#include "epcomm/mpi_bootstrap.hpp"
#include "fixed_cost.hpp"
#include "link_bench.hpp"
#include "machine.hpp"
#include "nccl_baseline.hpp"
#include "options.hpp"
#include "ranks.hpp"
#include "results.hpp"
#include "scale_out_rows.hpp"
#include "stage_times.hpp"
#include "targets.hpp"

namespace epcomm::bench {
namespace {

constexpr int kExitNoGpu = 2;
constexpr size_t kScratchBytes = size_t{256} << 20;

// The HT cases: token counts on the main buffer (--tokens first, then --sweep-tokens), and the
// other hidden sizes, one buffer each.
struct CasePlan {
  std::vector<int> tokens;
  std::vector<int> other_hidden;
  int max_tokens = 0;
};

CasePlan planCases(const Options& o) {
  CasePlan plan;
  std::vector<int> tokens{o.tokens};
  tokens.insert(tokens.end(), o.sweep_tokens.begin(), o.sweep_tokens.end());
  plan.tokens = unique(tokens);
  for (int h : unique(o.sweep_hidden)) {
    if (h != o.hidden) plan.other_hidden.push_back(h);
  }
  plan.max_tokens = *std::max_element(plan.tokens.begin(), plan.tokens.end());
  return plan;
}

// The LL cases at --ll-tokens and at 1 token, on the main buffer.
void runLlCases(const CaseEnv& env, EpBuffer& buffer, const Options& o, const Machine& machine,
                int& case_id) {
  // Expert outputs for LL combine, [local experts, ranks * LL tokens, hidden] BF16.
  const size_t rows = static_cast<size_t>(buffer.numLocalExperts()) * env.ranks.size * o.ll_tokens;
  DeviceMemory expert_out(rows * bf16RowBytes(o.hidden));
  fillRandomBf16(expert_out.get(), rows * o.hidden,
                 seedFor(o.seed, {static_cast<uint64_t>(env.ranks.rank), 5}), env.stream);
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(env.stream));
  // The buffer's default budget first (the LL targets read the first LL row of a token count),
  // then the SM sweep at --ll-tokens that chose the default (issue 11 item 6): 16, 24, 32 and
  // every SM, each capped at the device's SM count, the default's value not repeated.
  const int configured = buffer.config().config.ll_num_sms;
  const int default_sms = configured != kAuto ? configured : machine.device_sms;
  for (int tokens : unique({o.ll_tokens, 1})) {
    runLlCase(env, buffer,
              LlCaseSpec{tokens, o.hidden, default_sms, kAuto, &expert_out, case_id++});
  }
  std::vector<int> sweep;
  for (int sms : {16, 24, 32, machine.device_sms})
    sweep.push_back(std::min(sms, machine.device_sms));
  for (int sms : unique(sweep)) {
    if (sms == default_sms) continue;
    runLlCase(env, buffer, LlCaseSpec{o.ll_tokens, o.hidden, sms, sms, &expert_out, case_id++});
  }
}

// What the final report prints besides the rows.
struct Report {
  Setup setup;
  LinkResult link;
  std::vector<OpSweep> fixed_cost;
  std::vector<StageTable> stage_times;  // --stage-times
};

// The values of `values` that are <= `max`, in order.
std::vector<int> atMost(const std::vector<int>& values, int max) {
  std::vector<int> out;
  for (int v : values) {
    if (v <= max) out.push_back(v);
  }
  return out;
}

// Rank 0: the final table, the targets and the JSON. Returns the exit code.
int finish(const Options& o, const Ranks& ranks, const Report& report, const RowRecorder& rows) {
  std::vector<Target> targets = evaluateTargets(
      rows.rows(), TargetCase{o.tokens, o.hidden, o.sms.front(), o.ll_tokens, o.ll});
  if (o.fixed_cost) {
    const std::vector<Target> fixed = fixedCostTargets(report.fixed_cost);
    targets.insert(targets.end(), fixed.begin(), fixed.end());
  }
  if (!ranks.root()) return 0;
  printTable(rows.rows());
  printSmBudgets(rows.rows());
  printTargets(targets);
  printFixedCost(report.fixed_cost);
  printStageTimes(report.stage_times);
  std::printf(
      "logical GB/s = received rows (self included) x row bytes / time; link GB/s = rows "
      "crossing to or from other ranks x row bytes / time; link %% = link GB/s / link limit; "
      "vs NCCL = NCCL median / epcomm median (same per-peer bytes). Top-k metadata is not "
      "counted. See docs/benchmarks.md.\n");
  std::fflush(stdout);
  if (o.json.empty()) return 0;
  const std::string error =
      writeJson(o.json, optionsJson(o), report.setup, report.link.rows, report.link.limit_gbps,
                rows.rows(), targets, fixedCostJson(report.fixed_cost),
                o.stage_times ? stageTimesJson(report.stage_times) : nlohmann::ordered_json());
  if (!error.empty()) {
    std::fprintf(stderr, "ep_bench: error: %s\n", error.c_str());
    return 1;
  }
  std::fprintf(stderr, "ep_bench: wrote %s\n", o.json.c_str());
  return 0;
}

int run(const Options& o, const Ranks& ranks) {
  MpiBootstrap bootstrap(ranks.comm);
  Machine machine = probeMachine(ranks, bootstrap);
  const std::string problem = machineProblem(o, ranks, machine);
  if (!problem.empty()) {
    if (ranks.root()) std::fprintf(stderr, "ep_bench: error: %s\n", problem.c_str());
    return 1;
  }
  // Several nodes (EPCOMM_HOSTID per rank, or hosts): the hierarchical rows of their own.
  const core::Topology topology = core::discoverTopology(bootstrap, core::localNodeKey());
  if (topology.num_nodes > 1) return runScaleOutRows(o, ranks, bootstrap, machine, topology);
  countRanksPerGpu(ranks, machine);

  const OwnedStream stream = OwnedStream::create();
  NcclBaseline nccl(ranks.comm, o.nccl && !machine.sharedGpus(),
                    !o.nccl ? "disabled (--no-nccl)" : "not used: several ranks share a GPU");
  const Workload work{o.topk, o.experts, o.skew, o.seed};
  RowRecorder rows(ranks, work);
  const CaseEnv env{
      ranks, work, Iterations{o.warmup, o.iters}, machine.l2_bytes, o.graph, stream.get(),
      nccl,  rows};
  BufferConfig base;
  base.device = machine.device;
  base.num_experts = o.experts;
  base.max_topk = o.topk;
  base.mem_mode = parseMemMode(o.mem_mode, "--mem-mode");
  const CasePlan plan = planCases(o);
  if (o.expert_major) {
    // One row per (token, local expert) with alignment 1: at most min(topk, local experts) per
    // token and rank (DispatchArgs::expert_major, BufferConfig::ht_recv_rows).
    base.ht_recv_rows = int64_t{ranks.size} * std::max(plan.max_tokens, o.tokens) *
                        std::min(o.topk, o.experts / ranks.size);
  }

  Report report;
  int case_id = 0;
  {
    const BufferShape shape{o.hidden, plan.max_tokens, o.ll ? o.ll_tokens : 0, kScratchBytes};
    const BufferBuild main = createBuffer(ranks, bootstrap, base, shape);
    EpBuffer& buffer = *main.buffer;
    // Printed before the measurements so a hang later still shows the machine.
    report.setup = describeSetup(o, ranks, machine, buffer, main, shape, nccl.status());
    if (ranks.root()) printSetup(report.setup);
    report.link = measureLink(ranks, machine, buffer, o.sms, o.quick, o.link_bulk, stream.get());
    rows.setLinkLimit(report.link.limit_gbps);
    if (ranks.root()) printLinkTable(report.link.rows, report.link.note);
    std::fflush(stdout);
    for (int tokens : plan.tokens) {
      // The SM-budget sweep on the main case only (--sweep-tokens rows use the first budget).
      const bool main_case = tokens == o.tokens;
      runHtCase(env, buffer,
                HtCaseSpec{tokens, o.hidden, main_case ? o.sms : std::vector<int>{o.sms.front()},
                           main_case, case_id++, o.expert_major});
    }
    if (o.ll) runLlCases(env, buffer, o, machine, case_id);
    if (o.fixed_cost) {
      report.fixed_cost =
          measureFixedCost(env, buffer, o.hidden, atMost(o.fit_tokens, plan.max_tokens),
                           o.ll ? atMost(o.fit_ll_tokens, o.ll_tokens) : std::vector<int>{});
    }
  }  // the main buffer is destroyed (collectively) before the next one is created

  // The same sweep on one buffer per EPCOMM_PERF variant (read when a buffer is created).
  if (o.fixed_cost && !o.perf_variants.empty()) {
    const char* previous = std::getenv("EPCOMM_PERF");
    const std::string saved = previous != nullptr ? previous : "";
    for (const std::string& variant : o.perf_variants) {
      // '+' joins names inside one variant (',' separates the variants on the command line).
      // "off": every fast path off (EPCOMM_PERF=none), the paths the fast ones replace.
      std::string value = variant == "off" ? "none" : variant;
      std::replace(value.begin(), value.end(), '+', ',');
      setenv("EPCOMM_PERF", value.c_str(), 1);
      const BufferBuild b = createBuffer(
          ranks, bootstrap, base,
          BufferShape{o.hidden, plan.max_tokens, o.ll ? o.ll_tokens : 0, kScratchBytes});
      std::vector<OpSweep> sweeps =
          measureFixedCost(env, *b.buffer, o.hidden, atMost(o.fit_tokens, plan.max_tokens),
                           o.ll ? atMost(o.fit_ll_tokens, o.ll_tokens) : std::vector<int>{});
      for (OpSweep& s : sweeps) {
        s.op += " [" + variant + "]";
        report.fixed_cost.push_back(std::move(s));
      }
    }
    setenv("EPCOMM_PERF", saved.c_str(), 1);
  }

  // Stage times (EPCOMM_STAGE_TIMES, read when a buffer is created) on a buffer of their own, so
  // that the stamps never slow the rows above.
  if (o.stage_times) {
    const char* previous = std::getenv("EPCOMM_STAGE_TIMES");
    const std::string saved = previous != nullptr ? previous : "";
    setenv("EPCOMM_STAGE_TIMES", "1", 1);
    const BufferBuild b =
        createBuffer(ranks, bootstrap, base,
                     BufferShape{o.hidden, plan.max_tokens, o.ll ? o.ll_tokens : 0, kScratchBytes});
    setenv("EPCOMM_STAGE_TIMES", saved.c_str(), 1);
    report.stage_times = measureStageTimes(env, *b.buffer, o.hidden, plan.max_tokens,
                                           o.ll ? o.ll_tokens : 0, o.sms.front());
  }

  for (int hidden : plan.other_hidden) {
    const BufferBuild b = createBuffer(ranks, bootstrap, base, BufferShape{hidden, o.tokens, 0, 0});
    runHtCase(env, *b.buffer,
              HtCaseSpec{o.tokens, hidden, {o.sms.front()}, false, case_id++, o.expert_major});
  }
  return finish(o, ranks, report, rows);
}

// Every rank checks for a GPU; returns the reason when some rank has none ("" when all have one).
std::string missingGpu(const Ranks& ranks) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  std::string reason;
  if (status != cudaSuccess) {
    reason = std::string("cudaGetDeviceCount failed with ") + cudaGetErrorName(status) + " (" +
             cudaGetErrorString(status) + ")";
  } else if (count == 0) {
    reason = "cudaGetDeviceCount reports 0 devices";
  }
  int has_gpu = reason.empty() ? 1 : 0;
  int all_have_gpu = 0;
  if (MPI_Allreduce(&has_gpu, &all_have_gpu, 1, MPI_INT, MPI_MIN, ranks.comm) != MPI_SUCCESS) {
    std::fprintf(stderr, "ep_bench: MPI_Allreduce failed\n");
    MPI_Abort(ranks.comm, 1);
  }
  if (all_have_gpu == 0 && reason.empty()) reason = "another rank sees no CUDA device";
  return all_have_gpu == 0 ? reason : std::string();
}

}  // namespace
}  // namespace epcomm::bench

int main(int argc, char** argv) {
  using namespace epcomm::bench;
  CLI::App app{
      "ep_bench: epcomm dispatch/combine latency and bandwidth, against the link limit "
      "and NCCL"};
  Options options;
  defineOptions(app, options);
  try {
    app.parse(argc, argv);
    validateOptions(app, options);
  } catch (const CLI::ParseError& e) {
    // Every rank exits with the same code; only the first prints.
    return launcherRankIsZero() ? app.exit(e) : e.get_exit_code();
  }

  if (MPI_Init(&argc, &argv) != MPI_SUCCESS) {
    std::fprintf(stderr, "ep_bench: MPI_Init failed\n");
    return 1;
  }
  Ranks ranks;
  if (MPI_Comm_rank(MPI_COMM_WORLD, &ranks.rank) != MPI_SUCCESS ||
      MPI_Comm_size(MPI_COMM_WORLD, &ranks.size) != MPI_SUCCESS) {
    std::fprintf(stderr, "ep_bench: MPI_Comm_rank/MPI_Comm_size failed\n");
    MPI_Abort(MPI_COMM_WORLD, 1);
  }

  // No GPU: a clear line from every rank and exit code 2 (CI builds ep_bench but never runs it).
  const std::string no_gpu = missingGpu(ranks);
  if (!no_gpu.empty()) {
    std::printf("ep_bench needs one NVIDIA GPU per rank; none is visible: %s (rank %d of %d)\n",
                no_gpu.c_str(), ranks.rank, ranks.size);
    std::fflush(stdout);
    MPI_Finalize();
    return kExitNoGpu;
  }

  int rc = 1;
  try {
    rc = run(options, ranks);
  } catch (const std::exception& e) {
    // Peers may be waiting in a collective op; abort the job rather than leave them hanging.
    std::fprintf(stderr, "ep_bench: rank %d: error: %s\n", ranks.rank, e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return rc;
}
