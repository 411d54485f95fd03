// SPDX-License-Identifier: Apache-2.0
#include "memory/driver_api.hpp"

#include <cuda_runtime_api.h>

#include <mutex>
#include <string>

#include "check.hpp"

namespace epcomm {

namespace {

struct Loaded {
  memory::DriverApi api;
  std::string error;  // empty when every symbol resolved
};

template <typename Fn>
bool resolve(const char* name, unsigned version, Fn* out, std::string* error) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult query = cudaDriverEntryPointSymbolNotFound;
  cudaError_t status =
      cudaGetDriverEntryPointByVersion(name, &fn, version, cudaEnableDefault, &query);
  if (status != cudaSuccess || query != cudaDriverEntryPointSuccess || fn == nullptr) {
    (void)cudaGetLastError();
    *error = std::string("cannot resolve driver entry point ") + name + " (ABI " +
             std::to_string(version) + "): cudaGetDriverEntryPointByVersion returned " +
             cudaGetErrorName(status) + ", query result " +
             std::to_string(static_cast<int>(query)) +
             ". Is an NVIDIA driver installed and new enough for CUDA " +
             std::to_string(CUDART_VERSION / 1000) + "?";
    return false;
  }
  *out = reinterpret_cast<Fn>(fn);
  return true;
}

const Loaded& loaded() {
  static Loaded state;
  static std::once_flag once;
  std::call_once(once, [] {
    memory::DriverApi& a = state.api;
    std::string* e = &state.error;
    // Stop at the first failure; the message names it.
    (void)(resolve("cuGetErrorName", 6000, &a.getErrorName, e) &&
           resolve("cuDeviceGet", 2000, &a.deviceGet, e) &&
           resolve("cuDeviceGetAttribute", 2000, &a.deviceGetAttribute, e) &&
           resolve("cuMemCreate", 10020, &a.memCreate, e) &&
           resolve("cuMemRelease", 10020, &a.memRelease, e) &&
           resolve("cuMemAddressReserve", 10020, &a.memAddressReserve, e) &&
           resolve("cuMemAddressFree", 10020, &a.memAddressFree, e) &&
           resolve("cuMemMap", 10020, &a.memMap, e) &&
           resolve("cuMemUnmap", 10020, &a.memUnmap, e) &&
           resolve("cuMemSetAccess", 10020, &a.memSetAccess, e) &&
           resolve("cuMemGetAllocationGranularity", 10020, &a.memGetAllocationGranularity, e) &&
           resolve("cuMemExportToShareableHandle", 10020, &a.memExportToShareableHandle, e) &&
           resolve("cuMemImportFromShareableHandle", 10020, &a.memImportFromShareableHandle, e));
  });
  return state;
}

}  // namespace

std::string driverErrorName(int status) {
  const char* name = nullptr;
  const Loaded& state = loaded();
  if (state.api.getErrorName != nullptr &&
      state.api.getErrorName(static_cast<CUresult>(status), &name) == CUDA_SUCCESS && name) {
    return std::string(name) + " (" + std::to_string(status) + ")";
  }
  return "CUresult " + std::to_string(status);
}

namespace memory {

const DriverApi& DriverApi::get() {
  const Loaded& state = loaded();
  if (!state.error.empty()) {
    throw DriverError(static_cast<int>(CUDA_ERROR_NOT_FOUND),
                      detail::formatMessage(state.error, __FILE__, __LINE__));
  }
  return state.api;
}

const DriverApi* DriverApi::tryGet() {
  const Loaded& state = loaded();
  return state.error.empty() ? &state.api : nullptr;
}

}  // namespace memory
}  // namespace epcomm
