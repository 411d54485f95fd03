// SPDX-License-Identifier: Apache-2.0
// EPCOMM_STAGE_TIMES in the GPU tests: a buffer created inside StageTimesOn has the per-stage
// stamps on (kernels/stage_times.hpp); expectStagesStamped checks that the kernels wrote them.
// The tests that use it also check every result as usual: the stamps must not change them.
#pragma once

#include <cuda_runtime_api.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "epcomm/buffer.hpp"
#include "kernels/stage_times.hpp"

namespace epcomm::test {

// EPCOMM_STAGE_TIMES=1 while it lives (a buffer reads it when it is created), then the old value.
class StageTimesOn {
 public:
  StageTimesOn();
  ~StageTimesOn();
  StageTimesOn(const StageTimesOn&) = delete;
  StageTimesOn& operator=(const StageTimesOn&) = delete;

 private:
  std::optional<std::string> saved_;
};

// Every kernel of `stages` must have stamped its start and each listed stage since the buffer's
// last read (diagnostics::takeStageTimes, which this calls: it waits for `stream`), no stamp
// earlier than its kernel's start and none later than 60 s after it.
void expectStagesStamped(
    EpBuffer& buffer, cudaStream_t stream,
    const std::vector<std::pair<kernels::StageKernel, std::vector<int>>>& stages);

}  // namespace epcomm::test
