// SPDX-License-Identifier: Apache-2.0
// Expert-major HT dispatch and combine, host side. The protocol and the receive layout are
// described in kernels/ht_expert_major.cu; the public semantics in include/epcomm/ops.hpp
// (DispatchArgs::expert_major).
#include "ht/ht_expert_major.hpp"

#include "check.hpp"
#include "kernels/launch.hpp"

namespace epcomm {

void allocateExpertMajorState(EpHandle::Impl& h, const BufferConfig& c, int num_local_experts) {
  size_t offset = 0;
  auto carve = [&offset](size_t bytes) {
    const size_t start = offset;
    offset += (bytes + 255) / 256 * 256;
    return start;
  };
  const size_t pairs = static_cast<size_t>(c.max_tokens_per_rank) * c.max_topk;
  const size_t experts = static_cast<size_t>(c.num_experts);
  const size_t o_pairs = carve(pairs * sizeof(int32_t));
  const size_t o_cursor = carve(experts * sizeof(int32_t));
  const size_t o_base = carve(experts * sizeof(int32_t));
  const size_t o_offsets = carve((static_cast<size_t>(num_local_experts) + 1) * sizeof(int32_t));
  h.em_memory = DeviceMemory(offset);
  EPCOMM_CUDA_CHECK(cudaMemset(h.em_memory.get(), 0, offset));
  h.em_pair_pos = h.em_memory.as<int32_t>(o_pairs);
  h.em_cursor = h.em_memory.as<int32_t>(o_cursor);
  h.em_send_base = h.em_memory.as<int32_t>(o_base);
  h.expert_offsets = h.em_memory.as<int32_t>(o_offsets);
}

void checkExpertMajorDispatch(ArgChecker& check, const DispatchArgs& args,
                              const EpHandle::Impl* handle) {
  // The rows are placed per (token, expert): the routing must name experts, which a layout
  // from top-k does (a cached dispatch reuses the handle's).
  const bool has_topk = args.topk.idx != nullptr || args.topk.num_topk > 0;
  if (!has_topk && handle != nullptr) {
    check.require(handle->num_topk > 0, "DispatchArgs::expert_major", "true",
                  "used with top-k routing (topk.idx set, or a handle laid out from top-k)");
  }
  // Not (yet) combined with expert-major: a precomputed layout (the routing must come from
  // top-k) and static shapes (the padding fill is rank-major's).
  check.require(args.layout.is_token_in_rank == nullptr &&
                    args.layout.num_tokens_per_rank == nullptr &&
                    args.layout.num_tokens_per_expert == nullptr,
                "DispatchArgs::layout", "set", "unset with expert_major (routing from topk.idx)");
  check.require(args.num_worst_tokens == 0, "DispatchArgs::num_worst_tokens", args.num_worst_tokens,
                "0 with expert_major (static shapes are rank-major only)");
}

DispatchResult dispatchExpertMajor(BufferCore& b, const kernels::HtRegions& ht,
                                   const DispatchArgs& args, EpHandle::Impl& h, int sms,
                                   cudaStream_t stream) {
  const BufferConfig& c = b.resolved.config;
  const bool has_topk = args.topk.idx != nullptr || args.topk.num_topk > 0;
  const bool fp8 = args.dtype == DType::kFP8E4M3;
  const int hidden = c.hidden;
  const int num_scales = hidden / kFp8BlockSize;

  // Pair positions of this call (cheap: one atomic per top-k entry). Recomputed on every
  // dispatch, cached ones included, so they always match the handle's current layout.
  kernels::HtExpertMajorPairsParams pairs{};
  pairs.topk_copy = h.topk_copy;
  pairs.num_tokens = h.num_tokens;
  pairs.num_topk = h.num_topk;
  pairs.num_experts = c.num_experts;
  pairs.cursor = h.em_cursor;
  pairs.pair_pos = h.em_pair_pos;
  kernels::launchHtExpertMajorPairs(pairs, stream);

  kernels::HtExpertMajorParams p{};
  p.peers = b.peers;
  p.regions = ht;
  p.x = static_cast<const uint8_t*>(args.x);
  p.x_row_bytes = int64_t{hidden} * (fp8 ? 1 : 2);
  p.x_scales = fp8 ? args.x_scales : nullptr;
  p.scales_token_stride = args.scales_token_stride != 0 ? args.scales_token_stride : num_scales;
  p.scales_col_stride = args.scales_col_stride;
  p.num_scales = fp8 ? num_scales : 0;
  p.has_topk = has_topk ? 1 : 0;
  p.idx_is_64 = args.topk.idx_type == IndexType::kInt64;
  p.topk_weights = has_topk ? args.topk_weights : nullptr;
  p.num_topk = has_topk ? args.topk.num_topk : 0;
  p.route_topk = h.num_topk;
  p.num_tokens = args.num_tokens;
  p.num_experts = c.num_experts;
  p.num_local_experts = b.num_local_experts;
  p.expert_alignment = args.expert_alignment;
  p.max_tokens = c.max_tokens_per_rank;
  p.signature = kernels::htSignature(hidden, fp8, has_topk, p.num_topk, p.idx_is_64 != 0,
                                     c.num_experts, args.expert_alignment) |
                kernels::htExpertMajorBits(true);
  p.topk_copy = h.topk_copy;
  p.rank_counts = h.rank_counts;
  p.expert_counts = h.expert_counts;
  p.pair_pos = h.em_pair_pos;
  p.count_matrix = h.count_matrix;
  p.num_recv = h.num_recv;
  p.recv_expert_counts = h.recv_expert_counts;
  p.expert_offsets = h.expert_offsets;
  p.send_base = h.em_send_base;
  HostMappedState* host = b.hostState();
  if (args.exact_count) {
    *reinterpret_cast<volatile uint64_t*>(&host->ht_count) = 0;
    p.host_count = &b.hostStateOnDevice()->ht_count;
  }
  kernels::launchHtExpertMajorDispatch(p, sms, stream);
  h.dispatched = true;

  copyReceivedRows(b, ht, args, p.x_row_bytes, fp8 ? num_scales : 0, h.num_recv,
                   /*fixed_rows=*/0, sms, stream);
  b.trackWork(stream);
  DispatchResult result = receivedViews(b, ht, h, fp8, has_topk);
  result.recv_rank_prefix = nullptr;  // rows are grouped by expert, not by source
  result.expert_offsets = h.expert_offsets;
  if (args.exact_count) {
    // As rank-major: returns once the row count is known (after the count exchange).
    result.num_recv_tokens_host = waitHostCount(b, stream, "exact_count expert-major dispatch");
  }
  return result;
}

void combineExpertMajor(BufferCore& b, const kernels::HtRegions& ht, const CombineArgs& args,
                        const EpHandle::Impl& h, int sms, cudaStream_t stream) {
  const BufferConfig& c = b.resolved.config;
  kernels::HtExpertMajorCombineParams p{};
  p.peers = b.peers;
  p.regions = ht;
  p.row_bytes = int64_t{c.hidden} * 2;
  p.hidden = c.hidden;
  p.num_tokens = h.num_tokens;
  p.num_topk = h.num_topk;
  p.num_local_experts = b.num_local_experts;
  p.topk_copy = h.topk_copy;
  p.pair_pos = h.em_pair_pos;
  p.send_base = h.em_send_base;
  p.topk_weights = args.scale_weights;
  // The ready word is shared with the rank-major combine (same epoch family): tagged the same way.
  p.signature = kernels::htCombineSignature(false, 0);
  p.bias = static_cast<const uint16_t*>(args.bias);
  p.out = static_cast<uint16_t*>(args.out);
  kernels::launchHtExpertMajorCombine(p, sms, stream);
  b.trackWork(stream);
}

}  // namespace epcomm
