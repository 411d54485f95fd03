// SPDX-License-Identifier: Apache-2.0
// cudaMalloc + CUDA IPC: cudaIpcGetMemHandle / cudaIpcOpenMemHandle with lazy peer access. A
// process never opens its own handle; several processes on one GPU are allowed. Freeing memory
// a peer still has open is undefined, hence freeWaitsForPeers().
#include <unistd.h>

#include <cstring>
#include <string>

#include "check.hpp"
#include "memory/sharing_mode.hpp"

namespace epcomm::memory {
namespace {

struct CudaMallocMapping : Mapping {
  ~CudaMallocMapping() override {
    if (ptr != nullptr) EPCOMM_CUDA_LOG(cudaFree(ptr));
  }
};

struct IpcImportMapping : Mapping {
  ~IpcImportMapping() override {
    if (ptr != nullptr) EPCOMM_CUDA_LOG(cudaIpcCloseMemHandle(ptr));
  }
};

class CudaIpcMode final : public SharingMode {
 public:
  explicit CudaIpcMode(int rank) : rank_(rank) {}

  MemMode mode() const override { return MemMode::kCudaIpc; }
  bool probe(std::string* /*why*/) override { return true; }
  bool freeWaitsForPeers() const override { return true; }
  size_t granularity() override { return 2u << 20; }

  // On the current device (the caller holds a DeviceGuard).
  std::unique_ptr<Mapping> allocate(size_t bytes, PeerInfo* mine) override {
    auto own = std::make_unique<CudaMallocMapping>();
    EPCOMM_CUDA_CHECK(cudaMalloc(&own->ptr, bytes));
    cudaIpcMemHandle_t handle{};
    EPCOMM_CUDA_CHECK(cudaIpcGetMemHandle(&handle, own->ptr));
    mine->setHandle(&handle, sizeof(handle));
    return own;
  }

  std::unique_ptr<Mapping> import(int peer_rank, const PeerInfo& peer) override {
    EPCOMM_CHECK(peer.pid != static_cast<int32_t>(::getpid()),
                 "ranks " << rank_ << " and " << peer_rank
                          << " share one process; each rank needs its own process");
    cudaIpcMemHandle_t handle{};
    EPCOMM_CHECK(peer.handle_length == sizeof(handle), "bad CUDA IPC handle size");
    std::memcpy(&handle, peer.handle, sizeof(handle));
    auto mapping = std::make_unique<IpcImportMapping>();
    EPCOMM_CUDA_CHECK(cudaIpcOpenMemHandle(&mapping->ptr, handle, cudaIpcMemLazyEnablePeerAccess));
    return mapping;
  }

 private:
  const int rank_;
};

}  // namespace

std::unique_ptr<SharingMode> makeCudaIpcMode(int rank) {
  return std::make_unique<CudaIpcMode>(rank);
}

}  // namespace epcomm::memory
