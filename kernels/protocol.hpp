// SPDX-License-Identifier: Apache-2.0
// The protocol host and device share, written once: the control region every rank's buffer starts
// with (signal words, their encodings), the error record and the names of its ops and wait phases,
// the per-call signatures, the byte offsets of the data regions, and the constants that size the
// kernels' grids. Included by the kernels (.cu) and the host library (.cpp); no device code here.
// Helpers both sides call are EPCOMM_HOST_DEVICE (nvcc refuses plain host constexpr functions in
// device code without --expt-relaxed-constexpr).
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>

#include "epcomm/config.hpp"

#ifdef __CUDACC__
#define EPCOMM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define EPCOMM_HOST_DEVICE inline
#endif

namespace epcomm::kernels {

// ---------------------------------------------------------------------------------------------
// Grid constants (the launchers size their grids from them; docs/design.md §5, §6).
// ---------------------------------------------------------------------------------------------
constexpr int kWarpSize = 32;
// Threads per block of the data-moving kernels (HT dispatch/combine, copies, LL).
constexpr int kBlockThreads = 512;
constexpr int kWarpsPerBlock = kBlockThreads / kWarpSize;
// Tokens are laid out in tiles of this many, one block each (scratch: layoutTiles(N) * R ints).
constexpr int kLayoutThreads = 512;
EPCOMM_HOST_DEVICE int layoutTiles(int num_tokens) {
  return num_tokens <= 0 ? 1 : (num_tokens + kLayoutThreads - 1) / kLayoutThreads;
}
// LL kernels move rows in segments of this many columns, one warp per (token, segment).
constexpr int kLlSegmentCols = 1024;

// A token's destination ranks: a bit mask of rankMaskWords(R) 32-bit words per token (bit d % 32
// of word d / 32 = rank d), so at R <= 32 a token's mask is one word, as it was when 8 ranks was
// the limit. Arrays of masks are [tokens][rankMaskWords(R)] uint32. Device helpers (RankMask,
// forEachRank) are in device_utils.cuh.
constexpr int kRankMaskWords = (kMaxRanks + 31) / 32;
EPCOMM_HOST_DEVICE constexpr int rankMaskWords(int num_ranks) {
  return (num_ranks + 31) / 32;
}

// ---------------------------------------------------------------------------------------------
// Ops, failures and wait phases: what the device error record holds and the host names.
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
  kCount
};
inline constexpr const char* kOpNames[] = {"unknown op",
                                           "barrier",
                                           "layout",
                                           "HT dispatch",
                                           "HT combine",
                                           "LL dispatch (send)",
                                           "LL dispatch (receive)",
                                           "LL combine (send)",
                                           "LL combine (receive)"};
static_assert(std::size(kOpNames) == static_cast<size_t>(OpId::kCount), "one name per OpId");
inline const char* opName(int op) {
  return op > 0 && op < static_cast<int>(OpId::kCount) ? kOpNames[op] : kOpNames[0];
}

enum class FailKind : int32_t {
  kNone = 0,
  kTimeout,            // a peer never produced the awaited value before the deadline
  kAborted,            // the host set the abort word
  kBadExpertId,        // topk_idx held an id outside [-1, num_experts)
  kOverCapacity,       // more rows than the buffer holds
  kSignatureMismatch,  // ranks called the same op with different per-call parameters
  kPeerFaulted,        // a peer's kernel found bad input or bad data and told every rank
  kBadPeerData,        // a value that came from a peer (count, offset, row index) is out of range
  // DispatchArgs::layout inconsistent (index = the rank, expert or token named):
  kLayoutRankCount,     // num_tokens_per_rank[index] != is_token_in_rank's column sum
  kLayoutExpertCount,   // num_tokens_per_expert[index] outside [0, num_tokens_per_rank[its rank]]
  kLayoutExpertVsTopk,  // num_tokens_per_expert[index] != the count topk_idx gives
  kLayoutTokenVsTopk,   // token `index` names an expert on a rank is_token_in_rank leaves out
  kOverWorstTokens,     // more rows received than DispatchArgs::num_worst_tokens
};

// The point of an op at which a device thread waited (or found bad data), for the error record.
enum class WaitPhase : int32_t {
  kNone = 0,         // input checks outside any wait
  kBarrierArrival,   // barrier: a peer's arrival
  kHtCounts,         // HT dispatch: the count matrix (and call signatures) from every peer
  kHtRowsWritten,    // HT dispatch: "my rows are written" from every source
  kHtExpertCounts,   // HT dispatch: the per-expert counts from every source
  kHtCombineReady,   // HT combine: a peer's combine input is ready to pull
  kHtCombineDone,    // HT combine: a peer finished pulling from this rank
  kHtCombinePushed,  // HT push combine: a peer's flag for a chunk of rows it pushed here
  kLlDispatchPost,   // LL dispatch receive: a source's rows-sent post
  kLlCombineRows,    // LL combine receive: the tag of a rank's partial row segment
  kLlWeightsPost,    // LL combine send: a rank's combine-weights post (weights pushed or not)
  kLayoutTiles,      // layout: an earlier tile's per-rank totals (this rank's own kernel)
  kLlDispatchRow,    // LL dispatch receive: a source's tags of one staged row (present or absent)
  kHtRowsShares,     // HT dispatch (rank-major): a source's blocks' arrival shares (rows written)
  kHtPullShares,     // HT pull combine: a peer's blocks' arrival shares (done pulling)
  kCount
};
inline constexpr const char* kWaitPhaseNames[] = {"wait",
                                                  "arrival",
                                                  "count exchange",
                                                  "rows-written signal",
                                                  "expert counts",
                                                  "combine-input-ready signal",
                                                  "done-pulling signal",
                                                  "pushed-rows flag",
                                                  "rows-sent post",
                                                  "partial-row tags",
                                                  "combine-weights post",
                                                  "earlier layout tiles",
                                                  "staged-row tags",
                                                  "rows-written shares",
                                                  "done-pulling shares"};
static_assert(std::size(kWaitPhaseNames) == static_cast<size_t>(WaitPhase::kCount),
              "one name per WaitPhase");
inline const char* waitPhaseName(int phase) {
  return phase > 0 && phase < static_cast<int>(WaitPhase::kCount) ? kWaitPhaseNames[phase]
                                                                  : kWaitPhaseNames[0];
}

// Host-mapped pinned memory, written once by the first failing device thread of a rank.
struct DeviceErrorRecord {
  int32_t kind;   // FailKind; written last, after the fields below
  int32_t op;     // OpId
  int32_t phase;  // WaitPhase
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

EPCOMM_HOST_DEVICE constexpr EpochSlot epochSlotOf(OpId op) {
  return op == OpId::kHtDispatch || op == OpId::kLayout ? kEpochHtDispatch
         : op == OpId::kHtCombine                       ? kEpochHtCombine
         : op == OpId::kBarrier                         ? kEpochBarrier
                                                        : kEpochLl;
}

// Tagged words: (epoch << 32) | value.
EPCOMM_HOST_DEVICE constexpr uint64_t tag(uint64_t epoch, uint32_t value) {
  return (epoch << 32) | value;
}
EPCOMM_HOST_DEVICE constexpr uint64_t tagEpoch(uint64_t word) {
  return word >> 32;
}
EPCOMM_HOST_DEVICE constexpr uint32_t tagValue(uint64_t word) {
  return static_cast<uint32_t>(word & 0xffffffffu);
}
// True when the (32-bit) epoch part of a tagged word is at or past `epoch`, across the wrap of
// the 32-bit part: peers are never 2^31 calls apart, so the signed difference decides.
EPCOMM_HOST_DEVICE constexpr bool tagReached(uint64_t word, uint64_t epoch) {
  return static_cast<int32_t>(static_cast<uint32_t>(word >> 32) - static_cast<uint32_t>(epoch)) >=
         0;
}

// LocalState::skip_marker: the launch that recorded the skip (32 bits of its %gridid, never 0)
// and the low 32 bits of the skipped call, in one word so that a reader sees both or neither.
EPCOMM_HOST_DEVICE constexpr uint64_t skipMarker(uint32_t launch, uint64_t call) {
  return static_cast<uint64_t>(launch) << 32 | static_cast<uint32_t>(call);
}

// ControlRegion::ht_rows_in / ht_pulls_done: every block of a rank's grid adds its share to a
// word of every rank at the end of the call; block b of B adds arrivalShare(b, B), so one rank's
// shares sum to kArrivalShares whatever its grid (ranks may run different SM budgets), and a
// receiver knows that source is done without knowing its block count. Nothing is added in a call
// that a peer rejected: no block gets past the count exchange (dispatch) or the "ready" wait
// (combine) then.
constexpr uint64_t kArrivalShares = uint64_t{1} << 32;
EPCOMM_HOST_DEVICE constexpr uint64_t arrivalShare(int block, int blocks) {
  return kArrivalShares * static_cast<uint64_t>(block + 1) / static_cast<uint64_t>(blocks) -
         kArrivalShares * static_cast<uint64_t>(block) / static_cast<uint64_t>(blocks);
}

// LocalState::arrive: one "last block" counter per kernel.
enum ArriveSlot : int {
  kArriveHtDispatch = 0,
  kArriveHtCombine = 1,
  // Not arrivals: the HT dispatch's next unit of work and the HT pull combine's next token, reset
  // by the kernel's block 0 once every block's arrival share is in (arrivalShare).
  kUnitsHtDispatch = 2,
  kUnitsHtCombine = 3,
  kArriveLlCombineRecv = 6,
};
constexpr int kNumArriveSlots = 16;

// Words only the owning rank touches.
struct LocalState {
  uint64_t epoch[kNumEpochs];        // last completed call of each op family (64-bit: never wraps)
  uint64_t skipped[kNumEpochs];      // last call of each family a peer's rejection stopped here;
                                     // a kernel's call is callEpoch(): max(epoch, skipped) + 1
  uint64_t skip_marker[kNumEpochs];  // the last skip as one word, skipMarker(launch, call): the
                                     // device reads this, not skipped (callEpoch)
  uint32_t arrive[kNumArriveSlots];  // "last block" counters (ArriveSlot), reset by the last block
  int32_t failed;                    // set by a failure that stops every wait of this rank; sticky:
                                     // every kernel of a rank that failed returns before its first
                                     // store to a peer
  int32_t record_claimed;            // the first failing thread claims the error record
  int32_t fault_sent;                // the fault notice (ControlRegion::peer_faulted) went out
};

// ---------------------------------------------------------------------------------------------
// Per-call signatures: the per-call parameters every rank must pass identically, carried with the
// call's first signal so that a mismatch is found in the same call, on every rank, at no extra
// cost. HT dispatch: 64 bits, the last two words of each count row (ht_counts[..][src][R, R+1]).
// LL dispatch: 16 bits, the upper half of the value of the rows-sent post. HT combine: the value
// of the tagged combine-ready word. Encoded by htSignature()/llSignature()/htCombineSignature(),
// decoded field by field through signatureFieldsOf().
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
    {"num_experts", 16, 11, 1},
    {"expert_alignment", 32, 17, 1},
    {"expert_major", 49, 1, 1},  // htExpertMajorBits(): OR-ed into htSignature()'s value
};
inline constexpr SignatureField kLlSignatureFields[] = {
    {"use_fp8", 0, 1, 1},
    {"hidden", 1, 8, kHiddenAlignment},
};
// Every rank pulls each peer's received top-k weights: either all ranks stage them or none, with
// one row width.
inline constexpr SignatureField kHtCombineSignatureFields[] = {
    {"CombineArgs::recv_topk_weights set", 0, 1, 1},
    {"the handle's num_topk (the recv_topk_weights row width)", 1, 5, 1},
    {"pushed: copy-in (CombineArgs::x not the buffer's combine input; every rank passes x "
     "alike) with num_sms >= 2 and EPCOMM_PERF's ht_push_combine on",
     6, 1, 1},
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
         signatureBits(f[3], has_topk ? num_topk : 0) | signatureBits(f[4], has_topk && idx_is_64) |
         signatureBits(f[5], num_experts) | signatureBits(f[6], expert_alignment);
}
inline uint32_t htCombineSignature(bool combined_weights, int num_topk, bool push = false) {
  const SignatureField* f = kHtCombineSignatureFields;
  return static_cast<uint32_t>(signatureBits(f[0], combined_weights) |
                               signatureBits(f[1], combined_weights ? num_topk : 0) |
                               signatureBits(f[2], push));
}
// The expert-major bit of the HT dispatch signature (kept apart from htSignature() so the field
// list can grow without touching its callers).
inline uint64_t htExpertMajorBits(bool expert_major) {
  return signatureBits(kHtSignatureFields[7], expert_major ? 1 : 0);
}
inline uint32_t llSignature(int hidden, bool use_fp8) {
  return static_cast<uint32_t>(signatureBits(kLlSignatureFields[0], use_fp8) |
                               signatureBits(kLlSignatureFields[1], hidden));
}
// The fields of the signature `op` carries (HT dispatch, HT combine, else LL), for decoding a
// mismatch.
struct SignatureFields {
  const SignatureField* fields;
  size_t count;
};
// LL combine: whether LlCombineArgs::topk_weights was given (1) or the dispatch's weights are
// used (0); the value of the combine-weights post (ControlRegion::ll_weights_flag).
inline constexpr SignatureField kLlCombineSignatureFields[] = {
    {"LlCombineArgs::topk_weights given", 0, 1, 1},
};
// The combine-weights post's value: how rank s's weights reach the experts for this combine.
constexpr uint32_t kLlWeightsNone = 0;      // s uses its dispatch weights (s has tokens)
constexpr uint32_t kLlWeightsPushed = 1;    // s pushed combine-time weights into combine_weights
constexpr uint32_t kLlWeightsNoTokens = 2;  // s dispatched no tokens: nothing to give
// LlRegions::weights_tags: a pushed weight row is in (ready as the row tags are: llRowTagReady).
constexpr uint32_t kLlWeightsTagged = 1;
EPCOMM_HOST_DEVICE constexpr uint32_t llWeightsPost(uint32_t mode) {
  return mode;
}
inline SignatureFields signatureFieldsOf(OpId op) {
  if (op == OpId::kHtDispatch) return {kHtSignatureFields, std::size(kHtSignatureFields)};
  if (op == OpId::kHtCombine) {
    return {kHtCombineSignatureFields, std::size(kHtCombineSignatureFields)};
  }
  if (op == OpId::kLlCombineSend) {
    return {kLlCombineSignatureFields, std::size(kLlCombineSignatureFields)};
  }
  return {kLlSignatureFields, std::size(kLlSignatureFields)};
}
constexpr int kHtSignatureWords = 2;
static_assert(kMaxExperts < (1 << 11), "HT signature: num_experts has 11 bits");
static_assert(kMaxHidden / kHiddenAlignment < (1 << 8), "HT/LL signature: hidden has 8 bits");
static_assert(kMaxTopk < (1 << 5), "HT signature: num_topk has 5 bits");

// LL rows-sent post value: rows in the low 16 bits (<= kMaxLlTokensPerRank), signature above.
constexpr uint32_t kLlRowsMask = 0xffffu;
static_assert(kMaxLlTokensPerRank <= static_cast<int>(kLlRowsMask), "LL rows must fit 16 bits");
EPCOMM_HOST_DEVICE constexpr uint32_t llPost(uint32_t rows, uint32_t signature) {
  return rows | signature << 16;
}
EPCOMM_HOST_DEVICE constexpr uint32_t llPostRows(uint32_t post) {
  return post & kLlRowsMask;
}
EPCOMM_HOST_DEVICE constexpr uint32_t llPostSignature(uint32_t post) {
  return post >> 16;
}

// LL dispatch row tags (LlRegions::row_tags): for each of its tokens, the sender writes
// tag(epoch, llRowPresent(k_mask)) into the token's slot of every rank d it staged the row in,
// after the row (the block that staged a tile's rows fences once, then tags them), k_mask having
// bit k set when the token's (deduplicated) top-k entry k is one of d's experts, and
// tag(epoch, kLlRowAbsent) into the slot of every other rank; the receiver reads a slot once its
// tag is this call's. Readiness is the exact epoch (a slot holds this call's tag or one from two
// calls back, its parity) with a non-zero value, so neither the zeroed words of a new buffer nor
// a counter near the 32-bit wrap can pass for one.
constexpr uint32_t kLlRowAbsent = 1;
constexpr uint32_t kLlRowPresentBit = 2;
static_assert(kMaxTopk <= 30, "LL row tags: a top-k entry mask above two flag bits");
EPCOMM_HOST_DEVICE constexpr uint32_t llRowPresent(uint32_t k_mask) {
  return kLlRowPresentBit | k_mask << 2;
}
EPCOMM_HOST_DEVICE constexpr bool llRowIsPresent(uint32_t value) {
  return (value & kLlRowPresentBit) != 0;
}
EPCOMM_HOST_DEVICE constexpr uint32_t llRowTopkMask(uint32_t value) {
  return value >> 2;
}
// LL dispatch entry tags (LlRegions::entry_tags; sent at small batches, the fine receive's
// shape): while routing, before the row is staged, the sender writes tag(epoch,
// llEntryValue(local)) into entry k's word of the token's slot at the rank holding entry k's
// expert (local: its index there), for every valid, deduplicated entry of a token without a bad
// id. Relaxed: it publishes nothing (the row tag still releases the row and its metadata). A
// receiver that sees it first takes the row's slab position while the row is being staged; one
// that sees the row tag first goes on without it. Ready as the row tags are (llRowTagReady).
EPCOMM_HOST_DEVICE constexpr uint32_t llEntryValue(int32_t local_expert) {
  return static_cast<uint32_t>(local_expert) + 1u;
}
EPCOMM_HOST_DEVICE constexpr int32_t llEntryLocalExpert(uint32_t value) {
  return static_cast<int32_t>(value - 1u);
}
// LL combine partial-row tags (LlRegions::combine_tags): tag(epoch, kLlPartialTagged), ready as
// the row tags are.
constexpr uint32_t kLlPartialTagged = 1;
// LL combine partial lines (LlRegions::combine_lines), for a token owner with at most
// LlRegions::line_tokens tokens in the call (both sides know that count: the owner its own, an
// expert rank the owner's dispatch post). Each 16-byte line carries 8 payload bytes as two
// 8-byte halves, each 4 payload bytes beside the call's flag (NCCL's LL protocol shape): a half
// is stored and loaded whole (8-byte single-copy atomicity), so a half holding this call's flag
// holds this call's payload. No fence and no tag: the owner polls the lines themselves. The
// flag is never 0 (the region's cleared value), and consecutive calls of one parity differ.
EPCOMM_HOST_DEVICE constexpr uint32_t llLineFlag(uint64_t epoch) {
  return static_cast<uint32_t>(epoch % 0xffffffffull) + 1u;
}
// Owners with at most this many tokens get lines: the lines double the bytes and many warps poll
// them, so small batches only, where the fence and the tag round trip cost more (one H200:
// combine -10 to -17 % at 1 and 8 tokens, every SM budget; +7 to +10 % at 16 tokens on 16 and
// 24 SMs; docs/perf-notes.md, session 21).
constexpr int kLlLineTokens = 8;
EPCOMM_HOST_DEVICE constexpr bool llRowTagReady(uint64_t word, uint64_t epoch) {
  return static_cast<uint32_t>(word >> 32) == static_cast<uint32_t>(epoch) &&
         static_cast<uint32_t>(word) != 0;
}
// A slot holding a row of this call (its tag is this call's and says present).
EPCOMM_HOST_DEVICE constexpr bool llRowStaged(uint64_t word, uint64_t epoch) {
  return llRowTagReady(word, epoch) && llRowIsPresent(static_cast<uint32_t>(word));
}

// ControlRegion::peer_faulted: a kernel of rank r found bad input (an expert id out of range) or
// bad data from a peer, recorded it and stopped; it writes this word into every peer's control
// region so that their waits stop at once (FailKind::kPeerFaulted naming r) instead of timing
// out. Sticky: after a device-side fault the buffer is broken on every rank.
//   bits 63..32: r + 1   bits 31..16: FailKind found by r   bits 15..0: OpId in which r found it
// The peers' records keep bits 31..0 (faultKindOp) in `observed`.
EPCOMM_HOST_DEVICE constexpr uint32_t faultKindOp(FailKind kind, OpId op) {
  return (static_cast<uint32_t>(kind) & 0xffffu) << 16 | (static_cast<uint32_t>(op) & 0xffffu);
}
EPCOMM_HOST_DEVICE constexpr uint64_t faultNotice(int rank, uint32_t kind_op) {
  return (static_cast<uint64_t>(rank) + 1) << 32 | kind_op;
}
EPCOMM_HOST_DEVICE constexpr int faultNoticeRank(uint64_t notice) {
  return static_cast<int>(notice >> 32) - 1;
}
EPCOMM_HOST_DEVICE constexpr uint32_t faultNoticeKindOp(uint64_t notice) {
  return static_cast<uint32_t>(notice & 0xffffffffu);
}
EPCOMM_HOST_DEVICE constexpr int faultKindOf(uint64_t kind_op) {
  return static_cast<int>((kind_op >> 16) & 0xffffu);
}
EPCOMM_HOST_DEVICE constexpr int faultOpOf(uint64_t kind_op) {
  return static_cast<int>(kind_op & 0xffffu);
}

struct alignas(128) ControlRegion {
  uint64_t barrier[kMaxRanks];                    // [src] epoch
  uint64_t peer_rejected[kNumEpochs][kMaxRanks];  // [family][src] last call src rejected
  uint64_t peer_faulted;                          // fault notice (above), 0 if none
  uint64_t ht_counts[2][kMaxRanks]
                    [kMaxRanks + kHtSignatureWords];  // [parity][src][dst];
                                                      // [src][R, R+1] = call signature; tagged
  uint64_t ht_dispatch_done[kMaxRanks];               // [src] epoch
  uint64_t ht_combine_ready[kMaxRanks];               // [src] tagged htCombineSignature(): src's
                                                      // combine input ready
  uint64_t ht_combine_done[kMaxRanks];                // [src] epoch: src finished pulling
  // Rank-major HT dispatch and pull combine (arrivalShare): [src] the shares src's blocks added
  // after their rows into this rank (dispatch) / their pulls from it (combine); kArrivalShares
  // when all are in, then zeroed by this rank for its next call.
  uint64_t ht_rows_in[kMaxRanks];
  uint64_t ht_pulls_done[kMaxRanks];
  uint64_t ll_dispatch_flag[2][kMaxRanks];  // [parity][src] tagged llPost()

  // LL combine weights (low_latency.cuh): [parity][src] tagged llWeightsPost(), src's weights
  // mode (pushed: each of its rows in combine_weights is tagged in LlRegions::weights_tags).
  uint64_t ll_weights_flag[2][kMaxRanks];
  // This rank only: the LL epoch of the last dispatch send (a combine of a stopped round, whose
  // call counter moved on, sees another value and returns).
  uint64_t ll_round_epoch;

  LocalState local;
  uint64_t ht_expert_counts[2][kMaxRanks][kMaxExperts];  // [parity][src][local expert] tagged
};

// LocalState::epoch and ::skipped are read by the host with one copy (callsPassed).
constexpr size_t kCallCountersOffset = offsetof(ControlRegion, local) + offsetof(LocalState, epoch);
constexpr size_t kCallCountersBytes = 2 * kNumEpochs * sizeof(uint64_t);
static_assert(offsetof(LocalState, skipped) ==
                  offsetof(LocalState, epoch) + sizeof(uint64_t) * kNumEpochs,
              "epoch and skipped are read with one copy");

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
// bits 63..16: the call's epoch (low 48 bits)   15..8: OpId of the stopped wait   7..0: rank + 1
EPCOMM_HOST_DEVICE constexpr uint64_t rejectionReport(int rank, OpId op, uint64_t epoch) {
  return epoch << 16 | (static_cast<uint64_t>(static_cast<uint32_t>(op)) & 0xffu) << 8 |
         (static_cast<uint64_t>(rank + 1) & 0xffu);
}
EPCOMM_HOST_DEVICE constexpr uint64_t rejectionEpoch(uint64_t report) {
  return report >> 16;
}
EPCOMM_HOST_DEVICE constexpr OpId rejectionOp(uint64_t report) {
  return static_cast<OpId>((report >> 8) & 0xffu);
}
EPCOMM_HOST_DEVICE constexpr int rejectionRank(uint64_t report) {
  return static_cast<int>(report & 0xffu) - 1;
}
static_assert(kMaxRanks + 1 <= 0xff, "a rejection report holds rank + 1 in 8 bits");
static_assert(static_cast<int>(OpId::kCount) <= 0xff, "a rejection report holds the op in 8 bits");

// Exact-mode HT count (host-mapped word): set once the count is known (the host clears it before
// each call).
constexpr uint64_t kHostCountValid = uint64_t{1} << 63;
EPCOMM_HOST_DEVICE constexpr uint64_t hostCount(uint32_t rows) {
  return kHostCountValid | rows;
}
EPCOMM_HOST_DEVICE constexpr bool hostCountValid(uint64_t word) {
  return (word & kHostCountValid) != 0;
}
EPCOMM_HOST_DEVICE constexpr int64_t hostCountRows(uint64_t word) {
  return static_cast<int64_t>(word & 0xffffffffu);
}

// ---------------------------------------------------------------------------------------------
// Data regions: byte offsets inside every rank's buffer (identical on all ranks).
// ---------------------------------------------------------------------------------------------
struct HtRegions {
  uint64_t recv_x = 0;             // [capacity, hidden * 2 bytes] (BF16 rows; FP8 uses half)
  uint64_t recv_scales = 0;        // [capacity, hidden / 128] float
  uint64_t recv_topk_idx = 0;      // [capacity, max_topk] int64 (or int32, packed by num_topk)
  uint64_t recv_topk_weights = 0;  // [capacity, max_topk] float (packed by num_topk)
  uint64_t recv_src_idx = 0;       // [capacity] int32
  uint64_t combine_in = 0;         // [capacity, hidden] BF16
  uint64_t combine_weights = 0;    // [capacity, max_topk] float (packed by num_topk): combine's
                                   // recv_topk_weights when they are not recv_topk_weights
  int64_t capacity = 0;            // rows = num_ranks * max_tokens_per_rank
  // Push combine (htPushCombineKernel): every other rank pushes back the rows it holds for this
  // rank's tokens into this rank's combine_in, [num_ranks - 1][max_tokens][hidden] BF16 (rank
  // r's block at index r < me ? r : r - 1; a pushing combine is copy-in on every rank, so
  // combine_in holds no caller rows then), each 32-row chunk released by an epoch flag,
  // combine_flags [num_ranks][push_chunks] uint64 (indexed by the pushing rank).
  uint64_t combine_flags = 0;
  int32_t max_tokens = 0;
  int32_t push_chunks = 0;
};
// Rows per pushed chunk (one flag each) in the push combine.
constexpr int kPushChunkRows = 32;

// What peers write (staging rows, their metadata, combine partials) has two copies, indexed by
// the call's parity; what only this rank writes and reads in stream order (outputs, bookkeeping)
// has one.
struct LlRegions {
  uint64_t rows[2] = {};          // [num_ranks][max_tokens][row_bytes] staged rows, by source
  uint64_t meta[2] = {};          // [num_ranks][max_tokens][meta_bytes] their metadata
  uint64_t row_tags[2] = {};      // [num_ranks][max_tokens] uint64 row tags, by source
  uint64_t entry_tags[2] = {};    // [num_ranks][max_tokens][max_topk] uint64 entry tags, by source
  uint64_t combine_rows[2] = {};  // [num_ranks][max_tokens][hidden] BF16 partial sums, by rank
  // [num_ranks][max_tokens][hidden / kLlSegmentCols] uint64: tag(epoch, 1) per partial segment,
  // stored by the rank that summed it after the segment (the LL combine's only signal)
  uint64_t combine_tags[2] = {};
  // [num_ranks][line_tokens][hidden * 2] uint32 (lines: hidden * 4 bytes per partial row), by
  // rank: the partials of a token owner with at most line_tokens tokens (llLineFlag)
  uint64_t combine_lines[2] = {};
  uint64_t slot_of_row = 0;          // [num_ranks][max_tokens][max_topk] int32 output row or -1
  uint64_t out_x = 0;                // [local_experts][rows_per_expert][hidden * 2 bytes]
  uint64_t out_scales = 0;           // [local_experts][rows_per_expert][hidden / 128] float
  uint64_t src_info = 0;             // [local_experts][rows_per_expert] int32
  uint64_t expert_count = 0;         // [local_experts] int32
  uint64_t token_mask = 0;           // [max_tokens][rankMaskWords(R)] uint32: ranks each of my
                                     // tokens went to
  int64_t max_tokens = 0;            // ll_max_tokens_per_rank
  int64_t rows_per_expert = 0;       // num_ranks * max_tokens
  int64_t row_bytes = 0;             // staged row stride: hidden * 2 (FP8 rows + scales fit too)
  int64_t meta_bytes = 0;            // metadata record stride
  int32_t combine_tag_segments = 0;  // hidden / kLlSegmentCols, rounded up: tags per partial row
  int32_t entry_tags_per_slot = 0;   // max_topk: entry tags per staged slot
  int32_t line_tokens = 0;           // min(kLlLineTokens, max_tokens): combine_lines rows per rank

  // LL combine weights (low_latency.cuh).
  // [num_ranks][max_tokens][max_topk] float: each source's combine-time weights of the tokens it
  // sent here, by parity.
  uint64_t combine_weights[2] = {};
  // [num_ranks][max_tokens] uint64, by parity: tag(epoch, kLlWeightsTagged) per source's token,
  // stored after that token's weight row (the pushed weights' only signal; no grid arrival).
  uint64_t weights_tags[2] = {};
  // [max_tokens][max_topk] int32: my tokens' valid, deduplicated expert ids (-1 otherwise), for
  // the combine-weights push (no rank bitmask needed).
  uint64_t topk_copy = 0;
};

}  // namespace epcomm::kernels
