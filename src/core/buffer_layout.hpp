// SPDX-License-Identifier: Apache-2.0
// Where everything lives inside one rank's symmetric buffer. Pure arithmetic on the resolved
// configuration, so every rank computes the same offsets.
//
//   [ControlRegion][HT: recv_x | recv_scales | recv_topk_idx | recv_topk_weights | recv_src_idx |
//    combine_in | combine_weights][LL: (staging rows | meta) x2 | (combine partials | combine
//    weights) x2 | outputs | bookkeeping][scratch][padding to kAllocationGranularity]
#pragma once

#include <cstddef>

#include "epcomm/buffer.hpp"
#include "epcomm/config.hpp"
#include "kernels/protocol.hpp"

namespace epcomm {

struct BufferLayout {
  bool has_ht = false;
  bool has_ll = false;
  kernels::HtRegions ht;
  kernels::LlRegions ll;
  size_t scratch_offset = 0;
  size_t scratch_bytes = 0;
  size_t total_bytes = 0;  // rounded up to kAllocationGranularity (== sizes.total)
  BufferSizes sizes;       // the same layout by region (EpBuffer::bytesFor)
};

// Every region starts on this boundary.
constexpr size_t kRegionAlignment = 4096;
// The buffer's size is a multiple of this: the VMM allocation granularity of the supported GPUs
// (Hopper, Blackwell) and the size cuda_ipc mode rounds to. SymmetricMemory still rounds to
// the driver's granularity, so a coarser one would make bytesPerRank() larger than bytesFor().
constexpr size_t kAllocationGranularity = size_t{2} << 20;

BufferLayout computeBufferLayout(const ResolvedConfig& config);

}  // namespace epcomm
