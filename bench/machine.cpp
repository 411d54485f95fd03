// SPDX-License-Identifier: Apache-2.0
#include "machine.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "link_bench.hpp"
#include "traffic.hpp"

namespace epcomm::bench {

namespace {

constexpr size_t kLinkBytesPerRank = size_t{128} << 20;
constexpr size_t kQuickLinkBytesPerRank = size_t{32} << 20;
constexpr int kLinkReps = 20;
constexpr int kQuickLinkReps = 5;
constexpr int kLinkWarmup = 3;

DeviceFacts deviceFacts(int device) {
  cudaDeviceProp prop{};
  EPCOMM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  DeviceFacts f;
  f.name = prop.name;
  EPCOMM_CUDA_CHECK(cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, device));
  int l2 = 0;
  EPCOMM_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
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

std::string cudaVersionText(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

// "2 x NVIDIA H200 (132 SMs, L2 60 MiB, 139.81 GiB)", or one name per rank when they differ.
std::string gpusText(const Ranks& ranks, const Machine& m, const std::vector<std::string>& names) {
  std::string gpus;
  if (std::all_of(names.begin(), names.end(),
                  [&](const std::string& n) { return n == names[0]; })) {
    gpus = std::to_string(ranks.size) + " x " + names[0];
  } else {
    for (int r = 0; r < ranks.size; ++r) {
      gpus += (r ? ", " : "") + std::string("rank ") + std::to_string(r) + ": " +
              names[static_cast<size_t>(r)];
    }
  }
  return gpus + " (" + std::to_string(m.device_sms) + " SMs, L2 " +
         std::to_string(m.l2_bytes >> 20) + " MiB, " +
         gib(static_cast<double>(m.facts.memory_bytes)) + ")";
}

void addMachineLines(Setup& setup, const Ranks& ranks, const Machine& m) {
  const std::vector<std::string> names = gatherStrings(ranks, m.facts.name);
  std::string ranks_text = std::to_string(ranks.size) + " (" + std::to_string(m.nodes) +
                           " node(s), " + std::to_string(m.ranks_per_gpu) + " rank(s) per GPU)";
  if (m.sharedGpus()) {
    ranks_text += "  WARNING: ranks share GPUs; link and GB/s numbers are not NVLink";
  }
  setup.add("ranks", ranks_text, ranks.size);
  setup.add("GPUs", gpusText(ranks, m, names), names);
  setup.json["sms_per_gpu"] = m.device_sms;
  setup.json["l2_bytes"] = m.l2_bytes;
  setup.json["ranks_per_gpu"] = m.ranks_per_gpu;
  setup.json["nodes"] = m.nodes;
  int runtime_version = 0;
  int driver_version = 0;
  EPCOMM_CUDA_CHECK(cudaRuntimeGetVersion(&runtime_version));
  EPCOMM_CUDA_CHECK(cudaDriverGetVersion(&driver_version));
  setup.add(
      "CUDA",
      "runtime " + cudaVersionText(runtime_version) + ", driver " + cudaVersionText(driver_version),
      nlohmann::ordered_json{{"runtime", runtime_version}, {"driver", driver_version}});
  const char* commit = std::getenv("EPCOMM_COMMIT");
  setup.add("epcomm",
            std::string(versionString()) + ", commit " +
                (commit ? commit : "unknown (set EPCOMM_COMMIT)"),
            nlohmann::ordered_json{{"version", versionString()}, {"commit", commit ? commit : ""}});
}

void addBufferLines(Setup& setup, const Options& o, const EpBuffer& buffer,
                    const BufferBuild& build, const BufferShape& shape) {
  const std::string mode = memModeName(buffer.memMode());
  const std::string mode_source =
      o.mem_mode != "auto"
          ? "forced by --mem-mode"
          : (buffer.config().mem_mode_from_env ? "forced by EPCOMM_MEM_MODE" : "chosen by auto");
  setup.add("memory mode", mode + " (" + mode_source + ")", mode);
  setup.add("buffer bytes/rank",
            gib(static_cast<double>(buffer.bytesPerRank())) + " (main buffer: max_tokens " +
                std::to_string(shape.max_tokens) + ", LL tokens " +
                std::to_string(shape.ll_tokens) + ", scratch " +
                std::to_string(shape.scratch_bytes >> 20) + " MiB)",
            buffer.bytesPerRank());
  setup.add("buffer creation", fixed(build.create_ms_max, 1) + " ms (max over ranks)",
            build.create_ms_max);
}

void addRunLines(Setup& setup, const Options& o) {
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
}

}  // namespace

Machine probeMachine(const Ranks& ranks, const Bootstrap& bootstrap) {
  Machine m;
  m.device = selectDevice(bootstrap);
  m.facts = deviceFacts(m.device);
  m.device_sms = static_cast<int>(allMin(ranks, m.facts.sms));
  m.l2_bytes = static_cast<size_t>(allMax(ranks, static_cast<double>(m.facts.l2_bytes)));
  m.nodes = bootstrap.numNodes();
  return m;
}

std::string machineProblem(const Options& o, const Ranks& ranks, const Machine& machine) {
  if (ranks.size > kMaxRanks) {
    return "at most " + std::to_string(kMaxRanks) + " ranks are supported, got " +
           std::to_string(ranks.size);
  }
  if (o.experts % ranks.size != 0) {
    return "--experts " + std::to_string(o.experts) + " is not divisible by the " +
           std::to_string(ranks.size) + " ranks";
  }
  std::string problem;
  for (int s : o.sms) {
    if (s > machine.device_sms) {
      problem = "--sms " + std::to_string(s) + " exceeds the " +
                std::to_string(machine.device_sms) + " SMs of the GPU";
    }
  }
  return problem;
}

void countRanksPerGpu(const Ranks& ranks, Machine& machine) {
  const std::vector<std::string> uuids = gatherStrings(ranks, machine.facts.uuid);
  int ranks_per_gpu = 0;
  for (const std::string& u : uuids) ranks_per_gpu += u == machine.facts.uuid ? 1 : 0;
  machine.ranks_per_gpu = static_cast<int>(allMax(ranks, ranks_per_gpu));
}

BufferBuild createBuffer(const Ranks& ranks, Bootstrap& bootstrap, const BufferConfig& base,
                         const BufferShape& shape) {
  BufferConfig cfg = base;
  cfg.hidden = shape.hidden;
  cfg.max_tokens_per_rank = shape.max_tokens;
  cfg.ll_max_tokens_per_rank = shape.ll_tokens;
  cfg.scratch_bytes = shape.scratch_bytes;
  progress(ranks, "creating EpBuffer hidden=" + std::to_string(shape.hidden) +
                      " max_tokens=" + std::to_string(shape.max_tokens) +
                      " ll_tokens=" + std::to_string(shape.ll_tokens));
  EPCOMM_BENCH_MPI_CHECK(MPI_Barrier(ranks.comm));
  const auto t0 = std::chrono::steady_clock::now();
  BufferBuild b;
  b.buffer = std::make_unique<EpBuffer>(bootstrap, cfg);
  const auto t1 = std::chrono::steady_clock::now();
  b.create_ms_max = allMax(ranks, std::chrono::duration<double, std::milli>(t1 - t0).count());
  return b;
}

LinkResult measureLink(const Ranks& ranks, const Machine& machine, EpBuffer& buffer,
                       const std::vector<int>& sms, bool quick, bool bulk, cudaStream_t stream) {
  LinkResult result;
  if (ranks.size <= 1) {
    result.note = "n/a: one rank, no peer to measure";
    return result;
  }
  LinkBenchConfig cfg;
  cfg.sm_counts.push_back(machine.device_sms);
  for (int s : sms) {
    if (s != machine.device_sms) cfg.sm_counts.push_back(s);
  }
  cfg.bytes_per_rank = quick ? kQuickLinkBytesPerRank : kLinkBytesPerRank;
  cfg.warmup = kLinkWarmup;
  cfg.reps = quick ? kQuickLinkReps : kLinkReps;
  cfg.bulk = bulk;
  progress(ranks, std::string("measuring the link limit") +
                      (bulk ? " (then the TMA bulk-copy rows; --no-link-bulk skips them)" : ""));
  std::string last_na;  // the n/a reason is printed once, not once per row
  for (const LinkSample& s : runLinkBench(buffer, cfg, stream)) {
    LinkRow r;
    r.method = s.method;
    r.sms = s.sms;
    r.bytes_per_rank = allMax(ranks, static_cast<double>(s.bytes));
    r.med_us_max = allMax(ranks, s.median_us);
    const double gbps = static_cast<double>(s.bytes) / std::max<double>(s.median_us, 1e-3) / 1e3;
    r.gbps_min = allMin(ranks, gbps);
    r.gbps_max = allMax(ranks, gbps);
    if (s.check != LinkCheck::kUnchecked) {
      // The worst verdict of any rank: a row is ok only if every rank's destination was right.
      r.chunk_bytes = s.chunk_bytes;
      r.stages = s.stages;
      r.check = linkCheckName(
          static_cast<LinkCheck>(static_cast<int>(allMax(ranks, static_cast<int>(s.check)))));
      if (s.check != LinkCheck::kOk && s.check != LinkCheck::kUnsupported) {
        std::fprintf(stderr, "ep_bench: rank %d: link check failed: %s\n", ranks.rank,
                     s.detail.c_str());
      } else if (s.check == LinkCheck::kUnsupported && ranks.root() && s.detail != last_na) {
        std::fprintf(stderr, "ep_bench: bulk-copy rows n/a: %s\n", s.detail.c_str());
        last_na = s.detail;
      }
    }
    result.rows.push_back(r);
    if (r.method == "SM store" && r.sms == machine.device_sms) result.limit_gbps = r.gbps_min;
  }
  result.note =
      "link limit = SM store with all " + std::to_string(machine.device_sms) + " SMs: " +
      (result.limit_gbps ? fixed(*result.limit_gbps, 1) + " GB/s per rank" : std::string("n/a"));
  if (machine.sharedGpus()) {
    result.note += "  (WARNING: ranks share GPUs: not an NVLink measurement)";
  }
  return result;
}

Setup describeSetup(const Options& o, const Ranks& ranks, const Machine& machine,
                    const EpBuffer& buffer, const BufferBuild& build, const BufferShape& shape,
                    const std::string& nccl_status) {
  Setup setup;
  addMachineLines(setup, ranks, machine);
  addBufferLines(setup, o, buffer, build, shape);
  setup.add("NCCL baseline", nccl_status, nccl_status);
  addRunLines(setup, o);
  return setup;
}

}  // namespace epcomm::bench
