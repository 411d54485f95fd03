// SPDX-License-Identifier: Apache-2.0
// The rail transport (docs/scale-out.md §3): rows bucketed by destination node cross the network
// once per node, between the ranks of one rail (same local index, one per node), over the rail's
// NCCL communicator. Internal to epcomm_nccl.
//
// One call = (a) a count exchange: every rail rank publishes its per-node row counts (and its
// mode, row size and receive capacity) and the records are all-gathered over the rail
// (ncclAllGather), so every rank judges the same records with the same pure function
// (kernels/rail_protocol.hpp) and they all accept or all reject; then (b) the payload: one grouped
// ncclSend/ncclRecv round, each rank sending each node its bucket and receiving each node's rows,
// laid out by source node. Two modes:
//
//   exact       the records are copied to the host (a host sync, with a deadline) and judged
//               there; a fault throws before any payload is posted (on every rail rank: the
//               communicator stays usable). Payload sizes are exact; zero-row transfers are
//               skipped on both sides (both know the count). The host then waits for the payload
//               with the deadline. Compact layouts.
//   worst-case  no host sync, graph-capturable: a one-thread kernel judges the records on the
//               device, and every rank sends and receives max_rows rows per node whatever the
//               counts say, into fixed slots. Only the first recv_counts[s] rows of slot s are
//               meaningful. A fault zeroes every received count (nothing reads a row that was not
//               sent) and is reported by wait(). No NCCL transfer size depends on a peer's data,
//               so no peer can make this rank write outside its buffers.
//
// Either way the only sizes that reach NCCL come from this rank's own arguments or from records
// that passed the judge, so nothing another rank sends can make this rank write outside the
// receive buffer it passed.
//
// Deadlines (CONVENTIONS 7): every host wait is bounded by `timeout_s` (BufferConfig::timeout_s
// once this is inside an EpBuffer). Past it the rail communicator is aborted (ncclCommAbort: NCCL's
// kernels return, peers' waits on this rank end in their own deadline or error) and a TimeoutError
// names the rail peers the transfer was waiting for. An aborted rail is gone: every later call
// throws; create a new communicator (as after an intranode timeout, the buffer is broken).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cuda_resources.hpp"
#include "kernels/rail_protocol.hpp"
#include "nccl/rail_comms.hpp"

namespace epcomm::nccl {

enum class RailExchangeMode { kExact, kWorstCase };

struct RailExchangeArgs {
  RailExchangeMode mode = RailExchangeMode::kExact;
  // Bytes per row, the same on every rail rank: 1 .. INT32_MAX (a row is any fixed-size record:
  // hidden data, scales, top-k ids, weights and source index packed by the caller).
  int64_t row_bytes = 0;
  // Device, this rank's rows (layouts in kernels/rail_protocol.hpp): exact, node-major compact
  // (rows for node d after those for nodes < d); worst-case, rows for node d at d * max_rows.
  // Read-only, never null (any valid pointer when nothing is sent); must stay valid until the
  // call's work on `stream` is done.
  const void* send = nullptr;
  // Device int32 [num_nodes]: rows for each node (own node included; 0 is fine). Read on the
  // stream, so a kernel earlier on it may write them.
  const int32_t* send_counts = nullptr;
  // Device, the receive rows: exact, recv_capacity_rows rows, source-node-major compact (null
  // reads as a capacity of 0); worst-case, num_nodes * max_rows rows, rows from node s at
  // s * max_rows.
  void* recv = nullptr;
  // Exact: rows `recv` holds; the sum of the counts sent to this rank must fit (else the call
  // fails on every rail rank, naming the sender). Worst-case: >= num_nodes * max_rows.
  int64_t recv_capacity_rows = 0;
  // Worst-case: rows per (source node, destination node) slot, the same on every rail rank,
  // 1 .. INT32_MAX; every count must be <= it. Ignored in exact mode.
  int64_t max_rows = 0;
};

// What an exact call knows on the host once it returns (worst-case calls leave it empty; their
// counts are in recvCountsDevice()).
struct RailExchangeResult {
  std::vector<int32_t> recv_counts;   // [num_nodes]: rows received from each node
  std::vector<int64_t> recv_offsets;  // [num_nodes]: their first row in `recv`
  int64_t recv_rows = 0;              // sum of recv_counts
};

// One rail's exchange state: the device scratch of the count records, the verdict and the receive
// plan, and pinned host staging. Calls are collective over the rail (every rail rank calls, in the
// same order) and use one stream at a time: a call reuses the scratch of the previous one, so the
// caller orders them on one stream (or synchronizes). Move-only, not thread-safe.
class RailExchange {
 public:
  // Not collective; allocates on the current device. `rail` must outlive this object.
  RailExchange(RailComm& rail, double timeout_s);

  // Collective over the rail. Exact: returns when the payload has arrived (host sync) or throws:
  // InvalidArgument for a bad count this rank sent or must receive (the message names the
  // sending and receiving node and rank, the value and the limit), Error(kRemote) for one between
  // two other rail ranks, TimeoutError / Error(kSystem) after an abort. Worst-case: enqueues on
  // `stream` and returns at once (graph-capturable; arguments are still checked on the host and
  // throw InvalidArgument before anything is enqueued); call wait() to learn the verdict.
  // Arguments are checked on this rank only, before the collective starts: a rank that rejects
  // its own arguments leaves its rail peers waiting until their deadline, so a caller checks them
  // collectively first (as EpBuffer's ops do). Everything that depends on a peer's counts is
  // judged on every rank alike.
  RailExchangeResult exchange(const RailExchangeArgs& args, cudaStream_t stream);

  // Waits up to timeout_s for everything enqueued on `stream` (host sync, not capturable) and
  // throws as exchange() does if the last worst-case call's verdict was a fault. Past the
  // deadline the communicator is aborted and TimeoutError names the rail peers.
  void wait(cudaStream_t stream);

  // Device int32 [num_nodes] / int64 [num_nodes]: rows received from each node and their first
  // row in `recv` of the last call, judged (all zero after a fault); valid on the stream after the
  // call, until the next call.
  const int32_t* recvCountsDevice() const { return scratch_.as<int32_t>(recv_counts_off_); }
  const int64_t* recvOffsetsDevice() const { return scratch_.as<int64_t>(recv_offsets_off_); }

  int numNodes() const { return num_nodes_; }
  int node() const { return me_; }

  // Throws what a worst-case call with this verdict throws from wait() (payload_moved) or an exact
  // call before its payload (not): for a backend that judges the same records elsewhere (GIN).
  [[noreturn]] void raiseVerdict(const rail::RailVerdict& verdict, bool payload_moved) const {
    throwVerdict(verdict, payload_moved);
  }

 private:
  void launchRecordExchange(const RailExchangeArgs& args, cudaStream_t stream,
                            const std::vector<int>& others);
  // Polls the communicator until the call just made on it is enqueued (waitReady), naming `peers`.
  void enqueued(const std::vector<int>& peers, const std::string& phase);
  // Polls `event` and the communicator's async error until the event completes, up to timeout_s;
  // aborts and throws naming `peers` (global ranks) and `phase` otherwise.
  void waitEvent(cudaEvent_t event, const std::vector<int>& peers, const std::string& phase);
  // payload_moved: a worst-case call (the rows moved, the counts read 0), else nothing was sent.
  [[noreturn]] void throwVerdict(const rail::RailVerdict& verdict, bool payload_moved) const;
  std::vector<int> otherRanks() const;  // the rail's global ranks but this one
  std::string describe() const;         // "rail 1 (ranks 1,3; this rank is its rank 0)"

  RailComm* rail_;
  double timeout_s_;
  int num_nodes_;
  int me_;
  size_t record_off_ = 0, records_off_ = 0, verdict_off_ = 0, recv_counts_off_ = 0,
         recv_offsets_off_ = 0;
  DeviceMemory scratch_;
  MappedHostMemory host_;  // records (exact) / verdict (wait), then the exact receive plan
  OwnedEvent done_;
  bool verdict_pending_ = false;  // a worst-case call's verdict not yet read by wait()
};

namespace testing {
// Test hook: the next exchange() of this process publishes `value` as its count for node `node`
// (exact mode then also sizes its own sends by it), so a test can make one rank lie; use values
// the judge rejects. One-shot.
void corruptNextRailCount(int node, int32_t value);
// Takes the pending corruption (one-shot): node -1 when there is none. Every backend's record
// packing calls it, so the hook works whichever transport runs.
void takeRailCountCorruption(int32_t* node, int32_t* value);
}  // namespace testing

}  // namespace epcomm::nccl
