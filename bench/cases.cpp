// SPDX-License-Identifier: Apache-2.0
#include "cases.hpp"

namespace epcomm::bench {

namespace {

// Collective: the NCCL median (max over ranks) for the given per-set calls, if NCCL is in use.
std::optional<double> timeNccl(const CaseEnv& env, const std::vector<ExchangeSequence>& calls) {
  if (!env.nccl.available()) return std::nullopt;
  const std::vector<float> samples =
      env.nccl.time(calls, env.loop.warmup, env.loop.iters, env.stream);
  return allMax(env.ranks, summarize(samples).med_us);
}

}  // namespace

NcclTimes timeNcclBaselines(const CaseEnv& env, const std::vector<const Traffic*>& sets,
                            int hidden) {
  std::vector<ExchangeSequence> bf16, fp8, combine, round_trip;
  for (const Traffic* t : sets) {
    const Exchange fwd = makeExchange(env.ranks, *t, bf16RowBytes(hidden), false);
    const Exchange bwd = makeExchange(env.ranks, *t, bf16RowBytes(hidden), true);
    bf16.push_back({fwd});
    fp8.push_back({makeExchange(env.ranks, *t, fp8RowBytes(hidden), false)});
    combine.push_back({bwd});
    round_trip.push_back({fwd, bwd});
  }
  NcclTimes times;
  times.bf16 = timeNccl(env, bf16);
  times.fp8 = timeNccl(env, fp8);
  times.combine = timeNccl(env, combine);
  times.round_trip = env.graph ? timeNccl(env, round_trip) : std::nullopt;
  return times;
}

}  // namespace epcomm::bench
