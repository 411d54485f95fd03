// SPDX-License-Identifier: Apache-2.0
// Bootstrap and fd exchange under mpirun (1, 2 and 4 ranks, CPU only, all ranks on one host).
//
// Every rank runs every test and reaches every collective in the same order, also on failure
// paths: a rank that stopped early would turn a bug into a hang. Waits that could hang are
// bounded by the bootstrap deadline (120 s, see mp_main.cpp) or by the short deadlines below.
#include <cuda_runtime_api.h>
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <mpi.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/test_env.hpp"
#include "epcomm/bootstrap.hpp"
#include "epcomm/error.hpp"
#include "epcomm/mpi_bootstrap.hpp"
#include "memory/fd_exchange.hpp"

namespace epcomm {
namespace {

using memory::exchangeFds;
using memory::FdExchangeDirectory;
using memory::FdExchangeOptions;
using memory::FdExchangeReport;
using memory::FdHello;
using memory::FdSecret;
using memory::UniqueFd;
using Clock = std::chrono::steady_clock;

constexpr double kFdTimeoutS = 30.0;

Bootstrap& world() {
  Bootstrap* bootstrap = test::mpiBootstrap();
  if (bootstrap == nullptr) throw std::logic_error("mp test without the MPI bootstrap");
  return *bootstrap;
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// Rank-coded payload: a wrong byte says which rank and offset it came from.
uint8_t payloadByte(int rank, size_t index, size_t bytes) {
  return static_cast<uint8_t>(rank * 37 + index * 11 + bytes * 3 + 1);
}

void checkAllGather(Bootstrap& bootstrap, size_t bytes) {
  SCOPED_TRACE(::testing::Message() << bytes << " bytes per rank");
  const int size = bootstrap.size();
  std::vector<uint8_t> send(bytes);
  for (size_t i = 0; i < bytes; ++i) send[i] = payloadByte(bootstrap.rank(), i, bytes);
  std::vector<uint8_t> recv(bytes * static_cast<size_t>(size), 0xEE);  // poisoned
  bootstrap.allGather(send.data(), recv.data(), bytes);
  for (int r = 0; r < size; ++r) {
    for (size_t i = 0; i < bytes; ++i) {
      const uint8_t got = recv[static_cast<size_t>(r) * bytes + i];
      if (got != payloadByte(r, i, bytes)) {
        ADD_FAILURE() << "rank " << bootstrap.rank() << ": byte " << i << " from rank " << r
                      << " is " << int{got} << ", expected " << int{payloadByte(r, i, bytes)};
        return;
      }
    }
  }
}

void checkOneHostGrouping(const Bootstrap& bootstrap) {
  EXPECT_EQ(bootstrap.numNodes(), 1);
  EXPECT_EQ(bootstrap.localSize(), bootstrap.size());
  EXPECT_EQ(bootstrap.localRank(), bootstrap.rank());
  std::vector<int> all(static_cast<size_t>(bootstrap.size()));
  std::iota(all.begin(), all.end(), 0);
  EXPECT_EQ(bootstrap.localRanks(), all);
}

const size_t kPayloadSizes[] = {1, 3, 8, 128, 4097, size_t{1} << 20};

// ---- MpiBootstrap ---------------------------------------------------------------------------

TEST(MpiBootstrap, RankAndSizeMatchMpi) {
  int rank = -1;
  int size = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  EXPECT_EQ(world().rank(), rank);
  EXPECT_EQ(world().size(), size);
  auto* mpi = dynamic_cast<MpiBootstrap*>(&world());
  ASSERT_NE(mpi, nullptr);
  int compare = MPI_UNEQUAL;
  MPI_Comm_compare(mpi->comm(), MPI_COMM_WORLD, &compare);
  EXPECT_EQ(compare, MPI_CONGRUENT) << "the bootstrap must use its own duplicate";
}

TEST(MpiBootstrap, AllGatherOfSeveralSizes) {
  for (size_t bytes : kPayloadSizes) checkAllGather(world(), bytes);
}

// Zero bytes is a legal (empty) collective: every rank must still call it.
TEST(MpiBootstrap, AllGatherOfZeroBytes) {
  EXPECT_NO_THROW(world().allGather(nullptr, nullptr, 0));
  std::vector<uint8_t> recv(4, 0xAB);
  EXPECT_NO_THROW(world().allGather(recv.data(), recv.data(), 0));
  EXPECT_EQ(recv, std::vector<uint8_t>(4, 0xAB));
}

TEST(MpiBootstrap, AllGatherRejectsNullBuffersLocally) {
  uint8_t byte = 0;
  EXPECT_THROW(world().allGather(nullptr, &byte, 1), InvalidArgument);
  EXPECT_THROW(world().allGather(&byte, nullptr, 1), InvalidArgument);
}

TEST(MpiBootstrap, BarrierWaitsForTheLastRank) {
  // Ranks enter in a staggered order; nobody may leave before the last one entered. All ranks
  // share one host, so CLOCK_MONOTONIC (steady_clock) is comparable across them.
  std::this_thread::sleep_for(std::chrono::milliseconds(20 * world().rank()));
  const int64_t entered = Clock::now().time_since_epoch().count();
  world().barrier();
  const int64_t left = Clock::now().time_since_epoch().count();
  std::vector<int64_t> all(static_cast<size_t>(world().size()));
  world().allGather(&entered, all.data(), sizeof(entered));
  for (int r = 0; r < world().size(); ++r) {
    EXPECT_LE(all[static_cast<size_t>(r)], left)
        << "left the barrier before rank " << r << " entered it";
  }
  for (int i = 0; i < 50; ++i) world().barrier();
}

TEST(MpiBootstrap, LocalGroupingOnOneHost) {
  checkOneHostGrouping(world());
}

TEST(MpiBootstrap, RejectsBadArgumentsWithoutCommunicating) {
  EXPECT_THROW(MpiBootstrap(MPI_COMM_NULL, 10.0), InvalidArgument);
  EXPECT_THROW(MpiBootstrap(MPI_COMM_WORLD, 0.0), InvalidArgument);
  // A negative timeout means "the configured default" (epcomm/config.hpp), so it is legal.
  EXPECT_THROW(MpiBootstrap(MPI_COMM_WORLD, 2e9), InvalidArgument);
  EXPECT_THROW(MpiBootstrap(MPI_COMM_WORLD, std::nan("")), InvalidArgument);
}

TEST(MpiBootstrap, InstancesAreIndependentAndFreeTheirCommunicator) {
  for (int i = 0; i < 20; ++i) {
    MpiBootstrap other(MPI_COMM_WORLD, 60.0);
    checkOneHostGrouping(other);
    // Interleaved use must not cross-match: each has its own communicator.
    checkAllGather(other, 16);
    checkAllGather(world(), 24);
    other.barrier();
  }
}

TEST(MpiBootstrap, WorksOnASubCommunicator) {
  // Even and odd world ranks form two groups.
  MPI_Comm half = MPI_COMM_NULL;
  ASSERT_EQ(MPI_Comm_split(MPI_COMM_WORLD, world().rank() % 2, world().rank(), &half), MPI_SUCCESS);
  {
    MpiBootstrap sub(half, 60.0);
    EXPECT_EQ(sub.rank(), world().rank() / 2);
    EXPECT_EQ(sub.size(), (world().size() + 1 - world().rank() % 2) / 2);
    checkOneHostGrouping(sub);
    checkAllGather(sub, 100);
    sub.barrier();
  }
  MPI_Comm_free(&half);
  // The process rank in messages stays the one of the last bootstrap built; restore the world's.
  MpiBootstrap restore(MPI_COMM_WORLD, 60.0);
}

// Rank 0 enters a collective the others do not join in time. Afterwards the others complete
// the abandoned collective, so no request stays pending and nothing hangs.
TEST(MpiBootstrap, TimeoutNamesTheOperationAndBreaksTheBootstrap) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  for (const bool use_barrier : {true, false}) {
    SCOPED_TRACE(use_barrier ? "barrier" : "allGather");
    // Only rank 0 has the short deadline: the others must wait for it to time out and must
    // then complete the abandoned collective, however slowly oversubscribed ranks progress.
    MpiBootstrap bootstrap(MPI_COMM_WORLD, world().rank() == 0 ? 0.3 : 60.0);
    uint64_t send = 0x5eed0000u + static_cast<uint64_t>(bootstrap.rank());
    std::vector<uint64_t> recv(static_cast<size_t>(bootstrap.size()));
    auto collective = [&] {
      if (use_barrier) {
        bootstrap.barrier();
      } else {
        bootstrap.allGather(&send, recv.data(), sizeof(send));
      }
    };
    if (bootstrap.rank() == 0) {
      const auto start = Clock::now();
      try {
        collective();
        ADD_FAILURE() << "no timeout although no other rank joined";
      } catch (const TimeoutError& e) {
        const double waited = std::chrono::duration<double>(Clock::now() - start).count();
        EXPECT_GE(waited, 0.3);
        EXPECT_LT(waited, 30.0);
        EXPECT_EQ(e.peer(), -1);
        const std::string what = e.what();
        EXPECT_TRUE(contains(what, use_barrier ? "MPI_Ibarrier" : "MPI_Iallgather")) << what;
        EXPECT_TRUE(contains(what, "0.3 s")) << what;
        EXPECT_TRUE(contains(what, "unknown")) << what;
        EXPECT_TRUE(contains(what, "rank 0")) << what;
      }
      // The communicator may still match the abandoned collective: refuse further use.
      try {
        bootstrap.barrier();
        ADD_FAILURE() << "a timed-out bootstrap kept working";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::kBroken) << e.what();
      }
      EXPECT_THROW(bootstrap.allGather(&send, recv.data(), sizeof(send)), Error);
      EXPECT_EQ(bootstrap.comm(), MPI_COMM_NULL);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    // Rank 0 progresses its abandoned request inside the MPI_Barrier below.
    if (bootstrap.rank() != 0 && use_barrier) {
      EXPECT_NO_THROW(collective());
    }
    if (bootstrap.rank() != 0 && !use_barrier) {
      // allGather agrees on the size first (an MPI_Iallgather of one uint64 per rank), and rank
      // 0 gave up in that step: complete exactly that one, on the bootstrap's communicator.
      const uint64_t mine = sizeof(send);
      std::vector<uint64_t> sizes(static_cast<size_t>(bootstrap.size()));
      MPI_Request request = MPI_REQUEST_NULL;
      ASSERT_EQ(
          MPI_Iallgather(&mine, 8, MPI_BYTE, sizes.data(), 8, MPI_BYTE, bootstrap.comm(), &request),
          MPI_SUCCESS);
      ASSERT_EQ(MPI_Wait(&request, MPI_STATUS_IGNORE), MPI_SUCCESS);
      for (int r = 0; r < bootstrap.size(); ++r) {
        EXPECT_EQ(sizes[static_cast<size_t>(r)], sizeof(send)) << "rank " << r;
      }
    }
    MPI_Barrier(MPI_COMM_WORLD);
  }
}

// The constructor's duplication is collective too: a rank whose peers never construct theirs
// gets a TimeoutError instead of hanging in MPI_Comm_dup.
TEST(MpiBootstrap, ConstructorTimesOutWhenOthersDoNotJoin) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  if (world().rank() == 0) {
    try {
      MpiBootstrap lonely(MPI_COMM_WORLD, 0.3);
      ADD_FAILURE() << "constructed although no other rank joined";
    } catch (const TimeoutError& e) {
      EXPECT_TRUE(contains(e.what(), "MPI_Comm_idup")) << e.what();
      EXPECT_TRUE(contains(e.what(), "0.3 s")) << e.what();
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (world().rank() != 0) {
    // Complete rank 0's abandoned duplication (a non-blocking collective only matches another
    // non-blocking one); rank 0 progresses it inside the MPI_Barrier below.
    MPI_Comm dup = MPI_COMM_NULL;
    MPI_Request request = MPI_REQUEST_NULL;
    ASSERT_EQ(MPI_Comm_idup(MPI_COMM_WORLD, &dup, &request), MPI_SUCCESS);
    ASSERT_EQ(MPI_Wait(&request, MPI_STATUS_IGNORE), MPI_SUCCESS);
    MPI_Comm_free(&dup);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

// Issue 9 item 11: sizes that differ across ranks used to abort the job (MPI_ERR_TRUNCATE through
// MPI_COMM_WORLD's handler) on one side and return partial data on the other. Now every rank
// throws MpiError, writes nothing, and the bootstrap stays usable.
TEST(MpiBootstrap, AllGatherWithDifferentSizesFailsOnEveryRank) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int rank = world().rank();
  const int size = world().size();
  struct Case {
    const char* name;
    std::function<size_t(int)> bytes_of;
  };
  const Case cases[] = {
      {"last rank gathers more", [size](int r) { return size_t{r == size - 1 ? 16u : 8u}; }},
      {"rank 0 gathers less", [](int r) { return size_t{r == 0 ? 4u : 8u}; }},
      {"every rank differs", [](int r) { return size_t{8} + static_cast<size_t>(r); }},
      {"rank 1 gathers nothing", [](int r) { return size_t{r == 1 ? 0u : 8u}; }},
      {"huge on one rank", [](int r) { return r == 0 ? (size_t{1} << 20) : size_t{64}; }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const size_t bytes = c.bytes_of(rank);
    std::vector<uint8_t> send(std::max<size_t>(bytes, 1), static_cast<uint8_t>(rank + 1));
    const size_t largest = size_t{1} << 20;
    std::vector<uint8_t> recv(largest * static_cast<size_t>(size), 0xEE);  // poisoned
    const auto began = Clock::now();
    try {
      world().allGather(send.data(), recv.data(), bytes);
      ADD_FAILURE() << "rank " << rank << ": allGather of " << bytes
                    << " bytes succeeded although the sizes differ";
    } catch (const MpiError& e) {
      EXPECT_EQ(e.code(), ErrorCode::kMpi);
      EXPECT_EQ(e.status(), MPI_ERR_COUNT);
      const std::string what = e.what();
      EXPECT_TRUE(contains(what, "different sizes")) << what;
      // Names rank 0's size and this rank's.
      EXPECT_TRUE(contains(what, "rank 0 = " + std::to_string(c.bytes_of(0)))) << what;
      EXPECT_TRUE(contains(what, "this rank passed " + std::to_string(bytes))) << what;
    }
    EXPECT_LT(std::chrono::duration<double>(Clock::now() - began).count(), 30.0);
    EXPECT_TRUE(std::all_of(recv.begin(), recv.end(), [](uint8_t b) { return b == 0xEE; }))
        << "a failed allGather wrote into recv";
    // Nothing is left pending: the same bootstrap keeps working.
    checkAllGather(world(), 24);
  }
}

// ---- CallbackBootstrap ----------------------------------------------------------------------

void mpiAllGather(const void* send, void* recv, size_t bytes) {
  const int rc = MPI_Allgather(send, static_cast<int>(bytes), MPI_BYTE, recv,
                               static_cast<int>(bytes), MPI_BYTE, MPI_COMM_WORLD);
  if (rc != MPI_SUCCESS) throw std::runtime_error("MPI_Allgather failed");
}

TEST(CallbackBootstrap, OverMpiAllgatherMatchesMpiBootstrap) {
  int gathers = 0;
  CallbackBootstrap bootstrap(world().rank(), world().size(),
                              [&gathers](const void* send, void* recv, size_t bytes) {
                                ++gathers;
                                mpiAllGather(send, recv, bytes);
                              });
  EXPECT_EQ(gathers, 1) << "the constructor all-gathers the host identity once";
  EXPECT_EQ(bootstrap.rank(), world().rank());
  EXPECT_EQ(bootstrap.size(), world().size());
  EXPECT_EQ(bootstrap.localRank(), world().localRank());
  EXPECT_EQ(bootstrap.localRanks(), world().localRanks());
  EXPECT_EQ(bootstrap.numNodes(), world().numNodes());
  checkOneHostGrouping(bootstrap);
  for (size_t bytes : kPayloadSizes) checkAllGather(bootstrap, bytes);
  gathers = 0;
  bootstrap.barrier();  // no barrier callback: a one-byte all-gather
  EXPECT_EQ(gathers, 1);
}

TEST(CallbackBootstrap, UsesTheBarrierCallback) {
  int barriers = 0;
  CallbackBootstrap bootstrap(world().rank(), world().size(), mpiAllGather, [&barriers] {
    ++barriers;
    MPI_Barrier(MPI_COMM_WORLD);
  });
  bootstrap.barrier();
  bootstrap.barrier();
  EXPECT_EQ(barriers, 2);
}

TEST(CallbackBootstrap, ValidatesArgumentsBeforeCommunicating) {
  auto never = [](const void*, void*, size_t) { FAIL() << "collective called"; };
  EXPECT_THROW(CallbackBootstrap(-1, 2, never), InvalidArgument);
  EXPECT_THROW(CallbackBootstrap(2, 2, never), InvalidArgument);
  EXPECT_THROW(CallbackBootstrap(0, 0, never), InvalidArgument);
  EXPECT_THROW(CallbackBootstrap(0, 1, CallbackBootstrap::AllGatherFn{}), InvalidArgument);
  try {
    CallbackBootstrap(5, 4, never);
  } catch (const InvalidArgument& e) {
    EXPECT_TRUE(contains(e.what(), "rank = 5")) << e.what();
    EXPECT_TRUE(contains(e.what(), "[0, 4)")) << e.what();
  }
}

TEST(CallbackBootstrap, SingleProcessWithoutMpi) {
  CallbackBootstrap solo(0, 1, [](const void* send, void* recv, size_t bytes) {
    if (bytes > 0) std::memcpy(recv, send, bytes);
  });
  EXPECT_EQ(solo.localSize(), 1);
  EXPECT_EQ(solo.localRank(), 0);
  EXPECT_EQ(solo.numNodes(), 1);
  solo.barrier();
  checkAllGather(solo, 5);
  // Restore the process rank used in error messages.
  MpiBootstrap restore(MPI_COMM_WORLD, 60.0);
}

// ---- selectDevice ---------------------------------------------------------------------------

TEST(SelectDevice, PicksLocalRankModuloDeviceCountOrSaysWhy) {
  std::string reason;
  if (test::gpuAvailable(&reason)) {
    int count = 0;
    ASSERT_EQ(cudaGetDeviceCount(&count), cudaSuccess);
    const int device = selectDevice(world());
    EXPECT_EQ(device, world().localRank() % count);
    int current = -1;
    ASSERT_EQ(cudaGetDevice(&current), cudaSuccess);
    EXPECT_EQ(current, device);
  } else {
    try {
      selectDevice(world());
      ADD_FAILURE() << "selectDevice succeeded without a GPU (" << reason << ")";
    } catch (const CudaError& e) {
      EXPECT_TRUE(contains(e.what(), "cudaGetDeviceCount") || contains(e.what(), "no CUDA"))
          << e.what();
      EXPECT_TRUE(contains(e.what(), "CUDA_VISIBLE_DEVICES")) << e.what();
    }
  }
}

// ---- fd exchange ----------------------------------------------------------------------------

std::string rankText(int rank, int iteration) {
  return "epcomm fd test: rank " + std::to_string(rank) + ", iteration " +
         std::to_string(iteration);
}

UniqueFd makeMemfd(const std::string& text) {
  UniqueFd fd(memfd_create("epcomm-fd-test", MFD_CLOEXEC));
  if (fd.get() < 0) throw std::runtime_error("memfd_create failed");
  if (::pwrite(fd.get(), text.data(), text.size(), 0) != static_cast<ssize_t>(text.size())) {
    throw std::runtime_error("pwrite to memfd failed");
  }
  return fd;
}

std::string readText(int fd) {
  char buffer[256] = {};
  const ssize_t n = ::pread(fd, buffer, sizeof(buffer), 0);
  return n > 0 ? std::string(buffer, static_cast<size_t>(n)) : std::string();
}

int countOpenFds() {
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int count = 0;
  while (dirent* entry = ::readdir(dir)) {
    if (std::strcmp(entry->d_name, ".") != 0 && std::strcmp(entry->d_name, "..") != 0) ++count;
  }
  ::closedir(dir);
  return count;  // includes the directory's own fd, equally in every call
}

struct FileId {
  uint64_t device;
  uint64_t inode;
};

// Exchanges one memfd and checks every received fd: the peer's text, the very same file
// (device and inode all-gathered separately) and close-on-exec.
void exchangeAndCheck(Bootstrap& bootstrap, int iteration, const FdExchangeOptions& options = {}) {
  const int rank = bootstrap.rank();
  UniqueFd mine = makeMemfd(rankText(rank, iteration));
  struct stat st {};
  ASSERT_EQ(::fstat(mine.get(), &st), 0);
  const FileId my_id{static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino)};
  std::vector<FileId> ids(static_cast<size_t>(bootstrap.size()));
  bootstrap.allGather(&my_id, ids.data(), sizeof(FileId));

  std::vector<UniqueFd> fds = exchangeFds(bootstrap, mine.get(), kFdTimeoutS, options);
  ASSERT_EQ(fds.size(), static_cast<size_t>(bootstrap.size()));
  const auto& local = bootstrap.localRanks();
  for (int r = 0; r < bootstrap.size(); ++r) {
    const int fd = fds[static_cast<size_t>(r)].get();
    const bool expect_fd = r != rank && std::find(local.begin(), local.end(), r) != local.end();
    if (!expect_fd) {
      EXPECT_EQ(fd, -1) << "rank " << rank << " got an fd for rank " << r;
      continue;
    }
    ASSERT_GE(fd, 0) << "rank " << rank << " got no fd from rank " << r;
    EXPECT_NE(fd, mine.get());
    EXPECT_EQ(readText(fd), rankText(r, iteration)) << "rank " << rank << " reading rank " << r;
    struct stat peer {};
    ASSERT_EQ(::fstat(fd, &peer), 0);
    EXPECT_EQ(static_cast<uint64_t>(peer.st_ino), ids[static_cast<size_t>(r)].inode);
    EXPECT_EQ(static_cast<uint64_t>(peer.st_dev), ids[static_cast<size_t>(r)].device);
    EXPECT_NE(::fcntl(fd, F_GETFD) & FD_CLOEXEC, 0) << "received fds must be close-on-exec";
  }
}

TEST(FdExchange, EveryLocalRankReadsEveryPeersFile) {
  exchangeAndCheck(world(), 0);
}

TEST(FdExchange, OverCallbackBootstrap) {
  CallbackBootstrap bootstrap(world().rank(), world().size(), mpiAllGather);
  exchangeAndCheck(bootstrap, 1);
}

TEST(FdExchange, RepeatedExchangesLeakNoFds) {
  exchangeAndCheck(world(), 2);  // warm-up: MPI may open its own fds on first use
  world().barrier();
  const int start = countOpenFds();
  ASSERT_GT(start, 0);
  const int peers = world().localSize() - 1;
  for (int iteration = 0; iteration < 20; ++iteration) {
    {
      UniqueFd mine = makeMemfd(rankText(world().rank(), iteration));
      std::vector<UniqueFd> fds = exchangeFds(world(), mine.get(), kFdTimeoutS);
      // My memfd plus one fd per local peer; every socket is already closed.
      EXPECT_EQ(countOpenFds(), start + 1 + peers) << "iteration " << iteration;
      for (int r = 0; r < world().size(); ++r) {
        if (fds[static_cast<size_t>(r)].get() >= 0) {
          EXPECT_EQ(readText(fds[static_cast<size_t>(r)].get()), rankText(r, iteration));
        }
      }
    }
    EXPECT_EQ(countOpenFds(), start) << "iteration " << iteration;
  }
}

TEST(FdExchange, BadFdOnOneRankFailsEveryRankQuickly) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int start = countOpenFds();
  UniqueFd mine = makeMemfd("unused");
  const int offered = world().rank() == 0 ? -1 : mine.get();
  const auto began = Clock::now();
  try {
    exchangeFds(world(), offered, kFdTimeoutS);
    ADD_FAILURE() << "rank " << world().rank() << ": exchange succeeded with a bad fd on rank 0";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(world().rank(), 0) << e.what();
    EXPECT_TRUE(contains(e.what(), "my_fd = -1")) << e.what();
  } catch (const Error& e) {
    EXPECT_NE(world().rank(), 0) << e.what();
    EXPECT_EQ(e.code(), ErrorCode::kRemote) << e.what();
    EXPECT_TRUE(contains(e.what(), "rank(s) 0 ")) << e.what();
  }
  // Agreement through the bootstrap, not a socket timeout.
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - began).count(), kFdTimeoutS / 2);
  mine.reset();
  EXPECT_EQ(countOpenFds(), start);
}

// Wraps a bootstrap and doctors the host identities its constructor all-gathers, to fake
// several hosts on one machine: as seen by rank `viewer`, rank r's identity is altered by
// `host_of(viewer, r)` (0 = unchanged). The viewer's own record must stay unchanged: it is
// compared with what the viewer sent. Everything after construction passes straight through.
class FakeHostsBootstrap : public Bootstrap {
 public:
  using HostOf = std::function<uint8_t(int viewer, int rank)>;

  FakeHostsBootstrap(Bootstrap& inner, HostOf host_of)
      : inner_(inner), host_of_(std::move(host_of)) {
    initLocalGroup();
    host_of_ = nullptr;
  }
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  void allGather(const void* send, void* recv, size_t bytes) override {
    inner_.allGather(send, recv, bytes);
    if (!host_of_ || bytes == 0) return;
    auto* records = static_cast<uint8_t*>(recv);
    for (int r = 0; r < size(); ++r) records[static_cast<size_t>(r) * bytes] ^= host_of_(rank(), r);
  }
  void barrier() override { inner_.barrier(); }

 private:
  Bootstrap& inner_;
  HostOf host_of_;
};

// Even and odd ranks on two fake hosts: local groups that are not contiguous rank ranges, and
// ranks on the other host that take part in the bootstrap steps only.
TEST(FdExchange, OnlyRanksOfTheSameHostExchange) {
  FakeHostsBootstrap bootstrap(
      world(), [](int viewer, int r) { return static_cast<uint8_t>((r % 2) ^ (viewer % 2)); });
  std::vector<int> expected;
  for (int r = bootstrap.rank() % 2; r < bootstrap.size(); r += 2) expected.push_back(r);
  EXPECT_EQ(bootstrap.localRanks(), expected);
  EXPECT_EQ(bootstrap.localRank(), bootstrap.rank() / 2);
  EXPECT_EQ(bootstrap.numNodes(), std::min(bootstrap.size(), 2));
  exchangeAndCheck(bootstrap, 4);
}

// Rank 1 believes it is alone on its host, while every other rank (correctly) expects it
// locally, so it publishes no socket. The others see that in the published directory and every
// rank fails at once (not at the deadline), the others naming rank 1.
TEST(FdExchange, HostDisagreementFailsEveryRankAtOnce) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  constexpr int kLoner = 1;
  FakeHostsBootstrap bootstrap(world(), [](int viewer, int r) {
    return static_cast<uint8_t>(viewer == kLoner && r != kLoner ? 0xFF : 0);
  });
  const int rank = bootstrap.rank();
  ASSERT_EQ(bootstrap.localSize(), rank == kLoner ? 1 : bootstrap.size());
  const int start = countOpenFds();
  {
    UniqueFd mine = makeMemfd(rankText(rank, 98));
    const auto began = Clock::now();
    try {
      exchangeFds(bootstrap, mine.get(), kFdTimeoutS);
      ADD_FAILURE() << "rank " << rank << ": exchange succeeded although rank 1 does not listen";
    } catch (const Error& e) {
      if (rank == kLoner) {
        EXPECT_EQ(e.code(), ErrorCode::kRemote) << e.what();
        EXPECT_TRUE(contains(e.what(), "rank(s) 0")) << e.what();
      } else {
        EXPECT_EQ(e.code(), ErrorCode::kInternal) << e.what();
        EXPECT_TRUE(contains(e.what(), "rank 1 is on this host")) << e.what();
        EXPECT_TRUE(contains(e.what(), "disagree")) << e.what();
      }
    }
    EXPECT_LT(std::chrono::duration<double>(Clock::now() - began).count(), kFdTimeoutS / 2);
  }
  EXPECT_EQ(countOpenFds(), start) << "a failed exchange must close every socket and fd";
  exchangeAndCheck(world(), 3);
}

// Rank 1 publishes its socket but then never connects nor accepts (its hook throws, as if it
// had failed or hung there). The others time out naming it; nobody hangs, nothing leaks.
TEST(FdExchange, AbsentPeerTimesOutNamingItAndNobodyHangs) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  constexpr int kAbsent = 1;
  // 3 s, not 1: on a loaded 2-core machine (ctest -j2 beside a 16-rank test) a healthy rank 0 was
  // seen to miss a 1 s deadline, and the error then named it instead of rank 1.
  constexpr double kShortTimeoutS = 3.0;
  const int rank = world().rank();
  FdExchangeOptions options;
  options.before_exchange = [rank](const FdExchangeDirectory&) {
    if (rank == kAbsent) throw std::runtime_error("rank 1 stays away");
  };
  const int start = countOpenFds();
  {
    UniqueFd mine = makeMemfd(rankText(rank, 99));
    const auto began = Clock::now();
    bool peer_closed = false;
    try {
      exchangeFds(world(), mine.get(), kShortTimeoutS, options);
      ADD_FAILURE() << "rank " << rank << ": exchange succeeded although rank 1 stayed away";
    } catch (const TimeoutError& e) {
      EXPECT_NE(rank, kAbsent) << e.what();
      EXPECT_EQ(e.peer(), kAbsent) << e.what();
      EXPECT_TRUE(contains(e.what(), "rank 1 never delivered its fd")) << e.what();
      EXPECT_TRUE(contains(e.what(), "deadline 3 s")) << e.what();
    } catch (const std::runtime_error& e) {
      if (rank == kAbsent) {
        // The absent rank rethrows its own failure after the final bootstrap step.
        EXPECT_TRUE(contains(e.what(), "stays away")) << e.what();
      } else {
        // A rank that reached rank 1's socket before rank 1 closed it (timing: rank 1 closes
        // when its hook throws) fails as soon as it has served every other rank, naming rank 1
        // as the one that went away. It must serve the others first: failing at once made it
        // look absent to them, and they named it instead of rank 1 (seen under ASan in CI).
        peer_closed = true;
        EXPECT_TRUE(contains(e.what(), "to rank 1")) << e.what();
        EXPECT_TRUE(contains(e.what(), "closed its socket")) << e.what();
      }
    }
    const double waited = std::chrono::duration<double>(Clock::now() - began).count();
    EXPECT_LT(waited, kShortTimeoutS + 20.0);
    if (rank != kAbsent && !peer_closed) {
      EXPECT_GE(waited, kShortTimeoutS);
    }
  }
  EXPECT_EQ(countOpenFds(), start) << "a failed exchange must close every socket and fd";
  exchangeAndCheck(world(), 5);
}

// ---- fd exchange under attack (issue 9 item 14) -----------------------------------------------
//
// Every attack is staged inside the before_exchange hook, which runs on every rank after the
// socket directory is published and before any rank connects or accepts; a world barrier at the
// end of the hook makes sure every attacking connection is queued at its victim before the real
// ranks connect, so the victim meets the attacker first. The victim is rank 0, the impersonated
// rank is rank 1. After the exchange, exchangeAndCheck proves (by device and inode) that every
// fd rank 0 took is the real peer's memfd, and the victim's report shows why each attacker was
// refused.

constexpr int kVictim = 0;
constexpr int kImpersonated = 1;

sockaddr_un abstractAddress(const std::string& name, socklen_t* length) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  const size_t n = std::min(name.size(), sizeof(address.sun_path) - 1);
  std::memcpy(address.sun_path + 1, name.data(), n);
  *length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + n);
  return address;
}

// A blocking connection to an abstract name (the listeners exist once the directory is out).
UniqueFd connectTo(const std::string& name) {
  socklen_t length = 0;
  const sockaddr_un address = abstractAddress(name, &length);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) return fd;
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), length) != 0) fd.reset();
  return fd;
}

// True once nobody listens on the abstract `name` any more (connect is refused), polled for at
// most `seconds`.
bool waitUntilNobodyListens(const std::string& name, double seconds) {
  const auto give_up = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                          std::chrono::duration<double>(seconds));
  socklen_t length = 0;
  const sockaddr_un address = abstractAddress(name, &length);
  while (Clock::now() < give_up) {
    UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (probe.get() >= 0 &&
        ::connect(probe.get(), reinterpret_cast<const sockaddr*>(&address), length) != 0 &&
        errno == ECONNREFUSED) {
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

// Rank 1 fails before the socket phase, but only once rank 0 is connected to its listener (rank
// 0 tells it over MPI); rank 0 holds its send (before_send) until rank 1 has closed that
// listener, so its send fails: rank 1 left mid-exchange. Rank 0 must still hand its fd to every
// other rank before it fails naming rank 1, so that no rank names rank 0. (Failing at once, rank 0
// looked absent to ranks 2 and up, which named it instead of rank 1: seen under ASan in CI, where
// the timing made it happen.)
TEST(FdExchange, APeerThatLeavesMidSendIsNamedByEveryRank) {
  if (world().size() < 3) GTEST_SKIP() << "needs 3 ranks (one to leave, one to hold, one to serve)";
  constexpr int kLeaver = 1;
  constexpr int kHolder = 0;
  constexpr double kShortTimeoutS = 3.0;
  const int rank = world().rank();
  std::string leaver_name;
  bool leaver_left = false;
  FdExchangeOptions options;
  constexpr int kConnectedTag = 7101;
  options.before_exchange = [&](const FdExchangeDirectory& directory) {
    leaver_name = directory.name[kLeaver];
    if (rank != kLeaver) return;
    int connected = 0;
    MPI_Request request;
    MPI_Irecv(&connected, 1, MPI_INT, kHolder, kConnectedTag, MPI_COMM_WORLD, &request);
    int done = 0;
    const auto give_up = Clock::now() + std::chrono::seconds(20);
    while (!done && Clock::now() < give_up) {
      MPI_Test(&request, &done, MPI_STATUS_IGNORE);
      if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (!done) {
      MPI_Cancel(&request);
      MPI_Wait(&request, MPI_STATUS_IGNORE);
      ADD_FAILURE() << "rank 0 never connected to rank 1";
    }
    throw std::runtime_error("rank 1 leaves");
  };
  options.before_send = [&](int peer) {
    if (rank != kHolder || peer != kLeaver) return;
    const int connected = 1;
    MPI_Send(&connected, 1, MPI_INT, kLeaver, kConnectedTag, MPI_COMM_WORLD);
    leaver_left = waitUntilNobodyListens(leaver_name, 20.0);
  };
  const int start = countOpenFds();
  {
    UniqueFd mine = makeMemfd(rankText(rank, 98));
    try {
      exchangeFds(world(), mine.get(), kShortTimeoutS, options);
      ADD_FAILURE() << "rank " << rank << ": exchange succeeded although rank 1 left";
    } catch (const TimeoutError& e) {
      EXPECT_NE(rank, kHolder) << "rank 0 met a closed socket, not a deadline: " << e.what();
      EXPECT_NE(rank, kLeaver) << e.what();
      EXPECT_EQ(e.peer(), kLeaver) << e.what();
      EXPECT_TRUE(contains(e.what(), "rank 1 never delivered its fd")) << e.what();
    } catch (const std::runtime_error& e) {
      if (rank == kLeaver) {
        EXPECT_TRUE(contains(e.what(), "leaves")) << e.what();
      } else {
        // rank 0 always, another rank only if it too reached rank 1 just before it closed.
        EXPECT_TRUE(contains(e.what(), "to rank 1")) << e.what();
        EXPECT_TRUE(contains(e.what(), "closed its socket")) << e.what();
      }
    }
  }
  if (rank == kHolder) {
    EXPECT_TRUE(leaver_left) << "rank 1's listener never closed";
  }
  EXPECT_EQ(countOpenFds(), start) << "a failed exchange must close every socket and fd";
  exchangeAndCheck(world(), 6);
}

// Sends `bytes` bytes of `hello` with `fd` attached (fd < 0: none). Async-signal-safe, so a
// forked child of a multithreaded MPI process may call it. Returns false on failure.
bool sendRaw(int socket, const FdHello& hello, size_t bytes, int fd) {
  union {
    cmsghdr align;
    char buffer[CMSG_SPACE(sizeof(int))];
  } control;
  std::memset(&control, 0, sizeof(control));
  iovec chunk{const_cast<FdHello*>(&hello), bytes};
  msghdr message{};
  message.msg_iov = &chunk;
  message.msg_iovlen = 1;
  if (fd >= 0) {
    message.msg_control = control.buffer;
    message.msg_controllen = sizeof(control.buffer);
    cmsghdr* header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(header), &fd, sizeof(int));
  }
  return ::sendmsg(socket, &message, MSG_NOSIGNAL) == static_cast<ssize_t>(bytes);
}

FdHello helloFrom(int sender, int receiver, const FdSecret& secret) {
  FdHello hello{};
  hello.magic = memory::kFdHelloMagic;
  hello.version = memory::kFdHelloVersion;
  hello.sender = sender;
  hello.receiver = receiver;
  hello.secret = secret;
  return hello;
}

// Exit codes of an attacking child.
enum AttackOutcome {
  kAttackSent = 0,
  kAttackNoSocket,
  kAttackNoConnect,
  kAttackNoSend,
  kAttackNoSetuid,
  kAttackLost,
};

// Forks a process (pid unknown to the job) that connects to `name`, sends `hello` with `fd`
// attached and exits; with `uid` >= 0 it first becomes that user. Only async-signal-safe calls
// in the child. Returns the child's AttackOutcome.
int attackFromChild(const std::string& name, const FdHello& hello, int fd, int uid = -1) {
  socklen_t length = 0;
  const sockaddr_un address = abstractAddress(name, &length);
  const pid_t child = ::fork();
  if (child < 0) return kAttackLost;
  if (child == 0) {
    if (uid >= 0) {
      if (::setgroups(0, nullptr) != 0 || ::setgid(static_cast<gid_t>(uid)) != 0 ||
          ::setuid(static_cast<uid_t>(uid)) != 0) {
        ::_exit(kAttackNoSetuid);
      }
    }
    const int socket = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (socket < 0) ::_exit(kAttackNoSocket);
    if (::connect(socket, reinterpret_cast<const sockaddr*>(&address), length) != 0) {
      ::_exit(kAttackNoConnect);
    }
    ::_exit(sendRaw(socket, hello, sizeof(hello), fd) ? kAttackSent : kAttackNoSend);
  }
  // Bounded wait: the child only makes a few system calls.
  const auto give_up = Clock::now() + std::chrono::seconds(20);
  int status = 0;
  for (;;) {
    const pid_t done = ::waitpid(child, &status, WNOHANG);
    if (done == child) break;
    if (done < 0 || Clock::now() > give_up) {
      ::kill(child, SIGKILL);
      ::waitpid(child, &status, 0);
      return kAttackLost;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : kAttackLost;
}

bool anyRefusalContains(const FdExchangeReport& report, const std::string& part) {
  return std::any_of(report.refused.begin(), report.refused.end(),
                     [&](const std::string& line) { return contains(line, part); });
}

std::string refusals(const FdExchangeReport& report) {
  std::string text = report.refused.empty() ? "(none)" : "";
  for (const std::string& line : report.refused) text += "\n  " + line;
  return text;
}

FdSecret tampered(FdSecret secret) {
  secret[memory::kFdSecretBytes - 1] ^= 0x01;
  return secret;
}

// (a) A claim to be rank 1 with a wrong secret: once from rank 1's own process (the right pid),
// once from another process of this user. Both are refused, the exchange succeeds, and rank 0
// holds rank 1's real memfd, not the attacker's.
TEST(FdExchange, RefusesAClaimWithAWrongSecret) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int rank = world().rank();
  const int start = countOpenFds();
  FdExchangeReport report;
  bool same_pid_sent = true;
  int child_outcome = kAttackSent;
  {
    UniqueFd foreign = makeMemfd("foreign: not rank 1's buffer");
    FdExchangeOptions options;
    options.report = &report;
    options.before_exchange = [&](const FdExchangeDirectory& directory) {
      if (rank == kImpersonated) {
        const FdHello hello =
            helloFrom(kImpersonated, kVictim, tampered(directory.secret[kImpersonated]));
        UniqueFd socket = connectTo(directory.name[kVictim]);
        same_pid_sent =
            socket.get() >= 0 && sendRaw(socket.get(), hello, sizeof(hello), foreign.get());
        child_outcome = attackFromChild(directory.name[kVictim], hello, foreign.get());
      }
      world().barrier();
    };
    exchangeAndCheck(world(), 10, options);
  }
  EXPECT_TRUE(same_pid_sent);
  EXPECT_EQ(child_outcome, kAttackSent);
  if (rank == kVictim) {
    EXPECT_TRUE(anyRefusalContains(report, "wrong secret for rank 1")) << refusals(report);
    EXPECT_TRUE(anyRefusalContains(report, "not the process of any local rank"))
        << refusals(report);
  } else {
    EXPECT_TRUE(report.refused.empty()) << refusals(report);
  }
  EXPECT_EQ(countOpenFds(), start) << "refused fds and sockets must be closed";
}

// (b) A claim to be rank 1 with rank 1's correct secret, from the wrong process: a child of rank
// 1, rank 0's own process, and (with 3+ ranks) rank 2, a real member of the job.
TEST(FdExchange, RefusesTheRightSecretFromTheWrongProcess) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int rank = world().rank();
  const int start = countOpenFds();
  FdExchangeReport report;
  bool sent = true;
  int child_outcome = kAttackSent;
  {
    UniqueFd foreign = makeMemfd("foreign: not rank 1's buffer");
    FdExchangeOptions options;
    options.report = &report;
    options.before_exchange = [&](const FdExchangeDirectory& directory) {
      const FdHello hello = helloFrom(kImpersonated, kVictim, directory.secret[kImpersonated]);
      if (rank == kImpersonated) {
        child_outcome = attackFromChild(directory.name[kVictim], hello, foreign.get());
      }
      if (rank == kVictim || rank == 2) {
        UniqueFd socket = connectTo(directory.name[kVictim]);
        sent = socket.get() >= 0 && sendRaw(socket.get(), hello, sizeof(hello), foreign.get());
      }
      world().barrier();
    };
    exchangeAndCheck(world(), 11, options);
  }
  EXPECT_TRUE(sent);
  EXPECT_EQ(child_outcome, kAttackSent);
  if (rank == kVictim) {
    const auto from_outside =
        std::count_if(report.refused.begin(), report.refused.end(), [](const std::string& line) {
          return contains(line, "not the process of any local rank");
        });
    EXPECT_EQ(from_outside, 2) << refusals(report);  // rank 1's child and rank 0 itself
    if (world().size() >= 3) {
      EXPECT_TRUE(anyRefusalContains(report, "claims rank 1, whose pid is")) << refusals(report);
    }
  }
  EXPECT_EQ(countOpenFds(), start) << "refused fds and sockets must be closed";
}

// (c) Every rank opens, to every local peer, one connection that says nothing and one that
// stops half-way through a hello (both from the right process, with the right secret), and
// keeps them open. The exchange must still finish in a fraction of the deadline, and close them.
TEST(FdExchange, SilentConnectorsDoNotStallIt) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int rank = world().rank();
  std::vector<UniqueFd> silent;
  FdExchangeOptions options;
  options.before_exchange = [&](const FdExchangeDirectory& directory) {
    for (int peer : world().localRanks()) {
      if (peer == rank) continue;
      silent.push_back(connectTo(directory.name[static_cast<size_t>(peer)]));
      UniqueFd half = connectTo(directory.name[static_cast<size_t>(peer)]);
      const FdHello hello = helloFrom(rank, peer, directory.secret[static_cast<size_t>(rank)]);
      EXPECT_TRUE(half.get() >= 0 && sendRaw(half.get(), hello, sizeof(hello) / 2, -1));
      silent.push_back(std::move(half));
    }
    world().barrier();
  };
  const auto began = Clock::now();
  exchangeAndCheck(world(), 12, options);
  const double took = std::chrono::duration<double>(Clock::now() - began).count();
  EXPECT_LT(took, kFdTimeoutS / 3) << "silent connections stalled the exchange";
  // The peers hung up on them when they finished (end of file, not a lingering connection).
  for (const UniqueFd& fd : silent) {
    ASSERT_GE(fd.get(), 0);
    pollfd entry{fd.get(), POLLIN, 0};
    ASSERT_EQ(::poll(&entry, 1, 10000), 1);
    char byte = 0;
    EXPECT_EQ(::recv(fd.get(), &byte, 1, MSG_DONTWAIT), 0);
  }
}

// (d) Something already holds the name a rank draws first: the rank takes another random name
// and publishes that one. If every name it tries is taken, every rank fails at once.
TEST(FdExchange, PicksAnotherNameWhenItsNameIsSquatted) {
  const int rank = world().rank();
  const std::string squatted = "epcomm-squatted-" + std::to_string(::getpid());
  socklen_t length = 0;
  const sockaddr_un address = abstractAddress(squatted, &length);
  UniqueFd squatter(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  ASSERT_GE(squatter.get(), 0);
  ASSERT_EQ(::bind(squatter.get(), reinterpret_cast<const sockaddr*>(&address), length), 0);
  ASSERT_EQ(::listen(squatter.get(), 8), 0);

  FdExchangeReport report;
  FdExchangeOptions options;
  options.report = &report;
  options.listen_name = [&](int attempt) { return attempt == 0 ? squatted : std::string(); };
  exchangeAndCheck(world(), 13, options);
  if (world().localSize() > 1) {
    EXPECT_EQ(report.listen_attempts, 2);
    EXPECT_NE(report.listen_name, squatted);
    EXPECT_EQ(report.listen_name.rfind("epcomm-", 0), 0u) << report.listen_name;
    EXPECT_EQ(report.listen_name.size(), 7u + 32u) << report.listen_name;
  }
  // Nobody connected to the squatter.
  EXPECT_LT(::accept4(squatter.get(), nullptr, nullptr, SOCK_CLOEXEC), 0);
  EXPECT_EQ(errno, EAGAIN);

  // Every name rank 1 tries is taken.
  if (world().size() < 2) return;
  options.listen_name = [&](int) { return rank == kImpersonated ? squatted : std::string(); };
  UniqueFd mine = makeMemfd("unused");
  const auto began = Clock::now();
  try {
    exchangeFds(world(), mine.get(), kFdTimeoutS, options);
    ADD_FAILURE() << "rank " << rank << ": exchange succeeded although rank 1 could not listen";
  } catch (const SystemError& e) {
    EXPECT_EQ(rank, kImpersonated) << e.what();
    EXPECT_EQ(e.errnoValue(), EADDRINUSE) << e.what();
    EXPECT_TRUE(contains(e.what(), "all in use")) << e.what();
  } catch (const Error& e) {
    EXPECT_NE(rank, kImpersonated) << e.what();
    EXPECT_EQ(e.code(), ErrorCode::kRemote) << e.what();
    EXPECT_TRUE(contains(e.what(), "rank(s) 1 ")) << e.what();
  }
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - began).count(), kFdTimeoutS / 2);
}

// (e) A process of another user (root drops to uid 65534) connects to rank 0 and claims rank 1
// with the right secret: refused on its uid, and the exchange succeeds.
TEST(FdExchange, RefusesAnotherUser) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  if (::getuid() != 0) GTEST_SKIP() << "needs root to start a process of another uid";
  constexpr int kNobody = 65534;
  const int rank = world().rank();
  FdExchangeReport report;
  int child_outcome = kAttackSent;
  {
    UniqueFd foreign = makeMemfd("foreign: another user's buffer");
    FdExchangeOptions options;
    options.report = &report;
    options.before_exchange = [&](const FdExchangeDirectory& directory) {
      if (rank == kImpersonated) {
        const FdHello hello = helloFrom(kImpersonated, kVictim, directory.secret[kImpersonated]);
        child_outcome = attackFromChild(directory.name[kVictim], hello, foreign.get(), kNobody);
      }
      world().barrier();
    };
    exchangeAndCheck(world(), 14, options);
  }
  const int outcome = child_outcome;
  std::vector<int> outcomes(static_cast<size_t>(world().size()));
  world().allGather(&outcome, outcomes.data(), sizeof(int));
  if (outcomes[kImpersonated] == kAttackNoSetuid) {
    GTEST_SKIP() << "this root cannot change its uid (no CAP_SETUID?)";
  }
  EXPECT_EQ(outcomes[kImpersonated], kAttackSent);
  if (rank == kVictim) {
    EXPECT_TRUE(anyRefusalContains(report, "uid 65534: another user")) << refusals(report);
  }
}

TEST(FdExchange, SecretsCompareEveryByte) {
  FdSecret a{};
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<uint8_t>(i * 7 + 1);
  EXPECT_TRUE(memory::secretsEqual(a, a));
  for (size_t i = 0; i < a.size(); ++i) {
    FdSecret b = a;
    b[i] ^= 0x80;
    EXPECT_FALSE(memory::secretsEqual(a, b)) << "byte " << i;
  }
}

TEST(UniqueFd, OwnsMovesAndCloses) {
  int pipe_fds[2] = {-1, -1};
  ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
  UniqueFd a(pipe_fds[0]);
  UniqueFd b(pipe_fds[1]);
  UniqueFd moved(std::move(a));
  EXPECT_EQ(a.get(), -1);  // NOLINT(bugprone-use-after-move): moved-from state is specified
  EXPECT_EQ(moved.get(), pipe_fds[0]);
  moved = std::move(b);  // closes the read end
  EXPECT_EQ(::fcntl(pipe_fds[0], F_GETFD), -1);
  EXPECT_EQ(moved.get(), pipe_fds[1]);
  UniqueFd& same = moved;
  moved = std::move(same);  // self-move keeps the fd
  EXPECT_EQ(moved.get(), pipe_fds[1]);
  const int raw = moved.release();
  EXPECT_EQ(moved.get(), -1);
  moved.reset(raw);
  moved.reset(raw);  // same fd again: must not close it
  EXPECT_GE(::fcntl(raw, F_GETFD), 0);
  moved.reset();
  EXPECT_EQ(::fcntl(raw, F_GETFD), -1);
}

}  // namespace
}  // namespace epcomm
