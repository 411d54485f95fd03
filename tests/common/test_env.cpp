// SPDX-License-Identifier: Apache-2.0
#include "common/test_env.hpp"

#include "common/mp_fixture.hpp"

#include <cuda_runtime_api.h>

#include <cstdio>
#include <vector>

namespace epcomm::test {

namespace {
Bootstrap* g_bootstrap = nullptr;
}  // namespace

bool gpuAvailable(std::string* reason) {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    if (reason) *reason = std::string("cudaGetDeviceCount: ") + cudaGetErrorName(status);
    return false;
  }
  if (count == 0) {
    if (reason) *reason = "cudaGetDeviceCount reports 0 devices";
    return false;
  }
  return true;
}

Bootstrap* mpiBootstrap() {
  return g_bootstrap;
}
void setMpiBootstrap(Bootstrap* bootstrap) {
  g_bootstrap = bootstrap;
}
int worldRank() {
  return g_bootstrap ? g_bootstrap->rank() : 0;
}
int worldSize() {
  return g_bootstrap ? g_bootstrap->size() : 1;
}

bool anyRankFailed() {
  const bool failed = ::testing::Test::HasFailure();
  if (g_bootstrap == nullptr) return failed;
  return !allRanks(*g_bootstrap, !failed);
}

void reportGpuSkip(bool binary_needs_gpu) {
  std::string reason;
  if (binary_needs_gpu && !gpuAvailable(&reason)) {
    std::printf("EPCOMM_SKIPPED_NO_GPU: %s; every GPU test of this binary was skipped\n",
                reason.c_str());
    std::fflush(stdout);
  }
}

}  // namespace epcomm::test
