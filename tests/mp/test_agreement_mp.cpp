// SPDX-License-Identifier: Apache-2.0
// Creation is agreed by every rank (issue 9 items 7 and 8), on the CPU: EpBuffer's constructor
// checks its configuration on every rank and compares it across ranks before anything touches
// a GPU, so a bad or mismatched field on one rank fails every rank at once (never at the
// bootstrap deadline), naming the rank and the field. Runs with 2 and 4 ranks, no GPU needed.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "common/call_outcome.hpp"
#include "common/test_env.hpp"
#include "epcomm/epcomm.hpp"

namespace epcomm::test {
namespace {

BufferConfig smallConfig() {
  BufferConfig config;
  config.hidden = 512;
  config.num_experts = 16;  // divides every rank count the tests run at (up to 16)
  config.max_topk = 2;
  config.max_tokens_per_rank = 16;
  config.timeout_s = 20;
  return config;
}

// "At once": well under the configs' 20 s deadline. Not 1 s: 16 ranks on the 2 cores of CI,
// beside other tests, may be descheduled for longer than the failure path takes.
constexpr double kAtOnceSeconds = 3.0;

// Creates an EpBuffer with `config` on this rank and reports how creation ended. The barrier
// first, so that the time is the creation's own and not how late another rank reached it.
CallOutcome create(const BufferConfig& config) {
  mpiBootstrap()->barrier();
  return runTimed([&] { EpBuffer buffer(*mpiBootstrap(), config); });
}

::testing::AssertionResult mentions(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "\"" << text << "\" does not mention \"" << part << "\"";
}

// Rank `culprit` edits its config; every rank must throw InvalidArgument at once, the
// culprit naming `field`, the others naming the culprit and `field`.
void expectEveryRankFails(int culprit, const std::function<void(BufferConfig&)>& edit,
                          const std::string& field) {
  const int me = mpiBootstrap()->rank();
  BufferConfig config = smallConfig();
  if (me == culprit) edit(config);
  const CallOutcome o = create(config);
  ASSERT_TRUE(o.threw) << "rank " << me << " created its buffer although rank " << culprit
                       << " has a bad configuration";
  EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << o.what;
  EXPECT_TRUE(mentions(o.what, field));
  if (me != culprit) {
    EXPECT_TRUE(mentions(o.what, "rank " + std::to_string(culprit)));
  }
  EXPECT_LT(o.seconds, kAtOnceSeconds)
      << "rank " << me << " waited instead of failing at once: " << o.what;
}

TEST(CreationAgreement, BadFieldOnOneRankFailsEveryRankAtOnce) {
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  expectEveryRankFails(
      bs.size() - 1, [](BufferConfig& c) { c.hidden = 100; }, "BufferConfig::hidden");
  expectEveryRankFails(
      0, [](BufferConfig& c) { c.max_topk = kMaxTopk + 1; }, "BufferConfig::max_topk");
  expectEveryRankFails(
      1, [](BufferConfig& c) { c.timeout_s = 1e-12; }, "BufferConfig::timeout_s");
}

TEST(CreationAgreement, FieldsThatDifferAcrossRanksAreNamed) {
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int last = bs.size() - 1;
  // Valid on every rank, but not the same everywhere: caught before any allocation.
  expectEveryRankFails(
      last, [](BufferConfig& c) { c.timeout_s = 7; }, "timeout_s");
  expectEveryRankFails(
      last, [](BufferConfig& c) { c.first_op_timeout_s = 900; }, "first_op_timeout_s");
  expectEveryRankFails(
      last, [](BufferConfig& c) { c.mem_mode = MemMode::kCudaIpc; }, "mem_mode");
  expectEveryRankFails(
      last, [](BufferConfig& c) { c.max_tokens_per_rank = 32; }, "max_tokens_per_rank");
  expectEveryRankFails(
      last, [](BufferConfig& c) { c.scratch_bytes = 4096; }, "scratch_bytes");
}

TEST(CreationAgreement, EnvironmentValueThatDiffersIsNamedWithItsSource) {
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int last = bs.size() - 1;
  BufferConfig config = smallConfig();
  config.timeout_s = kAuto;
  if (bs.rank() == last) setenv("EPCOMM_TIMEOUT_S", "9", 1);
  const CallOutcome o = create(config);
  unsetenv("EPCOMM_TIMEOUT_S");
  ASSERT_TRUE(o.threw);
  EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << o.what;
  EXPECT_TRUE(mentions(o.what, "EPCOMM_TIMEOUT_S"));
  EXPECT_LT(o.seconds, kAtOnceSeconds) << o.what;
}

TEST(CreationAgreement, BadEnvironmentValueOnOneRankNamesTheVariable) {
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int culprit = 1;
  BufferConfig config = smallConfig();
  config.timeout_s = kAuto;
  if (bs.rank() == culprit) setenv("EPCOMM_TIMEOUT_S", "-5", 1);
  const CallOutcome o = create(config);
  unsetenv("EPCOMM_TIMEOUT_S");
  ASSERT_TRUE(o.threw);
  EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << o.what;
  EXPECT_TRUE(mentions(o.what, "EPCOMM_TIMEOUT_S"));
  EXPECT_FALSE(mentions(o.what, "BufferConfig::timeout_s"));
  if (bs.rank() != culprit) {
    EXPECT_TRUE(mentions(o.what, "rank 1"));
  }
  EXPECT_LT(o.seconds, kAtOnceSeconds) << o.what;
}

// Without a GPU a valid configuration gets past the agreement and fails at the device step, on
// every rank, with an error instead of a hang.
TEST(CreationAgreement, NoGpuFailsEveryRankCleanly) {
  if (gpuAvailable()) GTEST_SKIP() << "a GPU is usable here; this checks the failure without one";
  const CallOutcome o = create(smallConfig());
  EXPECT_TRUE(o.threw) << "created a buffer without a GPU";
  EXPECT_LT(o.seconds, 10.0) << o.what;
}

}  // namespace
}  // namespace epcomm::test
