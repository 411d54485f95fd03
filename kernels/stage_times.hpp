// SPDX-License-Identifier: Apache-2.0
// Per-stage timing of the default kernels (EPCOMM_STAGE_TIMES=1; docs/perf-notes.md, "Stage
// times"): where the fixed microseconds of an LL or HT call go inside its kernels. One protocol,
// written once: the stamp array's layout and every stage's name, for the kernels that write it
// and the host that reads it. Host and device code; no device code here.
//
// The array: kNumStageKernels x kMaxStages uint64 %globaltimer stamps (ns), owned by the buffer
// (cudaMalloc'd only when the switch is on; PeerContext::stage_times, nullptr when off). Every
// stamp is an atomicMax over the threads that record it, so a slot holds the LATEST time any
// block reached that stage ("the last block to get there"), and a slot no thread reached this
// op stays 0 (the host zeroes the array after reading it). Slot kStageStart is the exception: it
// holds ~t (bitwise not), so the same atomicMax keeps the EARLIEST block's entry time.
//
// What "reached" means per stage (see each list): "block" stages are recorded by thread 0 of
// every block after a block barrier (the whole block is past that point), "last block" stages
// only by the last block to arrive (arriveLastBlock), "wait" stages by the thread that waited,
// after its wait returned (the max is the block that waited longest). Recording adds one
// branch on a null pointer per stage boundary when off; when on, a barrier and an atomic per
// block and stage, which costs a little time itself (well under a microsecond per stage).
#pragma once

#include <cstdint>

namespace epcomm::kernels {

// The kernels that record stages, one row of kMaxStages slots each.
enum class StageKernel : int {
  kLayout = 0,  // layoutTileKernel
  kHtDispatch,  // htDispatchKernel (rank-major)
  kHtCombine,   // htCombineKernel (rank-major)
  kLlDispatch,  // llDispatchFusedKernel (PerfFlags::ll_fused_dispatch, the default)
  kLlCombine,   // llCombineFusedKernel (PerfFlags::ll_fused_combine, the default)
  kCount
};
constexpr int kNumStageKernels = static_cast<int>(StageKernel::kCount);
constexpr int kMaxStages = 16;
constexpr int kStageSlots = kNumStageKernels * kMaxStages;
constexpr int stageSlot(StageKernel kernel, int stage) {
  return static_cast<int>(kernel) * kMaxStages + stage;
}

// Slots every kernel has: 0 the first block's entry (stored as ~t), 1 the last block's entry.
constexpr int kStageStart = 0;
constexpr int kStageAllStarted = 1;

// Stage lists. Each ends with kCount (<= kMaxStages); the names below follow the same order.
namespace layout_stage {
enum : int {
  kStart = kStageStart,
  kAllStarted = kStageAllStarted,
  kHistZeroed,    // block: the shared expert histogram zeroed
  kRouted,        // block: masks (and the top-k copy) of the tile's tokens
  kScanned,       // block: the block scans (slots, the tile's totals)
  kLookBack,      // block (two tiles or more): the earlier tiles' totals added to the slots
  kTileEnd,       // block: its last store (with two tiles or more, every block but the last)
  kLastBlockEnd,  // last block (two tiles or more): totals and histogram summed, scratch zeroed
  kCount
};
}  // namespace layout_stage

namespace ht_dispatch_stage {
enum : int {
  kStart = kStageStart,
  kAllStarted = kStageAllStarted,
  kCountsPosted,  // block: count row, signature and (block 0) expert counts posted
  kCountsWaited,  // block: the whole count matrix arrived
  kChecked,       // block: signatures, capacity and offsets checked
  kExpertCounts,  // block 0: every source's expert counts waited for, receive counts written
  kRowsCopied,    // block: rows, scales, top-k and source index written (and the padding)
  kArrived,       // expert-major: last block, arriveLastBlock returned (rank-major has none)
  kDonePosted,    // "rows written" sent: rank-major, each block's arrival shares added (the
                  // latest block); expert-major, the last block's posts
  kDoneWaited,    // every source's rows are in (rank-major: block 0; expert-major: last block)
  kEnd,           // block: thread 0 leaves
  kCount
};
}  // namespace ht_dispatch_stage

namespace ht_combine_stage {
enum : int {
  kStart = kStageStart,
  kAllStarted = kStageAllStarted,
  kReadyPosted,  // each block's posting threads: "ready" posted to every rank (one each)
  kReadyWaited,  // block: every rank's "ready" arrived (signatures checked)
  kPulled,       // block: every token pulled, summed and written
  kArrived,      // expert-major: last block, arriveLastBlock returned (rank-major has none)
  kDonePosted,   // "done pulling" sent: rank-major, each block's arrival shares added (the
                 // latest block; push only with combined weights); expert-major, the posts
  kDoneWaited,   // every rank is done pulling (rank-major: block 0; expert-major: last block)
  kEnd,          // block: thread 0 leaves
  kCount
};
}  // namespace ht_combine_stage

namespace ll_dispatch_stage {
enum : int {
  kStart = kStageStart,
  kAllStarted = kStageAllStarted,
  kSetup,       // last block: expert counters zeroed, epoch written
  kPosted,      // last block, posting threads: the token-count posts stored
  kRouted,      // block: the tile's masks, top-k copy and destination lists (last tile)
  kCopied,      // block: the tile's rows and metadata staged into the peers (last tile)
  kTagged,      // block: the tile's row tags stored after the fence (last tile)
  kSourceWait,  // waiting thread: a source's post arrived (the latest over blocks and sources)
  kPlaced,      // block: the received rows placed (last source of the block)
  kEnd,         // thread 0 of each block leaves
  kCount
};
}  // namespace ll_dispatch_stage

namespace ll_combine_stage {
enum : int {
  kStart = kStageStart,
  kAllStarted = kStageAllStarted,
  kWeights,    // block: weights posts ("none") stored, pushed weights waited for
  kItemTable,  // block: the per-source item table built from the dispatch posts
  kReduced,    // block: the weighted sums stored into the token owners, fenced and tagged
  kSummed,     // block: the partial rows (their tags waited for) summed and written
  kEnd,        // thread 0 of each block leaves
  kCount
};
}  // namespace ll_combine_stage

static_assert(layout_stage::kCount <= kMaxStages && ht_dispatch_stage::kCount <= kMaxStages &&
                  ht_combine_stage::kCount <= kMaxStages &&
                  ll_dispatch_stage::kCount <= kMaxStages && ll_combine_stage::kCount <= kMaxStages,
              "a kernel has at most kMaxStages stages");

// Names, for the host's tables: in stage order, one per stage.
struct StageKernelInfo {
  const char* name;
  const char* const* stages;
  int num_stages;
};

namespace stage_names {
constexpr const char* kLayout[] = {"start",        "all blocks started", "histogram zeroed",
                                   "masks routed", "block scans",        "earlier tiles added",
                                   "tile end",     "last block end"};
constexpr const char* kHtDispatch[] = {"start",
                                       "all blocks started",
                                       "count rows posted",
                                       "count matrix waited",
                                       "checked",
                                       "expert counts",
                                       "rows copied",
                                       "arrived (last block)",
                                       "done posted",
                                       "done waited",
                                       "end"};
constexpr const char* kHtCombine[] = {
    "start",  "all blocks started",   "ready posted", "ready waited",
    "pulled", "arrived (last block)", "done posted",  "done waited",
    "end"};
constexpr const char* kLlDispatch[] = {"start",
                                       "all blocks started",
                                       "setup (zeroing)",
                                       "count posted (last block)",
                                       "masks + destinations",
                                       "rows staged",
                                       "rows tagged",
                                       "source posts waited",
                                       "rows placed",
                                       "end"};
constexpr const char* kLlCombine[] = {"start",      "all blocks started",   "weights posts/waits",
                                      "item table", "weighted sums + tags", "partials summed",
                                      "end"};
}  // namespace stage_names

static_assert(
    sizeof(stage_names::kLayout) / sizeof(const char*) == layout_stage::kCount &&
        sizeof(stage_names::kHtDispatch) / sizeof(const char*) == ht_dispatch_stage::kCount &&
        sizeof(stage_names::kHtCombine) / sizeof(const char*) == ht_combine_stage::kCount &&
        sizeof(stage_names::kLlDispatch) / sizeof(const char*) == ll_dispatch_stage::kCount &&
        sizeof(stage_names::kLlCombine) / sizeof(const char*) == ll_combine_stage::kCount,
    "one name per stage");

// Indexed by StageKernel.
constexpr StageKernelInfo kStageKernelInfo[] = {
    {"layout", stage_names::kLayout, layout_stage::kCount},
    {"ht_dispatch", stage_names::kHtDispatch, ht_dispatch_stage::kCount},
    {"ht_combine", stage_names::kHtCombine, ht_combine_stage::kCount},
    {"ll_dispatch_fused", stage_names::kLlDispatch, ll_dispatch_stage::kCount},
    {"ll_combine_fused", stage_names::kLlCombine, ll_combine_stage::kCount},
};
static_assert(sizeof(kStageKernelInfo) / sizeof(StageKernelInfo) == kNumStageKernels,
              "one entry per StageKernel");

}  // namespace epcomm::kernels
