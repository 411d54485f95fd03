// SPDX-License-Identifier: Apache-2.0
// Device barrier across every rank of the buffer: one warp, stream-ordered, bounded by the
// deadline. Thread p announces this rank to rank p and waits for rank p's announcement.
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
  if (lane < ctx.num_ranks) {
    // Everything this rank wrote before the barrier (earlier kernels included) must be visible
    // to rank `lane` once it sees the arrival.
    fenceAcqRelSys();
    stReleaseSys(&controlOf(ctx.peer_bases[lane])->barrier[ctx.rank], epoch);
    ok = waitEpoch(&own->barrier[lane], epoch, w, WaitPhase::kBarrierArrival, lane);
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
