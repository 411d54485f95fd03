// SPDX-License-Identifier: Apache-2.0
// Forwarding header: the CUDA RAII owners live in the internal utility target
// (util/cuda_resources.hpp); the library's sources keep naming them epcomm::<Owner>.
#pragma once

#include "check.hpp"
#include "util/cuda_resources.hpp"

namespace epcomm {

using util::DeviceGuard;
using util::DeviceMemory;
using util::GraphExec;
using util::MappedHostMemory;
using util::OwnedEvent;
using util::OwnedStream;

}  // namespace epcomm
