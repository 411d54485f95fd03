// SPDX-License-Identifier: Apache-2.0
// CUDA driver entry points, resolved at run time through cudaGetDriverEntryPointByVersion so that
// nothing links libcuda: binaries load, and host-only tests run, on machines without a driver.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <string>

namespace epcomm {

// "CUDA_ERROR_NOT_PERMITTED (800)"; works without a driver.
std::string driverErrorName(int status);

namespace memory {

struct DriverApi {
  PFN_cuGetErrorName_v6000 getErrorName = nullptr;
  PFN_cuDeviceGet_v2000 deviceGet = nullptr;
  PFN_cuDeviceGetAttribute_v2000 deviceGetAttribute = nullptr;
  PFN_cuMemCreate_v10020 memCreate = nullptr;
  PFN_cuMemRelease_v10020 memRelease = nullptr;
  PFN_cuMemAddressReserve_v10020 memAddressReserve = nullptr;
  PFN_cuMemAddressFree_v10020 memAddressFree = nullptr;
  PFN_cuMemMap_v10020 memMap = nullptr;
  PFN_cuMemUnmap_v10020 memUnmap = nullptr;
  PFN_cuMemSetAccess_v10020 memSetAccess = nullptr;
  PFN_cuMemGetAllocationGranularity_v10020 memGetAllocationGranularity = nullptr;
  PFN_cuMemExportToShareableHandle_v10020 memExportToShareableHandle = nullptr;
  PFN_cuMemImportFromShareableHandle_v10020 memImportFromShareableHandle = nullptr;

  // Resolved once per process. Throws epcomm::DriverError naming the first symbol that could
  // not be resolved (no driver, or a driver older than the toolkit's entry-point API).
  static const DriverApi& get();
  // nullptr instead of throwing.
  static const DriverApi* tryGet();
};

}  // namespace memory
}  // namespace epcomm

// Checks a CUresult from a DriverApi call.
#define EPCOMM_CU_CHECK(call)                                                             \
  do {                                                                                    \
    CUresult epcomm_cu_status_ = (call);                                                  \
    if (epcomm_cu_status_ != CUDA_SUCCESS)                                                \
      ::epcomm::detail::throwDriver(static_cast<int>(epcomm_cu_status_), #call, __FILE__, \
                                    __LINE__);                                            \
  } while (0)
