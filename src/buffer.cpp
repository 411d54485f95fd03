// SPDX-License-Identifier: Apache-2.0
// EpBuffer: the public front-end. It holds the buffer core (core/buffer_core.hpp: memory, peers,
// control words, errors, barrier) and the two engines that own their regions and state
// (ht/ht_engine.hpp, ll/ll_engine.hpp), and forwards every call to them.
#include "epcomm/buffer.hpp"

#include <memory>
#include <vector>

#include "check.hpp"
#include "core/buffer_core.hpp"
#include "core/scale_out.hpp"
#include "diagnostics.hpp"
#include "ht/ht_engine.hpp"
#include "ll/ll_engine.hpp"

namespace epcomm {

struct EPCOMM_LOCAL EpBuffer::Impl {
  Impl(Bootstrap& bootstrap, const BufferConfig& config)
      : core(bootstrap, config), ht(core), ll(core) {}

  BufferCore core;  // destroyed last: the engines only refer to it
  HtEngine ht;
  LlEngine ll;
};

EpBuffer::EpBuffer(Bootstrap& bootstrap, const BufferConfig& config) {
  try {
    impl_ = std::make_unique<Impl>(bootstrap, config);
  } catch (const core::SeveralNodes&) {
    // Every rank alike, before anything was allocated (core/scale_out.hpp).
    so_ = core::createScaleOut(bootstrap, config);
  }
}

EpBuffer::~EpBuffer() = default;

// Across nodes (so_ set) the node-local buffer answers what is about this rank's memory and GPU
// (its device, memory mode, symmetric bytes, peers, scratch), the hierarchical implementation
// the rest.
int EpBuffer::rank() const {
  return so_ ? so_->rank() : impl_->core.rank;
}
int EpBuffer::numRanks() const {
  return so_ ? so_->numRanks() : impl_->core.num_ranks;
}
int EpBuffer::device() const {
  return so_ ? so_->nodeBuffer().device() : impl_->core.device;
}
MemMode EpBuffer::memMode() const {
  return so_ ? so_->nodeBuffer().memMode() : impl_->core.memory->mode();
}
const ResolvedConfig& EpBuffer::config() const {
  return so_ ? so_->config() : impl_->core.resolved;
}
int EpBuffer::numLocalExperts() const {
  return so_ ? so_->numLocalExperts() : impl_->core.num_local_experts;
}
size_t EpBuffer::bytesPerRank() const {
  return so_ ? so_->nodeBuffer().bytesPerRank() : impl_->core.memory->bytes();
}
BufferSizes EpBuffer::bytesFor(const BufferConfig& config, int num_ranks) {
  return computeBufferLayout(resolveConfig(config, num_ranks)).sizes;
}

void EpBuffer::barrier(cudaStream_t stream) {
  if (so_) {
    so_->barrier(stream);
    return;
  }
  impl_->core.barrier(stream);
}

void EpBuffer::sync(cudaStream_t stream) {
  if (so_) {
    so_->sync(stream);
    return;
  }
  DeviceGuard guard(impl_->core.device);
  impl_->core.waitStream(stream, "the stream");
}

void EpBuffer::synchronizingBarrier(cudaStream_t stream) {
  barrier(stream);
  sync(stream);
}

void EpBuffer::checkError() const {
  if (so_) {
    so_->nodeBuffer().checkError();
    return;
  }
  impl_->core.checkUsable();
}

void EpBuffer::abort() {
  if (so_) {
    so_->nodeBuffer().abort();
    return;
  }
  *reinterpret_cast<volatile uint32_t*>(&impl_->core.hostState()->abort) = 1;
}

void* const* EpBuffer::devicePeerBases() const {
  if (so_) return so_->nodeBuffer().devicePeerBases();
  return impl_->core.peer_table.as<void* const>();
}
void* EpBuffer::peerBase(int rank) const {
  if (so_) return so_->nodeBuffer().peerBase(rank);
  EPCOMM_ARG_CHECK(rank >= 0 && rank < impl_->core.num_ranks, "rank", rank,
                   "in [0, " << impl_->core.num_ranks << ")");
  return impl_->core.memory->peer(rank);
}
size_t EpBuffer::scratchOffset() const {
  return so_ ? so_->nodeBuffer().scratchOffset() : impl_->core.layout.scratch_offset;
}
size_t EpBuffer::scratchBytes() const {
  return so_ ? so_->nodeBuffer().scratchBytes() : impl_->core.layout.scratch_bytes;
}

// --- HT ----------------------------------------------------------------------------------------

EpHandle EpBuffer::createHandle() const {
  if (so_) {
    auto h = std::make_unique<EpHandle::Impl>();
    h->scale_out = so_->createHandle();
    return EpHandle(std::move(h));
  }
  return EpHandle(impl_->ht.createHandle());
}

namespace {
// The hierarchical handle state of `handle`, or InvalidArgument (a one-node handle, or a moved-from
// one) before anything is enqueued; the implementation checks that it made it.
void* scaleOutHandle(const EpHandle::Impl* handle) {
  EPCOMM_CHECK_CODE(handle != nullptr && handle->scale_out != nullptr, ErrorCode::kInvalidArgument,
                    "invalid argument handle: not made by this EpBuffer's createHandle() (an "
                    "EpBuffer across nodes needs its own handles)");
  return handle->scale_out.get();
}
}  // namespace

void EpBuffer::layout(const TopkView& topk, EpHandle& handle, cudaStream_t stream) {
  if (so_) {
    so_->layout(topk, scaleOutHandle(handle.impl_.get()), stream);
    handle.impl_->num_tokens = topk.num_tokens;
    handle.impl_->num_topk = topk.num_topk;
    return;
  }
  impl_->ht.layout(topk, handle.impl_.get(), stream);
}

DispatchResult EpBuffer::dispatch(const DispatchArgs& args, EpHandle& handle, cudaStream_t stream) {
  if (so_) {
    DispatchResult r = so_->dispatch(args, scaleOutHandle(handle.impl_.get()), stream);
    handle.impl_->num_tokens = args.num_tokens;
    // A cached dispatch (no top-k) keeps the routing's num_topk, as on one node.
    if (args.topk.idx != nullptr || args.topk.num_topk > 0) {
      handle.impl_->num_topk = args.topk.num_topk;
    }
    return r;
  }
  return impl_->ht.dispatch(args, handle.impl_.get(), stream);
}

void EpBuffer::combine(const CombineArgs& args, const EpHandle& handle, cudaStream_t stream) {
  if (so_) {
    so_->combine(args, scaleOutHandle(handle.impl_.get()), stream);
    return;
  }
  impl_->ht.combine(args, handle.impl_.get(), stream);
}

// --- LL ----------------------------------------------------------------------------------------

LlDispatchResult EpBuffer::lowLatencyDispatch(const LlDispatchArgs& args, cudaStream_t stream,
                                              LlPhase phase) {
  if (so_) return so_->lowLatencyDispatch(args, stream, phase);
  return impl_->ll.dispatch(args, stream, phase);
}

void EpBuffer::lowLatencyCombine(const LlCombineArgs& args, cudaStream_t stream, LlPhase phase) {
  if (so_) {
    so_->lowLatencyCombine(args, stream, phase);
    return;
  }
  impl_->ll.combine(args, stream, phase);
}

// --- Stage times (src/diagnostics.hpp) --------------------------------------------------------

namespace detail {

struct BufferAccess {
  static BufferCore& core(const EpBuffer& buffer) { return buffer.impl_->core; }
  static bool oneNode(const EpBuffer& buffer) { return buffer.impl_ != nullptr; }
};

}  // namespace detail

namespace diagnostics {

bool stageTimesEnabled(const EpBuffer& buffer) {
  return detail::BufferAccess::oneNode(buffer) && detail::BufferAccess::core(buffer).stage_times_on;
}

std::vector<uint64_t> takeStageTimes(EpBuffer& buffer, cudaStream_t stream) {
  if (!detail::BufferAccess::oneNode(buffer)) return {};
  BufferCore& core = detail::BufferAccess::core(buffer);
  if (!core.stage_times_on) return {};
  DeviceGuard guard(core.device);
  core.waitStream(stream, "the stream (stage times)");
  std::vector<uint64_t> stamps(kernels::kStageSlots);
  EPCOMM_CUDA_CHECK(cudaMemcpy(stamps.data(), core.stage_times.get(),
                               sizeof(uint64_t) * stamps.size(), cudaMemcpyDeviceToHost));
  EPCOMM_CUDA_CHECK(cudaMemset(core.stage_times.get(), 0, core.stage_times.bytes()));
  for (int k = 0; k < kernels::kNumStageKernels; ++k) {
    uint64_t& start = stamps[static_cast<size_t>(k) * kernels::kMaxStages + kernels::kStageStart];
    start = start != 0 ? ~start : 0;  // stored as ~t so that atomicMax keeps the earliest
  }
  return stamps;
}

}  // namespace diagnostics

}  // namespace epcomm
