// SPDX-License-Identifier: Apache-2.0
// The bench's MPI layer: the ranks of the run, the MPI check, and the reductions every reported
// number goes through. Every function here is collective over Ranks::comm unless it says not.
#pragma once

#include <mpi.h>

#include <string>
#include <vector>

namespace epcomm::bench {

// Throws epcomm::MpiError naming the call, the place and MPI's error text.
[[noreturn]] void throwMpiError(int status, const char* call, const char* file, int line);

#define EPCOMM_BENCH_MPI_CHECK(call)                                                       \
  do {                                                                                     \
    const int epcomm_bench_mpi_status_ = (call);                                           \
    if (epcomm_bench_mpi_status_ != MPI_SUCCESS) {                                         \
      ::epcomm::bench::throwMpiError(epcomm_bench_mpi_status_, #call, __FILE__, __LINE__); \
    }                                                                                      \
  } while (0)

// This process's place in the run.
struct Ranks {
  MPI_Comm comm = MPI_COMM_WORLD;
  int rank = 0;
  int size = 1;

  bool root() const { return rank == 0; }
};

double allMax(const Ranks& ranks, double value);
double allMin(const Ranks& ranks, double value);

// All ranks' strings (up to 255 characters each, no NUL inside), in rank order.
std::vector<std::string> gatherStrings(const Ranks& ranks, const std::string& mine);

// Not collective: rank 0 prints "ep_bench: <what>" to stderr, flushed.
void progress(const Ranks& ranks, const std::string& what);

}  // namespace epcomm::bench
