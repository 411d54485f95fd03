// SPDX-License-Identifier: Apache-2.0
// Reading the per-stage kernel stamps of EPCOMM_STAGE_TIMES=1 (kernels/stage_times.hpp;
// docs/perf-notes.md, "Stage times"). Internal: not installed, not part of the public API; used
// by ep_bench and the tests, which include src/. Exported from the shared library (EPCOMM_API) so
// that ep_bench can link against either build.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "epcomm/buffer.hpp"
#include "epcomm/export.hpp"

namespace epcomm::diagnostics {

// Whether `buffer` was created with EPCOMM_STAGE_TIMES=1.
EPCOMM_API bool stageTimesEnabled(const EpBuffer& buffer);

// Waits for `stream` (as EpBuffer::sync: device errors are thrown), copies the stamps of every
// kernel and stage since the last call and zeroes them. Returns kernels::kStageSlots %globaltimer
// values in ns, indexed by kernels::stageSlot(kernel, stage); 0 = no block reached that stage;
// the kStageStart slots are plain times too (the earliest block's entry). Empty when stage
// times are off. Not collective; ops of this buffer still in flight on other streams race
// with it.
EPCOMM_API std::vector<uint64_t> takeStageTimes(EpBuffer& buffer, cudaStream_t stream);

}  // namespace epcomm::diagnostics
