// Symmetric buffer across ranks (run with 2, 4 and 8 ranks; several ranks may share a GPU):
// every memory mode the machine supports moves a (src, dst, offset)-coded pattern through the
// peer pointer table; forced modes that cannot work, size mismatches and a missing rank fail
// cleanly on every rank; create/destroy leaks nothing.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "common/gpu_helpers.hpp"
#include "common/test_env.hpp"
#include "epcomm/epcomm.hpp"

namespace epcomm::test {
namespace {

constexpr size_t kWordsPerSlice = 64 * 1024;  // 256 KiB from every rank to every rank

BufferConfig smallConfig(MemMode mode) {
  BufferConfig config;
  config.hidden = 512;
  config.num_experts = 8;
  config.max_topk = 2;
  config.max_tokens_per_rank = 16;
  config.mem_mode = mode;
  config.timeout_s = 20;
  config.scratch_bytes = kWordsPerSlice * 4 * kMaxRanks;
  return config;
}

// True on every rank if `value` is true on every rank.
bool allRanks(bool value) {
  Bootstrap& bs = *mpiBootstrap();
  std::vector<uint8_t> all(bs.size());
  uint8_t mine = value ? 1 : 0;
  bs.allGather(&mine, all.data(), 1);
  for (uint8_t v : all) {
    if (!v) return false;
  }
  return true;
}

void checkPattern(EpBuffer& buffer) {
  const int rank = buffer.rank();
  const int num_ranks = buffer.numRanks();
  cudaStream_t stream;
  EPCOMM_TEST_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  char* scratch = static_cast<char*>(buffer.peerBase(rank)) + buffer.scratchOffset();
  poisonDevice(scratch, buffer.scratchBytes(), stream);
  EPCOMM_TEST_CUDA(cudaStreamSynchronize(stream));
  buffer.synchronizingBarrier(stream);  // every rank poisoned before anyone writes
  launchWritePattern(buffer.devicePeerBases(), buffer.scratchOffset(), rank, num_ranks,
                     kWordsPerSlice, stream);
  buffer.synchronizingBarrier(stream);  // every rank's stores are visible after this
  std::vector<uint32_t> words =
      DeviceArray<uint32_t>::downloadFrom(scratch, kWordsPerSlice * num_ranks);
  int bad = 0;
  for (int src = 0; src < num_ranks; ++src) {
    for (size_t i = 0; i < kWordsPerSlice; ++i) {
      const uint32_t expected = patternWord(src, rank, i);
      const uint32_t actual = words[src * kWordsPerSlice + i];
      if (actual != expected && bad++ < 5) {
        ADD_FAILURE() << "rank " << rank << ": word " << i << " from rank " << src << " is 0x"
                      << std::hex << actual << ", expected 0x" << expected;
      }
    }
  }
  EXPECT_EQ(bad, 0) << "rank " << rank << " received " << bad << " wrong words";
  EPCOMM_TEST_CUDA(cudaStreamDestroy(stream));
}

// Creates a buffer in `mode`; on failure checks it failed on every rank with kUnsupported.
void patternTest(MemMode mode) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  std::unique_ptr<EpBuffer> buffer;
  std::string why;
  try {
    buffer = std::make_unique<EpBuffer>(bs, smallConfig(mode));
  } catch (const Error& e) {
    why = e.what();
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported) << why;
  }
  // Either every rank has a buffer or none has.
  const bool created = buffer != nullptr;
  const bool all_created = allRanks(created);
  const bool none_created = allRanks(!created);
  ASSERT_TRUE(all_created || none_created) << "ranks disagree: " << why;
  if (!created) {
    ASSERT_NE(mode, MemMode::kAuto) << why;
    EXPECT_NE(why.find(memModeName(mode)), std::string::npos) << why;
    GTEST_SKIP() << memModeName(mode) << " is not usable here (failed cleanly on every rank): "
                 << why;
  }
  if (mode != MemMode::kAuto) {
    EXPECT_EQ(buffer->memMode(), mode);
  }
  if (bs.rank() == 0) {
    std::printf("[rank 0] mode %s: buffer of %zu bytes per rank\n",
                memModeName(buffer->memMode()), buffer->bytesPerRank());
  }
  checkPattern(*buffer);
  // And once more, to exercise the barrier's epochs.
  checkPattern(*buffer);
}

TEST(SymmetricBuffer, PatternAuto) { patternTest(MemMode::kAuto); }
TEST(SymmetricBuffer, PatternPosixFd) { patternTest(MemMode::kPosixFd); }
TEST(SymmetricBuffer, PatternCudaIpc) { patternTest(MemMode::kCudaIpc); }
// On the 2x H200 node (no IMEX channel) this checks the clean failure on every rank.
TEST(SymmetricBuffer, PatternFabricOrCleanFailure) { patternTest(MemMode::kFabric); }

TEST(SymmetricBuffer, EnvironmentForcesMode) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  setenv("EPCOMM_MEM_MODE", "cuda_ipc", 1);
  {
    EpBuffer buffer(bs, smallConfig(MemMode::kAuto));
    EXPECT_EQ(buffer.memMode(), MemMode::kCudaIpc);
  }
  unsetenv("EPCOMM_MEM_MODE");
}

TEST(SymmetricBuffer, SizeMismatchFailsOnEveryRank) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  selectDevice(bs);
  BufferConfig config = smallConfig(MemMode::kAuto);
  if (bs.rank() == bs.size() - 1) config.scratch_bytes += 8 << 20;
  bool threw = false;
  try {
    EpBuffer buffer(bs, config);
  } catch (const InvalidArgument& e) {
    threw = true;
    EXPECT_NE(std::string(e.what()).find("differs across ranks"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(threw) << "rank " << bs.rank() << " accepted a mismatched buffer size";
  EXPECT_TRUE(allRanks(threw));
}

TEST(SymmetricBuffer, MissingRankTimesOutAndCudaStaysUsable) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  selectDevice(bs);
  BufferConfig config = smallConfig(MemMode::kAuto);
  config.timeout_s = 2.0;
  const int missing = bs.size() - 1;
  {
    EpBuffer buffer(bs, config);
    cudaStream_t stream;
    EPCOMM_TEST_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    if (bs.rank() != missing) {
      const auto start = std::chrono::steady_clock::now();
      try {
        buffer.synchronizingBarrier(stream);
        ADD_FAILURE() << "the barrier passed although rank " << missing << " never entered it";
      } catch (const TimeoutError& e) {
        EXPECT_EQ(e.peer(), missing) << e.what();
        EXPECT_NE(std::string(e.what()).find("rank " + std::to_string(missing)),
                  std::string::npos)
            << e.what();
      }
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      EXPECT_LT(seconds, 2.0 * 1.5 + 5.0 + 1.0);
      // The buffer is unusable now, with a clear error.
      try {
        buffer.barrier(stream);
        ADD_FAILURE() << "a broken buffer accepted another barrier";
      } catch (const Error& e) {
        EXPECT_TRUE(e.code() == ErrorCode::kTimeout || e.code() == ErrorCode::kBroken) << e.what();
      }
    }
    // CUDA still works in every process: run a kernel and read its result.
    DeviceArray<uint32_t> probe(1024);
    EPCOMM_TEST_CUDA(cudaMemsetAsync(probe.get(), 0x11, 1024 * 4, stream));
    EPCOMM_TEST_CUDA(cudaStreamSynchronize(stream));
    EXPECT_EQ(probe.download(1)[0], 0x11111111u);
    EPCOMM_TEST_CUDA(cudaStreamDestroy(stream));
  }
}

TEST(SymmetricBuffer, AbortEndsAWaitBeforeTheDeadline) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  selectDevice(bs);
  BufferConfig config = smallConfig(MemMode::kAuto);
  config.timeout_s = 60;
  EpBuffer buffer(bs, config);
  cudaStream_t stream;
  EPCOMM_TEST_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  if (bs.rank() == 0) {
    // Rank 0 waits in a barrier nobody else enters; the host aborts it after 300 ms.
    const auto start = std::chrono::steady_clock::now();
    buffer.barrier(stream);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    buffer.abort();
    try {
      buffer.sync(stream);
      ADD_FAILURE() << "the aborted barrier completed";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("abort"), std::string::npos) << e.what();
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(seconds, 10.0);
  }
  EPCOMM_TEST_CUDA(cudaStreamDestroy(stream));
}

TEST(SymmetricBuffer, CreateDestroyLeaksNothing) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  const int device = selectDevice(bs);
  (void)device;
  // Warm up the context and the first buffer so one-time allocations are excluded.
  { EpBuffer warm(bs, smallConfig(MemMode::kAuto)); }
  EPCOMM_TEST_CUDA(cudaDeviceSynchronize());
  bs.barrier();
  size_t free_before = 0, total = 0;
  EPCOMM_TEST_CUDA(cudaMemGetInfo(&free_before, &total));
  const int fds_before = openFdCount();
  bs.barrier();
  constexpr int kCycles = 200;
  MemMode mode = MemMode::kAuto;
  for (int i = 0; i < kCycles; ++i) {
    EpBuffer buffer(bs, smallConfig(MemMode::kAuto));
    mode = buffer.memMode();
  }
  EPCOMM_TEST_CUDA(cudaDeviceSynchronize());
  bs.barrier();  // every rank has freed before anyone measures
  size_t free_after = 0;
  EPCOMM_TEST_CUDA(cudaMemGetInfo(&free_after, &total));
  const int fds_after = openFdCount();
  bs.barrier();
  // One leaked buffer is >= 2 MiB (the allocation granularity), so 200 cycles would leak far
  // more than this slack for driver bookkeeping.
  const long long leaked = static_cast<long long>(free_before) - static_cast<long long>(free_after);
  EXPECT_LT(leaked, 16ll << 20) << "device memory in use grew by " << leaked << " bytes over "
                                << kCycles << " create/destroy cycles (mode "
                                << memModeName(mode) << ")";
  EXPECT_EQ(fds_after, fds_before) << "open fds changed over " << kCycles << " cycles";
}

}  // namespace
}  // namespace epcomm::test
