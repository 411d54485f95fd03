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
  // EPCOMM_STAGE_TIMES: device array [kStageSlots] of stage stamps (kernels/stage_times.hpp),
  // owned by the buffer; nullptr when off (then each stage boundary costs one branch).
  uint64_t* stage_times;
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
  // Scratch of two tiles or more, zero between calls (handle memory is zeroed when made, and the
  // last block of each call zeroes what it used): each tile's per-rank totals + 1 (0: not yet
  // published), each tile's expert histogram, and the count of tiles that finished.
  int32_t* tile_counts;         // [layoutTiles(N), R]
  int32_t* tile_expert_counts;  // [layoutTiles(N), E]
  uint32_t* tiles_done;         // [1]
  // Layout input (DispatchArgs::layout), or all nullptr to route from topk_idx alone. With
  // in_rank set, masks and slots come from it; topk_idx (may be nullptr then) only fills
  // topk_copy and is checked against it. The caller's counts are checked (FailKind::kLayout*)
  // and become rank_counts / expert_counts.
  const bool* in_rank;              // [N, R]
  const int32_t* rank_counts_in;    // [R]
  const int32_t* expert_counts_in;  // [E]
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
  const int32_t* expert_counts;  // [E] of the handle's routing; sent by every dispatch
  int32_t num_worst_tokens;      // > 0: pad the views to this many rows; more received = fault
  // outputs (handle)
  int32_t* count_matrix;        // [R, R]
  int32_t* num_recv;            // [1]
  int32_t* recv_rank_prefix;    // [R + 1]
  int32_t* recv_expert_counts;  // [L]
  uint64_t* host_count;         // host-mapped count for exact mode (hostCount(rows)),
                                // or nullptr; written after host_expert_counts
  int32_t* host_expert_counts;  // host-mapped [L] for exact mode, or nullptr
  // PerfFlags::ht_counts_once: only block 0 posts this rank's count row and signature (every
  // block still waits for the whole matrix) instead of every block posting the same words.
  uint32_t counts_once;
  // PerfFlags::ht_fused_layout: the kernel first runs the top-k layout described by `layout`
  // (every block takes tiles; the block that finishes it stores the call's epoch in
  // `layout_done`, which every block waits for before reading the layout's outputs).
  uint32_t fused_layout;
  uint64_t* layout_done;  // handle memory, zero when made
  LayoutParams layout;
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
  const float* scale_weights;   // [N, K] token side; nullptr = unweighted
  const uint16_t* bias;         // [N, H] BF16 or nullptr
  uint16_t* out;                // [N, H] BF16
  // Combined top-k weights: every rank's received-weights rows [rows, num_topk] float at this
  // offset of its buffer (regions.recv_topk_weights or regions.combine_weights), summed per
  // (token, k) into combined_weights [N, K]. combined_weights == nullptr: off.
  uint64_t recv_weights_offset;
  float* combined_weights;
  uint32_t signature;  // htCombineSignature(): every rank must pass the same
  // The caller's combine input rows [num_recv, hidden] and received weights [num_recv, K] (or
  // null): this rank's own rows are read from there (the pull combine: nobody else reads them,
  // so they are not staged; the push combine: no row is staged, x is pushed from there).
  const uint8_t* x;
  const float* own_recv_weights;
  // Push combine only (launchHtPushCombine): the blocks that push (the rest reduce).
  int32_t pushers;
};

// Expert-major HT dispatch (kernels/ht_expert_major.cu; DispatchArgs::expert_major).
struct HtExpertMajorParams {
  PeerContext peers;
  HtRegions regions;
  // inputs
  const uint8_t* x;
  int64_t x_row_bytes;  // hidden * element bytes
  const float* x_scales;
  int64_t scales_token_stride;
  int64_t scales_col_stride;
  int32_t num_scales;         // hidden / 128 for FP8, else 0
  int32_t has_topk;           // write recv_topk_idx / recv_topk_weights
  int32_t idx_is_64;          // element type of recv_topk_idx
  const float* topk_weights;  // [N, route_topk] or nullptr
  int32_t num_topk;           // columns of recv_topk_idx / weights (0 without top-k)
  int32_t route_topk;         // columns of topk_copy / pair_pos (the handle's layout)
  int32_t num_tokens;
  int32_t num_experts;
  int32_t num_local_experts;
  int32_t expert_alignment;
  int32_t max_tokens;  // BufferConfig::max_tokens_per_rank: bound on a peer's per-expert count
  uint64_t signature;  // htSignature() | htExpertMajorBits(true)
  // routing (handle)
  const int32_t* topk_copy;      // [N, route_topk] valid global ids, -1 for none/duplicate
  const int32_t* rank_counts;    // [R]
  const int32_t* expert_counts;  // [E] this rank's pairs per expert
  const int32_t* pair_pos;       // [N, route_topk] rank of the pair among this rank's pairs of
                                 // its expert (launchHtExpertMajorPairs)
  // outputs (handle)
  int32_t* count_matrix;        // [R, R]
  int32_t* num_recv;            // [1] rows incl. padding
  int32_t* recv_expert_counts;  // [L] aligned
  int32_t* expert_offsets;      // [L + 1]
  int32_t* send_base;           // [E] this rank's first row in expert e's group on its rank
  uint64_t* host_count;         // exact mode, or nullptr
};

// pair_pos[t, k] = position of (t, k) among this rank's pairs of expert topk_copy[t, k]
// (atomics: the order is per call; it is kept in the handle). cursor [E] is scratch.
struct HtExpertMajorPairsParams {
  const int32_t* topk_copy;
  int32_t num_tokens;
  int32_t num_topk;
  int32_t num_experts;
  int32_t* cursor;
  int32_t* pair_pos;
};

struct HtExpertMajorCombineParams {
  PeerContext peers;
  HtRegions regions;
  int64_t row_bytes;  // hidden * 2
  int32_t hidden;
  int32_t num_tokens;
  int32_t num_topk;  // the handle's layout columns
  int32_t num_local_experts;
  const int32_t* topk_copy;   // [N, K]
  const int32_t* pair_pos;    // [N, K]
  const int32_t* send_base;   // [E] from the matching dispatch
  const float* topk_weights;  // [N, K] or nullptr
  const uint16_t* bias;       // [N, H] BF16 or nullptr
  uint16_t* out;              // [N, H] BF16
  uint32_t signature;         // htCombineSignature() (the rank-major combine's tagged ready word)
};

// Copies `*count` rows (read on the device) of each segment, count capped at max_rows; with
// fixed_rows > 0 exactly fixed_rows rows (static shapes) and `count` is not read. One launch
// copies up to kMaxCopySegments arrays with the same row count (a dispatch's received rows,
// scales and top-k ids and weights): each launch costs microseconds of host time. Row bytes and
// strides are multiples of 4.
constexpr int kMaxCopySegments = 4;
struct CopyRowsSegment {
  uint8_t* dst;
  const uint8_t* src;
  int64_t row_bytes;
  int64_t dst_stride;
  int64_t src_stride;
};
struct CopyRowsParams {
  CopyRowsSegment seg[kMaxCopySegments];
  int32_t num_segments;
  const int32_t* count;
  int64_t max_rows;
  int64_t fixed_rows = 0;
  // Not null: rows [skip[0], skip[1]) (read on the device, within the rows copied) are left out
  // of every segment (a combine's own rows, which nobody else reads).
  const int32_t* skip = nullptr;
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
  // This rank's tokens of the call (dispatch) or of the matching dispatch (combine, both halves;
  // and the dispatch receive, which picks its item shape from it).
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

  // Issue 11: cumulative receive counts (dispatch receive) and combine-time weights.
  int32_t* cumulative_recv_counts;  // [L] or nullptr: += this call's (token, expert) rows
  const float* combine_weights;     // [N, num_topk] combine-time weights, or nullptr
  uint32_t weights_mode;            // kLlWeightsNone / kLlWeightsPushed / kLlWeightsNoTokens
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

// One kernel of layoutTiles(num_tokens) blocks of kLayoutThreads (each tile reads the totals of
// the earlier ones, the last block to finish sums the counts). Writes every output (no memset
// needed before it). `dependent_launch` (here and below): the device has programmatic dependent
// launch (BufferCore::dependent_launch; kernels/dependent_launch.cuh).
void launchLayout(const LayoutParams& params, cudaStream_t stream, bool dependent_launch);

void launchHtDispatch(const HtDispatchParams& params, int sm_budget, cudaStream_t stream,
                      bool dependent_launch);
void launchHtCombine(const HtCombineParams& params, int sm_budget, cudaStream_t stream,
                     bool dependent_launch);
// The push combine (a copy-in combine on every rank): every rank stores the rows it holds for
// each token owner into the owner's combine_in region, a flag per chunk, while the owner's
// reducing blocks sum each token as soon as its rows are in. sm_budget >= 2.
void launchHtPushCombine(const HtCombineParams& params, int sm_budget, cudaStream_t stream,
                         bool dependent_launch);
void launchCopyRows(const CopyRowsParams& params, int sm_budget, cudaStream_t stream);

// Expert-major HT (kernels/ht_expert_major.cu). Pairs: zeroes the cursor, then one thread per
// top-k entry. Dispatch and combine: `sm_budget` blocks, the same handshakes as rank-major.
void launchHtExpertMajorPairs(const HtExpertMajorPairsParams& params, cudaStream_t stream);
void launchHtExpertMajorDispatch(const HtExpertMajorParams& params, int sm_budget,
                                 cudaStream_t stream);
void launchHtExpertMajorCombine(const HtExpertMajorCombineParams& params, int sm_budget,
                                cudaStream_t stream);

// The LL ops' grid when the caller sets no SM budget: a block per kLlItemsPerBlock (token, top-k
// entry) items of every source, were the sources like this rank (`num_tokens` of them, the batch
// this rank knows), at least kLlMinBlocks. One H200, 1 rank (docs/perf-notes.md): every SM cost a
// 1-token op ~0.4 us more than 32 blocks, and an 8-token op ~0.4 us more than 32 blocks with 2
// items each, while 4 items per block were 9 to 11 % slower than every SM (a block's groups then
// share its SM's bandwidth). A peer with more tokens than this rank is placed by fewer blocks.
constexpr int kLlItemsPerBlock = 2;
constexpr int kLlMinBlocks = 32;
int llBlocksForBatch(int num_tokens, int max_topk, int num_ranks);
// At most one block per token (idle blocks would only add arrivals to the last-block count).
void launchLlDispatchSend(const LlParams& params, int sm_budget, cudaStream_t stream);
void launchLlDispatchRecv(const LlParams& params, int sm_budget, cudaStream_t stream);
// Both halves in one kernel of `sm_budget` blocks (PerfFlags::ll_fused_dispatch): the same
// signals and regions as launchLlDispatchSend followed by launchLlDispatchRecv.
void launchLlDispatchFused(const LlParams& params, int sm_budget, cudaStream_t stream);
// Pushes this rank's combine-time weights (params.combine_weights, [num_tokens, num_topk]) to
// every rank its tokens went to, then posts the combine-weights flag; launched before
// launchLlCombineSend when LlCombineArgs::topk_weights is given (the fused kernel does it itself).
// One warp per token.
void launchLlCombineWeights(const LlParams& params, int sm_budget, cudaStream_t stream);
void launchLlCombineSend(const LlParams& params, int sm_budget, cudaStream_t stream);
// Reduces num_tokens x (hidden / kLlSegmentCols) segments, one warp each; `num_tokens` is this
// rank's token count of the matching dispatch.
void launchLlCombineRecv(const LlParams& params, int num_tokens, int sm_budget,
                         cudaStream_t stream);
// Send and receive halves in one kernel of `sm_budget` blocks (PerfFlags::ll_fused_combine): the
// same signals and regions as launchLlCombineSend followed by launchLlCombineRecv, preceded by
// launchLlCombineWeights's push when params.weights_mode is kLlWeightsPushed (not launched then).
void launchLlCombineFused(const LlParams& params, int sm_budget, cudaStream_t stream);

}  // namespace epcomm::kernels
