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
  kPeerRejected,       // (no longer recorded: a rejected call is skipped, see "Rejected calls")
  kBadExpertId,        // topk_idx held an id outside [-1, num_experts)
  kOverCapacity,       // more rows than the buffer holds
  kSignatureMismatch,  // ranks called the same op with different per-call parameters
  kPeerFaulted,        // a peer's kernel found bad input or bad data and told every rank
  kBadPeerData,        // a value that came from a peer (count, offset, row index) is out of range
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
// fast peer's next call cannot overwrite a value this rank still has to read. A tagged word keeps
// only the low 32 bits of the 64-bit call counter; it is compared wrap-safe (the difference as a
// signed 32-bit number), which is exact because a peer is never 2^31 calls away. Plain epoch
// words hold the whole 64-bit counter.
// ---------------------------------------------------------------------------------------------
constexpr int kNumEpochs = 4;  // barrier, HT dispatch, HT combine, LL
enum EpochSlot : int { kEpochBarrier = 0, kEpochHtDispatch, kEpochHtCombine, kEpochLl };

// Words only the owning rank touches.
struct LocalState {
  uint64_t epoch[kNumEpochs];  // last completed call of each op family (64-bit: never wraps)
  uint64_t skipped[kNumEpochs];  // last call of each family a peer's rejection stopped here;
                                 // a kernel's call is callEpoch(): max(epoch, skipped) + 1
  uint32_t arrive[16];         // "last block" counters, one per kernel, reset by the last block
  int32_t failed;              // set by a failure that stops every wait of this rank; sticky:
                               // every kernel of a rank that failed returns before its first
                               // store to a peer
  int32_t record_claimed;      // the first failing thread claims the error record
  int32_t fault_sent;          // the fault notice (ControlRegion::peer_faulted) went out
};

// ControlRegion::peer_faulted: a kernel of rank r found bad input (an expert id out of range) or
// bad data from a peer, recorded it and stopped; it writes this word into every peer's control
// region so that their waits stop at once (FailKind::kPeerFaulted naming r) instead of timing
// out. Sticky: after a device-side fault the buffer is broken on every rank.
//   bits 63..32: r + 1   bits 31..16: FailKind found by r   bits 15..0: OpId in which r found it
// (written by device::recordFault; the peers' records keep bits 31..0 in `observed`).

// ---------------------------------------------------------------------------------------------
// Per-call signatures: the per-call parameters every rank must pass identically, carried with the
// call's first signal so that a mismatch is found in the same call, on every rank, at no extra
// cost. HT dispatch: 64 bits, the last two words of each count row (ht_counts[..][src][R, R+1]).
// LL dispatch: 16 bits, the upper half of the value of the rows-sent post.
// The fields, for encoding here and naming the differing field in error messages.
// ---------------------------------------------------------------------------------------------
struct SignatureField {
  const char* name;
  int shift;
  int bits;
  int scale;  // the field holds value / scale
};
inline constexpr SignatureField kHtSignatureFields[] = {
    {"hidden", 0, 8, kHiddenAlignment},
    {"dtype is FP8", 8, 1, 1},
    {"top-k sent (topk.idx set or topk.num_topk > 0)", 9, 1, 1},
    {"topk.num_topk", 10, 5, 1},
    {"topk.idx_type is int64", 15, 1, 1},
    {"num_experts", 16, 10, 1},
    {"expert_alignment", 32, 17, 1},
};
inline constexpr SignatureField kLlSignatureFields[] = {
    {"use_fp8", 0, 1, 1},
    {"hidden", 1, 8, kHiddenAlignment},
};
inline constexpr uint64_t signatureBits(const SignatureField& f, int64_t value) {
  return (static_cast<uint64_t>(value / f.scale) & ((uint64_t{1} << f.bits) - 1)) << f.shift;
}
inline constexpr int64_t signatureValue(const SignatureField& f, uint64_t signature) {
  return static_cast<int64_t>((signature >> f.shift) & ((uint64_t{1} << f.bits) - 1)) * f.scale;
}
inline uint64_t htSignature(int hidden, bool fp8, bool has_topk, int num_topk, bool idx_is_64,
                            int num_experts, int expert_alignment) {
  const SignatureField* f = kHtSignatureFields;
  return signatureBits(f[0], hidden) | signatureBits(f[1], fp8) | signatureBits(f[2], has_topk) |
         signatureBits(f[3], has_topk ? num_topk : 0) |
         signatureBits(f[4], has_topk && idx_is_64) | signatureBits(f[5], num_experts) |
         signatureBits(f[6], expert_alignment);
}
inline uint32_t llSignature(int hidden, bool use_fp8) {
  return static_cast<uint32_t>(signatureBits(kLlSignatureFields[0], use_fp8) |
                               signatureBits(kLlSignatureFields[1], hidden));
}
// LL rows-sent post value: rows in the low 16 bits (<= kMaxLlTokensPerRank), signature above.
constexpr uint32_t kLlRowsMask = 0xffffu;
static_assert(kMaxLlTokensPerRank <= static_cast<int>(kLlRowsMask), "LL rows must fit 16 bits");
constexpr int kHtSignatureWords = 2;

struct alignas(128) ControlRegion {
  uint64_t barrier[kMaxRanks];                           // [src] epoch
  uint64_t peer_rejected[kNumEpochs][kMaxRanks];        // [family][src] last call src rejected
  uint64_t peer_faulted;                                 // fault notice (above), 0 if none
  uint64_t ht_counts[2][kMaxRanks][kMaxRanks + kHtSignatureWords];  // [parity][src][dst];
                                                         // [src][R, R+1] = call signature; tagged
  uint64_t ht_dispatch_done[kMaxRanks];                  // [src] epoch
  uint64_t ht_combine_ready[kMaxRanks];                  // [src] epoch: src's combine input ready
  uint64_t ht_combine_done[kMaxRanks];                   // [src] epoch: src finished pulling
  uint64_t ll_dispatch_flag[2][kMaxRanks];               // [parity][src] tagged rows | sig << 16
  uint64_t ll_combine_flag[2][kMaxRanks];                // [parity][src] epoch
  LocalState local;
  uint64_t ht_expert_counts[2][kMaxRanks][kMaxExperts];  // [parity][src][local expert] tagged
};

// ---------------------------------------------------------------------------------------------
// Rejected calls. A rank that rejects the input of a collective call on the host (before any
// launch) still takes its place in the op family's sequence, so the buffer stays usable on every
// rank: it launches launchSkipRejected() on the call's stream, which advances its epoch of the
// family as if the call had run and writes that epoch e into peer_rejected[family][rank] of every
// peer; its host then waits (bounded) until every peer's epoch of the family reached e, so no rank
// is ever more than one call ahead. A peer's wait of that family for call e on a word of rank s
// ends when s's word is not ready, peer_rejected[family][s] >= e and a re-read of the word after
// the notice is still not ready: s skipped call e (a rank writes every signal of a call before it
// completes the call, and its later notices are ordered after them). The waiting thread then
// records call e as over for this rank too (LocalState::skipped[family] = e; the kernel's own
// blocks that start late still compute e, the next kernel of the family computes e + 1), reports
// rejectionReport(s, op, e) in the host-mapped word PeerContext::rejection_report and returns
// false, without marking the rank failed: the host raises ErrorCode::kRemote once, and later
// calls proceed. Every wait passes the awaited rank as `peer` and the call's epoch as `expected`;
// every kernel takes its call's epoch from callEpoch().
// ---------------------------------------------------------------------------------------------
#ifdef __CUDACC__
#define EPCOMM_HOST_DEVICE __host__ __device__
#else
#define EPCOMM_HOST_DEVICE
#endif
EPCOMM_HOST_DEVICE inline constexpr EpochSlot epochSlotOf(OpId op) {
  return op == OpId::kHtDispatch || op == OpId::kLayout ? kEpochHtDispatch
         : op == OpId::kHtCombine                       ? kEpochHtCombine
         : op == OpId::kBarrier                         ? kEpochBarrier
                                                        : kEpochLl;
}
// bits 63..16: the call's epoch (low 48 bits)   15..8: OpId of the stopped wait   7..0: rank + 1
EPCOMM_HOST_DEVICE inline constexpr uint64_t rejectionReport(int rank, OpId op, uint64_t epoch) {
  return epoch << 16 | (static_cast<uint64_t>(static_cast<uint32_t>(op)) & 0xffu) << 8 |
         (static_cast<uint64_t>(rank + 1) & 0xffu);
}

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
  uint64_t* rejection_report;  // host-mapped, device pointer; see "Rejected calls"
  uint64_t timeout_ns;
  uint64_t first_op_timeout_ns;  // the waits of the first call (epoch 1) of each family
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
  // A bad id is recorded, stops this rank's next collective op and is announced to every peer
  // (ControlRegion::peer_faulted), so the op fails on every rank; it is never used as an address.
  PeerContext peers;
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
  int32_t has_topk;             // 0: cached dispatch, no top-k data sent
  const int32_t* topk_copy;     // [N, K] the layout's routing: valid ids, -1 for none/duplicate
  int32_t idx_is_64;            // element type of recv_topk_idx
  const float* topk_weights;    // may be nullptr
  int32_t num_topk;
  int32_t num_tokens;
  int32_t num_experts;
  int32_t num_local_experts;
  int32_t expert_alignment;
  uint64_t signature;           // htSignature(): every rank must pass the same
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
  uint64_t* host_count;         // host-mapped count for exact mode (kHostCountValid | rows),
                                // or nullptr
};

// Exact-mode host word: set once the count is known (the host clears it before each call).
constexpr uint64_t kHostCountValid = uint64_t{1} << 63;

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
  uint32_t signature;           // llSignature() of this call (dispatch send and receive)
  // combine inputs/outputs
  const uint16_t* expert_out;   // [L, rows_per_expert, H] BF16
  uint16_t* out;                // [N, H] BF16
};

// ---------------------------------------------------------------------------------------------
// Launchers. Each checks its launch and throws epcomm::CudaError on failure.
// ---------------------------------------------------------------------------------------------
// Device barrier across every rank: one block, stream-ordered, with the deadline.
void launchBarrier(const PeerContext& peers, cudaStream_t stream);

// The rejecting rank's part of a call it rejected on the host (see "Rejected calls"): one
// thread, stream-ordered after this rank's earlier ops of the family.
void launchSkipRejected(const PeerContext& peers, EpochSlot family, cudaStream_t stream);

// cudaFuncGetAttributes on a library kernel: cudaErrorNoKernelImageForDevice when the current
// device's architecture is not among the compiled ones. Clears the error it may leave.
cudaError_t kernelImageStatus();
// The architectures the kernels were compiled for, as nvcc lists them ("900,1000").
const char* compiledArchitectures();

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
