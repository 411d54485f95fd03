// SPDX-License-Identifier: Apache-2.0
// How ep_bench times an op: CUDA events around each timed call on one stream, warm-up first;
// median, minimum and maximum per rank, then the maximum over ranks (docs/benchmarks.md, Timing).
#pragma once

#include <cuda_runtime_api.h>

#include <vector>

#include "epcomm/buffer.hpp"
#include "link_bench.hpp"
#include "ranks.hpp"

namespace epcomm::bench {

struct Stats {
  double med_us = 0;
  double min_us = 0;
  double max_us = 0;
};

// Median (mean of the middle two for an even count), minimum and maximum of per-call samples.
Stats summarize(const std::vector<float>& samples_us);

// Collective: each rank's statistic, maximum over ranks.
Stats reduceStats(const Ranks& ranks, const Stats& local);

// The loop shape of every row: untimed warm-up iterations, then timed ones.
struct Iterations {
  int warmup = 0;
  int iters = 0;
};

// The mean over the timed iterations of a per-set value (iteration i uses set i % sets).
double meanOverTimed(const Iterations& loop, const std::vector<double>& per_set);

// warmup + iters iterations of a body that brackets each timed op with start(op)/stop(op);
// iteration i uses input set i % sets. Events are recorded only in timed iterations.
class TimedLoop {
 public:
  TimedLoop(const Iterations& loop, cudaStream_t stream, int ops);

  template <typename Body>
  void run(EpBuffer& buffer, Body&& body) {
    for (it_ = 0; it_ < loop_.warmup + loop_.iters; ++it_) body(it_);
    buffer.sync(stream_);  // waits with the deadline and surfaces device-side errors
  }
  void start(int op);
  void stop(int op);
  std::vector<float> samples(int op) const;

 private:
  Iterations loop_;
  cudaStream_t stream_;
  std::vector<EventTimer> timers_;
  int it_ = 0;
};

// Times one op per iteration: launch(it) between the events of each timed iteration.
template <typename Launch>
std::vector<float> timeEach(const Iterations& loop, cudaStream_t stream, EpBuffer& buffer,
                            Launch&& launch) {
  TimedLoop timed(loop, stream, 1);
  timed.run(buffer, [&](int it) {
    timed.start(0);
    launch(it);
    timed.stop(0);
  });
  return timed.samples(0);
}

using util::captureGraph;

}  // namespace epcomm::bench
