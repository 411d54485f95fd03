// EpBuffer core: creation (allocation, handle exchange, mapping, reachability check), teardown,
// the device barrier and error surfacing. The ops live in ht_ops.cpp and ll_ops.cpp.
#include <chrono>
#include <cstring>
#include <cstddef>
#include <sstream>
#include <thread>
#include <vector>

#include "buffer_impl.hpp"
#include "check.hpp"

namespace epcomm {

namespace {

// What every rank must agree on before allocating: a mismatch would corrupt memory later.
struct ConfigDigest {
  int32_t hidden, num_experts, max_topk, max_tokens, ll_max_tokens;
  uint64_t scratch_bytes;
  uint64_t total_bytes;
};

const char* opName(int op) {
  switch (static_cast<kernels::OpId>(op)) {
    case kernels::OpId::kBarrier: return "barrier";
    case kernels::OpId::kLayout: return "layout";
    case kernels::OpId::kHtDispatch: return "HT dispatch";
    case kernels::OpId::kHtCombine: return "HT combine";
    case kernels::OpId::kLlDispatchSend: return "LL dispatch (send)";
    case kernels::OpId::kLlDispatchRecv: return "LL dispatch (receive)";
    case kernels::OpId::kLlCombineSend: return "LL combine (send)";
    case kernels::OpId::kLlCombineRecv: return "LL combine (receive)";
    case kernels::OpId::kCopy: return "copy";
    case kernels::OpId::kNone: break;
  }
  return "unknown op";
}

const char* phaseName(int op, int phase) {
  switch (static_cast<kernels::OpId>(op)) {
    case kernels::OpId::kBarrier: return "arrival";
    case kernels::OpId::kHtDispatch:
      return phase == 1 ? "count exchange" : phase == 2 ? "rows-written signal" : "expert counts";
    case kernels::OpId::kHtCombine:
      return phase == 1 ? "combine-input-ready signal" : "done-pulling signal";
    case kernels::OpId::kLlDispatchRecv: return "rows-sent post";
    case kernels::OpId::kLlCombineRecv: return "partials-sent post";
    default: return "wait";
  }
}

// The HT dispatch shape signature (see ht_ops.cpp) decoded for messages.
std::string describeSignature(uint64_t sig) {
  std::ostringstream os;
  os << "hidden=" << (sig & 0xff) * kHiddenAlignment << ", dtype=" << (((sig >> 8) & 1) ? "fp8" : "bf16")
     << ", " << (((sig >> 9) & 1) ? "with" : "without") << " top-k, num_topk=" << ((sig >> 10) & 0x1f)
     << ", num_experts=" << ((sig >> 15) & 0x3ff);
  return os.str();
}

}  // namespace

EpBuffer::Impl::Impl(Bootstrap& bs, const BufferConfig& config)
    : bootstrap(bs), resolved(resolveConfig(config, bs.size())) {
  rank = bootstrap.rank();
  num_ranks = bootstrap.size();
  detail::setProcessRank(rank);
  const BufferConfig& c = resolved.config;
  num_local_experts = c.num_experts / num_ranks;

  if (c.device == kAuto) {
    EPCOMM_CUDA_CHECK(cudaGetDevice(&device));
  } else {
    int count = 0;
    EPCOMM_CUDA_CHECK(cudaGetDeviceCount(&count));
    EPCOMM_ARG_CHECK(c.device < count, "BufferConfig::device", c.device,
                     "a visible device ordinal (< " << count << ")");
    device = c.device;
  }
  DeviceGuard guard(device);
  EPCOMM_CUDA_CHECK(cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, device));
  layout = computeBufferLayout(resolved);

  // Every rank must have asked for the same shape; say which rank differs.
  ConfigDigest mine;
  std::memset(&mine, 0, sizeof(mine));  // padding too: the digests are compared bytewise
  mine.hidden = c.hidden;
  mine.num_experts = c.num_experts;
  mine.max_topk = c.max_topk;
  mine.max_tokens = c.max_tokens_per_rank;
  mine.ll_max_tokens = c.ll_max_tokens_per_rank;
  mine.scratch_bytes = c.scratch_bytes;
  mine.total_bytes = layout.total_bytes;
  std::vector<ConfigDigest> all(num_ranks);
  bootstrap.allGather(&mine, all.data(), sizeof(ConfigDigest));
  for (int r = 0; r < num_ranks; ++r) {
    const ConfigDigest& o = all[r];
    EPCOMM_CHECK_CODE(
        std::memcmp(&o, &all[0], sizeof(ConfigDigest)) == 0, ErrorCode::kInvalidArgument,
        "the BufferConfig differs across ranks: rank 0 has hidden="
            << all[0].hidden << " num_experts=" << all[0].num_experts << " max_topk="
            << all[0].max_topk << " max_tokens_per_rank=" << all[0].max_tokens
            << " ll_max_tokens_per_rank=" << all[0].ll_max_tokens << " scratch_bytes="
            << all[0].scratch_bytes << " (" << all[0].total_bytes << " buffer bytes), rank " << r
            << " has hidden=" << o.hidden << " num_experts=" << o.num_experts << " max_topk="
            << o.max_topk << " max_tokens_per_rank=" << o.max_tokens << " ll_max_tokens_per_rank="
            << o.ll_max_tokens << " scratch_bytes=" << o.scratch_bytes << " (" << o.total_bytes
            << " buffer bytes); every rank must use the same configuration");
  }

  const std::string forced_by = resolved.mem_mode_from_env ? "EPCOMM_MEM_MODE" : "BufferConfig::mem_mode";
  memory = memory::SymmetricMemory::create(bootstrap, device, layout.total_bytes, c.mem_mode,
                                           forced_by, c.timeout_s);

  // Signals start from zero on every rank before anyone can write to a peer.
  EPCOMM_CUDA_CHECK(cudaMemset(memory->local(), 0, sizeof(kernels::ControlRegion)));
  EPCOMM_CUDA_CHECK(cudaDeviceSynchronize());
  bootstrap.barrier();

  peer_table = DeviceMemory(sizeof(uint8_t*) * num_ranks);
  EPCOMM_CUDA_CHECK(cudaMemcpy(peer_table.get(), memory->peers().data(),
                               sizeof(uint8_t*) * num_ranks, cudaMemcpyHostToDevice));
  host_mapped = MappedHostMemory(sizeof(HostMappedState));
  control_stream = OwnedStream::create();

  peers.peer_bases = peer_table.as<uint8_t* const>();
  peers.local_base = localBase();
  peers.rank = rank;
  peers.num_ranks = num_ranks;
  peers.error = &host_mapped.device<HostMappedState>()->error;
  peers.abort_flag = &host_mapped.device<HostMappedState>()->abort;
  peers.timeout_ns = resolved.timeout_ns;

  // Proves every peer mapping works in both directions before the buffer is handed out.
  kernels::launchBarrier(peers, control_stream.get());
  waitStream(control_stream.get(), "the creation barrier");
}

EpBuffer::Impl::~Impl() {
  // Teardown order: nothing of ours runs, no peer touches our memory, then unmap and free
  // (SymmetricMemory's destructor). Errors are logged, never thrown.
  try {
    DeviceGuard guard(device);
    EPCOMM_CUDA_LOG(cudaDeviceSynchronize());
    bootstrap.barrier();
  } catch (const std::exception& e) {
    detail::logWarning(std::string("EpBuffer teardown: ") + e.what(), __FILE__, __LINE__);
  }
}

void EpBuffer::Impl::checkUsable() const {
  const volatile kernels::DeviceErrorRecord* record = &hostState()->error;
  const int kind = record->kind;
  if (kind != 0) {
    kernels::DeviceErrorRecord copy;
    copy.kind = kind;
    copy.op = record->op;
    copy.phase = record->phase;
    copy.rank = record->rank;
    copy.peer = record->peer;
    copy.index = record->index;
    copy.expected = record->expected;
    copy.observed = record->observed;
    const std::string message = detail::formatMessage(describeDeviceError(copy), __FILE__, __LINE__);
    if (!broken) {
      broken = true;
      broken_reason = message;
    }
    switch (static_cast<kernels::FailKind>(kind)) {
      case kernels::FailKind::kTimeout: throw TimeoutError(copy.peer, message);
      case kernels::FailKind::kBadExpertId:
      case kernels::FailKind::kSignatureMismatch: throw InvalidArgument(message);
      case kernels::FailKind::kPeerRejected: throw Error(ErrorCode::kRemote, message);
      default: throw Error(ErrorCode::kBroken, message);
    }
  }
  if (broken) {
    throw Error(ErrorCode::kBroken,
                detail::formatMessage("this EpBuffer is unusable after an earlier error (" +
                                          broken_reason + "); destroy and recreate it",
                                      __FILE__, __LINE__));
  }
}

std::string EpBuffer::Impl::describeDeviceError(const kernels::DeviceErrorRecord& r) const {
  std::ostringstream os;
  const char* op = opName(r.op);
  switch (static_cast<kernels::FailKind>(r.kind)) {
    case kernels::FailKind::kTimeout:
      os << op << " timed out after " << resolved.config.timeout_s << " s waiting for rank "
         << r.peer << " (" << phaseName(r.op, r.phase) << ": expected call " << r.expected
         << ", rank " << r.peer << " was at call " << r.observed << "). Rank " << r.peer
         << " never got there: did it crash, hang, or issue a different sequence of ops?";
      break;
    case kernels::FailKind::kAborted: os << op << " was aborted by EpBuffer::abort()"; break;
    case kernels::FailKind::kPeerRejected:
      os << op << " stopped because rank " << r.peer << " rejected its input for "
         << opName(static_cast<int>(r.observed)) << " (rank " << r.peer << " reports why)";
      break;
    case kernels::FailKind::kBadExpertId:
      os << "invalid argument topk_idx: token " << r.index << " has expert id "
         << static_cast<int64_t>(r.observed) << ", must be -1 or in [0, " << r.expected
         << "); the entry was ignored";
      break;
    case kernels::FailKind::kOverCapacity:
      os << op << " would receive " << r.observed << " rows, more than the buffer's capacity of "
         << r.expected << " (peer " << r.peer << ")";
      break;
    case kernels::FailKind::kSignatureMismatch:
      os << "ranks disagree on the shape of " << op << ": rank " << r.peer << " called it with "
         << describeSignature(r.observed) << ", this rank with " << describeSignature(r.expected);
      break;
    case kernels::FailKind::kNone: break;
  }
  os << ". This EpBuffer is now unusable; destroy and recreate it.";
  return os.str();
}

void EpBuffer::Impl::rejectInput(kernels::OpId op, const std::string& message) {
  if (!broken) {
    // Tell every peer (including ourselves is harmless) so waits for this op end at once.
    const uint64_t word = (static_cast<uint64_t>(rank) + 1) << 32 | static_cast<uint32_t>(op);
    try {
      DeviceGuard guard(device);
      for (int r = 0; r < num_ranks; ++r) {
        if (r == rank) continue;
        auto* target = reinterpret_cast<uint8_t*>(memory->peer(r)) +
                       offsetof(kernels::ControlRegion, peer_rejected);
        EPCOMM_CUDA_CHECK(cudaMemcpyAsync(target, &word, sizeof(word), cudaMemcpyHostToDevice,
                                          control_stream.get()));
      }
      EPCOMM_CUDA_CHECK(cudaStreamSynchronize(control_stream.get()));
    } catch (const std::exception& e) {
      detail::logWarning(std::string("could not notify peers of the rejected input: ") + e.what(),
                         __FILE__, __LINE__);
    }
    broken = true;
    broken_reason = "this rank rejected the input of " + std::string(opName(static_cast<int>(op)));
  }
  throw InvalidArgument(detail::formatMessage(
      message + " (" + opName(static_cast<int>(op)) +
          "; nothing was launched; the peers were told to stop and this EpBuffer must be "
          "recreated)",
      __FILE__, __LINE__));
}

void EpBuffer::Impl::waitStream(cudaStream_t stream, const char* what) {
  // A little over the device deadline: a device wait that expires records why first.
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration<double>(resolved.config.timeout_s * 1.5 + 5.0);
  while (true) {
    const cudaError_t status = cudaStreamQuery(stream);
    if (status == cudaSuccess) break;
    if (status != cudaErrorNotReady) EPCOMM_CUDA_CHECK(status);
    checkUsable();
    if (std::chrono::steady_clock::now() > deadline) {
      broken = true;
      broken_reason = std::string("the host timed out waiting for ") + what;
      throw TimeoutError(-1, detail::formatMessage(
                                 std::string("timed out waiting for ") + what +
                                     " to finish on the GPU (no device-side error was recorded)",
                                 __FILE__, __LINE__));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  checkUsable();
}

int EpBuffer::Impl::resolveSms(kernels::OpId op, int call_value, int buffer_value,
                               int fallback, const char* what) {
  int sms = call_value != kAuto ? call_value : buffer_value != kAuto ? buffer_value : fallback;
  if (sms < 1 || sms > device_sms) {
    rejectInput(
        op, std::string("invalid argument ") + what + " = " +
                                  std::to_string(sms) + ": must be in [1, " +
                                  std::to_string(device_sms) + "] (SMs of device " +
                                  std::to_string(device) + ")");
  }
  return sms;
}

// --- EpBuffer ----------------------------------------------------------------------------------

EpBuffer::EpBuffer(Bootstrap& bootstrap, const BufferConfig& config)
    : impl_(std::make_unique<Impl>(bootstrap, config)) {}

EpBuffer::~EpBuffer() = default;

int EpBuffer::rank() const { return impl_->rank; }
int EpBuffer::numRanks() const { return impl_->num_ranks; }
int EpBuffer::device() const { return impl_->device; }
MemMode EpBuffer::memMode() const { return impl_->memory->mode(); }
const ResolvedConfig& EpBuffer::config() const { return impl_->resolved; }
int EpBuffer::numLocalExperts() const { return impl_->num_local_experts; }
size_t EpBuffer::bytesPerRank() const { return impl_->memory->bytes(); }

void EpBuffer::barrier(cudaStream_t stream) {
  impl_->checkUsable();
  DeviceGuard guard(impl_->device);
  kernels::launchBarrier(impl_->peers, stream);
}

void EpBuffer::sync(cudaStream_t stream) {
  DeviceGuard guard(impl_->device);
  impl_->waitStream(stream, "the stream");
}

void EpBuffer::synchronizingBarrier(cudaStream_t stream) {
  barrier(stream);
  sync(stream);
}

void EpBuffer::checkError() const { impl_->checkUsable(); }

void EpBuffer::abort() {
  *reinterpret_cast<volatile uint32_t*>(&impl_->hostState()->abort) = 1;
}

void* const* EpBuffer::devicePeerBases() const { return impl_->peer_table.as<void* const>(); }
void* EpBuffer::peerBase(int rank) const {
  EPCOMM_ARG_CHECK(rank >= 0 && rank < impl_->num_ranks, "rank", rank,
                   "in [0, " << impl_->num_ranks << ")");
  return impl_->memory->peer(rank);
}
size_t EpBuffer::scratchOffset() const { return impl_->layout.scratch_offset; }
size_t EpBuffer::scratchBytes() const { return impl_->layout.scratch_bytes; }

}  // namespace epcomm
