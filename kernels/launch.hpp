// SPDX-License-Identifier: Apache-2.0
// The one internal launcher header between the host library and the kernels: the plain parameter
// structs kernels receive by value and every launch*() function. What host and device must agree
// on beyond that (control region, signal words, wait phases, grid constants) is in protocol.hpp.
// Host code only; no device code and no MPI here.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/protocol.hpp"

namespace epcomm::kernels {

// ---------------------------------------------------------------------------------------------
// What every cross-rank kernel needs. Passed by value.
// ---------------------------------------------------------------------------------------------
struct PeerContext {
  uint8_t* const* peer_bases;  // device array [num_ranks]: every rank's buffer in this process
  uint8_t* local_base;         // == peer_bases[rank]
  int32_t rank;
  int32_t num_ranks;
  DeviceErrorRecord* error;    // host-mapped, device pointer
  const uint32_t* abort_flag;  // host-mapped, device pointer; non-zero = stop waiting
  uint64_t* rejection_report;  // host-mapped, device pointer; "Rejected calls" in protocol.hpp
  uint64_t timeout_ns;
  uint64_t first_op_timeout_ns;  // the waits of the first call (epoch 1) of each family
};

// ---------------------------------------------------------------------------------------------
// Kernel parameters
// ---------------------------------------------------------------------------------------------
struct LayoutParams {
  const void* topk_idx;
  int32_t idx_is_64;
  int32_t num_tokens;
  int32_t num_topk;
  int32_t num_experts;
  int32_t num_ranks;
  int32_t rank;
  // outputs (handle memory)
  uint32_t* token_mask;    // [N, rankMaskWords(R)] RankMask: token goes to rank d
  int32_t* token_slot;     // [N, R]
  bool* is_token_in_rank;  // [N, R]
  int32_t* rank_counts;    // [R]
  int32_t* expert_counts;  // [E]
  int32_t* topk_copy;      // [N, K] int32 copy kept for weighted combine
  int32_t* tile_counts;    // [layoutTiles(N), R] scratch
  // A bad id is recorded, stops this rank's next collective op and is announced to every peer
  // (ControlRegion::peer_faulted), so the op fails on every rank; it is never used as an address.
  PeerContext peers;
};

struct HtDispatchParams {
  PeerContext peers;
  HtRegions regions;
  // inputs
  const uint8_t* x;
  int64_t x_row_bytes;    // hidden * element bytes
  const float* x_scales;  // FP8 only, else nullptr
  int64_t scales_token_stride;
  int64_t scales_col_stride;
  int32_t num_scales;         // hidden / 128 for FP8, else 0
  int32_t has_topk;           // 0: cached dispatch, no top-k data sent
  const int32_t* topk_copy;   // [N, K] the layout's routing: valid ids, -1 for none/duplicate
  int32_t idx_is_64;          // element type of recv_topk_idx
  const float* topk_weights;  // may be nullptr
  int32_t num_topk;
  int32_t num_tokens;
  int32_t num_experts;
  int32_t num_local_experts;
  int32_t expert_alignment;
  uint64_t signature;  // htSignature(): every rank must pass the same
  // routing (handle)
  const uint32_t* token_mask;  // [N, rankMaskWords(R)]
  const int32_t* token_slot;
  const int32_t* rank_counts;
  const int32_t* expert_counts;  // [E]; only read with topk (cached dispatch sends none)
  // outputs (handle)
  int32_t* count_matrix;        // [R, R]
  int32_t* num_recv;            // [1]
  int32_t* recv_rank_prefix;    // [R + 1]
  int32_t* recv_expert_counts;  // [L]
  uint64_t* host_count;         // host-mapped count for exact mode (hostCount(rows)),
                                // or nullptr
};

struct HtCombineParams {
  PeerContext peers;
  HtRegions regions;
  int64_t row_bytes;  // hidden * 2
  int32_t hidden;
  int32_t num_tokens;
  int32_t num_topk;
  int32_t num_local_experts;
  const uint32_t* token_mask;  // [N, rankMaskWords(R)]
  const int32_t* token_slot;
  const int32_t* count_matrix;  // [R, R] from the matching dispatch
  const int32_t* topk_copy;     // [N, K] for weights
  const float* topk_weights;    // nullptr = unweighted
  const uint16_t* bias;         // [N, H] BF16 or nullptr
  uint16_t* out;                // [N, H] BF16
};

// Copies `*count` rows (read on the device) of row_bytes each, count capped at max_rows.
struct CopyRowsParams {
  uint8_t* dst;
  const uint8_t* src;
  int64_t row_bytes;
  int64_t dst_stride;
  int64_t src_stride;
  const int32_t* count;
  int64_t max_rows;
};

struct LlParams {
  PeerContext peers;
  LlRegions regions;
  int32_t hidden;
  int32_t num_experts;
  int32_t num_local_experts;
  int32_t max_topk;
  // dispatch inputs
  const uint16_t* x;  // [N, H] BF16
  int32_t num_tokens;
  const void* topk_idx;
  int32_t idx_is_64;
  int32_t num_topk;
  const float* topk_weights;
  int32_t use_fp8;
  uint32_t signature;  // llSignature() of this call (dispatch send and receive)
  // combine inputs/outputs
  const uint16_t* expert_out;  // [L, rows_per_expert, H] BF16
  uint16_t* out;               // [N, H] BF16
};

// ---------------------------------------------------------------------------------------------
// Launchers. Each sizes its own grid from the work and the SM budget (`sm_budget` blocks at most,
// one per SM), checks its launch and throws epcomm::CudaError on failure.
// ---------------------------------------------------------------------------------------------
// Device barrier across every rank: one warp, stream-ordered, with the deadline.
void launchBarrier(const PeerContext& peers, cudaStream_t stream);

// The rejecting rank's part of a call it rejected on the host (see "Rejected calls" in
// protocol.hpp): one thread, stream-ordered after this rank's earlier ops of the family.
void launchSkipRejected(const PeerContext& peers, EpochSlot family, cudaStream_t stream);

// cudaFuncGetAttributes on a library kernel: cudaErrorNoKernelImageForDevice when the current
// device's architecture is not among the compiled ones. Clears the error it may leave.
cudaError_t kernelImageStatus();
// The architectures the kernels were compiled for, as nvcc lists them ("900,1000").
const char* compiledArchitectures();

// layoutTiles(num_tokens) blocks of kLayoutThreads.
void launchLayout(const LayoutParams& params, cudaStream_t stream);

void launchHtDispatch(const HtDispatchParams& params, int sm_budget, cudaStream_t stream);
void launchHtCombine(const HtCombineParams& params, int sm_budget, cudaStream_t stream);
void launchCopyRows(const CopyRowsParams& params, int sm_budget, cudaStream_t stream);

// At most one block per token (idle blocks would only add arrivals to the last-block count).
void launchLlDispatchSend(const LlParams& params, int sm_budget, cudaStream_t stream);
void launchLlDispatchRecv(const LlParams& params, int sm_budget, cudaStream_t stream);
void launchLlCombineSend(const LlParams& params, int sm_budget, cudaStream_t stream);
// Reduces num_tokens x (hidden / kLlSegmentCols) segments, one warp each; `num_tokens` is this
// rank's token count of the matching dispatch.
void launchLlCombineRecv(const LlParams& params, int num_tokens, int sm_budget,
                         cudaStream_t stream);

}  // namespace epcomm::kernels
