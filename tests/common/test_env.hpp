// SPDX-License-Identifier: Apache-2.0
// Shared test environment: GPU detection with a reason, the MPI bootstrap of mp tests, and
// rank-aware helpers.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "epcomm/bootstrap.hpp"

namespace epcomm::test {

// True when a CUDA device is usable; otherwise `reason` says why (no driver, no device, ...).
bool gpuAvailable(std::string* reason = nullptr);

// The MPI bootstrap over MPI_COMM_WORLD in mp tests (nullptr in single-process tests).
Bootstrap* mpiBootstrap();
void setMpiBootstrap(Bootstrap* bootstrap);

// Rank and size in mp tests (0 and 1 otherwise).
int worldRank();
int worldSize();

// Collective in mp tests: true on every rank if the current test has failed on any rank. Loops
// use it to stop together, so ranks never drift into different collective calls.
bool anyRankFailed();

// Called by the mains: prints EPCOMM_SKIPPED_NO_GPU when this is a GPU binary and no GPU is
// usable, so CTest reports the test as skipped.
void reportGpuSkip(bool binary_needs_gpu);

}  // namespace epcomm::test

// Skips the current test (with the reason) when no GPU is usable.
#define EPCOMM_REQUIRE_GPU()                                    \
  do {                                                          \
    std::string epcomm_reason_;                                 \
    if (!::epcomm::test::gpuAvailable(&epcomm_reason_))         \
      GTEST_SKIP() << "no usable CUDA GPU: " << epcomm_reason_; \
  } while (0)
