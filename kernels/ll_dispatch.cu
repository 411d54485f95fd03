// SPDX-License-Identifier: Apache-2.0
// LL dispatch: the send and receive kernels (the protocol is described in low_latency.cuh).
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>

#include "kernels/kernel_check.hpp"
#include "kernels/low_latency.cuh"

namespace epcomm::kernels {
namespace {

constexpr int kTile = kBlockThreads;  // tokens routed per pass of the send half
// The send half's destination lists: ranks in 8 bits, counts (or -1) in a signed 8 bits.
static_assert(kMaxRanks <= 0xff && kMaxTopk <= 0x7f, "LL destination lists: 8-bit entries");

constexpr WaitPhase kPhaseDispatchPost = WaitPhase::kLlDispatchPost;
constexpr WaitPhase kPhaseDispatchRow = WaitPhase::kLlDispatchRow;
// Stage times (kernels/stage_times.hpp): recorded by the fused kernel's halves.
constexpr StageKernel kStages = StageKernel::kLlDispatch;
// Small batches (llDispatchFineItems): the receive places each (row, entry) item with a group of
// four warps, each loading its quarter of the row at once (kGroupRuns runs of 32 vectors: a 14 KB
// BF16 row is 28 runs, 7 per warp), so the row lands one memory latency after its position is
// known instead of after the single warp's four copy batches.
constexpr int kWarpsPerGroup = 4;
constexpr int kGroupsPerBlock = kWarpsPerBlock / kWarpsPerGroup;
constexpr int kGroupRuns = 8;
// Polls of a fine item's entry tag and row tag together before the row tag's own wait (each a
// memory latency: tens of microseconds at most, beyond any entry tag's lead over its row tag).
constexpr int kEntryTagPolls = 64;
static_assert(kGroupsPerBlock <= kMaxGroupBarriers, "a group barrier per group");
namespace stage = ll_dispatch_stage;

// Moves one 1024-column segment of a BF16 row into a staging row, casting to FP8 if asked.
__device__ __forceinline__ void stageSegment(const LlParams& p, const uint16_t* x_row,
                                             uint8_t* staged, int seg, int lane) {
  const int hidden = p.hidden;
  // Every round's load first, then the stores: the segment's loads are in flight together.
  int4 loaded[kRoundsPerSegment];
#pragma unroll
  for (int r = 0; r < kRoundsPerSegment; ++r) {
    const int col = seg * kSegmentCols + r * kColsPerRound + lane * 8;
    loaded[r] =
        col < hidden ? ldInput(reinterpret_cast<const int4*>(x_row + col)) : make_int4(0, 0, 0, 0);
  }
#pragma unroll
  for (int r = 0; r < kRoundsPerSegment; ++r) {
    const int col = seg * kSegmentCols + r * kColsPerRound + lane * 8;
    const bool in_row = col < hidden;  // hidden is a multiple of 128: whole half-warps agree
    const int4 v = loaded[r];
    if (!p.use_fp8) {
      if (in_row) *reinterpret_cast<int4*>(staged + int64_t{col} * 2) = v;
      continue;
    }
    float f[8];
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 two = __bfloat1622float2(h[i]);
      f[2 * i] = two.x;
      f[2 * i + 1] = two.y;
      amax = fmaxf(amax, fmaxf(fabsf(two.x), fabsf(two.y)));
    }
    // One scale per 128 columns = 16 lanes; xor offsets below 16 stay inside the half-warp.
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, off));
    const float scale = fmaxf(amax, 1e-4f) / 448.0f;
    const float inv = 1.0f / scale;
    uint32_t packed[2] = {0, 0};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t q = __nv_cvt_float_to_fp8(__fmul_rn(f[i], inv), __NV_SATFINITE, __NV_E4M3);
      packed[i / 4] |= q << (8 * (i % 4));
    }
    if (in_row) {
      *reinterpret_cast<uint2*>(staged + col) = make_uint2(packed[0], packed[1]);
      if ((lane & 15) == 0) {
        reinterpret_cast<float*>(staged + hidden)[col / kFp8BlockSize] = scale;
      }
    }
  }
}

// The send half's routing: a group of lanes per token (the power of two >= num_topk; 32 / G tokens
// per warp), lane k of the group taking top-k entry k. The block's tokens are a contiguous chunk.
struct RoutingLane {
  int group_lanes;
  int k;        // the top-k entry this lane takes
  int token;    // the token of the pass (tid / group_lanes)
  int t_begin;  // the block's chunk
  int t_end;
};
__device__ __forceinline__ RoutingLane routingLaneOf(const LlParams& p) {
  const int group_lanes = 1 << (32 - __clz(max(p.num_topk, 1) - 1));
  const int chunk = (p.num_tokens + gridDim.x - 1) / gridDim.x;
  const int t_begin = min(p.num_tokens, static_cast<int>(blockIdx.x) * chunk);
  return RoutingLane{group_lanes, static_cast<int>(threadIdx.x % kWarpSize) % group_lanes,
                     static_cast<int>(threadIdx.x) / group_lanes, t_begin,
                     min(p.num_tokens, t_begin + chunk)};
}
// The id this thread routes in its block's first pass, -1 if none: loaded at the kernel's start,
// beside the epoch and the failure word (one memory latency for all, where the routing's load
// came after the barrier that reads the failure word). Reading the caller's ids is harmless when
// the rank has failed: the send half then returns before using it.
template <typename IdxT>
__device__ __forceinline__ int64_t firstRoutedId(const LlParams& p) {
  const RoutingLane route = routingLaneOf(p);
  const int t = route.t_begin + route.token;
  return t < route.t_end && route.k < p.num_topk
             ? static_cast<int64_t>(
                   static_cast<const IdxT*>(p.topk_idx)[int64_t{t} * p.num_topk + route.k])
             : int64_t{-1};
}

// The send half. Its kernel checked rankFailed for the whole block (a rank that failed sends
// nothing: its peers stop on its fault notice or their own failure) and, before that barrier,
// filled s_peer with the peer table (loaded beside the epoch and the first id: the routing lanes
// address their entry tags with it). Every return below is block-uniform, so in the fused kernel
// all threads of the block go on to the receive half together (a thread leaving early would meet
// that half's barriers).
//
// No count round trip and no grid-wide arrival: token t of this rank is staged in slot t of every
// destination (slots are per source and max_tokens long), the last block posts the token count to
// every rank at once (the tokens fill the blocks from the first, so at small batches it has
// none), and each block tags its tile's rows (present, with the top-k entries that are the
// destination's, or absent) after one fence, so a receiver copies a row as soon as its tag is in.
template <typename IdxT>
__device__ __forceinline__ void llDispatchSend(const LlParams& p, uint64_t epoch, int64_t first_id,
                                               bool send_entry_tags, uint8_t* const* s_peer) {
  // A tile token's destination ranks: a token reaches at most num_topk ranks, so the list is
  // kMaxTopk long whatever the rank count. s_num_dest: -1 for a token with a bad id (sent and
  // tagged nowhere, so every rank's receive waits on it until the fault notice stops it).
  __shared__ uint8_t s_dest_rank[kTile][kMaxTopk];
  __shared__ uint16_t s_dest_topk[kTile][kMaxTopk];  // the token's top-k entries at that rank
  __shared__ int8_t s_num_dest[kTile];

  const PeerContext& ctx = p.peers;
  const int tid = threadIdx.x;
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int num_ranks = ctx.num_ranks;
  const int me = ctx.rank;
  const int parity = static_cast<int>(epoch & 1);
  const int n = p.num_tokens;
  const LlRegions& r = p.regions;
  const int num_segments = (p.hidden + kSegmentCols - 1) / kSegmentCols;

  if (blockIdx.x == gridDim.x - 1) {
    // This rank's receive side of the call starts from empty expert lists.
    int32_t* counts = reinterpret_cast<int32_t*>(ctx.local_base + r.expert_count);
    for (int e = tid; e < p.num_local_experts; e += kBlockThreads) counts[e] = 0;
    if (tid == 0) {
      controlOf(ctx.local_base)->ll_round_epoch = epoch;  // read by this round's combine
    }
    __syncthreads();
    stageThread0(ctx, kStages, stage::kSetup);
    // The token count (and the call's signature) to every rank, at once: receivers learn how many
    // slots to watch. Release: the fused receive half waits for its own post before it counts
    // into the zeroed counters.
    if (tid < num_ranks) {
      stReleaseSys(&controlOf(s_peer[tid])->ll_dispatch_flag[parity][me],
                   tag(epoch, llPost(static_cast<uint32_t>(n), p.signature)));
      stageThread(ctx, kStages, stage::kPosted);
    }
  }

  const RoutingLane route = routingLaneOf(p);
  const int t_begin = route.t_begin;
  const int t_end = route.t_end;
  const int mask_words = rankMaskWords(num_ranks);
  const int max_dest = min(p.num_topk, num_ranks);
  uint32_t* token_masks = reinterpret_cast<uint32_t*>(ctx.local_base + r.token_mask);
  // Routing (RoutingLane): the ids are loaded, checked, deduplicated and divided into ranks at
  // once. One thread per token did the same one entry after another (about 3 us of a 1-token
  // dispatch at top-8).
  for (int tile = t_begin; tile < t_end; tile += kTile) {
    const int tile_len = min(kTile, t_end - tile);
    const int group_lanes = route.group_lanes;
    const int k = route.k;
    const int group_lane0 = lane - k;
    const int groups_per_block = kBlockThreads / group_lanes;
    const IdxT* topk_idx = static_cast<const IdxT*>(p.topk_idx);
    int32_t* topk_copy = reinterpret_cast<int32_t*>(ctx.local_base + r.topk_copy);
    for (int base = 0; base < tile_len; base += groups_per_block) {
      // Warp-uniform: the warp's first group is past the tile, so are all its groups from here.
      if (base + warp * (kWarpSize / group_lanes) >= tile_len) break;
      const int local_t = base + route.token;
      const int t = tile + local_t;
      const bool has_entry = local_t < tile_len && k < p.num_topk;
      // The first pass's id was loaded at the kernel's start (firstRoutedId).
      const int64_t id = tile == t_begin && base == 0 ? first_id
                         : has_entry ? static_cast<int64_t>(topk_idx[int64_t{t} * p.num_topk + k])
                                     : int64_t{-1};
      // An id outside [-1, num_experts) is bad input: recorded, announced to every peer (the op
      // then fails on every rank), never used as an address, and its token is sent nowhere.
      const bool valid = id >= 0 && id < p.num_experts;
      const bool bad_entry = !valid && id != -1;
      if (bad_entry) {
        recordFault(p.peers, FailKind::kBadExpertId, OpId::kLlDispatchSend, WaitPhase::kNone, -1, t,
                    static_cast<uint64_t>(p.num_experts), static_cast<uint64_t>(id));
      }
      // The lanes of this token holding the same value (a warp match on the key (the token's
      // group in the warp, value); a value is an expert id or a rank, < kMaxExperts); a lane
      // without a value matches no other (its key is one no other lane has). 32-bit keys: a
      // 64-bit match (MATCH.ANY.U64) is the slow form.
      static_assert(kMaxExperts <= (1 << 26), "routing match keys: 5 bits of group, 27 of value");
      const uint32_t group_key = static_cast<uint32_t>(lane / group_lanes) << 27;
      auto sameInToken = [&](bool has_value, uint32_t value) {
        return __match_any_sync(kFullMask,
                                has_value ? group_key | value : ~0u - static_cast<uint32_t>(lane));
      };
      const uint32_t lanes_below = (1u << lane) - 1u;
      // The routing policy (ops.hpp): an entry repeating an earlier one of its token is -1.
      const uint32_t same_id = sameInToken(valid, static_cast<uint32_t>(id));
      const int32_t kept = valid && (same_id & lanes_below) == 0 ? static_cast<int32_t>(id) : -1;
      const int rank = kept >= 0 ? kept / p.num_local_experts : -1;
      RankMask mask = emptyRankMask();
      if (rank >= 0) mask.set(rank);
      for (int offset = 1; offset < group_lanes; offset <<= 1) {
#pragma unroll
        for (int j = 0; j < kRankMaskWords; ++j) {
          if (j < mask_words) mask.w[j] |= __shfl_xor_sync(kFullMask, mask.w[j], offset);
        }
      }
      const uint32_t group_bits = ((1u << group_lanes) - 1u) << group_lane0;  // group_lanes <= 16
      const bool bad = (__ballot_sync(kFullMask, bad_entry) & group_bits) != 0;
      // The entry's expert to its rank ahead of the row (entry tags, protocol.hpp): the fine
      // receive takes the row's slab position while the row is being staged.
      if (send_entry_tags && rank >= 0 && !bad) {
        const int64_t at = (int64_t{me} * r.max_tokens + t) * p.max_topk + k;
        stRelaxedSys(reinterpret_cast<uint64_t*>(s_peer[rank] + r.entry_tags[parity]) + at,
                     tag(epoch, llEntryValue(kept - rank * p.num_local_experts)));
      }
      // The token's destination list in increasing rank order: each rank's first entry writes
      // the rank and the token's entries at that rank (one bit per entry k), at its rank's
      // position among the mask's ranks.
      const uint32_t same_rank = sameInToken(rank >= 0, static_cast<uint32_t>(rank));
      if (rank >= 0 && (same_rank & lanes_below) == 0) {
        // Each word read with a constant index, selected by its bits (a word picked by the
        // rank's index would put the mask in local memory).
        const int rank_word = rank >> 5;
        const uint32_t bits_below = (1u << (rank & 31)) - 1u;
        int position = 0;
#pragma unroll
        for (int j = 0; j < kRankMaskWords; ++j) {
          position += __popc(mask.w[j] & (j < rank_word ? ~0u : j == rank_word ? bits_below : 0u));
        }
        s_dest_rank[local_t][position] = static_cast<uint8_t>(rank);
        s_dest_topk[local_t][position] = static_cast<uint16_t>(same_rank >> group_lane0);
      }
      // The valid, deduplicated ids, for the combine-weights push (which must not rely on a rank
      // bitmask: it iterates over these).
      if (has_entry) topk_copy[int64_t{t} * p.max_topk + k] = kept;
      if (k == 0 && local_t < tile_len) {
        storeRankMask(token_masks, t, mask_words, mask);
        int num_dest = 0;
#pragma unroll
        for (int j = 0; j < kRankMaskWords; ++j) num_dest += __popc(mask.w[j]);
        s_num_dest[local_t] = static_cast<int8_t>(bad ? -1 : num_dest);
      }
    }
    __syncthreads();
    stageThread0(ctx, kStages, stage::kRouted);

    // Work items: (token of the tile, destination of the token, row segment).
    const int items = tile_len * max_dest * num_segments;
    for (int item = warp; item < items; item += kWarpsPerBlock) {
      const int local_t = item / (max_dest * num_segments);
      const int j = (item / num_segments) % max_dest;
      const int seg = item % num_segments;
      if (j >= s_num_dest[local_t]) continue;
      const int token = tile + local_t;
      const int d = s_dest_rank[local_t][j];
      uint8_t* peer = s_peer[d];
      const int64_t slot = int64_t{me} * r.max_tokens + token;
      uint8_t* staged = peer + r.rows[parity] + slot * r.row_bytes;
      // The metadata's loads (segment 0's warp) before the segment's: in flight together.
      const bool meta_lane = seg == 0 && lane < p.num_topk;
      const int64_t e = meta_lane ? static_cast<int64_t>(static_cast<const IdxT*>(
                                        p.topk_idx)[int64_t{token} * p.num_topk + lane])
                                  : -1;
      // Without dispatch weights combine must get them (LlCombineArgs::topk_weights; the host
      // checks), so these zeros are never used.
      const float weight = meta_lane && p.topk_weights != nullptr
                               ? p.topk_weights[int64_t{token} * p.num_topk + lane]
                               : 0.0f;
      stageSegment(p, p.x + int64_t{token} * p.hidden, staged, seg, lane);
      if (meta_lane) {
        int32_t* meta = reinterpret_cast<int32_t*>(peer + r.meta[parity] + slot * r.meta_bytes);
        // Routing policy (ops.hpp): a repetition of an earlier entry of the token is -1, so an
        // expert gets a token at most once and a slab never holds more than its capacity.
        const unsigned lanes = (1u << p.num_topk) - 1u;  // num_topk <= kMaxTopk < 32
        // 32-bit keys (a 64-bit match is the slow form): every id outside [0, num_experts)
        // shares one key no valid id has, and maps to -1 whatever it matches.
        const bool valid = e >= 0 && e < p.num_experts;
        const unsigned same = __match_any_sync(lanes, valid ? static_cast<uint32_t>(e) : ~0u);
        const bool first = (same & ((1u << lane) - 1u)) == 0;
        meta[lane] = first && valid ? static_cast<int32_t>(e) : -1;
        reinterpret_cast<float*>(meta + p.max_topk)[lane] = weight;
      }
    }
    __syncthreads();  // the tile's rows are issued by every warp of the block
    stageThread0(ctx, kStages, stage::kCopied);

    // The tile's tags, (token, rank) pairs over the threads. Each tagging warp fences first: a
    // fence then a strong store is a release pattern, cumulative over the rows the block's warps
    // stored before the barrier.
    const int pairs = tile_len * num_ranks;
    if (tid < pairs) fenceAcqRelSys();
    for (int i = tid; i < pairs; i += kBlockThreads) {
      const int local_t = i / num_ranks;
      const int d = i % num_ranks;
      const int num_dest = s_num_dest[local_t];
      if (num_dest < 0) continue;
      uint32_t value = kLlRowAbsent;
      for (int j = 0; j < num_dest; ++j) {
        if (s_dest_rank[local_t][j] == d) value = llRowPresent(s_dest_topk[local_t][j]);
      }
      uint64_t* row_tag = reinterpret_cast<uint64_t*>(s_peer[d] + r.row_tags[parity]) +
                          int64_t{me} * r.max_tokens + tile + local_t;
      stRelaxedSys(row_tag, tag(epoch, value));
    }
    __syncthreads();  // the next tile rewrites the destination lists
    stageThread0(ctx, kStages, stage::kTagged);
  }
}

// The receive half. `fused`: called by llDispatchFusedKernel after the send half of the same
// grid (rankFailed checked block-uniformly by the caller). kFine: a four-warp group per item
// (kWarpsPerGroup), else a warp.
template <bool kFine>
__device__ __forceinline__ void llDispatchRecv(const LlParams& p, uint64_t epoch, bool fused) {
  const PeerContext& ctx = p.peers;
  ControlRegion* own = controlOf(ctx.local_base);
  const int tid = threadIdx.x;
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int num_ranks = ctx.num_ranks;
  const int parity = static_cast<int>(epoch & 1);
  const LlRegions& r = p.regions;
  const WaitContext w{&ctx, OpId::kLlDispatchRecv, globalTimerNs()};
  const int first_local = ctx.rank * p.num_local_experts;
  const int64_t out_row_bytes = p.use_fp8 ? p.hidden : int64_t{p.hidden} * 2;
  const int num_scales = p.hidden / kFp8BlockSize;

  // Both item shapes below: source s's staged row in slot `row`, and the fault of a slab that a
  // peer overfilled (each source sends a token to an expert at most once, so a slab of
  // num_ranks * max_tokens rows cannot overflow; a peer that breaks that rule is stopped here).
  auto stagedRow = [&](int s, int row) {
    return ctx.local_base + r.rows[parity] + (int64_t{s} * r.max_tokens + row) * r.row_bytes;
  };
  // Source s's row `row`: its tag, and its entries' output rows (slot_of_row, one per top-k k).
  auto rowTagOf = [&](int s, int row) {
    return reinterpret_cast<const uint64_t*>(ctx.local_base + r.row_tags[parity]) +
           int64_t{s} * r.max_tokens + row;
  };
  auto slotsOfRow = [&](int s, int row) {
    return reinterpret_cast<int32_t*>(ctx.local_base + r.slot_of_row) +
           (int64_t{s} * r.max_tokens + row) * p.max_topk;
  };
  auto recordSlabOverflow = [&](int s, int row, int32_t pos) {
    recordFault(ctx, FailKind::kOverCapacity, OpId::kLlDispatchRecv, kPhaseDispatchPost, s, row,
                static_cast<uint64_t>(r.rows_per_expert), static_cast<uint64_t>(pos) + 1);
  };

  __shared__ int32_t s_count;
  __shared__ bool s_stopped;  // a row wait of the block ended unready: the op is over here

  if (fused ? __syncthreads_or(rankFailed(ctx)) : rankFailed(ctx)) return;
  if (tid == 0) s_stopped = false;
  // Blocks are split evenly over the sources; with fewer blocks than ranks a block takes several.
  const int blocks_per_source = max(1, static_cast<int>(gridDim.x) / num_ranks);
  if (static_cast<int>(blockIdx.x) / num_ranks >= blocks_per_source) return;
  // A source's first slots go to the last blocks: the send half gave the first tokens to the
  // first blocks, so at small batches the rows are placed by blocks that reached this half early
  // instead of by the blocks still staging them.
  const int sub = blocks_per_source - 1 - static_cast<int>(blockIdx.x) / num_ranks;
  bool first_source = true;
  for (int s = blockIdx.x % num_ranks; s < num_ranks;
       s += min(num_ranks, static_cast<int>(gridDim.x))) {
    bool ok = true;
    if (tid == 0) {
      uint64_t v = 0;
      ok = waitTagged(&own->ll_dispatch_flag[parity][s], epoch, w, kPhaseDispatchPost, s, &v);
      // The post comes from rank s: check its signature and bound its row count.
      const uint32_t rows = llPostRows(tagValue(v));
      const uint32_t signature = llPostSignature(tagValue(v));
      if (ok && signature != p.signature) {
        recordOpFailure(ctx, FailKind::kSignatureMismatch, OpId::kLlDispatchRecv,
                        kPhaseDispatchPost, s, p.signature, signature);
        ok = false;
      } else if (ok && rows > static_cast<uint64_t>(r.max_tokens)) {
        recordFault(ctx, FailKind::kBadPeerData, OpId::kLlDispatchRecv, kPhaseDispatchPost, s, -1,
                    static_cast<uint64_t>(r.max_tokens), rows);
        ok = false;
      }
      s_count = static_cast<int32_t>(rows);
    } else if (fused && first_source && s != ctx.rank && tid == kWarpSize) {
      // Two kernels get this from stream order: the send half's last block has zeroed the
      // expert counters this half increments before any row is placed. Here that block posts
      // to this rank after the zeroing (a release), and acquiring the post orders the zeroing
      // before the atomics; another warp waits for it beside the source's post (the same word
      // when the source is this rank).
      ok = waitTagged(&own->ll_dispatch_flag[parity][ctx.rank], epoch, w, kPhaseDispatchPost,
                      ctx.rank);
    }
    first_source = false;
    if (!__syncthreads_and(ok)) return;
    // Orders s_count for compute-sanitizer's racecheck, which does not take the barrier-reduction
    // above as ordering shared memory (the PTX ISA does): without it every racecheck run reports
    // this write and read as a hazard.
    __syncthreads();
    stageThread0(ctx, kStages, stage::kSourceWait);
    const int count = s_count;
    int32_t* counters = reinterpret_cast<int32_t*>(ctx.local_base + r.expert_count);
    const int items = count * p.max_topk;
    if constexpr (kFine) {
      // Warp 0 of the group waits for the row's tag and takes its slab position (before the tag
      // when the entry tag comes first: then one group barrier per item, else two); the group's
      // barriers hand both to the other warps (its acquire then orders the row before their
      // loads). The words are double-buffered by item: warp 0 can be one item ahead of the
      // others, never two (it meets them at the next item's first barrier).
      __shared__ uint64_t s_group_tag[kGroupsPerBlock][2];  // 0: the wait ended unready
      __shared__ int32_t s_group_pos[kGroupsPerBlock][2];   // -1: the row is not placed
      // The entry's local expert when its entry tag came before the row tag (its slab position
      // is then in s_group_pos already), else -1.
      __shared__ int32_t s_group_early[kGroupsPerBlock][2];
      const int group = warp / kWarpsPerGroup;
      const int quarter = warp % kWarpsPerGroup;
      const bool leader = quarter == 0 && lane == 0;
      constexpr int kGroupThreads = kWarpsPerGroup * kWarpSize;
      auto entryTagOf = [&](int row, int k) {
        return reinterpret_cast<const uint64_t*>(ctx.local_base + r.entry_tags[parity]) +
               (int64_t{s} * r.max_tokens + row) * p.max_topk + k;
      };
      auto takeSlabPosition = [&](int row, int k, int local) {
        int32_t pos = atomicAdd(&counters[local], 1);
        if (pos >= r.rows_per_expert) {
          slotsOfRow(s, row)[k] = -1;
          recordSlabOverflow(s, row, pos);
          pos = -1;
        }
        return pos;
      };
      int buf = 0;
      for (int item = sub * kGroupsPerBlock + group; item < items;
           item += blocks_per_source * kGroupsPerBlock, buf ^= 1) {
        const int row = item / p.max_topk;
        const int k = item % p.max_topk;
        int32_t* slot_of_row = slotsOfRow(s, row);
        if (leader) {
          // The entry tag (protocol.hpp) or the row tag, whichever comes first, for at most
          // kEntryTagPolls polls; then the row tag's wait, with its deadline. An entry tag
          // first: the slab position is taken now, while the row is still being staged.
          bool ready = !*static_cast<volatile bool*>(&s_stopped);
          int32_t early_local = -1;
          int32_t early_pos = -1;
          for (int poll = 0; ready && poll < kEntryTagPolls; ++poll) {
            const uint64_t entry = ldRelaxedSys(entryTagOf(row, k));
            if (llRowTagReady(entry, epoch)) {
              const int32_t local = llEntryLocalExpert(tagValue(entry));
              if (local >= 0 && local < p.num_local_experts) {  // peer data; else unused
                early_local = local;
                early_pos = takeSlabPosition(row, k, local);
              }
              break;
            }
            if (llRowTagReady(ldRelaxedSys(rowTagOf(s, row)), epoch)) break;
          }
          uint64_t row_tag = 0;
          ready = ready &&
                  waitFor(
                      rowTagOf(s, row), [epoch](uint64_t v) { return llRowTagReady(v, epoch); },
                      true, w, kPhaseDispatchRow, s, epoch, &row_tag);
          const uint32_t entry_bit = 1u << k;
          if (ready && early_local >= 0 &&
              (!llRowIsPresent(tagValue(row_tag)) ||
               (llRowTopkMask(tagValue(row_tag)) & entry_bit) == 0)) {
            // An entry tag for an entry that the row tag does not give this rank: the slab
            // position it took holds no row.
            recordFault(ctx, FailKind::kBadPeerData, OpId::kLlDispatchRecv, kPhaseDispatchRow, s,
                        row, llRowTopkMask(tagValue(row_tag)), entry_bit);
            ready = false;
          }
          if (!ready) s_stopped = true;
          s_group_tag[group][buf] = ready ? row_tag : 0;  // a ready tag is never 0
          s_group_early[group][buf] = early_local;
          s_group_pos[group][buf] = early_pos;
        }
        groupBarrier<kGroupThreads>(group);
        const uint64_t row_tag = s_group_tag[group][buf];
        if (row_tag == 0) break;  // group-uniform, as is every branch below
        const uint32_t tag_value = tagValue(row_tag);
        if (!llRowIsPresent(tag_value) || ((llRowTopkMask(tag_value) >> k) & 1u) == 0) {
          if (leader) slot_of_row[k] = -1;
          continue;
        }
        const uint8_t* staged = stagedRow(s, row);
        const int4* src = reinterpret_cast<const int4*>(staged);
        const int vecs = static_cast<int>(out_row_bytes / 16);
        // This warp's runs: quarter, quarter + 4, ... (run j is vectors 32 j to 32 j + 31),
        // loaded before the expert id and the position are known.
        int4 head[kGroupRuns];
#pragma unroll
        for (int u = 0; u < kGroupRuns; ++u) {
          const int v = (quarter + u * kWarpsPerGroup) * kWarpSize + lane;
          if (v < vecs) head[u] = ldPeer(src + v);
        }
        int local = s_group_early[group][buf];
        if (local < 0) {
          // No entry tag first: the expert id from the row's metadata, then the position.
          const int32_t e = metaOf(p, parity, s, row)[k];
          local = e - first_local;
          if (e < 0 || local < 0 || local >= p.num_local_experts) {  // peer data against its tag
            if (leader) slot_of_row[k] = -1;
            continue;
          }
          if (leader) s_group_pos[group][buf] = takeSlabPosition(row, k, local);
          groupBarrier<kGroupThreads>(group);
        }
        const int32_t pos = s_group_pos[group][buf];
        if (pos < 0) continue;
        const int64_t out_row = int64_t{local} * r.rows_per_expert + pos;
        int4* dst = reinterpret_cast<int4*>(ctx.local_base + r.out_x + out_row * out_row_bytes);
#pragma unroll
        for (int u = 0; u < kGroupRuns; ++u) {
          const int v = (quarter + u * kWarpsPerGroup) * kWarpSize + lane;
          if (v < vecs) dst[v] = head[u];
        }
        // Rows longer than kGroupRuns runs per warp (hidden above 8192 in BF16): the rest.
        for (int v = (quarter + kGroupRuns * kWarpsPerGroup) * kWarpSize + lane; v < vecs;
             v += kGroupThreads) {
          dst[v] = ldPeer(src + v);
        }
        if (p.use_fp8) {
          const float* scales = reinterpret_cast<const float*>(staged + p.hidden);
          float* out_scales =
              reinterpret_cast<float*>(ctx.local_base + r.out_scales) + out_row * num_scales;
          for (int c = quarter * kWarpSize + lane; c < num_scales; c += kGroupThreads) {
            out_scales[c] = scales[c];
          }
        }
        if (leader) {
          reinterpret_cast<int32_t*>(ctx.local_base + r.src_info)[out_row] =
              s * static_cast<int32_t>(r.max_tokens) + row;
          slot_of_row[k] = static_cast<int32_t>(out_row);
          if (p.cumulative_recv_counts != nullptr) atomicAdd(&p.cumulative_recv_counts[local], 1);
        }
      }
    } else {
      // A warp takes up to 32 items at once, lane j the warp's j-th: their row tags, expert ids
      // and slab positions come in together (one chain of round trips for all of them, not one
      // per item: at a small SM budget a warp has several items, and the chains were most of
      // the placement), then the warp copies the placed rows one after another.
      const int stride = blocks_per_source * kWarpsPerBlock;
      const int vecs = static_cast<int>(out_row_bytes / 16);
      for (int base = sub * kWarpsPerBlock + warp; base < items; base += kWarpSize * stride) {
        const int item = base + lane * stride;
        const int row = item / p.max_topk;
        const int k = item % p.max_topk;
        bool ready = true;
        int64_t out_row = -1;  // where this lane's item goes; -1: nowhere (absent, or a fault)
        if (item < items) {
          // The row's tag: present (the row and its metadata are in, released by the tag) or
          // absent (token `row` of rank s does not come here).
          uint64_t row_tag = 0;
          ready = !*static_cast<volatile bool*>(&s_stopped) &&
                  waitFor(
                      rowTagOf(s, row), [epoch](uint64_t v) { return llRowTagReady(v, epoch); },
                      true, w, kPhaseDispatchRow, s, epoch, &row_tag);
          if (!ready) s_stopped = true;
          const uint32_t tag_value = tagValue(row_tag);
          int32_t* slot_of_row = slotsOfRow(s, row);
          // Entry k is one of this rank's experts (the tag says so; absent rows have none).
          if (ready && llRowIsPresent(tag_value) && ((llRowTopkMask(tag_value) >> k) & 1u) != 0) {
            const int32_t e = metaOf(p, parity, s, row)[k];
            const int local = e - first_local;
            // An id that is not one of this rank's experts is peer data contradicting its tag:
            // the entry gets no slot (pos -1).
            const int32_t pos = e < 0 || local < 0 || local >= p.num_local_experts
                                    ? -1
                                    : atomicAdd(&counters[local], 1);
            if (pos >= r.rows_per_expert) recordSlabOverflow(s, row, pos);
            if (pos >= 0 && pos < r.rows_per_expert) {
              out_row = int64_t{local} * r.rows_per_expert + pos;
              reinterpret_cast<int32_t*>(ctx.local_base + r.src_info)[out_row] =
                  s * static_cast<int32_t>(r.max_tokens) + row;
              // One more row for this expert (load-balancing statistics, DeepEP's
              // cumulative_local_expert_recv_stats): counted where the row is placed.
              if (p.cumulative_recv_counts != nullptr) {
                atomicAdd(&p.cumulative_recv_counts[local], 1);
              }
            }
          }
          if (ready) slot_of_row[k] = static_cast<int32_t>(out_row);
        }
        __syncwarp();  // each lane's acquire orders its row before every lane's reads
        if (!__all_sync(kFullMask, ready)) break;
        for (unsigned todo = __ballot_sync(kFullMask, out_row >= 0); todo != 0; todo &= todo - 1) {
          const int j = __ffs(todo) - 1;
          const uint8_t* staged = stagedRow(s, __shfl_sync(kFullMask, row, j));
          const int64_t dst_row = __shfl_sync(kFullMask, out_row, j);
          warpCopyRow<kDispatchUnroll>(
              reinterpret_cast<int4*>(ctx.local_base + r.out_x + dst_row * out_row_bytes),
              reinterpret_cast<const int4*>(staged), vecs, lane,
              [](const int4* v) { return ldPeer(v); });
          if (p.use_fp8) {
            const float* scales = reinterpret_cast<const float*>(staged + p.hidden);
            float* out_scales =
                reinterpret_cast<float*>(ctx.local_base + r.out_scales) + dst_row * num_scales;
            for (int c = lane; c < num_scales; c += kWarpSize) out_scales[c] = scales[c];
          }
        }
      }
    }
    __syncthreads();        // s_count is rewritten for the next source
    if (s_stopped) return;  // block-uniform after the barrier; the wait recorded why
    stageThread0(ctx, kStages, stage::kPlaced);
  }
  // A fault found in the rows (bad peer data, an overfull slab) ends the op for everyone; the
  // counters already hold the capped counts, and the host reports the error at its next check.
}

template <typename IdxT>
__global__ void __launch_bounds__(kBlockThreads) llDispatchSendKernel(LlParams p) {
  __shared__ uint8_t* s_peer[kMaxRanks];
  const uint64_t epoch = callEpoch(controlOf(p.peers.local_base), kEpochLl);
  const int64_t first_id = firstRoutedId<IdxT>(p);
  loadPeerTable(p.peers, s_peer);
  if (__syncthreads_or(rankFailed(p.peers))) return;
  // No entry tags: the two-kernel path's receive grid may differ from this one.
  llDispatchSend<IdxT>(p, epoch, first_id, false, s_peer);
}

template <bool kFine>
__global__ void __launch_bounds__(kBlockThreads) llDispatchRecvKernel(LlParams p) {
  llDispatchRecv<kFine>(p, callEpoch(controlOf(p.peers.local_base), kEpochLl), false);
}

// Both halves in one grid (PerfFlags::ll_fused_dispatch). Every block runs the send half, then
// the receive half; a block waits in the receive half for posts and row tags that other blocks'
// send halves write (this rank's and its peers'), so the grid must be resident at once: it is at
// most the SM budget, one block per SM, as for the receive kernel of the two-kernel path (whose
// blocks also wait for other ranks' send kernels).
//
// One epoch for both halves, read at the start. A wait of the receive half that finds a peer's
// rejection marks the call skipped; a block of this grid that starts after that still computes
// this call (callEpoch() knows the launch that marked it), so none works on the next call.
template <typename IdxT, bool kFine>
__global__ void __launch_bounds__(kBlockThreads) llDispatchFusedKernel(LlParams p) {
  stageStart(p.peers, kStages);
  const uint64_t epoch = callEpoch(controlOf(p.peers.local_base), kEpochLl);
  const int64_t first_id = firstRoutedId<IdxT>(p);
  __shared__ uint8_t* s_peer[kMaxRanks];
  loadPeerTable(p.peers, s_peer);
  if (__syncthreads_or(rankFailed(p.peers))) return;
  llDispatchSend<IdxT>(p, epoch, first_id, kFine, s_peer);
  llDispatchRecv<kFine>(p, epoch, true);
  stageThread0(p.peers, kStages, stage::kEnd);
}

// The receive's item shape for a grid of num_blocks: four-warp groups when every (row, entry)
// item of a source like this rank (as many tokens) has a group of its own among the source's
// blocks. A guess only: any batch is placed right with either shape.
bool llDispatchFineItems(const LlParams& p, int num_blocks) {
  const int blocks_per_source = std::max(1, num_blocks / p.peers.num_ranks);
  return int64_t{p.num_tokens} * p.max_topk <= int64_t{blocks_per_source} * kGroupsPerBlock;
}

template <bool kFine>
void launchFused(const LlParams& params, int num_blocks, cudaStream_t stream) {
  if (params.idx_is_64) {
    llDispatchFusedKernel<int64_t, kFine><<<num_blocks, kBlockThreads, 0, stream>>>(params);
  } else {
    llDispatchFusedKernel<int32_t, kFine><<<num_blocks, kBlockThreads, 0, stream>>>(params);
  }
}

}  // namespace

int llBlocksForBatch(int num_tokens, int max_topk, int num_ranks) {
  const int64_t per_source =
      (int64_t{num_tokens} * max_topk + kLlItemsPerBlock - 1) / kLlItemsPerBlock;
  return static_cast<int>(std::clamp<int64_t>(per_source * num_ranks, kLlMinBlocks, INT32_MAX));
}

void launchLlDispatchFused(const LlParams& params, int sm_budget, cudaStream_t stream) {
  const int num_blocks = std::max(1, sm_budget);
  if (llDispatchFineItems(params, num_blocks)) {
    launchFused<true>(params, num_blocks, stream);
  } else {
    launchFused<false>(params, num_blocks, stream);
  }
  EPCOMM_KERNEL_LAUNCH_CHECK(llDispatchFusedKernel);
}

void launchLlDispatchSend(const LlParams& params, int sm_budget, cudaStream_t stream) {
  const int num_blocks = std::max(1, std::min(sm_budget, params.num_tokens));
  if (params.idx_is_64) {
    llDispatchSendKernel<int64_t><<<num_blocks, kBlockThreads, 0, stream>>>(params);
  } else {
    llDispatchSendKernel<int32_t><<<num_blocks, kBlockThreads, 0, stream>>>(params);
  }
  EPCOMM_KERNEL_LAUNCH_CHECK(llDispatchSendKernel);
}

void launchLlDispatchRecv(const LlParams& params, int sm_budget, cudaStream_t stream) {
  const int num_blocks = sm_budget;
  if (llDispatchFineItems(params, num_blocks)) {
    llDispatchRecvKernel<true><<<num_blocks, kBlockThreads, 0, stream>>>(params);
  } else {
    llDispatchRecvKernel<false><<<num_blocks, kBlockThreads, 0, stream>>>(params);
  }
  EPCOMM_KERNEL_LAUNCH_CHECK(llDispatchRecvKernel);
}

}  // namespace epcomm::kernels
