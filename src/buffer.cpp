// SPDX-License-Identifier: Apache-2.0
// EpBuffer: the public front-end. It holds the buffer core (core/buffer_core.hpp: memory, peers,
// control words, errors, barrier) and the two engines that own their regions and state
// (ht/ht_engine.hpp, ll/ll_engine.hpp), and forwards every call to them.
#include "epcomm/buffer.hpp"

#include <memory>
#include <vector>

#include "check.hpp"
#include "core/buffer_core.hpp"
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

EpBuffer::EpBuffer(Bootstrap& bootstrap, const BufferConfig& config)
    : impl_(std::make_unique<Impl>(bootstrap, config)) {}

EpBuffer::~EpBuffer() = default;

int EpBuffer::rank() const {
  return impl_->core.rank;
}
int EpBuffer::numRanks() const {
  return impl_->core.num_ranks;
}
int EpBuffer::device() const {
  return impl_->core.device;
}
MemMode EpBuffer::memMode() const {
  return impl_->core.memory->mode();
}
const ResolvedConfig& EpBuffer::config() const {
  return impl_->core.resolved;
}
int EpBuffer::numLocalExperts() const {
  return impl_->core.num_local_experts;
}
size_t EpBuffer::bytesPerRank() const {
  return impl_->core.memory->bytes();
}
BufferSizes EpBuffer::bytesFor(const BufferConfig& config, int num_ranks) {
  return computeBufferLayout(resolveConfig(config, num_ranks)).sizes;
}

void EpBuffer::barrier(cudaStream_t stream) {
  impl_->core.barrier(stream);
}

void EpBuffer::sync(cudaStream_t stream) {
  DeviceGuard guard(impl_->core.device);
  impl_->core.waitStream(stream, "the stream");
}

void EpBuffer::synchronizingBarrier(cudaStream_t stream) {
  barrier(stream);
  sync(stream);
}

void EpBuffer::checkError() const {
  impl_->core.checkUsable();
}

void EpBuffer::abort() {
  *reinterpret_cast<volatile uint32_t*>(&impl_->core.hostState()->abort) = 1;
}

void* const* EpBuffer::devicePeerBases() const {
  return impl_->core.peer_table.as<void* const>();
}
void* EpBuffer::peerBase(int rank) const {
  EPCOMM_ARG_CHECK(rank >= 0 && rank < impl_->core.num_ranks, "rank", rank,
                   "in [0, " << impl_->core.num_ranks << ")");
  return impl_->core.memory->peer(rank);
}
size_t EpBuffer::scratchOffset() const {
  return impl_->core.layout.scratch_offset;
}
size_t EpBuffer::scratchBytes() const {
  return impl_->core.layout.scratch_bytes;
}

// --- HT ----------------------------------------------------------------------------------------

EpHandle EpBuffer::createHandle() const {
  return EpHandle(impl_->ht.createHandle());
}

void EpBuffer::layout(const TopkView& topk, EpHandle& handle, cudaStream_t stream) {
  impl_->ht.layout(topk, handle.impl_.get(), stream);
}

DispatchResult EpBuffer::dispatch(const DispatchArgs& args, EpHandle& handle, cudaStream_t stream) {
  return impl_->ht.dispatch(args, handle.impl_.get(), stream);
}

void EpBuffer::combine(const CombineArgs& args, const EpHandle& handle, cudaStream_t stream) {
  impl_->ht.combine(args, handle.impl_.get(), stream);
}

// --- LL ----------------------------------------------------------------------------------------

LlDispatchResult EpBuffer::lowLatencyDispatch(const LlDispatchArgs& args, cudaStream_t stream,
                                              LlPhase phase) {
  return impl_->ll.dispatch(args, stream, phase);
}

void EpBuffer::lowLatencyCombine(const LlCombineArgs& args, cudaStream_t stream, LlPhase phase) {
  impl_->ll.combine(args, stream, phase);
}

// --- Stage times (src/diagnostics.hpp) --------------------------------------------------------

namespace detail {

struct BufferAccess {
  static BufferCore& core(const EpBuffer& buffer) { return buffer.impl_->core; }
};

}  // namespace detail

namespace diagnostics {

bool stageTimesEnabled(const EpBuffer& buffer) {
  return detail::BufferAccess::core(buffer).stage_times_on;
}

std::vector<uint64_t> takeStageTimes(EpBuffer& buffer, cudaStream_t stream) {
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
