// SPDX-License-Identifier: Apache-2.0
// The argument checks of the op front-ends (core/arg_check.hpp): the first failed check becomes
// the message, its limit streamed from parts only when it fails, pointers shown as addresses
// (also char pointers), and nothing formatted while every check passes.
#include <gtest/gtest.h>

#include <cstdint>
#include <sstream>
#include <string>

#include "core/arg_check.hpp"

namespace epcomm {
namespace {

std::string addressText(const void* p) {
  std::ostringstream os;
  os << p;
  return os.str();
}

TEST(ArgChecker, KeepsTheFirstFailureWithItsLimitFromParts) {
  ArgChecker check;
  const int max_tokens = 4096;
  check.require(true, "DispatchArgs::num_tokens", 12, "in [0, ", max_tokens, "]");
  EXPECT_FALSE(check.failed());
  EXPECT_TRUE(check.message().empty());
  check.require(false, "DispatchArgs::num_tokens", 5000, "in [0, ", max_tokens,
                "] (max_tokens_per_rank)");
  check.require(false, "topk.num_topk", 0, "in [1, ", 8, "]");
  ASSERT_TRUE(check.failed());
  EXPECT_EQ(check.message(),
            "invalid argument DispatchArgs::num_tokens = 5000: must be in [0, 4096] "
            "(max_tokens_per_rank)");
}

TEST(ArgChecker, ShowsPointersAsAddressesEvenForCharTypes) {
  const uint8_t bytes[4] = {'a', 'b', 'c', 0};
  const uint8_t* misaligned = bytes + 1;
  ArgChecker check;
  check.require(false, "DispatchArgs::x", pointerText(misaligned), "16-byte aligned");
  EXPECT_EQ(check.message(), "invalid argument DispatchArgs::x = " + addressText(misaligned) +
                                 ": must be 16-byte aligned");
  ArgChecker null_check;
  null_check.require(false, "CombineArgs::out", pointerText(nullptr), "non-null");
  EXPECT_EQ(null_check.message(),
            "invalid argument CombineArgs::out = " + addressText(nullptr) + ": must be non-null");
}

TEST(Problem, IsEmptyUntilSetAndThenHoldsTheJoinedParts) {
  Problem problem;
  EXPECT_TRUE(problem.empty());
  const int max = 128;
  problem.set("invalid argument LlDispatchArgs::num_tokens = ", 129, ": must be in [0, ", max,
              "] (ll_max_tokens_per_rank)");
  EXPECT_FALSE(problem.empty());
  EXPECT_EQ(problem.text(),
            "invalid argument LlDispatchArgs::num_tokens = 129: must be in [0, 128] "
            "(ll_max_tokens_per_rank)");
}

}  // namespace
}  // namespace epcomm
