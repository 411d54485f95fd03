// Device barrier across every rank of the buffer: one warp, stream-ordered, bounded by the
// deadline. Thread p announces this rank to rank p and waits for rank p's announcement.
#include "check.hpp"
#include "kernels/device_utils.cuh"
#include "kernels/launch.hpp"

namespace epcomm::kernels {
namespace {

using namespace device;

constexpr int kPhaseArrive = 1;

__global__ void __launch_bounds__(kWarpSize) barrierKernel(PeerContext ctx) {
  ControlRegion* own = controlOf(ctx.local_base);
  const uint64_t epoch = own->local.epoch[kEpochBarrier] + 1;
  const int lane = threadIdx.x;
  const WaitContext w{&ctx, OpId::kBarrier, globalTimerNs()};
  bool ok = true;
  if (lane < ctx.num_ranks) {
    // Everything this rank wrote before the barrier (earlier kernels included) must be visible
    // to rank `lane` once it sees the arrival.
    fenceAcqRelSys();
    stReleaseSys(&controlOf(ctx.peer_bases[lane])->barrier[ctx.rank], epoch);
    ok = waitEpoch(&own->barrier[lane], epoch, w, kPhaseArrive, lane);
  }
  if (__all_sync(kFullMask, ok) && lane == 0) own->local.epoch[kEpochBarrier] = epoch;
}

}  // namespace

void launchBarrier(const PeerContext& peers, cudaStream_t stream) {
  barrierKernel<<<1, kWarpSize, 0, stream>>>(peers);
  EPCOMM_LAUNCH_CHECK(barrierKernel);
}

}  // namespace epcomm::kernels
