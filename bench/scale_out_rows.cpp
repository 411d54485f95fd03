// SPDX-License-Identifier: Apache-2.0
// ep_bench across nodes (scale_out_rows.hpp). Bytes: network bytes per rank = the (token, other
// node) pairs of this rank's routing x the bytes of one bucket row (dispatch: the BF16 row plus
// top-k ids and weights, kernels/node_protocol.hpp; combine: the BF16 row); the maximum over
// ranks. NVLink bytes inside a node and the rank's own node are not counted. Times are CUDA events
// around each call on one stream (the HT ops wait on the host for the network leg), median per
// rank, then the maximum over ranks, as the other rows (docs/benchmarks.md, Timing).
#include "scale_out_rows.hpp"

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "epcomm/buffer.hpp"
#include "kernels/node_protocol.hpp"
#include "link_bench.hpp"
#include "timing.hpp"
#include "traffic.hpp"
#if EPCOMM_BENCH_HAVE_SCALE_OUT
#include "epcomm/nccl.hpp"
#endif

namespace epcomm::bench {
#if EPCOMM_BENCH_HAVE_SCALE_OUT
namespace {

// (token, node other than this rank's) pairs of one routing.
int64_t remoteNodeRows(const Routing& r, int topk, int experts_per_rank, const core::Topology& t) {
  int64_t rows = 0;
  const size_t tokens = topk > 0 ? r.idx.size() / static_cast<size_t>(topk) : 0;
  std::vector<char> hit(static_cast<size_t>(t.num_nodes));
  for (size_t tok = 0; tok < tokens; ++tok) {
    std::fill(hit.begin(), hit.end(), 0);
    for (int k = 0; k < topk; ++k) {
      const int64_t e = r.idx[tok * static_cast<size_t>(topk) + static_cast<size_t>(k)];
      if (e < 0) continue;
      const int n = t.node_of[static_cast<size_t>(e / experts_per_rank)];
      if (n == t.node || hit[static_cast<size_t>(n)]) continue;
      hit[static_cast<size_t>(n)] = 1;
      ++rows;
    }
  }
  return rows;
}

// One case's inputs on this rank: routing, BF16 rows (random), top-k ids and weights, and an
// output buffer; `salt` keeps the HT and LL draws apart.
struct CaseInputs {
  Routing routing;
  DeviceMemory x, out, idx, weights;
  TopkView topk;

  CaseInputs(const Options& o, const Ranks& ranks, int tokens, uint64_t salt, cudaStream_t stream) {
    const Workload work{o.topk, o.experts, o.skew, o.seed};
    const uint64_t me = static_cast<uint64_t>(ranks.rank);
    routing = makeRouting(work, ranks.size, tokens, seedFor(o.seed, {me, 16, salt}));
    const size_t elements = static_cast<size_t>(tokens) * static_cast<size_t>(o.hidden);
    x = DeviceMemory(std::max<size_t>(elements * 2, 16));
    out = DeviceMemory(std::max<size_t>(elements * 2, 16));
    fillRandomBf16(x.get(), elements, seedFor(o.seed, {me, 16, salt + 1}), stream);
    idx = upload(routing.idx);
    weights = upload(routing.weights);
    topk.idx = idx.get();
    topk.idx_type = IndexType::kInt64;
    topk.num_tokens = tokens;
    topk.num_topk = o.topk;
  }
};

struct ScaleOutRow {
  std::string op;
  int tokens = 0;
  Stats time;
  double net_bytes = 0;  // per rank, max over ranks
};

void printRows(const std::vector<ScaleOutRow>& rows, const core::Topology& t, const Options& o) {
  std::printf("\nep_bench across nodes: %s, hidden %d, top-%d of %d experts, BF16\n",
              t.describe().c_str(), o.hidden, o.topk, o.experts);
  std::printf("%-14s %7s %10s %10s %10s %14s %12s\n", "op", "tokens", "med us", "min us", "max us",
              "net MB/rank", "net GB/s");
  for (const ScaleOutRow& r : rows) {
    const double gbps = r.time.med_us > 0 ? r.net_bytes / (r.time.med_us * 1e3) : 0.0;
    std::printf("%-14s %7d %10.1f %10.1f %10.1f %14.3f %12.2f\n", r.op.c_str(), r.tokens,
                r.time.med_us, r.time.min_us, r.time.max_us, r.net_bytes / 1e6, gbps);
  }
  std::printf(
      "net MB/rank = (token, other node) pairs x bucket row bytes (dispatch: BF16 row + top-k ids "
      "and weights; combine: BF16 row), max over ranks; net GB/s = that / median time. "
      "Nodes simulated with EPCOMM_HOSTID on one host talk over NCCL's socket transport: these "
      "times say nothing about RDMA (docs/scale-out.md §4 has the model at 400 Gb/s per GPU). "
      "No JSON for these rows yet.\n");
  std::fflush(stdout);
}

}  // namespace
#endif

int runScaleOutRows(const Options& o, const Ranks& ranks, Bootstrap& bootstrap,
                    const Machine& machine, const core::Topology& topology) {
#if !EPCOMM_BENCH_HAVE_SCALE_OUT
  (void)bootstrap;
  (void)machine;
  (void)o;
  if (ranks.root()) {
    std::fprintf(stderr,
                 "ep_bench: error: the ranks span %s; this ep_bench was built without "
                 "epcomm_nccl (NCCL >= 2.28), which runs EpBuffer across nodes\n",
                 topology.describe().c_str());
  }
  return 1;
#else
  nccl::enableScaleOut();
  BufferConfig config;
  config.device = machine.device;
  config.hidden = o.hidden;
  config.num_experts = o.experts;
  config.max_topk = o.topk;
  config.max_tokens_per_rank = o.tokens;
  config.ll_max_tokens_per_rank = o.ll ? o.ll_tokens : 0;
  config.mem_mode = parseMemMode(o.mem_mode, "--mem-mode");
  progress(ranks, "creating EpBuffer across " + topology.describe());
  EpBuffer buffer(bootstrap, config);
  const OwnedStream stream = OwnedStream::create();
  const cudaStream_t s = stream.get();
  const Iterations loop{o.warmup, o.iters};
  const int experts_per_rank = o.experts / ranks.size;
  const node::RowLayout row = node::rowLayout(o.hidden, 2, o.topk);
  std::vector<ScaleOutRow> rows;

  auto addPair = [&](const std::string& what, int tokens, TimedLoop& timed, int64_t net_rows,
                     double dispatch_row_bytes) {
    const double net = static_cast<double>(net_rows);
    rows.push_back({what + " dispatch", tokens, reduceStats(ranks, summarize(timed.samples(0))),
                    allMax(ranks, net * dispatch_row_bytes)});
    rows.push_back({what + " combine", tokens, reduceStats(ranks, summarize(timed.samples(1))),
                    allMax(ranks, net * static_cast<double>(o.hidden) * 2)});
  };

  {  // HT
    progress(ranks, "HT across nodes, tokens=" + std::to_string(o.tokens));
    const CaseInputs in(o, ranks, o.tokens, 1, s);
    DispatchArgs a;
    a.x = in.x.get();
    a.num_tokens = o.tokens;
    a.topk = in.topk;
    a.topk_weights = in.weights.as<float>();
    EpHandle handle = buffer.createHandle();
    const DispatchResult res = buffer.dispatch(a, handle, s);
    CombineArgs c;
    c.x = res.combine_input;  // the received rows as expert outputs: zero-copy
    c.out = in.out.get();
    TimedLoop timed(loop, s, 2);
    timed.run(buffer, [&](int) {
      timed.start(0);
      buffer.dispatch(a, handle, s);
      timed.stop(0);
      timed.start(1);
      buffer.combine(c, handle, s);
      timed.stop(1);
    });
    addPair("HT", o.tokens, timed, remoteNodeRows(in.routing, o.topk, experts_per_rank, topology),
            static_cast<double>(row.row_bytes));
  }
  if (o.ll) {
    progress(ranks, "LL across nodes, tokens=" + std::to_string(o.ll_tokens));
    const CaseInputs in(o, ranks, o.ll_tokens, 3, s);
    LlDispatchArgs a;
    a.x = in.x.get();
    a.num_tokens = o.ll_tokens;
    a.topk = in.topk;
    a.topk_weights = in.weights.as<float>();
    TimedLoop timed(loop, s, 2);
    timed.run(buffer, [&](int) {
      timed.start(0);
      const LlDispatchResult res = buffer.lowLatencyDispatch(a, s);
      timed.stop(0);
      LlCombineArgs c;
      c.x = res.recv_x;  // the received rows as expert outputs
      c.out = in.out.get();
      timed.start(1);
      buffer.lowLatencyCombine(c, s);
      timed.stop(1);
    });
    // LL rows carry the same bucket row (top-k padded to max_topk == --topk here).
    addPair("LL", o.ll_tokens, timed,
            remoteNodeRows(in.routing, o.topk, experts_per_rank, topology),
            static_cast<double>(row.row_bytes));
  }
  if (ranks.root()) printRows(rows, topology, o);
  return 0;
#endif
}

}  // namespace epcomm::bench
