// SPDX-License-Identifier: Apache-2.0
// One LL case: LL dispatch (BF16, FP8), LL combine, both split in their phases, and the LL graph
// round trip at one token count.
#include <string>
#include <vector>

#include "cases.hpp"
#include "epcomm/epcomm.hpp"

namespace epcomm::bench {

namespace {

struct LlSet {
  DeviceMemory x;        // [tokens, hidden] BF16
  DeviceMemory idx;      // [tokens, topk] int64
  DeviceMemory weights;  // [tokens, topk] float32
  Traffic traffic;
};

class LlCase {
 public:
  LlCase(const CaseEnv& env, EpBuffer& buffer, const LlCaseSpec& spec)
      : env_(env),
        buffer_(buffer),
        spec_(spec),
        sets_(numInputSets(env.l2_bytes,
                           static_cast<size_t>(spec.tokens) * bf16RowBytes(spec.hidden))) {}

  void run() {
    progress(env_.ranks, "LL tokens=" + std::to_string(spec_.tokens) +
                             " SMs=" + std::to_string(spec_.sms) + " (" + std::to_string(sets_) +
                             " input sets)");
    makeInputs();
    std::vector<const Traffic*> traffic;
    for (const LlSet& set : in_) traffic.push_back(&set.traffic);
    const CaseRows rows(env_.loop, traffic);
    nccl_ = timeNcclBaselines(env_, traffic, spec_.hidden);
    combine_args_.x = spec_.expert_out->get();
    combine_args_.out = out_.get();
    combine_args_.num_sms = spec_.call_sms;
    timeDispatchCombine(rows);
    if (env_.graph) timeGraph(rows);
  }

 private:
  size_t setOf(int it) const { return static_cast<size_t>(it % sets_); }
  RowSpec row(const std::string& op, const std::string& dtype) const {
    return {op, dtype, spec_.tokens, spec_.hidden, spec_.sms, sets_};
  }
  LlDispatchArgs dispatchArgs(const LlSet& set, bool fp8) const {
    LlDispatchArgs a;
    a.x = set.x.get();
    a.num_tokens = spec_.tokens;
    a.topk = TopkView{set.idx.get(), IndexType::kInt64, spec_.tokens, env_.work.topk};
    a.topk_weights = set.weights.as<float>();
    a.use_fp8 = fp8;
    a.num_sms = spec_.call_sms;
    return a;
  }

  void makeInputs();
  void timeDispatchCombine(const CaseRows& rows);
  void timeSplit(const CaseRows& rows);
  void timeGraph(const CaseRows& rows);

  const CaseEnv& env_;
  EpBuffer& buffer_;
  const LlCaseSpec& spec_;
  const int sets_;
  std::vector<LlSet> in_;
  DeviceMemory out_;
  LlCombineArgs combine_args_;
  NcclTimes nccl_;
};

void LlCase::makeInputs() {
  const size_t elements = static_cast<size_t>(spec_.tokens) * spec_.hidden;
  in_.resize(static_cast<size_t>(sets_));
  for (int s = 0; s < sets_; ++s) {
    LlSet& set = in_[static_cast<size_t>(s)];
    const uint64_t base =
        seedFor(env_.work.seed, {static_cast<uint64_t>(env_.ranks.rank), 4,
                                 static_cast<uint64_t>(spec_.case_id), static_cast<uint64_t>(s)});
    Routing routing = makeRouting(env_.work, env_.ranks.size, spec_.tokens, base);
    set.idx = upload(routing.idx);
    set.weights = upload(routing.weights);
    set.x = DeviceMemory(elements * 2);
    fillRandomBf16(set.x.get(), elements, seedFor(base, {1}), env_.stream);
    // The LL kernel sends a token once per destination rank: the same pairs as HT's rows.
    set.traffic = gatherTraffic(env_.ranks, routing.dest_tokens);
  }
  out_ = DeviceMemory(elements * 2);
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(env_.stream));
}

// LL dispatch and combine must alternate: each op gets its own events inside one loop. The
// combine row comes from the BF16 loop (its work does not depend on the dispatch dtype).
// The combine after the BF16 dispatch weighs by the dispatch's weights; the one after the FP8
// dispatch takes LlCombineArgs::topk_weights (DeepEP's low_latency_combine form, which pushes the
// weights to the expert ranks first): "ll combine (weights)". The combine moves BF16 either way.
void LlCase::timeDispatchCombine(const CaseRows& rows) {
  std::vector<float> combine_samples[2];
  for (bool fp8 : {false, true}) {
    TimedLoop loop(env_.loop, env_.stream, 2);
    loop.run(buffer_, [&](int it) {
      const LlSet& set = in_[setOf(it)];
      const LlDispatchArgs a = dispatchArgs(set, fp8);
      LlCombineArgs c = combine_args_;
      if (fp8) c.topk_weights = set.weights.as<float>();
      loop.start(0);
      buffer_.lowLatencyDispatch(a, env_.stream);
      loop.stop(0);
      loop.start(1);
      buffer_.lowLatencyCombine(c, env_.stream);
      loop.stop(1);
    });
    env_.rows.add(row("ll dispatch", fp8 ? "fp8" : "bf16"), loop.samples(0),
                  rows.bytes(fp8 ? fp8RowBytes(spec_.hidden) : bf16RowBytes(spec_.hidden)),
                  fp8 ? nccl_.fp8 : nccl_.bf16);
    combine_samples[fp8 ? 1 : 0] = loop.samples(1);
  }
  for (bool weights : {false, true}) {
    env_.rows.add(row(weights ? "ll combine (weights)" : "ll combine", "bf16"),
                  combine_samples[weights ? 1 : 0], rows.bytes(bf16RowBytes(spec_.hidden)),
                  nccl_.combine);
  }
  timeSplit(rows);
}

// Each op called in its two phases back to back (LlPhase::kSend, then kRecv; DeepEP's
// return_recv_hook form with no work between): the send and the receive kernels of the split
// path, timed together.
void LlCase::timeSplit(const CaseRows& rows) {
  TimedLoop loop(env_.loop, env_.stream, 2);
  loop.run(buffer_, [&](int it) {
    const LlDispatchArgs a = dispatchArgs(in_[setOf(it)], false);
    loop.start(0);
    buffer_.lowLatencyDispatch(a, env_.stream, LlPhase::kSend);
    buffer_.lowLatencyDispatch(a, env_.stream, LlPhase::kRecv);
    loop.stop(0);
    loop.start(1);
    buffer_.lowLatencyCombine(combine_args_, env_.stream, LlPhase::kSend);
    buffer_.lowLatencyCombine(combine_args_, env_.stream, LlPhase::kRecv);
    loop.stop(1);
  });
  const Bytes bytes = rows.bytes(bf16RowBytes(spec_.hidden));
  env_.rows.add(row("ll dispatch (split)", "bf16"), loop.samples(0), bytes, nccl_.bf16);
  env_.rows.add(row("ll combine (split)", "bf16"), loop.samples(1), bytes, nccl_.combine);
}

void LlCase::timeGraph(const CaseRows& rows) {
  std::vector<GraphExec> graphs;
  for (int s = 0; s < sets_; ++s) {
    const LlDispatchArgs a = dispatchArgs(in_[static_cast<size_t>(s)], false);
    graphs.push_back(captureGraph(env_.stream, [&] {
      buffer_.lowLatencyDispatch(a, env_.stream);
      buffer_.lowLatencyCombine(combine_args_, env_.stream);
    }));
  }
  const std::vector<float> samples = timeEach(
      env_.loop, env_.stream, buffer_, [&](int it) { graphs[setOf(it)].launch(env_.stream); });
  env_.rows.add(row("ll graph d+c", "bf16"), samples, rows.bytes(bf16RowBytes(spec_.hidden), 2.0),
                nccl_.round_trip);
}

}  // namespace

void runLlCase(const CaseEnv& env, EpBuffer& buffer, const LlCaseSpec& spec) {
  LlCase(env, buffer, spec).run();
}

}  // namespace epcomm::bench
