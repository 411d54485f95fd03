// SPDX-License-Identifier: Apache-2.0
// Expert-major HT dispatch and combine, host side (DispatchArgs::expert_major): the handle's
// extra state, the extra argument checks and the launches of kernels/ht_expert_major.cu. Called
// from HtEngine (ht_engine.cpp) after the checks both modes share. Internal.
#pragma once

#include <cuda_runtime_api.h>

#include "core/arg_check.hpp"
#include "core/buffer_core.hpp"
#include "epcomm/ops.hpp"
#include "ht/ht_engine.hpp"
#include "kernels/protocol.hpp"

namespace epcomm {

// Allocates the handle's expert-major arrays (pair positions, send bases, group offsets).
void allocateExpertMajorState(EpHandle::Impl& h, const BufferConfig& config, int num_local_experts);

// Checks only expert-major needs, into the same checker (the call is rejected on every rank).
void checkExpertMajorDispatch(ArgChecker& check, const DispatchArgs& args,
                              const EpHandle::Impl* handle);

// The dispatch after the shared checks and the layout (when args.topk.idx is set).
DispatchResult dispatchExpertMajor(BufferCore& b, const kernels::HtRegions& regions,
                                   const DispatchArgs& args, EpHandle::Impl& h, int sms,
                                   cudaStream_t stream);

// The combine of a handle whose last dispatch was expert-major, after the shared checks and the
// staging copy into the combine-input region.
void combineExpertMajor(BufferCore& b, const kernels::HtRegions& regions, const CombineArgs& args,
                        const EpHandle::Impl& h, int sms, cudaStream_t stream);

}  // namespace epcomm
