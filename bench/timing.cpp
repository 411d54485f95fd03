// SPDX-License-Identifier: Apache-2.0
#include "timing.hpp"

#include <algorithm>

namespace epcomm::bench {

Stats summarize(const std::vector<float>& samples_us) {
  Stats s;
  if (samples_us.empty()) return s;
  std::vector<float> v = samples_us;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  s.med_us = n % 2 == 1 ? v[n / 2] : 0.5 * (static_cast<double>(v[n / 2 - 1]) + v[n / 2]);
  s.min_us = v.front();
  s.max_us = v.back();
  return s;
}

Stats reduceStats(const Ranks& ranks, const Stats& local) {
  return Stats{allMax(ranks, local.med_us), allMax(ranks, local.min_us),
               allMax(ranks, local.max_us)};
}

double meanOverTimed(const Iterations& loop, const std::vector<double>& per_set) {
  double sum = 0;
  for (int i = 0; i < loop.iters; ++i) {
    sum += per_set[static_cast<size_t>(loop.warmup + i) % per_set.size()];
  }
  return sum / loop.iters;
}

TimedLoop::TimedLoop(const Iterations& loop, cudaStream_t stream, int ops)
    : loop_(loop), stream_(stream) {
  for (int i = 0; i < ops; ++i) timers_.emplace_back(loop.iters);
}

void TimedLoop::start(int op) {
  if (it_ >= loop_.warmup) timers_[static_cast<size_t>(op)].start(it_ - loop_.warmup, stream_);
}

void TimedLoop::stop(int op) {
  if (it_ >= loop_.warmup) timers_[static_cast<size_t>(op)].stop(it_ - loop_.warmup, stream_);
}

std::vector<float> TimedLoop::samples(int op) const {
  return timers_[static_cast<size_t>(op)].microseconds(loop_.iters);
}

}  // namespace epcomm::bench
