// SPDX-License-Identifier: Apache-2.0
#include "common/stage_times_check.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>

#include "diagnostics.hpp"

namespace epcomm::test {

StageTimesOn::StageTimesOn() {
  if (const char* value = std::getenv("EPCOMM_STAGE_TIMES")) saved_ = value;
  setenv("EPCOMM_STAGE_TIMES", "1", 1);
}

StageTimesOn::~StageTimesOn() {
  if (saved_) {
    setenv("EPCOMM_STAGE_TIMES", saved_->c_str(), 1);
  } else {
    unsetenv("EPCOMM_STAGE_TIMES");
  }
}

void expectStagesStamped(
    EpBuffer& buffer, cudaStream_t stream,
    const std::vector<std::pair<kernels::StageKernel, std::vector<int>>>& stages) {
  ASSERT_TRUE(diagnostics::stageTimesEnabled(buffer)) << "the buffer was created without stamps";
  const std::vector<uint64_t> stamps = diagnostics::takeStageTimes(buffer, stream);
  ASSERT_EQ(stamps.size(), static_cast<size_t>(kernels::kStageSlots));
  constexpr uint64_t kMaxSpanNs = uint64_t{60} * 1000 * 1000 * 1000;
  for (const auto& [kernel, list] : stages) {
    const kernels::StageKernelInfo& info = kernels::kStageKernelInfo[static_cast<int>(kernel)];
    const uint64_t start = stamps[kernels::stageSlot(kernel, kernels::kStageStart)];
    EXPECT_NE(start, 0u) << info.name << ": no start stamp";
    for (int stage : list) {
      const uint64_t t = stamps[kernels::stageSlot(kernel, stage)];
      EXPECT_NE(t, 0u) << info.name << ": stage '" << info.stages[stage] << "' not stamped";
      EXPECT_GE(t, start) << info.name << ": stage '" << info.stages[stage] << "' before start";
      EXPECT_LE(t - start, kMaxSpanNs) << info.name << ": stage '" << info.stages[stage] << "'";
    }
  }
  // Read and zeroed: the next read sees only later calls.
  const std::vector<uint64_t> again = diagnostics::takeStageTimes(buffer, stream);
  for (uint64_t t : again) EXPECT_EQ(t, 0u) << "stamps not zeroed by the read";
}

}  // namespace epcomm::test
