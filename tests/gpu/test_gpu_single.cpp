// SPDX-License-Identifier: Apache-2.0
// One process, one GPU: the driver entry points, a one-rank EpBuffer over a CallbackBootstrap,
// its device barrier and error surfacing, and a one-rank dispatch/combine round trip against the
// reference model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "common/gpu_helpers.hpp"
#include "common/reference.hpp"
#include "common/test_data.hpp"
#include "common/test_env.hpp"
#include "core/topology.hpp"
#include "epcomm/epcomm.hpp"
#include "kernels/launch.hpp"
#include "memory/driver_api.hpp"
#include "memory/nvlink_domain.hpp"

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

// The NVLink-domain query answers without throwing: a "fabric:<32 hex>/<clique>" key on a
// multi-node NVLink system, else a reason (an HGX H200 reports fabric state "not supported").
// Printed, so that the run records what this machine said.
TEST(GpuSingle, NvlinkDomainQueryAnswers) {
  EPCOMM_REQUIRE_GPU();
  std::string why;
  const std::optional<memory::NvlinkDomain> domain = memory::nvlinkDomainOf(0, &why);
  if (domain) {
    const std::string key = core::fabricDomainKeyText(domain->cluster_uuid, domain->clique_id);
    std::printf("NVLink domain of device 0: %s\n", key.c_str());
    EXPECT_NE(key, "fabric:00000000000000000000000000000000/" + std::to_string(domain->clique_id));
    EXPECT_TRUE(why.empty()) << why;
  } else {
    std::printf("NVLink domain of device 0: none: %s\n", why.c_str());
    EXPECT_FALSE(why.empty());
  }
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  std::string bad_why;
  EXPECT_FALSE(memory::nvlinkDomainOf(1 << 20, &bad_why).has_value());
  EXPECT_NE(bad_why.find("no PCI bus id for device 1048576"), std::string::npos) << bad_why;
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
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

// Issue 11 item 7: the layout kernel at rank counts past the old 8-rank limit, in one process
// (the layout kernel only talks to peers to announce a bad id, and every id here is valid or -1):
// masks of 1 to 3 words, one to nine 8-rank block scans, several tiles. Compared with the
// reference: each token's rank mask and slots, per-rank and per-expert counts, the int32 copy.
// source: where the routing comes from: top-k ids, the caller's is_token_in_rank (DeepEP layout,
// the layout-from-mask path: the mask is built from R bytes per token), or both (checked against
// each other).
enum class LayoutSource { kTopk, kMask, kBoth };
void checkLayoutAt(int num_ranks, int experts, int topk, int tokens, bool idx_is_64,
                   LayoutSource source = LayoutSource::kTopk) {
  SCOPED_TRACE(std::to_string(num_ranks) + " ranks, " + std::to_string(experts) + " experts, " +
               (idx_is_64 ? "int64" : "int32") + " ids, source " +
               std::to_string(static_cast<int>(source)));
  ProblemSpec spec;
  spec.num_ranks = num_ranks;
  spec.hidden = 128;
  spec.num_experts = experts;
  spec.num_topk = topk;
  spec.tokens_per_rank.assign(num_ranks, 1);
  spec.tokens_per_rank[0] = tokens;
  spec.routing = Routing::kWithNegatives;
  spec.negative_fraction = 0.1;
  spec.seed = 4000 + num_ranks;
  const RankInputs in = generateProblem(spec)[0];
  const LayoutRef ref = referenceLayout(in.topk_idx.data(), tokens, topk, experts, num_ranks);

  const int words = kernels::rankMaskWords(num_ranks);
  const size_t n = static_cast<size_t>(tokens), r = static_cast<size_t>(num_ranks);
  DeviceArray<int64_t> idx64(in.topk_idx);
  DeviceArray<int32_t> idx32(in.topk_idx32);
  DeviceArray<uint32_t> mask(n * words);
  const size_t num_tiles = static_cast<size_t>(kernels::layoutTiles(tokens));
  DeviceArray<int32_t> slot(n * r), rank_counts(r), expert_counts(experts), copy(n * topk),
      tiles(num_tiles * r), tile_experts(num_tiles * static_cast<size_t>(experts));
  DeviceArray<uint8_t> in_rank(n * r);
  // The scratch's contract: tile totals and the tile count zero before a call, and again after it
  // (the kernel zeroes them), so that the next call can use them.
  DeviceArray<uint32_t> tiles_done(std::vector<uint32_t>(1, 0u));
  const std::vector<int32_t> zero_tiles(num_tiles * r, 0);
  tiles.upload(zero_tiles);

  kernels::LayoutParams p{};
  p.topk_idx = idx_is_64 ? static_cast<const void*>(idx64.get()) : idx32.get();
  p.idx_is_64 = idx_is_64 ? 1 : 0;
  p.num_tokens = tokens;
  p.num_topk = topk;
  p.num_experts = experts;
  p.num_ranks = num_ranks;
  p.rank = 0;
  p.token_mask = mask.get();
  p.token_slot = slot.get();
  p.is_token_in_rank = reinterpret_cast<bool*>(in_rank.get());
  p.rank_counts = rank_counts.get();
  p.expert_counts = expert_counts.get();
  p.topk_copy = copy.get();
  p.tile_counts = tiles.get();
  p.tile_expert_counts = tile_experts.get();
  p.tiles_done = tiles_done.get();
  p.peers.timeout_ns = uint64_t{10} * 1000 * 1000 * 1000;  // the look-back's deadline
  // The caller's layout: the reference's, so no check of it can fault (a fault would need peers).
  std::vector<uint8_t> given_in_rank(ref.is_token_in_rank.begin(), ref.is_token_in_rank.end());
  DeviceArray<uint8_t> layout_in_rank(std::max<size_t>(given_in_rank.size(), 1));
  DeviceArray<int32_t> layout_ranks(ref.tokens_per_rank), layout_experts(ref.tokens_per_expert);
  if (source != LayoutSource::kTopk) {
    layout_in_rank.upload(given_in_rank);
    p.in_rank = reinterpret_cast<const bool*>(layout_in_rank.get());
    p.rank_counts_in = layout_ranks.get();
    p.expert_counts_in = layout_experts.get();
  }
  if (source == LayoutSource::kMask) p.topk_idx = nullptr;
  // Twice: the second call finds the scratch as the first left it. Every output (and the
  // per-tile histograms) poisoned before each: the layout writes its counts, never adds to them.
  // As an EpBuffer launches it: with programmatic dependent launch where the device has it.
  int device = 0, major = 0;
  EPCOMM_TEST_CUDA(cudaGetDevice(&device));
  EPCOMM_TEST_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  for (int call = 0; call < 2; ++call) {
    for (const auto* a : {&slot, &rank_counts, &expert_counts, &copy, &tile_experts}) a->poison();
    mask.poison();
    in_rank.poison();
    kernels::launchLayout(p, nullptr, major >= 9);
    EPCOMM_TEST_CUDA(cudaDeviceSynchronize());
    ASSERT_EQ(tiles.download(num_tiles * r), zero_tiles) << "call " << call;
    ASSERT_EQ(tiles_done.download(1), std::vector<uint32_t>(1, 0u)) << "call " << call;
  }

  EXPECT_EQ(rank_counts.download(r), ref.tokens_per_rank);
  EXPECT_EQ(expert_counts.download(experts), ref.tokens_per_expert);
  const std::vector<int32_t> slots = slot.download(n * r);
  const std::vector<uint8_t> in_ranks = in_rank.download(n * r);
  const std::vector<uint32_t> masks = mask.download(n * words);
  const std::vector<int32_t> copies = copy.download(n * topk);
  int max_dests = 0;
  for (size_t t = 0; t < n; ++t) {
    int dests = 0;
    for (size_t d = 0; d < r; ++d) {
      const size_t i = t * r + d;
      ASSERT_EQ(slots[i], ref.token_slot[i]) << "token " << t << " rank " << d;
      ASSERT_EQ(in_ranks[i], ref.is_token_in_rank[i]) << "token " << t << " rank " << d;
      const bool bit = (masks[t * words + d / 32] >> (d % 32)) & 1u;
      ASSERT_EQ(bit, ref.is_token_in_rank[i] != 0) << "mask of token " << t << " rank " << d;
      dests += bit;
    }
    for (int d = num_ranks; d < words * 32; ++d)
      ASSERT_EQ((masks[t * words + d / 32] >> (d % 32)) & 1u, 0u) << "token " << t << " bit " << d;
    for (int k = 0; k < topk && source != LayoutSource::kMask; ++k)
      ASSERT_EQ(copies[t * topk + k], in.topk_idx[t * topk + k]) << "token " << t << " k " << k;
    max_dests = std::max(max_dests, dests);
  }
  if (num_ranks > 8) {
    EXPECT_GT(max_dests, 8) << "tokens should reach more ranks than 8";
  }
}

TEST(GpuSingle, LayoutPastEightRanksMatchesReference) {
  EPCOMM_REQUIRE_GPU();
  CallbackBootstrap bs = soloBootstrap();
  selectDevice(bs);
  checkLayoutAt(8, 256, 8, 700, true);      // one word, one scan (the old limit)
  checkLayoutAt(16, 1024, 16, 1300, true);  // one word, two scans, three tiles
  checkLayoutAt(40, 960, 16, 1300, false);  // two words, five scans
  checkLayoutAt(72, 1008, 16, 1300, true);  // three words, nine scans
  checkLayoutAt(72, 576, 16, 513, false);   // a tile of one token after a full one
  checkLayoutAt(8, 256, 8, 512, true);      // one full tile: one kernel
  checkLayoutAt(40, 960, 16, 300, false);   // one partial tile, two words
  checkLayoutAt(8, 256, 8, 1, true);        // one token
  // The layout-from-mask path (DispatchArgs::layout): masks from is_token_in_rank's bytes.
  checkLayoutAt(8, 256, 8, 700, true, LayoutSource::kMask);
  checkLayoutAt(40, 960, 16, 1300, false, LayoutSource::kMask);
  checkLayoutAt(72, 1008, 16, 1300, true, LayoutSource::kMask);
  checkLayoutAt(72, 576, 16, 513, false, LayoutSource::kBoth);
  checkLayoutAt(16, 256, 16, 200, true, LayoutSource::kMask);  // one tile, the caller's layout
  checkLayoutAt(16, 256, 16, 200, false, LayoutSource::kBoth);
}

}  // namespace
}  // namespace epcomm::test
