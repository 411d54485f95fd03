// SPDX-License-Identifier: Apache-2.0
// HT engine: argument checks (before any launch), the handle, and the launches of layout,
// dispatch and combine.
#include "ht/ht_engine.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <sstream>
#include <thread>

#include "check.hpp"
#include "core/arg_check.hpp"
#include "ht/ht_expert_major.hpp"
#include "kernels/launch.hpp"

namespace epcomm {

namespace {

constexpr int kDefaultHtSms = 32;

// Blocks of a push combine that push (the rest reduce): 35 % (2x H200, 4096 tokens, copy-in at
// 32/24/16 SMs: 25 % 237/300/414 us, 35 % 221/242/348, 50 % 274/331/451). At least one of each.
int pushingBlocks(int sms) {
  return std::min(sms - 1, std::max(1, sms * 35 / 100));
}
constexpr int kMaxExpertAlignment = 1 << 16;

void checkTopk(ArgChecker& check, const TopkView& topk, int max_topk, int max_tokens) {
  check.require(topk.num_tokens >= 0 && topk.num_tokens <= max_tokens, "topk.num_tokens",
                topk.num_tokens, "in [0, ", max_tokens, "] (max_tokens_per_rank)");
  check.require(topk.num_topk >= 1 && topk.num_topk <= max_topk, "topk.num_topk", topk.num_topk,
                "in [1, ", max_topk, "] (BufferConfig::max_topk)");
  check.require(topk.num_tokens == 0 || topk.idx != nullptr, "topk.idx", pointerText(topk.idx),
                "non-null when topk.num_tokens > 0");
  check.require(topk.idx_type == IndexType::kInt32 || topk.idx_type == IndexType::kInt64,
                "topk.idx_type", static_cast<int>(topk.idx_type), "kInt32 or kInt64");
}

}  // namespace

// --- EpHandle ------------------------------------------------------------------------------------

EpHandle::EpHandle(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
EpHandle::EpHandle(EpHandle&&) noexcept = default;
EpHandle& EpHandle::operator=(EpHandle&&) noexcept = default;
EpHandle::~EpHandle() = default;

int EpHandle::numTokens() const {
  return impl_->num_tokens;
}
int EpHandle::numTopk() const {
  return impl_->num_topk;
}
const int32_t* EpHandle::numTokensPerRank() const {
  return impl_->rank_counts;
}
const int32_t* EpHandle::numTokensPerExpert() const {
  return impl_->expert_counts;
}
const bool* EpHandle::isTokenInRank() const {
  return impl_->is_token_in_rank;
}
const int32_t* EpHandle::tokenSlot() const {
  return impl_->token_slot;
}

HtEngine::HtEngine(BufferCore& core)
    : core_(core), enabled_(core.layout.has_ht), regions_(core.layout.ht) {}

std::unique_ptr<EpHandle::Impl> HtEngine::createHandle() const {
  const BufferCore& b = core_;
  b.checkUsable();
  EPCOMM_CHECK_CODE(enabled_, ErrorCode::kInvalidArgument,
                    "createHandle: HT mode is disabled (BufferConfig::max_tokens_per_rank = 0)");
  DeviceGuard guard(b.device);
  auto h = std::make_unique<EpHandle::Impl>();
  const BufferConfig& c = b.resolved.config;
  h->owner = &b;
  h->num_ranks = b.num_ranks;
  h->num_experts = c.num_experts;
  h->max_tokens = c.max_tokens_per_rank;
  h->max_topk = c.max_topk;

  const size_t tokens = static_cast<size_t>(c.max_tokens_per_rank);
  const size_t ranks = static_cast<size_t>(b.num_ranks);
  size_t offset = 0;
  auto carve = [&offset](size_t bytes) {
    size_t start = offset;
    offset += (bytes + 255) / 256 * 256;
    return start;
  };
  const size_t mask_words = static_cast<size_t>(kernels::rankMaskWords(b.num_ranks));
  const size_t o_mask = carve(tokens * mask_words * sizeof(uint32_t));
  const size_t o_slot = carve(tokens * ranks * sizeof(int32_t));
  const size_t o_in_rank = carve(tokens * ranks * sizeof(bool));
  const size_t o_rank_counts = carve(ranks * sizeof(int32_t));
  const size_t o_expert_counts = carve(static_cast<size_t>(c.num_experts) * sizeof(int32_t));
  const size_t o_topk = carve(tokens * static_cast<size_t>(c.max_topk) * sizeof(int32_t));
  const size_t o_tiles = carve(static_cast<size_t>(kernels::layoutTiles(c.max_tokens_per_rank)) *
                               ranks * sizeof(int32_t));
  const size_t o_tile_experts =
      carve(static_cast<size_t>(kernels::layoutTiles(c.max_tokens_per_rank)) *
            static_cast<size_t>(c.num_experts) * sizeof(int32_t));
  const size_t o_tiles_done = carve(sizeof(uint32_t));
  const size_t o_layout_done = carve(sizeof(uint64_t));
  const size_t o_matrix = carve(ranks * ranks * sizeof(int32_t));
  const size_t o_num_recv = carve(sizeof(int32_t));
  const size_t o_prefix = carve((ranks + 1) * sizeof(int32_t));
  const size_t o_recv_experts = carve(static_cast<size_t>(b.num_local_experts) * sizeof(int32_t));
  h->memory = DeviceMemory(offset);
  EPCOMM_CUDA_CHECK(cudaMemset(h->memory.get(), 0, offset));
  h->token_mask = h->memory.as<uint32_t>(o_mask);
  h->token_slot = h->memory.as<int32_t>(o_slot);
  h->is_token_in_rank = h->memory.as<bool>(o_in_rank);
  h->rank_counts = h->memory.as<int32_t>(o_rank_counts);
  h->expert_counts = h->memory.as<int32_t>(o_expert_counts);
  h->topk_copy = h->memory.as<int32_t>(o_topk);
  h->tile_counts = h->memory.as<int32_t>(o_tiles);
  h->tile_expert_counts = h->memory.as<int32_t>(o_tile_experts);
  h->tiles_done = h->memory.as<uint32_t>(o_tiles_done);
  h->layout_done = h->memory.as<uint64_t>(o_layout_done);
  h->count_matrix = h->memory.as<int32_t>(o_matrix);
  h->num_recv = h->memory.as<int32_t>(o_num_recv);
  h->recv_rank_prefix = h->memory.as<int32_t>(o_prefix);
  h->recv_expert_counts = h->memory.as<int32_t>(o_recv_experts);
  h->host_expert_counts = MappedHostMemory(
      std::max<size_t>(static_cast<size_t>(b.num_local_experts), 1) * sizeof(int32_t));
  allocateExpertMajorState(*h, c, b.num_local_experts);
  return h;
}

// --- layout --------------------------------------------------------------------------------------

namespace {

// Lays a routing out into the handle: from `topk` alone (layout == nullptr), or from a caller's
// layout (masks and slots from layout->is_token_in_rank; topk, when set, is checked against it and
// kept for the top-k data and weighted combine). `topk.num_topk` == 0: no top-k at all.
// layoutInto: the parameters, and the handle's state as after the layout (a dispatch kernel that
// runs the layout itself takes them, PerfFlags::ht_fused_layout); launchLayoutInto launches it.
kernels::LayoutParams layoutInto(const BufferCore& b, const TopkView& topk,
                                 const DispatchLayout* layout, int num_tokens, EpHandle::Impl& h) {
  kernels::LayoutParams p{};
  p.topk_idx = topk.num_topk > 0 ? topk.idx : nullptr;
  p.idx_is_64 = topk.idx_type == IndexType::kInt64;
  p.num_tokens = num_tokens;
  p.num_topk = topk.num_topk;
  if (layout != nullptr) {
    p.in_rank = layout->is_token_in_rank;
    p.rank_counts_in = layout->num_tokens_per_rank;
    p.expert_counts_in = layout->num_tokens_per_expert;
  }
  p.num_experts = b.resolved.config.num_experts;
  p.num_ranks = b.num_ranks;
  p.rank = b.rank;
  p.token_mask = h.token_mask;
  p.token_slot = h.token_slot;
  p.is_token_in_rank = h.is_token_in_rank;
  p.rank_counts = h.rank_counts;
  p.expert_counts = h.expert_counts;
  p.topk_copy = h.topk_copy;
  p.tile_counts = h.tile_counts;
  p.tile_expert_counts = h.tile_expert_counts;
  p.tiles_done = h.tiles_done;
  p.peers = b.peers;
  h.num_tokens = num_tokens;
  h.num_topk = topk.num_topk;
  h.dispatched = false;
  return p;
}

void launchLayoutInto(const BufferCore& b, const TopkView& topk, const DispatchLayout* layout,
                      int num_tokens, EpHandle::Impl& h, cudaStream_t stream) {
  kernels::launchLayout(layoutInto(b, topk, layout, num_tokens, h), stream, b.dependent_launch);
}

}  // namespace

void HtEngine::layout(const TopkView& topk, EpHandle::Impl* handle, cudaStream_t stream) {
  BufferCore& b = core_;
  b.checkUsable();
  ArgChecker check;
  check.require(enabled_, "BufferConfig::max_tokens_per_rank", 0, "> 0 for HT ops");
  check.require(handle != nullptr && handle->owner == &b, "handle", "foreign",
                "a handle created by this EpBuffer");
  checkTopk(check, topk, b.resolved.config.max_topk, b.resolved.config.max_tokens_per_rank);
  // layout() is local: a bad input affects only this rank, so nothing is broken.
  EPCOMM_CHECK_CODE(!check.failed(), ErrorCode::kInvalidArgument, check.message());
  DeviceGuard guard(b.device);
  launchLayoutInto(b, topk, nullptr, topk.num_tokens, *handle, stream);
  b.trackWork(stream);
}

// --- dispatch ------------------------------------------------------------------------------------

DispatchResult HtEngine::dispatch(const DispatchArgs& args, EpHandle::Impl* handle,
                                  cudaStream_t stream) {
  BufferCore& b = core_;
  b.checkUsable();
  const BufferConfig& c = b.resolved.config;
  const bool has_topk = args.topk.idx != nullptr || args.topk.num_topk > 0;
  const DispatchLayout& layout = args.layout;
  const bool has_layout = layout.num_tokens_per_rank != nullptr ||
                          layout.is_token_in_rank != nullptr ||
                          layout.num_tokens_per_expert != nullptr;
  const bool fp8 = args.dtype == DType::kFP8E4M3;
  const int hidden = c.hidden;
  const int num_scales = hidden / kFp8BlockSize;

  ArgChecker check;
  check.require(enabled_, "BufferConfig::max_tokens_per_rank", 0, "> 0 for HT ops");
  check.require(handle != nullptr && handle->owner == &b, "handle", "foreign",
                "a handle created by this EpBuffer");
  check.require(args.dtype == DType::kBF16 || fp8, "DispatchArgs::dtype",
                static_cast<int>(args.dtype), "kBF16 or kFP8E4M3");
  check.require(args.num_tokens >= 0 && args.num_tokens <= c.max_tokens_per_rank,
                "DispatchArgs::num_tokens", args.num_tokens, "in [0, ", c.max_tokens_per_rank,
                "] (max_tokens_per_rank)");
  check.require(args.num_tokens == 0 || args.x != nullptr, "DispatchArgs::x", pointerText(args.x),
                "non-null when num_tokens > 0");
  check.require(aligned16(args.x), "DispatchArgs::x", pointerText(args.x), "16-byte aligned");
  if (fp8) {
    check.require(args.num_tokens == 0 || args.x_scales != nullptr, "DispatchArgs::x_scales",
                  pointerText(args.x_scales), "non-null for FP8 input");
    check.require(args.scales_token_stride >= 0, "DispatchArgs::scales_token_stride",
                  args.scales_token_stride, ">= 0");
    check.require(args.scales_col_stride >= 1, "DispatchArgs::scales_col_stride",
                  args.scales_col_stride, ">= 1");
  }
  check.require(args.expert_alignment >= 1 && args.expert_alignment <= kMaxExpertAlignment,
                "DispatchArgs::expert_alignment", args.expert_alignment, "in [1, ",
                kMaxExpertAlignment, "]");
  check.require(aligned16(args.recv_x_out), "DispatchArgs::recv_x_out",
                pointerText(args.recv_x_out), "16-byte aligned");
  check.require(args.recv_topk_idx_out == nullptr || has_topk, "DispatchArgs::recv_topk_idx_out",
                pointerText(args.recv_topk_idx_out), "nullptr unless topk.idx is set");
  check.require(args.recv_topk_weights_out == nullptr || has_topk,
                "DispatchArgs::recv_topk_weights_out", pointerText(args.recv_topk_weights_out),
                "nullptr unless topk.idx is set");
  check.require(reinterpret_cast<uintptr_t>(args.recv_topk_idx_out) % 4 == 0,
                "DispatchArgs::recv_topk_idx_out", pointerText(args.recv_topk_idx_out),
                "4-byte aligned");
  check.require(reinterpret_cast<uintptr_t>(args.recv_topk_weights_out) % 4 == 0,
                "DispatchArgs::recv_topk_weights_out", pointerText(args.recv_topk_weights_out),
                "4-byte aligned");
  check.require(args.num_worst_tokens >= 0 && args.num_worst_tokens <= regions_.capacity,
                "DispatchArgs::num_worst_tokens", args.num_worst_tokens, "in [0, ",
                regions_.capacity, "] (the capacity, num_ranks * max_tokens_per_rank)");
  if (has_layout) {
    // All or none: a layout is the three arrays together (is_token_in_rank may be null only
    // when there are no tokens: [0, R]).
    const char* why = "non-null when any DispatchArgs::layout pointer is set";
    check.require(layout.num_tokens_per_rank != nullptr, "DispatchArgs::layout.num_tokens_per_rank",
                  pointerText(layout.num_tokens_per_rank), why);
    check.require(layout.num_tokens_per_expert != nullptr,
                  "DispatchArgs::layout.num_tokens_per_expert",
                  pointerText(layout.num_tokens_per_expert), why);
    check.require(args.num_tokens == 0 || layout.is_token_in_rank != nullptr,
                  "DispatchArgs::layout.is_token_in_rank", pointerText(layout.is_token_in_rank),
                  why, " and num_tokens > 0");
    check.require(reinterpret_cast<uintptr_t>(layout.num_tokens_per_rank) % 4 == 0,
                  "DispatchArgs::layout.num_tokens_per_rank",
                  pointerText(layout.num_tokens_per_rank), "4-byte aligned (int32)");
    check.require(reinterpret_cast<uintptr_t>(layout.num_tokens_per_expert) % 4 == 0,
                  "DispatchArgs::layout.num_tokens_per_expert",
                  pointerText(layout.num_tokens_per_expert), "4-byte aligned (int32)");
  }
  if (has_topk) {
    checkTopk(check, args.topk, c.max_topk, c.max_tokens_per_rank);
    check.require(args.topk.num_tokens == args.num_tokens, "topk.num_tokens", args.topk.num_tokens,
                  "equal to DispatchArgs::num_tokens (", args.num_tokens, ")");
  } else if (handle != nullptr && !has_layout) {
    check.require(handle->num_tokens >= 0, "DispatchArgs::topk.idx", "nullptr",
                  "set (or DispatchArgs::layout), or a handle that holds a layout (cached "
                  "dispatch)");
    check.require(handle->num_tokens < 0 || handle->num_tokens == args.num_tokens,
                  "DispatchArgs::num_tokens", args.num_tokens, "the handle's num_tokens (",
                  handle->num_tokens, ") for a cached dispatch");
  }
  if (args.expert_major) checkExpertMajorDispatch(check, args, handle);
  if (check.failed()) b.rejectInput(stream, kernels::OpId::kHtDispatch, check.message());
  const int sms = b.resolveSms(stream, kernels::OpId::kHtDispatch, args.num_sms, c.num_sms,
                               kDefaultHtSms, "DispatchArgs::num_sms");

  DeviceGuard guard(b.device);
  EpHandle::Impl& h = *handle;
  // PerfFlags::ht_fused_layout: the rank-major dispatch kernel runs a top-k layout as its first
  // phase (one launch instead of two).
  const bool fused_layout = b.perf.ht_fused_layout && has_topk && !has_layout && !args.expert_major;
  kernels::LayoutParams fused_layout_params{};
  if (has_layout) {
    TopkView topk = args.topk;
    if (!has_topk) topk.num_topk = 0;
    launchLayoutInto(b, topk, &layout, args.num_tokens, h, stream);
  } else if (fused_layout) {
    fused_layout_params = layoutInto(b, args.topk, nullptr, args.num_tokens, h);
  } else if (has_topk) {
    launchLayoutInto(b, args.topk, nullptr, args.num_tokens, h, stream);
  }
  h.expert_major = args.expert_major;
  if (args.expert_major) return dispatchExpertMajor(b, regions_, args, h, sms, stream);

  kernels::HtDispatchParams p{};
  p.counts_once = b.perf.ht_counts_once ? 1 : 0;
  if (fused_layout) {
    p.fused_layout = 1;
    p.layout = fused_layout_params;
    p.layout_done = h.layout_done;
  }
  p.peers = b.peers;
  p.regions = regions_;
  p.x = static_cast<const uint8_t*>(args.x);
  p.x_row_bytes = int64_t{hidden} * (fp8 ? 1 : 2);
  p.x_scales = fp8 ? args.x_scales : nullptr;
  p.scales_token_stride = args.scales_token_stride != 0 ? args.scales_token_stride : num_scales;
  p.scales_col_stride = args.scales_col_stride;
  p.num_scales = fp8 ? num_scales : 0;
  // has_topk is explicit: a rank with 0 tokens may pass topk.idx == nullptr and must still send
  // its (zero) expert counts, which the peers wait for.
  p.has_topk = has_topk ? 1 : 0;
  p.topk_copy = h.topk_copy;
  p.idx_is_64 = args.topk.idx_type == IndexType::kInt64;
  p.topk_weights = has_topk ? args.topk_weights : nullptr;
  p.num_topk = has_topk ? args.topk.num_topk : 0;
  p.num_tokens = args.num_tokens;
  p.num_experts = c.num_experts;
  p.num_local_experts = b.num_local_experts;
  p.expert_alignment = args.expert_alignment;
  p.signature = kernels::htSignature(hidden, fp8, has_topk, p.num_topk, p.idx_is_64 != 0,
                                     c.num_experts, args.expert_alignment);
  p.token_mask = h.token_mask;
  p.token_slot = h.token_slot;
  p.rank_counts = h.rank_counts;
  p.expert_counts = h.expert_counts;
  p.num_worst_tokens = args.num_worst_tokens;
  p.count_matrix = h.count_matrix;
  p.num_recv = h.num_recv;
  p.recv_rank_prefix = h.recv_rank_prefix;
  p.recv_expert_counts = h.recv_expert_counts;
  HostMappedState* host = b.hostState();
  if (args.exact_count) {
    *reinterpret_cast<volatile uint64_t*>(&host->ht_count) = 0;
    p.host_count = &b.hostStateOnDevice()->ht_count;
    p.host_expert_counts = h.host_expert_counts.device<int32_t>();
  }
  kernels::launchHtDispatch(p, sms, stream, b.dependent_launch);
  h.dispatched = true;

  copyReceivedRows(b, regions_, args, p.x_row_bytes, fp8 ? num_scales : 0, h.num_recv,
                   args.num_worst_tokens, sms, stream);
  b.trackWork(stream);
  DispatchResult result = receivedViews(b, regions_, h, fp8, has_topk);
  if (args.exact_count) {
    // Returns as soon as the count matrix is known; the rows may still be moving.
    result.num_recv_tokens_host = waitHostCount(b, stream, "exact_count dispatch");
    // Written by the device before the count word (kernels/intranode.cu); waitHostCount's
    // acquire fence orders this read after it.
    result.num_recv_tokens_per_expert_host = h.host_expert_counts.host<int32_t>();
  }
  return result;
}

// --- shared by both dispatch layouts
// --------------------------------------------------------------

void copyReceivedRows(const BufferCore& b, const kernels::HtRegions& ht, const DispatchArgs& args,
                      int64_t x_row_bytes, int num_scales, const int32_t* num_recv, int fixed_rows,
                      int sms, cudaStream_t stream) {
  // One launch for every caller copy: they share the row count.
  uint8_t* base = b.localBase();
  kernels::CopyRowsParams copy{};
  auto add = [&](void* dst, uint64_t region, int64_t row_bytes) {
    copy.seg[copy.num_segments++] = kernels::CopyRowsSegment{
        static_cast<uint8_t*>(dst), base + region, row_bytes, row_bytes, row_bytes};
  };
  if (args.recv_x_out != nullptr) add(args.recv_x_out, ht.recv_x, x_row_bytes);
  if (num_scales > 0 && args.recv_scales_out != nullptr) {
    add(args.recv_scales_out, ht.recv_scales, int64_t{num_scales} * 4);
  }
  // Top-k rows are [rows, num_topk] in the input index type / float32 (receivedViews).
  const int64_t num_topk = args.topk.num_topk;
  if (args.recv_topk_idx_out != nullptr && num_topk > 0) {
    const int64_t idx_bytes = args.topk.idx_type == IndexType::kInt64 ? 8 : 4;
    add(args.recv_topk_idx_out, ht.recv_topk_idx, num_topk * idx_bytes);
  }
  if (args.recv_topk_weights_out != nullptr && num_topk > 0) {
    add(args.recv_topk_weights_out, ht.recv_topk_weights, num_topk * 4);
  }
  if (copy.num_segments == 0) return;
  copy.count = num_recv;
  copy.max_rows = ht.capacity;
  copy.fixed_rows = fixed_rows;
  kernels::launchCopyRows(copy, sms, stream);
}

DispatchResult receivedViews(const BufferCore& b, const kernels::HtRegions& ht,
                             const EpHandle::Impl& h, bool fp8, bool has_topk) {
  uint8_t* base = b.localBase();
  DispatchResult result;
  result.recv_x = base + ht.recv_x;
  result.recv_x_scales = fp8 ? reinterpret_cast<const float*>(base + ht.recv_scales) : nullptr;
  result.recv_topk_idx = has_topk ? base + ht.recv_topk_idx : nullptr;
  result.recv_topk_weights =
      has_topk ? reinterpret_cast<const float*>(base + ht.recv_topk_weights) : nullptr;
  result.recv_src_idx = reinterpret_cast<const int32_t*>(base + ht.recv_src_idx);
  result.num_recv_tokens = h.num_recv;
  result.recv_rank_prefix = h.recv_rank_prefix;
  result.num_recv_tokens_per_expert = h.recv_expert_counts;
  result.capacity = ht.capacity;
  result.combine_input = base + ht.combine_in;
  return result;
}

int64_t waitHostCount(BufferCore& b, cudaStream_t stream, const char* what) {
  HostMappedState* host = b.hostState();
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::duration<double>(b.hostDeadlineS());
  while (true) {
    const uint64_t word = *reinterpret_cast<volatile uint64_t*>(&host->ht_count);
    if (kernels::hostCountValid(word)) {
      std::atomic_thread_fence(std::memory_order_acquire);
      return kernels::hostCountRows(word);
    }
    b.checkUsable();
    const cudaError_t status = cudaStreamQuery(stream);
    if (status != cudaSuccess && status != cudaErrorNotReady) EPCOMM_CUDA_CHECK(status);
    EPCOMM_CHECK_CODE(
        std::chrono::steady_clock::now() < deadline, ErrorCode::kTimeout,
        what << ": the received-row count did not arrive within " << b.hostDeadlineS() << " s");
    std::this_thread::sleep_for(std::chrono::microseconds(5));
  }
}

// --- combine -------------------------------------------------------------------------------------

void HtEngine::combine(const CombineArgs& args, const EpHandle::Impl* handle, cudaStream_t stream) {
  BufferCore& b = core_;
  b.checkUsable();
  const BufferConfig& c = b.resolved.config;
  ArgChecker check;
  check.require(enabled_, "BufferConfig::max_tokens_per_rank", 0, "> 0 for HT ops");
  check.require(handle != nullptr && handle->owner == &b, "handle", "foreign",
                "a handle created by this EpBuffer");
  const EpHandle::Impl* h = handle;
  if (h != nullptr) {
    check.require(h->dispatched, "handle", "not dispatched",
                  "a handle that went through dispatch() (it holds the count matrix)");
    check.require(h->num_tokens == 0 || args.out != nullptr, "CombineArgs::out",
                  pointerText(args.out), "non-null when the handle has tokens");
    check.require(args.scale_weights == nullptr || h->num_topk > 0, "CombineArgs::scale_weights",
                  pointerText(args.scale_weights), "null for a handle laid out without top-k");
    check.require(args.recv_topk_weights == nullptr || h->num_topk > 0,
                  "CombineArgs::recv_topk_weights", pointerText(args.recv_topk_weights),
                  "null for a handle laid out without top-k (its num_topk gives the row width)");
    check.require(args.recv_topk_weights == nullptr || !h->expert_major,
                  "CombineArgs::recv_topk_weights", pointerText(args.recv_topk_weights),
                  "null for a handle dispatched expert-major (not supported there yet)");
  }
  check.require((args.recv_topk_weights == nullptr) == (args.combined_topk_weights == nullptr),
                "CombineArgs::combined_topk_weights", pointerText(args.combined_topk_weights),
                args.recv_topk_weights == nullptr ? "null" : "non-null",
                " like CombineArgs::recv_topk_weights (both or neither)");
  check.require(reinterpret_cast<uintptr_t>(args.recv_topk_weights) % 4 == 0,
                "CombineArgs::recv_topk_weights", pointerText(args.recv_topk_weights),
                "4-byte aligned (float32)");
  check.require(reinterpret_cast<uintptr_t>(args.combined_topk_weights) % 4 == 0,
                "CombineArgs::combined_topk_weights", pointerText(args.combined_topk_weights),
                "4-byte aligned (float32)");
  check.require(args.x != nullptr, "CombineArgs::x", pointerText(args.x), "non-null");
  check.require(aligned16(args.x), "CombineArgs::x", pointerText(args.x), "16-byte aligned");
  {
    // x is the buffer's combine input (zero-copy) or memory outside it (copy-in): peers' pushes,
    // or the staging copy, write the combine input while x is read.
    const uint8_t* combine_in = b.localBase() + regions_.combine_in;
    const auto* x = static_cast<const uint8_t*>(args.x);
    check.require(
        !enabled_ || x <= combine_in || x >= combine_in + regions_.capacity * int64_t{c.hidden} * 2,
        "CombineArgs::x", pointerText(args.x),
        "the start of the buffer's combine input (DispatchResult::combine_input) or memory "
        "outside it, not a row inside it");
  }
  check.require(aligned16(args.out), "CombineArgs::out", pointerText(args.out), "16-byte aligned");
  check.require(aligned16(args.bias), "CombineArgs::bias", pointerText(args.bias),
                "16-byte aligned");
  if (check.failed()) b.rejectInput(stream, kernels::OpId::kHtCombine, check.message());
  const int sms = b.resolveSms(stream, kernels::OpId::kHtCombine, args.num_sms, c.num_sms,
                               kDefaultHtSms, "CombineArgs::num_sms");

  DeviceGuard guard(b.device);
  uint8_t* base = b.localBase();
  const kernels::HtRegions& ht = regions_;
  const int64_t row_bytes = int64_t{c.hidden} * 2;
  // The staging copies below share one launch (they have the same row count).
  kernels::CopyRowsParams copy{};
  copy.count = h->num_recv;
  copy.max_rows = ht.capacity;
  // The push combine reads the caller's x where it is (nobody pulls it), so it replaces the
  // staging copy of a copy-in combine; with x already in the buffer the pull is faster
  // (kernels/intranode.cu, htPushCombineKernel). It needs a reducing block beside the pushing
  // ones, and the pushed rows must fit the owners' combine inputs (a smaller ht_recv_rows).
  const bool copy_in = args.x != base + ht.combine_in;
  const bool push = b.perf.ht_push_combine && copy_in && !h->expert_major && sms >= 2 &&
                    b.peers.num_ranks >= 2 &&
                    ht.capacity >= int64_t{b.peers.num_ranks - 1} * ht.max_tokens;
  if (copy_in && !push) {
    // Peers pull from the symmetric combine-input region; stage the rows there first.
    copy.seg[copy.num_segments++] = kernels::CopyRowsSegment{
        base + ht.combine_in, static_cast<const uint8_t*>(args.x), row_bytes, row_bytes, row_bytes};
  }
  if (h->expert_major) {
    kernels::launchCopyRows(copy, sms, stream);
    combineExpertMajor(b, ht, args, *h, sms, stream);
    return;
  }
  uint64_t recv_weights_offset = 0;
  if (args.recv_topk_weights != nullptr) {
    // Peers pull these rows too: DispatchResult::recv_topk_weights is read where it is, other
    // memory is staged into the symmetric combine_weights region first.
    const auto* in_place = reinterpret_cast<const float*>(base + ht.recv_topk_weights);
    recv_weights_offset = ht.recv_topk_weights;
    if (args.recv_topk_weights != in_place) {
      recv_weights_offset = ht.combine_weights;
      const int64_t weight_row = int64_t{h->num_topk} * 4;
      copy.seg[copy.num_segments++] = kernels::CopyRowsSegment{
          base + ht.combine_weights, reinterpret_cast<const uint8_t*>(args.recv_topk_weights),
          weight_row, weight_row, weight_row};
    }
  }
  // The rows this rank sent to itself are read from the caller's arrays by the pull combine
  // (nobody else reads them): the staging copy leaves them out (2x H200 at 32 SMs: half of a
  // copy-in combine's staging). The push combine reads its peers' weights rows staged in full.
  if (!push) {
    copy.skip = h->recv_rank_prefix + b.peers.rank;
    if (b.peers.num_ranks == 1) copy.num_segments = 0;  // every row is this rank's own
  }
  kernels::launchCopyRows(copy, sms, stream);  // nothing when there is nothing to stage
  kernels::HtCombineParams p{};
  p.peers = b.peers;
  p.regions = ht;
  p.row_bytes = row_bytes;
  p.hidden = c.hidden;
  p.num_tokens = h->num_tokens;
  p.num_topk = h->num_topk;
  p.num_local_experts = b.num_local_experts;
  p.token_mask = h->token_mask;
  p.token_slot = h->token_slot;
  p.count_matrix = h->count_matrix;
  p.topk_copy = h->topk_copy;
  p.scale_weights = args.scale_weights;
  p.recv_weights_offset = recv_weights_offset;
  p.combined_weights = args.combined_topk_weights;
  p.x = static_cast<const uint8_t*>(args.x);
  p.own_recv_weights = args.recv_topk_weights != nullptr
                           ? args.recv_topk_weights
                           : reinterpret_cast<const float*>(base + recv_weights_offset);
  p.signature =
      kernels::htCombineSignature(args.combined_topk_weights != nullptr, h->num_topk, push);
  p.bias = static_cast<const uint16_t*>(args.bias);
  p.out = static_cast<uint16_t*>(args.out);
  if (push) {
    p.pushers = pushingBlocks(sms);
    kernels::launchHtPushCombine(p, sms, stream, b.dependent_launch);
  } else {
    kernels::launchHtCombine(p, sms, stream, b.dependent_launch);
  }
  b.trackWork(stream);
}

}  // namespace epcomm
