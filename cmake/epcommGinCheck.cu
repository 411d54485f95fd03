// SPDX-License-Identifier: Apache-2.0
// Configure-time probe (src/nccl/CMakeLists.txt): do these NCCL headers have the device API's GIN
// as the GIN rail transport uses it (kernels/rail_gin.cu, src/nccl/rail_gin.cpp)? Compiled only.
#include <nccl.h>
#include <nccl_device.h>

__global__ void probe(ncclDevComm comm, ncclWindow_t window, int peer) {
  ncclGin gin(comm, 0);
  const ncclTeam team = ncclTeamWorld(comm);
  gin.put(team, peer, window, 0, window, 64, 64, ncclGin_WeakSignalInc{0});
  gin.signal(team, peer, ncclGin_WeakSignalInc{1});
  if (gin.readSignal(0, 64, cuda::memory_order_acquire) == 0) {
    (void)gin.flush(ncclCoopCta(), cuda::memory_order_acquire, ncclGin_None{}, 1000);
  }
}

int main() {
  ncclDevCommRequirements_t reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
  reqs.ginSignalCount = 2;
  reqs.ginConnectionType = NCCL_GIN_CONNECTION_FULL;
  reqs.ginStrongSignalsRequired = false;
  reqs.ginVaSignalsRequired = false;
  ncclCommProperties_t props = NCCL_COMM_PROPERTIES_INITIALIZER;
  ncclDevComm dev{};
  void* ptr = nullptr;
  ncclWindow_t window = nullptr;
  if (reqs.ginSignalCount == 3) {  // never true: only the declarations matter
    (void)ncclCommQueryProperties(nullptr, &props);
    (void)ncclDevCommCreate(nullptr, &reqs, &dev);
    (void)ncclDevCommDestroy(nullptr, &dev);
    (void)ncclMemAlloc(&ptr, 4096);
    (void)ncclCommWindowRegister(nullptr, ptr, 4096, &window, NCCL_WIN_DEFAULT);
    (void)ncclCommWindowDeregister(nullptr, window);
    (void)ncclMemFree(ptr);
  }
  return props.ginType == NCCL_GIN_TYPE_NONE && !props.ginSupport[NCCL_GIN_TYPE_GDAKI] ? 0 : 1;
}
