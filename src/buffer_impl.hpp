// EpBuffer's state, shared by the buffer core (buffer.cpp) and the op front-ends (ht_ops.cpp,
// ll_ops.cpp). Internal.
#pragma once

#include <memory>
#include <string>

#include "buffer_layout.hpp"
#include "cuda_resources.hpp"
#include "epcomm/buffer.hpp"
#include "kernels/launch.hpp"
#include "memory/symmetric_memory.hpp"

namespace epcomm {

// Host-mapped words the kernels write and the host polls.
struct HostMappedState {
  kernels::DeviceErrorRecord error;
  uint32_t abort;
  uint32_t pad;
  uint64_t ht_count;   // exact mode: (epoch << 32) | received rows
  uint64_t rejection;  // kernels::rejectionReport() of the last call a peer rejected, 0 if none
};

struct EPCOMM_LOCAL EpBuffer::Impl {
  Impl(Bootstrap& bootstrap, const BufferConfig& config);
  ~Impl();

  // Throws the recorded device error, or kBroken if the buffer failed earlier, or (once per
  // call) kRemote for a call of this rank that a peer's rejection stopped; the buffer stays
  // usable after that one.
  void checkUsable() const;
  // Rejects bad input of a collective call (see "Rejected calls" in kernels/launch.hpp): skips
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
  int rank = 0;
  int num_ranks = 1;
  int device = 0;
  int device_sms = 0;
  int num_local_experts = 0;
  BufferLayout layout;
  std::unique_ptr<memory::SymmetricMemory> memory;
  DeviceMemory peer_table;  // uint8_t*[num_ranks]
  MappedHostMemory host_mapped;
  OwnedStream control_stream;  // for the rejection notice, independent of user streams
  kernels::PeerContext peers{};
  mutable bool broken = false;
  mutable std::string broken_reason;
  uint64_t generation = 0;  // process-wide creation counter: tells handles of old buffers apart
  OwnedEvent work_done;     // trackWork()
  bool work_tracked = false;
  mutable uint64_t surfaced_rejection = 0;  // (family, epoch) of the last kRemote raised

  // LL call sequence: dispatch and combine alternate, each optionally split in send/recv.
  enum class LlStage { kIdle, kDispatchSent, kDispatched, kCombineSent };
  mutable LlStage ll_stage = LlStage::kIdle;  // reset by checkUsable() after a peer's rejection
  bool ll_use_fp8 = false;
  int ll_num_tokens = 0;

  HostMappedState* hostState() const { return host_mapped.host<HostMappedState>(); }
  uint8_t* localBase() const { return static_cast<uint8_t*>(memory->local()); }
};

// Which buffer made a handle: its address and generation, so a handle of a destroyed buffer is
// never taken for one of a new buffer that happens to get the same address.
class HandleOwner {
 public:
  HandleOwner& operator=(const EpBuffer::Impl* buffer) {
    buffer_ = buffer;
    generation_ = buffer != nullptr ? buffer->generation : 0;
    return *this;
  }
  // True only for the live buffer that made the handle.
  bool operator==(const EpBuffer::Impl* buffer) const {
    return buffer != nullptr && buffer_ == buffer && generation_ == buffer->generation;
  }
  bool operator!=(const EpBuffer::Impl* buffer) const { return !(*this == buffer); }

 private:
  const EpBuffer::Impl* buffer_ = nullptr;  // compared, never dereferenced
  uint64_t generation_ = 0;
};

struct EPCOMM_LOCAL EpHandle::Impl {
  HandleOwner owner;
  int num_ranks = 0;
  int num_experts = 0;
  int max_tokens = 0;
  int max_topk = 0;
  DeviceMemory memory;
  uint32_t* token_mask = nullptr;       // [max_tokens]
  int32_t* token_slot = nullptr;        // [max_tokens, R]
  bool* is_token_in_rank = nullptr;     // [max_tokens, R]
  int32_t* rank_counts = nullptr;       // [R]
  int32_t* expert_counts = nullptr;     // [E]
  int32_t* topk_copy = nullptr;         // [max_tokens, max_topk]
  int32_t* tile_counts = nullptr;       // layout scratch [layoutTiles(max_tokens), R]
  int32_t* count_matrix = nullptr;      // [R, R]
  int32_t* num_recv = nullptr;          // [1]
  int32_t* recv_rank_prefix = nullptr;  // [R + 1]
  int32_t* recv_expert_counts = nullptr;  // [L]
  // Host view of what the device holds.
  int num_tokens = -1;  // -1: no layout yet
  int num_topk = 0;
  bool dispatched = false;
};

}  // namespace epcomm
