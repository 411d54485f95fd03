// SPDX-License-Identifier: Apache-2.0
// One process, one GPU: the driver entry points, a one-rank EpBuffer over a CallbackBootstrap,
// its device barrier and error surfacing, and a one-rank dispatch/combine round trip against the
// reference model.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "common/gpu_helpers.hpp"
#include "common/reference.hpp"
#include "common/test_data.hpp"
#include "common/test_env.hpp"
#include "epcomm/epcomm.hpp"
#include "memory/driver_api.hpp"

namespace epcomm::test {
namespace {

// A one-rank bootstrap: the all-gather is a copy.
CallbackBootstrap soloBootstrap() {
  return CallbackBootstrap(0, 1, [](const void* send, void* recv, size_t bytes) {
    if (bytes > 0) std::memcpy(recv, send, bytes);
  });
}

BufferConfig soloConfig() {
  BufferConfig config;
  config.hidden = 1024;
  config.num_experts = 16;
  config.max_topk = 4;
  config.max_tokens_per_rank = 128;
  config.ll_max_tokens_per_rank = 16;
  config.timeout_s = 10;
  config.scratch_bytes = 1 << 20;
  return config;
}

TEST(GpuSingle, DriverEntryPointsResolve) {
  EPCOMM_REQUIRE_GPU();
  const memory::DriverApi& api = memory::DriverApi::get();
  EXPECT_NE(api.memCreate, nullptr);
  EXPECT_NE(api.memImportFromShareableHandle, nullptr);
  EXPECT_NE(driverErrorName(800).find("CUDA_ERROR_NOT_PERMITTED"), std::string::npos)
      << driverErrorName(800);
}

TEST(GpuSingle, BufferBarrierAndPattern) {
  EPCOMM_REQUIRE_GPU();
  CallbackBootstrap bs = soloBootstrap();
  selectDevice(bs);
  EpBuffer buffer(bs, soloConfig());
  EXPECT_NE(buffer.memMode(), MemMode::kAuto);
  EXPECT_EQ(buffer.numRanks(), 1);
  EXPECT_GE(buffer.bytesPerRank(), buffer.scratchOffset() + buffer.scratchBytes());
  cudaStream_t stream;
  EPCOMM_TEST_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (int i = 0; i < 10; ++i) buffer.synchronizingBarrier(stream);
  const size_t words = 4096;
  char* scratch = static_cast<char*>(buffer.peerBase(0)) + buffer.scratchOffset();
  poisonDevice(scratch, words * 4, stream);
  launchWritePattern(buffer.devicePeerBases(), buffer.scratchOffset(), 0, 1, words, stream);
  buffer.synchronizingBarrier(stream);
  std::vector<uint32_t> got = DeviceArray<uint32_t>::downloadFrom(scratch, words);
  for (size_t i = 0; i < words; ++i) ASSERT_EQ(got[i], patternWord(0, 0, i)) << "word " << i;
  EPCOMM_TEST_CUDA(cudaStreamDestroy(stream));
}

TEST(GpuSingle, OneRankDispatchCombineRoundTrip) {
  EPCOMM_REQUIRE_GPU();
  CallbackBootstrap bs = soloBootstrap();
  selectDevice(bs);
  const BufferConfig config = soloConfig();
  EpBuffer buffer(bs, config);
  EpHandle handle = buffer.createHandle();
  ProblemSpec spec;
  spec.num_ranks = 1;
  spec.hidden = config.hidden;
  spec.num_experts = config.num_experts;
  spec.num_topk = 4;
  spec.tokens_per_rank = {100};
  spec.routing = Routing::kWithNegatives;
  spec.seed = 3;
  const std::vector<RankInputs> all = generateProblem(spec);
  const RankInputs& in = all[0];
  DeviceArray<uint16_t> x(in.x_bf16);
  DeviceArray<int64_t> idx(in.topk_idx);
  DeviceArray<float> weights(in.topk_weights);
  cudaStream_t stream;
  EPCOMM_TEST_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  DispatchArgs args;
  args.x = x.get();
  args.num_tokens = in.num_tokens;
  args.topk = {idx.get(), IndexType::kInt64, in.num_tokens, 4};
  args.topk_weights = weights.get();
  args.exact_count = true;
  DispatchResult r = buffer.dispatch(args, handle, stream);
  buffer.sync(stream);
  const HtDispatchRef ref = referenceHtDispatch(all, 0, config.hidden, config.num_experts, 4, 1);
  ASSERT_EQ(r.num_recv_tokens_host, ref.num_recv);
  std::vector<uint16_t> rows =
      DeviceArray<uint16_t>::downloadFrom(r.recv_x, size_t(ref.num_recv) * config.hidden);
  EXPECT_TRUE(
      compareBf16Exact(rows.data(), ref.recv_x_bf16.data(), ref.num_recv, config.hidden, true));

  DeviceArray<uint16_t> out(size_t(in.num_tokens) * config.hidden);
  out.poison();
  CombineArgs cargs;
  cargs.x = r.recv_x;
  cargs.scale_weights = weights.get();
  cargs.out = out.get();
  buffer.combine(cargs, handle, stream);
  buffer.sync(stream);
  std::vector<std::vector<uint16_t>> inputs = {rows};
  const std::vector<float> expected =
      referenceHtCombine(all, 0, inputs, config.hidden, config.num_experts, 4, true, nullptr);
  EXPECT_TRUE(compareBf16Near(out.download(expected.size()), expected, config.hidden));
  EPCOMM_TEST_CUDA(cudaStreamDestroy(stream));
}

TEST(GpuSingle, BadExpertIdIsReportedNotUsed) {
  EPCOMM_REQUIRE_GPU();
  CallbackBootstrap bs = soloBootstrap();
  selectDevice(bs);
  EpBuffer buffer(bs, soloConfig());
  EpHandle handle = buffer.createHandle();
  std::vector<int64_t> ids(8 * 4, 2);
  ids[5 * 4 + 2] = 1000;
  DeviceArray<int64_t> idx(ids);
  cudaStream_t stream;
  EPCOMM_TEST_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  buffer.layout({idx.get(), IndexType::kInt64, 8, 4}, handle, stream);
  try {
    buffer.sync(stream);
    ADD_FAILURE() << "expert id 1000 of 16 was not reported";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("token 5"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("1000"), std::string::npos) << e.what();
  }
  EPCOMM_TEST_CUDA(cudaStreamDestroy(stream));
}

}  // namespace
}  // namespace epcomm::test
