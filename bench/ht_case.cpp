// SPDX-License-Identifier: Apache-2.0
// One HT case: layout, dispatch (BF16/FP8, with and without the layout), combine (zero-copy and
// copy-in) and the graph round trip at one token count and hidden size, for every SM budget.
#include <algorithm>
#include <string>
#include <utility>

#include "cases.hpp"
#include "epcomm/epcomm.hpp"

namespace epcomm::bench {

namespace {

constexpr int kCopyInBuffers = 3;

struct HtSet {
  DeviceMemory x_bf16;   // [tokens, hidden]
  DeviceMemory x_fp8;    // [tokens, hidden]
  DeviceMemory scales;   // [tokens, hidden / 128] float32
  DeviceMemory idx;      // [tokens, topk] int64
  DeviceMemory weights;  // [tokens, topk] float32
  std::vector<int> dest_tokens;
  Traffic traffic;
  // Expert-major: rows are (token, expert) pairs; recv_rows / peer_send_rows count pairs.
  Traffic pair_traffic;
};

// Per destination rank, this rank's (token, distinct expert) pairs on it: the rows an
// expert-major dispatch sends there.
std::vector<int> destPairs(const std::vector<int64_t>& idx, int tokens, int topk, int experts,
                           int ranks) {
  std::vector<int> pairs(static_cast<size_t>(ranks), 0);
  const int local = experts / ranks;
  for (int t = 0; t < tokens; ++t) {
    const int64_t* row = idx.data() + static_cast<size_t>(t) * topk;
    for (int k = 0; k < topk; ++k) {
      if (row[k] < 0 || std::find(row, row + k, row[k]) != row + k) continue;
      ++pairs[static_cast<size_t>(row[k] / local)];
    }
  }
  return pairs;
}

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

CombineArgs combineArgs(const void* x, const float* weights, void* out, int sms) {
  CombineArgs a;
  a.x = x;
  a.scale_weights = weights;
  a.out = out;
  a.num_sms = sms;
  return a;
}

// "<what> check failed on rank R, input set S: <name> = <got>, the <source> says <expected>".
[[noreturn]] void countMismatch(int rank, int set, const char* what, const std::string& name,
                                int64_t got, const char* source, int64_t expected) {
  throw Error(ErrorCode::kInternal,
              std::string(what) + " check failed on rank " + std::to_string(rank) + ", input set " +
                  std::to_string(set) + ": " + name + " = " + std::to_string(got) + ", the " +
                  source + " says " + std::to_string(expected));
}

class HtCase {
 public:
  HtCase(const CaseEnv& env, EpBuffer& buffer, const HtCaseSpec& spec)
      : env_(env),
        buffer_(buffer),
        spec_(spec),
        topk_(env.work.topk),
        sets_(numInputSets(env.l2_bytes,
                           static_cast<size_t>(spec.tokens) * bf16RowBytes(spec.hidden))) {}

  void run() {
    progress(env_.ranks, "HT tokens=" + std::to_string(spec_.tokens) +
                             " hidden=" + std::to_string(spec_.hidden) + " (" +
                             std::to_string(sets_) + " input sets)");
    makeInputs();
    checkCounts();
    fillExpertOutputs();
    std::vector<const Traffic*> traffic;
    for (const HtSet& set : in_) traffic.push_back(&set.traffic);
    const CaseRows rows(env_.loop, traffic);
    nccl_ = timeNcclBaselines(env_, traffic, spec_.hidden);
    timeLayout();
    std::vector<const Traffic*> pair_traffic;
    for (const HtSet& set : in_) pair_traffic.push_back(&set.pair_traffic);
    const CaseRows pair_rows(env_.loop, pair_traffic);
    for (int sms : spec_.sms) {
      timeDispatches(sms, rows);
      timeCombines(sms, rows);
      if (sms != spec_.sms.front()) continue;  // the other budgets: dispatch and combine only
      if (spec_.expert_major) timeExpertMajor(sms, pair_rows);
      if (env_.graph) timeGraph(sms, rows);
    }
    if (spec_.main_case) timeZeroTokens();
  }

 private:
  size_t setOf(int it) const { return static_cast<size_t>(it % sets_); }
  RowSpec row(const std::string& op, const std::string& dtype, int sms) const {
    return {op, dtype, spec_.tokens, spec_.hidden, sms, sets_};
  }
  size_t elements() const { return static_cast<size_t>(spec_.tokens) * spec_.hidden; }

  void makeInputs();
  void checkCounts();
  void fillExpertOutputs();
  void timeLayout();
  void timeDispatches(int sms, const CaseRows& rows);
  void timeCombines(int sms, const CaseRows& rows);
  void timeGraph(int sms, const CaseRows& rows);
  void timeExpertMajor(int sms, const CaseRows& pair_rows);
  void timeZeroTokens();

  const CaseEnv& env_;
  EpBuffer& buffer_;
  const HtCaseSpec& spec_;
  const int topk_;
  const int sets_;
  std::vector<HtSet> in_;
  std::vector<EpHandle> handles_;
  void* combine_input_ = nullptr;  // DispatchResult::combine_input (zero-copy combine)
  int64_t capacity_ = 0;           // its rows
  int64_t max_recv_ = 0;           // most rows received by this rank over the sets
  std::vector<DeviceMemory> copy_in_;
  DeviceMemory out_;
  NcclTimes nccl_;
};

void HtCase::makeInputs() {
  const cudaStream_t stream = env_.stream;
  const uint64_t rank = static_cast<uint64_t>(env_.ranks.rank);
  const size_t num_scales = static_cast<size_t>(spec_.tokens) * (spec_.hidden / kFp8BlockSize);
  in_.resize(static_cast<size_t>(sets_));
  handles_.reserve(static_cast<size_t>(sets_));
  for (int s = 0; s < sets_; ++s) {
    HtSet& set = in_[static_cast<size_t>(s)];
    const uint64_t base = seedFor(
        env_.work.seed, {rank, 1, static_cast<uint64_t>(spec_.case_id), static_cast<uint64_t>(s)});
    Routing routing = makeRouting(env_.work, env_.ranks.size, spec_.tokens, base);
    set.idx = upload(routing.idx);
    set.weights = upload(routing.weights);
    set.dest_tokens = std::move(routing.dest_tokens);
    set.x_bf16 = DeviceMemory(elements() * 2);
    set.x_fp8 = DeviceMemory(elements());
    set.scales = DeviceMemory(num_scales * 4);
    fillRandomBf16(set.x_bf16.get(), elements(), seedFor(base, {1}), stream);
    fillRandomFp8(set.x_fp8.get(), elements(), seedFor(base, {2}), stream);
    fillRandomScales(set.scales.as<float>(), num_scales, seedFor(base, {3}), stream);
    set.traffic = gatherTraffic(env_.ranks, set.dest_tokens);
    set.pair_traffic = gatherTraffic(env_.ranks, destPairs(routing.idx, spec_.tokens, topk_,
                                                           env_.work.experts, env_.ranks.size));
    handles_.push_back(buffer_.createHandle());
  }
}

// One exact-count dispatch per set: lays out every handle, and checks the library's counts
// against the host routing, so the byte counts of the rows are the bytes the op really moved.
void HtCase::checkCounts() {
  std::vector<int32_t> device_counts(static_cast<size_t>(env_.ranks.size));
  for (int s = 0; s < sets_; ++s) {
    const HtSet& set = in_[static_cast<size_t>(s)];
    EpHandle& handle = handles_[static_cast<size_t>(s)];
    DispatchArgs a = dispatchArgs(set, spec_.tokens, topk_, DType::kBF16, true, spec_.sms.front());
    a.exact_count = true;
    const DispatchResult result = buffer_.dispatch(a, handle, env_.stream);
    EPCOMM_CUDA_CHECK(cudaMemcpyAsync(device_counts.data(), handle.numTokensPerRank(),
                                      device_counts.size() * sizeof(int32_t),
                                      cudaMemcpyDeviceToHost, env_.stream));
    buffer_.sync(env_.stream);
    for (int d = 0; d < env_.ranks.size; ++d) {
      const auto i = static_cast<size_t>(d);
      if (device_counts[i] != set.dest_tokens[i]) {
        countMismatch(env_.ranks.rank, s, "layout", "numTokensPerRank()[" + std::to_string(d) + "]",
                      device_counts[i], "host routing", set.dest_tokens[i]);
      }
    }
    if (result.num_recv_tokens_host != set.traffic.recv_rows) {
      countMismatch(env_.ranks.rank, s, "dispatch", "num_recv_tokens_host",
                    result.num_recv_tokens_host, "gathered routing", set.traffic.recv_rows);
    }
    combine_input_ = result.combine_input;
    capacity_ = result.capacity;
    max_recv_ = std::max(max_recv_, set.traffic.recv_rows);
  }
}

// Expert outputs: written once into the zero-copy combine input (every row, random non-zero),
// and into separate buffers for the copy-in combine.
void HtCase::fillExpertOutputs() {
  const uint64_t seed = env_.work.seed;
  const uint64_t rank = static_cast<uint64_t>(env_.ranks.rank);
  const uint64_t case_id = static_cast<uint64_t>(spec_.case_id);
  fillRandomBf16(combine_input_, static_cast<size_t>(capacity_) * spec_.hidden,
                 seedFor(seed, {rank, 2, case_id}), env_.stream);
  for (int i = 0; i < kCopyInBuffers; ++i) {
    const size_t n = static_cast<size_t>(std::max<int64_t>(max_recv_, 1)) * spec_.hidden;
    copy_in_.emplace_back(n * 2);
    fillRandomBf16(copy_in_.back().get(), n,
                   seedFor(seed, {rank, 3, case_id, static_cast<uint64_t>(i)}), env_.stream);
  }
  out_ = DeviceMemory(std::max<size_t>(elements() * 2, 16));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(env_.stream));
}

// Local, no SM budget.
void HtCase::timeLayout() {
  TimedLoop loop(env_.loop, env_.stream, 1);
  loop.run(buffer_, [&](int it) {
    const HtSet& set = in_[setOf(it)];
    loop.start(0);
    buffer_.layout(TopkView{set.idx.get(), IndexType::kInt64, spec_.tokens, topk_},
                   handles_[setOf(it)], env_.stream);
    loop.stop(0);
  });
  env_.rows.add(row("layout", "-", 0), loop.samples(0), std::nullopt, std::nullopt);
}

void HtCase::timeDispatches(int sms, const CaseRows& rows) {
  for (bool cached : {false, true}) {
    for (DType dtype : {DType::kBF16, DType::kFP8E4M3}) {
      const bool fp8 = dtype == DType::kFP8E4M3;
      TimedLoop loop(env_.loop, env_.stream, 1);
      loop.run(buffer_, [&](int it) {
        const DispatchArgs a =
            dispatchArgs(in_[setOf(it)], spec_.tokens, topk_, dtype, !cached, sms);
        loop.start(0);
        buffer_.dispatch(a, handles_[setOf(it)], env_.stream);
        loop.stop(0);
      });
      env_.rows.add(row(cached ? "dispatch (cached)" : "dispatch", fp8 ? "fp8" : "bf16", sms),
                    loop.samples(0),
                    rows.bytes(fp8 ? fp8RowBytes(spec_.hidden) : bf16RowBytes(spec_.hidden)),
                    fp8 ? nccl_.fp8 : nccl_.bf16);
    }
  }
}

// Each combine needs the matching dispatch (untimed, cached) just before it.
void HtCase::timeCombines(int sms, const CaseRows& rows) {
  for (bool zero_copy : {true, false}) {
    TimedLoop loop(env_.loop, env_.stream, 1);
    loop.run(buffer_, [&](int it) {
      const HtSet& set = in_[setOf(it)];
      EpHandle& handle = handles_[setOf(it)];
      buffer_.dispatch(dispatchArgs(set, spec_.tokens, topk_, DType::kBF16, false, sms), handle,
                       env_.stream);
      const void* x =
          zero_copy ? combine_input_ : copy_in_[static_cast<size_t>(it % kCopyInBuffers)].get();
      const CombineArgs a = combineArgs(x, set.weights.as<float>(), out_.get(), sms);
      loop.start(0);
      buffer_.combine(a, handle, env_.stream);
      loop.stop(0);
    });
    env_.rows.add(row(zero_copy ? "combine" : "combine (copy-in)", "bf16", sms), loop.samples(0),
                  rows.bytes(bf16RowBytes(spec_.hidden)), nccl_.combine);
  }
}

void HtCase::timeGraph(int sms, const CaseRows& rows) {
  progress(env_.ranks, "  graph d+c sms=" + std::to_string(sms));
  std::vector<GraphExec> graphs;
  for (int s = 0; s < sets_; ++s) {
    const HtSet& set = in_[static_cast<size_t>(s)];
    EpHandle& handle = handles_[static_cast<size_t>(s)];
    graphs.push_back(captureGraph(env_.stream, [&] {
      buffer_.dispatch(dispatchArgs(set, spec_.tokens, topk_, DType::kBF16, false, sms), handle,
                       env_.stream);
      buffer_.combine(combineArgs(combine_input_, set.weights.as<float>(), out_.get(), sms), handle,
                      env_.stream);
    }));
  }
  const std::vector<float> samples = timeEach(
      env_.loop, env_.stream, buffer_, [&](int it) { graphs[setOf(it)].launch(env_.stream); });
  env_.rows.add(row("graph d+c", "bf16", sms), samples, rows.bytes(bf16RowBytes(spec_.hidden), 2.0),
                nccl_.round_trip);
}

// Expert-major dispatch (with its layout, as the "dispatch" row) and zero-copy combine (after an
// untimed cached expert-major dispatch). Bytes: (token, expert) pair rows, both definitions as for
// rank-major, so the GB/s columns compare directly with the rank-major rows (issue 11 item 4).
void HtCase::timeExpertMajor(int sms, const CaseRows& pair_rows) {
  {
    TimedLoop loop(env_.loop, env_.stream, 1);
    loop.run(buffer_, [&](int it) {
      DispatchArgs a = dispatchArgs(in_[setOf(it)], spec_.tokens, topk_, DType::kBF16, true, sms);
      a.expert_major = true;
      loop.start(0);
      buffer_.dispatch(a, handles_[setOf(it)], env_.stream);
      loop.stop(0);
    });
    env_.rows.add(row("dispatch expert-major", "bf16", sms), loop.samples(0),
                  pair_rows.bytes(bf16RowBytes(spec_.hidden)), std::nullopt);
  }
  TimedLoop loop(env_.loop, env_.stream, 1);
  loop.run(buffer_, [&](int it) {
    const HtSet& set = in_[setOf(it)];
    EpHandle& handle = handles_[setOf(it)];
    DispatchArgs d = dispatchArgs(set, spec_.tokens, topk_, DType::kBF16, false, sms);
    d.expert_major = true;
    buffer_.dispatch(d, handle, env_.stream);
    const CombineArgs a = combineArgs(combine_input_, set.weights.as<float>(), out_.get(), sms);
    loop.start(0);
    buffer_.combine(a, handle, env_.stream);
    loop.stop(0);
  });
  env_.rows.add(row("combine expert-major", "bf16", sms), loop.samples(0),
                pair_rows.bytes(bf16RowBytes(spec_.hidden)), std::nullopt);
}

// The fixed cost of a round trip: dispatch (with its layout) and combine of 0 tokens.
void HtCase::timeZeroTokens() {
  const int sms = spec_.sms.front();
  EpHandle handle = buffer_.createHandle();
  // Valid (unused) pointers, so the call takes exactly the path of a normal dispatch.
  const DispatchArgs d = dispatchArgs(in_.front(), 0, topk_, DType::kBF16, true, sms);
  const CombineArgs cb = combineArgs(combine_input_, nullptr, out_.get(), sms);
  const std::vector<float> samples = timeEach(env_.loop, env_.stream, buffer_, [&](int) {
    buffer_.dispatch(d, handle, env_.stream);
    buffer_.combine(cb, handle, env_.stream);
  });
  env_.rows.add({"d+c 0 tokens", "bf16", 0, spec_.hidden, sms, 1}, samples, std::nullopt,
                std::nullopt);
}

}  // namespace

void runHtCase(const CaseEnv& env, EpBuffer& buffer, const HtCaseSpec& spec) {
  HtCase(env, buffer, spec).run();
}

}  // namespace epcomm::bench
