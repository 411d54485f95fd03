// EpBuffer core: creation (allocation, handle exchange, mapping, reachability check), teardown,
// the device barrier and error surfacing. The ops live in ht_ops.cpp and ll_ops.cpp.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <cstddef>
#include <iterator>
#include <sstream>
#include <thread>
#include <vector>

#include "buffer_impl.hpp"
#include "check.hpp"

namespace epcomm {

namespace {

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

// Names every field in which two per-call signatures (kernels/launch.hpp) differ, with both values.
std::string describeSignatureDiff(int op, int peer, uint64_t mine, uint64_t theirs) {
  const bool ll = static_cast<kernels::OpId>(op) != kernels::OpId::kHtDispatch;
  const kernels::SignatureField* fields =
      ll ? kernels::kLlSignatureFields : kernels::kHtSignatureFields;
  const size_t count = ll ? std::size(kernels::kLlSignatureFields)
                          : std::size(kernels::kHtSignatureFields);
  std::ostringstream os;
  const char* sep = "";
  for (size_t i = 0; i < count; ++i) {
    const int64_t a = kernels::signatureValue(fields[i], mine);
    const int64_t b = kernels::signatureValue(fields[i], theirs);
    if (a == b) continue;
    os << sep << fields[i].name << ": rank " << peer << " passed " << b << ", this rank " << a;
    sep = "; ";
  }
  if (*sep == '\0') os << "signature words differ (" << std::hex << theirs << " vs " << mine << ")";
  return os.str();
}

const char* failKindName(int kind) {
  switch (static_cast<kernels::FailKind>(kind)) {
    case kernels::FailKind::kBadExpertId: return "an expert id out of range in topk_idx";
    case kernels::FailKind::kOverCapacity: return "more rows than the buffer holds";
    case kernels::FailKind::kBadPeerData: return "an out-of-range value received from a peer";
    case kernels::FailKind::kSignatureMismatch: return "different per-call parameters";
    default: return "a device-side error";
  }
}

}  // namespace

// --- creation: every step is agreed by every rank ---------------------------------------------

namespace {

std::atomic<uint64_t> g_next_generation{1};

constexpr size_t kVoteReasonBytes = 480;

// One rank's outcome of a creation step, all-gathered so that every rank takes the same decision.
// Fixed size and trivially copyable; a peer's reason is read only up to its buffer's end.
template <typename Payload>
struct Vote {
  int32_t ok;
  int32_t code;  // ErrorCode of the failure
  char reason[kVoteReasonBytes];
  Payload payload;
};

struct NoPayload {
  int32_t unused;
};

std::string reasonOf(const char* text) {
  return std::string(text, strnlen(text, kVoteReasonBytes));
}

// Runs `step` on this rank and all-gathers whether it worked. If it failed anywhere, every rank
// throws: a failing rank its own exception, the others an error naming the first failing rank
// and its reason (with that rank's code when the job's setup is wrong everywhere: InvalidArgument
// or Unsupported; ErrorCode::kRemote otherwise). A rank whose step failed still votes (even on a
// timeout: the others may be fine and waiting for its vote); if the vote itself fails (a broken
// bootstrap), it throws its own error. Returns every rank's payload.
template <typename Payload, typename Step>
std::vector<Payload> agreeOn(Bootstrap& bootstrap, const char* stage, Step&& step) {
  Vote<Payload> mine;
  std::memset(&mine, 0, sizeof(mine));  // padding too: it crosses the wire
  std::exception_ptr failure;
  try {
    mine.payload = step();
    mine.ok = 1;
  } catch (const Error& e) {
    failure = std::current_exception();
    mine.code = static_cast<int32_t>(e.code());
    std::strncpy(mine.reason, e.what(), kVoteReasonBytes - 1);
  } catch (const std::exception& e) {
    failure = std::current_exception();
    mine.code = static_cast<int32_t>(ErrorCode::kInternal);
    std::strncpy(mine.reason, e.what(), kVoteReasonBytes - 1);
  }
  std::vector<Vote<Payload>> all(static_cast<size_t>(bootstrap.size()));
  try {
    bootstrap.allGather(&mine, all.data(), sizeof(mine));
  } catch (const std::exception&) {
    if (failure) std::rethrow_exception(failure);
    throw;
  }
  for (int r = 0; r < bootstrap.size(); ++r) {
    const Vote<Payload>& vote = all[static_cast<size_t>(r)];
    if (vote.ok) continue;
    if (failure) std::rethrow_exception(failure);
    const ErrorCode code = static_cast<ErrorCode>(vote.code);
    const bool shared_cause =
        code == ErrorCode::kInvalidArgument || code == ErrorCode::kUnsupported;
    detail::throwError(shared_cause ? code : ErrorCode::kRemote,
                       "EpBuffer creation failed on rank " + std::to_string(r) + " (" + stage +
                           "), so every rank stops: " + reasonOf(vote.reason),
                       __FILE__, __LINE__);
  }
  std::vector<Payload> payloads;
  for (const Vote<Payload>& vote : all) payloads.push_back(vote.payload);
  return payloads;
}

// What every rank must agree on before allocating: a mismatch would corrupt memory or hang later.
enum DigestField : int {
  kDigestHidden,
  kDigestNumExperts,
  kDigestMaxTopk,
  kDigestMaxTokens,
  kDigestLlMaxTokens,
  kDigestScratchBytes,
  kDigestBufferBytes,
  kDigestMemMode,
  kDigestTimeout,         // in nanoseconds, compared exactly
  kDigestFirstOpTimeout,  // in nanoseconds
  kDigestNumRanks,
  kNumDigestFields
};
constexpr const char* kDigestFieldNames[kNumDigestFields] = {
    "hidden",        "num_experts",  "max_topk", "max_tokens_per_rank", "ll_max_tokens_per_rank",
    "scratch_bytes", "buffer bytes", "mem_mode", "timeout_s",           "first_op_timeout_s",
    "rank count"};

struct ConfigDigest {
  int64_t values[kNumDigestFields];
  uint8_t from_env[kNumDigestFields];  // where a value came from, for messages (not compared)
};

ConfigDigest digestOf(const ResolvedConfig& resolved, const BufferLayout& layout) {
  const BufferConfig& c = resolved.config;
  ConfigDigest d;
  std::memset(&d, 0, sizeof(d));
  d.values[kDigestHidden] = c.hidden;
  d.values[kDigestNumExperts] = c.num_experts;
  d.values[kDigestMaxTopk] = c.max_topk;
  d.values[kDigestMaxTokens] = c.max_tokens_per_rank;
  d.values[kDigestLlMaxTokens] = c.ll_max_tokens_per_rank;
  d.values[kDigestScratchBytes] = static_cast<int64_t>(c.scratch_bytes);
  d.values[kDigestBufferBytes] = static_cast<int64_t>(layout.total_bytes);
  d.values[kDigestMemMode] = static_cast<int64_t>(c.mem_mode);
  d.values[kDigestTimeout] = static_cast<int64_t>(resolved.timeout_ns);
  d.values[kDigestFirstOpTimeout] = static_cast<int64_t>(resolved.first_op_timeout_ns);
  d.values[kDigestNumRanks] = resolved.num_ranks;
  d.from_env[kDigestMemMode] = resolved.mem_mode_from_env;
  d.from_env[kDigestTimeout] = resolved.timeout_from_env;
  d.from_env[kDigestFirstOpTimeout] = resolved.first_op_timeout_from_env;
  return d;
}

std::string digestValue(const ConfigDigest& d, int field) {
  std::ostringstream os;
  const int64_t value = d.values[field];
  switch (field) {
    case kDigestMemMode:
      os << memModeName(static_cast<MemMode>(value));
      if (d.from_env[field]) os << " (from EPCOMM_MEM_MODE)";
      break;
    case kDigestTimeout:
      os << static_cast<double>(value) * 1e-9 << " s";
      if (d.from_env[field]) os << " (from EPCOMM_TIMEOUT_S)";
      break;
    case kDigestFirstOpTimeout:
      os << static_cast<double>(value) * 1e-9 << " s";
      if (d.from_env[field]) os << " (from EPCOMM_FIRST_OP_TIMEOUT_S)";
      break;
    default:
      os << value;
  }
  return os.str();
}

// This rank's GPU as its peers need to know it.
struct DeviceDigest {
  char pci_bus_id[32];  // "0000:1b:00.0"
  int32_t major, minor;
};

// "900,1000" (nvcc's list) as "sm_90, sm_100".
std::string archListText(const char* list) {
  std::string out;
  std::string item;
  auto flush = [&]() {
    if (item.empty()) return;
    if (!out.empty()) out += ", ";
    const int value = std::atoi(item.c_str());
    out += value > 0 ? "sm_" + std::to_string(value / 10) : item;
    item.clear();
  };
  for (const char* p = list; *p != '\0'; ++p) {
    if (*p == ',')
      flush();
    else if (*p != ' ')
      item += *p;
  }
  flush();
  return out;
}

// Fails with kUnsupported, naming both, when the device cannot run the compiled kernels.
void checkArchitecture(int device) {
  const cudaError_t status = kernels::kernelImageStatus();
  if (status == cudaSuccess) return;
  if (status != cudaErrorNoKernelImageForDevice && status != cudaErrorInvalidDeviceFunction) {
    detail::throwCuda(status, "cudaFuncGetAttributes(epcomm kernel)", __FILE__, __LINE__);
  }
  cudaDeviceProp prop{};
  EPCOMM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  EPCOMM_CHECK_CODE(false, ErrorCode::kUnsupported,
                    "GPU " << device << " (" << prop.name << ") has compute capability "
                           << prop.major << "." << prop.minor
                           << ", but epcomm's kernels were compiled for "
                           << archListText(kernels::compiledArchitectures())
                           << " only; rebuild with -DCMAKE_CUDA_ARCHITECTURES=" << prop.major
                           << prop.minor << " (or add it to the list)");
}

}  // namespace

EpBuffer::Impl::Impl(Bootstrap& bs, const BufferConfig& config) : bootstrap(bs) {
  rank = bootstrap.rank();
  num_ranks = bootstrap.size();
  detail::setProcessRank(rank);

  // 1. The configuration, checked locally and then across ranks before anything else happens,
  //    so a bad field on one rank fails every rank at once (not at the bootstrap deadline).
  const std::vector<ConfigDigest> digests =
      agreeOn<ConfigDigest>(bootstrap, "checking its BufferConfig", [&]() {
        resolved = resolveConfig(config, num_ranks);
        layout = computeBufferLayout(resolved);
        return digestOf(resolved, layout);
      });
  for (int r = 1; r < num_ranks; ++r) {
    for (int f = 0; f < kNumDigestFields; ++f) {
      EPCOMM_CHECK_CODE(digests[r].values[f] == digests[0].values[f], ErrorCode::kInvalidArgument,
                        "the BufferConfig differs across ranks: "
                            << kDigestFieldNames[f] << " is " << digestValue(digests[0], f)
                            << " on rank 0 but " << digestValue(digests[r], f) << " on rank " << r
                            << "; every rank must create its EpBuffer with the same configuration");
    }
  }
  const BufferConfig& c = resolved.config;
  num_local_experts = c.num_experts / num_ranks;

  // 2. This rank's GPU: selectable, able to run our kernels.
  const std::vector<DeviceDigest> devices =
      agreeOn<DeviceDigest>(bootstrap, "selecting its GPU", [&]() {
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
        checkArchitecture(device);
        EPCOMM_CUDA_CHECK(
            cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, device));
        DeviceDigest d;
        std::memset(&d, 0, sizeof(d));
        EPCOMM_CUDA_CHECK(cudaDeviceGetPCIBusId(d.pci_bus_id, sizeof(d.pci_bus_id) - 1, device));
        EPCOMM_CUDA_CHECK(
            cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device));
        EPCOMM_CUDA_CHECK(
            cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, device));
        return d;
      });
  DeviceGuard guard(device);

  // 3. Peer access between this rank's GPU and every other GPU of this host (the kernels load
  //    and store over NVLink/PCIe P2P). A peer GPU this process cannot see is not checked here;
  //    the creation barrier below still proves the mapping.
  agreeOn<NoPayload>(bootstrap, "checking peer access", [&]() {
    const std::string mine(devices[rank].pci_bus_id, strnlen(devices[rank].pci_bus_id, 31));
    for (int r : bootstrap.localRanks()) {
      const std::string theirs(devices[r].pci_bus_id, strnlen(devices[r].pci_bus_id, 31));
      if (r == rank || theirs == mine) continue;
      int peer_device = -1;
      if (cudaDeviceGetByPCIBusId(&peer_device, theirs.c_str()) != cudaSuccess) {
        (void)cudaGetLastError();
        continue;
      }
      int can_access = 0;
      EPCOMM_CUDA_CHECK(cudaDeviceCanAccessPeer(&can_access, device, peer_device));
      EPCOMM_CHECK_CODE(can_access != 0, ErrorCode::kUnsupported,
                        "rank " << rank << " (GPU " << mine << ") cannot access the memory of rank "
                                << r << " (GPU " << theirs
                                << "): cudaDeviceCanAccessPeer reports no peer access between "
                                   "these GPUs; epcomm needs P2P (NVLink) between every pair of "
                                   "ranks' GPUs (check nvidia-smi topo -m)");
    }
    return NoPayload{};
  });

  // 4. The symmetric memory (collective; every rank takes the same path and fails together).
  const std::string forced_by =
      resolved.mem_mode_from_env ? "EPCOMM_MEM_MODE" : "BufferConfig::mem_mode";
  agreeOn<NoPayload>(bootstrap, "allocating the symmetric memory", [&]() {
    memory = memory::SymmetricMemory::create(bootstrap, device, layout.total_bytes, c.mem_mode,
                                             forced_by, c.timeout_s);
    return NoPayload{};
  });

  // 5. Local state. Signals start from zero on every rank before anyone can write to a peer
  //    (the agreement after this step is the barrier that orders the two).
  agreeOn<NoPayload>(bootstrap, "setting up its control state", [&]() {
    control_stream = OwnedStream::create();
    work_done = OwnedEvent::create();
    host_mapped = MappedHostMemory(sizeof(HostMappedState));
    peer_table = DeviceMemory(sizeof(uint8_t*) * num_ranks);
    EPCOMM_CUDA_CHECK(cudaMemcpyAsync(peer_table.get(), memory->peers().data(),
                                      sizeof(uint8_t*) * num_ranks, cudaMemcpyHostToDevice,
                                      control_stream.get()));
    EPCOMM_CUDA_CHECK(cudaMemsetAsync(memory->local(), 0, sizeof(kernels::ControlRegion),
                                      control_stream.get()));
    EPCOMM_CUDA_CHECK(cudaStreamSynchronize(control_stream.get()));
    return NoPayload{};
  });
  peers.peer_bases = peer_table.as<uint8_t* const>();
  peers.local_base = localBase();
  peers.rank = rank;
  peers.num_ranks = num_ranks;
  peers.error = &host_mapped.device<HostMappedState>()->error;
  peers.abort_flag = &host_mapped.device<HostMappedState>()->abort;
  peers.rejection_report = &host_mapped.device<HostMappedState>()->rejection;
  peers.timeout_ns = resolved.timeout_ns;
  peers.first_op_timeout_ns = resolved.first_op_timeout_ns;

  // 6. A device barrier proves every peer mapping works in both directions; the last agreement
  //    makes creation succeed on every rank or on none.
  agreeOn<NoPayload>(bootstrap, "the creation barrier", [&]() {
    kernels::launchBarrier(peers, control_stream.get());
    trackWork(control_stream.get());
    waitStream(control_stream.get(), "the creation barrier");
    return NoPayload{};
  });
  generation = g_next_generation.fetch_add(1);
  EPCOMM_LOG_INFO("EpBuffer ready: rank "
                  << rank << " of " << num_ranks << " on device " << device << ", memory mode "
                  << memModeName(memory->mode()) << ", " << memory->bytes()
                  << " symmetric bytes per rank (HT " << c.max_tokens_per_rank << " tokens, LL "
                  << c.ll_max_tokens_per_rank << " tokens per rank), " << device_sms
                  << " SMs, timeout " << c.timeout_s << " s");
}

EpBuffer::Impl::~Impl() {
  // Teardown order: our work is over (bounded), no peer touches our memory any more (bootstrap
  // barrier), then the members unmap and free. Errors are logged, never thrown. Only the work of
  // this buffer is waited for (trackWork), never the whole device.
  try {
    DeviceGuard guard(device);
    if (!waitForOurWork()) {
      // A kernel of ours still runs after the abort: freeing its memory under it would turn a
      // hang into a fault. Leak it instead, deliberately.
      detail::logWarning("EpBuffer teardown: this buffer's kernels did not stop within " +
                             std::to_string(resolved.config.timeout_s) +
                             " s and an abort; its memory is leaked, not freed under them",
                         __FILE__, __LINE__);
      (void)memory.release();
      (void)new MappedHostMemory(std::move(host_mapped));
      (void)new DeviceMemory(std::move(peer_table));
    }
    bootstrap.barrier();
  } catch (const std::exception& e) {
    detail::logWarning(std::string("EpBuffer teardown: ") + e.what(), __FILE__, __LINE__);
  }
}

bool EpBuffer::Impl::waitForOurWork() {
  if (!work_tracked) return true;
  auto finished = [this]() {
    const cudaError_t status = cudaEventQuery(work_done.get());
    if (status == cudaErrorNotReady) return false;
    EPCOMM_CUDA_LOG(status);  // any other error: nothing more will complete
    return true;
  };
  auto waitUntil = [&](double seconds) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (!finished()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    return true;
  };
  if (waitUntil(resolved.config.timeout_s)) return true;
  detail::logWarning("EpBuffer teardown: this buffer's work did not finish within timeout_s = " +
                         std::to_string(resolved.config.timeout_s) +
                         " s; aborting its waits (EpBuffer::abort)",
                     __FILE__, __LINE__);
  *reinterpret_cast<volatile uint32_t*>(&hostState()->abort) = 1;
  // Waits poll the abort word every few hundred microseconds; allow for a busy GPU.
  return waitUntil(5.0);
}

void EpBuffer::Impl::checkDeviceError() const {
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
      case kernels::FailKind::kPeerRejected:
      case kernels::FailKind::kPeerFaulted: throw Error(ErrorCode::kRemote, message);
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
      // The first call of a family (epoch 1) waits up to first_op_timeout_s.
      os << op << " timed out after "
         << (r.expected <= 1 ? resolved.config.first_op_timeout_s : resolved.config.timeout_s)
         << " s (" << (r.expected <= 1 ? "first_op_timeout_s" : "timeout_s")
         << ") waiting for rank "
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
         << ") (found on the device in " << op << "; the op was stopped on every rank)";
      break;
    case kernels::FailKind::kOverCapacity:
      if (static_cast<kernels::OpId>(r.op) == kernels::OpId::kLlDispatchRecv) {
        os << op << ": rank " << r.peer << " sent row " << r.index << " to a local expert that "
           << "already holds its capacity of " << r.expected << " rows (a token may reach an "
           << "expert at most once); the row was dropped";
      } else {
        os << op << " would receive " << r.observed << " rows, more than the buffer's capacity of "
           << r.expected;
      }
      break;
    case kernels::FailKind::kBadPeerData:
      os << op << " (" << phaseName(r.op, r.phase) << "): a value received from "
         << (r.peer >= 0 ? "rank " + std::to_string(r.peer) : std::string("a peer")) << " is "
         << r.observed << ", outside its limit of " << r.expected
         << "; it was not used. The peers' buffer state is inconsistent (memory corruption, or "
            "ranks issuing different op sequences)";
      break;
    case kernels::FailKind::kSignatureMismatch:
      os << "ranks called " << op << " with different per-call parameters ("
         << describeSignatureDiff(r.op, r.peer, r.expected, r.observed)
         << "); every rank must pass the same values (include/epcomm/ops.hpp lists them)";
      break;
    case kernels::FailKind::kPeerFaulted: {
      const int kind = static_cast<int>((r.observed >> 16) & 0xffffu);
      const int where = static_cast<int>(r.observed & 0xffffu);
      os << op << " stopped because rank " << r.peer << " found " << failKindName(kind) << " in "
         << opName(where) << " (rank " << r.peer << " reports the details)";
      break;
    }
    case kernels::FailKind::kNone: break;
  }
  os << ". This EpBuffer is now unusable; destroy and recreate it.";
  return os.str();
}

void EpBuffer::Impl::checkUsable() const {
  checkDeviceError();
  // A call of this rank that a peer's rejection stopped (see "Rejected calls" in launch.hpp):
  // raised once, and the buffer stays usable.
  const uint64_t report = *reinterpret_cast<const volatile uint64_t*>(&hostState()->rejection);
  if (report == 0) return;
  const uint64_t epoch = report >> 16;
  const auto op = static_cast<kernels::OpId>((report >> 8) & 0xffu);
  const int peer = static_cast<int>(report & 0xffu) - 1;
  const kernels::EpochSlot family = kernels::epochSlotOf(op);
  const uint64_t key = epoch << 8 | static_cast<uint64_t>(family);
  if (key == surfaced_rejection) return;
  surfaced_rejection = key;
  if (family == kernels::kEpochLl) ll_stage = LlStage::kIdle;  // the LL round is over everywhere
  throw Error(
      ErrorCode::kRemote,
      detail::formatMessage(
          "rank " + std::to_string(peer) + " rejected its input for call " + std::to_string(epoch) +
              " of " + opName(static_cast<int>(op)) + " (rank " + std::to_string(peer) +
              " reports why), so this rank's call "
              "was stopped and skipped on every rank. This EpBuffer is still usable: "
              "every rank goes on with its next call",
          __FILE__, __LINE__));
}

void EpBuffer::Impl::rejectInput(cudaStream_t stream, kernels::OpId op,
                                 const std::string& message) {
  const std::string outcome = skipRejectedCall(op, stream);
  throw InvalidArgument(detail::formatMessage(message + " (" + opName(static_cast<int>(op)) +
                                                  ": nothing of it was launched; " + outcome + ")",
                                              __FILE__, __LINE__));
}

uint64_t EpBuffer::Impl::callsPassed(int peer, kernels::EpochSlot family) {
  // LocalState::epoch and ::skipped of `peer`, read through its mapping.
  uint64_t words[2 * kernels::kNumEpochs] = {};
  static_assert(offsetof(kernels::LocalState, skipped) ==
                    offsetof(kernels::LocalState, epoch) + sizeof(uint64_t) * kernels::kNumEpochs,
                "epoch and skipped are read with one copy");
  const auto* source = static_cast<const uint8_t*>(memory->peer(peer)) +
                       offsetof(kernels::ControlRegion, local) +
                       offsetof(kernels::LocalState, epoch);
  EPCOMM_CUDA_CHECK(
      cudaMemcpyAsync(words, source, sizeof(words), cudaMemcpyDeviceToHost, control_stream.get()));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(control_stream.get()));
  return std::max(words[family], words[kernels::kNumEpochs + family]);
}

std::string EpBuffer::Impl::skipRejectedCall(kernels::OpId op, cudaStream_t stream) {
  const kernels::EpochSlot family = kernels::epochSlotOf(op);
  if (family == kernels::kEpochLl) ll_stage = LlStage::kIdle;  // the LL round is over everywhere
  if (broken) return "this EpBuffer was already unusable";
  std::string why;
  try {
    DeviceGuard guard(device);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    EPCOMM_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) {
      why =
          "the call was made during CUDA graph capture, where the peers cannot be told in "
          "stream order";
    } else {
      kernels::launchSkipRejected(peers, family, stream);
      trackWork(stream);
      const auto deadline =
          std::chrono::steady_clock::now() + std::chrono::duration<double>(hostDeadlineS());
      while (true) {  // the skip kernel runs after this rank's earlier work on `stream`
        const cudaError_t status = cudaStreamQuery(stream);
        if (status == cudaSuccess) break;
        if (status != cudaErrorNotReady) EPCOMM_CUDA_CHECK(status);
        checkDeviceError();
        EPCOMM_CHECK_CODE(std::chrono::steady_clock::now() < deadline, ErrorCode::kTimeout,
                          "the stream did not reach the skip of the rejected call");
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
      // Every peer must be past the skipped call before this rank goes on, so that no rank is
      // ever two calls of a family ahead of another (the signal words hold two calls).
      const uint64_t skipped = callsPassed(rank, family);
      for (int r = 0; r < num_ranks && why.empty(); ++r) {
        while (callsPassed(r, family) < skipped) {
          if (std::chrono::steady_clock::now() > deadline) {
            why = "rank " + std::to_string(r) + " did not get to call " + std::to_string(skipped) +
                  " of this op within " + std::to_string(hostDeadlineS()) +
                  " s (every rank must make the same sequence of calls)";
            break;
          }
          std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
      }
      if (why.empty()) {
        return "every peer skipped the call too and got ErrorCode::kRemote; this EpBuffer stays "
               "usable";
      }
    }
  } catch (const std::exception& e) {
    why = e.what();
  }
  broken = true;
  broken_reason = "a rejected call could not be skipped on every rank: " + why;
  return "the peers could not all be told: " + why +
         "; this EpBuffer is now unusable, destroy and recreate it on every rank";
}

void EpBuffer::Impl::waitStream(cudaStream_t stream, const char* what) {
  const double limit_s = hostDeadlineS();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(limit_s);
  while (true) {
    const cudaError_t status = cudaStreamQuery(stream);
    if (status == cudaSuccess) break;
    if (status != cudaErrorNotReady) EPCOMM_CUDA_CHECK(status);
    checkDeviceError();  // a peer's rejection is raised once the stream is done, below
    if (std::chrono::steady_clock::now() > deadline) {
      broken = true;
      broken_reason = std::string("the host timed out waiting for ") + what;
      throw TimeoutError(
          -1, detail::formatMessage(std::string("timed out after ") + std::to_string(limit_s) +
                                        " s waiting for " + what +
                                        " to finish on the GPU (no device-side error was recorded)",
                                    __FILE__, __LINE__));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  checkUsable();
}

int EpBuffer::Impl::resolveSms(cudaStream_t stream, kernels::OpId op, int call_value,
                               int buffer_value, int fallback, const char* what) {
  int sms = call_value != kAuto ? call_value : buffer_value != kAuto ? buffer_value : fallback;
  if (sms < 1 || sms > device_sms) {
    rejectInput(stream, op,
                std::string("invalid argument ") + what + " = " + std::to_string(sms) +
                    ": must be in [1, " + std::to_string(device_sms) + "] (SMs of device " +
                    std::to_string(device) + ")");
  }
  return sms;
}

void EpBuffer::Impl::trackWork(cudaStream_t stream) {
  // Work captured into a CUDA graph is not tracked: an event recorded during capture marks no
  // point of a real stream.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess ||
      capture != cudaStreamCaptureStatusNone) {
    (void)cudaGetLastError();
    return;
  }
  if (cudaEventRecord(work_done.get(), stream) == cudaSuccess) {
    work_tracked = true;
  } else {
    (void)cudaGetLastError();
  }
}

double EpBuffer::Impl::hostDeadlineS() const {
  // first_op_timeout_s >= timeout_s: the longest a device wait of ours can take.
  return resolved.config.first_op_timeout_s * 1.5 + 5.0;
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
  impl_->trackWork(stream);
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
