// SPDX-License-Identifier: Apache-2.0
// Which NVLink domain this GPU belongs to (a multi-node NVLink system such as a GB200 NVL72 rack),
// so that every GPU of one domain counts as one node (core/topology.hpp) and shares one buffer
// through fabric handles, even across hosts.
#pragma once

#include <optional>
#include <string>

namespace epcomm::memory {

// core::fabricDomainKeyText(cluster UUID, clique id) of `device` when NVML reports the GPU's
// fabric registration completed without error with a non-zero cluster UUID, and fabric handles
// really work here (the fabric mode's probe). Otherwise nullopt and `why` says which step said
// no: no libnvidia-ml, an NVML error, a state other than completed (H100/H200 HGX report
// "not supported"), a zero UUID, or the probe. Never throws.
std::optional<std::string> nvlinkDomainKey(int device, std::string* why);

}  // namespace epcomm::memory
