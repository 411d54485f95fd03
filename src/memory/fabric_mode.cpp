// SPDX-License-Identifier: Apache-2.0
// Fabric VMM: cuMemCreate with CU_MEM_HANDLE_TYPE_FABRIC; the exported handles travel in the
// PeerInfo records, so it spans hosts of one NVLink domain.
#include <cstring>
#include <string>

#include "check.hpp"
#include "memory/vmm_common.hpp"

namespace epcomm::memory {
namespace {

class FabricMode final : public VmmMode {
 public:
  explicit FabricMode(int device) : VmmMode(device, CU_MEM_HANDLE_TYPE_FABRIC) {}

  MemMode mode() const override { return MemMode::kFabric; }
  bool spansHosts() const override { return true; }

  // Really creates, exports, imports back, maps and releases a small allocation: the attribute
  // alone over-reports (it reads 1 without an IMEX channel).
  bool probe(std::string* why) override {
    try {
      const DriverApi& api = DriverApi::get();
      if (deviceAttribute(api, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED, device_,
                          "cuDeviceGetAttribute(HANDLE_TYPE_FABRIC_SUPPORTED)") == 0) {
        *why = "the device reports no fabric handle support";
        return false;
      }
      const CUmemAllocationProp prop = vmmProperties(device_, CU_MEM_HANDLE_TYPE_FABRIC);
      VmmMapping created;
      created.size = granularityOf(api, prop);
      CUresult status = api.memCreate(&created.handle, created.size, &prop, 0);
      if (status != CUDA_SUCCESS) {
        *why = "cuMemCreate(CU_MEM_HANDLE_TYPE_FABRIC) failed with " + driverErrorName(status) +
               " (no usable IMEX channel: /dev/nvidia-caps-imex-channels)";
        return false;
      }
      created.has_handle = true;
      CUmemFabricHandle fabric{};
      status =
          api.memExportToShareableHandle(&fabric, created.handle, CU_MEM_HANDLE_TYPE_FABRIC, 0);
      if (status != CUDA_SUCCESS) {
        *why = "cuMemExportToShareableHandle(FABRIC) failed with " + driverErrorName(status);
        return false;
      }
      VmmMapping imported;
      imported.size = created.size;
      status =
          api.memImportFromShareableHandle(&imported.handle, &fabric, CU_MEM_HANDLE_TYPE_FABRIC);
      if (status != CUDA_SUCCESS) {
        *why = "cuMemImportFromShareableHandle(FABRIC) failed with " + driverErrorName(status);
        return false;
      }
      imported.has_handle = true;
      imported.mapForDevice(api, device_, created.size);
      return true;
    } catch (const std::exception& e) {
      *why = e.what();
      return false;
    }
  }

 protected:
  void exportHandle(const DriverApi& api, CUmemGenericAllocationHandle handle,
                    PeerInfo* mine) override {
    CUmemFabricHandle fabric{};
    EPCOMM_CU_CHECK(api.memExportToShareableHandle(&fabric, handle, CU_MEM_HANDLE_TYPE_FABRIC, 0));
    mine->setHandle(&fabric, sizeof(fabric));
  }

  CUmemGenericAllocationHandle importHandle(const DriverApi& api, int /*peer_rank*/,
                                            const PeerInfo& peer) override {
    CUmemFabricHandle fabric{};
    EPCOMM_CHECK(peer.handle_length == sizeof(fabric), "bad fabric handle size");
    std::memcpy(&fabric, peer.handle, sizeof(fabric));
    CUmemGenericAllocationHandle handle = 0;
    EPCOMM_CU_CHECK(api.memImportFromShareableHandle(&handle, &fabric, CU_MEM_HANDLE_TYPE_FABRIC));
    return handle;
  }
};

}  // namespace

std::unique_ptr<SharingMode> makeFabricMode(int device) {
  return std::make_unique<FabricMode>(device);
}

}  // namespace epcomm::memory
