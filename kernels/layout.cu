// SPDX-License-Identifier: Apache-2.0
// HT layout: from topk_idx [N, K], each token's destination-rank mask, its slot among the tokens
// sent to each rank, per-rank and per-expert counts, and an int32 copy of the routing for weighted
// combine. Tiles of 512 tokens, one block each: a CUB block scan gives slots within the tile and
// the tile's totals; with several tiles each adds the totals of the earlier tiles (finishTiles),
// in the same kernel. No memset: every count is written, never accumulated into memory that would
// need zeroing first (each launch and each memset costs the host ~4 us in this VM,
// docs/perf-notes.md); the scratch of several tiles is zeroed by the kernel after use.
//
// Routing policy (documented in include/epcomm/ops.hpp): an expert id repeated within one token's
// top-k counts once; every repetition after the first is treated as -1 (not counted, not sent,
// -1 in the int32 copy, so its weight is not used by combine). An id outside [-1, num_experts) is
// never used as an address: it is recorded as bad input, this rank's next collective op stops
// before sending anything, and every peer is told (ControlRegion::peer_faulted), so that op fails
// on every rank at once instead of timing out.
//
// Layout input (DispatchArgs::layout, DeepEP-style): the masks come from the caller's
// is_token_in_rank instead, through the same scans; the caller's per-rank counts must equal the
// column sums and its per-expert counts are bounded (or, with top-k, must equal the histogram),
// each mismatch a fault of the same kind as a bad expert id.
#include "kernels/dependent_launch.cuh"
#include "kernels/kernel_check.hpp"
#include "kernels/launch.hpp"
#include "kernels/layout_tile.cuh"

namespace epcomm::kernels {
namespace {

using namespace layout_tile;

// kTopk: 0 for any top-k width, or the width itself (an instance for top-8, the common case:
// its routing has no run-time bounds).
template <typename IdxT, int kTopk>
__global__ void __launch_bounds__(kLayoutThreads) layoutTileKernel(LayoutParams p) {
  __shared__ LayoutShared sm;
  // The dispatch kernel follows at once: its blocks may start now and wait for this grid.
  allowDependentLaunch();
  waitPriorGrids();
  stageStart(p.peers, kStages);
  layoutTile<IdxT, kTopk>(p, blockIdx.x, gridDim.x, sm, nullptr, 0);
}

}  // namespace

void launchLayout(const LayoutParams& params, cudaStream_t stream, bool dependent_launch) {
  const int tiles = layoutTiles(params.num_tokens);
  const bool top8 = params.num_topk == 8;
  if (params.idx_is_64) {
    launchDependent(top8 ? layoutTileKernel<int64_t, 8> : layoutTileKernel<int64_t, 0>, tiles,
                    kLayoutThreads, stream, params, dependent_launch);
  } else {
    launchDependent(top8 ? layoutTileKernel<int32_t, 8> : layoutTileKernel<int32_t, 0>, tiles,
                    kLayoutThreads, stream, params, dependent_launch);
  }
  EPCOMM_KERNEL_LAUNCH_CHECK(layoutTileKernel);
}

}  // namespace epcomm::kernels
