// SPDX-License-Identifier: Apache-2.0
// The GIN rail transport's host side (rail_gin.hpp). Compiled only when EPCOMM_NCCL_GIN.
#include "nccl/rail_gin.hpp"

#include <nccl.h>
#include <nccl_device.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <sstream>
#include <string>
#include <thread>
#include <utility>

#include "check.hpp"
#include "cuda_resources.hpp"
#include "kernels/rail_gin_launch.hpp"
#include "kernels/rail_launch.hpp"

namespace epcomm::nccl {

namespace {

using rail::RailVerdict;
using rail::gin::GinLayout;
using rail::gin::GinStatus;

constexpr int kMinGinVersionCode = 23000;  // NCCL 2.30.0 (NCCL_VERSION(2, 30, 0))

size_t alignUp(size_t bytes) {
  return (bytes + 15) / 16 * 16;
}

// After a teardown call on the non-blocking communicator: polls until it is no longer in progress,
// for at most `timeout_s` (a destructor never waits longer, never throws; it logs instead).
void settle(const NcclComm& comm, double timeout_s, const char* what) noexcept {
  if (!comm) return;
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_s));
  ncclResult_t state = ncclInProgress;
  while (std::chrono::steady_clock::now() < deadline) {
    if (ncclCommGetAsyncError(comm.get(), &state) != ncclSuccess || state != ncclInProgress) break;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  if (state != ncclSuccess) {
    EPCOMM_LOG_AT(::epcomm::LogLevel::kWarn,
                  "GIN rail transport: " << what << ": " << ncclGetErrorString(state));
  }
}

// One registered window over memory from ncclMemAlloc. Move-only; the destructor deregisters and
// frees, logging (never throwing) a failure.
class GinWindow {
 public:
  GinWindow() = default;
  GinWindow(const GinWindow&) = delete;
  GinWindow& operator=(const GinWindow&) = delete;
  ~GinWindow() { reset(); }

  // An aborted communicator (ncclCommAbort, after a deadline) took its windows with it: only the
  // memory is freed then.
  void reset() noexcept {
    if (window_ != nullptr && owner_ != nullptr && *owner_) {
      const ncclResult_t r = ncclCommWindowDeregister(owner_->get(), window_);
      if (r != ncclSuccess && r != ncclInProgress) {
        EPCOMM_LOG_AT(::epcomm::LogLevel::kWarn,
                      "GIN rail transport: ncclCommWindowDeregister: " << ncclGetErrorString(r));
      } else {
        settle(*owner_, timeout_s_, "ncclCommWindowDeregister");
      }
    }
    if (ptr_ != nullptr) {
      const ncclResult_t r = ncclMemFree(ptr_);
      if (r != ncclSuccess) {
        EPCOMM_LOG_AT(::epcomm::LogLevel::kWarn,
                      "GIN rail transport: ncclMemFree: " << ncclGetErrorString(r));
      }
    }
    window_ = nullptr;
    ptr_ = nullptr;
    owner_ = nullptr;
  }

  void* ptr() const { return ptr_; }
  ncclWindow_t window() const { return window_; }

  // Allocates `bytes` with ncclMemAlloc (zeroed) and registers them on `comm`: collective.
  void create(NcclComm& comm, size_t bytes, double timeout_s, const std::string& what);

 private:
  NcclComm* owner_ = nullptr;
  double timeout_s_ = 0;
  void* ptr_ = nullptr;
  ncclWindow_t window_ = nullptr;
};

// A failed GIN setup call: kUnsupported with NCCL's own words (the usual cause is a network or
// driver without GIN, not a bug).
[[noreturn]] void throwGinSetup(ncclResult_t result, ncclComm_t comm, const std::string& what) {
  throw Error(ErrorCode::kUnsupported,
              "GIN rail transport (EPCOMM_RAIL_TRANSPORT=gin): " + what +
                  " failed: " + describeResult(result, comm) +
                  ". GIN needs an RDMA network NCCL can drive from the GPU (NCCL_DEBUG=INFO "
                  "says which); unset EPCOMM_RAIL_TRANSPORT to use the host-API transport");
}

void GinWindow::create(NcclComm& comm, size_t bytes, double timeout_s, const std::string& what) {
  reset();
  const ncclResult_t allocated = ncclMemAlloc(&ptr_, bytes);
  if (allocated != ncclSuccess) {
    ptr_ = nullptr;
    throwGinSetup(allocated, comm.get(), "ncclMemAlloc(" + std::to_string(bytes) + ") for " + what);
  }
  EPCOMM_CUDA_CHECK(cudaMemset(ptr_, 0, bytes));
  const ncclResult_t registered =
      ncclCommWindowRegister(comm.get(), ptr_, bytes, &window_, NCCL_WIN_DEFAULT);
  if (registered != ncclSuccess && registered != ncclInProgress) {
    window_ = nullptr;
    throwGinSetup(registered, comm.get(), "ncclCommWindowRegister of " + what);
  }
  owner_ = &comm;
  timeout_s_ = timeout_s;
  waitReady(comm, timeout_s, -1, "GIN window registration (" + what + ")");
}

std::string ginTypeName(int type) {
  switch (type) {
    case NCCL_GIN_TYPE_NONE:
      return "none";
    case NCCL_GIN_TYPE_PROXY:
      return "proxy";
    case NCCL_GIN_TYPE_GDAKI:
      return "gdaki";
    default:
      return std::to_string(type);
  }
}

class GinRailTransport final : public RailTransport {
 public:
  GinRailTransport(RailComm& rail, double timeout_s, const RailTransportLimits& limits);
  ~GinRailTransport() override;
  GinRailTransport(const GinRailTransport&) = delete;
  GinRailTransport& operator=(const GinRailTransport&) = delete;

  RailExchangeResult exchange(const RailExchangeArgs& args, cudaStream_t stream) override;
  void wait(cudaStream_t stream) override;
  const int32_t* recvCountsDevice() const override {
    return last_exact_ ? host_.recvCountsDevice() : scratch_.as<int32_t>(recv_counts_off_);
  }
  const int64_t* recvOffsetsDevice() const override {
    return last_exact_ ? host_.recvOffsetsDevice() : scratch_.as<int64_t>(recv_offsets_off_);
  }
  RailTransportKind kind() const override { return RailTransportKind::kGin; }

 private:
  std::string describe() const;

  RailComm* rail_;
  double timeout_s_;
  int num_nodes_;
  int me_;
  RailExchange host_;  // exact calls, and the host waits with the deadline
  GinLayout layout_;
  GinWindow recv_window_, send_window_;
  ncclDevComm dev_comm_{};
  bool dev_comm_created_ = false;
  size_t epoch_off_ = 0, status_off_ = 0, verdict_off_ = 0, recv_counts_off_ = 0,
         recv_offsets_off_ = 0;
  DeviceMemory scratch_;
  MappedHostMemory host_copy_;  // status + verdict for wait()
  bool last_exact_ = true;
  bool verdict_pending_ = false;
};

std::string GinRailTransport::describe() const {
  std::ostringstream os;
  os << "GIN rail transport on rail " << rail_->rail << " (ranks " << rankList(rail_->rail_ranks)
     << "; this rank is its rank " << me_ << ")";
  return os.str();
}

GinRailTransport::GinRailTransport(RailComm& rail, double timeout_s,
                                   const RailTransportLimits& limits)
    : rail_(&rail),
      timeout_s_(timeout_s),
      num_nodes_(rail.rail_size),
      me_(rail.rail_rank),
      host_(rail, timeout_s) {
  ncclComm_t comm = rail.comm.get();
  // 1. What this NCCL says, before any collective call: every rail rank asks the same library
  //    about the same network, so they normally all fail here alike.
  int version = 0;
  EPCOMM_NCCL_CHECK(ncclGetVersion(&version), comm);
  EPCOMM_CHECK_CODE(version >= kMinGinVersionCode, ErrorCode::kUnsupported,
                    describe() << ": the loaded NCCL is " << runtimeVersion()
                               << ", GIN needs >= 2.30 (this epcomm_nccl was compiled against "
                               << buildVersion() << "); unset EPCOMM_RAIL_TRANSPORT");
  ncclCommProperties_t props = NCCL_COMM_PROPERTIES_INITIALIZER;
  const ncclResult_t queried = ncclCommQueryProperties(comm, &props);
  if (queried == ncclInProgress) {
    waitReady(rail.comm, timeout_s, -1, "ncclCommQueryProperties on " + describe());
  } else if (queried != ncclSuccess) {
    throwGinSetup(queried, comm, "ncclCommQueryProperties");
  }
  // Lenient on purpose (never run against a GIN network): a GIN type in use or any listed as
  // supported lets ncclDevCommCreate decide, and report what it says if it cannot.
  bool any_supported = false;
  for (int t = 0; t < NCCL_GIN_MAX_TYPES; ++t) any_supported = any_supported || props.ginSupport[t];
  if (!props.deviceApiSupport || (props.ginType == NCCL_GIN_TYPE_NONE && !any_supported)) {
    std::ostringstream os;
    os << describe() << ": NCCL " << runtimeVersion()
       << " reports no GIN for this communicator (ncclCommQueryProperties: deviceApiSupport = "
       << props.deviceApiSupport << ", ginType = " << ginTypeName(props.ginType)
       << ", railedGinType = " << ginTypeName(props.railedGinType) << ", supported GIN types:";
    for (int t = 0; t < NCCL_GIN_MAX_TYPES; ++t) {
      if (props.ginSupport[t]) os << " " << ginTypeName(t);
    }
    if (!any_supported) os << " none";
    os << "). GIN needs an RDMA NIC NCCL can drive from the GPU (GDAKI or the proxy); sockets "
          "(and one host) have none. Unset EPCOMM_RAIL_TRANSPORT to use the host-API transport";
    throw Error(ErrorCode::kUnsupported, os.str());
  }

  // 2. Windows, the same sizes on every rail rank (from limits, the same everywhere).
  layout_ = rail::gin::ginLayout(num_nodes_, std::max<int64_t>(limits.worst_case_slot_bytes, 1));
  recv_window_.create(rail.comm, static_cast<size_t>(layout_.recv_window_bytes), timeout_s,
                      "the receive window of " + describe());
  send_window_.create(rail.comm, static_cast<size_t>(layout_.send_window_bytes), timeout_s,
                      "the send window of " + describe());

  // 3. The device communicator: its world team is the rail (rank = node).
  ncclDevCommRequirements_t reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
  reqs.ginContextCount = 1;
  reqs.ginSignalCount = rail::gin::ginSignalCount(num_nodes_);
  reqs.ginConnectionType = NCCL_GIN_CONNECTION_FULL;
  reqs.ginVaSignalsRequired = false;      // indexed signals only
  reqs.ginStrongSignalsRequired = false;  // weak signals bundled with their put
  const ncclResult_t created = ncclDevCommCreate(comm, &reqs, &dev_comm_);
  if (created != ncclSuccess && created != ncclInProgress) {
    throwGinSetup(created, comm, "ncclDevCommCreate");
  }
  dev_comm_created_ = true;
  waitReady(rail.comm, timeout_s, -1, "ncclDevCommCreate on " + describe());
  EPCOMM_CHECK_CODE(dev_comm_.ginContextCount >= 1, ErrorCode::kUnsupported,
                    describe() << ": ncclDevCommCreate gave a device communicator without a GIN "
                                  "context; unset EPCOMM_RAIL_TRANSPORT");

  // Device scratch: | epoch | status | verdict | recv counts | recv offsets |
  const size_t m = static_cast<size_t>(num_nodes_);
  epoch_off_ = 0;
  status_off_ = alignUp(sizeof(uint64_t));
  verdict_off_ = status_off_ + alignUp(sizeof(GinStatus));
  recv_counts_off_ = verdict_off_ + alignUp(sizeof(RailVerdict));
  recv_offsets_off_ = recv_counts_off_ + alignUp(m * sizeof(int32_t));
  scratch_ = DeviceMemory(recv_offsets_off_ + alignUp(m * sizeof(int64_t)));
  EPCOMM_CUDA_CHECK(cudaMemset(scratch_.get(), 0, scratch_.bytes()));
  host_copy_ = MappedHostMemory(recv_counts_off_);
}

GinRailTransport::~GinRailTransport() {
  if (dev_comm_created_ && rail_->comm) {
    const ncclResult_t r = ncclDevCommDestroy(rail_->comm.get(), &dev_comm_);
    if (r != ncclSuccess && r != ncclInProgress) {
      EPCOMM_LOG_AT(::epcomm::LogLevel::kWarn,
                    "GIN rail transport: ncclDevCommDestroy: " << ncclGetErrorString(r));
    } else {
      settle(rail_->comm, timeout_s_, "ncclDevCommDestroy");
    }
  }
  // The windows deregister themselves next (or only free their memory after an abort).
}

RailExchangeResult GinRailTransport::exchange(const RailExchangeArgs& a, cudaStream_t stream) {
  if (a.mode == RailExchangeMode::kExact) {
    last_exact_ = true;
    return host_.exchange(a, stream);
  }
  EPCOMM_CHECK_CODE(
      static_cast<bool>(rail_->comm), ErrorCode::kBroken,
      "the communicator of " << describe() << " was aborted by an earlier error; create a new one");
  const int64_t m = num_nodes_;
  EPCOMM_ARG_CHECK(a.send != nullptr && a.send_counts != nullptr && a.recv != nullptr,
                   "rail exchange send / send_counts / recv", "null", "device pointers");
  const char* problem = rail::gin::ginArgsProblem(a.row_bytes, a.max_rows, layout_.slot_bytes);
  EPCOMM_ARG_CHECK(problem[0] == '\0', "rail exchange (GIN) row_bytes x max_rows",
                   a.row_bytes << " x " << a.max_rows << " (" << problem << ")",
                   "within the slot of " << layout_.slot_bytes << " bytes fixed at creation");
  EPCOMM_ARG_CHECK(a.recv_capacity_rows >= m * a.max_rows, "recv_capacity_rows",
                   a.recv_capacity_rows, ">= num_nodes * max_rows = " << m * a.max_rows);

  auto* recv_base = static_cast<uint8_t*>(recv_window_.ptr());
  auto* send_base = static_cast<uint8_t*>(send_window_.ptr());
  rail::PackRecordParams record{};
  record.send_counts = a.send_counts;
  record.record = reinterpret_cast<int32_t*>(send_base);
  record.num_nodes = num_nodes_;
  record.mode = static_cast<int32_t>(rail::RailMode::kWorstCase);
  record.row_bytes = static_cast<int32_t>(a.row_bytes);
  record.capacity_rows = static_cast<int32_t>(a.max_rows);
  testing::takeRailCountCorruption(&record.corrupt_node, &record.corrupt_value);
  rail::launchPackRailRecord(record, stream);

  const int64_t caller_slot = a.max_rows * a.row_bytes;
  rail::gin::GinCopyParams pack{};
  pack.src = static_cast<const uint8_t*>(a.send);
  // Send slot d: [this rank's record (packed into slot 0's head above) | its rows for d].
  pack.dst = send_base + layout_.header_bytes;
  pack.src_stride = caller_slot;
  pack.dst_stride = layout_.stride;
  pack.counts = a.send_counts;
  pack.num_nodes = num_nodes_;
  pack.row_bytes = a.row_bytes;
  pack.max_rows = a.max_rows;
  pack.header = send_base;
  pack.header_dst = send_base;
  pack.header_bytes = layout_.record_bytes;
  rail::gin::launchGinCopySlots(pack, stream);

  rail::gin::GinExchangeParams x{};
  x.dev_comm = dev_comm_;
  x.recv_window = recv_window_.window();
  x.send_window = send_window_.window();
  x.recv_base = recv_base;
  x.layout = layout_;
  x.num_nodes = num_nodes_;
  x.me = me_;
  x.row_bytes = a.row_bytes;
  x.max_rows = a.max_rows;
  x.send_counts = a.send_counts;
  x.epoch = scratch_.as<uint64_t>(epoch_off_);
  x.status = scratch_.as<GinStatus>(status_off_);
  // The device gives up first (90 % of the deadline), so the host's wait finds its record
  // naming the peer instead of a bare host timeout.
  x.timeout_ns = static_cast<uint64_t>(timeout_s_ * 0.9 * 1e9);
  // NCCL's flush counts clock64 cycles: 2 per ns covers clocks up to 2 GHz (H100/H200: 1.98).
  x.flush_timeout_cycles = static_cast<uint64_t>(timeout_s_ * 0.9 * 2e9);
  rail::gin::launchGinExchange(x, stream);

  // The host-API transport's judge over the records the GIN kernel collected.
  const rail::JudgeParams judge{reinterpret_cast<const int32_t*>(recv_base + layout_.records_off),
                                num_nodes_,
                                me_,
                                scratch_.as<RailVerdict>(verdict_off_),
                                scratch_.as<int32_t>(recv_counts_off_),
                                scratch_.as<int64_t>(recv_offsets_off_)};
  rail::launchJudgeRailRecords(judge, stream);

  rail::gin::GinCopyParams unpack{};
  unpack.src = recv_base + layout_.slots_off + layout_.header_bytes;
  unpack.dst = static_cast<uint8_t*>(a.recv);
  unpack.src_stride = layout_.stride;
  unpack.dst_stride = caller_slot;
  unpack.counts = judge.recv_counts;
  unpack.num_nodes = num_nodes_;
  unpack.row_bytes = a.row_bytes;
  unpack.max_rows = a.max_rows;
  rail::gin::launchGinCopySlots(unpack, stream);

  last_exact_ = false;
  verdict_pending_ = true;
  return {};
}

void GinRailTransport::wait(cudaStream_t stream) {
  EPCOMM_CHECK_CODE(
      static_cast<bool>(rail_->comm), ErrorCode::kBroken,
      "the communicator of " << describe() << " was aborted by an earlier error; create a new one");
  // Status and verdict are adjacent: one copy, then clear both (sticky since the last wait()).
  const size_t bytes = recv_counts_off_ - status_off_;
  char* copy = host_copy_.host<char>();
  EPCOMM_CUDA_CHECK(
      cudaMemcpyAsync(copy, scratch_.as<char>(status_off_), bytes, cudaMemcpyDeviceToHost, stream));
  EPCOMM_CUDA_CHECK(cudaMemsetAsync(scratch_.as<char>(status_off_), 0, bytes, stream));
  host_.wait(stream);  // everything on the stream, with the deadline (aborts and throws past it)
  GinStatus status;
  RailVerdict verdict;
  std::memcpy(&status, copy, sizeof(status));
  std::memcpy(&verdict, copy + (verdict_off_ - status_off_), sizeof(verdict));
  const bool was_pending = std::exchange(verdict_pending_, false);
  if (status.phase != 0) {
    const int peer = status.peer_node >= 0 && status.peer_node < num_nodes_
                         ? rail_->rail_ranks[static_cast<size_t>(status.peer_node)]
                         : -1;
    rail_->comm.abort();
    std::ostringstream os;
    os << describe() << ": call " << status.epoch << " timed out on the device, "
       << rail::gin::ginPhaseName(static_cast<rail::gin::GinPhase>(status.phase));
    if (peer >= 0) {
      os << " of node " << status.peer_node << " (rank " << peer << "): signal " << status.observed
         << ", expected >= " << status.expected;
    } else {
      os << " (ncclGin::flush returned " << status.observed << ")";
    }
    os << ". The communicator was aborted (ncclCommAbort); create a new one. Is every rank of the "
          "rail running this exchange?";
    throw TimeoutError(peer, detail::formatMessage(os.str(), __FILE__, __LINE__));
  }
  if (verdict.fault != 0 && was_pending) host_.raiseVerdict(verdict, true);
}

}  // namespace

std::unique_ptr<RailTransport> makeGinRailTransport(RailComm& rail, double timeout_s,
                                                    const RailTransportLimits& limits) {
  return std::make_unique<GinRailTransport>(rail, timeout_s, limits);
}

}  // namespace epcomm::nccl
