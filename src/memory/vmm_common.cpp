// SPDX-License-Identifier: Apache-2.0
#include "memory/vmm_common.hpp"

#include "check.hpp"

namespace epcomm::memory {

VmmMapping::~VmmMapping() {
  const DriverApi* api = DriverApi::tryGet();
  if (api == nullptr) return;
  auto log = [](CUresult status, const char* what) {
    if (status != CUDA_SUCCESS) {
      detail::logWarning(std::string(what) + " failed: " + driverErrorName(status), __FILE__,
                         __LINE__);
    }
  };
  if (mapped) log(api->memUnmap(va, size), "cuMemUnmap");
  if (va != 0) log(api->memAddressFree(va, size), "cuMemAddressFree");
  if (has_handle) log(api->memRelease(handle), "cuMemRelease");
}

void VmmMapping::mapForDevice(const DriverApi& api, int device, size_t granularity) {
  EPCOMM_CU_CHECK(api.memAddressReserve(&va, size, granularity, 0, 0));
  EPCOMM_CU_CHECK(api.memMap(va, size, 0, handle, 0));
  mapped = true;
  CUmemAccessDesc access{};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  EPCOMM_CU_CHECK(api.memSetAccess(va, size, &access, 1));
  ptr = reinterpret_cast<void*>(va);
}

CUmemAllocationProp vmmProperties(int device, CUmemAllocationHandleType type) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  prop.requestedHandleTypes = type;
  return prop;
}

size_t granularityOf(const DriverApi& api, const CUmemAllocationProp& prop) {
  size_t granularity = 0;
  EPCOMM_CU_CHECK(
      api.memGetAllocationGranularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED));
  return granularity;
}

int deviceAttribute(const DriverApi& api, CUdevice_attribute attribute, int device,
                    const char* name) {
  CUdevice dev = 0;
  EPCOMM_CU_CHECK(api.deviceGet(&dev, device));
  int value = 0;
  CUresult status = api.deviceGetAttribute(&value, attribute, dev);
  if (status != CUDA_SUCCESS) {
    detail::throwDriver(static_cast<int>(status), name, __FILE__, __LINE__);
  }
  return value;
}

size_t VmmMode::granularity() {
  granularity_ = granularityOf(DriverApi::get(), vmmProperties(device_, type_));
  return granularity_;
}

std::unique_ptr<Mapping> VmmMode::allocate(size_t bytes, PeerInfo* mine) {
  const DriverApi& api = DriverApi::get();
  if (granularity_ == 0) granularity();  // the caller normally asked already (to round `bytes`)
  const CUmemAllocationProp prop = vmmProperties(device_, type_);
  auto own = std::make_unique<VmmMapping>();
  own->size = bytes;
  EPCOMM_CU_CHECK(api.memCreate(&own->handle, bytes, &prop, 0));
  own->has_handle = true;
  own->mapForDevice(api, device_, granularity_);
  exportHandle(api, own->handle, mine);
  return own;
}

std::unique_ptr<Mapping> VmmMode::import(int peer_rank, const PeerInfo& peer) {
  const DriverApi& api = DriverApi::get();
  auto mapping = std::make_unique<VmmMapping>();
  mapping->size = static_cast<size_t>(peer.bytes);
  mapping->handle = importHandle(api, peer_rank, peer);
  mapping->has_handle = true;
  // The local granularity: every rank allocated with the same properties.
  mapping->mapForDevice(api, device_, granularity_);
  return mapping;
}

}  // namespace epcomm::memory
