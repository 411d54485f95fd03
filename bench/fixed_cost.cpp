// SPDX-License-Identifier: Apache-2.0
#include "fixed_cost.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <optional>
#include <string>

#include "epcomm/epcomm.hpp"

namespace epcomm::bench {

namespace {

using Clock = std::chrono::steady_clock;

double usSince(Clock::time_point t0, Clock::time_point t1) {
  return std::chrono::duration<double, std::micro>(t1 - t0).count();
}

// Host enqueue samples of one op; summarized like the GPU samples.
class HostTimes {
 public:
  void add(Clock::time_point t0, Clock::time_point t1) {
    samples_.push_back(static_cast<float>(usSince(t0, t1)));
  }
  const std::vector<float>& samples() const { return samples_; }

 private:
  std::vector<float> samples_;
};

// Inputs of one sweep point: one set (the sweep is about the fixed part; the largest HT point
// exceeds L2 by itself at the default shape).
struct PointInputs {
  DeviceMemory x;        // [tokens, hidden] BF16
  DeviceMemory idx;      // [tokens, topk] int64
  DeviceMemory weights;  // [tokens, topk] float32
  Traffic traffic;
};

PointInputs makePointInputs(const CaseEnv& env, int tokens, int hidden, uint64_t tag) {
  PointInputs in;
  const uint64_t base = seedFor(env.work.seed, {static_cast<uint64_t>(env.ranks.rank), 13, tag,
                                                static_cast<uint64_t>(tokens)});
  Routing routing = makeRouting(env.work, env.ranks.size, tokens, base);
  in.idx = upload(routing.idx);
  in.weights = upload(routing.weights);
  const size_t elements = static_cast<size_t>(tokens) * hidden;
  in.x = DeviceMemory(std::max<size_t>(elements * 2, 16));
  fillRandomBf16(in.x.get(), elements, seedFor(base, {1}), env.stream);
  in.traffic = gatherTraffic(env.ranks, routing.dest_tokens);
  return in;
}

SweepPoint reducePoint(const CaseEnv& env, int tokens, double bytes,
                       const std::vector<float>& device, const HostTimes& host) {
  const Stats d = reduceStats(env.ranks, summarize(device));
  const Stats h = reduceStats(env.ranks, summarize(host.samples()));
  return SweepPoint{tokens, bytes, d.med_us, h.med_us, h.min_us};
}

// Timed iterations only contribute host samples, as TimedLoop does for the events.
bool timed(const CaseEnv& env, int it) {
  return it >= env.loop.warmup;
}

void htPoint(const CaseEnv& env, EpBuffer& buffer, int hidden, int tokens,
             std::vector<OpSweep>& out) {
  const PointInputs in = makePointInputs(env, tokens, hidden, 1);
  DeviceMemory y(std::max<size_t>(static_cast<size_t>(tokens) * hidden * 2, 16));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(env.stream));
  EpHandle handle = buffer.createHandle();
  DispatchArgs d;
  d.dtype = DType::kBF16;
  d.num_tokens = tokens;
  d.x = in.x.get();
  d.topk = TopkView{in.idx.get(), IndexType::kInt64, tokens, env.work.topk};
  d.topk_weights = in.weights.as<float>();
  DispatchArgs cached = d;
  cached.topk = TopkView{};
  cached.topk_weights = nullptr;
  // The zero-copy combine input comes from a first (untimed) dispatch.
  const DispatchResult first = buffer.dispatch(d, handle, env.stream);
  CombineArgs c;
  c.x = first.combine_input;
  c.scale_weights = in.weights.as<float>();
  c.out = y.get();
  buffer.sync(env.stream);

  TimedLoop loop(env.loop, env.stream, 3);
  HostTimes host[3];
  loop.run(buffer, [&](int it) {
    loop.start(0);
    const auto t0 = Clock::now();
    buffer.dispatch(d, handle, env.stream);
    const auto t1 = Clock::now();
    loop.stop(0);
    loop.start(1);
    const auto t2 = Clock::now();
    buffer.combine(c, handle, env.stream);
    const auto t3 = Clock::now();
    loop.stop(1);
    loop.start(2);
    const auto t4 = Clock::now();
    buffer.dispatch(cached, handle, env.stream);
    const auto t5 = Clock::now();
    loop.stop(2);
    buffer.combine(c, handle, env.stream);  // untimed: every dispatch needs its combine
    if (timed(env, it)) {
      host[0].add(t0, t1);
      host[1].add(t2, t3);
      host[2].add(t4, t5);
    }
  });
  const CaseRows rows(env.loop, {&in.traffic});
  const double bytes = rows.bytes(bf16RowBytes(hidden)).logical;
  out[0].points.push_back(reducePoint(env, tokens, bytes, loop.samples(0), host[0]));
  out[1].points.push_back(reducePoint(env, tokens, bytes, loop.samples(1), host[1]));
  out[2].points.push_back(reducePoint(env, tokens, bytes, loop.samples(2), host[2]));
}

void llPoint(const CaseEnv& env, EpBuffer& buffer, int hidden, int tokens, const void* expert_out,
             std::vector<OpSweep>& out) {
  const PointInputs in = makePointInputs(env, tokens, hidden, 2);
  DeviceMemory y(std::max<size_t>(static_cast<size_t>(tokens) * hidden * 2, 16));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(env.stream));
  LlDispatchArgs d;
  d.x = in.x.get();
  d.num_tokens = tokens;
  d.topk = TopkView{in.idx.get(), IndexType::kInt64, tokens, env.work.topk};
  d.topk_weights = in.weights.as<float>();
  LlCombineArgs c;
  c.x = expert_out;
  c.out = y.get();

  TimedLoop loop(env.loop, env.stream, 2);
  HostTimes host[2];
  loop.run(buffer, [&](int it) {
    loop.start(0);
    const auto t0 = Clock::now();
    buffer.lowLatencyDispatch(d, env.stream);
    const auto t1 = Clock::now();
    loop.stop(0);
    loop.start(1);
    const auto t2 = Clock::now();
    buffer.lowLatencyCombine(c, env.stream);
    const auto t3 = Clock::now();
    loop.stop(1);
    if (timed(env, it)) {
      host[0].add(t0, t1);
      host[1].add(t2, t3);
    }
  });
  // The round trip as a CUDA graph (its host time is the graph launch).
  GraphExec graph = captureGraph(env.stream, [&] {
    buffer.lowLatencyDispatch(d, env.stream);
    buffer.lowLatencyCombine(c, env.stream);
  });
  TimedLoop graph_loop(env.loop, env.stream, 1);
  HostTimes graph_host;
  graph_loop.run(buffer, [&](int it) {
    graph_loop.start(0);
    const auto t0 = Clock::now();
    graph.launch(env.stream);
    const auto t1 = Clock::now();
    graph_loop.stop(0);
    if (timed(env, it)) graph_host.add(t0, t1);
  });
  const CaseRows rows(env.loop, {&in.traffic});
  const double bytes = rows.bytes(bf16RowBytes(hidden)).logical;
  out[0].points.push_back(reducePoint(env, tokens, bytes, loop.samples(0), host[0]));
  out[1].points.push_back(reducePoint(env, tokens, bytes, loop.samples(1), host[1]));
  out[2].points.push_back(reducePoint(env, tokens, 2 * bytes, graph_loop.samples(0), graph_host));
}

std::vector<OpSweep> named(const std::vector<std::string>& ops) {
  std::vector<OpSweep> out(ops.size());
  for (size_t i = 0; i < ops.size(); ++i) out[i].op = ops[i];
  return out;
}

void fit(OpSweep& s) {
  std::vector<double> x, y;
  std::vector<float> host;
  for (const SweepPoint& p : s.points) {
    x.push_back(p.bytes);
    y.push_back(p.device_us);
    host.push_back(static_cast<float>(p.host_us));
  }
  s.host_median_us = summarize(host).med_us;
  double intercept = 0, slope = 0;
  s.fitted = fitLine(x, y, intercept, slope);
  if (!s.fitted) return;
  s.fixed_us = intercept;
  // slope: us per byte; bytes per us = 1e-3 GB/s.
  s.gbps = slope > 0 ? 1e-3 / slope : 0;
}

}  // namespace

bool fitLine(const std::vector<double>& x, const std::vector<double>& y, double& intercept,
             double& slope) {
  const size_t n = std::min(x.size(), y.size());
  if (n < 2) return false;
  double mx = 0, my = 0;
  for (size_t i = 0; i < n; ++i) {
    mx += x[i];
    my += y[i];
  }
  mx /= static_cast<double>(n);
  my /= static_cast<double>(n);
  double sxx = 0, sxy = 0;
  for (size_t i = 0; i < n; ++i) {
    sxx += (x[i] - mx) * (x[i] - mx);
    sxy += (x[i] - mx) * (y[i] - my);
  }
  if (!(sxx > 0)) return false;
  slope = sxy / sxx;
  intercept = my - slope * mx;
  return true;
}

std::vector<OpSweep> measureFixedCost(const CaseEnv& env, EpBuffer& buffer, int hidden,
                                      const std::vector<int>& ht_tokens,
                                      const std::vector<int>& ll_tokens) {
  std::vector<OpSweep> sweeps;
  if (!ht_tokens.empty()) {
    progress(env.ranks, "fixed cost: HT token sweep");
    std::vector<OpSweep> ht = named({"dispatch", "combine", "dispatch (cached)"});
    for (int t : ht_tokens) htPoint(env, buffer, hidden, t, ht);
    sweeps.insert(sweeps.end(), ht.begin(), ht.end());
  }
  if (!ll_tokens.empty()) {
    progress(env.ranks, "fixed cost: LL token sweep");
    // Expert outputs, [local experts, ranks * LL max tokens, hidden]: the receive slots are
    // addressed with the buffer's LL maximum, whatever the sweep's largest count.
    const size_t max_t = static_cast<size_t>(buffer.config().config.ll_max_tokens_per_rank);
    const size_t rows = static_cast<size_t>(buffer.numLocalExperts()) * env.ranks.size * max_t;
    DeviceMemory expert_out(rows * bf16RowBytes(hidden));
    fillRandomBf16(expert_out.get(), rows * hidden,
                   seedFor(env.work.seed, {static_cast<uint64_t>(env.ranks.rank), 14}), env.stream);
    std::vector<OpSweep> ll = named({"ll dispatch", "ll combine", "ll graph d+c"});
    for (int t : ll_tokens) llPoint(env, buffer, hidden, t, expert_out.get(), ll);
    sweeps.insert(sweeps.end(), ll.begin(), ll.end());
  }
  for (OpSweep& s : sweeps) fit(s);
  return sweeps;
}

std::vector<Target> fixedCostTargets(const std::vector<OpSweep>& sweeps) {
  Target fixed{"dispatch (cached) fixed",         std::nullopt, "us", false, 6.0,
               "intercept of the token-sweep fit"};
  Target graph{"ll graph d+c @1 tok", std::nullopt, "us", false, 12.0, "median, fixed-cost sweep"};
  Target host{"host enqueue, slowest op",
              std::nullopt,
              "us",
              false,
              3.0,
              "median per op, max over the swept ops"};
  for (const OpSweep& s : sweeps) {
    if (!s.op.empty() && s.op.back() == ']') continue;  // an EPCOMM_PERF variant
    if (s.op == "dispatch (cached)" && s.fitted) fixed.value = s.fixed_us;
    if (s.op == "ll graph d+c") {
      for (const SweepPoint& p : s.points) {
        if (p.tokens == 1) graph.value = p.device_us;
      }
    }
    if (s.op != "ll graph d+c") {  // a graph launch is not an op's enqueue
      host.value = std::max(host.value.value_or(0.0), s.host_median_us);
    }
  }
  return {fixed, graph, host};
}

void printFixedCost(const std::vector<OpSweep>& sweeps) {
  if (sweeps.empty()) return;
  std::printf(
      "\nFixed cost per call (token sweep, BF16; device = median GPU us, host = median us "
      "to enqueue the call, no GPU wait)\n");
  std::printf("%-44s %7s %12s %10s %9s %9s\n", "op", "tokens", "MB", "device us", "host us",
              "host min");
  for (const OpSweep& s : sweeps) {
    for (const SweepPoint& p : s.points) {
      std::printf("%-44s %7d %12.3f %10.2f %9.2f %9.2f\n", s.op.c_str(), p.tokens, p.bytes / 1e6,
                  p.device_us, p.host_us, p.host_min_us);
    }
  }
  std::printf("\nFit per op (least squares of device us on logical bytes):\n");
  std::printf("%-44s %10s %12s %14s\n", "op", "fixed us", "stream GB/s", "host enqueue us");
  for (const OpSweep& s : sweeps) {
    if (s.fitted) {
      std::printf("%-44s %10.2f %12.1f %14.2f\n", s.op.c_str(), s.fixed_us, s.gbps,
                  s.host_median_us);
    } else {
      std::printf("%-44s %10s %12s %14.2f\n", s.op.c_str(), "n/a", "n/a", s.host_median_us);
    }
  }
  std::printf("\n");
  std::fflush(stdout);
}

nlohmann::ordered_json fixedCostJson(const std::vector<OpSweep>& sweeps) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (const OpSweep& s : sweeps) {
    nlohmann::ordered_json points = nlohmann::ordered_json::array();
    for (const SweepPoint& p : s.points) {
      points.push_back({{"tokens", p.tokens},
                        {"logical_bytes", p.bytes},
                        {"device_med_us", p.device_us},
                        {"host_med_us", p.host_us},
                        {"host_min_us", p.host_min_us}});
    }
    nlohmann::ordered_json j = {{"op", s.op}, {"points", points}};
    j["fixed_us"] = s.fitted ? nlohmann::ordered_json(s.fixed_us) : nlohmann::ordered_json();
    j["stream_gbps"] = s.fitted ? nlohmann::ordered_json(s.gbps) : nlohmann::ordered_json();
    j["host_enqueue_med_us"] = s.host_median_us;
    out.push_back(j);
  }
  return out;
}

}  // namespace epcomm::bench
