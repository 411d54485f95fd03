// SPDX-License-Identifier: Apache-2.0
// The NVLink-domain query: libnvidia-ml is opened at run time (it comes with the driver, not with
// the toolkit, and a machine without a GPU has none), and only the few NVML entry points and the
// v1 fabric-info record (stable since driver 530) are declared here: the toolkit ships no nvml.h.
#include "memory/nvlink_domain.hpp"

#include <dlfcn.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "memory/sharing_mode.hpp"

namespace epcomm::memory {
namespace {

using NvmlReturn = int;  // nvmlReturn_t; 0 is NVML_SUCCESS
using NvmlDevice = struct NvmlDeviceOpaque*;
constexpr unsigned char kFabricStateCompleted = 3;  // NVML_GPU_FABRIC_STATE_COMPLETED

struct NvmlFabricInfoV1 {  // nvmlGpuFabricInfo_t
  unsigned char cluster_uuid[16];
  NvmlReturn status;
  unsigned int clique_id;
  unsigned char state;
};

template <typename Fn>
Fn symbol(void* library, const char* name) {
  return reinterpret_cast<Fn>(dlsym(library, name));
}

}  // namespace

std::optional<NvlinkDomain> nvlinkDomainOf(int device, std::string* why) {
  char bus_id[32] = {};
  if (cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id) - 1, device) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky; leave no trace for the caller's next check
    *why = "no PCI bus id for device " + std::to_string(device);
    return std::nullopt;
  }
  // Kept open for the process: NVML is refcounted by nvmlInit/nvmlShutdown, not by dlclose.
  static void* const library = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    *why = "libnvidia-ml.so.1 not found";
    return std::nullopt;
  }
  const auto init = symbol<NvmlReturn (*)()>(library, "nvmlInit_v2");
  const auto shutdown = symbol<NvmlReturn (*)()>(library, "nvmlShutdown");
  const auto by_bus_id =
      symbol<NvmlReturn (*)(const char*, NvmlDevice*)>(library, "nvmlDeviceGetHandleByPciBusId_v2");
  const auto fabric_info =
      symbol<NvmlReturn (*)(NvmlDevice, NvmlFabricInfoV1*)>(library, "nvmlDeviceGetGpuFabricInfo");
  if (!init || !shutdown || !by_bus_id || !fabric_info) {
    *why = "this NVML has no nvmlDeviceGetGpuFabricInfo (driver older than 530)";
    return std::nullopt;
  }
  if (NvmlReturn rc = init(); rc != 0) {
    *why = "nvmlInit_v2 returned " + std::to_string(rc);
    return std::nullopt;
  }
  NvmlFabricInfoV1 info{};
  NvmlDevice handle = nullptr;
  NvmlReturn rc = by_bus_id(bus_id, &handle);
  if (rc == 0) rc = fabric_info(handle, &info);
  shutdown();
  if (rc != 0) {
    *why = "nvmlDeviceGetGpuFabricInfo(" + std::string(bus_id) + ") returned " +
           std::to_string(rc) + (rc == 3 ? " (not supported)" : "");
    return std::nullopt;
  }
  if (info.state != kFabricStateCompleted || info.status != 0) {
    *why = "GPU " + std::string(bus_id) + " fabric state " + std::to_string(info.state) +
           ", status " + std::to_string(info.status) +
           " (0 = not supported: no multi-node NVLink; 3 = completed)";
    return std::nullopt;
  }
  // HGX-style machines may report a completed registration with a zero UUID: such a UUID names
  // no domain, and trusting it would merge separate hosts into one "node".
  if (std::all_of(std::begin(info.cluster_uuid), std::end(info.cluster_uuid),
                  [](unsigned char b) { return b == 0; })) {
    *why = "GPU " + std::string(bus_id) + " reports a zero fabric cluster UUID";
    return std::nullopt;
  }
  std::string probe_why;
  if (!makeFabricMode(device)->probe(&probe_why)) {
    *why = "fabric handles do not work here: " + probe_why;
    return std::nullopt;
  }
  NvlinkDomain domain;
  std::memcpy(domain.cluster_uuid, info.cluster_uuid, sizeof(domain.cluster_uuid));
  domain.clique_id = info.clique_id;
  return domain;
}

}  // namespace epcomm::memory
