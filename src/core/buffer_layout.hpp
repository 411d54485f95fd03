// SPDX-License-Identifier: Apache-2.0
// Where everything lives inside one rank's symmetric buffer. Pure arithmetic on the resolved
// configuration, so every rank computes the same offsets.
//
//   [ControlRegion][HT: recv_x | recv_scales | recv_topk_idx | recv_topk_weights | recv_src_idx |
//    combine_in | combine_weights][LL: staging rows x2 | meta x2 | combine partials x2 | outputs
//    ...][scratch]
#pragma once

#include <cstddef>

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
  size_t total_bytes = 0;  // before rounding to the allocation granularity
};

// Every region starts on this boundary.
constexpr size_t kRegionAlignment = 4096;

BufferLayout computeBufferLayout(const ResolvedConfig& config);

}  // namespace epcomm
