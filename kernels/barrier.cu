// SPDX-License-Identifier: Apache-2.0
// Device barrier across every rank of the buffer: one warp, stream-ordered, bounded by the
// deadline. Lane l announces this rank to ranks l, l + 32, ... (all of them first, then waits for
// their announcements: up to kMaxRanks = 72 ranks on one warp).
#include "kernels/device_utils.cuh"
#include "kernels/kernel_check.hpp"
#include "kernels/launch.hpp"

namespace epcomm::kernels {
namespace {

using namespace device;

__global__ void __launch_bounds__(kWarpSize) barrierKernel(PeerContext ctx) {
  ControlRegion* own = controlOf(ctx.local_base);
  const uint64_t epoch = callEpoch(own, kEpochBarrier);
  const int lane = threadIdx.x;
  const WaitContext w{&ctx, OpId::kBarrier, globalTimerNs()};
  bool ok = true;
  // Everything this rank wrote before the barrier (earlier kernels included) must be visible to
  // each rank once it sees the arrival.
  fenceAcqRelSys();
  for (int p = lane; p < ctx.num_ranks; p += kWarpSize) {
    stReleaseSys(&controlOf(ctx.peer_bases[p])->barrier[ctx.rank], epoch);
  }
  for (int p = lane; p < ctx.num_ranks && ok; p += kWarpSize) {
    ok = waitEpoch(&own->barrier[p], epoch, w, WaitPhase::kBarrierArrival, p);
  }
  if (__all_sync(kFullMask, ok) && lane == 0) own->local.epoch[kEpochBarrier] = epoch;
}

// A call this rank rejected on the host (see "Rejected calls" in protocol.hpp): count it as run
// and tell every peer which call of the family it skipped.
__global__ void __launch_bounds__(1) skipRejectedKernel(PeerContext ctx, int family) {
  ControlRegion* own = controlOf(ctx.local_base);
  const uint64_t epoch = callEpoch(own, family);
  own->local.epoch[family] = epoch;
  fenceAcqRelSys();  // this rank's earlier signals of the family reach the peers first
  for (int d = 0; d < ctx.num_ranks; ++d) {
    if (d != ctx.rank) {
      stReleaseSys(&controlOf(ctx.peer_bases[d])->peer_rejected[family][ctx.rank], epoch);
    }
  }
}

}  // namespace

void launchBarrier(const PeerContext& peers, cudaStream_t stream) {
  barrierKernel<<<1, kWarpSize, 0, stream>>>(peers);
  EPCOMM_KERNEL_LAUNCH_CHECK(barrierKernel);
}

void launchSkipRejected(const PeerContext& peers, EpochSlot family, cudaStream_t stream) {
  skipRejectedKernel<<<1, 1, 0, stream>>>(peers, static_cast<int>(family));
  EPCOMM_KERNEL_LAUNCH_CHECK(skipRejectedKernel);
}

cudaError_t kernelImageStatus() {
  cudaFuncAttributes attributes{};
  const cudaError_t status = cudaFuncGetAttributes(&attributes, barrierKernel);
  (void)cudaGetLastError();
  return status;
}

// Variadic: with several architectures __CUDA_ARCH_LIST__ expands to "900,1000", two arguments.
#define EPCOMM_STRINGIFY_(...) #__VA_ARGS__
#define EPCOMM_STRINGIFY(...) EPCOMM_STRINGIFY_(__VA_ARGS__)
const char* compiledArchitectures() {
#ifdef __CUDA_ARCH_LIST__
  return EPCOMM_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace epcomm::kernels
