// SPDX-License-Identifier: Apache-2.0
// Symmetric buffer across ranks (run with 2, 4 and 8 ranks; several ranks may share a GPU):
// every memory mode the machine supports moves a (src, dst, offset)-coded pattern through the
// peer pointer table; forced modes that cannot work, size mismatches and a missing rank fail
// cleanly on every rank; create/destroy leaks nothing. Agreement: creation succeeds or fails on
// every rank; a call one rank rejects stops on every rank and leaves the buffer usable; stale
// handles are refused; teardown is bounded while a kernel of the buffer still waits.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/call_outcome.hpp"
#include "common/gpu_helpers.hpp"
#include "common/reference.hpp"
#include "common/test_data.hpp"
#include "common/test_env.hpp"
#include "epcomm/epcomm.hpp"

namespace epcomm::test {
namespace {

constexpr size_t kWordsPerSlice = 64 * 1024;  // 256 KiB from every rank to every rank

BufferConfig smallConfig(MemMode mode) {
  BufferConfig config;
  config.hidden = 512;
  config.num_experts = 16;  // divides every registered rank count (1..16)
  config.max_topk = 2;
  config.max_tokens_per_rank = 16;
  config.mem_mode = mode;
  config.timeout_s = 20;
  // One slice per rank of the job (not kMaxRanks: 72 slices would be 72 MiB per rank).
  config.scratch_bytes =
      kWordsPerSlice * sizeof(uint32_t) * static_cast<size_t>(mpiBootstrap()->size());
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
    GTEST_SKIP() << memModeName(mode)
                 << " is not usable here (failed cleanly on every rank): " << why;
  }
  if (mode != MemMode::kAuto) {
    EXPECT_EQ(buffer->memMode(), mode);
  }
  if (bs.rank() == 0) {
    std::printf("[rank 0] mode %s: buffer of %zu bytes per rank\n", memModeName(buffer->memMode()),
                buffer->bytesPerRank());
  }
  checkPattern(*buffer);
  // And once more, to exercise the barrier's epochs.
  checkPattern(*buffer);
}

TEST(SymmetricBuffer, PatternAuto) {
  patternTest(MemMode::kAuto);
}
TEST(SymmetricBuffer, PatternPosixFd) {
  patternTest(MemMode::kPosixFd);
}
TEST(SymmetricBuffer, PatternCudaIpc) {
  patternTest(MemMode::kCudaIpc);
}
// On the 2x H200 node (no IMEX channel) this checks the clean failure on every rank.
TEST(SymmetricBuffer, PatternFabricOrCleanFailure) {
  patternTest(MemMode::kFabric);
}

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
        EXPECT_NE(std::string(e.what()).find("rank " + std::to_string(missing)), std::string::npos)
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
                                << kCycles << " create/destroy cycles (mode " << memModeName(mode)
                                << ")";
  EXPECT_EQ(fds_after, fds_before) << "open fds changed over " << kCycles << " cycles";
}

// --- Agreement and recovery (issue 9 items 8, 10, 12, 13) --------------------------------------

constexpr int kTopk = 2;
constexpr int kTokens = 12;

ProblemSpec problemOf(const EpBuffer& buffer, uint64_t seed) {
  ProblemSpec spec;
  spec.num_ranks = buffer.numRanks();
  spec.hidden = buffer.config().config.hidden;
  spec.num_experts = buffer.config().config.num_experts;
  spec.num_topk = kTopk;
  spec.tokens_per_rank.assign(spec.num_ranks, kTokens);
  spec.seed = seed;
  return spec;
}

// This rank's generated inputs on the device.
struct Inputs {
  std::vector<RankInputs> all;
  const RankInputs& in;
  DeviceArray<uint16_t> x;
  DeviceArray<int64_t> idx;
  DeviceArray<float> weights;

  Inputs(const EpBuffer& buffer, uint64_t seed)
      : all(generateProblem(problemOf(buffer, seed))),
        in(all[buffer.rank()]),
        x(in.x_bf16),
        idx(in.topk_idx),
        weights(in.topk_weights) {}

  TopkView topk() const {
    TopkView t;
    t.idx = idx.get();
    t.idx_type = IndexType::kInt64;
    t.num_tokens = in.num_tokens;
    t.num_topk = kTopk;
    return t;
  }
  DispatchArgs dispatchArgs() const {
    DispatchArgs a;
    a.x = x.get();
    a.num_tokens = in.num_tokens;
    a.topk = topk();
    a.topk_weights = weights.get();
    return a;
  }
  LlDispatchArgs llArgs() const {
    LlDispatchArgs a;
    a.x = x.get();
    a.num_tokens = in.num_tokens;
    a.topk = topk();
    a.topk_weights = weights.get();
    return a;
  }
};

// One HT dispatch + combine on `buffer`, checked against the CPU reference: the received rows
// exactly, and combine(x = the received rows) within the combine tolerance.
void checkHtRound(EpBuffer& buffer, EpHandle& handle, cudaStream_t stream, uint64_t seed,
                  const std::string& where) {
  SCOPED_TRACE(where + ", rank " + std::to_string(buffer.rank()));
  const Inputs data(buffer, seed);
  const int hidden = buffer.config().config.hidden;
  const int experts = buffer.config().config.num_experts;
  const DispatchResult r = buffer.dispatch(data.dispatchArgs(), handle, stream);
  buffer.sync(stream);
  std::vector<std::vector<uint16_t>> received(buffer.numRanks());
  for (int d = 0; d < buffer.numRanks(); ++d) {
    received[d] = referenceHtDispatch(data.all, d, hidden, experts, kTopk, 1).recv_x_bf16;
  }
  const HtDispatchRef ref = referenceHtDispatch(data.all, buffer.rank(), hidden, experts, kTopk, 1);
  ASSERT_EQ(DeviceArray<int32_t>::downloadFrom(r.num_recv_tokens, 1)[0], ref.num_recv);
  const std::vector<uint16_t> rows =
      DeviceArray<uint16_t>::downloadFrom(r.recv_x, size_t(ref.num_recv) * hidden);
  EXPECT_TRUE(compareBf16Exact(rows.data(), ref.recv_x_bf16.data(), ref.num_recv, hidden, true));

  DeviceArray<uint16_t> out(size_t(kTokens) * hidden);
  out.poison();
  CombineArgs args;
  args.x = r.recv_x;
  args.out = out.get();
  buffer.combine(args, handle, stream);
  buffer.sync(stream);
  const std::vector<float> expected =
      referenceHtCombine(data.all, buffer.rank(), received, hidden, experts, kTopk, false, nullptr);
  EXPECT_TRUE(compareBf16Near(out.download(size_t(kTokens) * hidden), expected, hidden));
}

// Rank `culprit` throws InvalidArgument from its call, every other rank kRemote naming the
// culprit from the call or the sync after it, all within seconds (never by timeout).
void expectRejectedEverywhere(const CallOutcome& o, int culprit, const std::string& argument) {
  const int me = mpiBootstrap()->rank();
  ASSERT_TRUE(o.threw) << "rank " << me << " finished a call that rank " << culprit << " rejected";
  if (me == culprit) {
    EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << o.what;
    EXPECT_NE(o.what.find(argument), std::string::npos) << o.what;
    EXPECT_NE(o.what.find("stays usable"), std::string::npos) << o.what;
  } else {
    EXPECT_EQ(o.code, ErrorCode::kRemote) << o.what;
    EXPECT_NE(o.what.find("rank " + std::to_string(culprit)), std::string::npos) << o.what;
    EXPECT_NE(o.what.find("still usable"), std::string::npos) << o.what;
  }
  EXPECT_LT(o.seconds, 10.0) << "rank " << me << " waited instead of stopping: " << o.what;
}

BufferConfig agreementConfig() {
  BufferConfig config = smallConfig(MemMode::kAuto);
  config.ll_max_tokens_per_rank = kTokens;
  config.timeout_s = 20;
  return config;
}

TEST(Agreement, RejectedHtCallsLeaveTheBufferUsableOnEveryRank) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  selectDevice(bs);
  const int culprit = 1;
  const int me = bs.rank();
  EpBuffer buffer(bs, agreementConfig());
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  checkHtRound(buffer, handle, stream.get(), 21, "before any rejection");

  // 1. Rank 1 passes bad input to dispatch; the others' dispatch stops with kRemote.
  {
    const Inputs data(buffer, 22);
    DispatchArgs args = data.dispatchArgs();
    if (me == culprit) args.expert_alignment = 0;
    expectRejectedEverywhere(runTimed([&] {
                               buffer.dispatch(args, handle, stream.get());
                               buffer.sync(stream.get());
                             }),
                             culprit, "expert_alignment");
  }
  checkHtRound(buffer, handle, stream.get(), 23, "after a rejected dispatch");

  // 2. After a good dispatch, rank 1 passes bad input to combine.
  {
    const Inputs data(buffer, 24);
    const DispatchResult r = buffer.dispatch(data.dispatchArgs(), handle, stream.get());
    buffer.sync(stream.get());
    DeviceArray<uint16_t> out(size_t(kTokens) * buffer.config().config.hidden);
    CombineArgs args;
    args.x = r.recv_x;
    args.out = me == culprit ? nullptr : out.get();
    expectRejectedEverywhere(runTimed([&] {
                               buffer.combine(args, handle, stream.get());
                               buffer.sync(stream.get());
                             }),
                             culprit, "CombineArgs::out");
  }
  checkHtRound(buffer, handle, stream.get(), 25, "after a rejected combine");

  // 3. Two rejections in a row, then normal work again; the error is raised once per call.
  for (int i = 0; i < 2; ++i) {
    const Inputs data(buffer, 26);
    DispatchArgs args = data.dispatchArgs();
    if (me == culprit) args.num_sms = 100000;
    expectRejectedEverywhere(runTimed([&] {
                               buffer.dispatch(args, handle, stream.get());
                               buffer.sync(stream.get());
                             }),
                             culprit, "num_sms");
  }
  EXPECT_NO_THROW(buffer.synchronizingBarrier(stream.get()));
  checkHtRound(buffer, handle, stream.get(), 27, "after two rejected dispatches");
}

TEST(Agreement, RejectedLlDispatchLeavesTheBufferUsableOnEveryRank) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  selectDevice(bs);
  const int culprit = 1;
  const int me = bs.rank();
  EpBuffer buffer(bs, agreementConfig());
  TestStream stream;
  const int hidden = buffer.config().config.hidden;
  const int experts = buffer.config().config.num_experts;

  // One LL round, checked: per-expert counts, and combine(x = the received rows) against the
  // reference (the "expert output" of row (s, t) is token t of rank s itself).
  auto checkLlRound = [&](uint64_t seed, const std::string& where) {
    SCOPED_TRACE(where + ", rank " + std::to_string(me));
    const Inputs data(buffer, seed);
    const LlDispatchResult r = buffer.lowLatencyDispatch(data.llArgs(), stream.get());
    buffer.sync(stream.get());
    const LlDispatchRef ref = referenceLlDispatch(data.all, me, experts, kTopk);
    const std::vector<int32_t> counts = DeviceArray<int32_t>::downloadFrom(
        r.num_recv_tokens_per_expert, size_t(buffer.numLocalExperts()));
    for (int e = 0; e < buffer.numLocalExperts(); ++e) {
      EXPECT_EQ(counts[e], static_cast<int>(ref.per_local_expert[e].src_rank.size()))
          << "local expert " << e;
    }
    DeviceArray<uint16_t> out(size_t(kTokens) * hidden);
    out.poison();
    LlCombineArgs args;
    args.x = r.recv_x;
    args.out = out.get();
    buffer.lowLatencyCombine(args, stream.get());
    buffer.sync(stream.get());
    const std::vector<float> expected = referenceLlCombine(
        data.all, me, experts, kTopk,
        [&](int, int s, int t, int col) {
          return bf16ToFloat(data.all[s].x_bf16[size_t(t) * hidden + col]);
        },
        hidden);
    EXPECT_TRUE(compareBf16Near(out.download(size_t(kTokens) * hidden), expected, hidden));
  };

  checkLlRound(31, "before any rejection");
  {
    const Inputs data(buffer, 32);
    LlDispatchArgs args = data.llArgs();
    if (me == culprit) args.num_tokens = args.topk.num_tokens = kTokens + 1;
    expectRejectedEverywhere(runTimed([&] {
                               buffer.lowLatencyDispatch(args, stream.get());
                               buffer.sync(stream.get());
                             }),
                             culprit, "LlDispatchArgs::num_tokens");
  }
  // The abandoned round leaves every rank ready for a new dispatch (not a combine).
  checkLlRound(33, "after a rejected LL dispatch");
  checkLlRound(34, "twice");
}

TEST(Agreement, StaleOrForeignHandleIsInvalidArgument) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  selectDevice(bs);
  TestStream stream;
  // A handle of a buffer that no longer exists, even if a new buffer gets the same address.
  auto first = std::make_unique<EpBuffer>(bs, agreementConfig());
  EpHandle stale = first->createHandle();
  first.reset();
  EpBuffer buffer(bs, agreementConfig());
  const Inputs data(buffer, 41);
  try {
    buffer.dispatch(data.dispatchArgs(), stale, stream.get());
    ADD_FAILURE() << "a handle of a destroyed buffer was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("handle"), std::string::npos) << e.what();
  }
  // A handle of another live buffer.
  EpBuffer other(bs, agreementConfig());
  EpHandle foreign = other.createHandle();
  try {
    buffer.dispatch(data.dispatchArgs(), foreign, stream.get());
    ADD_FAILURE() << "a handle of another buffer was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("handle"), std::string::npos) << e.what();
  }
  // Both were rejected on every rank before any launch: the buffer works on.
  EpHandle mine = buffer.createHandle();
  checkHtRound(buffer, mine, stream.get(), 42, "after rejected handles");
}

TEST(Agreement, CreationFailureOnOneRankFailsEveryRank) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  selectDevice(bs);
  const int culprit = bs.size() - 1;
  BufferConfig config = agreementConfig();
  if (bs.rank() == culprit) config.device = 4096;  // no such device
  const CallOutcome o = runTimed([&] { EpBuffer buffer(bs, config); });
  ASSERT_TRUE(o.threw) << "rank " << bs.rank() << " created its buffer, rank " << culprit
                       << " could not";
  EXPECT_EQ(o.code, ErrorCode::kInvalidArgument) << o.what;
  EXPECT_NE(o.what.find("BufferConfig::device"), std::string::npos) << o.what;
  if (bs.rank() != culprit) {
    EXPECT_NE(o.what.find("rank " + std::to_string(culprit)), std::string::npos) << o.what;
  }
  EXPECT_LT(o.seconds, 5.0) << o.what;
  // And creation works again afterwards.
  EXPECT_NO_THROW({ EpBuffer again(bs, agreementConfig()); });
}

// Issue 10 item 10: the first call of each op family waits up to first_op_timeout_s (a rank may
// lag minutes before its first layer), later calls up to timeout_s.
TEST(Deadlines, FirstCallOfAFamilyGetsTheLongerDeadline) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  selectDevice(bs);
  BufferConfig config = agreementConfig();
  config.timeout_s = 1;
  config.first_op_timeout_s = 10;
  EpBuffer buffer(bs, config);
  EpHandle handle = buffer.createHandle();
  TestStream stream;
  const int late = bs.size() - 1;
  // First HT dispatch and combine: the late rank is 2.5 s late, within first_op_timeout_s.
  if (bs.rank() == late) std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  checkHtRound(buffer, handle, stream.get(), 51, "first calls, one rank 2.5 s late");
  if (anyRankFailed()) return;
  // The second dispatch has only timeout_s: the same lag is a timeout now.
  const Inputs data(buffer, 52);
  if (bs.rank() == late) std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  const CallOutcome o = runTimed([&] {
    buffer.dispatch(data.dispatchArgs(), handle, stream.get());
    buffer.sync(stream.get());
  });
  EXPECT_TRUE(o.threw) << "rank " << bs.rank() << ": a 2.5 s lag passed a 1 s deadline";
  if (bs.rank() != late) {
    EXPECT_EQ(o.code, ErrorCode::kTimeout) << o.what;
    EXPECT_NE(o.what.find("timeout_s"), std::string::npos) << o.what;
  }
  bs.barrier();
}

TEST(Teardown, BoundedWhileAKernelOfOursWaits) {
  EPCOMM_REQUIRE_GPU();
  Bootstrap& bs = *mpiBootstrap();
  if (bs.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  selectDevice(bs);
  BufferConfig config = agreementConfig();
  config.timeout_s = 3;
  auto buffer = std::make_unique<EpBuffer>(bs, config);
  TestStream stream;
  // Rank 0 enters a barrier nobody else enters and destroys the buffer without waiting.
  if (bs.rank() == 0) buffer->barrier(stream.get());
  const auto start = std::chrono::steady_clock::now();
  buffer.reset();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, config.timeout_s + 10.0) << "teardown was not bounded by the deadline";
  // CUDA still works in this process.
  DeviceArray<uint32_t> probe(16);
  EPCOMM_TEST_CUDA(cudaMemsetAsync(probe.get(), 0x22, 64, stream.get()));
  EPCOMM_TEST_CUDA(cudaStreamSynchronize(stream.get()));
  EXPECT_EQ(probe.download(1)[0], 0x22222222u);
}

}  // namespace
}  // namespace epcomm::test
