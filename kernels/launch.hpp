// The one internal header between the host library and the kernels: the layout of the control
// region every rank shares, the plain parameter structs kernels receive by value, and every
// launch*() function. Host code only; no device code and no MPI here.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "epcomm/config.hpp"

namespace epcomm::kernels {

// ---------------------------------------------------------------------------------------------
// Error record (host-mapped pinned memory, written once by the first failing device thread).
// ---------------------------------------------------------------------------------------------
enum class OpId : int32_t {
  kNone = 0,
  kBarrier,
  kLayout,
  kHtDispatch,
  kHtCombine,
  kLlDispatchSend,
  kLlDispatchRecv,
  kLlCombineSend,
  kLlCombineRecv,
  kCopy,
};

enum class FailKind : int32_t {
  kNone = 0,
  kTimeout,            // a peer never produced the awaited value before the deadline
  kAborted,            // the host set the abort word
  kPeerRejected,       // a peer rejected its input on the host and told everyone
  kBadExpertId,        // topk_idx held an id outside [-1, num_experts)
  kOverCapacity,       // more rows than the buffer holds
  kSignatureMismatch,  // ranks called the same op with different shapes
};

struct DeviceErrorRecord {
  int32_t kind;   // FailKind; written last, after the fields below
  int32_t op;     // OpId
  int32_t phase;  // op-specific wait point (see the kernel's kPhase* constants)
  int32_t rank;   // the rank that recorded it
  int32_t peer;   // the rank waited for, or the offending peer (-1 if none)
  int32_t index;  // token/row index for input errors, else -1
  uint64_t expected;
  uint64_t observed;
};

// ---------------------------------------------------------------------------------------------
// Control region: the first bytes of every rank's symmetric buffer. Peers write the signal words;
// the owner reads them. Tagged words hold (epoch << 32) | value so a value can never be mistaken
// for one from an earlier call; arrays indexed [parity] alternate between consecutive calls so a
// fast peer's next call cannot overwrite a value this rank still has to read.
// ---------------------------------------------------------------------------------------------
constexpr int kNumEpochs = 4;  // barrier, HT dispatch, HT combine, LL
enum EpochSlot : int { kEpochBarrier = 0, kEpochHtDispatch, kEpochHtCombine, kEpochLl };

// Words only the owning rank touches.
struct LocalState {
  uint64_t epoch[kNumEpochs];  // last completed call of each op family
  uint32_t arrive[16];         // "last block" counters, one per kernel, reset by the last block
  int32_t failed;              // set by a failure that stops every wait of this rank
  int32_t record_claimed;      // the first failing thread claims the error record
};

struct alignas(128) ControlRegion {
  uint64_t barrier[kMaxRanks];                           // [src] epoch
  uint64_t peer_rejected;                                // (rank + 1) << 32 | OpId, 0 if none
  uint64_t ht_counts[2][kMaxRanks][kMaxRanks + 1];       // [parity][src][dst]; [src][R] = shape
                                                         // signature; tagged
  uint64_t ht_dispatch_done[kMaxRanks];                  // [src] epoch
  uint64_t ht_combine_ready[kMaxRanks];                  // [src] epoch: src's combine input ready
  uint64_t ht_combine_done[kMaxRanks];                   // [src] epoch: src finished pulling
  uint64_t ll_dispatch_flag[2][kMaxRanks];               // [parity][src] tagged row count
  uint64_t ll_combine_flag[2][kMaxRanks];                // [parity][src] epoch
  LocalState local;
  uint64_t ht_expert_counts[2][kMaxRanks][kMaxExperts];  // [parity][src][local expert] tagged
};

// ---------------------------------------------------------------------------------------------
// What every cross-rank kernel needs. Passed by value.
// ---------------------------------------------------------------------------------------------
struct PeerContext {
  uint8_t* const* peer_bases;  // device array [num_ranks]: every rank's buffer in this process
  uint8_t* local_base;         // == peer_bases[rank]
  int32_t rank;
  int32_t num_ranks;
  DeviceErrorRecord* error;          // host-mapped, device pointer
  const uint32_t* abort_flag;        // host-mapped, device pointer; non-zero = stop waiting
  uint64_t timeout_ns;
};

// Byte offsets of the HT regions inside every rank's buffer (identical on all ranks).
struct HtRegions {
  uint64_t recv_x = 0;             // [capacity, hidden * 2 bytes] (BF16 rows; FP8 uses half)
  uint64_t recv_scales = 0;        // [capacity, hidden / 128] float
  uint64_t recv_topk_idx = 0;      // [capacity, max_topk] int64 (or int32, packed by num_topk)
  uint64_t recv_topk_weights = 0;  // [capacity, max_topk] float (packed by num_topk)
  uint64_t recv_src_idx = 0;       // [capacity] int32
  uint64_t combine_in = 0;         // [capacity, hidden] BF16
  int64_t capacity = 0;            // rows = num_ranks * max_tokens_per_rank
};

// Byte offsets of the LL regions. What peers write (staging rows, their metadata, combine
// partials) has two copies, indexed by the call's parity; what only this rank writes and reads in
// stream order (outputs, bookkeeping) has one.
struct LlRegions {
  uint64_t rows[2] = {};          // [num_ranks][max_tokens][row_bytes] staged rows, by source
  uint64_t meta[2] = {};          // [num_ranks][max_tokens][meta_bytes] their metadata
  uint64_t combine_rows[2] = {};  // [num_ranks][max_tokens][hidden] BF16 partial sums, by rank
  uint64_t slot_of_row = 0;       // [num_ranks][max_tokens][max_topk] int32 output row or -1
  uint64_t out_x = 0;             // [local_experts][rows_per_expert][hidden * 2 bytes]
  uint64_t out_scales = 0;        // [local_experts][rows_per_expert][hidden / 128] float
  uint64_t src_info = 0;          // [local_experts][rows_per_expert] int32
  uint64_t expert_count = 0;      // [local_experts] int32
  uint64_t token_mask = 0;        // [max_tokens] uint32: ranks each of my tokens went to
  uint64_t num_tokens = 0;        // int32: my token count in the current call
  int64_t max_tokens = 0;         // ll_max_tokens_per_rank
  int64_t rows_per_expert = 0;    // num_ranks * max_tokens
  int64_t row_bytes = 0;          // staged row stride: hidden * 2 (FP8 rows + scales fit too)
  int64_t meta_bytes = 0;         // metadata record stride
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
  uint32_t* token_mask;       // [N] bit d = token goes to rank d
  int32_t* token_slot;        // [N, R]
  bool* is_token_in_rank;     // [N, R]
  int32_t* rank_counts;       // [R]
  int32_t* expert_counts;     // [E]
  int32_t* topk_copy;         // [N, K] int32 copy kept for weighted combine
  int32_t* tile_counts;       // [layoutTiles(N), R] scratch
  // error reporting: bad ids are recorded without stopping anyone (they are treated as -1)
  LocalState* local;
  DeviceErrorRecord* error;
};

struct HtDispatchParams {
  PeerContext peers;
  HtRegions regions;
  // inputs
  const uint8_t* x;
  int64_t x_row_bytes;          // hidden * element bytes
  const float* x_scales;        // FP8 only, else nullptr
  int64_t scales_token_stride;
  int64_t scales_col_stride;
  int32_t num_scales;           // hidden / 128 for FP8, else 0
  const void* topk_idx;         // nullptr: cached dispatch, no top-k data sent
  int32_t idx_is_64;
  const float* topk_weights;    // may be nullptr
  int32_t num_topk;
  int32_t num_tokens;
  int32_t num_experts;
  int32_t num_local_experts;
  int32_t expert_alignment;
  uint32_t signature;           // shape signature every rank must agree on
  // routing (handle)
  const uint32_t* token_mask;
  const int32_t* token_slot;
  const int32_t* rank_counts;
  const int32_t* expert_counts;  // [E]; only read with topk (cached dispatch sends none)
  // outputs (handle)
  int32_t* count_matrix;        // [R, R]
  int32_t* num_recv;            // [1]
  int32_t* recv_rank_prefix;    // [R + 1]
  int32_t* recv_expert_counts;  // [L]
  uint64_t* host_count;         // host-mapped tagged count for exact mode, or nullptr
};

struct HtCombineParams {
  PeerContext peers;
  HtRegions regions;
  int64_t row_bytes;            // hidden * 2
  int32_t hidden;
  int32_t num_tokens;
  int32_t num_topk;
  int32_t num_local_experts;
  const uint32_t* token_mask;
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
  const uint16_t* x;            // [N, H] BF16
  int32_t num_tokens;
  const void* topk_idx;
  int32_t idx_is_64;
  int32_t num_topk;
  const float* topk_weights;
  int32_t use_fp8;
  // combine inputs/outputs
  const uint16_t* expert_out;   // [L, rows_per_expert, H] BF16
  uint16_t* out;                // [N, H] BF16
};

// ---------------------------------------------------------------------------------------------
// Launchers. Each checks its launch and throws epcomm::CudaError on failure.
// ---------------------------------------------------------------------------------------------
// Device barrier across every rank: one block, stream-ordered, with the deadline.
void launchBarrier(const PeerContext& peers, cudaStream_t stream);

// Tokens are laid out in tiles of this many, one block each (scratch: layoutTiles(N) * R ints).
constexpr int kLayoutThreads = 512;
inline int layoutTiles(int num_tokens) {
  return num_tokens <= 0 ? 1 : (num_tokens + kLayoutThreads - 1) / kLayoutThreads;
}
void launchLayout(const LayoutParams& params, cudaStream_t stream);

void launchHtDispatch(const HtDispatchParams& params, int num_blocks, cudaStream_t stream);
void launchHtCombine(const HtCombineParams& params, int num_blocks, cudaStream_t stream);
void launchCopyRows(const CopyRowsParams& params, int num_blocks, cudaStream_t stream);

void launchLlDispatchSend(const LlParams& params, int num_blocks, cudaStream_t stream);
void launchLlDispatchRecv(const LlParams& params, int num_blocks, cudaStream_t stream);
void launchLlCombineSend(const LlParams& params, int num_blocks, cudaStream_t stream);
void launchLlCombineRecv(const LlParams& params, int num_blocks, cudaStream_t stream);

// Threads per block of the data-moving kernels (exposed for the benchmark's link kernels).
constexpr int kBlockThreads = 512;

}  // namespace epcomm::kernels
