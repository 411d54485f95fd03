// SPDX-License-Identifier: Apache-2.0
// main() of single-process tests (unit/ and gpu/).
#include <gtest/gtest.h>

#include "common/test_env.hpp"

#ifndef EPCOMM_TEST_NEEDS_GPU
#define EPCOMM_TEST_NEEDS_GPU 0
#endif

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  int result = RUN_ALL_TESTS();
  epcomm::test::reportGpuSkip(EPCOMM_TEST_NEEDS_GPU != 0);
  return result;
}
