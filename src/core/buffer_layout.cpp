// SPDX-License-Identifier: Apache-2.0
#include "core/buffer_layout.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>

#include "check.hpp"

namespace epcomm {

namespace {

// Hands out aligned regions in order and refuses sizes that overflow.
class Carver {
 public:
  explicit Carver(size_t start) : next_(start) {}
  uint64_t take(uint64_t bytes) {
    next_ = align(next_);
    uint64_t offset = next_;
    EPCOMM_ARG_CHECK(bytes <= std::numeric_limits<uint64_t>::max() / 2 - next_, "buffer size",
                     bytes, "small enough to address");
    next_ += bytes;
    return offset;
  }
  uint64_t end() const { return align(next_); }
  // Bytes taken (with alignment padding) since an earlier end().
  uint64_t since(uint64_t mark) const { return end() - mark; }

 private:
  static uint64_t align(uint64_t v) {
    return (v + kRegionAlignment - 1) / kRegionAlignment * kRegionAlignment;
  }
  uint64_t next_;
};

uint64_t align16(uint64_t v) {
  return (v + 15) / 16 * 16;
}

}  // namespace

BufferLayout computeBufferLayout(const ResolvedConfig& resolved) {
  const BufferConfig& c = resolved.config;
  const uint64_t ranks = static_cast<uint64_t>(resolved.num_ranks);
  const uint64_t hidden = static_cast<uint64_t>(c.hidden);
  const uint64_t max_topk = static_cast<uint64_t>(c.max_topk);
  const uint64_t scales = hidden / kFp8BlockSize;
  const uint64_t local_experts = static_cast<uint64_t>(c.num_experts) / ranks;

  BufferLayout layout;
  BufferSizes& sizes = layout.sizes;
  Carver carver(0);
  carver.take(sizeof(kernels::ControlRegion));
  sizes.control = carver.end();

  if (c.max_tokens_per_rank > 0) {
    layout.has_ht = true;
    kernels::HtRegions& ht = layout.ht;
    // resolveConfig() sets ht_recv_rows (kAuto: ranks * max_tokens, the rank-major worst case).
    const uint64_t capacity = c.ht_recv_rows > 0
                                  ? static_cast<uint64_t>(c.ht_recv_rows)
                                  : ranks * static_cast<uint64_t>(c.max_tokens_per_rank);
    ht.capacity = static_cast<int64_t>(capacity);
    ht.recv_x = carver.take(capacity * hidden * 2);
    ht.recv_scales = carver.take(capacity * scales * sizeof(float));
    ht.recv_topk_idx = carver.take(capacity * max_topk * sizeof(int64_t));
    ht.recv_topk_weights = carver.take(capacity * max_topk * sizeof(float));
    ht.recv_src_idx = carver.take(capacity * sizeof(int32_t));
    sizes.ht_recv = carver.since(sizes.control);
    ht.combine_in = carver.take(capacity * hidden * 2);
    ht.combine_weights = carver.take(capacity * max_topk * sizeof(float));
    // The push combine's chunk flags (its rows land in combine_in).
    const uint64_t max_tokens = static_cast<uint64_t>(c.max_tokens_per_rank);
    const uint64_t chunks = (max_tokens + kernels::kPushChunkRows - 1) / kernels::kPushChunkRows;
    ht.max_tokens = c.max_tokens_per_rank;
    ht.push_chunks = static_cast<int32_t>(chunks);
    ht.combine_flags = carver.take(ranks * chunks * sizeof(uint64_t));
    sizes.ht = carver.since(sizes.control);
    sizes.ht_combine = sizes.ht - sizes.ht_recv;
  }
  const uint64_t ll_start = carver.end();

  if (c.ll_max_tokens_per_rank > 0) {
    layout.has_ll = true;
    kernels::LlRegions& ll = layout.ll;
    const uint64_t max_tokens = static_cast<uint64_t>(c.ll_max_tokens_per_rank);
    ll.max_tokens = static_cast<int64_t>(max_tokens);
    ll.rows_per_expert = static_cast<int64_t>(ranks * max_tokens);
    // One stride fits a BF16 row (2 * hidden) and an FP8 row with its scales (hidden * 33 / 32).
    ll.row_bytes = static_cast<int64_t>(hidden * 2);
    ll.meta_bytes = static_cast<int64_t>(align16(sizeof(int32_t) * 2 * max_topk));
    const uint64_t staged = ranks * max_tokens;
    const uint64_t segments = (hidden + kernels::kLlSegmentCols - 1) / kernels::kLlSegmentCols;
    ll.combine_tag_segments = static_cast<int32_t>(segments);
    const uint64_t line_tokens =
        std::min<uint64_t>(max_tokens, static_cast<uint64_t>(kernels::kLlLineTokens));
    uint64_t mark = carver.end();
    for (int parity = 0; parity < 2; ++parity) {
      ll.rows[parity] = carver.take(staged * static_cast<uint64_t>(ll.row_bytes));
      ll.meta[parity] = carver.take(staged * static_cast<uint64_t>(ll.meta_bytes));
      ll.row_tags[parity] = carver.take(staged * sizeof(uint64_t));
      ll.entry_tags[parity] = carver.take(staged * max_topk * sizeof(uint64_t));
    }
    ll.entry_tags_per_slot = static_cast<int32_t>(max_topk);
    sizes.ll_dispatch_staging = carver.since(mark);
    mark = carver.end();
    for (int parity = 0; parity < 2; ++parity) {
      ll.combine_rows[parity] = carver.take(staged * hidden * 2);
      ll.combine_tags[parity] = carver.take(staged * segments * sizeof(uint64_t));
      ll.combine_weights[parity] = carver.take(staged * max_topk * sizeof(float));
      ll.weights_tags[parity] = carver.take(staged * sizeof(uint64_t));
      // Whole segments (what clearSignals clears); a row of lines is hidden * 4 bytes.
      ll.combine_lines[parity] =
          carver.take(ranks * line_tokens * segments * kernels::kLlSegmentCols * 4);
    }
    ll.line_tokens = static_cast<int32_t>(line_tokens);
    sizes.ll_combine_staging = carver.since(mark);
    mark = carver.end();
    const uint64_t out_rows = local_experts * ranks * max_tokens;
    ll.out_x = carver.take(out_rows * hidden * 2);
    ll.out_scales = carver.take(out_rows * scales * sizeof(float));
    ll.src_info = carver.take(out_rows * sizeof(int32_t));
    ll.expert_count = carver.take(local_experts * sizeof(int32_t));
    sizes.ll_outputs = carver.since(mark);
    mark = carver.end();
    ll.slot_of_row = carver.take(staged * max_topk * sizeof(int32_t));
    ll.topk_copy = carver.take(max_tokens * max_topk * sizeof(int32_t));
    ll.token_mask = carver.take(max_tokens * sizeof(uint32_t) *
                                static_cast<uint64_t>(kernels::rankMaskWords(resolved.num_ranks)));
    sizes.ll_bookkeeping = carver.since(mark);
  }
  sizes.ll = carver.since(ll_start);

  const uint64_t scratch_start = carver.end();
  layout.scratch_bytes = c.scratch_bytes;
  layout.scratch_offset = carver.take(c.scratch_bytes);
  sizes.scratch = carver.since(scratch_start);
  // Rounded to the allocation granularity here, so that bytesFor() (no CUDA call) gives what
  // the allocation really takes (SymmetricMemory rounds to the driver's granularity, which
  // divides kAllocationGranularity on the supported GPUs).
  const uint64_t laid_out = carver.end();
  layout.total_bytes =
      (laid_out + kAllocationGranularity - 1) / kAllocationGranularity * kAllocationGranularity;
  sizes.padding = layout.total_bytes - laid_out;
  sizes.total = layout.total_bytes;
  return layout;
}

}  // namespace epcomm
