// SPDX-License-Identifier: Apache-2.0
// The host's named accessors of the control region (kernels/protocol.hpp): the only host code
// that reads or writes ControlRegion fields. Internal.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/protocol.hpp"

namespace epcomm {

// Zeroes every signal word of a new buffer whose memory starts at `base` (device memory, `bytes`
// long) on `stream`; the caller synchronizes. Signals start from zero on every rank before any
// peer may write into them. They are the control region and the epoch words outside it (reused
// memory may hold an earlier buffer's): the push combine's chunk flags (`ht.combine_flags`) and
// the LL dispatch's row and entry tags and the combine's weights and partial-row tags
// (`ll.row_tags`, `ll.entry_tags`, `ll.weights_tags`, `ll.combine_tags`).
// With setPoisonNewBuffersForTesting on, every byte is first set to 0xFF, as such memory could be.
void clearSignals(uint8_t* base, size_t bytes, const kernels::HtRegions& ht,
                  const kernels::LlRegions& ll, int num_ranks, cudaStream_t stream);

// The last call of `family` that the rank owning `region` (device memory, possibly a peer's
// through its mapping) completed or skipped: max(LocalState::epoch, ::skipped), read with one
// copy on `stream`, synchronously.
uint64_t readCallsPassed(const void* region, kernels::EpochSlot family, cudaStream_t stream);

// Rewrites a host copy of a control region so that every op family continues as if `calls` calls
// had completed (LocalState::epoch, plain epoch words = calls; tagged words = tag(calls, 0)).
// Leaves peer_rejected, peer_faulted and LocalState::failed untouched.
void setCallCounters(kernels::ControlRegion& region, uint64_t calls);

}  // namespace epcomm
