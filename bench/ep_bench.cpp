// ep_bench: latency and bandwidth of epcomm's dispatch and combine, measured against this
// machine's link limit and against NCCL moving the same bytes, in one run.
//
// Launch one rank per GPU under mpirun (scripts/bench.sh does it); every rank runs every op,
// rank 0 prints. docs/benchmarks.md defines every number printed here.
//
// Collective discipline: every rank must issue the same epcomm ops, NCCL calls and MPI
// reductions in the same order. Nothing below branches on the rank except printing; every value
// that steers control flow (set counts, SM limits, byte presence) is reduced over ranks first.
#include <cuda_runtime_api.h>
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "bench_report.hpp"
#include "epcomm/epcomm.hpp"
#include "epcomm/mpi_bootstrap.hpp"
#include "link_bench.hpp"
#include "nccl_baseline.hpp"

namespace epcomm::bench {
namespace {

constexpr int kExitNoGpu = 2;
constexpr int kMinIters = 50;
constexpr int kQuickIters = 10;
constexpr int kQuickWarmup = 2;
// Input sets rotated per size: at least kMinInputSets, and enough that their BF16 inputs
// together exceed twice the L2, so a small case is not served from cache.
constexpr int kMinInputSets = 3;
constexpr int kMaxInputSets = 32;
constexpr int kCopyInBuffers = 3;
constexpr size_t kScratchBytes = size_t{256} << 20;
constexpr size_t kLinkBytesPerRank = size_t{128} << 20;
constexpr size_t kQuickLinkBytesPerRank = size_t{32} << 20;
constexpr int kLinkReps = 20;
constexpr int kQuickLinkReps = 5;
constexpr int kLinkWarmup = 3;
constexpr int kNameBytes = 256;

// Targets of docs/benchmarks.md, checked on the main case (--tokens, --hidden, first --sms).
constexpr double kTargetDispatchLinkPct = 90.0;
constexpr double kTargetCombineLinkPct = 85.0;
constexpr double kTargetFp8Ratio = 0.55;
constexpr double kTargetVsNccl = 1.5;
constexpr double kTargetZeroTokenUs = 15.0;
constexpr double kTargetLlUs = 12.0;
constexpr double kTargetLlOneTokenUs = 8.0;

struct Options {
  int tokens = 4096;
  int hidden = 7168;
  int topk = 8;
  int experts = 256;
  double skew = 0.0;
  std::vector<int> sms{32};
  int iters = 50;
  int warmup = 10;
  bool graph = true;
  bool ll = true;
  int ll_tokens = 128;
  uint64_t seed = 1;
  std::string json;
  std::string mem_mode = "auto";
  std::vector<int> sweep_tokens;
  std::vector<int> sweep_hidden;
  bool quick = false;
  bool nccl = true;
};

// --- Small helpers -------------------------------------------------------------------------------

// Before MPI_Init the rank is only known from the launcher's environment; used so that --help
// and command-line errors are printed once, not once per rank.
bool launcherRankIsZero() {
  for (const char* name :
       {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID", "MV2_COMM_WORLD_RANK"}) {
    if (const char* value = std::getenv(name)) return std::strcmp(value, "0") == 0;
  }
  return true;
}

uint64_t mixSeed(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A seed for one purpose (rank, case, set, tensor), derived from --seed.
uint64_t seedFor(uint64_t base, std::initializer_list<uint64_t> parts) {
  uint64_t s = mixSeed(base);
  for (uint64_t p : parts) s = mixSeed(s ^ p);
  return s;
}

std::string fixed(double value, int digits) {
  std::ostringstream os;
  os.setf(std::ios::fixed);
  os.precision(digits);
  os << value;
  return os.str();
}

std::string gib(double bytes) {
  return fixed(bytes / (1024.0 * 1024.0 * 1024.0), 2) + " GiB";
}

std::vector<int> unique(const std::vector<int>& values) {
  std::vector<int> out;
  for (int v : values) {
    if (std::find(out.begin(), out.end(), v) == out.end()) out.push_back(v);
  }
  return out;
}

// --- Command line --------------------------------------------------------------------------------

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
  app.add_option("--sms", o.sms, "SM budget of the HT ops: one value or a comma-separated sweep")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--iters", o.iters, "Timed iterations per row (>= 50 unless --quick)")
      ->capture_default_str();
  app.add_option("--warmup", o.warmup, "Untimed warm-up iterations before each row")
      ->capture_default_str();
  app.add_flag("--graph,!--no-graph", o.graph, "CUDA-graph replay rows (default on)");
  app.add_flag("--ll,!--no-ll", o.ll, "Low-latency rows (default on)");
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
               "reporting)");
  app.add_flag("--nccl,!--no-nccl", o.nccl, "NCCL baseline (default on when built with NCCL)");
  app.footer(
      "Run under mpirun with one rank per GPU (scripts/bench.sh). Definitions of every column: "
      "docs/benchmarks.md.");
}

void require(bool ok, const char* option, const std::string& message) {
  if (!ok) throw CLI::ValidationError(option, message);
}

// Checks what does not depend on the machine; the rank count and SM count are checked later.
void validateOptions(const CLI::App& app, Options& o) {
  if (o.quick) {
    if (app.get_option("--iters")->count() == 0) o.iters = kQuickIters;
    if (app.get_option("--warmup")->count() == 0) o.warmup = kQuickWarmup;
  }
  require(o.iters >= 1, "--iters", "must be >= 1");
  require(o.quick || o.iters >= kMinIters, "--iters",
          "must be >= " + std::to_string(kMinIters) + " (use --quick for smoke tests)");
  require(o.warmup >= 0, "--warmup", "must be >= 0");
  auto check_tokens = [](int t, const char* option) {
    require(t >= 1 && t <= kMaxTokensPerRank, option,
            "must be in [1, " + std::to_string(kMaxTokensPerRank) + "]");
  };
  auto check_hidden = [](int h, const char* option) {
    require(h >= kHiddenAlignment && h <= kMaxHidden && h % kHiddenAlignment == 0, option,
            "must be a multiple of " + std::to_string(kHiddenAlignment) + " in [" +
                std::to_string(kHiddenAlignment) + ", " + std::to_string(kMaxHidden) + "]");
  };
  check_tokens(o.tokens, "--tokens");
  for (int t : o.sweep_tokens) check_tokens(t, "--sweep-tokens");
  check_hidden(o.hidden, "--hidden");
  for (int h : o.sweep_hidden) check_hidden(h, "--sweep-hidden");
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
          {"ll", o.ll},
          {"ll_tokens", o.ll_tokens},
          {"seed", o.seed},
          {"mem_mode", o.mem_mode},
          {"sweep_tokens", o.sweep_tokens},
          {"sweep_hidden", o.sweep_hidden},
          {"quick", o.quick},
          {"nccl", o.nccl}};
}

// --- Run context and reductions ------------------------------------------------------------------

struct Context {
  Options opt;
  MPI_Comm comm = MPI_COMM_WORLD;
  int rank = 0;
  int size = 1;
  int device = 0;
  int device_sms = 0;   // min over ranks
  size_t l2_bytes = 0;  // max over ranks
  cudaStream_t stream = nullptr;
  NcclBaseline* nccl = nullptr;
  std::optional<double> link_limit_gbps;
  std::vector<Row> rows;

  bool root() const { return rank == 0; }
  void progress(const std::string& what) const {
    if (root()) {
      std::fprintf(stderr, "ep_bench: %s\n", what.c_str());
      std::fflush(stderr);
    }
  }
};

double allReduce(double value, MPI_Op op, MPI_Comm comm) {
  double out = 0;
  EPCOMM_BENCH_MPI_CHECK(MPI_Allreduce(&value, &out, 1, MPI_DOUBLE, op, comm));
  return out;
}
double allMax(const Context& c, double v) {
  return allReduce(v, MPI_MAX, c.comm);
}
double allMin(const Context& c, double v) {
  return allReduce(v, MPI_MIN, c.comm);
}

// Each rank's statistic, maximum over ranks.
Stats reduceStats(const Context& c, const Stats& s) {
  return Stats{allMax(c, s.med_us), allMax(c, s.min_us), allMax(c, s.max_us)};
}

// --- Routing and inputs --------------------------------------------------------------------------

// Per-rank routing of one input set (host side): top-k picks and the tokens sent to each rank.
struct Routing {
  std::vector<int64_t> idx;      // [tokens, topk], distinct experts per token
  std::vector<float> weights;    // [tokens, topk]
  std::vector<int> dest_tokens;  // [ranks] tokens of this rank with >= 1 expert on that rank
};

Routing makeRouting(const Context& c, int tokens, uint64_t seed) {
  const Options& o = c.opt;
  const int per_rank = o.experts / c.size;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> any_expert(0, o.experts - 1);
  std::uniform_int_distribution<int> rank0_expert(0, per_rank - 1);
  std::uniform_real_distribution<double> coin(0.0, 1.0);
  std::uniform_real_distribution<float> weight(0.05f, 1.0f);
  Routing r;
  r.idx.resize(static_cast<size_t>(tokens) * o.topk);
  r.weights.resize(r.idx.size());
  r.dest_tokens.assign(static_cast<size_t>(c.size), 0);
  std::vector<char> taken(static_cast<size_t>(o.experts), 0);
  std::vector<char> to_rank(static_cast<size_t>(c.size), 0);
  for (int t = 0; t < tokens; ++t) {
    std::fill(taken.begin(), taken.end(), 0);
    std::fill(to_rank.begin(), to_rank.end(), 0);
    int taken_on_rank0 = 0;
    for (int k = 0; k < o.topk; ++k) {
      // With probability skew the pick comes from rank 0's experts (while any is left there);
      // otherwise uniformly from all experts. Rejection keeps the picks distinct.
      const bool skewed = o.skew > 0.0 && coin(rng) < o.skew && taken_on_rank0 < per_rank;
      int e = 0;
      do {
        e = skewed ? rank0_expert(rng) : any_expert(rng);
      } while (taken[static_cast<size_t>(e)]);
      taken[static_cast<size_t>(e)] = 1;
      if (e < per_rank) ++taken_on_rank0;
      const size_t i = static_cast<size_t>(t) * o.topk + k;
      r.idx[i] = e;
      r.weights[i] = weight(rng);
      to_rank[static_cast<size_t>(e / per_rank)] = 1;
    }
    for (int d = 0; d < c.size; ++d) r.dest_tokens[static_cast<size_t>(d)] += to_rank[d];
  }
  return r;
}

// Who sends how many rows to whom, for one input set: matrix[src * ranks + dst] rows (tokens
// src sends to dst; LL uses the same (token, destination rank) pairs).
struct Traffic {
  std::vector<int> matrix;
  int64_t recv_rows = 0;       // rows this rank receives, itself included
  int64_t peer_send_rows = 0;  // rows of this rank's tokens held by other ranks
};

Traffic gatherTraffic(const Context& c, const std::vector<int>& dest_tokens) {
  Traffic t;
  t.matrix.resize(static_cast<size_t>(c.size) * c.size);
  EPCOMM_BENCH_MPI_CHECK(
      MPI_Allgather(dest_tokens.data(), c.size, MPI_INT, t.matrix.data(), c.size, MPI_INT, c.comm));
  for (int s = 0; s < c.size; ++s)
    t.recv_rows += t.matrix[static_cast<size_t>(s) * c.size + c.rank];
  for (int d = 0; d < c.size; ++d) {
    if (d != c.rank) t.peer_send_rows += t.matrix[static_cast<size_t>(c.rank) * c.size + d];
  }
  return t;
}

// Forward exchange (dispatch): send[d] = my rows to d, recv[s] = s's rows to me. The backward
// exchange (combine) swaps the two.
Exchange makeExchange(const Context& c, const Traffic& t, size_t row_bytes, bool backward) {
  Exchange e;
  e.send_bytes.resize(static_cast<size_t>(c.size));
  e.recv_bytes.resize(static_cast<size_t>(c.size));
  for (int p = 0; p < c.size; ++p) {
    const size_t to_p = static_cast<size_t>(t.matrix[static_cast<size_t>(c.rank) * c.size + p]);
    const size_t from_p = static_cast<size_t>(t.matrix[static_cast<size_t>(p) * c.size + c.rank]);
    e.send_bytes[static_cast<size_t>(p)] = (backward ? from_p : to_p) * row_bytes;
    e.recv_bytes[static_cast<size_t>(p)] = (backward ? to_p : from_p) * row_bytes;
  }
  return e;
}

size_t bf16RowBytes(int hidden) {
  return static_cast<size_t>(hidden) * 2;
}
size_t fp8RowBytes(int hidden) {
  return static_cast<size_t>(hidden) + static_cast<size_t>(hidden / kFp8BlockSize) * 4;
}

int numInputSets(const Context& c, size_t bytes_per_set) {
  const size_t needed = (2 * c.l2_bytes + bytes_per_set - 1) / std::max<size_t>(bytes_per_set, 1);
  return static_cast<int>(
      std::clamp<size_t>(needed, kMinInputSets, static_cast<size_t>(kMaxInputSets)));
}

template <typename T>
DeviceBuffer upload(const std::vector<T>& host) {
  DeviceBuffer d(std::max<size_t>(host.size() * sizeof(T), 16));
  if (!host.empty()) {
    EPCOMM_BENCH_CUDA_CHECK(
        cudaMemcpy(d.get(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  return d;
}

// The mean over the timed iterations of a per-set value (iteration i uses set i % sets).
double meanOverTimed(const Context& c, const std::vector<double>& per_set) {
  double sum = 0;
  for (int i = 0; i < c.opt.iters; ++i) {
    sum += per_set[static_cast<size_t>(c.opt.warmup + i) % per_set.size()];
  }
  return sum / c.opt.iters;
}

// --- Timing --------------------------------------------------------------------------------------

// warmup + iters iterations of a body that brackets each timed op with start(op)/stop(op);
// iteration i uses input set i % sets. Events are recorded only in timed iterations.
class TimedLoop {
 public:
  TimedLoop(const Context& c, int ops) : c_(c) {
    for (int i = 0; i < ops; ++i) timers_.emplace_back(c.opt.iters);
  }
  template <typename Body>
  void run(EpBuffer& buffer, Body&& body) {
    for (it_ = 0; it_ < c_.opt.warmup + c_.opt.iters; ++it_) body(it_);
    buffer.sync(c_.stream);  // waits with the deadline and surfaces device-side errors
  }
  void start(int op) {
    if (it_ >= c_.opt.warmup)
      timers_[static_cast<size_t>(op)].start(it_ - c_.opt.warmup, c_.stream);
  }
  void stop(int op) {
    if (it_ >= c_.opt.warmup) timers_[static_cast<size_t>(op)].stop(it_ - c_.opt.warmup, c_.stream);
  }
  std::vector<float> samples(int op) const {
    return timers_[static_cast<size_t>(op)].microseconds(c_.opt.iters);
  }

 private:
  const Context& c_;
  std::vector<EventTimer> timers_;
  int it_ = 0;
};

// Per-call bytes of one rank, both definitions (docs/benchmarks.md).
struct Bytes {
  double logical = 0;
  double link = 0;
};

struct RowSpec {
  std::string op;
  std::string dtype;
  int tokens = 0;
  int hidden = 0;
  int sms = 0;
  int input_sets = 0;
};

// Collective: reduces this rank's samples and bytes over ranks and appends the row.
void addRow(Context& c, const RowSpec& spec, const std::vector<float>& samples,
            const std::optional<Bytes>& bytes, const std::optional<double>& nccl_med_us) {
  Row r;
  r.op = spec.op;
  r.dtype = spec.dtype;
  r.tokens = spec.tokens;
  r.hidden = spec.hidden;
  r.topk = c.opt.topk;
  r.experts = c.opt.experts;
  r.ranks = c.size;
  r.sms = spec.sms;
  r.input_sets = spec.input_sets;
  const Stats local = summarize(samples);
  r.time = reduceStats(c, local);
  if (bytes) {
    // GB/s per rank from its own bytes and median; the slowest rank is reported.
    const double med = std::max(local.med_us, 1e-3);
    r.logical_bytes_min = allMin(c, bytes->logical);
    r.logical_bytes_max = allMax(c, bytes->logical);
    r.link_bytes_min = allMin(c, bytes->link);
    r.link_bytes_max = allMax(c, bytes->link);
    if (*r.logical_bytes_max > 0) {
      r.logical_gbps = allMin(c, bytes->logical / med / 1e3);
      r.logical_gbps_max = allMax(c, bytes->logical / med / 1e3);
    }
    if (*r.link_bytes_max > 0) {
      r.link_gbps = allMin(c, bytes->link / med / 1e3);
      r.link_gbps_max = allMax(c, bytes->link / med / 1e3);
      if (c.link_limit_gbps && *c.link_limit_gbps > 0) {
        r.link_pct = *r.link_gbps / *c.link_limit_gbps * 100.0;
      }
    }
  }
  if (nccl_med_us && r.time.med_us > 0) {
    r.nccl_med_us = *nccl_med_us;
    r.vs_nccl = *nccl_med_us / r.time.med_us;
  }
  c.rows.push_back(r);
}

// Collective: the NCCL median (max over ranks) for the given per-set calls, if NCCL is in use.
std::optional<double> timeNccl(Context& c, const std::vector<ExchangeSequence>& calls) {
  if (!c.nccl->available()) return std::nullopt;
  const std::vector<float> samples = c.nccl->time(calls, c.opt.warmup, c.opt.iters, c.stream);
  return allMax(c, summarize(samples).med_us);
}

// Captures body() on the stream into an instantiated graph; ends the capture on failure.
template <typename Body>
GraphExec capture(cudaStream_t stream, Body&& body) {
  EPCOMM_BENCH_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  try {
    body();
  } catch (...) {
    cudaGraph_t graph = nullptr;
    if (cudaStreamEndCapture(stream, &graph) == cudaSuccess && graph != nullptr) {
      EPCOMM_BENCH_CUDA_LOG(cudaGraphDestroy(graph));
    }
    throw;
  }
  return endCaptureAndInstantiate(stream);
}

// --- HT rows -------------------------------------------------------------------------------------

struct HtSet {
  DeviceBuffer x_bf16;   // [tokens, hidden]
  DeviceBuffer x_fp8;    // [tokens, hidden]
  DeviceBuffer scales;   // [tokens, hidden / 128] float32
  DeviceBuffer idx;      // [tokens, topk] int64
  DeviceBuffer weights;  // [tokens, topk] float32
  std::vector<int> dest_tokens;
  Traffic traffic;
};

DispatchArgs dispatchArgs(const HtSet& in, int tokens, int topk, DType dtype, bool with_topk,
                          int sms) {
  DispatchArgs a;
  a.dtype = dtype;
  a.num_tokens = tokens;
  if (dtype == DType::kFP8E4M3) {
    a.x = in.x_fp8.get();
    a.x_scales = in.scales.as<float>();
  } else {
    a.x = in.x_bf16.get();
  }
  if (with_topk) {
    a.topk = TopkView{in.idx.get(), IndexType::kInt64, tokens, topk};
    a.topk_weights = in.weights.as<float>();
  }
  a.num_sms = sms;
  return a;
}

void runHtCase(Context& c, EpBuffer& buffer, int tokens, int hidden, bool main_case, int case_id) {
  const Options& o = c.opt;
  const int sets = numInputSets(c, static_cast<size_t>(tokens) * bf16RowBytes(hidden));
  c.progress("HT tokens=" + std::to_string(tokens) + " hidden=" + std::to_string(hidden) + " (" +
             std::to_string(sets) + " input sets)");
  cudaStream_t stream = c.stream;
  const size_t elems = static_cast<size_t>(tokens) * hidden;
  const size_t num_scales = static_cast<size_t>(tokens) * (hidden / kFp8BlockSize);

  std::vector<HtSet> in(static_cast<size_t>(sets));
  std::vector<EpHandle> handles;
  handles.reserve(static_cast<size_t>(sets));
  for (int s = 0; s < sets; ++s) {
    HtSet& set = in[static_cast<size_t>(s)];
    const uint64_t base =
        seedFor(o.seed, {static_cast<uint64_t>(c.rank), 1, static_cast<uint64_t>(case_id),
                         static_cast<uint64_t>(s)});
    Routing routing = makeRouting(c, tokens, base);
    set.idx = upload(routing.idx);
    set.weights = upload(routing.weights);
    set.dest_tokens = std::move(routing.dest_tokens);
    set.x_bf16 = DeviceBuffer(elems * 2);
    set.x_fp8 = DeviceBuffer(elems);
    set.scales = DeviceBuffer(num_scales * 4);
    fillRandomBf16(set.x_bf16.get(), elems, seedFor(base, {1}), stream);
    fillRandomFp8(set.x_fp8.get(), elems, seedFor(base, {2}), stream);
    fillRandomScales(set.scales.as<float>(), num_scales, seedFor(base, {3}), stream);
    set.traffic = gatherTraffic(c, set.dest_tokens);
    handles.push_back(buffer.createHandle());
  }

  // One exact-count dispatch per set: lays out every handle, and checks the library's counts
  // against the host routing, so the byte counts below are the bytes the op really moved.
  void* combine_input = nullptr;
  int64_t capacity = 0;
  int64_t max_recv = 0;
  std::vector<int32_t> device_counts(static_cast<size_t>(c.size));
  for (int s = 0; s < sets; ++s) {
    HtSet& set = in[static_cast<size_t>(s)];
    DispatchArgs a = dispatchArgs(set, tokens, o.topk, DType::kBF16, true, o.sms.front());
    a.exact_count = true;
    const DispatchResult result = buffer.dispatch(a, handles[static_cast<size_t>(s)], stream);
    EPCOMM_BENCH_CUDA_CHECK(
        cudaMemcpyAsync(device_counts.data(), handles[static_cast<size_t>(s)].numTokensPerRank(),
                        device_counts.size() * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
    buffer.sync(stream);
    for (int d = 0; d < c.size; ++d) {
      if (device_counts[static_cast<size_t>(d)] != set.dest_tokens[static_cast<size_t>(d)]) {
        throw Error(ErrorCode::kInternal,
                    "layout check failed on rank " + std::to_string(c.rank) + ", input set " +
                        std::to_string(s) + ": numTokensPerRank()[" + std::to_string(d) +
                        "] = " + std::to_string(device_counts[static_cast<size_t>(d)]) +
                        ", the host routing says " +
                        std::to_string(set.dest_tokens[static_cast<size_t>(d)]));
      }
    }
    if (result.num_recv_tokens_host != set.traffic.recv_rows) {
      throw Error(ErrorCode::kInternal,
                  "dispatch check failed on rank " + std::to_string(c.rank) + ", input set " +
                      std::to_string(s) +
                      ": num_recv_tokens_host = " + std::to_string(result.num_recv_tokens_host) +
                      ", the gathered routing says " + std::to_string(set.traffic.recv_rows));
    }
    combine_input = result.combine_input;
    capacity = result.capacity;
    max_recv = std::max(max_recv, set.traffic.recv_rows);
  }

  // Expert outputs: written once into the zero-copy combine input (every row, random non-zero),
  // and into separate buffers for the copy-in combine.
  fillRandomBf16(
      combine_input, static_cast<size_t>(capacity) * hidden,
      seedFor(o.seed, {static_cast<uint64_t>(c.rank), 2, static_cast<uint64_t>(case_id)}), stream);
  std::vector<DeviceBuffer> copy_in;
  for (int i = 0; i < kCopyInBuffers; ++i) {
    const size_t n = static_cast<size_t>(std::max<int64_t>(max_recv, 1)) * hidden;
    copy_in.emplace_back(n * 2);
    fillRandomBf16(copy_in.back().get(), n,
                   seedFor(o.seed, {static_cast<uint64_t>(c.rank), 3,
                                    static_cast<uint64_t>(case_id), static_cast<uint64_t>(i)}),
                   stream);
  }
  DeviceBuffer out(std::max<size_t>(elems * 2, 16));
  EPCOMM_BENCH_CUDA_CHECK(cudaStreamSynchronize(stream));

  // Bytes per set, then averaged the way the timed iterations visit the sets.
  std::vector<double> recv_rows(static_cast<size_t>(sets));
  std::vector<double> peer_rows(static_cast<size_t>(sets));
  for (int s = 0; s < sets; ++s) {
    recv_rows[static_cast<size_t>(s)] =
        static_cast<double>(in[static_cast<size_t>(s)].traffic.recv_rows);
    peer_rows[static_cast<size_t>(s)] =
        static_cast<double>(in[static_cast<size_t>(s)].traffic.peer_send_rows);
  }
  const double mean_recv = meanOverTimed(c, recv_rows);
  const double mean_peer = meanOverTimed(c, peer_rows);
  auto bytes = [&](size_t row_bytes, double factor) {
    return Bytes{mean_recv * row_bytes * factor, mean_peer * row_bytes * factor};
  };
  const Bytes bf16_bytes = bytes(bf16RowBytes(hidden), 1.0);
  const Bytes fp8_bytes = bytes(fp8RowBytes(hidden), 1.0);
  const Bytes round_trip_bytes = bytes(bf16RowBytes(hidden), 2.0);

  // NCCL moving the same per-peer bytes, per input set (independent of the SM budget).
  std::vector<ExchangeSequence> nccl_bf16, nccl_fp8, nccl_combine, nccl_round_trip;
  for (const HtSet& set : in) {
    const Exchange fwd = makeExchange(c, set.traffic, bf16RowBytes(hidden), false);
    const Exchange bwd = makeExchange(c, set.traffic, bf16RowBytes(hidden), true);
    nccl_bf16.push_back({fwd});
    nccl_fp8.push_back({makeExchange(c, set.traffic, fp8RowBytes(hidden), false)});
    nccl_combine.push_back({bwd});
    nccl_round_trip.push_back({fwd, bwd});
  }
  const std::optional<double> nccl_bf16_us = timeNccl(c, nccl_bf16);
  const std::optional<double> nccl_fp8_us = timeNccl(c, nccl_fp8);
  const std::optional<double> nccl_combine_us = timeNccl(c, nccl_combine);
  const std::optional<double> nccl_round_trip_us =
      o.graph ? timeNccl(c, nccl_round_trip) : std::nullopt;

  auto setOf = [sets](int it) { return static_cast<size_t>(it % sets); };

  {  // layout: local, no SM budget
    TimedLoop loop(c, 1);
    loop.run(buffer, [&](int it) {
      const HtSet& set = in[setOf(it)];
      loop.start(0);
      buffer.layout(TopkView{set.idx.get(), IndexType::kInt64, tokens, o.topk}, handles[setOf(it)],
                    stream);
      loop.stop(0);
    });
    addRow(c, {"layout", "-", tokens, hidden, 0, sets}, loop.samples(0), std::nullopt,
           std::nullopt);
  }

  for (int sms : o.sms) {
    const std::string sm_text = " sms=" + std::to_string(sms);
    for (bool cached : {false, true}) {
      for (DType dtype : {DType::kBF16, DType::kFP8E4M3}) {
        const bool fp8 = dtype == DType::kFP8E4M3;
        TimedLoop loop(c, 1);
        loop.run(buffer, [&](int it) {
          const DispatchArgs a = dispatchArgs(in[setOf(it)], tokens, o.topk, dtype, !cached, sms);
          loop.start(0);
          buffer.dispatch(a, handles[setOf(it)], stream);
          loop.stop(0);
        });
        addRow(c,
               {cached ? "dispatch (cached)" : "dispatch", fp8 ? "fp8" : "bf16", tokens, hidden,
                sms, sets},
               loop.samples(0), fp8 ? fp8_bytes : bf16_bytes, fp8 ? nccl_fp8_us : nccl_bf16_us);
      }
    }

    for (bool zero_copy : {true, false}) {
      // Each combine needs the matching dispatch (untimed, cached) just before it.
      TimedLoop loop(c, 1);
      loop.run(buffer, [&](int it) {
        const HtSet& set = in[setOf(it)];
        EpHandle& handle = handles[setOf(it)];
        buffer.dispatch(dispatchArgs(set, tokens, o.topk, DType::kBF16, false, sms), handle,
                        stream);
        CombineArgs a;
        a.x = zero_copy ? combine_input : copy_in[static_cast<size_t>(it % kCopyInBuffers)].get();
        a.topk_weights = set.weights.as<float>();
        a.out = out.get();
        a.num_sms = sms;
        loop.start(0);
        buffer.combine(a, handle, stream);
        loop.stop(0);
      });
      addRow(c, {zero_copy ? "combine" : "combine (copy-in)", "bf16", tokens, hidden, sms, sets},
             loop.samples(0), bf16_bytes, nccl_combine_us);
    }

    if (o.graph) {
      c.progress("  graph d+c" + sm_text);
      std::vector<GraphExec> graphs;
      for (int s = 0; s < sets; ++s) {
        const HtSet& set = in[static_cast<size_t>(s)];
        EpHandle& handle = handles[static_cast<size_t>(s)];
        graphs.push_back(capture(stream, [&] {
          buffer.dispatch(dispatchArgs(set, tokens, o.topk, DType::kBF16, false, sms), handle,
                          stream);
          CombineArgs a;
          a.x = combine_input;
          a.topk_weights = set.weights.as<float>();
          a.out = out.get();
          a.num_sms = sms;
          buffer.combine(a, handle, stream);
        }));
      }
      TimedLoop loop(c, 1);
      loop.run(buffer, [&](int it) {
        loop.start(0);
        graphs[setOf(it)].launch(stream);
        loop.stop(0);
      });
      addRow(c, {"graph d+c", "bf16", tokens, hidden, sms, sets}, loop.samples(0), round_trip_bytes,
             nccl_round_trip_us);
    }
  }

  if (main_case) {
    // The fixed cost of a round trip: dispatch (with its layout) and combine of 0 tokens.
    const int sms = o.sms.front();
    EpHandle handle = buffer.createHandle();
    // Valid (unused) pointers, so the call takes exactly the path of a normal dispatch.
    DispatchArgs d = dispatchArgs(in.front(), 0, o.topk, DType::kBF16, true, sms);
    CombineArgs cb;
    cb.x = combine_input;
    cb.out = out.get();
    cb.num_sms = sms;
    TimedLoop loop(c, 1);
    loop.run(buffer, [&](int) {
      loop.start(0);
      buffer.dispatch(d, handle, stream);
      buffer.combine(cb, handle, stream);
      loop.stop(0);
    });
    addRow(c, {"d+c 0 tokens", "bf16", 0, hidden, sms, 1}, loop.samples(0), std::nullopt,
           std::nullopt);
  }
}

// --- LL rows -------------------------------------------------------------------------------------

void runLlCase(Context& c, EpBuffer& buffer, int tokens, const DeviceBuffer& expert_out,
               int case_id) {
  const Options& o = c.opt;
  const int hidden = o.hidden;
  const int sets = numInputSets(c, static_cast<size_t>(tokens) * bf16RowBytes(hidden));
  c.progress("LL tokens=" + std::to_string(tokens) + " (" + std::to_string(sets) + " input sets)");
  cudaStream_t stream = c.stream;
  const int ll_sms =
      buffer.config().config.ll_num_sms != kAuto ? buffer.config().config.ll_num_sms : c.device_sms;
  struct LlSet {
    DeviceBuffer x;
    DeviceBuffer idx;
    DeviceBuffer weights;
    Traffic traffic;
  };
  std::vector<LlSet> in(static_cast<size_t>(sets));
  for (int s = 0; s < sets; ++s) {
    LlSet& set = in[static_cast<size_t>(s)];
    const uint64_t base =
        seedFor(o.seed, {static_cast<uint64_t>(c.rank), 4, static_cast<uint64_t>(case_id),
                         static_cast<uint64_t>(s)});
    Routing routing = makeRouting(c, tokens, base);
    set.idx = upload(routing.idx);
    set.weights = upload(routing.weights);
    set.x = DeviceBuffer(static_cast<size_t>(tokens) * hidden * 2);
    fillRandomBf16(set.x.get(), static_cast<size_t>(tokens) * hidden, seedFor(base, {1}), stream);
    // The LL kernel sends a token once per destination rank: the same pairs as HT's rows.
    set.traffic = gatherTraffic(c, routing.dest_tokens);
  }
  DeviceBuffer out(static_cast<size_t>(tokens) * hidden * 2);
  EPCOMM_BENCH_CUDA_CHECK(cudaStreamSynchronize(stream));
  auto setOf = [sets](int it) { return static_cast<size_t>(it % sets); };

  std::vector<double> recv_rows, peer_rows;
  std::vector<ExchangeSequence> nccl_bf16, nccl_fp8, nccl_combine, nccl_round_trip;
  for (const LlSet& set : in) {
    recv_rows.push_back(static_cast<double>(set.traffic.recv_rows));
    peer_rows.push_back(static_cast<double>(set.traffic.peer_send_rows));
    const Exchange fwd = makeExchange(c, set.traffic, bf16RowBytes(hidden), false);
    const Exchange bwd = makeExchange(c, set.traffic, bf16RowBytes(hidden), true);
    nccl_bf16.push_back({fwd});
    nccl_fp8.push_back({makeExchange(c, set.traffic, fp8RowBytes(hidden), false)});
    nccl_combine.push_back({bwd});
    nccl_round_trip.push_back({fwd, bwd});
  }
  const double mean_recv = meanOverTimed(c, recv_rows);
  const double mean_peer = meanOverTimed(c, peer_rows);
  auto bytes = [&](size_t row_bytes, double factor) {
    return Bytes{mean_recv * row_bytes * factor, mean_peer * row_bytes * factor};
  };
  const std::optional<double> nccl_bf16_us = timeNccl(c, nccl_bf16);
  const std::optional<double> nccl_fp8_us = timeNccl(c, nccl_fp8);
  const std::optional<double> nccl_combine_us = timeNccl(c, nccl_combine);
  const std::optional<double> nccl_round_trip_us =
      o.graph ? timeNccl(c, nccl_round_trip) : std::nullopt;

  auto dispatchArgsOf = [&](const LlSet& set, bool fp8) {
    LlDispatchArgs a;
    a.x = set.x.get();
    a.num_tokens = tokens;
    a.topk = TopkView{set.idx.get(), IndexType::kInt64, tokens, o.topk};
    a.topk_weights = set.weights.as<float>();
    a.use_fp8 = fp8;
    return a;
  };
  LlCombineArgs combine_args;
  combine_args.x = expert_out.get();
  combine_args.out = out.get();

  // LL dispatch and combine must alternate: each op gets its own events inside one loop. The
  // combine row comes from the BF16 loop (its work does not depend on the dispatch dtype).
  std::vector<float> combine_samples;
  for (bool fp8 : {false, true}) {
    TimedLoop loop(c, 2);
    loop.run(buffer, [&](int it) {
      const LlDispatchArgs a = dispatchArgsOf(in[setOf(it)], fp8);
      loop.start(0);
      buffer.lowLatencyDispatch(a, stream);
      loop.stop(0);
      loop.start(1);
      buffer.lowLatencyCombine(combine_args, stream);
      loop.stop(1);
    });
    addRow(c, {"ll dispatch", fp8 ? "fp8" : "bf16", tokens, hidden, ll_sms, sets}, loop.samples(0),
           bytes(fp8 ? fp8RowBytes(hidden) : bf16RowBytes(hidden), 1.0),
           fp8 ? nccl_fp8_us : nccl_bf16_us);
    if (!fp8) combine_samples = loop.samples(1);
  }
  addRow(c, {"ll combine", "bf16", tokens, hidden, ll_sms, sets}, combine_samples,
         bytes(bf16RowBytes(hidden), 1.0), nccl_combine_us);

  if (o.graph) {
    std::vector<GraphExec> graphs;
    for (int s = 0; s < sets; ++s) {
      const LlDispatchArgs a = dispatchArgsOf(in[static_cast<size_t>(s)], false);
      graphs.push_back(capture(stream, [&] {
        buffer.lowLatencyDispatch(a, stream);
        buffer.lowLatencyCombine(combine_args, stream);
      }));
    }
    TimedLoop loop(c, 1);
    loop.run(buffer, [&](int it) {
      loop.start(0);
      graphs[setOf(it)].launch(stream);
      loop.stop(0);
    });
    addRow(c, {"ll graph d+c", "bf16", tokens, hidden, ll_sms, sets}, loop.samples(0),
           bytes(bf16RowBytes(hidden), 2.0), nccl_round_trip_us);
  }
}

// --- Buffers, link limit, setup ------------------------------------------------------------------

struct BufferBuild {
  std::unique_ptr<EpBuffer> buffer;
  double create_ms_max = 0;
};

BufferBuild createBuffer(Context& c, Bootstrap& bootstrap, int hidden, int max_tokens,
                         int ll_tokens, size_t scratch_bytes) {
  BufferConfig cfg;
  cfg.device = c.device;
  cfg.hidden = hidden;
  cfg.num_experts = c.opt.experts;
  cfg.max_topk = c.opt.topk;
  cfg.max_tokens_per_rank = max_tokens;
  cfg.ll_max_tokens_per_rank = ll_tokens;
  cfg.mem_mode = parseMemMode(c.opt.mem_mode, "--mem-mode");
  cfg.scratch_bytes = scratch_bytes;
  c.progress("creating EpBuffer hidden=" + std::to_string(hidden) + " max_tokens=" +
             std::to_string(max_tokens) + " ll_tokens=" + std::to_string(ll_tokens));
  EPCOMM_BENCH_MPI_CHECK(MPI_Barrier(c.comm));
  const auto t0 = std::chrono::steady_clock::now();
  BufferBuild b;
  b.buffer = std::make_unique<EpBuffer>(bootstrap, cfg);
  const auto t1 = std::chrono::steady_clock::now();
  b.create_ms_max = allMax(c, std::chrono::duration<double, std::milli>(t1 - t0).count());
  return b;
}

std::vector<LinkRow> measureLinkLimit(Context& c, EpBuffer& buffer) {
  LinkBenchConfig cfg;
  cfg.sm_counts.push_back(c.device_sms);
  for (int s : c.opt.sms) {
    if (s != c.device_sms) cfg.sm_counts.push_back(s);
  }
  cfg.bytes_per_rank = c.opt.quick ? kQuickLinkBytesPerRank : kLinkBytesPerRank;
  cfg.warmup = kLinkWarmup;
  cfg.reps = c.opt.quick ? kQuickLinkReps : kLinkReps;
  c.progress("measuring the link limit");
  const std::vector<LinkSample> samples = runLinkBench(buffer, cfg, c.stream);
  std::vector<LinkRow> rows;
  for (const LinkSample& s : samples) {
    LinkRow r;
    r.method = s.method;
    r.sms = s.sms;
    r.bytes_per_rank = allMax(c, static_cast<double>(s.bytes));
    r.med_us_max = allMax(c, s.median_us);
    const double gbps = static_cast<double>(s.bytes) / std::max<double>(s.median_us, 1e-3) / 1e3;
    r.gbps_min = allMin(c, gbps);
    r.gbps_max = allMax(c, gbps);
    rows.push_back(r);
    if (r.method == "SM store" && r.sms == c.device_sms) c.link_limit_gbps = r.gbps_min;
  }
  return rows;
}

struct DeviceFacts {
  std::string name;
  int sms = 0;
  size_t l2_bytes = 0;
  size_t memory_bytes = 0;
  std::string uuid;  // hex
};

DeviceFacts deviceFacts(int device) {
  cudaDeviceProp prop{};
  EPCOMM_BENCH_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  DeviceFacts f;
  f.name = prop.name;
  EPCOMM_BENCH_CUDA_CHECK(cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, device));
  int l2 = 0;
  EPCOMM_BENCH_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
  f.l2_bytes = static_cast<size_t>(l2);
  f.memory_bytes = prop.totalGlobalMem;
  static const char kHex[] = "0123456789abcdef";
  for (char byte : prop.uuid.bytes) {
    const auto b = static_cast<unsigned char>(byte);
    f.uuid += kHex[b >> 4];
    f.uuid += kHex[b & 15];
  }
  return f;
}

// All ranks' strings (up to kNameBytes - 1 characters each, no NUL inside), in rank order.
std::vector<std::string> gatherStrings(const Context& c, const std::string& mine) {
  std::vector<char> send(kNameBytes, 0);
  std::memcpy(send.data(), mine.data(), std::min(mine.size(), size_t{kNameBytes - 1}));
  std::vector<char> all(static_cast<size_t>(kNameBytes) * c.size, 0);
  EPCOMM_BENCH_MPI_CHECK(
      MPI_Allgather(send.data(), kNameBytes, MPI_CHAR, all.data(), kNameBytes, MPI_CHAR, c.comm));
  std::vector<std::string> out;
  for (int r = 0; r < c.size; ++r) {
    const char* p = all.data() + static_cast<size_t>(r) * kNameBytes;
    out.emplace_back(p, strnlen(p, kNameBytes - 1));
  }
  return out;
}

// --- Targets -------------------------------------------------------------------------------------

std::vector<Target> evaluateTargets(const Context& c) {
  const Options& o = c.opt;
  auto find = [&](const std::string& op, const std::string& dtype, int tokens,
                  int sms) -> const Row* {
    for (const Row& r : c.rows) {
      if (r.op == op && r.dtype == dtype && r.tokens == tokens && r.hidden == o.hidden &&
          (sms == 0 || r.sms == sms)) {
        return &r;
      }
    }
    return nullptr;
  };
  const int sms = o.sms.front();
  const std::string where = "tokens=" + std::to_string(o.tokens) +
                            " hidden=" + std::to_string(o.hidden) + " SMs=" + std::to_string(sms);
  const Row* d_bf16 = find("dispatch", "bf16", o.tokens, sms);
  const Row* d_fp8 = find("dispatch", "fp8", o.tokens, sms);
  const Row* comb = find("combine", "bf16", o.tokens, sms);
  const Row* zero = find("d+c 0 tokens", "bf16", 0, sms);
  std::vector<Target> t;
  t.push_back({"BF16 dispatch link %", d_bf16 ? d_bf16->link_pct : std::nullopt, "%", true,
               kTargetDispatchLinkPct, where});
  t.push_back({"BF16 combine link %", comb ? comb->link_pct : std::nullopt, "%", true,
               kTargetCombineLinkPct, where});
  std::optional<double> ratio;
  if (d_bf16 && d_fp8 && d_bf16->time.med_us > 0) ratio = d_fp8->time.med_us / d_bf16->time.med_us;
  t.push_back({"FP8/BF16 dispatch time", ratio, "x", false, kTargetFp8Ratio, where});
  t.push_back({"BF16 dispatch vs NCCL", d_bf16 ? d_bf16->vs_nccl : std::nullopt, "x", true,
               kTargetVsNccl, where});
  t.push_back({"BF16 combine vs NCCL", comb ? comb->vs_nccl : std::nullopt, "x", true,
               kTargetVsNccl, where});
  t.push_back({"d+c 0 tokens", zero ? std::optional<double>(zero->time.med_us) : std::nullopt, "us",
               false, kTargetZeroTokenUs, "median, SMs=" + std::to_string(sms)});
  for (int tokens : unique({o.ll_tokens, 1})) {
    const double limit = tokens == 1 ? kTargetLlOneTokenUs : kTargetLlUs;
    const std::string at = " @" + std::to_string(tokens) + " tok";
    const std::string note = tokens == 1 || tokens == 128
                                 ? std::string("median")
                                 : std::string("median (target defined for 128 tokens)");
    for (const auto& [op, dtype] : std::vector<std::pair<std::string, std::string>>{
             {"ll dispatch", "bf16"}, {"ll dispatch", "fp8"}, {"ll combine", "bf16"}}) {
      const Row* r = o.ll ? find(op, dtype, tokens, 0) : nullptr;
      t.push_back({op + " " + dtype + at, r ? std::optional<double>(r->time.med_us) : std::nullopt,
                   "us", false, limit, note});
    }
  }
  return t;
}

// --- The run -------------------------------------------------------------------------------------

int run(Context& c) {
  const Options& o = c.opt;
  MpiBootstrap bootstrap(c.comm);
  c.device = selectDevice(bootstrap);
  const DeviceFacts facts = deviceFacts(c.device);
  c.device_sms = static_cast<int>(allMin(c, facts.sms));
  c.l2_bytes = static_cast<size_t>(allMax(c, static_cast<double>(facts.l2_bytes)));

  // Checks that need the rank count or the device; every rank reaches the same verdict.
  std::string problem;
  if (c.size > kMaxRanks) {
    problem = "at most " + std::to_string(kMaxRanks) + " ranks are supported, got " +
              std::to_string(c.size);
  } else if (o.experts % c.size != 0) {
    problem = "--experts " + std::to_string(o.experts) + " is not divisible by the " +
              std::to_string(c.size) + " ranks";
  } else {
    for (int s : o.sms) {
      if (s > c.device_sms) {
        problem = "--sms " + std::to_string(s) + " exceeds the " + std::to_string(c.device_sms) +
                  " SMs of the GPU";
      }
    }
  }
  if (!problem.empty()) {
    if (c.root()) std::fprintf(stderr, "ep_bench: error: %s\n", problem.c_str());
    return 1;
  }

  // Ranks that share a GPU (allowed by epcomm for testing) make link numbers meaningless and
  // NCCL refuses them.
  const std::vector<std::string> uuids = gatherStrings(c, facts.uuid);
  int ranks_per_gpu = 0;
  for (const std::string& u : uuids) ranks_per_gpu += u == facts.uuid ? 1 : 0;
  ranks_per_gpu = static_cast<int>(allMax(c, ranks_per_gpu));
  const bool shared_gpus = ranks_per_gpu > 1;

  CudaStream stream;
  c.stream = stream.get();
  NcclBaseline nccl(c.comm, o.nccl && !shared_gpus,
                    !o.nccl ? "disabled (--no-nccl)" : "not used: several ranks share a GPU");
  c.nccl = &nccl;

  std::vector<int> token_cases = unique([&] {
    std::vector<int> v{o.tokens};
    v.insert(v.end(), o.sweep_tokens.begin(), o.sweep_tokens.end());
    return v;
  }());
  std::vector<int> hidden_cases;
  for (int h : unique(o.sweep_hidden)) {
    if (h != o.hidden) hidden_cases.push_back(h);
  }
  const int max_tokens = *std::max_element(token_cases.begin(), token_cases.end());

  Setup setup;
  std::vector<LinkRow> link_rows;
  std::string link_note;
  int case_id = 0;
  {
    BufferBuild main =
        createBuffer(c, bootstrap, o.hidden, max_tokens, o.ll ? o.ll_tokens : 0, kScratchBytes);
    EpBuffer& buffer = *main.buffer;

    // Setup, printed before the measurements so a hang later still shows the machine.
    const std::vector<std::string> names = gatherStrings(c, facts.name);
    std::string gpus;
    if (std::all_of(names.begin(), names.end(),
                    [&](const std::string& n) { return n == names[0]; })) {
      gpus = std::to_string(c.size) + " x " + names[0];
    } else {
      for (int r = 0; r < c.size; ++r) {
        gpus += (r ? ", " : "") + std::string("rank ") + std::to_string(r) + ": " +
                names[static_cast<size_t>(r)];
      }
    }
    gpus += " (" + std::to_string(c.device_sms) + " SMs, L2 " + std::to_string(c.l2_bytes >> 20) +
            " MiB, " + gib(static_cast<double>(facts.memory_bytes)) + ")";
    int runtime_version = 0;
    int driver_version = 0;
    EPCOMM_BENCH_CUDA_CHECK(cudaRuntimeGetVersion(&runtime_version));
    EPCOMM_BENCH_CUDA_CHECK(cudaDriverGetVersion(&driver_version));
    auto cuda_text = [](int v) {
      return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
    };
    const char* commit = std::getenv("EPCOMM_COMMIT");
    const std::string mode = memModeName(buffer.memMode());
    const std::string mode_source =
        o.mem_mode != "auto"
            ? "forced by --mem-mode"
            : (buffer.config().mem_mode_from_env ? "forced by EPCOMM_MEM_MODE" : "chosen by auto");
    std::string ranks_text = std::to_string(c.size) + " (" + std::to_string(bootstrap.numNodes()) +
                             " node(s), " + std::to_string(ranks_per_gpu) + " rank(s) per GPU)";
    if (shared_gpus)
      ranks_text += "  WARNING: ranks share GPUs; link and GB/s numbers are not NVLink";
    setup.add("ranks", ranks_text, c.size);
    setup.add("GPUs", gpus, names);
    setup.json["sms_per_gpu"] = c.device_sms;
    setup.json["l2_bytes"] = c.l2_bytes;
    setup.json["ranks_per_gpu"] = ranks_per_gpu;
    setup.json["nodes"] = bootstrap.numNodes();
    setup.add("CUDA",
              "runtime " + cuda_text(runtime_version) + ", driver " + cuda_text(driver_version),
              nlohmann::ordered_json{{"runtime", runtime_version}, {"driver", driver_version}});
    setup.add(
        "epcomm",
        std::string(versionString()) + ", commit " +
            (commit ? commit : "unknown (set EPCOMM_COMMIT)"),
        nlohmann::ordered_json{{"version", versionString()}, {"commit", commit ? commit : ""}});
    setup.add("memory mode", mode + " (" + mode_source + ")", mode);
    setup.add("buffer bytes/rank",
              gib(static_cast<double>(buffer.bytesPerRank())) + " (main buffer: max_tokens " +
                  std::to_string(max_tokens) + ", LL tokens " +
                  std::to_string(o.ll ? o.ll_tokens : 0) + ", scratch " +
                  std::to_string(kScratchBytes >> 20) + " MiB)",
              buffer.bytesPerRank());
    setup.add("buffer creation", fixed(main.create_ms_max, 1) + " ms (max over ranks)",
              main.create_ms_max);
    setup.add("NCCL baseline", nccl.status(), nccl.status());
    setup.add("timing",
              std::to_string(o.iters) + " timed iterations after " + std::to_string(o.warmup) +
                  " warm-up, CUDA events per op; med/min/max per rank, max over ranks" +
                  (o.quick ? "  (--quick: not for reporting)" : ""),
              nlohmann::ordered_json{{"iters", o.iters}, {"warmup", o.warmup}});
    setup.add("routing",
              o.skew > 0 ? "skew " + fixed(o.skew, 2) +
                               " (each pick from rank 0's experts with "
                               "that probability, else uniform)"
                         : std::string("uniform random top-") + std::to_string(o.topk) + " of " +
                               std::to_string(o.experts) + " experts",
              o.skew);
    setup.add("inputs",
              "random non-zero BF16 / FP8 e4m3 + float32 scales per 128 columns, int64 top-k, "
              "seed " +
                  std::to_string(o.seed) + "; >= " + std::to_string(kMinInputSets) +
                  " input sets rotated per size",
              o.seed);
    if (c.root()) printSetup(setup);

    if (c.size > 1) {
      link_rows = measureLinkLimit(c, buffer);
      link_note = "link limit = SM store with all " + std::to_string(c.device_sms) + " SMs: " +
                  (c.link_limit_gbps ? fixed(*c.link_limit_gbps, 1) + " GB/s per rank"
                                     : std::string("n/a"));
      if (shared_gpus) link_note += "  (WARNING: ranks share GPUs: not an NVLink measurement)";
    } else {
      link_note = "n/a: one rank, no peer to measure";
    }
    if (c.root()) printLinkTable(link_rows, link_note);

    for (int tokens : token_cases) {
      runHtCase(c, buffer, tokens, o.hidden, tokens == o.tokens, case_id++);
    }
    if (o.ll) {
      // Expert outputs for LL combine, [local experts, ranks * LL tokens, hidden] BF16.
      const size_t rows = static_cast<size_t>(buffer.numLocalExperts()) * c.size * o.ll_tokens;
      DeviceBuffer expert_out(rows * bf16RowBytes(o.hidden));
      fillRandomBf16(expert_out.get(), rows * o.hidden,
                     seedFor(o.seed, {static_cast<uint64_t>(c.rank), 5}), c.stream);
      EPCOMM_BENCH_CUDA_CHECK(cudaStreamSynchronize(c.stream));
      for (int tokens : unique({o.ll_tokens, 1})) {
        runLlCase(c, buffer, tokens, expert_out, case_id++);
      }
    }
  }  // the main buffer is destroyed (collectively) before the next one is created

  for (int hidden : hidden_cases) {
    BufferBuild b = createBuffer(c, bootstrap, hidden, o.tokens, 0, 0);
    runHtCase(c, *b.buffer, o.tokens, hidden, false, case_id++);
  }

  const std::vector<Target> targets = evaluateTargets(c);
  int rc = 0;
  if (c.root()) {
    printTable(c.rows);
    printTargets(targets);
    std::printf(
        "logical GB/s = received rows (self included) x row bytes / time; link GB/s = rows "
        "crossing to or from other ranks x row bytes / time; link %% = link GB/s / link limit; "
        "vs NCCL = NCCL median / epcomm median (same per-peer bytes). Top-k metadata is not "
        "counted. See docs/benchmarks.md.\n");
    std::fflush(stdout);
    if (!o.json.empty()) {
      const std::string error =
          writeJson(o.json, optionsJson(o), setup, link_rows, c.link_limit_gbps, c.rows, targets);
      if (!error.empty()) {
        std::fprintf(stderr, "ep_bench: error: %s\n", error.c_str());
        rc = 1;
      } else {
        std::fprintf(stderr, "ep_bench: wrote %s\n", o.json.c_str());
      }
    }
  }
  return rc;
}

}  // namespace
}  // namespace epcomm::bench

int main(int argc, char** argv) {
  using namespace epcomm::bench;
  CLI::App app{
      "ep_bench: epcomm dispatch/combine latency and bandwidth, against the link limit "
      "and NCCL"};
  Context c;
  defineOptions(app, c.opt);
  try {
    app.parse(argc, argv);
    validateOptions(app, c.opt);
  } catch (const CLI::ParseError& e) {
    // Every rank exits with the same code; only the first prints.
    return launcherRankIsZero() ? app.exit(e) : e.get_exit_code();
  }

  if (MPI_Init(&argc, &argv) != MPI_SUCCESS) {
    std::fprintf(stderr, "ep_bench: MPI_Init failed\n");
    return 1;
  }
  if (MPI_Comm_rank(MPI_COMM_WORLD, &c.rank) != MPI_SUCCESS ||
      MPI_Comm_size(MPI_COMM_WORLD, &c.size) != MPI_SUCCESS) {
    std::fprintf(stderr, "ep_bench: MPI_Comm_rank/MPI_Comm_size failed\n");
    MPI_Abort(MPI_COMM_WORLD, 1);
  }

  // No GPU: a clear line from every rank and exit code 2 (CI builds ep_bench but never runs it).
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
  if (MPI_Allreduce(&has_gpu, &all_have_gpu, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD) != MPI_SUCCESS) {
    std::fprintf(stderr, "ep_bench: MPI_Allreduce failed\n");
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  if (all_have_gpu == 0) {
    if (reason.empty()) reason = "another rank sees no CUDA device";
    std::printf("ep_bench needs one NVIDIA GPU per rank; none is visible: %s (rank %d of %d)\n",
                reason.c_str(), c.rank, c.size);
    std::fflush(stdout);
    MPI_Finalize();
    return kExitNoGpu;
  }

  int rc = 1;
  try {
    rc = run(c);
  } catch (const std::exception& e) {
    // Peers may be waiting in a collective op; abort the job rather than leave them hanging.
    std::fprintf(stderr, "ep_bench: rank %d: error: %s\n", c.rank, e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return rc;
}
