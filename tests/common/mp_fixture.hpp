// SPDX-License-Identifier: Apache-2.0
// The fixture of multi-rank tests, and the one way to ask "did any rank fail, and why".
//
//   class Soak : public MultiRankGpuTest {};
//   TEST_F(Soak, Rounds) {
//     EpBuffer buffer(bootstrap(), config);                 // rank(), size(), device()
//     buffer.dispatch(args, handle, stream());              // a blocking TestStream
//     if (anyRankFailed()) return;                          // ranks stop together
//     const RankOutcomes all = outcomesOf([&] { ... });      // every rank's CallOutcome
//     EXPECT_TRUE(all.allThrew()) << all.describe();
//   }
//
// Everything named "collective" must be called by every rank of the job in the same order.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/call_outcome.hpp"
#include "common/gpu_helpers.hpp"
#include "common/test_env.hpp"
#include "epcomm/bootstrap.hpp"

namespace epcomm::test {

// Every rank's outcome of one call, indexed by rank. Messages are cut to kMaxWhat bytes.
struct RankOutcomes {
  static constexpr size_t kMaxWhat = 480;
  std::vector<CallOutcome> ranks;

  bool anyThrew() const;
  bool allThrew() const;
  // The ranks that threw, in rank order.
  std::vector<int> throwers() const;
  // One line per rank: "rank 1: threw kRemote after 0.02 s: <what>" or "rank 0: returned ...".
  std::string describe() const;
};

// Collective: every rank's `mine`.
RankOutcomes gatherOutcomes(Bootstrap& bootstrap, const CallOutcome& mine);

// Collective: true on every rank if `value` is true on every rank.
bool allRanks(Bootstrap& bootstrap, bool value);

// Collective: every rank's failure state in the current test ("rank 2: failed" per failing rank),
// empty when no rank failed. anyRankFailed() (test_env.hpp) is the yes/no form.
std::string failedRanks(Bootstrap& bootstrap);

// The multi-rank fixture: the job's bootstrap (MPI_COMM_WORLD, from mp_main.cpp), rank and size,
// and, on first use, the rank's GPU (selectDevice) and a test stream on it.
class MultiRankTest : public ::testing::Test {
 protected:
  void SetUp() override;
  void TearDown() override;

  Bootstrap& bootstrap() const { return *bootstrap_; }
  int rank() const { return bootstrap_->rank(); }
  int size() const { return bootstrap_->size(); }
  // selectDevice(bootstrap()), made current; the first call picks it.
  int device();
  // A blocking stream on device() (see TestStream), created on first use, freed after the test.
  cudaStream_t stream();

  // Collective: true on every rank if this test has failed on any rank.
  bool anyRankFailed() const { return ::epcomm::test::anyRankFailed(); }
  // Collective: runs `call` on this rank (runTimed) and gathers every rank's outcome.
  template <typename Call>
  RankOutcomes outcomesOf(Call&& call) {
    return gatherOutcomes(bootstrap(), runTimed(std::forward<Call>(call)));
  }

 private:
  Bootstrap* bootstrap_ = nullptr;
  int device_ = -1;
  std::unique_ptr<TestStream> stream_;
};

// The same for GPU tests: skips (on every rank) when no GPU is usable.
class MultiRankGpuTest : public MultiRankTest {
 protected:
  void SetUp() override;
};

}  // namespace epcomm::test
