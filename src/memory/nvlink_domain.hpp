// SPDX-License-Identifier: Apache-2.0
// Which NVLink domain this GPU belongs to (a multi-node NVLink system such as a GB200 NVL72 rack),
// so that every GPU of one domain counts as one node (core/topology.hpp) and shares one buffer
// through fabric handles, even across hosts.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace epcomm::memory {

// An NVLink domain: NVML's fabric cluster UUID and clique id (core::fabricDomainKeyText makes the
// node key of it).
struct NvlinkDomain {
  unsigned char cluster_uuid[16] = {};
  uint32_t clique_id = 0;
};

// The NVLink domain of `device` when NVML reports the GPU's fabric registration completed without
// error with a non-zero cluster UUID, and fabric handles really work here (the fabric mode's
// probe). Otherwise nullopt and `why` says which step said no: no libnvidia-ml, an NVML error, a
// state other than completed (H100/H200 HGX report "not supported"), a zero UUID, or the probe.
// Never throws.
std::optional<NvlinkDomain> nvlinkDomainOf(int device, std::string* why);

}  // namespace epcomm::memory
