// SPDX-License-Identifier: Apache-2.0
// POSIX-fd VMM: cuMemCreate with CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR; the exported fds pass
// between the processes of one host with SCM_RIGHTS (fd_exchange.hpp).
#include <cstdint>
#include <string>
#include <vector>

#include "check.hpp"
#include "memory/fd_exchange.hpp"
#include "memory/vmm_common.hpp"

namespace epcomm::memory {
namespace {

class PosixFdMode final : public VmmMode {
 public:
  explicit PosixFdMode(int device) : VmmMode(device, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) {}

  MemMode mode() const override { return MemMode::kPosixFd; }

  bool probe(std::string* why) override {
    try {
      const DriverApi& api = DriverApi::get();
      if (deviceAttribute(api, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, device_,
                          "cuDeviceGetAttribute(VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)") == 0) {
        *why = "the device does not support virtual memory management";
        return false;
      }
      if (deviceAttribute(
              api, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, device_,
              "cuDeviceGetAttribute(HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED)") == 0) {
        *why = "the device does not support POSIX fd handles";
        return false;
      }
      return true;
    } catch (const std::exception& e) {
      *why = e.what();
      return false;
    }
  }

  void exchange(Bootstrap& bootstrap, double timeout_s) override {
    received_ = exchangeFds(bootstrap, exported_.get(), timeout_s);
    exported_.reset();  // every peer holds its own copy now
  }

 protected:
  void exportHandle(const DriverApi& api, CUmemGenericAllocationHandle handle,
                    PeerInfo* /*mine*/) override {
    int fd = -1;
    EPCOMM_CU_CHECK(
        api.memExportToShareableHandle(&fd, handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0));
    exported_.reset(fd);
  }

  CUmemGenericAllocationHandle importHandle(const DriverApi& api, int peer_rank,
                                            const PeerInfo& /*peer*/) override {
    UniqueFd& fd = received_[static_cast<size_t>(peer_rank)];
    EPCOMM_CHECK(fd.get() >= 0, "no fd received from rank " << peer_rank);
    CUmemGenericAllocationHandle handle = 0;
    // The POSIX fd import takes the fd value itself, cast to a pointer.
    EPCOMM_CU_CHECK(api.memImportFromShareableHandle(
        &handle, reinterpret_cast<void*>(static_cast<uintptr_t>(fd.get())),
        CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR));
    fd.reset();  // the imported handle keeps the memory alive
    return handle;
  }

 private:
  UniqueFd exported_;               // this rank's allocation, until exchange() passed it on
  std::vector<UniqueFd> received_;  // one per global rank, until imported
};

}  // namespace

std::unique_ptr<SharingMode> makePosixFdMode(int device) {
  return std::make_unique<PosixFdMode>(device);
}

}  // namespace epcomm::memory
