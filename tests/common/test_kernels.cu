// SPDX-License-Identifier: Apache-2.0
#include <dirent.h>

#include "common/gpu_helpers.hpp"

namespace epcomm::test {

namespace {

__global__ void writePatternKernel(void* const* peer_bases, size_t offset, int rank, int num_ranks,
                                   size_t words_per_slice) {
  for (int dst = 0; dst < num_ranks; ++dst) {
    uint32_t* slice = reinterpret_cast<uint32_t*>(static_cast<char*>(peer_bases[dst]) + offset) +
                      static_cast<size_t>(rank) * words_per_slice;
    for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < words_per_slice;
         i += size_t{gridDim.x} * blockDim.x) {
      slice[i] = patternWord(rank, dst, i);
    }
  }
}

__global__ void spinKernel(uint64_t ns) {
  uint64_t start;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  while (true) {
    uint64_t now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (now - start >= ns) break;
  }
}

}  // namespace

void poisonDevice(void* device, size_t bytes, cudaStream_t stream) {
  if (bytes > 0) EPCOMM_TEST_CUDA(cudaMemsetAsync(device, kPoisonByte, bytes, stream));
}

void launchWritePattern(void* const* peer_bases, size_t offset, int rank, int num_ranks,
                        size_t words_per_slice, cudaStream_t stream) {
  writePatternKernel<<<64, 256, 0, stream>>>(peer_bases, offset, rank, num_ranks, words_per_slice);
  EPCOMM_TEST_CUDA(cudaGetLastError());
}

void launchSpin(uint64_t ns, cudaStream_t stream) {
  spinKernel<<<1, 32, 0, stream>>>(ns);
  EPCOMM_TEST_CUDA(cudaGetLastError());
}

int openFdCount() {
  int count = 0;
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  while (readdir(dir) != nullptr) ++count;
  closedir(dir);
  return count - 3;  // ".", ".." and the directory's own fd
}

}  // namespace epcomm::test
