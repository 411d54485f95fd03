// SPDX-License-Identifier: Apache-2.0
#include "ranks.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <sstream>

#include "epcomm/error.hpp"

namespace epcomm::bench {

namespace {

constexpr int kNameBytes = 256;

double allReduce(double value, MPI_Op op, MPI_Comm comm) {
  double out = 0;
  EPCOMM_BENCH_MPI_CHECK(MPI_Allreduce(&value, &out, 1, MPI_DOUBLE, op, comm));
  return out;
}

}  // namespace

void throwMpiError(int status, const char* call, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(status, text, &length) != MPI_SUCCESS) length = 0;
  std::ostringstream os;
  os << call << " failed: " << std::string(text, static_cast<size_t>(length)) << " at " << file
     << ":" << line;
  throw MpiError(status, os.str());
}

double allMax(const Ranks& ranks, double value) {
  return allReduce(value, MPI_MAX, ranks.comm);
}

double allMin(const Ranks& ranks, double value) {
  return allReduce(value, MPI_MIN, ranks.comm);
}

std::vector<std::string> gatherStrings(const Ranks& ranks, const std::string& mine) {
  std::vector<char> send(kNameBytes, 0);
  std::memcpy(send.data(), mine.data(), std::min(mine.size(), size_t{kNameBytes - 1}));
  std::vector<char> all(static_cast<size_t>(kNameBytes) * ranks.size, 0);
  EPCOMM_BENCH_MPI_CHECK(MPI_Allgather(send.data(), kNameBytes, MPI_CHAR, all.data(), kNameBytes,
                                       MPI_CHAR, ranks.comm));
  std::vector<std::string> out;
  for (int r = 0; r < ranks.size; ++r) {
    const char* p = all.data() + static_cast<size_t>(r) * kNameBytes;
    out.emplace_back(p, strnlen(p, kNameBytes - 1));
  }
  return out;
}

void progress(const Ranks& ranks, const std::string& what) {
  if (ranks.root()) {
    std::fprintf(stderr, "ep_bench: %s\n", what.c_str());
    std::fflush(stderr);
  }
}

}  // namespace epcomm::bench
