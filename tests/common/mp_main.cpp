// SPDX-License-Identifier: Apache-2.0
// main() of multi-rank tests: initializes MPI, gives every test an MpiBootstrap over
// MPI_COMM_WORLD, and lets only rank 0 print the full GoogleTest report (other ranks print
// their failures, prefixed with the rank). The process exits non-zero if any test failed on it,
// so mpirun (and CTest) fail if any rank failed.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <memory>

#include "common/test_env.hpp"
#include "epcomm/mpi_bootstrap.hpp"

#ifndef EPCOMM_TEST_NEEDS_GPU
#define EPCOMM_TEST_NEEDS_GPU 0
#endif

namespace {

class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_,
                 result.file_name() ? result.file_name() : "?", result.line_number(),
                 result.summary());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed())
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
  }

 private:
  int rank_;
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  int result = 0;
  {
    auto bootstrap = std::make_unique<epcomm::MpiBootstrap>(MPI_COMM_WORLD, 120.0);
    epcomm::test::setMpiBootstrap(bootstrap.get());
    result = RUN_ALL_TESTS();
    if (rank == 0) epcomm::test::reportGpuSkip(EPCOMM_TEST_NEEDS_GPU != 0);
    epcomm::test::setMpiBootstrap(nullptr);
  }
  MPI_Finalize();
  return result;
}
