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
  uint64_t ht_count;  // exact mode: (epoch << 32) | received rows
};

struct EpBuffer::Impl {
  Impl(Bootstrap& bootstrap, const BufferConfig& config);
  ~Impl();

  // Throws the recorded device error, or kBroken if the buffer failed earlier.
  void checkUsable() const;
  // Rejects bad input: tells every peer so their pending waits stop instead of timing out,
  // marks the buffer broken and throws InvalidArgument with `message`.
  [[noreturn]] void rejectInput(kernels::OpId op, const std::string& message);
  // Waits for `stream` with the deadline, surfacing device-side errors.
  void waitStream(cudaStream_t stream, const char* what);
  // The SM budget of a call: the call's value, else the buffer's, else `fallback`.
  int resolveSms(kernels::OpId op, int call_value, int buffer_value, int fallback,
                 const char* what);

  std::string describeDeviceError(const kernels::DeviceErrorRecord& record) const;

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

  // LL call sequence: dispatch and combine alternate, each optionally split in send/recv.
  enum class LlStage { kIdle, kDispatchSent, kDispatched, kCombineSent };
  LlStage ll_stage = LlStage::kIdle;
  bool ll_use_fp8 = false;
  int ll_num_tokens = 0;

  HostMappedState* hostState() const { return host_mapped.host<HostMappedState>(); }
  uint8_t* localBase() const { return static_cast<uint8_t*>(memory->local()); }
};

struct EpHandle::Impl {
  const EpBuffer::Impl* owner = nullptr;
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
