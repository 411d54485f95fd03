// SPDX-License-Identifier: Apache-2.0
#include "common/mp_fixture.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <sstream>

#include "epcomm/error.hpp"

namespace epcomm::test {

namespace {

// CallOutcome as a fixed-size record, so every rank sends the same number of bytes.
struct OutcomeRecord {
  uint8_t threw = 0;
  int32_t code = 0;
  double seconds = 0;
  char what[RankOutcomes::kMaxWhat + 1] = {};
};

// Collective: every rank's `flag`, indexed by rank.
std::vector<uint8_t> gatherFlags(Bootstrap& bootstrap, bool flag) {
  const uint8_t mine = flag ? 1 : 0;
  std::vector<uint8_t> all(static_cast<size_t>(bootstrap.size()));
  bootstrap.allGather(&mine, all.data(), 1);
  return all;
}

}  // namespace

bool RankOutcomes::anyThrew() const {
  return std::any_of(ranks.begin(), ranks.end(), [](const CallOutcome& o) { return o.threw; });
}

bool RankOutcomes::allThrew() const {
  return std::all_of(ranks.begin(), ranks.end(), [](const CallOutcome& o) { return o.threw; });
}

std::vector<int> RankOutcomes::throwers() const {
  std::vector<int> out;
  for (size_t r = 0; r < ranks.size(); ++r) {
    if (ranks[r].threw) out.push_back(static_cast<int>(r));
  }
  return out;
}

std::string RankOutcomes::describe() const {
  std::ostringstream os;
  for (size_t r = 0; r < ranks.size(); ++r) {
    const CallOutcome& o = ranks[r];
    os << "rank " << r << ": ";
    if (o.threw) {
      os << "threw " << errorCodeName(o.code) << " after " << o.seconds << " s: " << o.what;
    } else {
      os << "returned after " << o.seconds << " s";
    }
    os << "\n";
  }
  return os.str();
}

RankOutcomes gatherOutcomes(Bootstrap& bootstrap, const CallOutcome& mine) {
  OutcomeRecord record;
  record.threw = mine.threw ? 1 : 0;
  record.code = static_cast<int32_t>(mine.code);
  record.seconds = mine.seconds;
  std::strncpy(record.what, mine.what.c_str(), RankOutcomes::kMaxWhat);
  std::vector<OutcomeRecord> all(static_cast<size_t>(bootstrap.size()));
  bootstrap.allGather(&record, all.data(), sizeof(OutcomeRecord));
  RankOutcomes out;
  for (const OutcomeRecord& r : all) {
    CallOutcome o;
    o.threw = r.threw != 0;
    o.code = static_cast<ErrorCode>(r.code);
    o.seconds = r.seconds;
    o.what = std::string(r.what, strnlen(r.what, RankOutcomes::kMaxWhat));
    out.ranks.push_back(o);
  }
  return out;
}

bool allRanks(Bootstrap& bootstrap, bool value) {
  const std::vector<uint8_t> all = gatherFlags(bootstrap, value);
  return std::all_of(all.begin(), all.end(), [](uint8_t v) { return v != 0; });
}

std::string failedRanks(Bootstrap& bootstrap) {
  const std::vector<uint8_t> all = gatherFlags(bootstrap, ::testing::Test::HasFailure());
  std::ostringstream os;
  for (size_t r = 0; r < all.size(); ++r) {
    if (all[r]) os << (os.tellp() > 0 ? ", " : "") << "rank " << r << ": failed";
  }
  return os.str();
}

void MultiRankTest::SetUp() {
  bootstrap_ = mpiBootstrap();
  ASSERT_NE(bootstrap_, nullptr) << "MultiRankTest needs the MPI bootstrap of mp_main.cpp";
}

void MultiRankTest::TearDown() {
  stream_.reset();
}

int MultiRankTest::device() {
  if (device_ < 0) {
    device_ = selectDevice(bootstrap());  // also makes it current
  }
  return device_;
}

cudaStream_t MultiRankTest::stream() {
  if (!stream_) {
    device();
    stream_ = std::make_unique<TestStream>();
  }
  return stream_->get();
}

void MultiRankGpuTest::SetUp() {
  MultiRankTest::SetUp();
  EPCOMM_REQUIRE_GPU();
}

}  // namespace epcomm::test
