// SPDX-License-Identifier: Apache-2.0
// The buffer core every engine builds on: the symmetric memory and the peer table, the control
// words and host-mapped state the kernels share with the host (kernels/protocol.hpp), the device
// error record and the broken flag, the device barrier, and the agreement on rejected calls.
// It knows nothing of HT or LL state; the engines (ht/ht_engine.hpp, ll/ll_engine.hpp) own that.
// Internal.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "core/buffer_layout.hpp"
#include "core/perf_flags.hpp"
#include "cuda_resources.hpp"
#include "epcomm/bootstrap.hpp"
#include "epcomm/config.hpp"
#include "epcomm/export.hpp"
#include "kernels/launch.hpp"
#include "kernels/stage_times.hpp"
#include "memory/symmetric_memory.hpp"

namespace epcomm {

// Host-mapped words the kernels write and the host polls.
struct HostMappedState {
  kernels::DeviceErrorRecord error;
  uint32_t abort;
  uint32_t pad;
  uint64_t ht_count;   // exact mode: kernels::hostCount(received rows)
  uint64_t rejection;  // kernels::rejectionReport() of the last call a peer rejected, 0 if none
};

struct EPCOMM_LOCAL BufferCore {
  BufferCore(Bootstrap& bootstrap, const BufferConfig& config);
  ~BufferCore();
  BufferCore(const BufferCore&) = delete;
  BufferCore& operator=(const BufferCore&) = delete;

  // Throws the recorded device error, or kBroken if the buffer failed earlier, or (once per
  // call) kRemote for a call of this rank that a peer's rejection stopped; the buffer stays
  // usable after that one.
  void checkUsable() const;
  // Rejects bad input of a collective call (see "Rejected calls" in kernels/protocol.hpp): skips
  // the call in stream order on `stream`, which tells every peer so that their waits of that
  // call stop, waits (bounded) until every peer is past the call, and throws InvalidArgument
  // with `message`. The buffer stays usable on every rank; only when the peers cannot be told
  // (during graph capture, a failed launch, a peer that never gets there) is it broken.
  [[noreturn]] void rejectInput(cudaStream_t stream, kernels::OpId op, const std::string& message);
  // Waits for `stream` with the deadline, surfacing device-side errors.
  void waitStream(cudaStream_t stream, const char* what);
  // The SM budget of a call: the call's value, else the buffer's, else `fallback`; rejects
  // the call (rejectInput) when out of range.
  int resolveSms(cudaStream_t stream, kernels::OpId op, int call_value, int buffer_value,
                 int fallback, const char* what);
  // Called after the last launch of every op: the teardown waits for this stream position
  // (bounded) instead of the whole device. All ops of a buffer are ordered, so the last one
  // recorded completes after every earlier one.
  void trackWork(cudaStream_t stream);
  // Host-side deadline of a wait for the GPU: a little over the longest device-side deadline,
  // so that an expiring device wait records why first.
  double hostDeadlineS() const;
  // The device barrier across every rank, on `stream`.
  void barrier(cudaStream_t stream);

  std::string describeDeviceError(const kernels::DeviceErrorRecord& record) const;
  // The sticky part of checkUsable(): the device error record and the broken flag.
  void checkDeviceError() const;
  // rejectInput's collective part; returns what happened, for the message.
  std::string skipRejectedCall(kernels::OpId op, cudaStream_t stream);
  // The last call of `family` that rank `peer` completed or skipped (read through its mapping).
  uint64_t callsPassed(int peer, kernels::EpochSlot family);
  // Teardown: waits (bounded) for trackWork's event, aborting our waits if it takes too long;
  // false if our kernels still run after that.
  bool waitForOurWork();

  Bootstrap& bootstrap;
  ResolvedConfig resolved;
  PerfFlags perf;               // EPCOMM_PERF, read with the config (core/perf_flags.hpp)
  bool stage_times_on = false;  // EPCOMM_STAGE_TIMES, read with the config
  int rank = 0;
  int num_ranks = 1;
  int device = 0;
  int device_sms = 0;
  // The device has programmatic dependent launch (compute capability 9.0+,
  // kernels/dependent_launch.cuh): known here once, passed to the launches that use it.
  bool dependent_launch = false;
  // Ranks of this buffer whose GPU is this rank's (MPS, or several processes on one GPU). Their
  // kernels wait for each other, so together they must fit on the GPU at once: the default SM
  // budgets are divided among them (resolveSms).
  int ranks_on_device = 1;
  int num_local_experts = 0;
  BufferLayout layout;
  std::unique_ptr<memory::SymmetricMemory> memory;
  DeviceMemory peer_table;  // uint8_t*[num_ranks]
  MappedHostMemory host_mapped;
  OwnedStream control_stream;  // for the rejection notice, independent of user streams
  kernels::PeerContext peers{};
  // EPCOMM_STAGE_TIMES: uint64_t[kernels::kStageSlots] (kernels/stage_times.hpp), zeroed; empty
  // when off. peers.stage_times points at it.
  DeviceMemory stage_times;
  mutable bool broken = false;
  mutable std::string broken_reason;
  uint64_t generation = 0;  // process-wide creation counter: tells handles of old buffers apart
  OwnedEvent work_done;     // trackWork()
  bool work_tracked = false;
  mutable uint64_t surfaced_rejection = 0;  // (family, epoch) of the last kRemote raised
  // Told when a call of `family` ended on every rank without running (a rank rejected it): an
  // engine resets its call sequence (the LL engine's stage).
  std::function<void(kernels::EpochSlot family)> on_call_skipped;

  HostMappedState* hostState() const { return host_mapped.host<HostMappedState>(); }
  HostMappedState* hostStateOnDevice() const { return host_mapped.device<HostMappedState>(); }
  uint8_t* localBase() const { return static_cast<uint8_t*>(memory->local()); }
};

}  // namespace epcomm
