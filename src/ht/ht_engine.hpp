// SPDX-License-Identifier: Apache-2.0
// The HT engine: high-throughput dispatch and combine (docs/design.md §5). Owns the HT regions of
// the buffer and the handles (EpHandle::Impl); checks every argument before any launch and
// launches layout, dispatch and combine (kernels/layout.cu, kernels/intranode.cu). Internal.
#pragma once

#include <cstdint>
#include <memory>

#include "core/buffer_core.hpp"
#include "cuda_resources.hpp"
#include "epcomm/buffer.hpp"
#include "kernels/protocol.hpp"

namespace epcomm {

// Which buffer made a handle: its address and generation, so a handle of a destroyed buffer is
// never taken for one of a new buffer that happens to get the same address.
class HandleOwner {
 public:
  HandleOwner& operator=(const BufferCore* buffer) {
    buffer_ = buffer;
    generation_ = buffer != nullptr ? buffer->generation : 0;
    return *this;
  }
  // True only for the live buffer that made the handle.
  bool operator==(const BufferCore* buffer) const {
    return buffer != nullptr && buffer_ == buffer && generation_ == buffer->generation;
  }
  bool operator!=(const BufferCore* buffer) const { return !(*this == buffer); }

 private:
  const BufferCore* buffer_ = nullptr;  // compared, never dereferenced
  uint64_t generation_ = 0;
};

struct EPCOMM_LOCAL EpHandle::Impl {
  HandleOwner owner;
  int num_ranks = 0;
  int num_experts = 0;
  int max_tokens = 0;
  int max_topk = 0;
  DeviceMemory memory;
  uint32_t* token_mask = nullptr;         // [max_tokens, rankMaskWords(R)]
  int32_t* token_slot = nullptr;          // [max_tokens, R]
  bool* is_token_in_rank = nullptr;       // [max_tokens, R]
  int32_t* rank_counts = nullptr;         // [R]
  int32_t* expert_counts = nullptr;       // [E]
  int32_t* topk_copy = nullptr;           // [max_tokens, max_topk]
  int32_t* tile_counts = nullptr;         // layout scratch [layoutTiles(max_tokens), R]
  int32_t* tile_expert_counts = nullptr;  // layout scratch [layoutTiles(max_tokens), E]
  uint32_t* tiles_done = nullptr;         // layout scratch [1]
  uint64_t* layout_done = nullptr;  // [1] the epoch of the last dispatch that ran the layout itself
  int32_t* count_matrix = nullptr;  // [R, R]
  int32_t* num_recv = nullptr;      // [1]
  int32_t* recv_rank_prefix = nullptr;    // [R + 1]
  int32_t* recv_expert_counts = nullptr;  // [L]
  // Exact mode: the device writes the aligned per-expert counts here ([L], host-mapped) before
  // it publishes the row count (HostMappedState::ht_count).
  MappedHostMemory host_expert_counts;
  // Expert-major state (src/ht/ht_expert_major.cpp): its own allocation, made with the handle.
  DeviceMemory em_memory;
  int32_t* em_pair_pos = nullptr;     // [max_tokens, max_topk] row of (t, k) within its part
  int32_t* em_cursor = nullptr;       // [E] scratch of the pair positions
  int32_t* em_send_base = nullptr;    // [E] my first row in each expert's group on its rank
  int32_t* expert_offsets = nullptr;  // [L + 1] group starts on this rank
  bool expert_major = false;          // the last dispatch wrote expert-major rows
  // Host view of what the device holds.
  int num_tokens = -1;  // -1: no layout yet
  int num_topk = 0;
  bool dispatched = false;
  // Across nodes (core/scale_out.hpp): the hierarchical implementation's handle; everything
  // above then stays empty but num_tokens / num_topk.
  std::shared_ptr<void> scale_out;
};

// Shared by the rank-major and the expert-major dispatch (src/ht/ht_expert_major.cpp), after the
// dispatch kernel is queued:
// - copyReceivedRows: the optional caller copies of the received rows and FP8 scales
//   (DispatchArgs::recv_x_out / recv_scales_out; fixed_rows > 0: exactly that many rows).
// - receivedViews: the result views into the buffer and the handle (rank-major ones; the caller
//   adjusts what its layout changes).
// - waitHostCount: exact mode, polls the host-mapped count word until the device publishes it,
//   bounded by the host deadline; `what` names the call in the timeout message.
void copyReceivedRows(const BufferCore& b, const kernels::HtRegions& ht, const DispatchArgs& args,
                      int64_t x_row_bytes, int num_scales, const int32_t* num_recv, int fixed_rows,
                      int sms, cudaStream_t stream);
DispatchResult receivedViews(const BufferCore& b, const kernels::HtRegions& ht,
                             const EpHandle::Impl& h, bool fp8, bool has_topk);
int64_t waitHostCount(BufferCore& b, cudaStream_t stream, const char* what);

class EPCOMM_LOCAL HtEngine {
 public:
  explicit HtEngine(BufferCore& core);

  std::unique_ptr<EpHandle::Impl> createHandle() const;
  // `handle` may be null or foreign: the call is then rejected.
  void layout(const TopkView& topk, EpHandle::Impl* handle, cudaStream_t stream);
  DispatchResult dispatch(const DispatchArgs& args, EpHandle::Impl* handle, cudaStream_t stream);
  void combine(const CombineArgs& args, const EpHandle::Impl* handle, cudaStream_t stream);

 private:
  BufferCore& core_;
  bool enabled_;                // BufferConfig::max_tokens_per_rank > 0
  kernels::HtRegions regions_;  // byte offsets in every rank's buffer
};

}  // namespace epcomm
